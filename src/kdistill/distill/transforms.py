"""Per-batch transforms: hooks the engine calls on every micro-batch before it is counted and run.

    batch, changed = transform.apply(student, batch, key, rank)

`kd.fit(..., batch_transforms=[...])` calls each transform, in order, on each loader batch (a
`Batch`, inputs on the CPU as the loader gives them) with the batch's `key` — its position in
training, ``epoch · batches per epoch + batch``, so that a resumed run draws the same — and the
process's `rank`. A transform returns the batch to train on and whether it changed it; the
epoch's record gives the share of batches each transform changed, as ``<name>_share``. Before
training, `check(source, label)` lets a transform refuse a teacher source it cannot work with.

The engine knows no particular transform: on-policy sampling (GKD) is `OnPolicyTransform`, made
from the recipe's settings by `on_policy_transform`.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdistill.data.arrays import Batch
from kdistill.distill.onpolicy import OnPolicy
from kdistill.distill.teacher.base import TeacherSource
from kdistill.errors import ConfigError

__all__ = ["BatchTransform", "OnPolicyConfig", "OnPolicyTransform", "on_policy_transform"]


class BatchTransform(Protocol):
    """A per-batch data transform the engine calls (see the module docstring)."""

    name: str  # the epoch record reports ``<name>_share``

    def check(self, source: TeacherSource, label: str) -> None:
        """Raise ConfigError when this transform cannot train with `source`."""
        ...

    def apply(self, student: nn.Module, batch: Batch, key: int, rank: int) -> tuple[Batch, bool]:
        """(the batch to train on, whether it differs from `batch`)."""
        ...


class OnPolicyConfig(BaseModel):
    """GKD's on-policy / mixed data (Agarwal et al. 2024; `kdistill.onpolicy`): with
    probability `lmbda` a batch's completions are replaced by the student's samples."""

    model_config = ConfigDict(extra="forbid")

    lmbda: float = Field(
        ge=0,
        le=1,
        description="probability that a batch is the student's own samples (0: the data's "
        "completions, supervised KD; 1: always on-policy)",
    )
    temperature: float = Field(
        1.0, gt=0, description="the student samples from softmax(logits / temperature); no top-k"
    )
    max_new_tokens: int = Field(
        32, ge=1, description="longest sampled completion (tokens, its end token included)"
    )
    seed: int | None = Field(
        None,
        description="with the batch's position in training, fixes the coin and the samples; "
        "default: the training loader's seed (in a recipe the student's seed, so every seed "
        "draws its own batches); a number: the same draws whatever the loader's seed (in a "
        "recipe, plus the student's seed index: seed + 1 draws as on_policy.seed + 1)",
    )


class OnPolicyTransform:
    """GKD's mixed data as a batch transform: with probability λ (drawn from the batch's key) a
    prompt → completion batch's completions are replaced by the student's samples
    (`OnPolicy.apply`). It needs the live teacher: stored teacher outputs were computed on the
    data's completions, not on the student's samples."""

    name = "on_policy"

    def __init__(self, sampler: OnPolicy):
        self.sampler = sampler

    def check(self, source: TeacherSource, label: str) -> None:
        if not getattr(source, "live", False):
            raise ConfigError(
                f"{label}: train.on_policy replaces completions by the student's samples, which "
                "stored teacher outputs do not cover; run the teacher online (teacher_cache: off)"
            )

    def apply(self, student: nn.Module, batch: Batch, key: int, rank: int) -> tuple[Batch, bool]:
        return self.sampler.apply(student, batch, key, rank)

    def __repr__(self) -> str:
        return f"OnPolicyTransform({self.sampler!r})"


def on_policy_transform(spec: OnPolicyConfig, loader: Any) -> OnPolicyTransform:
    """`spec` as a transform sampling ids below the loader's dataset's `vocab_size` and stopping
    at its `end_id` (when it has them; else <eos>), keyed by `spec.seed` or, unset, the loader's
    `seed` (0 when it has none)."""
    dataset = getattr(loader, "dataset", None)
    vocab_size = getattr(dataset, "vocab_size", None)
    end_id = getattr(dataset, "end_id", None)
    seed = spec.seed  # unset: the loader's seed, so runs with different seeds draw differently
    if seed is None:
        seed = getattr(loader, "seed", 0)
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    sampler = OnPolicy(
        spec.lmbda,
        spec.temperature,
        spec.max_new_tokens,
        seed,
        vocab_size if isinstance(vocab_size, int) else None,
        **({"eos_id": end_id} if isinstance(end_id, int) else {}),
    )
    return OnPolicyTransform(sampler)
