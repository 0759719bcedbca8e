"""The image-output store, build side: `build_teacher_cache` (one pass of the teacher over a
dataset) and `build_view_cache` (over E epochs of a loader's keyed views), written atomically
(see `kdistill.distill.teacher.store` for the folder's files)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.data import BatchLoader
from kdistill.data.arrays import move_to
from kdistill.data.batches import call_model
from kdistill.distill.taps import Taps
from kdistill.distill.teacher.store.images import (
    FORMAT_VERSION,
    TeacherCache,
    encode_topk,
    rebuild_topk_logits,
)
from kdistill.distill.teacher.store.manifest import (
    CACHE_DTYPES,
    MANIFEST,
    _check_name,
    _file_digest,
    _from_storage,
    _to_storage,
    begin_build,
    check_build_folder,
    check_written_once,
    is_randomly_augmented,
    loader_views,
    teacher_and_data,
)
from kdistill.distill.teacher.store.signatures import (
    SIGNATURE_FILE,
    SIGNATURE_METHOD,
    SIGNATURE_RTOL,
    input_signatures,
    sample_shape_of,
)
from kdistill.errors import CacheError
from kdistill.io import atomic_write_text

KL_TEMPERATURES = (1.0, 4.0)


def _mean_kl_sum(reference: Tensor, approx: Tensor, temperature: float) -> tuple[float, float, int]:
    """(Σ KL, max KL, count) of KL(softmax(ref/T) ‖ softmax(approx/T)) over dim 1, in float64."""
    log_p = torch.log_softmax(reference.double() / temperature, dim=1)
    log_q = torch.log_softmax(approx.double() / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return float(kl.sum()), float(kl.max()), kl.numel()


# -- the entries of a cache -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One logical tensor of the cache: the output, one key of a dict output, or a layer."""

    kind: str  # "output" or "feature"
    key: str | None  # dict-output key, or layer name; None for a tensor output

    @property
    def name(self) -> str:
        if self.kind == "output":
            return "output" if self.key is None else f"output.{self.key}"
        return f"feature.{self.key}"


