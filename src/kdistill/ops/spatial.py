"""Spatial alignment of two feature maps (shared by connectors and feature losses)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def align_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Pool whichever 4-D map is larger to the other's H×W; 2-D tensors pass unchanged.

    ValueError for two ``N×L×D`` sequences of different lengths: token i of one model and
    token i of the other only correspond when both read the same tokens, so they are never
    pooled.
    """
    if student.dim() == 3 and teacher.dim() == 3 and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"sequence lengths differ: student features {tuple(student.shape)} and teacher "
            f"features {tuple(teacher.shape)} (N×L×D); token features are compared position by "
            "position, so both models must read the same tokens"
        )
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] == teacher.shape[2:]:
        return student, teacher
    height = min(student.shape[2], teacher.shape[2])
    width = min(student.shape[3], teacher.shape[3])
    if student.shape[2:] != (height, width):
        student = F.adaptive_avg_pool2d(student, (height, width))
    if teacher.shape[2:] != (height, width):
        teacher = F.adaptive_avg_pool2d(teacher, (height, width))
    return student, teacher
