"""Checks run once before training, on the first batch, so that bad input fails at set-up with a
message naming what was wrong — never after an epoch, and never as a silent wrong result.

- stored teacher outputs must check each batch's inputs (`lookup(index, inputs)`): a bare
  tensor or dict is refused;
- the student (and the teacher, unless its outputs are stored) must accept the batch: a wrong
  number of input channels names the model, its first layer, the expected and the given channels;
- a term comparing the two models' outputs needs the same number of classes on both sides
  (dimension 1 of N×K[×H×W] scores; the vocabulary, the last dimension, of token logits N×L×V,
  up to a loss's `vocab_size`);
- every training label must be a valid class index of the student's output (checked over the
  whole dataset when the loader exposes `dataset.targets`, else on the first batch);
- the batches must carry what the terms need: labels for a term reading the target, the dataset
  index for a term that needs it (CRD) and for stored teacher outputs;
- the loader itself (`check_loader`): it has a length, can be iterated once per epoch, and its
  batch size agrees with `TrainConfig.batch_size` when the user set that explicitly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.data.arrays import Batch, move_to
from kdistill.data.batches import call_model, describe_inputs, shard_count
from kdistill.distill.distiller import Distiller, select_output, select_target
from kdistill.distill.teacher.base import as_source
from kdistill.engine.config import TrainConfig
from kdistill.errors import ConfigError, DataError, KdistillError
from kdistill.losses.base import INDEX, TARGET

log = logging.getLogger("kdistill")

_LAYERS_WITH_INPUT_CHANNELS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


@torch.no_grad()
def run_checked(model: nn.Module, inputs: Tensor | Mapping[str, Any], side: str) -> Any:
    """`model(inputs)` (``model(**inputs)`` for a dict) in eval mode; a failure raises
    ConfigError naming the model and shapes.

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
        return call_model(model, inputs)
    except KdistillError:
        raise  # already names the field and the fix (e.g. a model's `output:` it lacks)
    except (RuntimeError, ValueError, TypeError) as error:
        model_name = type(model).__name__
        if not isinstance(inputs, Tensor):
            raise ConfigError(
                f"the {side} ({model_name}) cannot process a training batch "
                f"{describe_inputs(inputs)} given as {side}(**batch): {error}"
            ) from error
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
    """Stored teacher outputs must be a teacher source (`kdistill.distill.teacher.base`): an
    object with ``for_batch(batch)`` or ``lookup(index, inputs)`` that checks every batch's
    inputs against the samples its outputs were computed on; a bare tensor or dict cannot be
    checked, so it is refused (ConfigError, from `as_source`)."""
    as_source(teacher_outputs)


def _classes(value: Any, loss: Any = None) -> int | None:
    """The class count of an `N×K[×…]` tensor (dimension 1), or of token logits `N×L×V` (the
    last dimension) for a loss with ``class_dim = -1``; None for anything else."""
    if not isinstance(value, Tensor) and isinstance(getattr(value, "vocab_size", None), int):
        return value.vocab_size  # a stored distribution (top-k teacher): over its vocabulary
    if not (isinstance(value, Tensor) and value.dim() >= 2):
        return None
    return int(value.shape[getattr(loss, "class_dim", 1)])


def _compared_classes(value: Any, loss: Any) -> int | None:
    """The classes a loss compares: its `vocab_size` (token losses comparing a head padded past
    the tokenizer on the real vocabulary) when that is below the tensor's count, else them all."""
    classes = _classes(value, loss)
    vocab_size = getattr(loss, "vocab_size", None)
    if classes is None or not isinstance(vocab_size, int) or vocab_size > classes:
        return classes
    return vocab_size


