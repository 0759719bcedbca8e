"""Semantic segmentation: class masks `N×H×W`, logits `N×K×H×W`, mIoU and pixel accuracy.

Void pixels (255 in VOC / Cityscapes masks) are left out of both metrics when the task is given
`ignore_index`, or, when it is not, when the dataset declares one (`MaskDataset.ignore_index`,
`kdistill.data.kinds`). A mask value that is neither a class nor the void label is an error,
never a class of its own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdistill.tasks.base import DenseTargets
from kdistill.tasks.dense_metrics import SegmentationMetrics


class _SegMetric:
    """`SegmentationMetrics` whose class count is the dataset's, or, for a dataset that does
    not declare it (a user's own), the channel count of the first logits seen."""

    shardable = False  # computed by every rank on the whole loader

    def __init__(self, num_classes: int | None, ignore_index: int | None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.inner: SegmentationMetrics | None = None

    def update(self, output: Tensor, target: Tensor) -> None:
        if self.inner is None:
            classes = self.num_classes
            if classes is None:
                if output.dim() != target.dim() + 1:
                    raise ValueError(
                        "task segmentation: the dataset does not say how many classes its masks "
                        "have (num_seg_classes) and the model returns "
                        f"{tuple(output.shape)} for masks {tuple(target.shape)}, not logits "
                        "N×K×H×W to count them from"
                    )
                classes = int(output.shape[1])
            self.inner = SegmentationMetrics(classes, ignore_index=self.ignore_index)
        self.inner.update(output.float().cpu(), target.cpu())

    def reduce(self) -> None:
        pass

    def compute(self) -> dict[str, float]:
        if self.inner is None:
            raise ValueError("task segmentation: no batch in the evaluation set")
        computed = self.inner.compute()
        return {"miou": computed["miou"], "pixel_accuracy": computed["pixel_accuracy"]}


def void_label(task_ignore: int | None, data: Any) -> int | None:
    """The void label to score with: the task's, else the one `data` declares (its
    `ignore_index`); ValueError when both are set and differ."""
    declared = getattr(data, "ignore_index", None)
    if task_ignore is not None and declared is not None and task_ignore != declared:
        raise ValueError(
            f"task segmentation: ignore_index={task_ignore} but the dataset "
            f"{getattr(data, 'name', '?')!r} marks void pixels with {declared}; set "
            f"distill.ignore_index: {declared}"
        )
    return task_ignore if task_ignore is not None else declared


class SegmentationTask(DenseTargets):
    """Targets: masks N×H×W of class indices (scenes: 0 = background, c + 1 = class c; a mask
    folder: the pixel value); models built with `in_channels` and `num_classes` = the number of
    mask classes (background included)."""

    name = "segmentation"
    metrics = ("miou", "pixel_accuracy")
    labels = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy"}
    default_hard_loss = "ce"
    target = "mask"
    target_kind = "seg"

    def __init__(self, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index

    def prepare(self, data: Any) -> Any:
        prepared = super().prepare(data)
        void_label(self.ignore_index, prepared)
        return prepared

    def model_kwargs(self, data: Any) -> dict[str, int]:
        return {"in_channels": data.input_shape[0], "num_classes": data.num_seg_classes}

    def new_metric(self, model: nn.Module, data: Any) -> _SegMetric:
        classes = getattr(data, "num_seg_classes", None)
        return _SegMetric(classes, void_label(self.ignore_index, data))
