"""Training settings the engine understands (validated by pydantic; recipes embed them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """How one model is trained: budget, optimiser, schedule, and what to do on a bad batch."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=1, description="samples per optimiser step")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="the optimiser")
    lr: float = Field(1e-3, gt=0, description="the initial learning rate")
    weight_decay: float = Field(0.0, ge=0, description="adam, sgd: L2 penalty; adamw: decoupled")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["constant", "cosine", "step"] = Field(
        "cosine", description="learning-rate schedule over all steps (cosine: to 0 at the end)"
    )
    step_epochs: int = Field(1, ge=1, description="step schedule: decay every this many epochs")
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: lr factor per decay")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="stop after this many optimiser steps in all (a budget in steps, as language "
        "models are usually given): the epoch it falls in ends there, is evaluated and "
        "checkpointed; the cosine schedule spans min(epochs × steps per epoch, max_steps)",
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="linear learning-rate warm-up over this many optimiser steps (the first at "
        "lr / warmup_steps), then the schedule; 0: none",
    )
    accumulate_steps: int = Field(
        1,
        ge=1,
        description="gradient accumulation: sum the gradients of this many consecutive loader "
        "batches (micro-batches) per optimiser step, normalised as one big batch",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss stops the run (naming the term) or skips the batch"
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="every this many optimiser steps (0: at epoch ends only)"
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:1, mps, …")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forward; fp16 (with loss scaling) needs CUDA"
    )
    allow_uncounted_epochs: bool = Field(
        False,
        description="an epoch in which a token-counting term counts no token (every label "
        "−100) is an error naming the term, as it trained that term on nothing; true: a "
        "warning only",
    )
    progress: bool = Field(True, description="progress bars (CLI: --quiet turns them off)")
    log: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="trackers that also receive every metrics.jsonl record: tensorboard (event "
        "files in <run>/tensorboard), mlflow (a local store in <run>/mlflow); optional extras "
        "pip install 'kdistill[tensorboard]' / 'kdistill[mlflow]'",
    )

    @model_validator(mode="after")
    def precision_fits_device(self) -> TrainConfig:
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise ValueError(
                f"precision fp16 needs a CUDA device (device is {self.device!r}); "
                "use bf16 on the CPU"
            )
        return self
