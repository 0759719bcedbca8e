"""Dense-prediction distillation: segmentation maps (N×K×H×W) and detection head outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill._checks import check_ndim, check_non_negative, check_positive, check_same_shape
from kdistill.losses.base import STUDENT, TARGET, TEACHER, DistillLoss, register_loss
from kdistill.losses.logit import _check_ignore_index, kl_rows


def _check_maps(student: Tensor, teacher: Tensor, what: str) -> None:
    check_ndim(student, 4, f"student {what}")
    check_same_shape(student, teacher, f"student {what}", f"teacher {what}")


def counted_pixels(target: Tensor, maps: Tensor, ignore_index: int, what: str) -> Tensor:
    """N×H×W bool: the pixels of `target` (N×H×W labels, any integer dtype) that are not
    `ignore_index`, for `maps` N×C×H×W (the same N, H, W; refused otherwise)."""
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{what}: target must hold integer labels (N×H×W) for ignore_index={ignore_index}, "
            f"got dtype {target.dtype}"
        )
    expected = (maps.shape[0], *maps.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{what}: with ignore_index={ignore_index} the target must be N×H×W {expected}, "
            f"matching the maps {tuple(maps.shape)}; got {tuple(target.shape)} (tap a layer "
            "at the labels' resolution)"
        )
    return target != ignore_index


class _PixelMasked(DistillLoss):
    """A dense loss that, given `ignore_index`, also takes the target and leaves its void
    pixels out (its `needs` then include the target)."""

    def _set_ignore_index(self, ignore_index: int | None) -> None:
        self.ignore_index = _check_ignore_index(ignore_index)
        if self.ignore_index is not None:
            self.needs = (STUDENT, TEACHER, TARGET)  # this instance reads the labels


@register_loss("pixel_kd")
class PixelKD(_PixelMasked):
    """Pixel-wise distillation, as in Liu et al. 2019, "Structured Knowledge Distillation for
    Semantic Segmentation" (CVPR).

    ``T² · mean_{n,h,w} KL(p_t(n,:,h,w) ‖ p_s(n,:,h,w))`` with ``p = softmax(z/T)`` over the
    K classes of each pixel: KD applied to every pixel of `N×K×H×W` logits, averaged over the
    N·H·W pixels. The student side goes through `log_softmax`.

    With `ignore_index` (e.g. 255, VOC / Cityscapes void) the loss also takes the labels
    (N×H×W) and averages over the counted pixels only, those whose label is not `ignore_index`:
    ``T² · Σ_{counted} KL / #counted``; no counted pixel gives 0 with a zero gradient.
    """

    compares_classes = True

    needs = (STUDENT, TEACHER)

    def __init__(self, temperature: float = 1.0, ignore_index: int | None = None):
        super().__init__()
        check_positive(temperature, "temperature")
        self.temperature = float(temperature)
        self._set_ignore_index(ignore_index)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None
    ) -> Tensor:
        _check_maps(student_logits, teacher_logits, "logits")
        t = self.temperature
        # classes last: one row per pixel
        log_p_student = F.log_softmax(student_logits / t, dim=1).movedim(1, -1)
        log_p_teacher = F.log_softmax(teacher_logits / t, dim=1).movedim(1, -1)
        per_pixel = kl_rows(log_p_teacher, log_p_student)  # N×H×W
        if self.ignore_index is None:
            return per_pixel.mean() * t * t
        if target is None:
            raise ValueError(f"PixelKD(ignore_index={self.ignore_index}) needs the target")
        counted = counted_pixels(target, student_logits, self.ignore_index, "PixelKD")
        total = torch.where(counted, per_pixel, torch.zeros_like(per_pixel)).sum()
        return total / counted.sum().clamp(min=1) * t * t

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"


@register_loss("cwd")
class CWD(_PixelMasked):
    """Shu et al. 2021, "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV).

    Each channel's ``H·W`` map becomes a distribution over locations,
    ``φ(y)_{n,c,i} = softmax_i(y_{n,c,i} / τ)``, and
    ``τ² / (N·C) · Σ_{n,c} KL(φ(y_t)_{n,c} ‖ φ(y_s)_{n,c})``.

    Works on logits and on features (`N×C×H×W`); when the student has other channels than the
    teacher, the distiller puts a 1×1 convolution connector in front (`uses_connector`).

    With `ignore_index` (e.g. 255) the loss also takes the labels (N×H×W, the maps' H×W) and
    void locations are removed from both distributions: for sample n with counted locations
    V_n (label ≠ `ignore_index`), ``φ(y)_{n,c,i} = exp(y_{n,c,i}/τ) / Σ_{j ∈ V_n} exp(y_{n,c,j}/τ)``
    for i ∈ V_n (the softmax over V_n only, teacher and student alike) and the KL sums over
    V_n; the loss is ``τ² / (N'·C) · Σ_{n: V_n ≠ ∅} Σ_c KL``, N' the samples with at least one
    counted location. No counted location in the batch gives 0 with a zero gradient.
    """

    needs = (STUDENT, TEACHER)
    uses_connector = True

    def __init__(self, tau: float = 4.0, ignore_index: int | None = None):
        super().__init__()
        check_positive(tau, "tau")
        self.tau = float(tau)
        self._set_ignore_index(ignore_index)

    def forward(
        self, student_maps: Tensor, teacher_maps: Tensor, target: Tensor | None = None
    ) -> Tensor:
        _check_maps(student_maps, teacher_maps, "maps")
        tau = self.tau
        if self.ignore_index is None:
            # one row per (n, c): the H·W locations of that channel
            log_phi_student = F.log_softmax(student_maps.flatten(2) / tau, dim=2)
            log_phi_teacher = F.log_softmax(teacher_maps.flatten(2) / tau, dim=2)
            # mean over the N·C rows = Σ_{n,c} / (N·C)
            return kl_rows(log_phi_teacher, log_phi_student).mean() * tau * tau
        if target is None:
            raise ValueError(f"CWD(ignore_index={self.ignore_index}) needs the target")
        counted = counted_pixels(target, student_maps, self.ignore_index, "CWD")
        counted = counted.flatten(1).unsqueeze(1)  # N×1×HW, for every channel
        has_pixels = counted.any(dim=2)  # N×1: samples with a counted location
        log_phi_student = self._masked_log_softmax(student_maps.flatten(2) / tau, counted)
        log_phi_teacher = self._masked_log_softmax(teacher_maps.flatten(2) / tau, counted)
        phi_teacher = log_phi_teacher.exp()
        terms = phi_teacher * (log_phi_teacher - log_phi_student)  # finite everywhere
        kl = torch.where(counted, terms, torch.zeros_like(terms)).sum(dim=2)  # N×C
        rows = has_pixels.expand_as(kl)
        total = torch.where(rows, kl, torch.zeros_like(kl)).sum()
        return total / rows.sum().clamp(min=1) * tau * tau

    @staticmethod
    def _masked_log_softmax(scores: Tensor, counted: Tensor) -> Tensor:
        """log softmax over the counted locations of each row; 0 at void locations (read by no
        one, and finite, so that no inf or NaN reaches the gradient)."""
        has_pixels = counted.any(dim=2, keepdim=True)
        kept = scores.masked_fill(~counted, float("-inf"))
        kept = torch.where(has_pixels, kept, torch.zeros_like(scores))  # no all −inf row
        log_phi = scores - torch.logsumexp(kept, dim=2, keepdim=True)
        return torch.where(counted, log_phi, torch.zeros_like(log_phi))

    def extra_repr(self) -> str:
        return f"tau={self.tau}, ignore_index={self.ignore_index}"


@register_loss("det_logit_mse")
class DetLogitMSE(DistillLoss):
    """Squared error between YOLO-style raw detection head outputs, split by part.

    Inputs `…×(5+K)` laid out ``[x, y, w, h, obj, cls_1 … cls_K]`` (K ≥ 1), any leading shape
    (e.g. N×A×(5+K) or N×A×H×W×(5+K)); with ``e = (s − t)²``:
    ``box · mean(e[..., :4]) + obj · mean(e[..., 4]) + cls · mean(e[..., 5:])``,
    each mean over its own elements, so each part weighs the same whatever K is. Logit matching
    as in Ba & Caruana 2014, applied per part of the detection head.
    """

    compares_classes = True

    needs = (STUDENT, TEACHER)

    def __init__(self, box: float = 1.0, obj: float = 1.0, cls: float = 1.0):
        super().__init__()
        check_non_negative(box, "box")
        check_non_negative(obj, "obj")
        check_non_negative(cls, "cls")
        self.box, self.obj, self.cls = float(box), float(obj), float(cls)

    def forward(self, student_outputs: Tensor, teacher_outputs: Tensor) -> Tensor:
        check_same_shape(student_outputs, teacher_outputs, "student outputs", "teacher outputs")
        if student_outputs.dim() < 1 or student_outputs.shape[-1] < 6:
            raise ValueError(
                "detection outputs must end in a dimension of 5 + K >= 6 "
                f"([x, y, w, h, obj, classes…]), got shape {tuple(student_outputs.shape)}"
            )
        squared = (student_outputs - teacher_outputs).pow(2)
        return (
            self.box * squared[..., :4].mean()
            + self.obj * squared[..., 4].mean()
            + self.cls * squared[..., 5:].mean()
        )

    def extra_repr(self) -> str:
        return f"box={self.box}, obj={self.obj}, cls={self.cls}"
