"""Teacher outputs held in memory (`MemoryTeacherOutputs`), checked against the batch's inputs
exactly as stored outputs on disk are."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.data.arrays import move_to
from kdistill.data.batches import call_model
from kdistill.distill.teacher.store.manifest import loader_views
from kdistill.distill.teacher.store.signatures import (
    InputSignatures,
    _EpochRows,
    input_signatures,
    sample_shape_of,
)
from kdistill.errors import CacheError


class MemoryTeacherOutputs(_EpochRows):
    """Teacher outputs held in memory — a tensor, or a dict of tensors (a multi-task teacher),
    row i for dataset sample i — with the signatures of the inputs they were computed on.

    `lookup(index, inputs)` checks the batch exactly like `TeacherCache.lookup` (CacheError when
    the inputs are not the samples the rows were computed on) and returns (rows, None): no
    tapped features, so a term that taps a teacher layer still runs the teacher.
    Make one with `predict(teacher, loader)` (one pass of the teacher) or `of(outputs,
    dataset)` for outputs computed elsewhere; pass it to `fit(..., teacher_outputs=…)`.
    With `views` (``predict(teacher, loader, epochs=E)`` on a loader with keyed augmentation)
    row ``e·N + i`` is sample i's view in epoch e, as in a view cache (`build_view_cache`).
    """

    source = "in-memory teacher outputs"
    layers: list[str] = []  # no tapped teacher layers: outputs only

    def __init__(
        self,
        outputs: Tensor | Mapping[str, Tensor],
        signatures: InputSignatures,
        views: Mapping | None = None,
    ):
        epochs = 1 if views is None else int(views["epochs"])
        if len(signatures) % epochs:
            raise CacheError(
                f"{self.source}: {len(signatures)} rows do not make {epochs} epochs of views"
            )
        self.views = dict(views) if views is not None else None
        self.size = len(signatures) // epochs
        self.epoch = 0
        values = outputs if isinstance(outputs, Mapping) else {None: outputs}
        for key, value in values.items():
            name = "outputs" if key is None else f"outputs[{key!r}]"
            if not isinstance(value, Tensor) or value.dim() < 1:
                raise CacheError(
                    f"{self.source}: {name} must be a tensor with one row per sample, got "
                    f"{type(value).__name__}"
                )
            if len(value) != len(signatures):
                raise CacheError(
                    f"{self.source}: {name} has {len(value)} rows for {len(signatures)} input "
                    "samples; stored outputs need one row per sample of the data they were "
                    "computed on"
                )
        self.outputs = dict(outputs) if isinstance(outputs, Mapping) else outputs
        self.signatures = signatures

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        kind = f"dict {sorted(self.outputs)}" if isinstance(self.outputs, dict) else "tensor"
        views = f", epochs={self.epochs}" if self.views is not None else ""
        return f"MemoryTeacherOutputs(size={len(self)}, {kind}{views})"

    @classmethod
    def of(cls, outputs: Tensor | Mapping[str, Tensor], dataset: Any) -> MemoryTeacherOutputs:
        """`outputs` computed on `dataset` (row i on sample i): a kdistill dataset
        (`dataset.inputs` is read), a torch `TensorDataset` (its first tensor) or the inputs
        tensor itself."""
        if isinstance(dataset, Tensor):
            inputs = dataset
        elif isinstance(dataset, torch.utils.data.TensorDataset):
            inputs = dataset.tensors[0]
        else:
            inputs = getattr(dataset, "inputs", None)
        if not isinstance(inputs, Tensor):
            raise CacheError(
                f"{cls.source}: {type(dataset).__name__} has no `inputs` tensor to sign; use "
                "MemoryTeacherOutputs.predict(teacher, loader) instead"
            )
        return cls(outputs, InputSignatures.of_inputs(inputs, cls.source))

    @classmethod
    @torch.no_grad()
    def predict(
        cls,
        teacher: nn.Module,
        loader: Iterable,
        device: str | torch.device = "cpu",
        epochs: int | None = None,
    ) -> MemoryTeacherOutputs:
        """Run `teacher` (eval mode, inference mode) over `loader`'s batches and keep its outputs
        (float32, on the CPU) with the signatures of each batch's inputs, placed by
        `batch.index`; every sample of the dataset must be seen exactly once per epoch (a loader
        over the whole dataset, without drop_last or sharding).

        `epochs`: for a loader with keyed augmentation (`loader_views`), the epochs of views to
        keep (row ``e·N + i``, as `build_view_cache` stores them; the loader's epoch is restored
        afterwards); a loader without augmentation takes one pass (`epochs` None or 1)."""
        spec = loader_views(loader)
        if spec is None and epochs not in (None, 1):
            raise CacheError(
                f"{cls.source}: epochs={epochs} needs a loader with keyed augmentation; a loader "
                "without it gives the same inputs every epoch (leave epochs unset)"
            )
        if spec is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
        ):
            raise CacheError(
                f"{cls.source}: the loader augments its batches ({spec}); say for how many "
                f"epochs of views to keep the teacher's outputs (epochs=E), got {epochs!r}"
            )
        epochs = epochs or 1
        size = len(loader.dataset)
        total = size * epochs
        signatures = np.zeros((total, 2))
        seen = torch.zeros(total, dtype=torch.int64)
        outputs: dict[Any, Tensor] = {}
        sample_shape = None
        was_training = teacher.training
        was_epoch = getattr(loader, "epoch", 0)
        teacher.eval()
        try:
            for epoch in range(epochs):
                if spec is not None:
                    loader.set_epoch(epoch)
                for batch in loader:
                    with torch.inference_mode():
                        output = call_model(teacher, move_to(batch.inputs, device))
                    values = output if isinstance(output, Mapping) else {None: output}
                    rows = batch.index.cpu() + epoch * size
                    for key, value in values.items():
                        if not isinstance(value, Tensor):
                            continue  # e.g. a Hugging Face output's past_key_values cache
                        value = value.float().cpu()
                        if key not in outputs:
                            outputs[key] = torch.zeros(total, *value.shape[1:])
                        outputs[key][rows] = value
                    signatures[rows.numpy()] = input_signatures(batch.inputs)
                    seen.index_add_(0, rows, torch.ones_like(rows))
                    sample_shape = sample_shape_of(batch.inputs)
        finally:
            teacher.train(was_training)
            if spec is not None:
                loader.set_epoch(was_epoch)
        if not bool((seen == 1).all()):
            raise CacheError(
                f"{cls.source}: the loader gave {int((seen == 0).sum())} samples no time and "
                f"{int((seen > 1).sum())} more than once; predict needs every sample once "
                "per epoch (a loader over the whole dataset, without drop_last or sharding)"
            )
        stored = outputs[None] if None in outputs else outputs
        views = None if spec is None else {"epochs": epochs, **spec}
        return cls(stored, InputSignatures(signatures, sample_shape, cls.source), views)

    def lookup(self, index: Tensor, inputs: Tensor | None = None) -> tuple[Any, None]:
        """(rows at dataset positions `index`, None) after the input check (see the class)."""
        rows, view = self._rows(index)
        self.signatures.check(rows, inputs, view)
        picked = torch.from_numpy(rows)
        if isinstance(self.outputs, dict):
            return {key: value[picked] for key, value in self.outputs.items()}, None
        return self.outputs[picked], None
