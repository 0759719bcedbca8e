"""The teacher-source protocol: where the engine reads the teacher's outputs for a batch from.

    source.for_batch(batch) -> TeacherOutputs(output, features)

(``for_batch``, not ``outputs``: `MemoryTeacherOutputs.outputs` holds its rows.) One method the
engine calls for every (micro-)batch, on the loader's batch (inputs on the CPU as
the loader gives them). Each source checks that the batch is the one its outputs belong to and
raises `CacheError` naming the sample, the check that failed and the fix — never a stale value.

Sources (a new kind of teacher is a new source here, never a branch in the engine):

- `LiveTeacher` — the distiller's own teacher runs on the batch inside the training step
  (eager, or sped up with ``Distiller(teacher_speedup=…)``, `kdistill.distill.teacher.speedup`);
  its `for_batch` is empty (`TeacherOutputs.live`), so the forward computes them.
- `MemoryTeacherOutputs` — outputs in memory (`kdistill.distill.teacher.store.memory`).
- `TeacherCache` — stored image outputs (`kdistill.distill.teacher.store.images`).
- `TokenTeacherCache` — stored top-k token distributions (`kdistill.distill.teacher.store.tokens`).
- generated sequences — the teacher's completions as training data
  (`kdistill.distill.teacher.sequences`).

`as_source(obj)` turns what a user passes to ``fit(teacher_outputs=…)`` into a source: None is the
live teacher; an object with ``lookup(index, inputs) -> (output, features)`` (the protocol before
issue 26) is adapted; a bare tensor or dict is refused (its rows cannot be checked).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from kdistill.data.arrays import Batch
from kdistill.errors import ConfigError
from kdistill.losses.topk import TopKDistribution

__all__ = [
    "LiveTeacher",
    "LookupSource",
    "StoredOutputs",
    "TeacherOutputs",
    "TeacherSource",
    "as_source",
    "follow_epoch",
]


@dataclass
class TeacherOutputs:
    """The teacher's outputs for one batch.

    `output`: a tensor ``N×…``, a dict of them (a multi-task teacher), or a stored distribution
    (`TopKDistribution`, or a dict holding one); None means the live teacher computes it in the
    training step. `features`: ``{layer: N×…}`` of the tapped teacher layers the source holds,
    or None (the live teacher then runs for them).
    """

    output: Any = None
    features: dict[str, Tensor] | None = None

    @classmethod
    def live(cls) -> TeacherOutputs:
        """Nothing stored: the distiller runs its teacher on the batch."""
        return cls(None, None)

    def to(self, device: torch.device | str) -> TeacherOutputs:
        """The same outputs on `device` (tensors and stored distributions, in dicts too)."""
        output = self.output
        if isinstance(output, Mapping):
            output = {key: value.to(device) for key, value in output.items()}
        elif isinstance(output, Tensor | TopKDistribution):
            output = output.to(device)
        features = self.features
        if features is not None:
            features = {key: value.to(device) for key, value in features.items()}
        return TeacherOutputs(output, features)


@runtime_checkable
class TeacherSource(Protocol):
    """Where the teacher's outputs for a batch come from: a live model, a store, memory.

    `layers`: the tapped teacher layers whose features it provides. A source may also have
    `set_epoch(epoch)`, called at the start of every epoch (stored views of augmented samples are
    per epoch; see `follow_epoch`).
    """

    @property
    def layers(self) -> list[str]: ...

    def for_batch(self, batch: Batch) -> TeacherOutputs:
        """The teacher's outputs for exactly this batch; raises CacheError naming the sample,
        the check that failed and the fix when the batch is not the one they belong to."""
        ...


class LiveTeacher:
    """The live teacher: the distiller runs it on every batch (eager or sped up), in eval mode,
    without gradients, inside the training step (so under its autocast and device). Its outputs
    belong to the batch by construction; `for_batch` returns `TeacherOutputs.live()`."""

    layers: list[str] = []
    live = True

    def for_batch(self, batch: Batch) -> TeacherOutputs:
        return TeacherOutputs.live()

    def __repr__(self) -> str:
        return "LiveTeacher()"


class StoredOutputs:
    """Mixin of the stores: `for_batch(batch)` is their checked ``lookup(index, inputs)``."""

    live = False

    def lookup(self, index: Tensor, inputs: Any) -> tuple[Any, dict[str, Tensor] | None]:
        raise NotImplementedError

    def for_batch(self, batch: Batch) -> TeacherOutputs:
        """The stored outputs of the batch's samples (by `batch.index`), after checking the
        batch's inputs against the signatures of the samples they were computed on."""
        output, features = self.lookup(batch.index, batch.inputs)
        return TeacherOutputs(output, features)


class LookupSource(StoredOutputs):
    """A user's object with ``lookup(index, inputs) -> (output, features)`` as a source (the
    protocol of kdistill before issue 26); its `lookup` must check the inputs."""

    def __init__(self, stored: Any):
        self.stored = stored

    @property
    def layers(self) -> list[str]:
        return list(getattr(self.stored, "layers", []))

    def lookup(self, index: Tensor, inputs: Any) -> tuple[Any, dict[str, Tensor] | None]:
        return self.stored.lookup(index, inputs)

    def set_epoch(self, epoch: int) -> None:
        follow_epoch(self.stored, epoch)

    def __repr__(self) -> str:
        return f"LookupSource({self.stored!r})"


def as_source(teacher_outputs: Any) -> TeacherSource:
    """What ``fit(teacher_outputs=…)`` was given, as a `TeacherSource`.

    None → `LiveTeacher`; a `TeacherSource` → itself; an object with ``lookup(index, inputs)``
    → `LookupSource`. Raises ConfigError for a bare tensor or dict (kdistill could not check
    which inputs its rows were computed on) and for any other object, naming the fix.
    """
    if teacher_outputs is None:
        return LiveTeacher()
    if isinstance(teacher_outputs, Tensor | dict):
        raise ConfigError(
            f"teacher_outputs is a bare {type(teacher_outputs).__name__}: kdistill cannot check "
            "which inputs its rows were computed on (a subset, another order or other data "
            "would give silently wrong teacher outputs); pass "
            "kdistill.cache.MemoryTeacherOutputs.of(outputs, dataset) — the dataset they were "
            "computed on — or MemoryTeacherOutputs.predict(teacher, loader), or a TeacherCache"
        )
    if callable(getattr(teacher_outputs, "for_batch", None)):
        return teacher_outputs
    if callable(getattr(teacher_outputs, "lookup", None)) and _takes(teacher_outputs.lookup, 2):
        return LookupSource(teacher_outputs)
    raise ConfigError(
        f"teacher_outputs ({type(teacher_outputs).__name__}) needs a method "
        "lookup(index, inputs) -> (output, features) that checks the batch's inputs against "
        "the samples its outputs were computed on (see kdistill.cache.TeacherCache)"
    )


def _takes(method: Any, count: int) -> bool:
    try:
        inspect.signature(method).bind(*([torch.zeros(1)] * count))
    except (TypeError, ValueError):
        return False
    return True


def follow_epoch(source: Any, epoch: int) -> None:
    """Stored teacher outputs of augmented views are per epoch: tell the source which runs."""
    if callable(getattr(source, "set_epoch", None)):
        source.set_epoch(epoch)
