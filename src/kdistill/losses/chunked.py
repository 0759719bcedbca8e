"""Chunked vocabulary loss: the token losses of `kdistill.losses.token` computed from the
student's last hidden states and its linear output head, a chunk of tokens at a time, so that
the ``N×L×V`` logits never exist.

A causal LM's logits are ``z = h·Wᵀ + b`` (h: the last hidden states ``N×L×D``, W: the head's
``V×D`` weight, b: an optional bias of V). The dense loss builds all ``N×L×V`` logits of the
student (and keeps them, plus their softmax, for backward), and takes the teacher's as another
``N×L×V`` tensor: at V = 150 k and 8 k tokens, 4.8 GB of float32 per copy. Here only the M
counted positions are used (as the dense loss does), ``chunk_size`` of them at a time:

- **forward**: per chunk, the student's logits ``h_c·Wᵀ + b``, the teacher's (rows of its dense
  logits, or its own hidden states and head, without gradients), the divergence summed over the
  chunk; the chunk's logits are then dropped. Nothing of size V per token is kept.
- **backward**: the same chunks again — each chunk's logits are *recomputed*, the gradient with
  respect to them taken by autograd through the loss's own formula, and turned into the
  gradients of the hidden states (``g·W``), of the weight (``gᵀ·h``, summed over the chunks) and
  of the bias (``Σ g``). Peak memory beyond the inputs: a few ``chunk_size×V`` tensors.

The values and gradients are those of the dense loss of `kdistill.losses.token` (same shift,
``ignore_index``, T² scaling, per-counted-token normalisation, ``num_counted``, ``vocab_size``
slicing of padded heads, attention-mask check, nothing counted → 0 with a zero gradient), for
every `TokenDivergence` (through its ``divergence(log_p_student, log_p_teacher)`` on the chunk's
rows) and for `TokenCE`. The cost is one more head matrix product per chunk than the dense loss
(the recomputation), against a memory of ``chunk_size×V`` instead of ``N·L×V``; the same idea as
the "fused linear cross-entropy" kernels of LLM trainers, written in plain PyTorch (no Triton:
it runs on the CPU).

Precision: the head's matrix product runs in the promoted dtype of the hidden states and the
weight (a bf16 head multiplies in bf16, as the model itself would), the logits of each chunk are
cast to float32 (float64 stays float64) before the softmax, as the dense loss casts them;
gradients of the weight and bias are summed over the chunks in that float32 (or float64).

`HeadInput` carries (hidden states, head weight, head bias) of one side; the `Distiller` builds
it for a `ChunkedTokenLoss` term by capturing the input of the model's head module during the
forward (`kdistill.taps.HeadCapture`), the head itself then not running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill._checks import check_positive_int
from kdistill.losses.base import STUDENT, TARGET, TEACHER, DistillLoss, create_loss, register_loss
from kdistill.losses.token import (
    Count,
    TokenCE,
    TokenDivergence,
    _log_probs,
    as_sequences,
    check_real_positions,
    check_token_range,
    compared_vocab,
    compute_dtype,
    next_token_labels,
    per_token_mean,
)
from kdistill.losses.topk import TopKDistribution, bucket_log_probs

__all__ = ["ChunkedTokenCE", "ChunkedTokenLoss", "HeadInput", "chunked_token_loss"]


@dataclass(frozen=True)
class HeadInput:
    """One side of a chunked loss: the input of a linear output head and the head's parameters,
    whose logits would be ``hidden @ weight.T + bias``.

    `hidden`: ``N×L×D`` (or ``N×D`` with labels ``N``); `weight`: ``V×D``; `bias`: ``V`` or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def of(cls, hidden: Tensor, head: nn.Module) -> HeadInput:
        """`hidden` with the ``weight`` / ``bias`` of `head` (an ``nn.Linear`` or alike)."""
        return cls(hidden, head.weight, getattr(head, "bias", None))

    def check(self, what: str) -> None:
        """TypeError / ValueError naming `what` for a weight that is not ``V×D`` with the hidden
        states' D, or a bias that is not ``V``."""
        weight, bias, hidden = self.weight, self.bias, self.hidden
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"{what} head weight must be a floating-point V×D matrix, got {got}")
        if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
            kind = hidden.dtype if isinstance(hidden, Tensor) else type(hidden).__name__
            raise TypeError(f"{what} hidden states must be a floating-point tensor, got {kind}")
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{what} hidden states {tuple(hidden.shape)} have D = {hidden.shape[-1]} but "
                f"the head weight {tuple(weight.shape)} (V×D) expects D = {weight.shape[1]}: "
                "pass the input of the output head (the last hidden states, after the final norm)"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{what} head bias must have shape ({weight.shape[0]},) (V of the weight "
                f"{tuple(weight.shape)}), got {tuple(bias.shape)}"
            )


