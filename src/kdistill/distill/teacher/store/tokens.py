"""Stored top-k teacher distributions for token sequences: offline distillation of language
models without the teacher in memory.

A causal LM's logits (``N×L×V`` per batch) are far too big to keep for a training set (8,616
KJV blocks × 128 positions × 2,048 tokens × 4 bytes = 9 GB). What the token divergences need is
the teacher's next-token distribution, and nearly all its mass sits on a few tokens, so
`build_token_cache` runs the teacher once (eval mode, inference mode) over the data and keeps,
per position, its k most likely tokens, their log-probabilities at a temperature T and the
log-mass of the rest (`kdistill.losses.topk.TopKDistribution`). A folder::

    manifest.json          written last, atomically; "complete": true marks a finished build
    topk.ids.npy           N×L×k token ids (uint16 for V ≤ 65,536, else int32 / int64)
    topk.log_probs.npy     N×L×k log p at T (float16, bfloat16 or float32)
    topk.rest.npy          N×L   log Σ_{other tokens} p (−inf when k = V)
    inputs.signature.npy   N×2 float64: each sample's input signature (`kdistill.cache`)

Bytes per token: k·(id bytes + value bytes) + value bytes (k = 32, uint16 ids, float16: 130 B,
against 2·V = 4,096 B for float16 logits at V = 2,048).

`TokenTeacherCache.open` checks the folder against what it is used with before anything is
read: the teacher's weights digest, the dataset fingerprint, k, the temperature and the storage
dtype; every difference is named in one `CacheError` (a stale teacher, other data, another k or
T). An interrupted build (``"complete": false``) and a missing or truncated array are refused.
Training reads the distributions by sample index, memory-mapped (`lookup(index, inputs)`, the
`TeacherSource` protocol of `kd.fit`), after the batch's inputs are checked against the stored
signatures exactly as for stored image outputs: a subset, another order or other data is a
CacheError, never a silently wrong teacher. The teacher need not be loaded at all
(`stand_in()`).

**Quality.** The build measures, on the counted positions of a seeded random sample of blocks
(`measure_positions`), from the teacher's float32 logits in float64: the mean and max of
KL(full ‖ stored) and KL(stored ‖ full) — "stored" being the stored distribution (its rounded
values, renormalised) with the rest mass spread evenly over the V − k other tokens — and the
mean and max rest mass. KL(full ‖ stored) is the forward-KL loss's gap for a student whose tail
is flat; the bucketed divergences the loss computes are ≤ the full ones (`kdistill.losses.topk`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.data import BatchLoader
from kdistill.data.arrays import move_to
from kdistill.data.batches import as_batch, call_model
from kdistill.distill.teacher.store import (
    CACHE_DTYPES,
    MANIFEST,
    SIGNATURE_METHOD,
    SIGNATURE_RTOL,
    CachedTeacher,
    InputSignatures,
    _EpochRows,
    _file_digest,
    _from_storage,
    _short,
    _to_storage,
    check_written_once,
    input_signatures,
    sample_shape_of,
    teacher_and_data,
    teacher_digest,
)
from kdistill.errors import CacheError
from kdistill.io import atomic_write_text
from kdistill.losses.topk import TopKDistribution, topk_distribution

__all__ = ["TOKEN_CACHE_KIND", "TokenTeacherCache", "build_token_cache", "id_dtype"]

TOKEN_CACHE_KIND = "token_topk"
TOKEN_FORMAT_VERSION = 1
FILES = {"ids": "topk.ids.npy", "log_probs": "topk.log_probs.npy", "rest": "topk.rest.npy"}
SIGNATURE_FILE = "inputs.signature.npy"
IGNORE_INDEX = -100


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype that holds every token id of a V-token vocabulary."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size < 1 << 31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def bytes_per_token(k: int, vocab_size: int, dtype: str) -> int:
    """Bytes stored per position: k ids, k log-probabilities and one rest log-mass."""
    value = CACHE_DTYPES[dtype][0].itemsize
    return k * (id_dtype(vocab_size).itemsize + value) + value


def _logits(output: Any, key: str | None) -> Tensor:
    """The ``N×L×V`` logits of a teacher output: a tensor, or `key` of a mapping (a Hugging Face
    ``CausalLMOutput``)."""
    if isinstance(output, Tensor):
        value = output
    elif isinstance(output, Mapping):
        if key is None or key not in output:
            raise CacheError(
                f"the teacher returns a {type(output).__name__} with keys {list(output)}; say "
                f"which holds the logits (output=…), got {key!r}"
            )
        value = output[key]
    else:
        raise CacheError(
            f"the teacher returns {type(output).__name__}; stored token distributions need "
            "N×L×V logits (a tensor or a mapping with a 'logits' key)"
        )
    if not isinstance(value, Tensor) or value.dim() != 3 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise CacheError(f"the teacher's logits must be a float N×L×V tensor, got {shape}")
    return value


def _counted_positions(labels: Tensor | None, attention_mask: Tensor | None, shape) -> Tensor:
    """bool N×L: the positions a shifted token loss scores (labels[:, i+1] ≠ −100), or every
    real position when the batch has no labels."""
    if isinstance(labels, Tensor) and tuple(labels.shape) == tuple(shape):
        nxt = torch.full_like(labels, IGNORE_INDEX)
        nxt[:, :-1] = labels[:, 1:]
        return nxt != IGNORE_INDEX
    if isinstance(attention_mask, Tensor) and tuple(attention_mask.shape) == tuple(shape):
        return attention_mask != 0
    return torch.ones(shape, dtype=torch.bool)


def _stored_log_q(dist: TopKDistribution) -> Tensor:
    """``M×V`` float64 log q of a stored distribution: its buckets renormalised (as the token
    divergences read them), the rest spread evenly over the V − k other tokens."""
    buckets = dist.buckets(torch.float64)
    buckets = F.log_softmax(buckets, dim=-1)
    top, rest = buckets[:, :-1], buckets[:, -1]
    others = dist.vocab_size - dist.k
    fill = rest - math.log(others) if others else torch.full_like(rest, -math.inf)
    log_q = fill[:, None].expand(len(rest), dist.vocab_size).clone()
    return log_q.scatter_(-1, dist.ids.long(), top)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row from float64 log-probabilities, p = 0 entries counting 0."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


class _Quality:
    """Running sums of the storage error on the sampled positions (see the module doc)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums = {"kl_full_stored": 0.0, "kl_stored_full": 0.0, "rest_mass": 0.0}
        self.maxes = dict.fromkeys(self.sums, 0.0)

    def add(self, logits: Tensor, stored: TopKDistribution) -> None:
        """`logits`: M×V teacher logits; `stored`: their M stored distributions (as read)."""
        if not len(logits):
            return
        log_p = F.log_softmax(logits.double() / stored.temperature, dim=-1)
        log_q = _stored_log_q(stored)
        values = {
            "kl_full_stored": _kl_rows(log_p, log_q),
            "kl_stored_full": _kl_rows(log_q, log_p),
            "rest_mass": stored.rest_log_mass.double().exp(),
        }
        for name, value in values.items():
            self.sums[name] += float(value.sum())
            self.maxes[name] = max(self.maxes[name], float(value.max()))
        self.count += len(logits)

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"positions": self.count}
        for name in self.sums:
            out[f"mean_{name}"] = self.sums[name] / self.count if self.count else math.nan
            out[f"max_{name}"] = self.maxes[name] if self.count else math.nan
        return out


