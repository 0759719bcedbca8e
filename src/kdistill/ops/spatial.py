"""Spatial alignment of two feature maps (shared by connectors and feature losses)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def align_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Pool whichever 4-D map is larger to the other's H×W; other tensors pass unchanged."""
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] == teacher.shape[2:]:
        return student, teacher
    height = min(student.shape[2], teacher.shape[2])
    width = min(student.shape[3], teacher.shape[3])
    if student.shape[2:] != (height, width):
        student = F.adaptive_avg_pool2d(student, (height, width))
    if teacher.shape[2:] != (height, width):
        teacher = F.adaptive_avg_pool2d(teacher, (height, width))
    return student, teacher
