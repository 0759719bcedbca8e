"""The training loop: epochs of optimiser steps, evaluation, metrics lines and checkpoints.

It knows nothing of particular losses: it calls the Distiller, back-propagates `out.loss`, and
reports `out.parts`. Features are plain flags on `TrainConfig`, not callbacks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.distiller import Distiller
from kdistill.engine.checkpoint import (
    load_latest_checkpoint,
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


class TeacherLookup(Protocol):
    """Stored teacher outputs: `lookup(index)` gives (output, {layer: features}) for a batch."""

    def lookup(self, index: Tensor) -> tuple[Any, dict[str, Tensor]]: ...


def lookup_teacher(source, index: Tensor, device: torch.device):
    """(output, features) of the batch from stored teacher outputs, or (None, None)."""
    if source is None:
        return None, None
    if isinstance(source, Tensor):
        return source[index].to(device), None
    output, features = source.lookup(index)
    if isinstance(output, dict):
        output = {key: value.to(device) for key, value in output.items()}
    elif isinstance(output, Tensor):
        output = output.to(device)
    return output, {key: value.to(device) for key, value in features.items()}


@dataclass
class Progress:
    """Where training stands: what a checkpoint must restore for an exact resume."""

    epoch: int = 0  # epochs finished
    step: int = 0  # batches finished in the current epoch
    part_sums: dict[str, float] = field(default_factory=dict)  # of the current epoch
    steps_seen: int = 0  # optimiser steps taken in the current epoch
    history: list[dict] = field(default_factory=list)
    skipped_batches: int = 0


def _save(directory, distiller, optimizer, scheduler, progress: Progress, label, config) -> None:
    optim_tensors, optim_meta = optimizer_to_flat(optimizer)
    tensors = {**trained_state(distiller), **optim_tensors, "rng.torch": torch.get_rng_state()}
    state = {
        "label": label,
        "progress": dataclasses.asdict(progress),
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict(),
        "config": config.model_dump(),
    }
    save_checkpoint(directory, CHECKPOINT_NAME, tensors, state, keep_previous=True)


def _restore(checkpoint_dir, distiller, optimizer, scheduler, label) -> Progress:
    tensors, state, path = load_latest_checkpoint(Path(checkpoint_dir), CHECKPOINT_NAME)
    latest = Path(checkpoint_dir) / f"{CHECKPOINT_NAME}.safetensors"
    if path != latest:
        log.warning("%s: the latest checkpoint is unusable; resuming from %s", label, path)
        if latest.exists():  # set it aside, so the next save does not rotate it over the good one
            latest.replace(latest.with_suffix(".corrupt"))
    load_trained_state(distiller, tensors, str(path))
    optimizer_from_flat(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    progress = Progress(**state["progress"])
    log.info("%s: resumed at epoch %d, step %d", label, progress.epoch + 1, progress.step)
    return progress


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
    teacher_outputs: Tensor | TeacherLookup | None = None,
) -> FitResult:
    """Train `distiller`'s student (and connectors) for `config.epochs` epochs.

    `teacher_outputs`: the teacher's outputs for every training sample (offline distillation):
    a tensor indexed by `batch.index`, or an object whose `lookup(index)` returns
    `(output, features)`; the teacher then does not run during training.
    With `resume`, training continues from `checkpoint_dir` when it holds a checkpoint: weights,
    optimiser, schedule, RNG and position in the epoch are restored, so the result is the same,
    bit for bit on CPU, as an uninterrupted run.
    """
    device = torch.device(config.device)
    distiller.to(device)
    distiller.build(next(iter(train_loader)).inputs.to(device))
    optimizer = make_optimizer(distiller.trainable_parameters(), config)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    progress = Progress()
    if resume and checkpoint_dir is not None:
        directory = Path(checkpoint_dir)
        if any(directory.glob(f"{CHECKPOINT_NAME}*.safetensors")):
            progress = _restore(directory, distiller, optimizer, scheduler, label)

    started = time.perf_counter()
    steps_per_epoch = len(train_loader)
    while progress.epoch < config.epochs:
        epoch = progress.epoch
        train_loader.set_epoch(epoch)
        distiller.train()
        bar = tqdm(
            train_loader.iter_from(progress.step),
            total=steps_per_epoch,
            initial=progress.step,
            desc=f"{label} {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for step, batch in enumerate(bar, start=progress.step):
            distiller.set_progress(epoch + step / steps_per_epoch)
            cached_output, cached_features = lookup_teacher(teacher_outputs, batch.index, device)
            try:
                out = distiller(
                    batch.inputs.to(device),
                    target=batch.target.to(device),
                    index=batch.index.to(device),
                    teacher_output=cached_output,
                    teacher_features=cached_features,
                )
            except NonFiniteLossError as error:
                if config.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"{label}, epoch {epoch + 1}, step {step}: {error}", term=error.term
                    ) from error
                progress.skipped_batches += 1
                log.warning("%s epoch %d step %d: skipped batch: %s", label, epoch + 1, step, error)
            else:
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(
                        distiller.trainable_parameters(), config.grad_clip
                    )
                optimizer.step()
                progress.steps_seen += 1
                for name, value in out.parts.items():
                    progress.part_sums[name] = progress.part_sums.get(name, 0.0) + value
            scheduler.step()
            progress.step = step + 1
            if step % 20 == 0 and progress.steps_seen:
                bar.set_postfix(
                    {k: f"{v / progress.steps_seen:.3f}" for k, v in progress.part_sums.items()},
                    refresh=False,
                )
            if (
                checkpoint_dir is not None
                and config.checkpoint_every_steps
                and progress.step % config.checkpoint_every_steps == 0
                and progress.step < steps_per_epoch
            ):
                _save(checkpoint_dir, distiller, optimizer, scheduler, progress, label, config)
        bar.close()

        seen = max(progress.steps_seen, 1)
        record = {
            "model": label,
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sum(progress.part_sums.values()) / seen,
            "train_parts": {k: v / seen for k, v in progress.part_sums.items()},
            "seconds": round(time.perf_counter() - started, 3),
        }
        if evaluate is not None:
            record.update({f"val_{k}": v for k, v in evaluate(distiller.student).items()})
        progress.history.append(record)
        progress.epoch, progress.step, progress.part_sums, progress.steps_seen = epoch + 1, 0, {}, 0
        if metrics_log is not None:
            metrics_log.write(record)
        if checkpoint_dir is not None:
            _save(checkpoint_dir, distiller, optimizer, scheduler, progress, label, config)
    return FitResult(progress.history, time.perf_counter() - started, progress.skipped_batches)
