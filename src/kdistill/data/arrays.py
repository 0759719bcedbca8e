"""In-memory datasets, seeded batch iteration, and deterministic splits.

Everything here is deterministic given a seed, so that every model of an experiment (teacher,
student alone, distilled students) sees exactly the same samples in the same order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from kdistill.data.augment import Augmentation
from kdistill.errors import DataError

__all__ = [
    "UNLABELLED",
    "ArrayDataset",
    "Batch",
    "BatchLoader",
    "IndexedDataset",
    "hide_labels",
    "move_to",
    "repeat_to",
    "split_train_val",
    "take",
]

#: The target of a sample without a label (PyTorch's ``ignore_index`` default, so `CE` leaves
#: such samples out of its mean). Only a dataset made with ``partly_labelled=True`` may hold it.
UNLABELLED = -100


@dataclass(eq=False)
class ArrayDataset:
    """A whole dataset held in memory as two tensors.

    ``inputs`` is ``N×C×H×W`` float32 (already normalised), ``targets`` is ``N`` int64 with
    values in ``[0, len(classes))``. The tensors are treated as read-only: subsets and batches are
    new tensors made by indexing, nothing writes into them in place.

    ``partly_labelled``: some samples have no label; their target is `UNLABELLED` (−100), which
    `CE` leaves out of its mean and which any loss that reads labels without ignoring −100
    refuses (a label out of range), so an unlabelled sample is never trained on as if labelled.
    Made by `hide_labels`; without the flag a −100 target is an error like any other.
    """

    inputs: Tensor
    targets: Tensor
    classes: list[str]
    name: str = "dataset"
    partly_labelled: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Tensor) or not isinstance(self.targets, Tensor):
            raise DataError(
                f"dataset {self.name!r}: inputs and targets must be tensors, got "
                f"{type(self.inputs).__name__} and {type(self.targets).__name__}"
            )
        if self.inputs.dim() < 1:
            raise DataError(f"dataset {self.name!r}: inputs must have a sample dimension, got 0-d")
        if self.targets.dim() != 1:
            raise DataError(
                f"dataset {self.name!r}: targets must be 1-D, got shape {tuple(self.targets.shape)}"
            )
        if self.targets.dtype != torch.int64:
            raise DataError(
                f"dataset {self.name!r}: targets must be int64, got {self.targets.dtype}"
            )
        if len(self.inputs) != len(self.targets):
            raise DataError(
                f"dataset {self.name!r}: {len(self.inputs)} inputs but {len(self.targets)} targets"
            )
        self.classes = list(self.classes)
        labels = self.targets
        if self.partly_labelled:
            labels = labels[labels != UNLABELLED]
        if len(labels) > 0:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= len(self.classes):
                also = f" or {UNLABELLED} (unlabelled)" if self.partly_labelled else ""
                hint = (
                    f"; {UNLABELLED} marks unlabelled samples only in a dataset made by "
                    "hide_labels (partly_labelled=True)"
                    if low == UNLABELLED and not self.partly_labelled
                    else ""
                )
                raise DataError(
                    f"dataset {self.name!r}: targets must lie in [0, {len(self.classes)}){also} "
                    f"for {len(self.classes)} classes, found values in [{low}, {high}]{hint}"
                )

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, size={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_labelled(self) -> int:
        """Samples that carry a label (all of them unless `partly_labelled`)."""
        if not self.partly_labelled:
            return len(self)
        return int((self.targets != UNLABELLED).sum())

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(C, H, W)`` for images."""
        return tuple(self.inputs.shape[1:])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs[indices], targets[indices])`` by one fancy-indexing call per tensor."""
        return self.inputs[indices], self.targets[indices]

    def subset(self, indices: Sequence[int] | Tensor, name: str | None = None) -> ArrayDataset:
        """A new dataset holding the samples at ``indices`` (in that order)."""
        index = _as_index(indices, len(self), self.name)
        return ArrayDataset(
            inputs=self.inputs[index],
            targets=self.targets[index],
            classes=list(self.classes),
            name=name if name is not None else f"{self.name}-subset",
            partly_labelled=self.partly_labelled,
        )

    def fingerprint(self) -> str:
        """sha256 hex digest over the dtypes, shapes and bytes of ``inputs`` and ``targets``.

        Two datasets with equal tensors have equal fingerprints whatever their names; it serves as
        a cache key (e.g. for precomputed teacher outputs).
        """
        digest = hashlib.sha256()
        for label, tensor in (("inputs", self.inputs), ("targets", self.targets)):
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"{label}:{array.dtype.str}:{tuple(array.shape)};".encode())
            digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()


def _as_index(indices: Sequence[int] | Tensor, size: int, name: str) -> Tensor:
    """``indices`` as a 1-D int64 tensor, checked against ``[0, size)``."""
    index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if index.numel() > 0:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            raise IndexError(
                f"dataset {name!r}: indices must lie in [0, {size}), "
                f"found values in [{low}, {high}]"
            )
    return index


Target = Tensor | dict[str, Tensor]


def move_to(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``value`` with every tensor in it on ``device``: a tensor, or dicts, lists and tuples of
    them nested to any depth (a multi-task target, a dict of model keyword arguments). Anything
    that is not a tensor (``None``, numbers, strings) is returned as it is."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {key: move_to(item, device, non_blocking) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [move_to(item, device, non_blocking) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def batch_size_of(inputs: Any) -> int | None:
    """The leading dimension of the first tensor found in ``inputs`` (depth first), or None."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else None
    items = inputs.values() if isinstance(inputs, Mapping) else inputs
    if isinstance(inputs, Mapping | list | tuple):
        for item in items:
            size = batch_size_of(item)
            if size is not None:
                return size
    return None


