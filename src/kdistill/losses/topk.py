"""Top-k teacher distributions: a teacher's next-token distribution kept as its k most likely
tokens plus one "rest" bucket, and the divergences between such coarse-grained distributions.

A teacher distribution over a vocabulary of V tokens is stored per position as

- ``ids``: the k most likely token ids (…×k, int64), most likely first;
- ``log_probs``: their log-probabilities log p_t at the stored `temperature` (…×k);
- ``rest_log_mass``: log Σ_{j ∉ top-k} p_t,j, the log of the mass the other V − k tokens share
  (…; −inf when k = V: nothing is left).

`topk_distribution` makes one from logits; `kdistill.cache.tokens` stores them on disk.

**What a token divergence computes from one** (`TokenDivergence.forward` accepts a
`TopKDistribution` in place of the teacher's logits): the student's distribution
p_s = softmax(z_s / T) is coarse-grained the same way — its probabilities on the teacher's k
tokens and one bucket with the rest of its mass (`bucket_log_probs`) — and the divergence is
taken between the two (k + 1)-bucket distributions. This is the divergence of the images of p_t
and p_s under the map "token → its bucket", so by the data-processing inequality it is ≤ the
divergence of the full distributions for every divergence here (forward and reverse KL, the
generalised JSD, the skew KLs and total variation are all f-divergences). For forward KL the
difference is exactly R_t · KL(p_t|rest ‖ p_s|rest) (R_t: the teacher's rest mass; |rest: the
distributions renormalised over the V − k tail), so it vanishes as R_t → 0. With k = V there is
no rest and the value and gradient are those of the dense loss (to float rounding: the terms are
summed in another order).

**Temperature.** The stored log-probabilities are at the temperature the distribution was made
at (T0); the loss uses its own temperature T. T = T0: used as stored. k = V: corrected exactly —
log p at T0 fixes the logits up to a constant (z/T0 = log p + c), so p at T is
softmax(log p · T0 / T). k < V and T ≠ T0: refused (ValueError): the shape of the tail is lost,
so the distribution at T cannot be recovered; rebuild the distributions at T, or with k = V.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TopKDistribution", "bucket_log_probs", "topk_distribution"]


@dataclass(frozen=True)
class TopKDistribution:
    """A teacher's distribution per position kept as its top k tokens and the rest's log-mass.

    `ids`: ``…×k`` int64 token ids (each in [0, `vocab_size`)); `log_probs`: ``…×k`` float,
    log p of those tokens at `temperature`; `rest_log_mass`: ``…`` float, log of 1 − Σ top-k p
    (−inf when nothing is left, k = V); `temperature`: the T0 of p = softmax(z / T0);
    `vocab_size`: V, the size of the vocabulary p is over. ``…`` is the positions' shape
    (``N×L`` for token sequences, ``M`` after `rows`). ValueError for inconsistent shapes or
    settings (see the module docstring for how the token divergences use it).
    """

    ids: Tensor
    log_probs: Tensor
    rest_log_mass: Tensor
    temperature: float
    vocab_size: int

    def __post_init__(self) -> None:
        for name in ("ids", "log_probs", "rest_log_mass"):
            if not isinstance(getattr(self, name), Tensor):
                kind = type(getattr(self, name)).__name__
                raise TypeError(f"TopKDistribution.{name} must be a tensor, got {kind}")
        if self.ids.is_floating_point() or self.ids.dtype == torch.bool or self.ids.dim() < 1:
            raise TypeError(
                f"TopKDistribution.ids must be an integer tensor …×k, got {self.ids.dtype} of "
                f"shape {tuple(self.ids.shape)}"
            )
        if not self.log_probs.is_floating_point():
            raise TypeError(
                f"TopKDistribution.log_probs must be floating point, got {self.log_probs.dtype}"
            )
        if self.log_probs.shape != self.ids.shape:
            raise ValueError(
                f"TopKDistribution: log_probs has shape {tuple(self.log_probs.shape)} but ids "
                f"{tuple(self.ids.shape)}; they must match (…×k)"
            )
        if self.rest_log_mass.shape != self.ids.shape[:-1]:
            raise ValueError(
                f"TopKDistribution: rest_log_mass has shape {tuple(self.rest_log_mass.shape)} but "
                f"ids {tuple(self.ids.shape)}; it must be the positions' shape "
                f"{tuple(self.ids.shape[:-1])}"
            )
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise ValueError(f"TopKDistribution.vocab_size must be an int, got {self.vocab_size!r}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(
                f"TopKDistribution: k = {self.k} tokens per position must lie in "
                f"[1, vocab_size = {self.vocab_size}]"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"TopKDistribution.temperature must be > 0, got {self.temperature!r}")

    @property
    def k(self) -> int:
        """Tokens kept per position."""
        return int(self.ids.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The positions' shape (``N×L``, or ``M``): `ids`' shape without k."""
        return self.ids.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.log_probs.device

    def _map(self, each: Callable[[Tensor], Tensor]) -> TopKDistribution:
        """The same distribution with `each` applied to the positions of every tensor (it must
        keep a trailing k dimension of `ids` / `log_probs` in place)."""
        return TopKDistribution(
            each(self.ids),
            each(self.log_probs),
            each(self.rest_log_mass.unsqueeze(-1)).squeeze(-1),
            self.temperature,
            self.vocab_size,
        )

    def rows(self, mask: Tensor) -> TopKDistribution:
        """The positions where `mask` (bool, the positions' shape) is True, in row-major order:
        ``M×k`` ids and log-probs, ``M`` rest log-masses."""
        if mask.shape != self.shape:
            raise ValueError(
                f"TopKDistribution.rows: mask of shape {tuple(mask.shape)} for positions of "
                f"shape {tuple(self.shape)}"
            )
        mask = mask.to(self.ids.device)
        return self._map(lambda value: value[mask])

    def unsqueeze(self, dim: int) -> TopKDistribution:
        """A new positions dimension at `dim` (≥ 0), e.g. ``N`` → ``N×1``."""
        return self._map(lambda value: value.unsqueeze(dim))

    def to(self, device: torch.device | str) -> TopKDistribution:
        """On `device` (the same dtypes)."""
        return self._map(lambda value: value.to(device))

    def at_temperature(self, temperature: float) -> TopKDistribution:
        """The distribution at `temperature`: itself at the stored temperature; with k = V the
        exact re-tempered one, softmax(log p · T0 / T); otherwise ValueError naming both
        temperatures and the fix (see the module docstring)."""
        if temperature == self.temperature:
            return self
        if self.k != self.vocab_size:
            raise ValueError(
                f"the stored teacher distributions are at temperature {self.temperature:g} "
                f"(top-{self.k} of {self.vocab_size} tokens), but the loss uses temperature "
                f"{temperature:g}; a top-k distribution cannot be re-tempered (the tail's shape "
                f"is lost): rebuild the stored distributions at temperature {temperature:g}, or "
                f"with topk = the vocabulary size ({self.vocab_size}) to keep every token"
            )
        dtype = torch.promote_types(self.log_probs.dtype, torch.float32)
        scaled = self.log_probs.to(dtype) * (self.temperature / temperature)
        return TopKDistribution(
            self.ids,
            F.log_softmax(scaled, dim=-1),
            self.rest_log_mass,
            float(temperature),
            self.vocab_size,
        )

    def buckets(self, dtype: torch.dtype | None = None) -> Tensor:
        """``…×(k+1)`` log-probabilities of the k tokens and the rest, in `dtype` (default: the
        stored one, at least float32), renormalised to sum to 1 (values rounded to float16 by a
        cache sum to 1 ± 1e-3 only; a divergence needs a distribution), with −inf (no mass)
        replaced by the dtype's lowest finite number, so that a p = 0 bucket counts 0 in a
        divergence (never 0·∞)."""
        dtype = dtype or torch.promote_types(self.log_probs.dtype, torch.float32)
        values = torch.cat([self.log_probs.to(dtype), self.rest_log_mass.to(dtype)[..., None]], -1)
        return F.log_softmax(values, dim=-1).clamp(min=torch.finfo(dtype).min)


