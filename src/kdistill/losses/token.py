"""Token-level losses for language models: next-token divergences between the student's and the
teacher's distributions, the next-token cross-entropy, and hidden-state matching on ``N×L×D``.

Conventions, identical for every class here and on every code path:

- **Inputs.** Logits ``N×L×V`` (also ``N×V`` with labels ``N``, read as one position per
  sample, L = 1, which needs ``shift=False``). Labels ``N×L`` of any integer dtype, as Hugging
  Face passes them to a causal LM: unshifted, ``ignore_index`` (−100) where nothing is counted
  (padding, prompt tokens).
- **Shift.** ``shift=True`` (default, causal LMs): the logits at position i are the prediction of
  the next token, so position i counts iff ``labels[:, i+1] ≠ ignore_index``; the last position
  never counts. ``shift=False`` (logits already aligned with their labels): position i counts
  iff ``labels[:, i] ≠ ignore_index``. The labels only choose positions for the divergences (and
  must be valid tokens: in ``[0, V)`` or ``ignore_index``); `TokenCE` scores them.
- **Temperature.** ``p = softmax(z / T)`` on both sides; the value is multiplied by T² (as `KD`),
  so gradient sizes stay comparable across temperatures. T = 1 by default.
- **Normalisation.** Per counted position the divergence is summed over the vocabulary; the sum
  over counted positions is divided by their number — or by ``num_counted`` when the caller
  passes it (`forward(..., num_counted=)`): the engine passes the count over a whole gradient-
  accumulation window and all DDP ranks, so micro-batches and ranks give the value and gradient
  of one big batch. `count(labels)` gives the number of counted positions of a batch.
- **No counted position** (a fully masked batch or row): exactly 0, with a zero gradient.
- **Precision.** Computed in float32 at least: bf16 / fp16 logits are cast up, float64 stays
  float64. Logits of ±1e4 stay finite; p = 0 terms count 0 (−inf logits, e.g. a masked-out
  vocabulary entry, have p = 0 and contribute nothing).
- **Vocabulary.** Student and teacher must have the same V. Heads padded past the tokenizer
  (e.g. 2056 rows for 2048 tokens) are compared on the real vocabulary with
  ``vocab_size=<tokenizer size>`` (≤ both V): ``logits[..., :vocab_size]``; labels must then be
  below `vocab_size`. Different V without it is an error naming both sizes.
- **Padding.** Given the batch's ``attention_mask`` (the distiller passes it), a counted position
  that is padding is an error: with left padding and ``shift=True`` the pad position before a
  sequence would be scored on its first token (Hugging Face's loss counts it silently); label
  each sequence's first token ``ignore_index`` or pad on the right.
- **Stored top-k teachers.** The divergences also take the teacher as a `TopKDistribution`
  (its k most likely tokens per position and the log-mass of the rest, at a stored temperature;
  `kdistill.losses.topk`, `kdistill.cache.tokens`) in place of its logits: the value is then the
  divergence between the (k + 1)-bucket coarse-grainings of both distributions, ≤ the full one
  (data-processing inequality), exactly the dense value for k = V. Same conventions otherwise.

The hidden-state losses (`HiddenMSE`, `HiddenCosine`) follow the same normalisation over the real
positions given by the attention mask (the distiller passes the batch's ``attention_mask``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill._checks import check_positive, check_positive_int, check_same_shape
from kdistill.losses.base import MASK, STUDENT, TARGET, TEACHER, DistillLoss, register_loss
from kdistill.losses.topk import TopKDistribution, bucket_log_probs

Count = float | Tensor | None


# -- shared helpers -----------------------------------------------------------------------------


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64: the dtype token losses compute in."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_integer_labels(labels: Tensor, what: str = "labels") -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{what} must be a tensor of token ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{what} must hold integer token ids (ignore_index where not counted), got dtype "
            f"{labels.dtype} (shape {tuple(labels.shape)})"
        )


def _label_rows(labels: Tensor, shift: bool) -> Tensor:
    """`labels` as N×L int64: N×L as it is, N (one position per sample) as N×1."""
    _check_integer_labels(labels)
    if labels.dim() == 1:
        if shift:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} (N×V logits, one position per sample) "
                "have no next token to shift to; build the loss with shift=False"
            )
        return labels.long().unsqueeze(1)
    if labels.dim() != 2:
        raise ValueError(f"labels must be N×L (N for N×V logits), got shape {tuple(labels.shape)}")
    return labels.long()


def as_sequences(logits: Tensor, labels: Tensor, shift: bool, what: str) -> tuple[Tensor, Tensor]:
    """(`logits` as N×L×V, `labels` as N×L int64), checked: ``N×L×V`` with ``N×L`` labels, or
    ``N×V`` with ``N`` labels (L = 1, which needs ``shift=False``)."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        kind = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"{what} must be a floating-point tensor, got {kind}")
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"{what} must be N×L×V (or N×V), got shape {tuple(logits.shape)}; pick the logits "
            "of a model output with Term(output='logits')"
        )
    rows = _label_rows(labels, shift)
    if logits.dim() == 2 and labels.dim() != 1:
        raise ValueError(
            f"{what} of shape {tuple(logits.shape)} (N×V) need labels of shape "
            f"({logits.shape[0]},), got {tuple(labels.shape)}"
        )
    sequences = logits.unsqueeze(1) if logits.dim() == 2 else logits
    if rows.shape != sequences.shape[:2]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (the {what}' "
            f"{tuple(logits.shape)} without the vocabulary), got {tuple(labels.shape)}"
        )
    return sequences, rows


