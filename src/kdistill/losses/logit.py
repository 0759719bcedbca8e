"""Logit distillation: losses on the student's and the teacher's class scores (N×K)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill._checks import check_ndim, check_non_negative, check_positive, check_same_shape
from kdistill.losses.base import STUDENT, TARGET, TEACHER, DistillLoss, register_loss


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    check_ndim(student_logits, 2, "student logits")
    check_same_shape(student_logits, teacher_logits, "student logits", "teacher logits")


def class_indices(
    target: Tensor, logits: Tensor, ignore_index: int | None = None, what: str = "target"
) -> Tensor:
    """`target` as int64 class indices of `logits` (N×K or N×K×d₁×…), after checking it.

    Any integer dtype is accepted and converted exactly (int32 labels from numpy, uint8 masks);
    floating-point, complex or bool labels are refused with a message, as is a shape other than
    the logits' without dimension 1, and a label outside [0, K) other than `ignore_index`.
    """
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{what} must hold integer class indices, got dtype {target.dtype} (shape "
            f"{tuple(target.shape)}); labels that are whole numbers convert with target.long(), "
            "class probabilities are not class indices (use a soft loss such as KD)"
        )
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{what} must have shape {expected} (the logits' {tuple(logits.shape)} without the "
            f"class dimension 1), got {tuple(target.shape)}"
        )
    target = target.long()  # exact for every integer dtype torch has
    num_classes = logits.shape[1]
    counted = target if ignore_index is None else target[target != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= num_classes):
        also = f" or be ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"{what} labels must lie in [0, {num_classes - 1}]{also}, got min "
            f"{int(counted.min())} and max {int(counted.max())}"
        )
    return target


def _check_ignore_index(ignore_index: int | None) -> int | None:
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    return ignore_index


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_k p (log p − log q) per row, from log-probabilities (p = 0 terms count 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


@register_loss("kd")
class KD(DistillLoss):
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    ``T² · mean_n KL(softmax(z_t/T) ‖ softmax(z_s/T))``. The T² keeps gradient size comparable
    across temperatures. Both sides go through `log_softmax` (never a plain softmax into KLDivLoss).
    """

    compares_classes = True

    needs = (STUDENT, TEACHER)

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        check_positive(temperature, "temperature")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        _check_logits(student_logits, teacher_logits)
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
        return kl_rows(log_p_teacher, log_p_student).mean() * t * t

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register_loss("hard_kd")
class HardKD(DistillLoss):
    """Hard-label distillation (Touvron et al. 2021, "Training data-efficient image transformers
    & distillation through attention", ICML, §5.2): cross-entropy with the teacher's decision
    as the label, ``mean_n −log softmax(z_s)[n, argmax_k z_t[n, k]]`` — the teacher's *hard
    pseudo-labels*, the control that says what the softness of `KD`'s targets adds.

    Ties in the teacher's logits go to the lowest class index (`torch.argmax`). No gradient
    flows into the teacher side (argmax is piecewise constant).
    """

    compares_classes = True

    needs = (STUDENT, TEACHER)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        _check_logits(student_logits, teacher_logits)
        pseudo_labels = teacher_logits.detach().argmax(dim=1)
        return F.cross_entropy(student_logits, pseudo_labels)


@register_loss("ce")
class CE(DistillLoss):
    """Cross-entropy with the labels: ``Σ_{n ∈ C} −log softmax(z_s)[n, y_n] / |C|`` (may be
    smoothed), C the samples (or pixels, for N×K×H×W logits and N×H×W labels) whose label is not
    `ignore_index`.

    `ignore_index` (default −100, as in PyTorch; None: every label must be a class) marks void
    labels: 255 for the void pixels of VOC / Cityscapes masks, −100 for padding tokens. A batch
    whose labels are all void gives 0 with a zero gradient (PyTorch's mean gives NaN).
    Labels of any integer dtype are accepted (converted exactly to int64).
    """

    needs = (STUDENT, TARGET)

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int | None = -100):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = _check_ignore_index(ignore_index)

    def forward(self, student_logits: Tensor, target: Tensor) -> Tensor:
        if student_logits.dim() < 2:
            raise ValueError(
                f"student logits must be N×K (or N×K×…), got shape {tuple(student_logits.shape)}"
            )
        target = class_indices(target, student_logits, self.ignore_index)
        if self.ignore_index is None:
            return F.cross_entropy(student_logits, target, label_smoothing=self.label_smoothing)
        per_item = F.cross_entropy(
            student_logits,
            target,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="none",
        )  # 0 at void labels
        counted = (target != self.ignore_index).sum()
        return per_item.sum() / counted.clamp(min=1)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}"


