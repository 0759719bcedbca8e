"""The training loop: epochs of optimiser steps, evaluation, metrics lines and checkpoints.

It knows nothing of particular losses: it calls the Distiller, back-propagates `out.loss`, and
reports `out.parts`. Features are plain flags on `TrainConfig`, not callbacks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.distiller import Distiller
from kdistill.engine.checkpoint import (
    load_checkpoint,
    load_weights,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    strip_prefix,
    with_prefix,
)
from kdistill.engine.config import TrainConfig
from kdistill.engine.optim import make_optimizer, make_scheduler
from kdistill.errors import NonFiniteLossError

log = logging.getLogger("kdistill")

CHECKPOINT_NAME = "last"
Evaluate = Callable[[nn.Module], dict[str, float]]


class MetricsLog:
    """Appends one JSON object per line (`metrics.jsonl`); each line is flushed at once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    seconds: float = 0.0
    skipped_batches: int = 0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def trained_state(distiller: Distiller) -> dict[str, Tensor]:
    """What training changes: student, connectors and loss-owned parameters (never the teacher)."""
    return {
        **with_prefix("student", distiller.student.state_dict()),
        **with_prefix("connectors", distiller.connectors.state_dict()),
        **with_prefix("losses", distiller.losses.state_dict()),
    }


def load_trained_state(distiller: Distiller, tensors: dict[str, Tensor], source: str) -> None:
    load_weights(distiller.student, strip_prefix("student", tensors), "student", source)
    load_weights(distiller.connectors, strip_prefix("connectors", tensors), "connectors", source)
    load_weights(distiller.losses, strip_prefix("losses", tensors), "loss modules", source)


def _save(directory, distiller, optimizer, scheduler, label, epoch, step, history, config):
    optim_tensors, optim_meta = optimizer_to_flat(optimizer)
    tensors = {**trained_state(distiller), **optim_tensors, "rng.torch": torch.get_rng_state()}
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        "label": label,
        "epoch": epoch,
        "step": step,
        "history": history,
        "optimizer": optim_meta,
        "scheduler": scheduler_state,
        "config": config.model_dump(),
    }
    save_checkpoint(directory, CHECKPOINT_NAME, tensors, state)


def fit(
    distiller: Distiller,
    train_loader,
    config: TrainConfig,
    *,
    evaluate: Evaluate | None = None,
    label: str = "model",
    metrics_log: MetricsLog | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    teacher_outputs: Tensor | None = None,
) -> FitResult:
    """Train `distiller`'s student (and connectors) for `config.epochs` epochs.

    `teacher_outputs`: the teacher's outputs for every training sample, indexed by
    `batch.index` (offline distillation); the teacher then never runs during training.
    With `resume`, training continues from `checkpoint_dir/last` when it exists.
    """
    device = torch.device(config.device)
    distiller.to(device)
    first = next(iter(train_loader))
    distiller.build(first.inputs.to(device))
    optimizer = make_optimizer(distiller.trainable_parameters(), config)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    result = FitResult()
    start_epoch, start_step = 0, 0

    if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / f"{CHECKPOINT_NAME}.json").exists():
        tensors, state = load_checkpoint(Path(checkpoint_dir), CHECKPOINT_NAME)
        load_trained_state(distiller, tensors, str(checkpoint_dir))
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        start_epoch, start_step = state["epoch"], state["step"]
        result.history = state["history"]
        log.info("%s: resumed at epoch %d, step %d", label, start_epoch, start_step)

    started = time.perf_counter()
    steps_per_epoch = len(train_loader)
    for epoch in range(start_epoch, config.epochs):
        train_loader.set_epoch(epoch)
        distiller.train()
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(
            train_loader.iter_from(start_step),
            total=steps_per_epoch,
            initial=start_step,
            desc=f"{label} {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for step, batch in enumerate(bar, start=start_step):
            distiller.set_progress(epoch + step / steps_per_epoch)
            cached = None if teacher_outputs is None else teacher_outputs[batch.index].to(device)
            try:
                out = distiller(
                    batch.inputs.to(device),
                    target=batch.target.to(device),
                    index=batch.index.to(device),
                    teacher_output=cached,
                )
            except NonFiniteLossError as error:
                if config.on_nonfinite == "skip":
                    result.skipped_batches += 1
                    log.warning("%s epoch %d step %d: skipped batch: %s", label, epoch + 1, step, error)
                    scheduler.step()
                    continue
                raise NonFiniteLossError(
                    f"{label}, epoch {epoch + 1}, step {step}: {error}", term=error.term
                ) from error
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(distiller.trainable_parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            seen += 1
            for name, value in out.parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if step % 20 == 0:
                bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()}, refresh=False)
            if (
                checkpoint_dir is not None
                and config.checkpoint_every_steps
                and (step + 1) % config.checkpoint_every_steps == 0
                and step + 1 < steps_per_epoch
            ):
                _save(checkpoint_dir, distiller, optimizer, scheduler, label, epoch, step + 1,
                      result.history, config)
        bar.close()
        start_step = 0

        record = {
            "model": label,
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sum(sums.values()) / max(seen, 1),
            "train_parts": {k: v / max(seen, 1) for k, v in sums.items()},
            "seconds": round(time.perf_counter() - started, 3),
        }
        if evaluate is not None:
            record.update({f"val_{k}": v for k, v in evaluate(distiller.student).items()})
        result.history.append(record)
        if metrics_log is not None:
            metrics_log.write(record)
        if checkpoint_dir is not None:
            _save(checkpoint_dir, distiller, optimizer, scheduler, label, epoch + 1, 0,
                  result.history, config)
    result.seconds = time.perf_counter() - started
    return result
