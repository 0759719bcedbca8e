"""Feature distillation: losses on intermediate layers picked by name (see `kdistill.taps`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdistill._checks import check_ndim, check_same_shape
from kdistill.losses.base import STUDENT, TEACHER, DistillLoss, register_loss
from kdistill.ops.spatial import align_spatial


def check_same_batch(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    """Both tensors hold the same number of samples (dimension 0); other dimensions may differ."""
    if a.dim() == 0 or b.dim() == 0 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same batch size (dimension 0), "
            f"got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )


@register_loss("fitnet")
class FitNet(DistillLoss):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (ICLR).

    ``mean((connector(f_s) − f_t)²)`` over all elements. The connector (1×1 conv or linear, built
    by the distiller when channels differ) is applied before this loss is called.
    """

    needs = (STUDENT, TEACHER)
    uses_connector = True

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        check_same_shape(student_features, teacher_features, "student features", "teacher features")
        return (student_features - teacher_features).pow(2).mean()


@register_loss("at")
class AT(DistillLoss):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (ICLR).

    For an ``N×C×H×W`` feature map f, the attention map is ``a(f) = l2normalize(mean_c |f|^p)``,
    the H×W map flattened per sample; the loss is ``mean((a_s − a_t)²)`` over all N·H·W elements.

    The mean over channels removes the channel count, so student and teacher may differ in
    channels and no connector is used. When the spatial sizes differ, the larger side's map
    (``mean_c |f|^p``, before normalisation) is adaptive-average-pooled to the smaller H×W (each
    dimension to the smaller of the two), as `kdistill.ops.spatial.align_spatial` does.
    """

    needs = (STUDENT, TEACHER)

    def __init__(self, p: float = 2.0):
        super().__init__()
        if not p >= 1:
            raise ValueError(f"p must be >= 1, got {p}")
        self.p = float(p)

    def attention_map(self, features: Tensor) -> Tensor:
        """``mean_c |f|^p`` as ``N×1×H×W``, not yet normalised."""
        return features.abs().pow(self.p).mean(dim=1, keepdim=True)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        check_ndim(student_features, 4, "student features")
        check_ndim(teacher_features, 4, "teacher features")
        check_same_batch(student_features, teacher_features, "student features", "teacher features")
        map_student, map_teacher = align_spatial(
            self.attention_map(student_features), self.attention_map(teacher_features)
        )
        a_student = F.normalize(map_student.flatten(1), dim=1)
        a_teacher = F.normalize(map_teacher.flatten(1), dim=1)
        return (a_student - a_teacher).pow(2).mean()

    def extra_repr(self) -> str:
        return f"p={self.p}"


@register_loss("cosine")
class FeatureCosine(DistillLoss):
    """Feature cosine distance, a common hint-loss variant (no single paper).

    ``1 − mean_n cos(s_n, t_n)``, with s_n = connector(f_s)[n] and t_n = f_t[n] flattened per
    sample. A zero vector has cosine 0 with anything. Insensitive to each sample's feature scale.
    """

    needs = (STUDENT, TEACHER)
    uses_connector = True

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        check_same_shape(student_features, teacher_features, "student features", "teacher features")
        if student_features.dim() < 2:
            raise ValueError(
                f"features must be N×D or N×C×H×W, got shape {tuple(student_features.shape)}"
            )
        unit_student = F.normalize(student_features.flatten(1), dim=1)
        unit_teacher = F.normalize(teacher_features.flatten(1), dim=1)
        return 1 - (unit_student * unit_teacher).sum(dim=1).mean()


@register_loss("l1")
class FeatureL1(DistillLoss):
    """Feature L1 distance, a common hint-loss variant (no single paper).

    ``mean(|connector(f_s) − f_t|)`` over all elements; less sensitive than FitNet's squared error
    to a few large activations.
    """

    needs = (STUDENT, TEACHER)
    uses_connector = True

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        check_same_shape(student_features, teacher_features, "student features", "teacher features")
        return (student_features - teacher_features).abs().mean()
