"""What a recipe's `task` changes: the targets the batches carry, the sizes a model is built with
and the test metrics.

| task           | data                     | target          | metrics (the first one ranks)      |
|----------------|--------------------------|-----------------|------------------------------------|
| classification | an image dataset         | class indices   | accuracy                           |
| segmentation   | fashion_mnist_scenes     | masks N×H×W     | mIoU, pixel accuracy               |
| detection      | fashion_mnist_scenes     | boxes N×M×5     | mAP@0.5 (VOC all-point)            |
| multitask      | fashion_mnist_scenes     | {"seg", "det"}  | mIoU, pixel accuracy, mAP@0.5      |

Detection outputs are decoded (`models.dense.decode`, score ≥ `DETECTION_SCORE`, class-aware
NMS at IoU `NMS_IOU`) before mAP; a low score threshold keeps the whole precision-recall curve.
Dense metrics are computed by every rank on the whole loader (no sharding under torchrun).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdistill.engine import evaluate_classifier
from kdistill.engine.dense_metrics import DetectionMAP, SegmentationMetrics
from kdistill.models.dense import decode

METRICS = {
    "classification": ("accuracy",),
    "segmentation": ("miou", "pixel_accuracy"),
    "detection": ("map50",),
    "multitask": ("miou", "pixel_accuracy", "map50"),
}
METRIC_LABELS = {
    "accuracy": "accuracy",
    "miou": "mIoU",
    "pixel_accuracy": "pixel accuracy",
    "map50": "mAP@0.5",
}
TARGET_KIND = {"segmentation": "seg", "detection": "det", "multitask": "both"}
DETECTION_SCORE = 0.01
NMS_IOU = 0.5


def primary_metric(task: str) -> str:
    """The metric that ranks models of `task` (validation tuning, gap closed)."""
    return METRICS[task][0]


def model_sizes(task: str, data: Any) -> dict[str, int]:
    """Constructor arguments that follow from the data: channels and class counts (and the
    image side, for models that take it)."""
    sizes = {"in_channels": data.input_shape[0], "num_classes": data.num_classes}
    if task == "segmentation":
        sizes["num_classes"] = data.num_seg_classes  # background + item classes
    return sizes


def _seg_and_det(task: str, output: Any) -> tuple[Any, Any]:
    if task == "multitask":
        if not isinstance(output, dict) or not {"seg", "det"} <= set(output):
            raise TypeError(
                "a multitask model must return a dict with 'seg' and 'det' outputs, got "
                f"{type(output).__name__}"
            )
        return output["seg"], output["det"]
    return (output, None) if task == "segmentation" else (None, output)


@torch.no_grad()
def evaluate_dense(
    model: nn.Module,
    loader,
    task: str,
    device: str | torch.device = "cpu",
    ignore_index: int | None = None,
) -> dict[str, float]:
    """mIoU / pixel accuracy and/or mAP@0.5 of `model` over `loader` (its mode restored); mask
    pixels labelled `ignore_index` (void) count in neither segmentation metric."""
    data = loader.dataset
    seg_metric = None
    if task != "detection":
        seg_metric = SegmentationMetrics(data.num_seg_classes, ignore_index=ignore_index)
    det_metric = DetectionMAP(data.num_classes) if task != "segmentation" else None
    image_size = tuple(data.input_shape[1:])
    anchors = getattr(model, "anchors", None)
    if det_metric is not None and anchors is None:
        raise TypeError(f"{type(model).__name__} has no `anchors`: not a detector")
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            seg, det = _seg_and_det(task, model(batch.inputs.to(device)))
            target = batch.target
            if seg_metric is not None:
                masks = target["seg"] if isinstance(target, dict) else target
                seg_metric.update(seg.float().cpu(), masks)
            if det_metric is not None:
                boxes = target["det"] if isinstance(target, dict) else target
                detections = decode(
                    det.float().cpu(), anchors.cpu(), image_size, DETECTION_SCORE, NMS_IOU
                )
                det_metric.update(detections, boxes)
    finally:
        model.train(was_training)
    results: dict[str, float] = {}
    if seg_metric is not None:
        computed = seg_metric.compute()
        results.update(miou=computed["miou"], pixel_accuracy=computed["pixel_accuracy"])
    if det_metric is not None:
        results["map50"] = det_metric.compute()["map50"]
    return results


def evaluate_task(
    model: nn.Module,
    loader,
    task: str,
    device: str | torch.device = "cpu",
    ignore_index: int | None = None,
):
    """The task's test metrics of `model` over `loader` (see the module table); `ignore_index`:
    the void label of segmentation masks (recipes: distill.ignore_index)."""
    if task == "classification":
        return evaluate_classifier(model, loader, device)
    return evaluate_dense(model, loader, task, device, ignore_index)
