"""Feature distillation: losses on intermediate layers picked by name (see `kdistill.taps`)."""

from __future__ import annotations

from torch import Tensor

from kdistill._checks import check_same_shape
from kdistill.losses.base import STUDENT, TEACHER, DistillLoss, register_loss


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
