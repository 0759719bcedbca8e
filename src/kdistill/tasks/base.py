"""The `Task` interface: everything that differs between kinds of problem lives behind it.

A task says which targets the batches carry, what registry models are built with, the hard
loss of the student alone, how a model is evaluated (its metrics; the first one ranks models,
chooses settings on validation and gives the "gap closed" column), which of its metrics are
better when lower (`lower_is_better`: a loss, a perplexity; `is_better` / `better_of` compare
two values either way) and how those metrics are labelled in reports. Nothing outside
`kdistill.tasks` branches on the kind of problem.

A task may have several outputs (a multi-task model returning ``{"seg": …, "det": …}``): then
`outputs` maps each output key to the sub-task that owns it (`CompositeTask`); a single-output
task has ``outputs == {None: self}``.

Evaluation is one loop for every task (`evaluate`): the model runs once per batch and the task's
`Metric` accumulates `update(output, target)`; a metric that can be summed across ranks
(`shardable`) is fed every W-th batch on each of W ranks and `reduce()`d.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from kdistill.data.arrays import Batch, move_to
from kdistill.data.batches import as_batch, call_model
from kdistill.distill.distiller import select_output
from kdistill.ops.collectives import info


class Metric(Protocol):
    """Accumulates one model's outputs over an evaluation set."""

    shardable: bool  # counts that sum over ranks (reduce() makes every rank see the total)

    def update(self, output: Any, target: Any) -> None: ...

    def reduce(self) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Task(Protocol):
    """What a kind of problem decides. See `ClassificationTask` for a complete example.

    Every member a caller uses is declared here. The required ones (`REQUIRED_MEMBERS`) every
    task has; the others have defaults in `TaskDefaults`, which built-in tasks subclass and which
    `with_defaults` supplies to a user's task that does not (``get_task`` does it), so a caller
    reads ``task.member`` directly, never ``getattr(task, member, default)``.
    """

    name: str
    metrics: tuple[str, ...]  # every metric `evaluate` returns (besides "loss"); first ranks
    labels: Mapping[str, str]  # metric → how reports name it ("miou" → "mIoU")
    default_hard_loss: str  # registered loss name of the student-alone objective
    # the metrics that are better when lower ("nll", "perplexity"); the others are better when
    # higher.
    lower_is_better: tuple[str, ...]
    percent_metrics: tuple[str, ...]  # fractions, shown in % by reports (default: all metrics)
    # what a batch's target carries: one of `kdistill.data.kinds.TARGETS` ("class", "mask",
    # "boxes", "mask+boxes", "tokens", "completions"); the data kinds a task reads follow from it
    target: str
    reads_text: bool  # token data (target "tokens" or "completions")
    dense: bool  # masks / boxes: inputs cannot be cropped or flipped alone, no class labels
    default_data: str | None  # the built-in data source of this task ("fashion_mnist", "kjv")
    model_output: str | int | None  # the output of a model the task scores ("logits"; None: all)
    eval_batch_size: int | None  # evaluation batch size (None: the caller's)
    report_models: bool  # `report_section` samples from the models (keep the first seed's)

    @property
    def outputs(self) -> Mapping[str | None, Task]: ...

    @property
    def data_kinds(self) -> tuple[str, ...]:
        """Names of the registered data kinds this task reads (`kdistill.data.kinds`)."""
        ...

    def check(self, data_spec: Mapping[str, Any]) -> None:
        """Validate a recipe's data section for this task: ConfigError naming the kinds this
        task reads (and their files) for another kind, DataError / ConfigError naming the field
        and the fix for a bad field of a kind it reads."""

    def prepare(self, data: Any) -> Any:
        """`data` with the targets this task trains on (e.g. scene masks for segmentation);
        raises `ValueError` naming the dataset when it cannot provide them."""

    def model_kwargs(self, data: Any) -> dict[str, int]:
        """Sizes a registry model of this task is built with (channels, class counts)."""

    def new_metric(self, model: nn.Module, data: Any) -> Metric:
        """An empty metric for `model` evaluated on `data` (any dataset, or None)."""

    def to_batch(self, raw: Any) -> Batch:
        """One item a loader yielded, as a `Batch` (`kdistill.data.batches.as_batch`)."""

    def report_section(self, models: Mapping[str, nn.Module], splits: Any) -> list[str]:
        """Markdown lines the run report adds for this task ([] for none)."""


