"""Checks run once before training, on the first batch, so that bad input fails at set-up with a
message naming what was wrong — never after an epoch, and never as a silent wrong result.

- stored teacher outputs must check each batch's inputs (`lookup(index, inputs)`): a bare
  tensor or dict is refused;
- the student (and the teacher, unless its outputs are stored) must accept the batch: a wrong
  number of input channels names the model, its first layer, the expected and the given channels;
- a term comparing the two models' outputs needs the same number of classes on both sides;
- every training label must be a valid class index of the student's output (checked over the
  whole dataset when the loader exposes `dataset.targets`, else on the first batch).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.distiller import Distiller, select_output, select_target
from kdistill.errors import ConfigError, DataError
from kdistill.losses.base import TARGET

_LAYERS_WITH_INPUT_CHANNELS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


@torch.no_grad()
def run_checked(model: nn.Module, inputs: Tensor, side: str) -> Any:
    """`model(inputs)` in eval mode; a failure raises ConfigError naming the model and shapes.

    When the first weighted layer the model called expects another number of input channels
    than the batch has, the message says so (the usual cause: RGB model, grey-scale data).
    """
    names = {module: name for name, module in model.named_modules()}
    first: list[nn.Module] = []

    def remember_first(module: nn.Module, args: tuple) -> None:
        if not first:
            first.append(module)

    handles = [
        module.register_forward_pre_hook(remember_first)
        for module in names
        if isinstance(module, _LAYERS_WITH_INPUT_CHANNELS)
    ]
    was_training = model.training
    model.eval()
    try:
        return model(inputs)
    except (RuntimeError, ValueError, TypeError) as error:
        model_name = type(model).__name__
        shape = tuple(inputs.shape)
        given = shape[1] if inputs.dim() > 1 else None
        if first and given is not None and _in_channels(first[0]) != given:
            layer = first[0]
            raise ConfigError(
                f"wrong input channels: the {side} ({model_name}) expects "
                f"{_in_channels(layer)} input channels (its first layer {names[layer]!r} is "
                f"{layer}), but the data has {given} (batch shape {shape}); build the {side} "
                f"with in_channels={given} or convert the data"
            ) from error
        raise ConfigError(
            f"the {side} ({model_name}) cannot process a training batch of shape {shape}: {error}"
        ) from error
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def check_teacher_outputs(teacher_outputs: Any) -> None:
    """Stored teacher outputs must be an object with `lookup(index, inputs)` (a `TeacherCache`
    or `MemoryTeacherOutputs`), which checks every batch's inputs against the samples the
    outputs were computed on; a bare tensor or dict cannot be checked, so it is refused."""
    if teacher_outputs is None:
        return
    if isinstance(teacher_outputs, Tensor | dict):
        raise ConfigError(
            f"teacher_outputs is a bare {type(teacher_outputs).__name__}: kdistill cannot check "
            "which inputs its rows were computed on (a subset, another order or other data "
            "would give silently wrong teacher outputs); pass "
            "kdistill.cache.MemoryTeacherOutputs.of(outputs, dataset) — the dataset they were "
            "computed on — or MemoryTeacherOutputs.predict(teacher, loader), or a TeacherCache"
        )
    lookup = getattr(teacher_outputs, "lookup", None)
    try:
        inspect.signature(lookup).bind(torch.zeros(1), torch.zeros(1))
    except (TypeError, ValueError):
        raise ConfigError(
            f"teacher_outputs ({type(teacher_outputs).__name__}) needs a method "
            "lookup(index, inputs) -> (output, features) that checks the batch's inputs against "
            "the samples its outputs were computed on (see kdistill.cache.TeacherCache)"
        ) from None


def _stored_teacher_output(teacher_outputs, batch) -> Any:
    return teacher_outputs.lookup(batch.index, batch.inputs)[0]


def _classes(value: Any) -> int | None:
    """The class count (dimension 1) of an `N×K[×…]` tensor, None for anything else."""
    return int(value.shape[1]) if isinstance(value, Tensor) and value.dim() >= 2 else None


def check_before_training(
    distiller: Distiller, batch, loader, device: torch.device, teacher_outputs=None
) -> None:
    """Run the checks listed in the module docstring; raise ConfigError / DataError on a defect."""
    check_teacher_outputs(teacher_outputs)
    inputs = batch.inputs.to(device)
    student_output = run_checked(distiller.student, inputs, "student")
    teacher_output = None
    if distiller.needs_teacher:
        if teacher_outputs is not None:
            teacher_output = _stored_teacher_output(teacher_outputs, batch)
        else:
            assert distiller.teacher is not None
            teacher_output = run_checked(distiller.teacher, inputs, "teacher")
    for name, term in zip(distiller.term_names, distiller.terms):
        if term.student is not None:
            continue
        student_classes = _classes(select_output(student_output, term.output, "student"))
        key = f" (output {term.output!r})" if term.output is not None else ""
        if term.uses_teacher and term.teacher is None and teacher_output is not None:
            teacher_classes = _classes(select_output(teacher_output, term.output, "teacher"))
            if None not in (student_classes, teacher_classes) and (
                student_classes != teacher_classes
            ):
                raise ConfigError(
                    f"class-count mismatch: the teacher outputs {teacher_classes} classes and "
                    f"the student {student_classes}{key}, but term {name!r} compares the two "
                    "outputs; build both models with the dataset's number of classes"
                )
        if (
            TARGET in term.needs
            and student_classes is not None
            and getattr(term.loss, "target_is_class_index", True)
        ):
            check_labels(loader, batch, student_classes, name, term.output)


def check_labels(loader, batch, num_classes: int, term: str, key: str | None = None) -> None:
    """Every label in [0, num_classes): over `loader.dataset.targets` when there, else the batch
    (its `target[key]` for a multi-task target)."""
    targets = getattr(getattr(loader, "dataset", None), "targets", None)
    where = "the training labels"
    if not isinstance(targets, Tensor) or targets.dim() != 1:
        targets, where = select_target(batch.target, key), "the first batch's labels"
    if targets.numel() == 0:
        return
    if targets.dtype.is_floating_point:
        raise DataError(f"{where} must be integer class indices, got dtype {targets.dtype}")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"labels out of range: {where} lie in [{low}, {high}] but the student outputs "
            f"{num_classes} classes (term {term!r} needs labels in [0, {num_classes - 1}])"
        )
