"""The teacher-output cache: offline distillation from memory-mapped teacher outputs.

A teacher does not change while a student trains, so its outputs (and tapped features) can be
computed once per training sample and read back by sample index. `build_teacher_cache` writes a
folder::

    manifest.json            written last, atomically; "complete": true marks a finished build
    output.npy               N×… outputs (a dict output: output.<key>.npy per key)
    output.topk_values.npy   with top-k storage instead: N×k largest logits,
    output.topk_indices.npy  N×k their class indices,
    output.topk_fill.npy     N   one logit shared by the K − k other classes
    feature.<layer>.npy      N×… each tapped teacher layer
    inputs.signature.npy     N×2 float64: each input sample's signature (see below)

and `TeacherCache.open` checks it against the teacher and the data before anything is read:
the teacher weights digest (`tensors_digest` of its state dict, buffers included), the dataset
fingerprint (`ArrayDataset.fingerprint()`), the storage dtype, top-k and the layer list. A stale
or mismatched cache raises `CacheError` naming every difference; a build that did not finish
(its manifest still says ``"complete": false``), a missing or truncated array file, or (with
``verify=True``) an array whose bytes changed is refused too.

Every lookup is checked against the data it is used with: `lookup(index, inputs)` needs the
batch's inputs, and each sample's signature — its dot product, in float64, with a fixed
pseudo-random vector r (splitmix64, values in [-1, 1), the same on every machine and version) —
must equal the one stored at build time to within 1e-6 · Σ|x_i·r_i|. Float64 rounding of the
same D inputs, summed in any order, stays below D · 2^-53 of that (< 1e-10 for D ≤ 10^6); any
other sample, order, subset or normalisation differs by far more. A mismatch raises
`CacheError`: the stored outputs belong to other inputs — the cache was built on the full set
and used with a `split_train_val` part, on data in another order, on another dataset of the
same size, or with other transforms. In-memory teacher outputs (`MemoryTeacherOutputs`) carry
the same signatures and the same check, so no stored teacher output reaches training for a
sample it was not computed on. Cost: one float64 dot product per sample — 0.1–0.3 ms a batch
of 128 Fashion-MNIST images on 2 CPU threads, 1–2.5 % of a cached step (`bench/bench_speed.py`
prints it).

Storage dtypes: float32 (exact), float16 and bfloat16 (numpy has no bfloat16: its 16-bit
patterns are stored as int16). `lookup` always returns float32 tensors. The rounding error of
each array against the float32 teacher outputs is measured during the build and recorded in the
manifest (`errors`).

Top-k storage (outputs of ≥ 2 dims, classes on dim 1), for wide outputs: per sample the k
largest logits z_(1..k), their indices, and one fill value

    m = log( Σ_{j ∉ top-k} exp(z_j) / (K − k) )

given to every other class. The rebuilt logits are z_j on the top-k and m elsewhere, so at
T = 1 the rebuilt softmax is exact on each top-k class and the K − k others share the true
remaining probability mass equally (renormalised: it sums to 1). m ≤ max_{j ∉ top-k} z_j, so
the ranking of the top-k is kept. At T ≠ 1 the tail is an approximation: the build records
mean_n KL(softmax(z/T) ‖ softmax(ẑ/T)) at T = 1 and T = 4 (`errors.output.mean_kl_T1/T4`).

Augmentation. A plain cache records ``"transforms": "none"``: one output per sample. A dataset
or loader flagged as randomly augmented (a truthy ``augment`` attribute: views drawn from a
stateful generator) cannot be cached exactly — the teacher would see other pixels than the
student — so `build_teacher_cache` refuses it, and `offline_teacher_outputs` falls back to
online distillation with a warning.

Keyed augmentation is cached exactly. A `BatchLoader` with ``augmentation=`` makes each view a
fixed function of (augment seed, epoch, sample index) (`kdistill.data.augment`), so
`build_view_cache(teacher, loader, directory, epochs=E)` runs the teacher once over E epochs of
the loader's batches and stores row ``e·N + i`` = the teacher's output on sample i's view in
epoch e, with that view's signature; the manifest's ``views`` records E, the augmentation and
its seed. `fit` tells the cache which epoch runs (`set_epoch`), and each lookup checks the batch
against the signatures of *that epoch's views*: a loader on another epoch, augmentation or seed
fails the check like other data. Built from the very batches training uses (the same loader),
a float32 view cache replays the online teacher bit for bit; views of a sample do not depend on
the batch, so another shuffling still gets the right views (to the last bit of a CPU kernel's
batch-dependent rounding). `MemoryTeacherOutputs.predict(teacher, loader, epochs=E)` keeps the
same rows in memory.

Token sequences (language models): `kdistill.cache.tokens` stores each position's top-k
next-token distribution (`TopKDistribution`) instead of N×L×V logits — `build_token_cache`,
`TokenTeacherCache` — with the same teacher / data checks and the same `TeacherSource` lookup.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.data import BatchLoader
from kdistill.data.arrays import batch_size_of, move_to
from kdistill.data.batches import call_model
from kdistill.distill.taps import Taps
from kdistill.errors import CacheError
from kdistill.io import atomic_write_text, tensors_digest

__all__ = [
    "CACHE_DTYPES",
    "CachedTeacher",
    "InputSignatures",
    "MemoryTeacherOutputs",
    "TeacherCache",
    "build_teacher_cache",
    "build_view_cache",
    "encode_topk",
    "input_signatures",
    "is_randomly_augmented",
    "loader_views",
    "offline_teacher_outputs",
    "TeacherSource",
    "TokenTeacherCache",
    "build_token_cache",
    "rebuild_topk_logits",
    "teacher_digest",
]

log = logging.getLogger("kdistill")

FORMAT_VERSION = 2  # 2: input signatures (format 1 caches cannot be checked against the data)
MANIFEST = "manifest.json"
SIGNATURE_FILE = "inputs.signature.npy"
SIGNATURE_METHOD = "float64 dot with splitmix64 uniform[-1,1) vector, v1"
SIGNATURE_RTOL = 1e-6  # of Σ|x_i·r_i|: identical inputs agree to < D·2^-53 of it
_SPLITMIX_SEED = 0x6B64697374696C6C  # "kdistill"
# storage dtype name → (numpy dtype on disk, torch dtype it holds)
CACHE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.int16), torch.bfloat16),  # bit patterns; viewed back on read
}
KL_TEMPERATURES = (1.0, 4.0)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


# -- small pure helpers ---------------------------------------------------------------------------
def teacher_digest(teacher: nn.Module) -> str:
    """SHA-256 over the teacher's state dict (parameters and buffers: names, dtypes, bytes)."""
    return tensors_digest(teacher.state_dict())


