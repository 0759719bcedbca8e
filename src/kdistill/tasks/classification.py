"""Classification: class-index targets, logits `N×K`, top-1 accuracy (and mean cross-entropy)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdistill.engine.metrics import Accuracy
from kdistill.tasks.base import TaskDefaults


class _AccuracyMetric(Accuracy):
    shardable = True


class ClassificationTask(TaskDefaults):
    """Targets: class indices `N` (int64); models built with `in_channels`, `num_classes`."""

    name = "classification"
    metrics = ("accuracy",)
    labels = {"accuracy": "accuracy"}
    default_hard_loss = "ce"
    target = "class"
    default_data = "fashion_mnist"

    def prepare(self, data: Any) -> Any:
        if getattr(data, "target_kind", None) is not None:  # scenes: masks and boxes
            raise ValueError(
                f"task classification: dataset {getattr(data, 'name', data)!r} holds masks and "
                "boxes, not class labels; choose task segmentation, detection or multitask"
            )
        return data

    def model_kwargs(self, data: Any) -> dict[str, int]:
        return {"in_channels": data.input_shape[0], "num_classes": data.num_classes}

    def new_metric(self, model: nn.Module, data: Any) -> _AccuracyMetric:
        return _AccuracyMetric()