def _batches(data: Any, batch_size: int):
    """(dataset, iterator of Batch, number of batches) for a dataset with ``get_batch`` (read in
    index order with kdistill's BatchLoader) or a loader whose batches carry an index."""
    if callable(getattr(data, "get_batch", None)):
        loader = BatchLoader(data, batch_size=batch_size, shuffle=False)
        return data, iter(loader), len(loader)
    dataset = getattr(data, "dataset", None)
    if dataset is None:
        raise CacheError(
            f"build_token_cache needs a dataset with get_batch (e.g. TokenBlocks) or a loader "
            f"with a .dataset; got {type(data).__name__}"
        )
    count = len(data) if hasattr(data, "__len__") else None
    return dataset, (as_batch(item) for item in data), count


def build_token_cache(
    teacher: nn.Module,
    data: Any,
    directory: str | Path,
    topk: int,
    temperature: float = 1.0,
    dtype: str = "float16",
    batch_size: int = 32,
    output: str | None = "logits",
    vocab_size: int | None = None,
    measure_positions: int = 4096,
    progress: bool = False,
) -> TokenTeacherCache:
    """Run `teacher` once (eval mode, inference mode, on its own device) over `data` and store
    its top-`topk` next-token distributions at `temperature` in `directory`; returns the
    opened cache.

    `data`: a dataset with ``__len__``, ``get_batch(indices)`` and ``fingerprint()``
    (`kdistill.data.text.TokenBlocks`), read in index order; or a loader whose dict batches hold
    ``input_ids``, ``attention_mask``, ``labels`` and ``index`` (a torch ``DataLoader`` over
    TokenBlocks) over a dataset with ``fingerprint()`` — every sample exactly once.
    `dtype`: float16, bfloat16 or float32 for the log-probabilities; `output`: the key of the
    logits in a mapping output (ignored for a tensor output); `vocab_size`: keep the first
    `vocab_size` logits (a head padded past the tokenizer; the loss then needs the same
    ``vocab_size``); `measure_positions`: how many positions (whole blocks, seeded) the storage
    error is measured on (0: none). A crash part-way leaves ``"complete": false``, refused by
    `open`. CacheError for bad settings, data without a fingerprint, NaN/inf logits, values
    that overflow `dtype`, or samples seen twice or never.
    """
    directory = Path(directory)
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise CacheError(f"topk must be a positive integer, got {topk!r}")
    number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not (number and math.isfinite(temperature) and temperature > 0):
        raise CacheError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CacheError(f"batch_size must be a positive integer, got {batch_size!r}")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
        raise CacheError(
            f"{directory}: not empty and not a teacher cache; build into a new or empty folder "
            "(an existing cache is rebuilt in place)"
        )
    dataset, batches, count = _batches(data, batch_size)
    if not callable(getattr(dataset, "fingerprint", None)):
        raise CacheError(
            f"{type(dataset).__name__} has no fingerprint(); stored teacher distributions must "
            "know which data they belong to (use kdistill.data.text.TokenBlocks)"
        )
    started = time.perf_counter()
    size = len(dataset)
    manifest: dict[str, Any] = {
        "format": TOKEN_FORMAT_VERSION,
        "kind": TOKEN_CACHE_KIND,
        "complete": False,
        **teacher_and_data(teacher, dataset),
        "topk": topk,
        "temperature": float(temperature),
        "dtype": dtype,
    }
    directory.mkdir(parents=True, exist_ok=True)
    # unfinished from here on: a crash never leaves an old complete manifest beside new arrays
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    for pattern in ("output*.npy", "feature.*.npy", "topk.*.npy", "inputs.*.npy"):
        for old in directory.glob(pattern):
            old.unlink()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(size, generator=generator)
    arrays: dict[str, np.ndarray] = {}
    signatures = np.zeros((size, 2))
    written = np.zeros(size, dtype=np.int64)
    quality = _Quality()
    measured: Tensor | None = None
    sample_shape = None
    vocab = None
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    was_training = teacher.training
    teacher.eval()
    try:
        bar = tqdm(batches, total=count, desc="token cache", disable=not progress, leave=False)
        for batch in bar:
            if batch.index is None:
                raise CacheError(
                    "the loader's batches carry no sample index; stored teacher distributions "
                    "are read back by index (dict batches need an 'index' key)"
                )
            rows = batch.index.detach().cpu().reshape(-1).numpy().astype(np.int64)
            with torch.inference_mode():
                logits = _logits(call_model(teacher, move_to(batch.inputs, device)), output)
            if vocab_size is not None:
                if vocab_size > logits.shape[-1]:
                    raise CacheError(
                        f"vocab_size={vocab_size} exceeds the teacher's {logits.shape[-1]} logits"
                    )
                logits = logits[..., :vocab_size]
            logits = logits.float().cpu()
            if len(logits) != len(rows):
                raise CacheError(
                    f"the teacher gave {len(logits)} rows of logits for a batch of {len(rows)}"
                )
            if not bool(torch.isfinite(logits).all()):
                raise CacheError(f"the teacher produced NaN/inf logits (samples {rows[:4]}…)")
            if vocab is None:
                vocab = int(logits.shape[-1])
                if topk > vocab:
                    raise CacheError(
                        f"topk={topk} exceeds the vocabulary ({vocab} tokens); topk = {vocab} "
                        "keeps every token"
                    )
                length = int(logits.shape[1])
                shape = (size, length, topk)
                for name, np_dtype, array_shape in (
                    ("ids", id_dtype(vocab), shape),
                    ("log_probs", CACHE_DTYPES[dtype][0], shape),
                    ("rest", CACHE_DTYPES[dtype][0], shape[:2]),
                ):
                    arrays[name] = np.lib.format.open_memmap(
                        directory / FILES[name], mode="w+", dtype=np_dtype, shape=array_shape
                    )
                blocks = max(1, math.ceil(measure_positions / length)) if measure_positions else 0
                measured = torch.zeros(size, dtype=torch.bool)
                measured[order[:blocks]] = True
            if tuple(logits.shape[1:]) != (arrays["ids"].shape[1], vocab):
                raise CacheError(
                    f"the teacher's logits changed shape between batches: "
                    f"{(arrays['ids'].shape[1], vocab)} per sample at first, "
                    f"{tuple(logits.shape[1:])} at sample {rows[0]}"
                )
            dist = topk_distribution(logits, topk, temperature)
            stored = {
                "ids": dist.ids.numpy().astype(arrays["ids"].dtype),
                "log_probs": _to_storage(dist.log_probs, dtype),
                "rest": _to_storage(dist.rest_log_mass, dtype),
            }
            back = TopKDistribution(
                torch.from_numpy(stored["ids"].astype(np.int64)),
                _from_storage(stored["log_probs"], dtype),
                _from_storage(stored["rest"], dtype),
                float(temperature),
                vocab,
            )
            if not bool(torch.isfinite(back.log_probs).all()):
                raise CacheError(
                    f"teacher log-probabilities down to {float(dist.log_probs.min()):.4g} "
                    f"overflow {dtype} (samples from {rows[0]}); store float32 or bfloat16"
                )
            for name, value in stored.items():
                arrays[name][rows] = value
            assert measured is not None
            pick = measured[torch.from_numpy(rows)]
            if bool(pick.any()):
                labels = batch.target if isinstance(batch.target, Tensor) else None
                inputs = batch.inputs if isinstance(batch.inputs, Mapping) else {}
                mask = inputs.get("attention_mask")
                counted = _counted_positions(labels, mask, logits.shape[:2])
                counted &= pick[:, None]
                quality.add(logits[counted], back.rows(counted))
            signatures[rows] = input_signatures(batch.inputs)
            np.add.at(written, rows, 1)
            sample_shape = list(sample_shape_of(batch.inputs))
    finally:
        teacher.train(was_training)
    check_written_once(
        written,
        "samples",
        "stored distributions need every sample exactly once (an unsharded loader over the "
        "whole dataset, without drop_last)",
    )
    for array in arrays.values():
        array.flush()
    arrays.clear()
    np.save(directory / SIGNATURE_FILE, signatures)
    assert vocab is not None
    manifest.update(
        complete=True,
        output=output,
        vocab_size=vocab,
        block_size=int(sample_shape[0]) if sample_shape else None,
        id_dtype=id_dtype(vocab).name,
        bytes_per_token=bytes_per_token(topk, vocab, dtype),
        quality=quality.summary(),
        files={file: _file_digest(directory / file) for file in FILES.values()},
        inputs={
            "shape": sample_shape,
            "signature": SIGNATURE_METHOD,
            "rtol": SIGNATURE_RTOL,
            "file": SIGNATURE_FILE,
            "sha256": _file_digest(directory / SIGNATURE_FILE),
        },
        build_seconds=round(time.perf_counter() - started, 3),
    )
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    return TokenTeacherCache.open(directory)


