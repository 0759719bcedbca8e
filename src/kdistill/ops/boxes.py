"""Box coding for YOLO-style anchor detectors, shared by the detector models and the YOLO loss.

A single-scale head gives raw ``N×A×S×S×(5+K)`` values ``[tx, ty, tw, th, obj, cls_1 … cls_K]``
on an ``S×S`` grid with ``A`` anchors per cell (row = y, column = x). A box decodes as
``cx = (i + σ(tx))·stride``, ``cy = (j + σ(ty))·stride``, ``w = a_w·exp(tw)``,
``h = a_h·exp(th)`` (pixels, x2/y2 exclusive) — YOLOv2 (Redmon & Farhadi 2017) with YOLOv3's
best-anchor assignment. `encode_targets` turns padded ground-truth boxes into per-slot targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_ANCHORS", "check_anchors", "check_raw", "encode_targets"]

DEFAULT_ANCHORS: tuple[tuple[float, float], ...] = ((13.0, 22.0), (24.0, 13.0), (25.0, 30.0))
"""Anchor (width, height) in pixels for 64×64 Fashion-MNIST scenes: k-means (1 − IoU distance,
medians) on the foreground boxes of 2000 training scenes at the default scale range 0.6–1.4,
rounded; a box's best anchor has shape-IoU 0.70 on average. Items are tall (dresses, trousers),
wide (sandals, sneakers, bags) or large (coats, pullovers)."""


def check_anchors(anchors: Sequence[Sequence[float]] | Tensor) -> Tensor:
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    if anchors.dim() != 2 or anchors.shape[1] != 2 or len(anchors) == 0:
        raise ValueError(
            f"anchors must be A×2 (width, height) pixels, got shape {tuple(anchors.shape)}"
        )
    if not bool((anchors > 0).all()):
        raise ValueError(f"anchor sizes must be > 0, got {anchors.tolist()}")
    return anchors


def _shape_iou(width: float, height: float, anchors: list[list[float]]) -> list[float]:
    """IoU of a ``width×height`` box with each anchor, all centred at the same point."""
    ious = []
    for anchor_w, anchor_h in anchors:
        inter = min(width, anchor_w) * min(height, anchor_h)
        ious.append(inter / (width * height + anchor_w * anchor_h - inter))
    return ious


def encode_targets(
    boxes: Tensor,
    anchors: Sequence[Sequence[float]] | Tensor,
    grid: int | tuple[int, int],
    image_size: int | tuple[int, int],
) -> Tensor:
    """Ground-truth boxes → YOLO training targets on the ``S×S`` grid.

    ``boxes``: ``N×M×5`` ``[class, x1, y1, x2, y2]`` pixels (rows with class < 0 are padding).
    ``grid``: S (or ``(rows, cols)``); ``image_size``: pixels (or ``(height, width)``), so the
    cell stride is ``image_size / S``. Returns ``N×A×S×S×6``
    ``[ox, oy, tw, th, obj, class]``:

    - a box goes to the cell (row j, column i) containing its centre
      ``(cx, cy) = ((x1 + x2)/2, (y1 + y2)/2)``: ``i = ⌊cx / stride_x⌋`` (clamped to the grid),
      and to the anchor with the best *shape* IoU (box and anchor centred together); if that
      (anchor, cell) slot is already taken by an earlier box, the next-best anchor; if all are
      taken, the box is dropped;
    - ``ox = cx / stride_x − i``, ``oy = cy / stride_y − j`` in [0, 1) (the targets of σ(tx),
      σ(ty)); ``tw = log(w / a_w)``, ``th = log(h / a_h)``; ``obj = 1``; ``class`` the class;
    - every other slot is ``[0, 0, 0, 0, 0, −1]``. Boxes with zero width or height are skipped.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 5:
        raise ValueError(
            f"boxes must be N×M×5 [class, x1, y1, x2, y2], got shape {tuple(boxes.shape)}"
        )
    anchor_list = check_anchors(anchors).tolist()
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    stride_x, stride_y = width / cols, height / rows
    n = boxes.shape[0]
    target = torch.zeros(n, len(anchor_list), rows, cols, 6, device=boxes.device)
    target[..., 5] = -1
    taken: set[tuple[int, int, int, int]] = set()
    slots, values = [], []
    for image, image_boxes in enumerate(boxes.detach().cpu().tolist()):
        for label, x1, y1, x2, y2 in image_boxes:
            w, h = x2 - x1, y2 - y1
            if label < 0 or w <= 0 or h <= 0:
                continue
            gx, gy = (x1 + x2) / 2 / stride_x, (y1 + y2) / 2 / stride_y
            i = min(max(int(math.floor(gx)), 0), cols - 1)
            j = min(max(int(math.floor(gy)), 0), rows - 1)
            ious = _shape_iou(w, h, anchor_list)
            for a in sorted(range(len(ious)), key=lambda k: -ious[k]):
                if (image, a, j, i) in taken:
                    continue
                taken.add((image, a, j, i))
                anchor_w, anchor_h = anchor_list[a]
                slots.append((image, a, j, i))
                values.append(
                    [gx - i, gy - j, math.log(w / anchor_w), math.log(h / anchor_h), 1.0, label]
                )
                break
    if slots:
        index = torch.tensor(slots, device=boxes.device).T
        target[index[0], index[1], index[2], index[3]] = torch.tensor(
            values, dtype=target.dtype, device=boxes.device
        )
    return target


def check_raw(raw: Tensor, anchors: int) -> None:
    if raw.dim() != 5 or raw.shape[-1] < 6 or raw.shape[1] != anchors:
        raise ValueError(
            f"raw detections must be N×A×S×S×(5+K) with A={anchors} anchors and K >= 1, got "
            f"shape {tuple(raw.shape)}"
        )