class _Writer:
    """Creates the memory-mapped arrays on the first batch and fills them batch by batch."""

    def __init__(self, directory: Path, size: int, dtype: str, topk: int | None):
        self.directory = directory
        self.size = size
        self.dtype = dtype
        self.topk = topk
        self.arrays: dict[str, np.ndarray] = {}
        self.specs: dict[str, dict] = {}  # entry name → how it is stored
        self.err: dict[str, dict] = {}  # entry name → running error sums
        self.rows: dict[str, int] = {}  # entry name → rows written

    def _open(self, name: str, shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
        path = self.directory / f"{name}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
        self.arrays[name] = array
        return array

    def _declare(self, entry: _Entry, value: Tensor) -> None:
        sample_shape = tuple(value.shape[1:])
        np_dtype = CACHE_DTYPES[self.dtype][0]
        if entry.kind == "output" and self.topk is not None:
            if value.dim() < 2:
                raise CacheError(
                    f"topk storage needs an output with classes on dim 1; teacher {entry.name} "
                    f"has shape {tuple(value.shape)}"
                )
            num_classes = value.shape[1]
            k = self.topk
            if not 0 < k < num_classes:
                raise CacheError(
                    f"topk must lie in [1, {num_classes - 1}] for teacher {entry.name} with "
                    f"{num_classes} classes on dim 1, got {k}; leave topk unset to keep them all"
                )
            index_dtype = np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)
            k_shape = (self.size, k, *sample_shape[1:])
            self._open(f"{entry.name}.topk_values", k_shape, np_dtype)
            self._open(f"{entry.name}.topk_indices", k_shape, index_dtype)
            self._open(f"{entry.name}.topk_fill", (self.size, *sample_shape[1:]), np_dtype)
            self.specs[entry.name] = {
                "kind": entry.kind,
                "key": entry.key,
                "storage": "topk",
                "k": k,
                "shape": list(sample_shape),
                "files": [
                    f"{entry.name}.topk_{part}.npy" for part in ("values", "indices", "fill")
                ],
            }
        else:
            self._open(entry.name, (self.size, *sample_shape), np_dtype)
            self.specs[entry.name] = {
                "kind": entry.kind,
                "key": entry.key,
                "storage": "dense",
                "shape": list(sample_shape),
                "files": [f"{entry.name}.npy"],
            }
        self.err[entry.name] = {"max_abs": 0.0, "sq_err": 0.0, "sq_ref": 0.0}
        if entry.kind == "output" and value.dim() >= 2 and value.shape[1] > 1:
            for t in KL_TEMPERATURES:
                self.err[entry.name][f"kl_sum_T{t:g}"] = 0.0
                self.err[entry.name][f"kl_max_T{t:g}"] = 0.0
            self.err[entry.name]["kl_count"] = 0

    def write(self, entry: _Entry, rows: np.ndarray, value: Tensor) -> None:
        """Store `value` (one row per entry of `rows`) at those rows of the entry's arrays."""
        value = value.detach().float().cpu()
        start = int(rows[0]) if len(rows) else 0
        if entry.name not in self.specs:
            self._declare(entry, value)
        spec = self.specs[entry.name]
        if list(value.shape[1:]) != spec["shape"]:
            raise CacheError(
                f"teacher {entry.name} changed shape between batches: {spec['shape']} per sample "
                f"at first, {list(value.shape[1:])} at sample {start}"
            )
        self.rows[entry.name] = self.rows.get(entry.name, 0) + len(value)
        if spec["storage"] == "topk":
            values, indices, fill = encode_topk(value, spec["k"])
            index_dtype = self.arrays[f"{entry.name}.topk_indices"].dtype
            stored = {
                "values": _to_storage(values, self.dtype),
                "indices": indices.numpy().astype(index_dtype),
                "fill": _to_storage(fill, self.dtype),
            }
            for part, array in stored.items():
                self.arrays[f"{entry.name}.topk_{part}"][rows] = array
            rebuilt = rebuild_topk_logits(
                _from_storage(stored["values"], self.dtype),
                torch.from_numpy(stored["indices"]),
                _from_storage(stored["fill"], self.dtype),
                value.shape[1],
            )
            self._check_finite(entry, values, start)
            self._check_finite(entry, fill, start)
        else:
            stored_array = _to_storage(value, self.dtype)
            self.arrays[entry.name][rows] = stored_array
            if self.dtype == "float32":  # stored exactly: nothing to measure (errors stay 0)
                self._check_finite(entry, value, start)
                return
            rebuilt = _from_storage(stored_array, self.dtype)
            self._check_finite(entry, rebuilt, start, value)
        self._measure(entry, value, rebuilt)

    def _check_finite(self, entry: _Entry, stored: Tensor, start: int, raw=None) -> None:
        if bool(torch.isfinite(stored.to(CACHE_DTYPES[self.dtype][1])).all()):
            return
        source = raw if raw is not None else stored
        finite = bool(torch.isfinite(source).all())
        detail = (
            f"values up to {float(source.abs().max()):.4g} overflow {self.dtype}; "
            "store float32 or bfloat16"
            if finite
            else "the teacher produced NaN/inf"
        )
        raise CacheError(f"teacher {entry.name}, samples from {start}: {detail}")

    def _measure(self, entry: _Entry, reference: Tensor, rebuilt: Tensor) -> None:
        err = self.err[entry.name]
        diff = (reference - rebuilt).double()
        err["max_abs"] = max(err["max_abs"], float(diff.abs().max()) if diff.numel() else 0.0)
        err["sq_err"] += float((diff * diff).sum())
        err["sq_ref"] += float((reference.double() ** 2).sum())
        if "kl_count" in err:
            for t in KL_TEMPERATURES:
                total, worst, count = _mean_kl_sum(reference, rebuilt, t)
                err[f"kl_sum_T{t:g}"] += total
                err[f"kl_max_T{t:g}"] = max(err[f"kl_max_T{t:g}"], worst)
            err["kl_count"] += count

    def finish(self) -> tuple[dict, dict]:
        """Flush the arrays; (entries spec with file digests, error summary)."""
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        short = {name: rows for name, rows in self.rows.items() if rows != self.size}
        if short:
            raise CacheError(
                f"teacher outputs {sorted(short)} were given for {sorted(set(short.values()))} "
                f"of {self.size} samples: every batch must return the same entries"
            )
        errors = {}
        for name, err in self.err.items():
            summary = {
                "max_abs_error": err["max_abs"],
                "relative_rms_error": math.sqrt(err["sq_err"] / err["sq_ref"])
                if err["sq_ref"] > 0
                else 0.0,
            }
            if err.get("kl_count"):
                for t in KL_TEMPERATURES:
                    summary[f"mean_kl_T{t:g}"] = err[f"kl_sum_T{t:g}"] / err["kl_count"]
                    summary[f"max_kl_T{t:g}"] = err[f"kl_max_T{t:g}"]
            errors[name] = summary
        for spec in self.specs.values():
            spec["sha256"] = {file: _file_digest(self.directory / file) for file in spec["files"]}
        return self.specs, errors


