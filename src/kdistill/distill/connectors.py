"""Connectors: small trainable adapters that map student features onto the teacher's shape.

Built from the shapes seen on the first batch. The layout is read from the number of dimensions:

- 4-D is ``N×C×H×W`` (convolutional maps): a 1×1 convolution + batch norm on dim 1, the
  channels (FitNet's regressor, kept cheap);
- 3-D is ``N×L×D`` (transformer hidden states, L tokens of width D): a linear layer on the
  last dim, applied to every token alike. A ``Conv1d`` map ``N×C×L`` is *not* this layout:
  tap it after a transpose to ``N×L×C``, or flatten it;
- 2-D is ``N×D`` (embeddings, logits): a linear layer.

No connector is built when the feature widths (C or D) already match. Spatial sizes that differ
are aligned by adaptive average pooling of the larger map down to the smaller one
(`align_spatial`), for both sides — pooling never invents detail that a map does not have.
Sequence lengths that differ are an error, never pooled: token i of one model and token i of
the other only correspond when both read the same tokens.
"""

from __future__ import annotations

from torch import nn

from kdistill.ops.spatial import align_spatial

__all__ = ["align_spatial", "build_connector"]

#: number of dimensions → the dim that holds the feature width (channels C or width D)
WIDTH_DIM = {4: 1, 3: 2, 2: 1}
LAYOUTS = "N×C×H×W (1×1 conv on C), N×L×D (linear on D) or N×D (linear)"


def widths_match(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> bool:
    """True when both shapes have the same layout and feature width (no connector needed)."""
    dims = len(student_shape)
    return (
        dims == len(teacher_shape)
        and dims in WIDTH_DIM
        and student_shape[WIDTH_DIM[dims]] == teacher_shape[WIDTH_DIM[dims]]
    )


def build_connector(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    student_layer: str,
    teacher_layer: str,
) -> nn.Module:
    """A connector from the student's feature width to the teacher's (identity when equal).

    ValueError, naming both layers and shapes, for layouts that differ or that are none of the
    three above, and for ``N×L×D`` sequences whose lengths L differ.
    """
    where = (
        f"student layer {student_layer!r} with shape {tuple(student_shape)} to "
        f"teacher layer {teacher_layer!r} with shape {tuple(teacher_shape)}"
    )
    dims = len(student_shape)
    if dims != len(teacher_shape) or dims not in WIDTH_DIM:
        raise ValueError(
            f"cannot connect {where}: both sides must have the same layout, one of {LAYOUTS}"
        )
    if dims == 3 and student_shape[1] != teacher_shape[1]:
        raise ValueError(
            f"cannot connect {where}: the sequence lengths differ ({student_shape[1]} vs "
            f"{teacher_shape[1]}); N×L×D features are compared token by token, so feed both "
            "models the same tokens (or tap layers with the same length)"
        )
    student_width = student_shape[WIDTH_DIM[dims]]
    teacher_width = teacher_shape[WIDTH_DIM[dims]]
    if student_width == teacher_width:
        return nn.Identity()
    if dims == 4:
        return nn.Sequential(
            nn.Conv2d(student_width, teacher_width, kernel_size=1, bias=False),
            nn.BatchNorm2d(teacher_width),
        )
    return nn.Linear(student_width, teacher_width)  # acts on the last dim: N×D and N×L×D