Teacher = Tensor | HeadInput | TopKDistribution


def _head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype) -> Tensor:
    """``hidden @ weight.T + bias`` in the promoted dtype of the inputs, cast to `dtype`."""
    matmul = torch.promote_types(hidden.dtype, weight.dtype)
    z = hidden.to(matmul) @ weight.to(matmul).T
    if bias is not None:
        z = z + bias.to(matmul)
    return z.to(dtype)


class _Plan:
    """What one chunk's value needs besides the student's logits: the teacher's rows (dense
    logits at positions, or hidden states through its head) and the labels (CE)."""

    def __init__(
        self,
        value: Callable[[Tensor, Tensor | None, Tensor | None], Tensor],
        vocab: int,
        dtype: torch.dtype,
        chunk_size: int,
        teacher_logits: Tensor | None = None,
        positions: tuple[Tensor, Tensor] | None = None,
        teacher_head: HeadInput | None = None,
        targets: Tensor | None = None,
        teacher_topk: tuple[Tensor, Tensor] | None = None,
        recompute: bool = True,
    ):
        self.value = value
        self.recompute = recompute
        self.grad_enabled = True
        self.vocab = vocab
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.teacher_logits = teacher_logits  # N×L×V (no grad), read at `positions`
        self.positions = positions  # (sample, position) of the M counted rows
        self.teacher_head = teacher_head  # hidden M×D_t (counted rows) + weight / bias
        self.targets = targets  # M labels (CE)
        self.teacher_topk = teacher_topk  # M×k ids and (k + 1) buckets at the loss's T

    @torch.no_grad()
    def teacher_rows(self, start: int, stop: int) -> Tensor | tuple[Tensor, Tensor] | None:
        if self.teacher_topk is not None:  # (ids, buckets) of the chunk's rows
            ids, buckets = self.teacher_topk
            return ids[start:stop], buckets[start:stop]
        if self.teacher_logits is not None:
            assert self.positions is not None
            n, i = self.positions[0][start:stop], self.positions[1][start:stop]
            return self.teacher_logits[n, i, : self.vocab].to(self.dtype)
        if self.teacher_head is not None:
            head = self.teacher_head
            weight = head.weight[: self.vocab]
            bias = None if head.bias is None else head.bias[: self.vocab]
            return _head_logits(head.hidden[start:stop], weight, bias, self.dtype)
        return None

    def chunk(self, student_logits: Tensor, start: int, stop: int) -> Tensor:
        targets = None if self.targets is None else self.targets[start:stop]
        return self.value(student_logits, self.teacher_rows(start, stop), targets)