def bucket_log_probs(log_p_student: Tensor, ids: Tensor) -> Tensor:
    """The student's log-probabilities on the teacher's k tokens and on the rest.

    `log_p_student`: ``M×V`` log softmax(z_s / T) (finite; `kdistill.losses.token` clamps −inf);
    `ids`: ``M×k`` int64, distinct token ids per row. Returns ``M×(k+1)``: columns 0…k−1 are
    ``log_p_student[m, ids[m, j]]``, column k is log Σ_{v ∉ ids[m]} p_s,v, computed as a
    logsumexp over the other tokens (never as log(1 − Σ p), which loses every digit when the
    top-k hold nearly all the mass). With k = V the rest bucket is the dtype's lowest finite
    number (no mass) and has zero gradient. Differentiable in `log_p_student`.
    """
    if log_p_student.dim() != 2 or ids.dim() != 2 or ids.shape[0] != log_p_student.shape[0]:
        raise ValueError(
            f"bucket_log_probs needs M×V student log-probabilities and M×k ids, got "
            f"{tuple(log_p_student.shape)} and {tuple(ids.shape)}"
        )
    ids = ids.to(log_p_student.device, torch.int64)
    lowest = torch.finfo(log_p_student.dtype).min
    picked = log_p_student.gather(-1, ids)
    # lowest (not −inf): exp underflows to exactly 0, and a row with no token left gets a finite
    # logsumexp (≈ lowest) with a finite gradient; scatter passes no gradient to the top-k
    others = log_p_student.scatter(-1, ids, lowest)
    rest = torch.logsumexp(others, dim=-1).clamp(min=lowest)
    return torch.cat([picked, rest[:, None]], dim=-1)


def topk_distribution(logits: Tensor, k: int, temperature: float = 1.0) -> TopKDistribution:
    """The top-k distribution of `logits` (``…×V``, e.g. ``N×L×V``) at `temperature`.

    log p = log_softmax(z / T) in float32 (float64 for float64 logits); the k largest per
    position (ties broken by `torch.topk`), and the rest's log-mass as a logsumexp of the log p
    of the other V − k tokens — exact to the dtype's relative precision even when the rest is
    1e-30 of the mass (log1p(−Σ p) would round it to −inf or 0). k = V keeps every token (rest
    −inf). ValueError for k outside [1, V] or T ≤ 0. No gradient is kept.
    """
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(f"logits must be a floating-point tensor …×V, got {type(logits).__name__}")
    vocab = int(logits.shape[-1])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}] (the vocabulary size), got {k!r}")
    with torch.no_grad():
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_p = F.log_softmax(logits.to(dtype) / temperature, dim=-1)
        values, ids = log_p.topk(k, dim=-1)
        if k == vocab:
            rest = torch.full(log_p.shape[:-1], -math.inf, dtype=dtype, device=log_p.device)
        else:
            rest = torch.logsumexp(log_p.scatter(-1, ids, -math.inf), dim=-1)
    return TopKDistribution(ids, values, rest, float(temperature), vocab)