class TaskDefaults:
    """The defaults of the optional `Task` members; built-in tasks subclass it."""

    lower_is_better: tuple[str, ...] = ()
    target: str = "class"
    default_data: str | None = None
    model_output: str | int | None = None
    eval_batch_size: int | None = None
    report_models: bool = False

    @property
    def percent_metrics(self) -> tuple[str, ...]:
        return tuple(self.metrics)  # type: ignore[attr-defined]

    @property
    def reads_text(self) -> bool:
        return self.target in TEXT_TARGETS

    @property
    def dense(self) -> bool:
        return self.target in DENSE_TARGETS

    @property
    def outputs(self) -> Mapping[str | None, Any]:
        return {None: self}

    @property
    def data_kinds(self) -> tuple[str, ...]:
        from kdistill.data.kinds import kinds_for

        return tuple(kinds_for(self.target))

    def check(self, data_spec: Mapping[str, Any]) -> None:
        from kdistill.data.kinds import resolve

        resolve(self.target, data_spec, task=self.name)  # type: ignore[attr-defined]

    def prepare(self, data: Any) -> Any:
        return data

    def to_batch(self, raw: Any) -> Batch:
        return as_batch(raw)

    def report_section(self, models: Mapping[str, nn.Module], splits: Any) -> list[str]:
        return []


TEXT_TARGETS = ("tokens", "completions")
DENSE_TARGETS = ("mask", "boxes", "mask+boxes")

#: the optional members `TaskDefaults` holds (`with_defaults` supplies them).
OPTIONAL_MEMBERS = (
    "lower_is_better",
    "percent_metrics",
    "target",
    "reads_text",
    "dense",
    "default_data",
    "model_output",
    "eval_batch_size",
    "report_models",
    "outputs",
    "data_kinds",
    "check",
    "prepare",
    "to_batch",
    "report_section",
)


class _WithDefaults(TaskDefaults):
    """A user's task that does not subclass `TaskDefaults`: its own members, the defaults for
    the optional members it lacks."""

    def __init__(self, task: Any) -> None:
        object.__setattr__(self, "_task", task)

    def __getattribute__(self, name: str) -> Any:
        task = object.__getattribute__(self, "_task")
        if name == "_task":
            return task
        if name.startswith("__") or not hasattr(task, name):
            return object.__getattribute__(self, name)
        return getattr(task, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._task, name, value)

    def __repr__(self) -> str:
        return repr(self._task)


def with_defaults(task: Any) -> Task:
    """`task` itself when it subclasses `TaskDefaults`, else a view of it with the defaults of
    the optional members it lacks (`OPTIONAL_MEMBERS`). Its own members always win."""
    if isinstance(task, TaskDefaults):
        return task  # type: ignore[return-value]
    return _WithDefaults(task)  # type: ignore[return-value]


class DenseTargets(TaskDefaults):
    """Shared by tasks whose targets a dataset provides through `with_target(kind)` (masks,
    boxes, or both for scenes): one output unless a subclass says otherwise."""

    name: str
    target_kind: str  # "seg", "det" or "both": what `with_target` is asked for
    default_data = "fashion_mnist_scenes"

    def prepare(self, data: Any) -> Any:
        if not callable(getattr(data, "with_target", None)):
            raise ValueError(
                f"task {self.name}: dataset {getattr(data, 'name', type(data).__name__)!r} has "
                "no dense targets (masks / boxes); read one of the data kinds "
                f"{list(self.data_kinds)} (kdistill.data.kinds) or give a dataset with "
                "with_target('seg' | 'det' | 'both')"
            )
        return data.with_target(self.target_kind)


def primary_metric(task: Task) -> str:
    """The metric that ranks models of `task`: the first of `task.metrics`."""
    return task.metrics[0]