def _chunk_gradients(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: _Plan,
    needs: tuple[bool, bool, bool],
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(Σ of the plan's value, d/d hidden, d/d weight, d/d bias), chunk by chunk: each chunk's
    logits, the gradient with respect to them by autograd through the plan's value, then the
    head's three gradients by hand (``g·W``, ``gᵀ·h``, ``Σ g``), times `scale` when given."""
    vocab, size, dtype = plan.vocab, plan.chunk_size, plan.dtype
    need_h, need_w, need_b = needs
    w = weight[:vocab]
    b = None if bias is None else bias[:vocab]
    matmul = torch.promote_types(hidden.dtype, weight.dtype)
    w_mm = w.to(matmul)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = weight.new_zeros(weight.shape, dtype=dtype) if need_w else None
    grad_b = bias.new_zeros(bias.shape, dtype=dtype) if need_b and bias is not None else None
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], size):
        stop = min(start + size, hidden.shape[0])
        h = hidden[start:stop].to(matmul)
        with torch.enable_grad():
            z = _head_logits(h, w_mm, b, dtype).detach().requires_grad_(True)
            value = plan.chunk(z, start, stop)
            (g,) = torch.autograd.grad(value, z)
        total += value.detach()
        if scale is not None:
            g = g * scale.to(dtype)  # chunk×V, d total / d logits
        if grad_h is not None:
            grad_h[start:stop] = (g.to(matmul) @ w_mm).to(hidden.dtype)
        if grad_w is not None:
            grad_w[:vocab] += (g.T.to(matmul) @ h).to(dtype)
        if grad_b is not None:
            grad_b[:vocab] += g.sum(dim=0)
        del z, g
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        assert bias is not None
        grad_b = grad_b.to(bias.dtype)
    return total, grad_h, grad_w, grad_b


