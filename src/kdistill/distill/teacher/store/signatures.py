"""Which inputs stored teacher outputs belong to: each sample's input signature, checked at
every lookup (see `kdistill.distill.teacher.store` for the method and its tolerance)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from kdistill.data.arrays import batch_size_of
from kdistill.distill.teacher.base import StoredOutputs
from kdistill.errors import CacheError

SIGNATURE_FILE = "inputs.signature.npy"
SIGNATURE_METHOD = "float64 dot with splitmix64 uniform[-1,1) vector, v1"
SIGNATURE_RTOL = 1e-6  # of Σ|x_i·r_i|: identical inputs agree to < D·2^-53 of it
_SPLITMIX_SEED = 0x6B64697374696C6C  # "kdistill"


# -- which inputs stored outputs belong to ---------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _projection(width: int) -> np.ndarray:
    """The fixed vector r (length `width`, float64, values in [-1, 1)) of the input signatures.

    r_i = (splitmix64(seed + i) >> 11) · 2^-52 − 1: integer arithmetic, so the same on every
    machine and numpy version (a stored cache must stay checkable). Read-only.
    """
    mask = (1 << 64) - 1
    with np.errstate(over="ignore"):
        z = np.arange(width, dtype=np.uint64) + np.uint64(_SPLITMIX_SEED)
        z = z + np.uint64(0x9E3779B97F4A7C15 & mask)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    r = (z >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0
    r.flags.writeable = False
    return r


def _flat_samples(inputs: Tensor | Mapping[str, Tensor]) -> np.ndarray:
    """`inputs` (N×…) as an N×D numpy array of a dtype numpy can widen to float64; keyword
    inputs (a dict of N×… tensors: token ids, attention masks) are flattened per sample and
    concatenated in key order."""
    if (
        isinstance(inputs, Mapping)
        and inputs
        and all(isinstance(v, Tensor) for v in inputs.values())
    ):
        parts = [
            _flat_samples(inputs[key]).astype(np.float64, copy=False) for key in sorted(inputs)
        ]
        return np.concatenate(parts, axis=1)
    if not isinstance(inputs, Tensor):
        raise CacheError(
            f"input signatures need the batch's inputs as a tensor, got {type(inputs).__name__}"
        )
    flat = inputs.detach().reshape(len(inputs), -1) if inputs.dim() else inputs.reshape(1, 1)
    if flat.device.type != "cpu" or flat.dtype in (torch.bfloat16, torch.bool) or flat.is_complex():
        flat = flat.to("cpu", torch.float64)
    return flat.numpy()


def sample_shape_of(inputs: Tensor | Mapping[str, Tensor]) -> tuple[int, ...]:
    """One sample's shape as signatures see it: ``inputs.shape[1:]`` for a tensor, ``(D,)`` for
    keyword inputs (D = the width of one sample's tensors flattened and concatenated)."""
    if isinstance(inputs, Mapping):
        return (int(_flat_samples(inputs).shape[1]),)
    return tuple(inputs.shape[1:])


def _signature_dots(inputs: Tensor) -> np.ndarray:
    """x·r per sample, float64 (N): the part of the signature computed at every lookup."""
    flat = _flat_samples(inputs)
    return flat.astype(np.float64, copy=False) @ _projection(flat.shape[1])


def input_signatures(inputs: Tensor) -> np.ndarray:
    """N×2 float64: per sample (x·r, Σ|x_i·r_i|) of the flattened sample x (see the package doc).

    The second column scales the tolerance of the check: float64 rounding of the same D values,
    summed in any order, stays below D · 2^-53 of it.
    """
    flat = _flat_samples(inputs).astype(np.float64, copy=False)
    r = _projection(flat.shape[1])
    return np.stack([flat @ r, np.abs(flat) @ np.abs(r)], axis=1)


_OTHER_DATA = (
    "the stored teacher outputs belong to other inputs: built on other data — a subset "
    "or re-split of it (e.g. split_train_val), the data in another order, another "
    "dataset of the same size — or with other transforms/normalisation; rebuild them on "
    "the data you train on (`kdistill cache`, build_teacher_cache(teacher, train_data, "
    "…) or MemoryTeacherOutputs.predict), or train on the data they were built on"
)


_OTHER_VIEWS = (
    "the stored teacher outputs are views (augmented samples) of other inputs: the loader is on "
    "another epoch than the stored views (fit keeps both in step through set_epoch), or it "
    "makes views with another augmentation or augment_seed, or the data differ (a subset, "
    "another order, other normalisation); build the views with the loader training uses "
    "(build_view_cache(teacher, loader, …, epochs=…))"
)


class _EpochRows(StoredOutputs):
    """Rows of stored teacher outputs by epoch, shared by the in-memory and on-disk sources.

    `views` is None (one row per sample, read whatever the epoch) or a dict ``{"epochs": E,
    "augmentation": {…}, "seed": s, …}``: row ``e·size + i`` holds sample i's view in epoch e.
    `set_epoch(e)` (called by `fit` every epoch) chooses the epoch lookups read.
    """

    views: dict | None = None
    size: int = 0
    epoch: int = 0
    source: str = "stored teacher outputs"

    @property
    def epochs(self) -> int | None:
        """Epochs of views held (None: no views — the same outputs every epoch)."""
        return None if self.views is None else int(self.views["epochs"])

    def set_epoch(self, epoch: int) -> None:
        """Read the views of `epoch` (0-based) from now on; CacheError beyond the stored ones."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if self.views is not None and epoch >= self.epochs:
            raise CacheError(
                f"{self.source}: holds the teacher's outputs on the views of {self.epochs} "
                f"epoch(s), but training reached epoch {epoch + 1}; build them for at least "
                f"{epoch + 1} epochs (epochs= of build_view_cache / predict)"
            )
        self.epoch = epoch

    def _rows(self, index: Tensor) -> tuple[np.ndarray, tuple[int, int] | None]:
        """(stored rows of the samples at `index` in the current epoch, (epoch, size) or None)."""
        rows = _as_rows(index, self.size, self.source)
        if self.views is None:
            return rows, None
        return rows + self.epoch * self.size, (self.epoch, self.size)


class InputSignatures:
    """The signatures of the input samples stored teacher outputs were computed on, by dataset
    index; `check(index, inputs)` raises CacheError when a batch's samples are not those inputs.

    `values`: N×2 float64 from `input_signatures`; `sample_shape`: one sample's shape;
    `source`: how messages name the stored outputs (e.g. "teacher cache runs/x/teacher_cache").
    """

    def __init__(self, values: np.ndarray, sample_shape: Sequence[int], source: str):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != 2:
            raise CacheError(f"{source}: input signatures must be N×2, got {values.shape}")
        self.values = values
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.source = source
        self._dots = np.ascontiguousarray(values[:, 0])  # what each sample's x·r must be …
        self._tolerance = SIGNATURE_RTOL * values[:, 1]  # … to within this

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def of_inputs(cls, inputs: Tensor, source: str, chunk: int = 4096) -> InputSignatures:
        """Signatures of every sample of `inputs` (N×…), in chunks of `chunk` samples."""
        parts = [input_signatures(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)]
        values = np.concatenate(parts) if parts else np.zeros((0, 2))
        return cls(values, tuple(inputs.shape[1:]), source)

    def check(
        self, rows: np.ndarray, inputs: Tensor | None, view: tuple[int, int] | None = None
    ) -> None:
        """Raise CacheError unless `inputs[j]` is the sample stored at row `rows[j]`: a dataset
        index, or for stored views ``epoch·size + index`` with `view` = (epoch, size)."""
        fix = _OTHER_DATA if view is None else _OTHER_VIEWS
        if inputs is None:
            raise CacheError(
                f"{self.source}: a lookup needs the batch's inputs, lookup(index, inputs), so "
                "that the stored teacher outputs are checked against the samples they are used "
                "for (fit passes them)"
            )
        if not isinstance(inputs, Tensor | Mapping):
            raise CacheError(
                f"{self.source}: lookup(index, inputs) needs the inputs as a tensor or a dict of "
                f"tensors, got {type(inputs).__name__}"
            )
        shape = sample_shape_of(inputs)
        size = batch_size_of(inputs)
        if size != len(rows) or shape != self.sample_shape:
            raise CacheError(
                f"{self.source}: the batch holds {size} samples of shape {shape} for "
                f"{len(rows)} indices, but the stored outputs were computed on samples of shape "
                f"{self.sample_shape}; {fix}"
            )
        dots = _signature_dots(inputs)
        stored = self._dots.take(rows)
        bad = ~(np.abs(dots - stored) <= self._tolerance.take(rows))
        if bad.any():
            first = int(np.argmax(bad))
            where = f"dataset index {int(rows[first])}"
            if view is not None:
                epoch, size = view
                where = f"the view of dataset index {int(rows[first]) - epoch * size} in epoch "
                where += str(epoch + 1)
            raise CacheError(
                f"{self.source}: {int(bad.sum())} of {len(rows)} samples of this batch are not "
                f"the inputs the teacher outputs were computed on (first: {where}, signature "
                f"{dots[first]:.9g}, stored {stored[first]:.9g}); {fix}"
            )


def _as_rows(index: Tensor, size: int, source: str) -> np.ndarray:
    """Dataset positions as int64 numpy rows, checked against [0, size)."""
    rows = torch.as_tensor(index).detach().cpu().reshape(-1).numpy().astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= size):
        raise IndexError(
            f"{source}: sample indices must lie in [0, {size}), got values in "
            f"[{rows.min()}, {rows.max()}]"
        )
    return rows