def is_randomly_augmented(*sources: Any) -> bool:
    """True when a loader or dataset (or a loader's dataset) says it applies random augmentation.

    The convention is a truthy ``augment`` attribute; kdistill's own data pipeline has none.
    """
    for source in sources:
        if source is None:
            continue
        if getattr(source, "augment", False):
            return True
        if getattr(getattr(source, "dataset", None), "augment", False):
            return True
    return False


def loader_views(loader: Any) -> dict | None:
    """The keyed augmentation of a loader — ``{"augmentation": {…}, "seed": s}`` from its
    ``view_spec()`` (kdistill's `BatchLoader` with ``augmentation=``) — or None."""
    spec = getattr(loader, "view_spec", None)
    return spec() if callable(spec) else None


def _view_key(views: Mapping | None) -> dict | None:
    """What decides the views (augmentation and seed), without the epoch count."""
    if views is None:
        return None
    return {"augmentation": views["augmentation"], "seed": views["seed"]}


class TeacherSource(Protocol):
    """Where `kd.fit` reads the teacher's outputs from — the one interface the engine consumes.

    `None` is the live teacher (the distiller runs it every step); a `MemoryTeacherOutputs`
    (outputs kept in RAM) or a `TeacherCache` (on disk) returns stored outputs. `layers`: the
    tapped teacher layers it holds; `lookup(index, inputs)` → ``(output, {layer: features} or
    None)`` for a batch, after checking that `inputs` are the samples the outputs were computed
    on (CacheError otherwise). A source may also have `set_epoch(epoch)`, which `fit` calls at
    the start of every epoch (stored views of augmented samples are per epoch).
    """

    @property
    def layers(self) -> list[str]: ...

    def lookup(self, index: Tensor, inputs: Any) -> tuple[Any, dict[str, Tensor] | None]: ...


