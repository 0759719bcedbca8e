"""Dense-prediction distillation: segmentation maps (N×K×H×W) and detection head outputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdistill._checks import check_ndim, check_non_negative, check_positive, check_same_shape
from kdistill.losses.base import STUDENT, TEACHER, DistillLoss, register_loss
from kdistill.losses.logit import kl_rows


def _check_maps(student: Tensor, teacher: Tensor, what: str) -> None:
    check_ndim(student, 4, f"student {what}")
    check_same_shape(student, teacher, f"student {what}", f"teacher {what}")


@register_loss("pixel_kd")
class PixelKD(DistillLoss):
    """Pixel-wise distillation, as in Liu et al. 2019, "Structured Knowledge Distillation for
    Semantic Segmentation" (CVPR).

    ``T² · mean_{n,h,w} KL(p_t(n,:,h,w) ‖ p_s(n,:,h,w))`` with ``p = softmax(z/T)`` over the
    K classes of each pixel: KD applied to every pixel of `N×K×H×W` logits, averaged over the
    N·H·W pixels. The student side goes through `log_softmax`.
    """

    needs = (STUDENT, TEACHER)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        check_positive(temperature, "temperature")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        _check_maps(student_logits, teacher_logits, "logits")
        t = self.temperature
        # classes last: one row per pixel
        log_p_student = F.log_softmax(student_logits / t, dim=1).movedim(1, -1)
        log_p_teacher = F.log_softmax(teacher_logits / t, dim=1).movedim(1, -1)
        return kl_rows(log_p_teacher, log_p_student).mean() * t * t

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register_loss("cwd")
class CWD(DistillLoss):
    """Shu et al. 2021, "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV).

    Each channel's ``H·W`` map becomes a distribution over locations,
    ``φ(y)_{n,c,i} = softmax_i(y_{n,c,i} / τ)``, and
    ``τ² / (N·C) · Σ_{n,c} KL(φ(y_t)_{n,c} ‖ φ(y_s)_{n,c})``.

    Works on logits and on features (`N×C×H×W`); when the student has other channels than the
    teacher, the distiller puts a 1×1 convolution connector in front (`uses_connector`).
    """

    needs = (STUDENT, TEACHER)
    uses_connector = True

    def __init__(self, tau: float = 4.0):
        super().__init__()
        check_positive(tau, "tau")
        self.tau = float(tau)

    def forward(self, student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
        _check_maps(student_maps, teacher_maps, "maps")
        tau = self.tau
        # one row per (n, c): the H·W locations of that channel
        log_phi_student = F.log_softmax(student_maps.flatten(2) / tau, dim=2)
        log_phi_teacher = F.log_softmax(teacher_maps.flatten(2) / tau, dim=2)
        # mean over the N·C rows = Σ_{n,c} / (N·C)
        return kl_rows(log_phi_teacher, log_phi_student).mean() * tau * tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


@register_loss("det_logit_mse")
class DetLogitMSE(DistillLoss):
    """Squared error between YOLO-style raw detection head outputs, split by part.

    Inputs `…×(5+K)` laid out ``[x, y, w, h, obj, cls_1 … cls_K]`` (K ≥ 1), any leading shape
    (e.g. N×A×(5+K) or N×A×H×W×(5+K)); with ``e = (s − t)²``:
    ``box · mean(e[..., :4]) + obj · mean(e[..., 4]) + cls · mean(e[..., 5:])``,
    each mean over its own elements, so each part weighs the same whatever K is. Logit matching
    as in Ba & Caruana 2014, applied per part of the detection head.
    """

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
