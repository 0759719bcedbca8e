"""Connectors: small trainable adapters that map student features onto the teacher's shape.

Built from the shapes seen on the first batch. `N×C×H×W` features get a 1×1 convolution + batch
norm (FitNet's regressor, kept cheap); `N×D` features get a linear layer. Spatial sizes that
differ are aligned by adaptive average pooling of the larger map down to the smaller one
(`align_spatial`), for both sides — pooling never invents detail that a map does not have.
"""

from __future__ import annotations

from torch import nn

from kdistill.ops.spatial import align_spatial

__all__ = ["align_spatial", "build_connector"]


def build_connector(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    student_layer: str,
    teacher_layer: str,
) -> nn.Module:
    """A connector from the student's channel count to the teacher's (identity when equal)."""
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 4):
        raise ValueError(
            f"cannot connect student layer {student_layer!r} with shape {tuple(student_shape)} to "
            f"teacher layer {teacher_layer!r} with shape {tuple(teacher_shape)}: a connector maps "
            "N×C×H×W to N×C'×H'×W' or N×D to N×D'"
        )
    student_channels, teacher_channels = student_shape[1], teacher_shape[1]
    if student_channels == teacher_channels:
        return nn.Identity()
    if len(student_shape) == 4:
        return nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(teacher_channels),
        )
    return nn.Linear(student_channels, teacher_channels)