def offline_teacher_outputs(
    source: TeacherSource | None,
    loader: Any,
    label: str = "training",
    layers: Iterable[str] = (),
) -> TeacherSource | None:
    """`source` (stored teacher outputs for `fit`), or None — the live teacher — when it cannot
    serve this training: the loader is randomly augmented, or the terms tap teacher `layers`
    that `source` does not hold.

    Stored outputs are only exact when the student sees the very inputs the teacher saw; with
    random augmentation they are not, so distillation falls back to running the teacher online.
    A loader with keyed augmentation (`loader_views`) is served by stored *views* of the same
    augmentation and seed (`build_view_cache`); stored outputs of the plain samples fall back to
    online with a warning, and views of another augmentation or seed — or views for a loader
    that does not augment — raise CacheError.
    """
    if source is not None and not set(layers) <= set(source.layers):
        return None  # e.g. logits kept in memory, but a term taps a teacher layer
    if source is None:
        return None
    if is_randomly_augmented(loader):
        log.warning(
            "%s: the loader applies random augmentation, so cached teacher outputs would not "
            "match the augmented inputs; distilling online (the teacher runs every step)",
            label,
        )
        return None
    wanted = _view_key(loader_views(loader))
    held = _view_key(getattr(source, "views", None))
    if wanted is not None and held is None:
        log.warning(
            "%s: the loader augments its batches (%s) but the stored teacher outputs are of the "
            "plain samples; distilling online (build the teacher's outputs of the views with "
            "build_view_cache or MemoryTeacherOutputs.predict(teacher, loader, epochs=…))",
            label,
            wanted,
        )
        return None
    if wanted != held:
        raise CacheError(
            f"{label}: the stored teacher outputs are views of {held}, but the training loader "
            + (f"makes views of {wanted}" if wanted is not None else "does not augment")
            + "; build them with the loader training uses (same augmentation and augment_seed)"
        )
    return source


def encode_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, indices, fill) of the top-k storage along dim 1 (see the module docstring).

    `fill` = logsumexp of the logits outside the top-k − log(K − k), one per sample (and per
    position for N×K×H×W outputs).
    """
    num_classes = logits.shape[1]
    if not 0 < k < num_classes:
        raise CacheError(
            f"topk must lie in [1, {num_classes - 1}] for an output with {num_classes} classes "
            f"on dim 1, got {k}; use dense storage (no topk) to keep every class"
        )
    values, indices = logits.topk(k, dim=1)
    tail = logits.scatter(1, indices, float("-inf"))
    fill = torch.logsumexp(tail.double(), dim=1) - math.log(num_classes - k)
    return values, indices, fill.to(logits.dtype)


def rebuild_topk_logits(values: Tensor, indices: Tensor, fill: Tensor, num_classes: int) -> Tensor:
    """Logits from top-k storage: `values` at `indices` along dim 1, `fill` everywhere else."""
    shape = list(values.shape)
    shape[1] = num_classes
    logits = fill.unsqueeze(1).expand(shape).clone()
    return logits.scatter_(1, indices.long(), values)


def _mean_kl_sum(reference: Tensor, approx: Tensor, temperature: float) -> tuple[float, float, int]:
    """(Σ KL, max KL, count) of KL(softmax(ref/T) ‖ softmax(approx/T)) over dim 1, in float64."""
    log_p = torch.log_softmax(reference.double() / temperature, dim=1)
    log_q = torch.log_softmax(approx.double() / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return float(kl.sum()), float(kl.max()), kl.numel()


def _to_storage(value: Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the numpy array that is written to disk for storage `dtype`."""
    np_dtype, torch_dtype = CACHE_DTYPES[dtype]
    stored = value.detach().to("cpu", torch_dtype).contiguous()
    if torch_dtype == torch.bfloat16:
        return stored.view(torch.int16).numpy()
    return stored.numpy()


def _from_storage(array: np.ndarray, dtype: str) -> Tensor:
    """The float32 tensor that a stored numpy array holds."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if CACHE_DTYPES[dtype][1] == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def teacher_and_data(teacher: nn.Module, dataset: Any) -> dict[str, dict]:
    """The manifest's record of what a store was built from: the teacher's class and weights
    digest, the dataset's name, fingerprint and size (checked again when the store is opened)."""
    return {
        "teacher": {"class": type(teacher).__name__, "sha256": teacher_digest(teacher)},
        "dataset": {
            "name": getattr(dataset, "name", type(dataset).__name__),
            "fingerprint": dataset.fingerprint(),
            "size": len(dataset),
        },
    }


