"""Tasks: what differs between kinds of problem (see `kdistill.tasks.base.Task`).

| name              | targets          | metrics (the first one ranks)       | default hard loss |
|-------------------|------------------|-------------------------------------|-------------------|
| classification    | class indices    | accuracy                            | ce                |
| segmentation      | masks N×H×W      | mIoU, pixel accuracy                | ce                |
| detection         | boxes N×M×5      | mAP@0.5 (VOC all-point)             | yolo              |
| multitask         | {"seg", "det"}   | mIoU, pixel accuracy, mAP@0.5       | per output        |
| language_modeling | labels N×L       | NLL, perplexity, next-token         | token_ce          |
| (alias lm)        | (token blocks)   | accuracy, bits per byte             |                   |
| completion        | labels N×L on    | as language_modeling, on the        | token_ce          |
|                   | completions only | completion tokens                   |                   |

A metric is better when higher unless the task lists it in `lower_is_better` (language
modelling: NLL, perplexity, bits per byte); `is_better` / `better_of` compare either way.

`get_task(name)` builds one by name, or from an import path ``package.module:attr`` naming a
`Task` instance, class or factory (a user's own task).
"""

from __future__ import annotations

import importlib
from typing import Any

from kdistill.registry import unknown_name_message
from kdistill.tasks.base import (
    Metric,
    Task,
    TaskDefaults,
    best,
    better_of,
    evaluate,
    is_better,
    lower_is_better,
    lower_is_better_metrics,
    metric_label,
    missing_members,
    percent_metrics,
    primary_metric,
    with_defaults,
)
from kdistill.tasks.classification import ClassificationTask
from kdistill.tasks.completion import CompletionTask
from kdistill.tasks.composite import CompositeTask
from kdistill.tasks.detection import DetectionTask
from kdistill.tasks.language_modeling import LanguageModelingTask, sample_continuations
from kdistill.tasks.segmentation import SegmentationTask


def multitask(ignore_index: int | None = None) -> CompositeTask:
    """Segmentation (output "seg") + detection (output "det"); models sized as detectors."""
    return CompositeTask(
        "multitask",
        {"seg": SegmentationTask(ignore_index), "det": DetectionTask()},
        sizes_from="det",
    )


BUILTIN = {
    "classification": ClassificationTask,
    "segmentation": SegmentationTask,
    "detection": DetectionTask,
    "multitask": multitask,
    "language_modeling": LanguageModelingTask,
    "completion": CompletionTask,
}
#: other names of built-in tasks.
ALIASES = {"lm": "language_modeling"}


def task_names() -> list[str]:
    return sorted(BUILTIN)  # aliases (ALIASES) are left out


def get_task(spec: str | Task, **options: Any) -> Task:
    """A task by built-in name (`options` go to its constructor, e.g. ``ignore_index``), or by
    import path ``package.module:attr`` (an instance, or a class / factory called with no
    arguments). Raises `ValueError` naming the spec and the known names."""
    if not isinstance(spec, str):
        return _checked(spec, type(spec).__name__)
    spec = ALIASES.get(spec, spec)
    if spec in BUILTIN:
        try:
            return BUILTIN[spec](**options)
        except TypeError:
            raise ValueError(f"task {spec} takes no option(s) {sorted(options)}") from None
    if ":" not in spec:
        raise ValueError(unknown_name_message("task", spec, BUILTIN))
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"task {spec!r}: cannot import module {module_name!r} ({error})") from None
    if not hasattr(module, attr):
        raise ValueError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}")
    found = getattr(module, attr)
    if not isinstance(found, type) and (not missing_members(found) or not callable(found)):
        return _checked(found, spec)
    try:
        task = found()
    except TypeError as error:
        raise ValueError(
            f"task {spec!r}: not a kdistill Task, and calling it with no arguments failed ({error})"
        ) from None
    return _checked(task, spec)


def _checked(task: Any, spec: str) -> Task:
    if isinstance(task, type):
        raise ValueError(f"task {spec}: not a kdistill Task but a class; pass an instance")
    missing = missing_members(task)
    if missing:
        raise ValueError(f"task {spec}: not a kdistill Task; it lacks {missing}")
    if not task.metrics:
        raise ValueError(f"task {spec}: `metrics` is empty; the first metric ranks models")
    return with_defaults(task)


__all__ = [
    "BUILTIN",
    "ClassificationTask",
    "CompletionTask",
    "CompositeTask",
    "ALIASES",
    "DetectionTask",
    "LanguageModelingTask",
    "Metric",
    "SegmentationTask",
    "Task",
    "TaskDefaults",
    "better_of",
    "evaluate",
    "is_better",
    "lower_is_better",
    "get_task",
    "metric_label",
    "multitask",
    "primary_metric",
    "best",
    "lower_is_better_metrics",
    "percent_metrics",
    "sample_continuations",
    "task_names",
    "with_defaults",
]