@dataclass(eq=False)
class Batch:
    """One batch: ``inputs``, ``target`` and ``index`` (int64 positions in the dataset).

    ``inputs`` is a tensor (the model is called as ``model(inputs)``) or a dict of keyword
    arguments (``model(**inputs)``, e.g. ``{"input_ids": …, "attention_mask": …}``).
    ``target`` is a tensor, a dict of tensors for multi-task data (``{"seg": …, "det": …}``;
    a term with ``output="seg"`` reads ``target["seg"]``), or None when the data has no labels.
    ``index`` is None when the loader does not say which samples a batch holds (a plain torch
    ``DataLoader``); the terms and teacher caches that need it then fail with a clear error."""

    inputs: Tensor | dict[str, Any]
    target: Target | None = None
    index: Tensor | None = None

    def __len__(self) -> int:
        if self.index is not None:
            return len(self.index)
        size = batch_size_of(self.inputs)
        if size is None:
            raise TypeError("a batch whose inputs hold no tensor has no length")
        return size

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with all its tensors moved to ``device``."""
        return Batch(
            inputs=move_to(self.inputs, device, non_blocking),
            target=move_to(self.target, device, non_blocking),
            index=move_to(self.index, device, non_blocking),
        )


class IndexedDataset(Protocol):
    """What :class:`BatchLoader` needs from a dataset."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed derived from ``(seed, epoch)`` by sha256.

    Unlike ``seed + epoch`` it does not make (seed 0, epoch 1) and (seed 1, epoch 0) collide.
    """
    digest = hashlib.sha256(f"kdistill-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class BatchLoader:
    """Iterates a dataset in batches of :class:`Batch`.

    Order: ``arange(N)``, or with ``shuffle`` ``torch.randperm(N)`` drawn from a
    ``torch.Generator`` seeded by ``epoch_seed(seed, epoch)`` — every model trained with the same
    seed sees the same order, and a resumed run replays it exactly.

    Sharding (like ``torch.utils.data.DistributedSampler``): the epoch's order is padded by
    wrapping around to ``world_size · ceil(N / world_size)`` indices, and rank ``r`` takes
    ``order[r::world_size]``, so every rank gets ``ceil(N / world_size)`` samples.
    ``batch_size`` is the per-rank batch; ``drop_last`` drops this rank's final short batch.

    ``augmentation`` (a `kdistill.data.augment.Augmentation`): each batch's inputs are replaced
    by their views for the current epoch, a fixed function of ``(augment_seed, epoch, index)``
    (``augment_seed`` defaults to ``seed``): the same view of a sample whatever batch, order,
    shard or resume it comes in, so stored teacher outputs can be computed for the views
    (`kdistill.cache.build_view_cache`). Only inputs change: the dataset's targets must be one
    label per sample.
    """

    def __init__(
        self,
        dataset: IndexedDataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augmentation: Augmentation | None = None,
        augment_seed: int | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must satisfy 0 <= rank < world_size={world_size}, got {rank!r}")
        if len(dataset) == 0:
            name = getattr(dataset, "name", type(dataset).__name__)
            raise DataError(f"dataset '{name}' is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        if augmentation is not None and not isinstance(augmentation, Augmentation):
            raise ValueError(
                f"augmentation must be a kdistill.data.augment.Augmentation, got "
                f"{type(augmentation).__name__}"
            )
        active = augmentation is not None and augmentation.active
        self.augmentation = augmentation if active else None
        self.augment_seed = seed if augment_seed is None else augment_seed

    def view_spec(self) -> dict | None:
        """What decides the views of this loader's batches — ``{"augmentation": {…}, "seed":
        augment_seed}`` — or None when it does not augment (stored teacher outputs record it)."""
        if self.augmentation is None:
            return None
        return {"augmentation": self.augmentation.describe(), "seed": int(self.augment_seed)}

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch: ``ceil(N / world_size)``."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` and ``iter_from`` use."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> Tensor:
        """This rank's sample indices (int64) for ``epoch``, in iteration order."""
        size = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(size, generator=generator)
        else:
            order = torch.arange(size)
        total = self.num_samples * self.world_size
        if total > size:
            repeats = math.ceil(total / size)
            order = order.repeat(repeats)[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[Batch]:
        """The current epoch's batches from batch number ``step`` on (mid-epoch resume).

        Skipped batches are never built: iteration starts at ``order[step · batch_size]``.
        """
        if not isinstance(step, int) or not 0 <= step <= len(self):
            raise ValueError(f"step must lie in [0, {len(self)}] for this epoch, got {step!r}")
        return self._batches(self.epoch_order(self.epoch), step)

    def _batches(self, order: Tensor, start: int) -> Iterator[Batch]:
        size = self.batch_size
        epoch = self.epoch
        for step in range(start, len(self)):
            index = order[step * size : (step + 1) * size]
            inputs, target = self.dataset.get_batch(index)
            if self.augmentation is not None:
                inputs = self._views(inputs, target, index, epoch)
            yield Batch(inputs=inputs, target=target, index=index)

    def _views(self, inputs: Tensor, target: Any, index: Tensor, epoch: int) -> Tensor:
        assert self.augmentation is not None
        if not (isinstance(target, Tensor) and target.dim() == 1):
            what = (
                f"a tensor of shape {tuple(target.shape)}"
                if isinstance(target, Tensor)
                else f"a {type(target).__name__}"
            )
            raise DataError(
                f"dataset {getattr(self.dataset, 'name', '?')!r}: augmentation changes the "
                f"inputs only, so the targets must be one label per sample; got {what} (masks "
                "or boxes would no longer match the cropped / flipped pixels)"
            )
        return self.augmentation.apply(
            inputs,
            index,
            epoch,
            self.augment_seed,
            partners=lambda positions: self.dataset.get_batch(positions)[0],
            size=len(self.dataset),
        )


def _stratified_pick(dataset, count: int, seed: int, stratify: bool) -> Tensor:
    """``count`` distinct positions of ``dataset`` drawn at random (seeded), returned sorted.

    Without ``stratify`` only ``len(dataset)`` is used (any dataset with a length: scenes too).
    With ``stratify`` each class c of size n_c gets ``count · n_c / N`` picks, rounded by the
    largest-remainder method so the total is exactly ``count`` (ties go to the lower class).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    size = len(dataset)
    if not stratify:
        return torch.randperm(size, generator=generator)[:count].sort().values
    targets = dataset.targets
    classes, members = torch.unique(targets, return_counts=True)
    quota = [count * int(n) // size for n in members]
    remainder = [count * int(n) % size for n in members]
    missing = count - sum(quota)
    by_remainder = sorted(range(len(quota)), key=lambda i: (-remainder[i], i))
    for i in by_remainder[:missing]:
        quota[i] += 1
    picked = []
    for label, take_n in zip(classes.tolist(), quota, strict=True):
        positions = torch.nonzero(targets == label).reshape(-1)
        picked.append(positions[torch.randperm(len(positions), generator=generator)[:take_n]])
    return torch.cat(picked).sort().values


def split_train_val(
    dataset: ArrayDataset, val_size: int | float, seed: int = 0, *, stratify: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split into ``(train, val)`` by a seeded random draw of the validation samples.

    ``val_size`` is a count (int ≥ 1) or a fraction in (0, 1) (rounded to the nearest count).
    With ``stratify`` each class keeps its share (see ``_stratified_pick``). Both parts keep the
    dataset's original sample order; together they hold every sample exactly once.
    """
    size = len(dataset)
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ValueError(f"val_size must be an int or a float, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must lie in (0, 1), got {val_size}")
        count = round(val_size * size)
    else:
        count = val_size
    if count < 1:
        raise DataError(
            f"dataset {dataset.name!r}: val_size={val_size!r} of {size} samples gives no "
            f"validation samples"
        )
    if count >= size:
        raise DataError(
            f"dataset {dataset.name!r}: val_size={val_size!r} of {size} samples leaves no "
            f"training data"
        )
    val_index = _stratified_pick(dataset, count, seed, stratify)
    is_val = torch.zeros(size, dtype=torch.bool)
    is_val[val_index] = True
    train_index = torch.nonzero(~is_val).reshape(-1)
    train = dataset.subset(train_index, name=f"{dataset.name}-train")
    val = dataset.subset(val_index, name=f"{dataset.name}-val")
    return train, val


def take(
    dataset: ArrayDataset, n: int | None, seed: int = 0, *, stratify: bool = True
) -> ArrayDataset:
    """A seeded random subset of ``n`` samples (original order kept); ``None`` or ``n ≥ N``
    returns ``dataset`` itself. With ``stratify`` each class keeps its share."""
    if n is None:
        return dataset
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if n >= len(dataset):
        return dataset
    index = _stratified_pick(dataset, n, seed, stratify)
    return dataset.subset(index, name=f"{dataset.name}-take{n}")


def hide_labels(
    dataset: ArrayDataset, labelled: int, seed: int = 0, *, stratify: bool = True
) -> tuple[ArrayDataset, Tensor]:
    """The label-scarce version of `dataset`: the same inputs in the same order, with the labels
    of all but `labelled` samples replaced by `UNLABELLED`; and the (sorted) positions that keep
    their label.

    The kept samples are a seeded random draw, stratified by class by default (each class keeps
    its share, see ``_stratified_pick``). Stored teacher outputs computed on `dataset` still
    serve it (its inputs are unchanged). Losses that read labels must ignore −100 (`CE` does by
    default); any other refuses the batch (a label out of range) instead of training on it.
    """
    if dataset.partly_labelled:
        raise DataError(f"dataset {dataset.name!r} already has unlabelled samples")
    if isinstance(labelled, bool) or not isinstance(labelled, int) or labelled < 1:
        raise ValueError(f"labelled must be a positive integer, got {labelled!r}")
    if labelled > len(dataset):
        raise DataError(
            f"dataset {dataset.name!r}: cannot keep {labelled} labels of {len(dataset)} samples"
        )
    kept = _stratified_pick(dataset, labelled, seed, stratify)
    targets = torch.full_like(dataset.targets, UNLABELLED)
    targets[kept] = dataset.targets[kept]
    scarce = ArrayDataset(
        dataset.inputs,
        targets,
        list(dataset.classes),
        name=f"{dataset.name}-labelled{labelled}",
        partly_labelled=True,
    )
    return scarce, kept


def repeat_to(dataset: ArrayDataset, size: int, name: str | None = None) -> ArrayDataset:
    """`dataset` repeated (in order, the last copy cut short) to exactly `size` samples: a small
    labelled set trained for as many steps per epoch as a larger one."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.name!r} is empty")
    index = torch.arange(size) % len(dataset)
    return dataset.subset(index, name=name or f"{dataset.name}-x{size / len(dataset):.3g}")