def check_written_once(written: np.ndarray, unit: str, need: str) -> None:
    """CacheError unless every entry of `written` (how many times the build wrote each row) is
    1: a loader that skipped samples or gave some twice would leave stored outputs missing or
    overwritten. `unit` names the rows, `need` says what the build needs."""
    if bool((written == 1).all()):
        return
    missing, repeated = int((written == 0).sum()), int((written > 1).sum())
    raise CacheError(
        f"the batches gave {missing} of {len(written)} {unit} no teacher output and {repeated} "
        f"more than one; {need}"
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_name(name: str, what: str) -> str:
    if not _SAFE_NAME.match(name):
        raise CacheError(
            f"{what} {name!r} cannot name a cache file: use letters, digits, '_', '.', '-'"
        )
    return name


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
    """N×2 float64: per sample (x·r, Σ|x_i·r_i|) of the flattened sample x (see module doc).

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


class _EpochRows:
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
    largest logits of the output (see the module docstring); features are always dense.
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
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
        raise CacheError(
            f"{directory}: not empty and not a teacher cache; build into a new or empty folder "
            "(an existing cache is rebuilt in place)"
        )
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
    directory.mkdir(parents=True, exist_ok=True)
    # Mark the folder unfinished before any array is (re)written: a crash from here on leaves
    # "complete": false, never an old complete manifest next to half-new arrays.
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    for pattern in ("output*.npy", "feature.*.npy", "inputs.*.npy"):  # the previous build's
        for old in directory.glob(pattern):
            old.unlink()
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


# -- reading --------------------------------------------------------------------------------------
class CachedTeacher(nn.Module):
    """A weightless stand-in for a teacher whose outputs all come from a cache.

    Offline distillation needs no teacher in memory:
    ``Distiller(cache.stand_in(), student, terms)`` with ``fit(..., teacher_outputs=cache)``.
    It holds an empty placeholder module at each cached layer name, so terms that tap teacher
    layers resolve; running it raises CacheError. One limit: a connector (student and teacher
    channels differ) is sized by `Distiller.build` running the teacher on the first batch, so
    a term that needs one needs the real teacher.
    """

    def __init__(self, layers: Iterable[str] = ()):
        super().__init__()
        for layer in layers:
            parent: nn.Module = self
            for part in layer.split("."):
                child = parent._modules.get(part)
                if child is None:
                    child = nn.Module()
                    parent.add_module(part, child)
                parent = child

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise CacheError(
            "the teacher is a CachedTeacher stand-in and cannot run: something asked for "
            "teacher outputs the cache did not give (pass teacher_outputs=cache to fit; terms "
            "whose connector must be sized on a first batch need the real teacher)"
        )


def _short(digest: str) -> str:
    return digest[:12] + "…"


class TeacherCache(_EpochRows):
    """A finished, validated teacher cache; `lookup(index, inputs)` gives (output, {layer:
    features}) after checking that `inputs` are the samples the outputs were computed on.

    Open it with `TeacherCache.open`; it is a `TeacherSource`, so it
    is passed to `fit(..., teacher_outputs=cache)` as it is. A view cache
    (`build_view_cache`) holds `epochs` views per sample; `set_epoch` picks the epoch read.
    """

    def __init__(self, directory: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.manifest = manifest
        self._arrays = arrays
        self.size = int(manifest["dataset"]["size"])
        self.dtype = manifest["dtype"]
        self.views = manifest.get("views")
        self.epoch = 0
        self.source = f"teacher cache {directory}"
        self.signatures = InputSignatures(
            arrays[manifest["inputs"]["file"]],
            manifest["inputs"]["shape"],
            self.source,
        )

    # -- properties -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        views = f", epochs={self.epochs}" if self.views is not None else ""
        return (
            f"TeacherCache({str(self.directory)!r}, size={self.size}, dtype={self.dtype}, "
            f"topk={self.topk}, layers={self.layers}{views})"
        )

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def topk(self) -> int | None:
        return self.manifest["topk"]

    @property
    def errors(self) -> dict[str, dict]:
        """Storage error of each entry against the float32 teacher outputs (see module doc)."""
        return self.manifest.get("errors", {})

    def stand_in(self) -> CachedTeacher:
        """A weightless teacher for `Distiller` when every output comes from this cache."""
        return CachedTeacher(self.layers)

    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: str | Path,
        teacher: nn.Module | None = None,
        dataset: Any = None,
        dtype: str | None = None,
        layers: Iterable[str] | None = None,
        topk: int | None | str = "any",
        verify: bool = False,
        views: Mapping | None | str = "any",
    ) -> TeacherCache:
        """Open and validate a cache; every argument given is checked against the manifest.

        `teacher`: its weights digest must match; `dataset`: its fingerprint; `dtype`: the
        storage dtype; `layers`: each must be cached (a cache may hold more); `topk`: the k
        (None = dense; the default "any" accepts both); `views`: None for a plain cache, or
        ``{"epochs": E, "augmentation": …, "seed": s}`` for views of that augmentation and
        seed over at least E epochs (default "any"). `verify` re-hashes every array file.
        Raises CacheError listing every difference.
        """
        directory = Path(directory)
        where = str(directory)
        rebuild = "rebuild it (kdistill cache, or build_teacher_cache) or delete the folder"
        manifest_path = directory / MANIFEST
        if not directory.is_dir():
            raise CacheError(f"{where}: no teacher cache here (no such folder)")
        if not manifest_path.exists():
            raise CacheError(
                f"{where}: no {MANIFEST}; not a teacher cache, or its build never got going; "
                f"{rebuild}"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CacheError(f"{manifest_path}: unreadable manifest ({error}); {rebuild}") from None
        if isinstance(manifest, dict) and manifest.get("kind") == "token_topk":
            raise CacheError(
                f"{where}: holds stored top-k token distributions, not teacher outputs; open "
                "it with kdistill.cache.TokenTeacherCache.open"
            )
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            why = (
                " (format 1 caches hold no input signatures, so they cannot be checked against "
                "the data they are used with)"
                if found == 1
                else ""
            )
            raise CacheError(
                f"{manifest_path}: cache format {found!r}, this kdistill reads "
                f"{FORMAT_VERSION}{why}; {rebuild}"
            )
        if manifest.get("complete") is not True:
            raise CacheError(
                f"{where}: incomplete teacher cache — its build did not finish (interrupted or "
                f"failed), so its arrays are partly empty; {rebuild}"
            )
        problems = cls._differences(manifest, teacher, dataset, dtype, layers, topk, views)
        if problems:
            raise CacheError(
                f"{where}: the teacher cache does not match: "
                + "; ".join(problems)
                + f"; {rebuild}"
            )
        arrays = cls._open_arrays(directory, manifest, verify)
        return cls(directory, manifest, arrays)

    @staticmethod
    def _differences(manifest, teacher, dataset, dtype, layers, topk, views="any") -> list[str]:
        problems = []
        held = manifest.get("views")
        if views != "any" and _view_key(views) != _view_key(held):
            problems.append(
                f"views differ (cache: {_view_key(held) or 'plain samples, no views'}; asked "
                f"for {_view_key(views) or 'plain samples, no views'})"
            )
        elif views not in ("any", None) and held["epochs"] < views["epochs"]:
            problems.append(
                f"the cache holds views of {held['epochs']} epoch(s), {views['epochs']} asked for"
            )
        if teacher is not None:
            expected, actual = manifest["teacher"]["sha256"], teacher_digest(teacher)
            if expected != actual:
                problems.append(
                    f"teacher weights differ (cache built from {manifest['teacher']['class']} "
                    f"with weights sha256 {_short(expected)}, this "
                    f"{type(teacher).__name__} has {_short(actual)}) — a stale cache"
                )
        if dataset is not None:
            expected, actual = manifest["dataset"]["fingerprint"], dataset.fingerprint()
            if expected != actual:
                problems.append(
                    f"dataset differs (cache holds {manifest['dataset']['name']!r}, "
                    f"{manifest['dataset']['size']} samples, fingerprint {_short(expected)}; "
                    f"given {getattr(dataset, 'name', '?')!r}, {len(dataset)} samples, "
                    f"fingerprint {_short(actual)})"
                )
            if is_randomly_augmented(dataset):
                problems.append(
                    "the dataset applies random augmentation but the cache holds "
                    f"transforms: {manifest.get('transforms')!r}"
                )
        if dtype is not None and dtype != manifest["dtype"]:
            problems.append(f"dtype differs (cache stores {manifest['dtype']}, asked for {dtype})")
        if layers is not None:
            missing = [layer for layer in layers if layer not in manifest["layers"]]
            if missing:
                problems.append(
                    f"teacher layers {missing} are not cached (the cache holds "
                    f"{manifest['layers'] or 'no layers'})"
                )
        if topk != "any" and topk != manifest["topk"]:
            problems.append(
                f"top-k differs (cache: {manifest['topk'] or 'dense'}, asked for {topk or 'dense'})"
            )
        return problems

    @staticmethod
    def _open_arrays(directory: Path, manifest: dict, verify: bool) -> dict[str, np.ndarray]:
        """Every array file (outputs, features, input signatures) by file name, memory-mapped."""
        size = int(manifest["dataset"]["size"]) * int(manifest.get("views", {}).get("epochs", 1))
        files = [
            (file, spec["sha256"][file])
            for spec in manifest["entries"].values()
            for file in spec["files"]
        ]
        files.append((manifest["inputs"]["file"], manifest["inputs"]["sha256"]))
        arrays = {}
        for file, sha256 in files:
            path = directory / file
            if not path.exists():
                raise CacheError(f"{path}: missing array file of the teacher cache")
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:
                raise CacheError(f"{path}: truncated or corrupt array file ({error})") from None
            if array.shape[:1] != (size,):
                raise CacheError(
                    f"{path}: holds {array.shape[0] if array.ndim else 0} rows, the manifest "
                    f"says {size}"
                )
            if verify and _file_digest(path) != sha256:
                raise CacheError(
                    f"{path}: checksum mismatch (the file changed after the cache was built)"
                )
            arrays[file] = np.asarray(array)  # a plain view of the map: cheaper indexing
        return arrays

    # -- reading --------------------------------------------------------------------------------
    def _read(self, spec: dict, rows: np.ndarray) -> Tensor:
        if spec["storage"] == "dense":
            return _from_storage(self._arrays[spec["files"][0]][rows], self.dtype)
        values, indices, fill = (self._arrays[file][rows] for file in spec["files"])
        return rebuild_topk_logits(
            _from_storage(values, self.dtype),
            torch.from_numpy(np.ascontiguousarray(indices)),
            _from_storage(fill, self.dtype),
            spec["shape"][0],
        )

    def lookup(
        self, index: Tensor, inputs: Tensor | None = None
    ) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        """(output, {layer: features}) of the samples at dataset positions `index`, as float32.

        `inputs`: the batch's input samples (N×…, in `index` order). They are required: each
        must have the signature stored for its index, else CacheError says how many differ and
        why (see the module docstring); IndexError for an index outside [0, size).
        """
        rows, view = self._rows(index)
        self.signatures.check(rows, inputs, view)
        return self._read_rows(rows)

    def _read_rows(self, rows: np.ndarray) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        """The stored rows, unchecked (`lookup` checks the inputs first)."""
        outputs: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        for spec in self.manifest["entries"].values():
            value = self._read(spec, rows)
            if spec["kind"] == "feature":
                features[spec["key"]] = value
            else:
                outputs[spec["key"]] = value
        if self.manifest["output_kind"] == "tensor":
            return outputs[None] if None in outputs else outputs[next(iter(outputs))], features
        return outputs, features

    def outputs(self) -> Tensor | dict[str, Tensor]:
        """Every sample's output, in dataset order (for a view cache: E·N rows, epoch by epoch);
        to inspect them — training reads them through `lookup`, which checks the inputs."""
        return self._read_rows(np.arange(self.size * (self.epochs or 1)))[0]

    def describe(self) -> str:
        """A few lines for people: what is stored, how big, and the storage error."""
        lines = [
            f"teacher cache {self.directory}: {self.size} samples of "
            f"{self.manifest['dataset']['name']!r}, teacher {self.manifest['teacher']['class']} "
            f"({_short(self.manifest['teacher']['sha256'])}), {self.dtype}"
            + (f", top-{self.topk}" if self.topk else "")
            + f", {self.nbytes() / 2**20:.1f} MiB, built in {self.manifest['build_seconds']} s",
        ]
        if self.views is not None:
            lines.append(
                f"  views of {self.epochs} epoch(s): {self.views['augmentation']}, augment seed "
                f"{self.views['seed']}"
            )
        for name, spec in self.manifest["entries"].items():
            err = self.errors.get(name, {})
            rows = self.size * (self.epochs or 1)
            shape = "×".join(str(s) for s in [rows, *spec["shape"]])
            text = f"  {name}: {shape} {spec['storage']}"
            text += f", max |error| {err.get('max_abs_error', 0):.3g}"
            if "mean_kl_T1" in err:
                text += (
                    f", mean KL(full ‖ stored) {err['mean_kl_T1']:.3g} at T=1, "
                    f"{err['mean_kl_T4']:.3g} at T=4"
                )
            lines.append(text)
        return "\n".join(lines)


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


# stored top-k distributions of token sequences (imported last: it builds on the helpers above)
from kdistill.distill.teacher.store.tokens import TokenTeacherCache, build_token_cache  # noqa: E402