def next_token_labels(labels: Tensor, shift: bool, ignore_index: int) -> Tensor:
    """N×L: the label each position's logits are scored on — ``labels[:, i+1]`` with `shift`
    (`ignore_index` at the last position), else ``labels[:, i]``."""
    if not shift:
        return labels
    last = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], last], dim=1)


def check_real_positions(counted: Tensor, attention_mask: Tensor | None, shift: bool) -> None:
    """No counted position is padding: a position whose input is padding (attention mask 0)
    has meaningless logits. With ``shift=True`` this is the left-padding pitfall (as in Hugging
    Face's own loss): the pad position just before a sequence is scored on its first token."""
    if attention_mask is None:
        return
    real = attention_mask != 0 if attention_mask.dtype != torch.bool else attention_mask
    if real.shape != counted.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the labels "
            f"{tuple(counted.shape)}"
        )
    padding = counted & ~real.to(counted.device)
    if bool(padding.any()):
        n, i = (int(v) for v in padding.nonzero()[0])
        nxt = "labels[:, i+1]" if shift else "labels[:, i]"
        raise ValueError(
            f"{int(padding.sum())} counted positions are padding (attention_mask 0), e.g. sample "
            f"{n} position {i}, whose logits would be scored on {nxt}; with left padding set the "
            "label of each sequence's first token to ignore_index (or pad on the right)"
        )


def check_token_range(
    labels: Tensor, vocab: int, ignore_index: int, vocab_size: int | None
) -> None:
    """Every label is a token of the compared vocabulary [0, vocab) or `ignore_index`."""
    counted = labels[labels != ignore_index]
    if counted.numel() == 0:
        return
    low, high = int(counted.min()), int(counted.max())
    if low >= 0 and high < vocab:
        return
    hint = (
        f" (vocab_size={vocab_size} must cover every token of the tokenizer)"
        if vocab_size is not None and high >= vocab
        else ""
    )
    raise ValueError(
        f"labels must be token ids in [0, {vocab - 1}] or ignore_index={ignore_index}, got "
        f"min {low} and max {high}{hint}"
    )


def compared_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    """The number of vocabulary entries compared: `vocab_size` (≤ both), or the common V."""
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the student's logits have {student_vocab} vocabulary entries and the "
                f"teacher's {teacher_vocab}: if the extra rows are padding, set "
                "vocab_size=<tokenizer size>; different vocabularies cannot be compared token "
                "by token"
            )
        return student_vocab
    if vocab_size > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the logits' vocabulary (student "
            f"{student_vocab}, teacher {teacher_vocab}); set it to the tokenizer's size, at "
            "most the smaller head"
        )
    return vocab_size


