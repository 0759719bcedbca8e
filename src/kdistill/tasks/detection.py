"""Object detection: boxes `N×M×5` (`[class, x1, y1, x2, y2]` pixels, class −1 = padding),
YOLO-style grid outputs `N×A×S×S×(5+K)` decoded into boxes; COCO AP@[.5:.95] (``ap``, which
ranks by default), AP50, AP75 and APs/m/l by pycocotools (`tasks.coco_eval`, ``pip install
'kdistill[coco]'``), and kdistill's mAP@0.5 (``map50``, VOC all-point interpolation). Without
pycocotools the task reports mAP@0.5 only, and says so once.

Detections are decoded at score ≥ `SCORE_THRESHOLD` (a low threshold keeps the whole
precision–recall curve) with class-aware NMS at IoU `NMS_IOU` (`models.dense.decode`).

A batch may also come as torchvision's detection convention — ``(images, targets)`` with
`images` a list of `C×H×W` tensors of one size and `targets` a list of ``{"boxes": M×4 xyxy
pixels, "labels": M}`` — as a ``DataLoader`` with ``collate_fn=lambda b: tuple(zip(*b))``
yields it; `to_batch` stacks the images and pads the boxes (`kdistill.data.dense.box_rows`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.data.arrays import Batch
from kdistill.data.batches import as_batch
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
        if output.shape[-1] != 5 + self.num_classes:
            raise ValueError(
                f"task detection: the model's output {tuple(output.shape)} has "
                f"{output.shape[-1] - 5} class scores per anchor but the data has "
                f"{self.num_classes} classes; build it with num_classes={self.num_classes}"
            )
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


def _image_size(data: Any) -> tuple[int, int] | None:
    """(H, W) of the data's images: its `input_shape`, else its first sample's image."""
    shape = getattr(data, "input_shape", None)
    if shape is None and data is not None:
        try:
            first = data[0]
        except (TypeError, IndexError, KeyError):
            return None
        image = first[0] if isinstance(first, Sequence) else None
        shape = tuple(image.shape) if isinstance(image, Tensor) else None
    return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 2 else None


class DetectionTask(DenseTargets):
    """Targets: boxes per image; models built with `in_channels` and `num_classes` (object
    classes, no background) and must expose their `anchors` (`A×2`, pixels)."""

    name = "detection"
    metrics: tuple[str, ...] = ("ap", "map50", "ap50", "ap75")
    labels = {"map50": "mAP@0.5", **COCO_LABELS}
    default_hard_loss = "yolo"
    target = "boxes"
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

    def to_batch(self, raw: Any) -> Batch:
        return as_batch(torchvision_batch(raw))

    def new_metric(self, model: nn.Module, data: Any) -> _DetMetric:
        anchors = getattr(model, "anchors", None)
        if anchors is None:
            raise TypeError(
                f"{type(model).__name__} has no `anchors` attribute: not a detector (task "
                "detection decodes grid outputs with the model's anchors)"
            )
        classes = getattr(data, "num_classes", None) or getattr(model, "num_classes", None)
        if classes is None:
            raise ValueError(
                "task detection: neither the loader's dataset nor the model says how many object "
                "classes there are (num_classes)"
            )
        size = _image_size(data)
        if size is None:
            raise ValueError(
                "task detection: the image size (to decode boxes in pixels) comes from the "
                "loader's dataset (input_shape, or its first sample); this loader has none"
            )
        return _DetMetric(int(classes), anchors, size, self.coco)


def torchvision_batch(raw: Any) -> Any:
    """``(images, targets)`` in torchvision's detection convention (lists, see the module doc)
    as ``(N×C×H×W, N×M×5)``; anything else is returned as it is."""
    if not (isinstance(raw, list | tuple) and len(raw) == 2):
        return raw
    images, targets = raw
    if not (
        isinstance(targets, list | tuple)
        and targets
        and all(isinstance(t, Mapping) and "boxes" in t for t in targets)
    ):
        return raw
    from kdistill.data.dense import box_rows, pad_box_rows

    if isinstance(images, list | tuple):
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            raise ValueError(
                f"task detection: the batch's images have shapes {sorted(shapes)}; kdistill's "
                "detectors take one image size (resize them in the dataset)"
            )
        images = torch.stack(list(images))
    rows = [
        box_rows(t["boxes"], t.get("labels"), f"batch target {i}") for i, t in enumerate(targets)
    ]
    return images, pad_box_rows(rows)
