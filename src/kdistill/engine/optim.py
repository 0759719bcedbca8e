"""Optimiser and learning-rate schedule from a TrainConfig."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from kdistill.engine.config import TrainConfig


def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimiser steps of the whole training: epochs × steps per epoch, or `max_steps` when
    that is fewer."""
    total = config.epochs * steps_per_epoch
    max_steps = getattr(config, "max_steps", None)
    return total if max_steps is None else min(total, max_steps)


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate after `step` optimiser steps.

    cosine: ½(1 + cos(π·step/total)), stepped per batch; step: γ^(epoch // step_epochs).
    With `warmup_steps` = W > 0 the factor is first multiplied by (step + 1) / W for the first W
    steps (linear warm-up, the first step at lr/W), then the schedule runs as written.
    """
    warmup = getattr(config, "warmup_steps", 0)
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * _schedule_factor(config, step, steps_per_epoch)


def _schedule_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    if config.schedule == "cosine":
        total = max(1, total_steps(config, steps_per_epoch))
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if config.schedule == "step":
        return config.step_gamma ** ((step // max(1, steps_per_epoch)) // config.step_epochs)
    return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, steps_per_epoch)
    )
