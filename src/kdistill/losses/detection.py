"""Detection losses: the hard-label loss of a YOLO-style anchor detector.

YOLOv2 (Redmon & Farhadi 2017, "YOLO9000: Better, Faster, Stronger") anchors and box
parametrisation, with YOLOv3's (Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement")
logistic objectness and best-anchor assignment: a single-scale head gives raw
``N×A×S×S×(5+K)`` values ``[tx, ty, tw, th, obj, cls_1 … cls_K]`` on an ``S×S`` grid with ``A``
anchors per cell (cell index order row = y, column = x). A box decodes as
``cx = (i + σ(tx))·stride``, ``cy = (j + σ(ty))·stride``, ``w = a_w·exp(tw)``,
``h = a_h·exp(th)`` (pixels, x2/y2 exclusive).

`YOLOLoss` ("yolo" in the loss registry) scores a raw head output against the per-slot targets
of `kdistill.ops.boxes.encode_targets` (box coding, shared with the detector models in
`kdistill.models.dense`, their `decode` and `nms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill._checks import check_positive_int
from kdistill.losses.base import STUDENT, TARGET, DistillLoss, register_loss
from kdistill.ops.boxes import DEFAULT_ANCHORS, check_anchors, check_raw, encode_targets

__all__ = ["DEFAULT_ANCHORS", "YOLOLoss", "encode_targets"]


@register_loss("yolo")
class YOLOLoss(DistillLoss):
    """The hard-label YOLO loss of a single-scale anchor detector (YOLOv2: Redmon & Farhadi
    2017, "YOLO9000").

    ``(raw N×A×S×S×(5+K), boxes N×M×5)``: the boxes are encoded with `encode_targets` (the
    grid S from ``raw``); with P the assigned (positive) slots and Q all other slots,

    - box = mean over P of ``(σ(tx) − ox)² + (σ(ty) − oy)² + (tw − log(w/a_w))² + (th − …)²``
      (a sum over the four coordinates);
    - obj = mean over P of ``BCE(obj, 1)``; noobj = mean over Q of ``BCE(obj, 0)``;
    - cls = mean over P of the cross-entropy of the K class logits with the box's class;

    loss = ``box·box_term + obj·obj_term + noobj·noobj_term + cls·cls_term`` (constructor
    weights). A term over an empty set is 0. Unlike YOLOv3 no "ignore" band is kept: every
    unassigned slot is a negative.
    """

    needs = (STUDENT, TARGET)
    target_is_class_index = False

    def __init__(
        self,
        anchors: Sequence[Sequence[float]] | Tensor = DEFAULT_ANCHORS,
        image_size: int = 64,
        box: float = 1.0,
        obj: float = 1.0,
        noobj: float = 1.0,
        cls: float = 1.0,
    ):
        super().__init__()
        for value, name in ((box, "box"), (obj, "obj"), (noobj, "noobj"), (cls, "cls")):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        check_positive_int(image_size, "image_size")
        self.register_buffer("anchors", check_anchors(anchors), persistent=False)
        self.image_size = image_size
        self.box, self.obj, self.noobj, self.cls = float(box), float(obj), float(noobj), float(cls)

    def forward(self, raw: Tensor, boxes: Tensor) -> Tensor:
        check_raw(raw, len(self.anchors))
        if boxes.dim() != 3 or boxes.shape[0] != raw.shape[0] or boxes.shape[-1] != 5:
            raise ValueError(
                f"boxes must be N×M×5 [class, x1, y1, x2, y2] with N={raw.shape[0]}, got shape "
                f"{tuple(boxes.shape)}"
            )
        target = encode_targets(boxes, self.anchors, tuple(raw.shape[2:4]), self.image_size)
        positive = target[..., 4] > 0
        zero = raw.sum() * 0.0  # keeps the graph (and device, dtype) when a set is empty
        negatives = raw[..., 4][~positive]
        noobj = (
            F.binary_cross_entropy_with_logits(negatives, torch.zeros_like(negatives))
            if negatives.numel()
            else zero
        )
        if not bool(positive.any()):
            return self.noobj * noobj + zero
        pred, goal = raw[positive], target[positive]
        box = (
            (pred[:, :2].sigmoid() - goal[:, :2]).pow(2).sum(dim=1)
            + (pred[:, 2:4] - goal[:, 2:4]).pow(2).sum(dim=1)
        ).mean()
        obj = F.binary_cross_entropy_with_logits(pred[:, 4], torch.ones_like(pred[:, 4]))
        cls = F.cross_entropy(pred[:, 5:], goal[:, 5].long())
        return self.box * box + self.obj * obj + self.noobj * noobj + self.cls * cls

    def extra_repr(self) -> str:
        return (
            f"anchors={self.anchors.tolist()}, image_size={self.image_size}, box={self.box}, "
            f"obj={self.obj}, noobj={self.noobj}, cls={self.cls}"
        )