@contextlib.contextmanager
def _heads_captured(heads: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, every head in `heads` (`kdistill.taps.HeadCapture`) records its input
    instead of computing the logits."""
    with contextlib.ExitStack() as stack:
        for head in heads.values():
            stack.enter_context(head.capturing())
        yield


def check_before_training(
    distiller: Distiller, batch, loader, device: torch.device, teacher_outputs=None
) -> None:
    """Run the checks listed in the module docstring; raise ConfigError / DataError on a defect.

    `teacher_outputs`: None (the live teacher) or a teacher source (see `as_source`)."""
    source = as_source(teacher_outputs)
    stored = None if getattr(source, "live", False) else source
    check_batch_carries(distiller, batch, stored)
    inputs = move_to(batch.inputs, device)
    # a chunked vocabulary loss's head does not run here either: its N×L×V logits, which the
    # chunked loss exists to avoid, would be built on the first batch (a zero-stride stand-in
    # of the same shape takes their place, as in training)
    with _heads_captured(distiller.student_heads):
        student_output = run_checked(distiller.student, inputs, "student")
    teacher_output = None
    if distiller.needs_teacher:
        if stored is not None:
            teacher_output = stored.for_batch(batch).output
        else:
            assert distiller.teacher is not None
            with _heads_captured(distiller.teacher_heads):
                teacher_output = run_checked(distiller.teacher, inputs, "teacher")
    for name, term in zip(distiller.term_names, distiller.terms):
        if term.student is not None:
            continue
        student_value = select_output(student_output, term.output, "student")
        student_classes = _classes(student_value, term.loss)
        key = f" (output {term.output!r})" if term.output is not None else ""
        if (
            term.uses_teacher
            and term.teacher is None
            and teacher_output is not None
            and getattr(term.loss, "compares_classes", False)
        ):
            teacher_value = select_output(teacher_output, term.output, "teacher")
            compared = (
                _compared_classes(student_value, term.loss),
                _compared_classes(teacher_value, term.loss),
            )
            teacher_classes = _classes(teacher_value, term.loss)
            if None not in compared and compared[0] != compared[1]:
                fix = (
                    "if the extra rows of one head are padding, set the loss's "
                    "vocab_size=<tokenizer size>; different vocabularies cannot be compared "
                    "token by token"
                    if getattr(term.loss, "class_dim", 1) == -1
                    else "build both models with the dataset's number of classes"
                )
                raise ConfigError(
                    f"class-count mismatch: the teacher outputs {teacher_classes} classes and "
                    f"the student {student_classes}{key}, but term {name!r} compares the two "
                    f"outputs; {fix}"
                )
        if (
            TARGET in term.needs
            and student_classes is not None
            and getattr(term.loss, "target_is_class_index", True)
        ):
            ignore_index = getattr(term.loss, "ignore_index", None)
            classes = _compared_classes(student_value, term.loss)
            check_labels(loader, batch, classes, name, term.output, ignore_index)


def check_batch_carries(distiller: Distiller, batch: Batch, teacher_outputs=None) -> None:
    """The batch holds the labels and the dataset index that the terms (and stored teacher
    outputs) read; ConfigError naming the term and where such data comes from otherwise."""
    if batch.index is None:
        users = [n for n, t in zip(distiller.term_names, distiller.terms) if INDEX in t.needs]
        if users or teacher_outputs is not None:
            needs = f"terms {users}" if users else "stored teacher outputs (teacher_outputs=)"
            raise ConfigError(
                f"{needs} need each sample's dataset index, but the loader's batches carry "
                "none; yield (inputs, target, index) tuples (a Dataset returning "
                "(x, y, i)), a dict batch with an 'index' key, or use kdistill's BatchLoader"
            )
    if batch.target is None:
        users = [n for n, t in zip(distiller.term_names, distiller.terms) if TARGET in t.needs]
        if users:
            raise ConfigError(
                f"terms {users} need labels, but the loader's batches carry none; yield "
                "(inputs, target) tuples or a dict batch with a 'labels' key"
            )


def check_loader(loader: Any, config: TrainConfig, first_batch: Batch, label: str) -> None:
    """The training loader can be read once per epoch, and its batch size is the one asked for.

    - it needs `len()` (batches per epoch: the learning-rate schedule is laid out from it);
    - a one-shot iterator (a generator) is refused: epoch 2 would silently see no data;
    - `TrainConfig.batch_size` is never silently ignored. When the user set it explicitly
      (``"batch_size" in config.model_fields_set``) and the loader states another global batch
      (its `batch_size` × the number of shards it splits an epoch into), that is a ConfigError
      naming both; a loader that states no `batch_size` is compared through its first batch,
      with a warning only (a short last or only batch is legitimate). When the user did not
      set it, the loader's batch size is used and logged.
    """
    name = type(loader).__name__
    if isinstance(loader, Iterator):
        raise ConfigError(
            f"the training loader is a one-shot iterator ({name}): it would be empty after the "
            "first epoch; pass a DataLoader, a list of batches or another re-iterable object"
        )
    try:
        len(loader)
    except TypeError as error:
        raise ConfigError(
            f"the training loader ({name}) has no len(): fit needs the number of batches per "
            "epoch for the learning-rate schedule; use a DataLoader over a map-style Dataset "
            "(or an IterableDataset with __len__), or a list of batches"
        ) from error
    shards = shard_count(loader)
    stated = getattr(loader, "batch_size", None)
    explicit = "batch_size" in config.model_fields_set
    if isinstance(stated, int):
        loader_batch = stated * shards
        where = f"batch_size={stated}" + (f" × {shards} ranks" if shards > 1 else "")
        if explicit and loader_batch != config.batch_size:
            raise ConfigError(
                f"{label}: TrainConfig(batch_size={config.batch_size}) but the training loader "
                f"({name}) gives batches of {loader_batch} ({where}); the loader decides the "
                f"batch, so build it with batch_size={config.batch_size // shards} or leave "
                "TrainConfig.batch_size unset"
            )
    else:
        loader_batch = len(first_batch) * shards
        if explicit and loader_batch != config.batch_size:
            log.warning(
                "%s: TrainConfig(batch_size=%d) but the training loader's (%s) first batch holds "
                "%d samples; the loader decides the batch size",
                label,
                config.batch_size,
                name,
                loader_batch,
            )
    if not explicit:
        log.info("%s: batch size %d, from the training loader (%s)", label, loader_batch, name)


def check_labels(
    loader,
    batch,
    num_classes: int,
    term: str,
    key: str | None = None,
    ignore_index: int | None = None,
) -> None:
    """Every label in [0, num_classes) or equal to `ignore_index` (the term's void label, e.g.
    255 or -100): over `loader.dataset.targets` when there, else the batch (its `target[key]` for
    a multi-task target)."""
    targets = getattr(getattr(loader, "dataset", None), "targets", None)
    where = "the training labels"
    if not isinstance(targets, Tensor) or targets.dim() != 1:
        targets, where = select_target(batch.target, key), "the first batch's labels"
    if targets.numel() == 0:
        return
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise DataError(
            f"{where} must be integer class indices, got dtype {targets.dtype}; convert them "
            "with .long() if they are whole numbers"
        )
    if ignore_index is not None:
        targets = targets[targets != ignore_index]
        if targets.numel() == 0:
            return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        shown = ignore_index is not None and ignore_index != -100  # -100: CE's default
        void = f" or ignore_index={ignore_index}" if shown else ""
        # the void conventions: 255 (VOC / Cityscapes masks), negative (-1, -100 padding)
        suspect = low if low < 0 else high if high == 255 else None
        hint = (
            f"; if {suspect} marks void labels, build the loss with ignore_index={suspect} "
            "(recipes: distill.ignore_index)"
            if suspect is not None and suspect != ignore_index
            else ""
        )
        raise DataError(
            f"labels out of range: {where} lie in [{low}, {high}] but the student outputs "
            f"{num_classes} classes (term {term!r} needs labels in [0, {num_classes - 1}]"
            f"{void}){hint}"
        )
