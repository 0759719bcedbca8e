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


def _check_target(target: Tensor, num_classes: int) -> None:
    if target.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"target must hold integer class labels, got dtype {target.dtype}")
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(
            f"target labels must lie in [0, {num_classes - 1}], "
            f"got min {int(target.min())} and max {int(target.max())}"
        )


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


@register_loss("ce")
class CE(DistillLoss):
    """Cross-entropy with the labels: ``mean_n −log softmax(z_s)[n, y_n]`` (may be smoothed)."""

    needs = (STUDENT, TARGET)

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_logits: Tensor, target: Tensor) -> Tensor:
        if student_logits.dim() < 2:
            raise ValueError(
                f"student logits must be N×K (or N×K×…), got shape {tuple(student_logits.shape)}"
            )
        _check_target(target, student_logits.shape[1])
        return F.cross_entropy(student_logits, target, label_smoothing=self.label_smoothing)


@register_loss("dkd")
class DKD(DistillLoss):
    """Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR).

    ``α·TCKD + β·NCKD`` where, with p = softmax(z/T):

    - TCKD = T² · mean_n KL(b_t ‖ b_s), b = [p_target, 1 − p_target] (binary target / rest masses);
    - NCKD = T² · mean_n KL(p̂_t ‖ p̂_s), p̂ = softmax over the non-target classes only.

    The warm-up of the paper (weight ramped over the first epochs) is the engine's job:
    ``Term(DKD(), warmup_epochs=20)``.
    """

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
        _check_target(target, num_classes)
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

    needs = (STUDENT, TEACHER)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        check_same_shape(student_logits, teacher_logits, "student logits", "teacher logits")
        return (student_logits - teacher_logits).pow(2).mean()
