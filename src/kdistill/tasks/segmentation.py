"""Semantic segmentation: class masks `N×H×W`, logits `N×K×H×W`, mIoU and pixel accuracy."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdistill.tasks.base import DenseTargets
from kdistill.tasks.dense_metrics import SegmentationMetrics


class _SegMetric:
    shardable = False  # computed by every rank on the whole loader

    def __init__(self, num_classes: int, ignore_index: int | None) -> None:
        self.inner = SegmentationMetrics(num_classes, ignore_index=ignore_index)

    def update(self, output: Tensor, target: Tensor) -> None:
        self.inner.update(output.float().cpu(), target.cpu())

    def reduce(self) -> None:
        pass

    def compute(self) -> dict[str, float]:
        computed = self.inner.compute()
        return {"miou": computed["miou"], "pixel_accuracy": computed["pixel_accuracy"]}


class SegmentationTask(DenseTargets):
    """Targets: masks (0 = background, c + 1 = class c for scenes); models built with
    `in_channels` and `num_classes` = the number of mask classes (background included)."""

    name = "segmentation"
    metrics = ("miou", "pixel_accuracy")
    labels = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy"}
    default_hard_loss = "ce"
    lower_is_better: tuple[str, ...] = ()
    target_kind = "seg"

    def __init__(self, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index

    def model_kwargs(self, data: Any) -> dict[str, int]:
        return {"in_channels": data.input_shape[0], "num_classes": data.num_seg_classes}

    def new_metric(self, model: nn.Module, data: Any) -> _SegMetric:
        return _SegMetric(data.num_seg_classes, self.ignore_index)