def _entries_of(output: Any, features: Mapping[str, Tensor]) -> list[tuple[_Entry, Tensor]]:
    if isinstance(output, Tensor):
        items = [(_Entry("output", None), output)]
    elif isinstance(output, Mapping):
        items = []
        for key, value in output.items():
            if not isinstance(value, Tensor):
                raise CacheError(
                    f"teacher output key {key!r} is {type(value).__name__}, not a tensor"
                )
            items.append((_Entry("output", _check_name(str(key), "output key")), value))
    else:
        raise CacheError(
            f"the teacher returned {type(output).__name__}; a cache stores a tensor or a dict "
            "of tensors"
        )
    items += [(_Entry("feature", name), value) for name, value in features.items()]
    return items


# -- building -------------------------------------------------------------------------------------
def build_teacher_cache(
    teacher: nn.Module,
    dataset: Any,
    directory: str | Path,
    layers: Sequence[str] = (),
    dtype: str = "float32",
    topk: int | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> TeacherCache:
    """Run `teacher` (eval mode, inference mode) once over `dataset` in index order and store its
    outputs and the outputs of `layers` in `directory`; returns the opened cache.

    `dataset` needs ``__len__``, ``get_batch(indices)`` and ``fingerprint()``
    (e.g. `ArrayDataset`). `dtype`: float32, float16 or bfloat16. `topk`: keep only the k
    largest logits of the output (see `kdistill.distill.teacher.store`); features are always dense.
    A crash part-way leaves a manifest with ``"complete": false``, which `open` refuses.
    """
    directory = Path(directory)
    layers = _check_build_settings(dtype, topk, layers, directory)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CacheError(f"batch_size must be a positive integer, got {batch_size!r}")
    if is_randomly_augmented(dataset):
        raise CacheError(
            f"dataset {getattr(dataset, 'name', '?')!r} applies random augmentation "
            "(augment is set): one stored teacher output per sample would not match what the "
            "student sees; distil online instead"
        )
    if not callable(getattr(dataset, "fingerprint", None)):
        raise CacheError(
            f"{type(dataset).__name__} has no fingerprint(); a cache must know which data it "
            "holds (use kdistill.data.ArrayDataset)"
        )
    loader = BatchLoader(dataset, batch_size=batch_size, shuffle=False)
    batches = ((batch.index.numpy(), batch.inputs) for batch in loader)
    return _build_with_taps(
        teacher, dataset, directory, layers, dtype, topk, batches, len(loader), {}, progress
    )


def _check_build_settings(dtype, topk, layers, directory: Path) -> list[str]:
    """The arguments every build shares, checked; the layer list without repeats."""
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise CacheError(f"topk must be a positive integer or None, got {topk!r}")
    layers = list(dict.fromkeys(layers))
    for layer in layers:
        _check_name(layer, "layer")
    check_build_folder(directory)
    return layers


def build_view_cache(
    teacher: nn.Module,
    loader: Any,
    directory: str | Path,
    epochs: int,
    layers: Sequence[str] = (),
    dtype: str = "float32",
    topk: int | None = None,
    progress: bool = False,
) -> TeacherCache:
    """Run `teacher` (eval mode, inference mode) over `epochs` epochs of `loader`'s augmented
    batches — the loader's own order, batch composition and views — and store its outputs on
    every view (row ``e·N + i``: sample i's view in epoch e) with their input signatures.

    `loader`: kdistill's `BatchLoader` with ``augmentation=`` (views keyed by augment seed, epoch
    and sample index, `kdistill.data.augment`), unsharded and without ``drop_last``, over a
    dataset with ``fingerprint()``; every sample must come exactly once per epoch. Training with
    the same loader then reads, through `fit`, exactly what the online teacher computes (bit
    for bit in float32; `set_epoch` picks the epoch's views). The loader's epoch is restored.
    `dtype`, `topk`, `layers`: as in `build_teacher_cache`. Storage: E × N rows.
    """
    directory = Path(directory)
    layers = _check_build_settings(dtype, topk, layers, directory)
    spec = loader_views(loader)
    if spec is None:
        raise CacheError(
            f"build_view_cache needs a loader with keyed augmentation (kdistill's BatchLoader "
            f"with augmentation=…); {type(loader).__name__} makes no views — use "
            "build_teacher_cache for plain samples"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise CacheError(f"epochs must be a positive integer, got {epochs!r}")
    if getattr(loader, "world_size", 1) != 1 or getattr(loader, "drop_last", False):
        raise CacheError(
            "build_view_cache needs every sample once per epoch: build it from an unsharded "
            "loader without drop_last (training may still shard: views do not depend on it)"
        )
    dataset = loader.dataset
    if not callable(getattr(dataset, "fingerprint", None)):
        raise CacheError(
            f"{type(dataset).__name__} has no fingerprint(); a cache must know which data it "
            "holds (use kdistill.data.ArrayDataset)"
        )
    size = len(dataset)
    views = {
        "epochs": epochs,
        **spec,
        "order": {
            "batch_size": loader.batch_size,
            "shuffle": bool(getattr(loader, "shuffle", False)),
            "seed": getattr(loader, "seed", None),
        },
    }

    def batches():
        was = loader.epoch
        try:
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                for batch in loader:
                    yield batch.index.numpy() + epoch * size, batch.inputs
        finally:
            loader.set_epoch(was)

    return _build_with_taps(
        teacher,
        dataset,
        directory,
        layers,
        dtype,
        topk,
        batches(),
        epochs * len(loader),
        {"views": views, "transforms": "keyed views (see views)"},
        progress,
    )


def _build_with_taps(
    teacher, dataset, directory, layers, dtype, topk, batches, count, extra, progress
):
    taps = Taps(teacher, layers, "teacher") if layers else None  # unknown names fail here
    try:
        return _build(
            teacher, dataset, directory, taps, layers, dtype, topk, batches, count, extra, progress
        )
    finally:
        if taps is not None:
            taps.close()


def _build(teacher, dataset, directory, taps, layers, dtype, topk, batches, count, extra, progress):
    """The build itself, arguments checked; `taps` (on the teacher) is closed by the caller.

    `batches` yields (rows, inputs): the rows the teacher's outputs on `inputs` go to (dataset
    positions; for views ``epoch·N + index``); `count`: how many batches (for the progress bar);
    `extra`: manifest fields (views). Every row must be written exactly once.
    """
    started = time.perf_counter()
    size = len(dataset)
    epochs = extra["views"]["epochs"] if "views" in extra else 1
    total = size * epochs
    manifest = {
        "format": FORMAT_VERSION,
        "complete": False,
        **teacher_and_data(teacher, dataset),
        "transforms": "none",
        "dtype": dtype,
        "topk": topk,
        "layers": layers,
        **extra,
    }
    begin_build(directory, manifest, ("output*.npy", "feature.*.npy", "inputs.*.npy"))
    writer = _Writer(directory, total, dtype, topk)
    signatures = np.zeros((total, 2))
    written = np.zeros(total, dtype=np.int64)
    sample_shape = None
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    was_training = teacher.training
    teacher.eval()
    output_kind = None
    batch_size = 0
    try:
        bar = tqdm(batches, total=count, desc="teacher cache", disable=not progress, leave=False)
        for rows, inputs in bar:
            if taps is not None:
                taps.clear()
            with torch.inference_mode():
                output = call_model(teacher, move_to(inputs, device))
                features = taps.collect() if taps is not None else {}
            output_kind = "dict" if isinstance(output, Mapping) else "tensor"
            signatures[rows] = input_signatures(inputs)
            np.add.at(written, rows, 1)
            sample_shape = list(sample_shape_of(inputs))
            batch_size = max(batch_size, len(rows))
            for entry, value in _entries_of(output, features):
                if len(value) != len(rows):
                    raise CacheError(
                        f"teacher {entry.name} has {len(value)} rows for a batch of "
                        f"{len(rows)} samples; a cache needs one row per sample"
                    )
                writer.write(entry, rows, value)
    finally:
        teacher.train(was_training)
    check_written_once(
        written,
        "rows",
        "a cache needs every sample exactly once per epoch (an unsharded loader without drop_last)",
    )
    entries, errors = writer.finish()
    np.save(directory / SIGNATURE_FILE, signatures)
    manifest.update(
        complete=True,
        batch_size=batch_size,
        inputs={
            "shape": sample_shape,
            "signature": SIGNATURE_METHOD,
            "rtol": SIGNATURE_RTOL,
            "file": SIGNATURE_FILE,
            "sha256": _file_digest(directory / SIGNATURE_FILE),
        },
        output_kind=output_kind,
        entries=entries,
        errors=errors,
        build_seconds=round(time.perf_counter() - started, 3),
    )
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    return TeacherCache.open(directory)