@register_loss("dkd")
class DKD(DistillLoss):
    """Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR).

    ``α·TCKD + β·NCKD`` where, with p = softmax(z/T):

    - TCKD = T² · mean_n KL(b_t ‖ b_s), b = [p_target, 1 − p_target] (binary target / rest masses);
    - NCKD = T² · mean_n KL(p̂_t ‖ p̂_s), p̂ = softmax over the non-target classes only.

    The warm-up of the paper (weight ramped over the first epochs) is the engine's job:
    ``Term(DKD(), warmup_epochs=20)``.
    """

    compares_classes = True

    needs = (STUDENT, TEACHER, TARGET)

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
        super().__init__()
        check_non_negative(alpha, "alpha")
        check_non_negative(beta, "beta")
        check_positive(temperature, "temperature")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    def tckd_nckd(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The two parts, each already multiplied by T²."""
        _check_logits(student_logits, teacher_logits)
        num_classes = student_logits.shape[1]
        if num_classes < 3:
            raise ValueError(f"DKD needs at least 3 classes, got {num_classes}")
        target = class_indices(target, student_logits)
        t = self.temperature
        is_target = F.one_hot(target, num_classes).bool()

        def binary_log_masses(logits: Tensor) -> Tensor:
            log_p = F.log_softmax(logits / t, dim=1)
            log_p_target = log_p.masked_select(is_target).unsqueeze(1)  # N×1
            log_p_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1)
            return torch.cat([log_p_target, log_p_rest.unsqueeze(1)], dim=1)  # N×2

        def non_target_log_softmax(logits: Tensor) -> Tensor:
            kept = logits.masked_select(~is_target).view(-1, num_classes - 1)
            return F.log_softmax(kept / t, dim=1)

        tckd = kl_rows(binary_log_masses(teacher_logits), binary_log_masses(student_logits))
        nckd = kl_rows(
            non_target_log_softmax(teacher_logits), non_target_log_softmax(student_logits)
        )
        return tckd.mean() * t * t, nckd.mean() * t * t

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        tckd, nckd = self.tckd_nckd(student_logits, teacher_logits, target)
        return self.alpha * tckd + self.beta * nckd

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`.

    A row with zero spread (constant) has no defined correlation; it counts as ρ = 0 with a zero
    (finite) gradient. No ε is added to the denominator: that would pull the correlation of
    low-spread rows (classes rare in a batch) towards 0 and break the formula.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    squares = (a * a).sum(dim=1) * (b * b).sum(dim=1)
    defined = squares > 0
    safe = torch.where(defined, squares, torch.ones_like(squares))
    return torch.where(defined, (a * b).sum(dim=1) / safe.sqrt(), torch.zeros_like(squares))


@register_loss("dist")
class DIST(DistillLoss):
    """Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher" (NeurIPS).

    With p = softmax(z/T) and ρ the Pearson correlation:
    ``T² · (β·(1 − mean_n ρ(p_s[n,:], p_t[n,:])) + γ·(1 − mean_k ρ(p_s[:,k], p_t[:,k])))`` —
    inter-class relations per sample (β) and intra-class relations across the batch (γ).
    """

    compares_classes = True

    needs = (STUDENT, TEACHER)

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        check_non_negative(beta, "beta")
        check_non_negative(gamma, "gamma")
        check_positive(temperature, "temperature")
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        _check_logits(student_logits, teacher_logits)
        t = self.temperature
        p_student = F.softmax(student_logits / t, dim=1)
        p_teacher = F.softmax(teacher_logits / t, dim=1)
        inter = 1 - pearson_rows(p_student, p_teacher).mean()
        intra = 1 - pearson_rows(p_student.T, p_teacher.T).mean()
        return t * t * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"


@register_loss("logit_mse")
class LogitMSE(DistillLoss):
    """Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?": ``mean((z_s − z_t)²)``."""

    compares_classes = True

    needs = (STUDENT, TEACHER)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        check_same_shape(student_logits, teacher_logits, "student logits", "teacher logits")
        return (student_logits - teacher_logits).pow(2).mean()