class TokenTeacherCache(_EpochRows):
    """Stored top-k teacher distributions of token sequences (see the module docstring); a
    `TeacherSource`: pass it to ``kd.fit(..., teacher_outputs=cache)`` with
    ``Distiller(cache.stand_in(), student, terms)`` (the teacher need not be loaded).

    `lookup(index, inputs)` → (``{output: TopKDistribution}`` — or the distribution itself for
    a teacher returning a plain tensor — with ids ``N×L×k`` int64 and float32 log-probs, None),
    after checking the batch's inputs against the stored signatures. Open with `open`.
    """

    layers: list[str] = []  # no tapped teacher layers

    def __init__(self, directory: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.manifest = manifest
        self._arrays = arrays
        self.size = int(manifest["dataset"]["size"])
        self.views = None
        self.epoch = 0
        self.source = f"token teacher cache {directory}"
        self.signatures = InputSignatures(
            arrays[manifest["inputs"]["file"]], manifest["inputs"]["shape"], self.source
        )

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (
            f"TokenTeacherCache({str(self.directory)!r}, size={self.size}, topk={self.topk}, "
            f"temperature={self.temperature:g}, vocab_size={self.vocab_size}, dtype={self.dtype})"
        )

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def quality(self) -> dict[str, float]:
        """The storage error measured at build time (see the module docstring)."""
        return dict(self.manifest["quality"])

    @property
    def bytes_per_token(self) -> int:
        return int(self.manifest["bytes_per_token"])

    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())

    def stand_in(self) -> CachedTeacher:
        """A weightless teacher for `Distiller` when every teacher output comes from here."""
        return CachedTeacher()

    @classmethod
    def open(
        cls,
        directory: str | Path,
        teacher: nn.Module | None = None,
        dataset: Any = None,
        topk: int | str = "any",
        temperature: float | str = "any",
        dtype: str | None = None,
        verify: bool = False,
    ) -> TokenTeacherCache:
        """Open and validate stored token distributions; every argument given is checked
        against the manifest — `teacher` (weights digest), `dataset` (fingerprint), `topk`,
        `temperature`, `dtype` — and CacheError lists every difference. `verify` re-hashes
        the array files. An unfinished build, a missing or truncated file is refused."""
        directory = Path(directory)
        rebuild = "rebuild it (build_token_cache) or delete the folder"
        path = directory / MANIFEST
        if not path.exists():
            raise CacheError(f"{directory}: no {MANIFEST}; not a teacher cache; {rebuild}")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CacheError(f"{path}: unreadable manifest ({error}); {rebuild}") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != TOKEN_CACHE_KIND:
            raise CacheError(
                f"{directory}: not stored token distributions (a teacher-output cache of "
                f"another kind: open it with kdistill.cache.TeacherCache.open); {rebuild}"
            )
        if manifest.get("format") != TOKEN_FORMAT_VERSION:
            raise CacheError(
                f"{path}: token cache format {manifest.get('format')!r}, this kdistill reads "
                f"{TOKEN_FORMAT_VERSION}; {rebuild}"
            )
        if manifest.get("complete") is not True:
            raise CacheError(
                f"{directory}: incomplete stored token distributions — the build did not "
                f"finish (interrupted or failed), so its arrays are partly empty; {rebuild}"
            )
        problems = cls._differences(manifest, teacher, dataset, topk, temperature, dtype)
        if problems:
            raise CacheError(
                f"{directory}: the stored token distributions do not match: "
                + "; ".join(problems)
                + f"; {rebuild}"
            )
        arrays = {}
        files = {FILES[name]: manifest["files"][FILES[name]] for name in FILES}
        files[manifest["inputs"]["file"]] = manifest["inputs"]["sha256"]
        for file, sha256 in files.items():
            file_path = directory / file
            if not file_path.exists():
                raise CacheError(f"{file_path}: missing array file of the token cache; {rebuild}")
            try:
                array = np.load(file_path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:
                raise CacheError(
                    f"{file_path}: truncated or corrupt ({error}); {rebuild}"
                ) from None
            if array.shape[:1] != (manifest["dataset"]["size"],):
                raise CacheError(
                    f"{file_path}: holds {array.shape[0] if array.ndim else 0} rows, the "
                    f"manifest says {manifest['dataset']['size']}; {rebuild}"
                )
            if verify and _file_digest(file_path) != sha256:
                raise CacheError(f"{file_path}: checksum mismatch (changed after the build)")
            arrays[file] = array
        return cls(directory, manifest, arrays)

    @staticmethod
    def _differences(manifest, teacher, dataset, topk, temperature, dtype) -> list[str]:
        problems = []
        if teacher is not None:
            expected, actual = manifest["teacher"]["sha256"], teacher_digest(teacher)
            if expected != actual:
                problems.append(
                    f"teacher weights differ (stored from {manifest['teacher']['class']} with "
                    f"weights sha256 {_short(expected)}, this {type(teacher).__name__} has "
                    f"{_short(actual)}) — stale"
                )
        if dataset is not None:
            fingerprint = getattr(dataset, "fingerprint", None)
            actual = fingerprint() if callable(fingerprint) else None
            expected = manifest["dataset"]["fingerprint"]
            if expected != actual:
                problems.append(
                    f"dataset differs (stored for {manifest['dataset']['name']!r}, "
                    f"{manifest['dataset']['size']} samples, fingerprint {_short(expected)}; "
                    f"given {getattr(dataset, 'name', type(dataset).__name__)!r}, "
                    f"{len(dataset)} samples, fingerprint "
                    f"{_short(actual) if actual else 'none'})"
                )
        if topk != "any" and topk != manifest["topk"]:
            problems.append(f"top-k differs (stored: {manifest['topk']}, asked for {topk})")
        if temperature != "any" and float(temperature) != manifest["temperature"]:
            problems.append(
                f"temperature differs (stored at {manifest['temperature']:g}, asked for "
                f"{float(temperature):g})"
            )
        if dtype is not None and dtype != manifest["dtype"]:
            problems.append(f"dtype differs (stored {manifest['dtype']}, asked for {dtype})")
        return problems

    def lookup(self, index: Tensor, inputs: Any = None) -> tuple[Any, None]:
        """(the distributions of the samples at dataset positions `index`, None) after checking
        that `inputs` are the samples they were computed on (CacheError otherwise; IndexError
        for an index outside [0, size))."""
        rows, view = self._rows(index)
        self.signatures.check(rows, inputs, view)
        dist = self.read(rows)
        key = self.manifest.get("output")
        return ({key: dist} if key is not None else dist), None

    def read(self, rows: np.ndarray | Tensor) -> TopKDistribution:
        """The stored distributions of dataset rows `rows`, unchecked (for inspection; training
        reads them through `lookup`, which checks the inputs first)."""
        rows = np.asarray(torch.as_tensor(rows).cpu().reshape(-1).numpy(), dtype=np.int64)
        ids = self._arrays[FILES["ids"]][rows]
        return TopKDistribution(
            torch.from_numpy(ids.astype(np.int64)),
            _from_storage(self._arrays[FILES["log_probs"]][rows], self.dtype),
            _from_storage(self._arrays[FILES["rest"]][rows], self.dtype),
            self.temperature,
            self.vocab_size,
        )

    def describe(self) -> str:
        """A few lines for people: what is stored, how big, and the measured storage error."""
        q = self.quality
        return (
            f"token teacher cache {self.directory}: {self.size} blocks of "
            f"{self.manifest['dataset']['name']!r}, teacher {self.manifest['teacher']['class']} "
            f"({_short(self.manifest['teacher']['sha256'])}), top-{self.topk} of "
            f"{self.vocab_size} tokens at T={self.temperature:g}, {self.dtype}, "
            f"{self.bytes_per_token} B per token, {self.nbytes() / 2**20:.1f} MiB\n"
            f"  on {q['positions']} positions: mean KL(full ‖ stored) "
            f"{q['mean_kl_full_stored']:.3g} nats (max {q['max_kl_full_stored']:.3g}), mean "
            f"rest mass {q['mean_rest_mass']:.3g}"
        )