def counted_rows(
    logits: Tensor,
    labels: Tensor,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    what: str = "logits",
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(logits, labels) → (``M×V'`` logits of the M counted positions, their ``M`` labels).

    `logits` ``N×L×V`` (or ``N×V`` with `labels` ``N`` and ``shift=False``); V' = `vocab_size`
    (≤ V) or V. Rows keep the logits' dtype and stay differentiable; positions are taken in
    (sample, position) order. Raises for bad shapes, labels outside ``[0, V')`` and, given an
    `attention_mask`, for a counted position that is padding.
    """
    sequences, rows = as_sequences(logits, labels, shift, what)
    if vocab_size is not None and vocab_size > sequences.shape[-1]:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the {what}' vocabulary ({sequences.shape[-1]}, "
            f"shape {tuple(logits.shape)}); set it to the tokenizer's size"
        )
    vocab = sequences.shape[-1] if vocab_size is None else vocab_size
    aligned = next_token_labels(rows, shift, ignore_index)
    check_token_range(rows, vocab, ignore_index, vocab_size)
    counted = aligned != ignore_index
    if labels.dim() == 2:  # token sequences (N×V logits have no padding positions)
        check_real_positions(counted, attention_mask, shift)
    return sequences[..., :vocab][counted], aligned[counted]


def per_token_mean(total: Tensor, counted: int, num_counted: Count) -> Tensor:
    """`total` (the sum over this batch's `counted` positions) divided by the number of counted
    positions: `num_counted` when given (a whole window's / all ranks' count), else `counted`.
    With nothing counted here the total is a sum over no position: 0, with a zero gradient."""
    if num_counted is None:
        return total / max(counted, 1)
    if isinstance(num_counted, Tensor):
        if num_counted.numel() != 1:
            raise ValueError(
                f"num_counted must be a number, got a tensor of shape {tuple(num_counted.shape)}"
            )
        num_counted = float(num_counted)
    denominator = float(num_counted)
    if not (math.isfinite(denominator) and denominator >= 0):
        raise ValueError(f"num_counted must be a finite number >= 0, got {num_counted!r}")
    if denominator == 0:
        if counted:
            raise ValueError(
                f"num_counted=0 but this batch has {counted} counted positions; pass the count "
                "over the whole window / all ranks (Distiller.count_tokens)"
            )
        return total
    return total / denominator


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(z / T), with −inf (p = 0) replaced by the dtype's lowest finite number, so
    that p·(log p − log q) is 0, never 0·∞ = NaN, for masked-out entries."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    return log_p.clamp(min=torch.finfo(log_p.dtype).min)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q) per row (last dim), from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(w·p + (1 − w)·q), computed stably from log-probabilities (0 < w < 1)."""
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def _check_ignore_index(ignore_index: int) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    return ignore_index


def _check_vocab_size(vocab_size: int | None) -> int | None:
    if vocab_size is not None:
        check_positive_int(vocab_size, "vocab_size")
    return vocab_size


def _check_shift(shift: bool) -> bool:
    if not isinstance(shift, bool):
        raise ValueError(f"shift must be True or False, got {shift!r}")
    return shift


# -- divergences --------------------------------------------------------------------------------


class TokenDivergence(DistillLoss):
    """Base of the token divergences: the conventions of `kdistill.losses.token`; a subclass
    gives `divergence(log_p_student, log_p_teacher)`, the value at each counted position.

    `forward(student_logits, teacher_logits, labels, num_counted=None)`: logits ``N×L×V`` (or
    ``N×V``), labels ``N×L`` (or ``N``); returns a 0-dim tensor in nats per counted token (× T²).
    """

    needs = (STUDENT, TEACHER, TARGET)
    compares_classes = True
    class_dim = -1
    counts_tokens = True

    def __init__(
        self,
        temperature: float = 1.0,
        shift: bool = True,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ):
        super().__init__()
        check_positive(temperature, "temperature")
        self.temperature = float(temperature)
        self.shift = _check_shift(shift)
        self.ignore_index = _check_ignore_index(ignore_index)
        self.vocab_size = _check_vocab_size(vocab_size)

    def count(self, labels: Tensor) -> Tensor:
        """The number of counted positions of `labels` (``N×L``, or ``N``): int64, 0-dim."""
        rows = _label_rows(labels, self.shift)
        return (next_token_labels(rows, self.shift, self.ignore_index) != self.ignore_index).sum()

    def divergence(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        """M×V log-probabilities (at temperature T) → M values, one per counted position."""
        raise NotImplementedError

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | TopKDistribution,
        labels: Tensor,
        num_counted: Count = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """`num_counted`: the count to divide by (default: this batch's). `attention_mask`
        (N×L, optional; the distiller passes the batch's): a counted position that is padding
        is an error (`check_real_positions`).

        `teacher_logits` may be a `TopKDistribution` (positions ``N×L``, or ``N`` for ``N×V``
        student logits), e.g. stored by `kdistill.cache.tokens`: the divergence is then taken
        between the (k + 1)-bucket distributions — the teacher's top k tokens and the rest —
        which is ≤ the full divergence and equal to it for k = V (`kdistill.losses.topk`)."""
        if isinstance(teacher_logits, TopKDistribution):
            return self._forward_topk(
                student_logits, teacher_logits, labels, num_counted, attention_mask
            )
        student, rows = as_sequences(student_logits, labels, self.shift, "student logits")
        teacher, _ = as_sequences(teacher_logits, labels, self.shift, "teacher logits")
        vocab = compared_vocab(student.shape[-1], teacher.shape[-1], self.vocab_size)
        check_token_range(rows, vocab, self.ignore_index, self.vocab_size)
        counted = next_token_labels(rows, self.shift, self.ignore_index) != self.ignore_index
        if labels.dim() == 2:  # token sequences (N×V logits have no padding positions)
            check_real_positions(counted, attention_mask, self.shift)
        dtype = compute_dtype(student, teacher)
        student = student[..., :vocab][counted].to(dtype)  # M×V
        teacher = teacher[..., :vocab][counted].to(dtype)
        t = self.temperature
        values = self.divergence(_log_probs(student, t), _log_probs(teacher, t))
        return per_token_mean(values.sum() * (t * t), student.shape[0], num_counted)

    def _forward_topk(
        self,
        student_logits: Tensor,
        teacher: TopKDistribution,
        labels: Tensor,
        num_counted: Count,
        attention_mask: Tensor | None,
    ) -> Tensor:
        """`forward` with the teacher's top-k distribution: the divergence of the buckets."""
        student, rows = as_sequences(student_logits, labels, self.shift, "student logits")
        if student_logits.dim() == 2 and teacher.ids.dim() == 2:
            teacher = teacher.unsqueeze(1)  # N positions → N×1, as the N×V logits
        if teacher.shape != student.shape[:-1]:
            raise ValueError(
                f"the teacher's top-k distributions cover positions of shape "
                f"{tuple(teacher.shape)} (ids {tuple(teacher.ids.shape)}) but the student "
                f"logits {tuple(student_logits.shape)}; they must be of the same sequences"
            )
        if self.vocab_size is None and student.shape[-1] != teacher.vocab_size:
            raise ValueError(
                f"the student's logits have {student.shape[-1]} vocabulary entries and the "
                f"teacher's stored distributions are over {teacher.vocab_size} tokens: if the "
                "extra rows are padding, set vocab_size=<tokenizer size> (and store the "
                "teacher's distributions over that vocabulary)"
            )
        if self.vocab_size is not None and teacher.vocab_size != self.vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size}, but the teacher's stored distributions are over "
                f"{teacher.vocab_size} tokens; store them over the compared vocabulary "
                f"(vocab_size={self.vocab_size} when building them)"
            )
        vocab = compared_vocab(student.shape[-1], teacher.vocab_size, self.vocab_size)
        check_token_range(rows, vocab, self.ignore_index, self.vocab_size)
        counted = next_token_labels(rows, self.shift, self.ignore_index) != self.ignore_index
        if labels.dim() == 2:
            check_real_positions(counted, attention_mask, self.shift)
        dtype = compute_dtype(student, teacher.log_probs)
        t = self.temperature
        chosen = teacher.rows(counted).at_temperature(t)  # M×k (ValueError: T cannot be met)
        if chosen.ids.numel() and (int(chosen.ids.min()) < 0 or int(chosen.ids.max()) >= vocab):
            raise ValueError(
                f"the teacher's stored top-k token ids must lie in [0, {vocab}), got "
                f"[{int(chosen.ids.min())}, {int(chosen.ids.max())}]"
            )
        student = student[..., :vocab][counted].to(dtype)  # M×V
        log_p_student = bucket_log_probs(_log_probs(student, t), chosen.ids)
        values = self.divergence(log_p_student, chosen.buckets(dtype))
        return per_token_mean(values.sum() * (t * t), student.shape[0], num_counted)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, shift={self.shift}, "
            f"ignore_index={self.ignore_index}, vocab_size={self.vocab_size}"
        )


@register_loss("forward_kl")
class ForwardKL(TokenDivergence):
    """Forward KL per token: Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network")
    applied at every token, the word-level KD of Kim & Rush 2016 ("Sequence-Level Knowledge
    Distillation", EMNLP).

    ``T² · Σ_{i counted} KL(p_t,i ‖ p_s,i) / count``, ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)``,
    p = softmax(z/T). Mass-covering: the student is pushed to cover every token the teacher
    gives probability. Conventions (shift, masking, normalisation, vocabulary): see the module.
    """

    def divergence(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        return kl(log_p_teacher, log_p_student)


@register_loss("reverse_kl")
class ReverseKL(TokenDivergence):
    """Reverse KL per token, the objective of MiniLLM: Gu et al. 2024, "MiniLLM: Knowledge
    Distillation of Large Language Models" (ICLR), here on the given tokens (not sampled).

    ``T² · Σ_{i counted} KL(p_s,i ‖ p_t,i) / count``: mode-seeking, the student concentrates on
    the teacher's likely tokens. Conventions: see the module.
    """

    def divergence(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        return kl(log_p_student, log_p_teacher)


@register_loss("jsd")
class GeneralizedJSD(TokenDivergence):
    """Generalised Jensen–Shannon divergence of GKD: Agarwal et al. 2024, "On-Policy Distillation
    of Language Models: Learning from Self-Generated Mistakes" (ICLR).

    ``M = β·p_t + (1 − β)·p_s``, ``JSD_β = β·KL(p_t ‖ M) + (1 − β)·KL(p_s ‖ M)`` per counted
    token, × T², averaged as the module says. β = 0.5 is the symmetric JSD (at most log 2).

    β must lie strictly in (0, 1): at β = 0 and β = 1 the mixture equals one side and JSD_β is
    0 whatever the student — it vanishes like β(1 − β). The scaled value tends to the KLs:
    ``JSD_β / β → KL(p_t ‖ p_s)`` as β → 0 (use `ForwardKL`) and
    ``JSD_β / (1 − β) → KL(p_s ‖ p_t)`` as β → 1 (use `ReverseKL`). The endpoints are refused
    rather than silently replaced by another divergence.
    """

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        shift: bool = True,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ):
        super().__init__(temperature, shift, ignore_index, vocab_size)
        if not 0.0 < beta < 1.0:
            raise ValueError(
                f"beta must lie strictly between 0 and 1, got {beta}: JSD_beta is 0 at both ends "
                "whatever the student (JSD_beta/beta → forward KL as beta → 0, "
                "JSD_beta/(1 − beta) → reverse KL as beta → 1); for those ends use ForwardKL "
                "('forward_kl') or ReverseKL ('reverse_kl')"
            )
        self.beta = float(beta)

    def divergence(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        beta = self.beta
        log_m = log_mixture(log_p_teacher, log_p_student, beta)
        return beta * kl(log_p_teacher, log_m) + (1 - beta) * kl(log_p_student, log_m)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super().extra_repr()


def _check_skew(alpha: float) -> float:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"alpha must lie in [0, 1), got {alpha}: at alpha = 1 the skewed mixture equals the "
            "first distribution and the loss is 0 whatever the student; alpha = 0 is the plain KL"
        )
    return float(alpha)


@register_loss("skew_forward_kl")
class SkewForwardKL(TokenDivergence):
    """Skew forward KL of DistiLLM: Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation
    for Large Language Models" (ICML).

    ``KL(p_t ‖ α·p_t + (1 − α)·p_s)`` per counted token, × T², averaged as the module says.
    α ∈ [0, 1): α = 0 is exactly `ForwardKL`; mixing in the teacher bounds the log-ratio by
    −log α, which keeps gradients stable when the student gives a token almost no mass.
    α = 1 is refused (always 0). DistiLLM uses α = 0.1.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        shift: bool = True,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ):
        super().__init__(temperature, shift, ignore_index, vocab_size)
        self.alpha = _check_skew(alpha)

    def divergence(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        if self.alpha == 0.0:
            return kl(log_p_teacher, log_p_student)
        return kl(log_p_teacher, log_mixture(log_p_teacher, log_p_student, self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()


@register_loss("skew_reverse_kl")
class SkewReverseKL(TokenDivergence):
    """Skew reverse KL of DistiLLM: Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation
    for Large Language Models" (ICML).

    ``KL(p_s ‖ α·p_s + (1 − α)·p_t)`` per counted token, × T², averaged as the module says.
    α ∈ [0, 1): α = 0 is exactly `ReverseKL`; α = 1 is refused (always 0).
    """

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        shift: bool = True,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ):
        super().__init__(temperature, shift, ignore_index, vocab_size)
        self.alpha = _check_skew(alpha)

    def divergence(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        if self.alpha == 0.0:
            return kl(log_p_student, log_p_teacher)
        return kl(log_p_student, log_mixture(log_p_student, log_p_teacher, self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()


@register_loss("tvd")
class TVD(TokenDivergence):
    """Total variation distance per token, as used for sequence-level KD by Wen et al. 2023,
    "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL).

    ``½·Σ_v |p_t,v − p_s,v|`` per counted token (in [0, 1]), × T², averaged as the module says.
    Where p_t = p_s exactly the gradient is 0 (the subgradient of |x| at 0 that torch uses).
    """

    def divergence(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        return 0.5 * (log_p_teacher.exp() - log_p_student.exp()).abs().sum(dim=-1)


# -- hard loss ----------------------------------------------------------------------------------


@register_loss("token_ce")
class TokenCE(DistillLoss):
    """Next-token cross-entropy with the labels, as Hugging Face's causal-LM loss pairs them
    (the maximum-likelihood objective of a language model trained alone).

    ``Σ_{i counted} −log softmax(z_s,i)[y_i] / count`` with y_i = ``labels[:, i+1]`` (shift=True)
    or ``labels[:, i]`` (shift=False), counted where y_i ≠ `ignore_index`: the same shift,
    masking and normalisation (`num_counted`) as the token divergences of this module, in nats
    per counted token. `vocab_size` drops padding rows of the head (``logits[..., :vocab_size]``).
    Equals ``F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())`` for one
    batch with shift=True.
    """

    needs = (STUDENT, TARGET)
    class_dim = -1
    counts_tokens = True

    def __init__(self, shift: bool = True, ignore_index: int = -100, vocab_size: int | None = None):
        super().__init__()
        self.shift = _check_shift(shift)
        self.ignore_index = _check_ignore_index(ignore_index)
        self.vocab_size = _check_vocab_size(vocab_size)

    def count(self, labels: Tensor) -> Tensor:
        """The number of counted positions of `labels` (``N×L``, or ``N``): int64, 0-dim."""
        rows = _label_rows(labels, self.shift)
        return (next_token_labels(rows, self.shift, self.ignore_index) != self.ignore_index).sum()

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor,
        num_counted: Count = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """`num_counted` and `attention_mask` as for the token divergences."""
        rows, targets = counted_rows(
            student_logits,
            labels,
            shift=self.shift,
            ignore_index=self.ignore_index,
            vocab_size=self.vocab_size,
            what="student logits",
            attention_mask=attention_mask,
        )
        rows = rows.to(compute_dtype(rows))
        total = F.cross_entropy(rows, targets, reduction="sum")
        return per_token_mean(total, rows.shape[0], num_counted)

    def extra_repr(self) -> str:
        return f"shift={self.shift}, ignore_index={self.ignore_index}, vocab_size={self.vocab_size}"


# -- hidden states ------------------------------------------------------------------------------


def real_positions(attention_mask: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """bool N×L: where `attention_mask` (N×L of 0 / 1, any dtype) is 1. ValueError for another
    shape than `shape` (N×L) or values other than 0 and 1."""
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        got = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(f"attention_mask must be N×L (1 = real token, 0 = padding), got {got}")
    if shape is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the hidden states are "
            f"{tuple(shape)}×D: tap a layer whose positions are the input tokens"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    binary = (attention_mask == 0) | (attention_mask == 1)
    if not bool(binary.all()):
        raise ValueError(
            "attention_mask must hold 0 (padding) and 1 (real token) only, got values "
            f"{sorted(set(attention_mask[~binary].flatten().tolist()))[:5]}"
        )
    return attention_mask == 1


class _HiddenStates(DistillLoss):
    """Base of the hidden-state losses on ``N×L×D`` (after the distiller's connector)."""

    needs = (STUDENT, TEACHER, MASK)
    uses_connector = True
    counts_tokens = True
    count_from: ClassVar[str] = MASK

    def count(self, attention_mask: Tensor) -> Tensor:
        """The number of real positions of `attention_mask` (N×L): int64, 0-dim."""
        return real_positions(attention_mask).sum()

    def per_position(self, student: Tensor, teacher: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        student_states: Tensor,
        teacher_states: Tensor,
        attention_mask: Tensor,
        num_counted: Count = None,
    ) -> Tensor:
        check_same_shape(
            student_states, teacher_states, "student hidden states", "teacher hidden states"
        )
        if student_states.dim() != 3:
            raise ValueError(
                f"hidden states must be N×L×D, got shape {tuple(student_states.shape)}"
            )
        real = real_positions(attention_mask, tuple(student_states.shape[:2]))
        dtype = compute_dtype(student_states, teacher_states)
        student = student_states[real].to(dtype)  # M×D
        teacher = teacher_states[real].to(dtype)
        total = self.per_position(student, teacher).sum()
        return per_token_mean(total, student.shape[0], num_counted)


@register_loss("hidden_mse")
class HiddenMSE(_HiddenStates):
    """FitNet hints on token sequences: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"
    (ICLR), averaged over real tokens only.

    ``Σ_{i real} mean_d (connector(h_s)_{i,d} − h_t,{i,d})² / count``: per real position (where
    the attention mask is 1) the squared error averaged over the D features, then averaged over
    the real positions (or divided by `num_counted`). With no padding it equals `FitNet`'s
    ``mean((s − t)²)``. Student and teacher states ``N×L×D`` (a linear connector maps the
    student's width to the teacher's), mask ``N×L``. No real position: 0 with a zero gradient.
    """

    def per_position(self, student: Tensor, teacher: Tensor) -> Tensor:
        return (student - teacher).pow(2).mean(dim=-1)


@register_loss("hidden_cosine")
class HiddenCosine(_HiddenStates):
    """Cosine distance of hidden states per token, as DistilBERT's cosine embedding loss: Sanh et
    al. 2019, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter".

    ``Σ_{i real} (1 − cos(connector(h_s)_i, h_t,i)) / count``, over the positions where the
    attention mask is 1 (or divided by `num_counted`). A zero vector has cosine 0 with anything.
    Student and teacher states ``N×L×D``, mask ``N×L``; in [0, 2].
    """

    def per_position(self, student: Tensor, teacher: Tensor) -> Tensor:
        return 1 - (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(dim=-1)
