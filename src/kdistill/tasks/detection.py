"""Object detection: boxes `N×M×5` (`[class, x1, y1, x2, y2]`, class −1 = padding), YOLO-style
grid outputs `N×A×S×S×(5+K)` decoded into boxes; COCO AP@[.5:.95] (``ap``, which ranks by
default), AP50, AP75 and APs/m/l by pycocotools (`tasks.coco_eval`, ``pip install
'kdistill[coco]'``), and kdistill's mAP@0.5 (``map50``, VOC all-point interpolation). Without
pycocotools the task reports mAP@0.5 only, and says so once.

Detections are decoded at score ≥ `SCORE_THRESHOLD` (a low threshold keeps the whole
precision–recall curve) with class-aware NMS at IoU `NMS_IOU` (`models.dense.decode`).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from kdistill.models.dense import decode
from kdistill.tasks.base import DenseTargets
from kdistill.tasks.coco_eval import COCO_LABELS, INSTALL, coco_metrics, have_pycocotools
from kdistill.tasks.dense_metrics import DetectionMAP

SCORE_THRESHOLD = 0.01
NMS_IOU = 0.5


class _DetMetric:
    shardable = False  # computed by every rank on the whole loader

    def __init__(
        self, num_classes: int, anchors: Tensor, image_size: tuple[int, int], coco: bool
    ) -> None:
        self.inner = DetectionMAP(num_classes)
        self.num_classes = num_classes
        self.anchors = anchors.detach().cpu()
        self.image_size = image_size
        self.coco = coco
        self.images: list[tuple[Tensor, Tensor]] = []  # (detections, boxes) for pycocotools

    def update(self, output: Tensor, target: Tensor) -> None:
        detections = decode(
            output.float().cpu(), self.anchors, self.image_size, SCORE_THRESHOLD, NMS_IOU
        )
        self.inner.update(detections, target.cpu())
        if self.coco:
            self.images.extend(zip(detections, target.cpu()))

    def reduce(self) -> None:
        pass

    def compute(self) -> dict[str, float]:
        results = {"map50": self.inner.compute()["map50"]}
        if self.coco:
            results.update(coco_metrics(self.images, self.num_classes, self.image_size))
        return results


class DetectionTask(DenseTargets):
    """Targets: boxes per image; models built with `in_channels` and `num_classes` (object
    classes, no background) and must expose their `anchors` (`A×2`, pixels)."""

    name = "detection"
    metrics: tuple[str, ...] = ("ap", "map50", "ap50", "ap75")
    labels = {"map50": "mAP@0.5", **COCO_LABELS}
    default_hard_loss = "yolo"
    lower_is_better: tuple[str, ...] = ()
    target_kind = "det"
    _warned = False

    def __init__(self, coco: bool | None = None) -> None:
        """`coco`: report pycocotools' AP@[.5:.95], AP50, AP75 (and APs/m/l where the sizes
        exist); None: when pycocotools is installed (else a warning naming the install)."""
        if coco is None:
            coco = have_pycocotools()
            if not coco and not DetectionTask._warned:
                DetectionTask._warned = True
                warnings.warn(
                    f"pycocotools is not installed: detection reports mAP@0.5 only, without "
                    f"COCO AP@[.5:.95] / AP50 / AP75 (and ranks by mAP@0.5); {INSTALL}",
                    stacklevel=2,
                )
        elif coco and not have_pycocotools():
            raise ImportError(f"COCO metrics need pycocotools: {INSTALL}")
        self.coco = coco
        self.metrics = DetectionTask.metrics if coco else ("map50",)

    def model_kwargs(self, data: Any) -> dict[str, int]:
        return {"in_channels": data.input_shape[0], "num_classes": data.num_classes}

    def new_metric(self, model: nn.Module, data: Any) -> _DetMetric:
        anchors = getattr(model, "anchors", None)
        if anchors is None:
            raise TypeError(
                f"{type(model).__name__} has no `anchors` attribute: not a detector (task "
                "detection decodes grid outputs with the model's anchors)"
            )
        return _DetMetric(data.num_classes, anchors, tuple(data.input_shape[1:]), self.coco)