class _ChunkedHead(torch.autograd.Function):
    """Σ over the M rows of `hidden` of the plan's value at the logits ``hidden·Wᵀ + b``
    (``W = weight[:vocab]``), chunk by chunk. With ``plan.recompute`` the forward keeps no
    logits and backward recomputes each chunk's; without, the forward computes the gradients
    too (chunk by chunk) and backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> Tensor:
        ctx.plan = plan
        ctx.has_bias = bias is not None
        needs = tuple(ctx.needs_input_grad[:3])
        if not plan.recompute and plan.grad_enabled and any(needs):
            total, *grads = _chunk_gradients(hidden, weight, bias, plan, needs)
            ctx.grads = grads
            return total
        ctx.grads = None
        vocab, size = plan.vocab, plan.chunk_size
        w = weight[:vocab]
        b = None if bias is None else bias[:vocab]
        total = torch.zeros((), dtype=plan.dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], size):
            stop = min(start + size, hidden.shape[0])
            z = _head_logits(hidden[start:stop], w, b, plan.dtype)
            total += plan.chunk(z, start, stop)
            del z
        ctx.save_for_backward(hidden, weight, *(() if bias is None else (bias,)))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        if ctx.grads is not None:  # computed in forward: d total / d input × grad_total
            scaled = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads]
            return (*scaled, None)
        hidden, weight, *rest = ctx.saved_tensors
        bias = rest[0] if ctx.has_bias else None
        needs = tuple(ctx.needs_input_grad[:3])
        _, grad_h, grad_w, grad_b = _chunk_gradients(
            hidden, weight, bias, ctx.plan, needs, grad_total
        )
        return grad_h, grad_w, grad_b, None


def _as_inner(loss: str | nn.Module, params: dict) -> TokenDivergence | TokenCE:
    if isinstance(loss, str):
        loss = create_loss(loss, **params)
    elif params:
        raise ValueError(
            f"ChunkedTokenLoss got a loss object ({type(loss).__name__}) and parameters "
            f"{sorted(params)}; set them on the loss itself, or give the loss by name"
        )
    if not isinstance(loss, TokenDivergence | TokenCE):
        raise ValueError(
            f"a chunked loss computes a token divergence (forward_kl, reverse_kl, jsd, "
            f"skew_forward_kl, skew_reverse_kl, tvd) or token_ce, got {type(loss).__name__}"
        )
    return loss


def _divergence_value(loss: TokenDivergence):
    t = loss.temperature

    def value(student: Tensor, teacher, _targets) -> Tensor:
        if isinstance(teacher, tuple):  # a stored top-k teacher: the (k + 1) buckets
            ids, buckets = teacher
            log_p_student = bucket_log_probs(_log_probs(student, t), ids)
            return loss.divergence(log_p_student, buckets).sum() * (t * t)
        return loss.divergence(_log_probs(student, t), _log_probs(teacher, t)).sum() * (t * t)

    return value


def _ce_value(student: Tensor, _teacher, targets: Tensor | None) -> Tensor:
    assert targets is not None
    return F.cross_entropy(student, targets, reduction="sum")


def chunked_token_loss(
    loss: TokenDivergence | TokenCE,
    student: HeadInput,
    labels: Tensor,
    teacher: Teacher | None = None,
    *,
    chunk_size: int = 1024,
    num_counted: Count = None,
    attention_mask: Tensor | None = None,
    recompute: bool = True,
) -> Tensor:
    """The value of `loss` (a `TokenDivergence` or `TokenCE`, with its temperature, shift,
    ``ignore_index`` and ``vocab_size``) at the logits ``student.hidden @ student.weight.T +
    student.bias``, without building them: chunks of `chunk_size` counted positions, recomputed
    in backward (module docstring). Gradients flow to the student's hidden states, weight and
    bias.

    `student.hidden`: ``N×L×D`` with `labels` ``N×L`` (or ``N×D`` with ``N``, shift=False).
    `teacher` (divergences only): its dense logits ``N×L×V`` (no gradient), or a `HeadInput`
    (hidden ``N×L×D_t``, weight ``V×D_t``, bias) whose logits are made per chunk without
    gradients. `num_counted`, `attention_mask`: as `kdistill.losses.token`. Returns a 0-dim
    tensor in nats per counted token (× T² for divergences), float32 (float64 for float64
    inputs). Raises ValueError for shapes that do not fit, naming both.

    `recompute` (default True): backward recomputes each chunk's logits (the forward keeps
    nothing of size V). False: the forward also computes the gradients, chunk by chunk, and
    keeps them (``M×D`` + ``V×D`` in float32) until backward — one head product and one pass
    of the loss's formula less per chunk, the same values and gradients.
    """
    check_positive_int(chunk_size, "chunk_size")
    student.check("student")
    hidden, rows = as_sequences(student.hidden, labels, loss.shift, "student hidden states")
    inputs = [hidden, student.weight]
    teacher_logits = teacher_head = teacher_topk = None
    if isinstance(loss, TokenCE):
        if teacher is not None:
            raise ValueError("token_ce reads no teacher; call it without one")
        vocab = student.vocab if loss.vocab_size is None else loss.vocab_size
        if vocab > student.vocab:
            raise ValueError(
                f"vocab_size={vocab} exceeds the student head's vocabulary ({student.vocab}, "
                f"weight {tuple(student.weight.shape)}); set it to the tokenizer's size"
            )
    elif isinstance(teacher, HeadInput):
        teacher.check("teacher")
        teacher_head, _ = as_sequences(teacher.hidden, labels, loss.shift, "teacher hidden states")
        vocab = compared_vocab(student.vocab, teacher.vocab, loss.vocab_size)
        inputs += [teacher.hidden, teacher.weight]
    elif isinstance(teacher, TopKDistribution):
        teacher_topk = teacher.unsqueeze(1) if teacher.ids.dim() == 2 else teacher
        if teacher_topk.shape != hidden.shape[:-1]:
            raise ValueError(
                f"the teacher's top-k distributions cover positions of shape "
                f"{tuple(teacher_topk.shape)} but the student hidden states "
                f"{tuple(student.hidden.shape)}; they must be of the same sequences"
            )
        if teacher.vocab_size != (loss.vocab_size or student.vocab):
            raise ValueError(
                f"the teacher's stored distributions are over {teacher.vocab_size} tokens, the "
                f"student head has {student.vocab} rows (vocab_size={loss.vocab_size}); store "
                "them over the compared vocabulary, or set vocab_size=<tokenizer size>"
            )
        vocab = compared_vocab(student.vocab, teacher.vocab_size, loss.vocab_size)
        inputs.append(teacher.log_probs)
    elif isinstance(teacher, Tensor):
        teacher_logits, _ = as_sequences(teacher, labels, loss.shift, "teacher logits")
        vocab = compared_vocab(student.vocab, teacher_logits.shape[-1], loss.vocab_size)
        inputs.append(teacher_logits)
    else:
        raise ValueError(
            f"{type(loss).__name__} needs the teacher: its dense logits N×L×V, a HeadInput "
            f"(hidden states + head) or a TopKDistribution, got {type(teacher).__name__}"
        )
    check_token_range(rows, vocab, loss.ignore_index, loss.vocab_size)
    aligned = next_token_labels(rows, loss.shift, loss.ignore_index)
    counted = aligned != loss.ignore_index
    if labels.dim() == 2:  # token sequences (N×V logits have no padding positions)
        check_real_positions(counted, attention_mask, loss.shift)
    dtype = compute_dtype(*inputs)
    if isinstance(loss, TokenCE):
        plan = _Plan(_ce_value, vocab, dtype, chunk_size, targets=aligned[counted])
    else:
        value = _divergence_value(loss)
        if teacher_topk is not None:
            chosen = teacher_topk.rows(counted).at_temperature(loss.temperature)
            if (
                chosen.ids.numel()
                and not 0 <= int(chosen.ids.min()) <= int(chosen.ids.max()) < vocab
            ):
                raise ValueError(
                    f"the teacher's stored top-k token ids must lie in [0, {vocab}), got "
                    f"[{int(chosen.ids.min())}, {int(chosen.ids.max())}]"
                )
            buckets = chosen.buckets(dtype)  # M×(k+1), made once
            plan = _Plan(value, vocab, dtype, chunk_size, teacher_topk=(chosen.ids, buckets))
        elif teacher_head is not None:
            assert isinstance(teacher, HeadInput)
            rows_t = HeadInput(teacher_head[counted], teacher.weight, teacher.bias)
            plan = _Plan(value, vocab, dtype, chunk_size, teacher_head=rows_t)
        else:
            positions = tuple(counted.nonzero().unbind(dim=1))
            plan = _Plan(value, vocab, dtype, chunk_size, teacher_logits, positions)  # type: ignore[arg-type]
    plan.recompute = bool(recompute)
    plan.grad_enabled = torch.is_grad_enabled()  # no gradients made in forward under no_grad
    total = _ChunkedHead.apply(hidden[counted], student.weight, student.bias, plan)
    return per_token_mean(total, int(counted.sum()), num_counted)


@register_loss("chunked")
class ChunkedTokenLoss(DistillLoss):
    """A token loss (a divergence of `kdistill.losses.token` or `TokenCE`) computed from the
    last hidden states and the linear output head, in chunks of tokens, never building the
    ``N×L×V`` logits; recomputed in backward. The technique of the fused linear cross-entropy
    of Liger Kernel (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM
    Training"), here for every divergence, in plain PyTorch; the divergences' papers are those
    of the wrapped loss (Hinton et al. 2015, Gu et al. 2024, Agarwal et al. 2024, Ko et al. 2024,
    Wen et al. 2023).

    ``ChunkedTokenLoss("jsd", beta=0.1, temperature=2.0, chunk_size=1024)`` (or a loss object:
    ``ChunkedTokenLoss(ForwardKL(temperature=2))``). Value and gradients equal the wrapped
    loss's on the full logits, to float tolerance.

    In a `Distiller`, `Term(ChunkedTokenLoss(...))` reads the student's output head named
    `student_head` (default ``"lm_head"``, as `named_modules()` spells it): during the student's
    forward that module does not run; its input (the last hidden states) is captured, and the
    model's output must be exactly what the head returned (`Term.output`, e.g. ``"logits"``) —
    a model that changes its logits after the head (softcapping, scaling) is refused, since a
    loss from the head's input would silently differ. `teacher_head` (default ``"lm_head"``)
    does the same for the teacher (its logits are then made per chunk too); ``None`` takes the
    teacher's dense output. Teacher outputs from a cache are read as dense logits.

    `recompute` (default True, as above): False computes the gradients during the forward
    instead (`chunked_token_loss`): faster, the same values.

    `forward(student, teacher, labels)` for divergences, `forward(student, labels)` for
    `TokenCE` (``needs`` follows the wrapped loss): `student` a `HeadInput`; `teacher` dense
    logits ``N×L×V`` or a `HeadInput`; plus `num_counted` and `attention_mask` as the token
    losses. Raises ValueError for a wrapped loss that is not a token loss and for shapes that do
    not fit.
    """

    needs = (STUDENT, TEACHER, TARGET)  # (STUDENT, TARGET) for a wrapped TokenCE
    # the Distiller hands it the input of the model's head (`student_head`, `teacher_head`)
    reads_head: ClassVar[bool] = True
    counts_tokens = True
    class_dim = -1
    count_from = TARGET

    def __init__(
        self,
        loss: str | nn.Module = "forward_kl",
        chunk_size: int = 1024,
        student_head: str = "lm_head",
        teacher_head: str | None = "lm_head",
        recompute: bool = True,
        **params,
    ):
        super().__init__()
        check_positive_int(chunk_size, "chunk_size")
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute must be True or False, got {recompute!r}")
        self.recompute = recompute
        self.inner = _as_inner(loss, params)
        self.chunk_size = chunk_size
        if not isinstance(student_head, str) or not student_head:
            raise ValueError(f"student_head must be a module name, got {student_head!r}")
        if teacher_head is not None and (not isinstance(teacher_head, str) or not teacher_head):
            raise ValueError(f"teacher_head must be a module name or None, got {teacher_head!r}")
        self.student_head = student_head
        is_ce = isinstance(self.inner, TokenCE)
        self.teacher_head = None if is_ce else teacher_head
        self.needs = (STUDENT, TARGET) if is_ce else (STUDENT, TEACHER, TARGET)
        self.compares_classes = not is_ce

    @property
    def vocab_size(self) -> int | None:
        return self.inner.vocab_size

    @property
    def ignore_index(self) -> int:
        return self.inner.ignore_index

    def count(self, labels: Tensor) -> Tensor:
        """The number of counted positions of `labels`, as the wrapped loss counts them."""
        return self.inner.count(labels)

    def forward(
        self,
        student: HeadInput,
        *rest: Tensor | HeadInput,
        num_counted: Count = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        if not isinstance(student, HeadInput):
            raise TypeError(
                f"a chunked loss takes the student as a HeadInput (hidden states + head), got "
                f"{type(student).__name__}; in a Distiller the term captures the input of "
                f"{self.student_head!r} (ChunkedTokenLoss(student_head=...))"
            )
        expected = len(self.needs) - 1
        if len(rest) != expected:
            form = "(student, labels)" if expected == 1 else "(student, teacher, labels)"
            raise TypeError(f"{type(self.inner).__name__}: a chunked loss is called as {form}")
        teacher = rest[0] if expected == 2 else None
        labels = rest[-1]
        assert isinstance(labels, Tensor)
        return chunked_token_loss(
            self.inner,
            student,
            labels,
            teacher,
            chunk_size=self.chunk_size,
            num_counted=num_counted,
            attention_mask=attention_mask,
            recompute=self.recompute,
        )

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, student_head={self.student_head!r}, "
            f"teacher_head={self.teacher_head!r}, recompute={self.recompute}"
        )


@register_loss("chunked_token_ce")
class ChunkedTokenCE(ChunkedTokenLoss):
    """`TokenCE` (the next-token cross-entropy, Hugging Face's causal-LM loss) computed chunk
    by chunk from the hidden states and the output head: ``ChunkedTokenLoss("token_ce", ...)``
    under its own name, for a recipe's ``hard_loss: chunked_token_ce`` next to chunked
    divergences (a dense hard loss would read the logits, which a chunked term never builds).
    """

    needs = (STUDENT, TARGET)

    def __init__(
        self,
        chunk_size: int = 1024,
        student_head: str = "lm_head",
        recompute: bool = True,
        shift: bool = True,
        ignore_index: int = -100,
        vocab_size: int | None = None,
    ):
        super().__init__(
            TokenCE(shift=shift, ignore_index=ignore_index, vocab_size=vocab_size),
            chunk_size=chunk_size,
            student_head=student_head,
            recompute=recompute,
        )
