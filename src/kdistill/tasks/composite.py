"""A multi-task problem as a composite of tasks keyed by output name.

The model returns a dict (``{"seg": …, "det": …}``), the batches carry a dict target with the
same keys, and each key's sub-task owns its part: its hard loss, its metrics (reported side by
side; the composite's first metric ranks). Registry models are built with the sizes of one
sub-task (`sizes_from`; multitask: the detector's object classes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from kdistill.tasks.base import DenseTargets


class _CompositeMetric:
    def __init__(self, parts: Mapping[str, Any]) -> None:
        self.parts = dict(parts)
        self.shardable = all(part.shardable for part in self.parts.values())

    def update(self, output: Any, target: Any) -> None:
        if not isinstance(output, Mapping) or not set(self.parts) <= set(output):
            raise TypeError(
                f"a multi-task model must return a dict with keys {sorted(self.parts)}, got "
                f"{type(output).__name__}"
                + (f" with keys {sorted(output)}" if isinstance(output, Mapping) else "")
            )
        for key, part in self.parts.items():
            part.update(output[key], target[key])

    def reduce(self) -> None:
        for part in self.parts.values():
            part.reduce()

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for part in self.parts.values():
            results.update(part.compute())
        return results


class CompositeTask(DenseTargets):
    """Sub-tasks keyed by the model's output names; `metrics` lists theirs in the order given
    by `metric_order` (default: the sub-tasks' order)."""

    target_kind = "both"
    target = "mask+boxes"
    default_hard_loss = "ce"  # each output's hard loss is its sub-task's (see recipes.objective)

    def __init__(
        self,
        name: str,
        parts: Mapping[str, Any],
        metric_order: tuple[str, ...] | None = None,
        sizes_from: str | None = None,
    ) -> None:
        if not parts:
            raise ValueError("a composite task needs at least one sub-task")
        self.name = name
        self.parts = dict(parts)
        every = [metric for part in self.parts.values() for metric in part.metrics]
        self.metrics = tuple(metric_order) if metric_order else tuple(every)
        if sorted(self.metrics) != sorted(every):
            raise ValueError(f"metric_order {metric_order} must list the metrics {every}")
        self.labels = {k: v for part in self.parts.values() for k, v in part.labels.items()}
        self.lower_is_better = tuple(
            metric for part in self.parts.values() for metric in part.lower_is_better
        )
        self.sizes_from = sizes_from or next(iter(self.parts))

    @property
    def outputs(self):
        return dict(self.parts)

    def model_kwargs(self, data: Any) -> dict[str, int]:
        sizes = self.parts[self.sizes_from].model_kwargs(data)
        seg = getattr(data, "num_seg_classes", None)
        if seg is not None and "num_classes" in sizes and seg != sizes["num_classes"] + 1:
            # masks whose classes are not "background + the box classes" (the scenes' layout,
            # `MultiTaskNet`'s default): the segmentation head is sized by the masks
            sizes["seg_classes"] = int(seg)
        return sizes

    def new_metric(self, model: nn.Module, data: Any) -> _CompositeMetric:
        metrics = {key: part.new_metric(model, data) for key, part in self.parts.items()}
        return _CompositeMetric(metrics)