def metric_label(task: Task, metric: str) -> str:
    return task.labels.get(metric, metric)


#: what a Task must have; the other members have defaults (`TaskDefaults`, `OPTIONAL_MEMBERS`).
REQUIRED_MEMBERS = (
    "name",
    "metrics",
    "labels",
    "default_hard_loss",
    "model_kwargs",
    "new_metric",
)


def missing_members(task: Any) -> list[str]:
    """The `REQUIRED_MEMBERS` `task` lacks ([] for a task)."""
    return [name for name in REQUIRED_MEMBERS if not hasattr(task, name)]


def lower_is_better(task: Task, metric: str) -> bool:
    """True when a lower value of `metric` is better (it is in `task.lower_is_better`).
    ValueError for a metric the task does not have."""
    if metric not in task.metrics:
        raise ValueError(f"task {task.name} has no metric {metric!r}; it has {list(task.metrics)}")
    return metric in with_defaults(task).lower_is_better


def is_better(task: Task, metric: str, a: float, b: float) -> bool:
    """True when `a` is strictly better than `b` as values of `task`'s `metric`: lower for a
    metric in `task.lower_is_better` (NLL, perplexity), higher otherwise (accuracy, mIoU).
    A NaN is never better, and any number is better than a NaN."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if lower_is_better(task, metric) else a > b


def better_of(task: Task, metric: str, a: float, b: float) -> float:
    """The better of `a` and `b` (`is_better`); `a` on a tie."""
    return b if is_better(task, metric, b, a) else a


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    task: Task | str,
    device: str | torch.device = "cpu",
    output: str | int | None = None,
) -> dict[str, float]:
    """`task`'s metrics of `model` over `loader` (the model's train/eval mode is restored).

    `loader`: any iterable of the task's batches — kdistill's `BatchLoader`, a plain torch
    ``DataLoader`` over the datasets of `kdistill.data.kinds` or over the user's own dataset
    (each item read by `task.to_batch`). Sizes the metric needs that the loader's dataset does
    not declare (``num_seg_classes``, ``input_shape``, token byte lengths) come from the batches,
    the samples or the model (see each task's `new_metric`).

    `task`: a `Task` or a name / import path (`kdistill.tasks.get_task`). `output`: for a model
    returning a tuple or a dict-like output (e.g. ``(logits, features)``), the position or key
    of the output the task scores, as `Term(output=…)` picks it.

    Under torchrun a `shardable` metric is fed every W-th batch on each of W ranks and summed, so
    every rank returns the figures of the whole loader; other metrics see every batch on every
    rank.
    """
    if isinstance(task, str):
        from kdistill.tasks import get_task

        task = get_task(task)
    task = with_defaults(task)
    world = info()
    metric = task.new_metric(model, getattr(loader, "dataset", None))
    step = world.world_size if metric.shardable else 1
    offset = world.rank if metric.shardable else 0
    was_training = model.training
    model.eval()
    try:
        for number, raw in enumerate(loader):
            if number % step == offset:
                batch = task.to_batch(raw)
                result = call_model(model, move_to(batch.inputs, device))
                if output is not None:
                    result = select_output(result, output, "model")
                metric.update(result, move_to(batch.target, device))
    finally:
        model.train(was_training)
    if metric.shardable:
        metric.reduce()
    return metric.compute()


def lower_is_better_metrics(task: Task) -> tuple[str, ...]:
    """The metrics of `task` where a lower value is better (NLL, perplexity, bits per byte);
    a task says so with a `lower_is_better` attribute (default: none)."""
    return tuple(with_defaults(task).lower_is_better)


def percent_metrics(task: Task) -> tuple[str, ...]:
    """The metrics of `task` that are fractions, shown in % by reports (accuracy, mIoU, mAP);
    a task lists them in a `percent_metrics` attribute (default: all of its metrics)."""
    return tuple(with_defaults(task).percent_metrics)


def best(task: Task, metric: str, items, key):
    """The item of `items` with the best `key(item)` on `metric` (ties: the first listed)."""
    if lower_is_better(task, metric):
        return min(items, key=key)
    return max(items, key=key)
