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
from kdistill.distill.teacher.store.manifest import (
    CACHE_DTYPES,
    _file_digest,
    _from_storage,
    _to_storage,
    begin_build,
    check_build_folder,
    check_written_once,
    finish_build,
    teacher_and_data,
)
from kdistill.distill.teacher.store.signatures import (
    input_signatures,
    sample_shape_of,
)
from kdistill.distill.teacher.store.token_store import (
    FILES,
    IGNORE_INDEX,
    TOKEN_CACHE_KIND,
    TOKEN_FORMAT_VERSION,
    TokenTeacherCache,
    bytes_per_token,
    id_dtype,
)
from kdistill.errors import CacheError
from kdistill.losses.topk import TopKDistribution, topk_distribution

__all__ = ["TOKEN_CACHE_KIND", "TokenTeacherCache", "build_token_cache", "id_dtype"]


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
    _check_token_settings(topk, temperature, dtype, batch_size)
    check_build_folder(directory)
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
    begin_build(directory, manifest, ("output*.npy", "feature.*.npy", "topk.*.npy", "inputs.*.npy"))
    writer = _TokenWriter(directory, size, topk, float(temperature), dtype, measure_positions)
    signatures = np.zeros((size, 2))
    written = np.zeros(size, dtype=np.int64)
    sample_shape = None
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    was_training = teacher.training
    teacher.eval()
    try:
        bar = tqdm(batches, total=count, desc="token cache", disable=not progress, leave=False)
        for batch in bar:
            rows = _rows_of(batch)
            logits = _teacher_logits(teacher, batch, device, output, vocab_size, rows)
            writer.write(rows, logits, batch)
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
    vocab = writer.close()
    manifest.update(
        output=output,
        vocab_size=vocab,
        block_size=int(sample_shape[0]) if sample_shape else None,
        id_dtype=id_dtype(vocab).name,
        bytes_per_token=bytes_per_token(topk, vocab, dtype),
        quality=writer.quality.summary(),
        files={file: _file_digest(directory / file) for file in FILES.values()},
    )
    finish_build(directory, manifest, signatures, sample_shape, started)
    return TokenTeacherCache.open(directory)


def _check_token_settings(topk: Any, temperature: Any, dtype: Any, batch_size: Any) -> None:
    """CacheError naming the first bad argument of `build_token_cache`."""
    if dtype not in CACHE_DTYPES:
        raise CacheError(f"dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise CacheError(f"topk must be a positive integer, got {topk!r}")
    number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not (number and math.isfinite(temperature) and temperature > 0):
        raise CacheError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CacheError(f"batch_size must be a positive integer, got {batch_size!r}")


def _rows_of(batch: Any) -> np.ndarray:
    """The batch's dataset indices as int64 rows; CacheError when it carries none."""
    if batch.index is None:
        raise CacheError(
            "the loader's batches carry no sample index; stored teacher distributions "
            "are read back by index (dict batches need an 'index' key)"
        )
    return batch.index.detach().cpu().reshape(-1).numpy().astype(np.int64)


def _teacher_logits(teacher, batch, device, output, vocab_size, rows: np.ndarray) -> Tensor:
    """The teacher's float32 ``N×L×V`` logits of the batch on the CPU (the first `vocab_size`
    when given), checked: one row per sample, finite."""
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
    return logits


class _TokenWriter:
    """The memory-mapped top-k arrays of a token store, created on the first batch (its shape
    gives L and V) and filled batch by batch; measures the storage error on a seeded sample of
    whole blocks (`measure_positions`, see the module docstring)."""

    def __init__(self, directory: Path, size: int, topk: int, temperature: float, dtype: str,
                 measure_positions: int):  # fmt: skip
        self.directory, self.size, self.topk = directory, size, topk
        self.temperature, self.dtype = temperature, dtype
        self.measure_positions = measure_positions
        self.order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
        self.arrays: dict[str, np.ndarray] = {}
        self.quality = _Quality()
        self.measured: Tensor | None = None
        self.vocab: int | None = None

    def _open(self, logits: Tensor) -> None:
        vocab = int(logits.shape[-1])
        if self.topk > vocab:
            raise CacheError(
                f"topk={self.topk} exceeds the vocabulary ({vocab} tokens); topk = {vocab} "
                "keeps every token"
            )
        self.vocab = vocab
        length = int(logits.shape[1])
        shape = (self.size, length, self.topk)
        for name, np_dtype, array_shape in (
            ("ids", id_dtype(vocab), shape),
            ("log_probs", CACHE_DTYPES[self.dtype][0], shape),
            ("rest", CACHE_DTYPES[self.dtype][0], shape[:2]),
        ):
            self.arrays[name] = np.lib.format.open_memmap(
                self.directory / FILES[name], mode="w+", dtype=np_dtype, shape=array_shape
            )
        positions = self.measure_positions
        blocks = max(1, math.ceil(positions / length)) if positions else 0
        self.measured = torch.zeros(self.size, dtype=torch.bool)
        self.measured[self.order[:blocks]] = True

    def write(self, rows: np.ndarray, logits: Tensor, batch: Any) -> None:
        """Store the top-k distributions of `logits` (``N×L×V``) at `rows`; CacheError when the
        shape changed between batches or a stored value overflows the storage dtype."""
        if self.vocab is None:
            self._open(logits)
        vocab, dtype = self.vocab, self.dtype
        if tuple(logits.shape[1:]) != (self.arrays["ids"].shape[1], vocab):
            raise CacheError(
                f"the teacher's logits changed shape between batches: "
                f"{(self.arrays['ids'].shape[1], vocab)} per sample at first, "
                f"{tuple(logits.shape[1:])} at sample {rows[0]}"
            )
        dist = topk_distribution(logits, self.topk, self.temperature)
        stored = {
            "ids": dist.ids.numpy().astype(self.arrays["ids"].dtype),
            "log_probs": _to_storage(dist.log_probs, dtype),
            "rest": _to_storage(dist.rest_log_mass, dtype),
        }
        back = TopKDistribution(
            torch.from_numpy(stored["ids"].astype(np.int64)),
            _from_storage(stored["log_probs"], dtype),
            _from_storage(stored["rest"], dtype),
            self.temperature,
            vocab,
        )
        if not bool(torch.isfinite(back.log_probs).all()):
            raise CacheError(
                f"teacher log-probabilities down to {float(dist.log_probs.min()):.4g} "
                f"overflow {dtype} (samples from {rows[0]}); store float32 or bfloat16"
            )
        for name, value in stored.items():
            self.arrays[name][rows] = value
        assert self.measured is not None
        pick = self.measured[torch.from_numpy(rows)]
        if bool(pick.any()):
            labels = batch.target if isinstance(batch.target, Tensor) else None
            inputs = batch.inputs if isinstance(batch.inputs, Mapping) else {}
            counted = _counted_positions(labels, inputs.get("attention_mask"), logits.shape[:2])
            counted &= pick[:, None]
            self.quality.add(logits[counted], back.rows(counted))

    def close(self) -> int:
        """Flush the arrays to disk; the vocabulary size."""
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        assert self.vocab is not None
        return self.vocab
