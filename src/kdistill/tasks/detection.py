"""Object detection: boxes `N×M×5` (`[class, x1, y1, x2, y2]`, class −1 = padding), YOLO-style
grid outputs `N×A×S×S×(5+K)` decoded into boxes, mAP@0.5 (VOC all-point interpolation).

Detections are decoded at score ≥ `SCORE_THRESHOLD` (a low threshold keeps the whole
precision–recall curve) with class-aware NMS at IoU `NMS_IOU` (`models.dense.decode`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdistill.models.dense import decode
from kdistill.tasks.base import DenseTargets
from kdistill.tasks.dense_metrics import DetectionMAP

SCORE_THRESHOLD = 0.01
NMS_IOU = 0.5


class _DetMetric:
    shardable = False  # computed by every rank on the whole loader

    def __init__(self, num_classes: int, anchors: Tensor, image_size: tuple[int, int]) -> None:
        self.inner = DetectionMAP(num_classes)
        self.anchors = anchors.detach().cpu()
        self.image_size = image_size

    def update(self, output: Tensor, target: Tensor) -> None:
        detections = decode(
            output.float().cpu(), self.anchors, self.image_size, SCORE_THRESHOLD, NMS_IOU
        )
        self.inner.update(detections, target.cpu())

    def reduce(self) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {"map50": self.inner.compute()["map50"]}


class DetectionTask(DenseTargets):
    """Targets: boxes per image; models built with `in_channels` and `num_classes` (object
    classes, no background) and must expose their `anchors` (`A×2`, pixels)."""

    name = "detection"
    metrics = ("map50",)
    labels = {"map50": "mAP@0.5"}
    default_hard_loss = "yolo"
    lower_is_better: tuple[str, ...] = ()
    target_kind = "det"

    def model_kwargs(self, data: Any) -> dict[str, int]:
        return {"in_channels": data.input_shape[0], "num_classes": data.num_classes}

    def new_metric(self, model: nn.Module, data: Any) -> _DetMetric:
        anchors = getattr(model, "anchors", None)
        if anchors is None:
            raise TypeError(
                f"{type(model).__name__} has no `anchors` attribute: not a detector (task "
                "detection decodes grid outputs with the model's anchors)"
            )
        return _DetMetric(data.num_classes, anchors, tuple(data.input_shape[1:]))
