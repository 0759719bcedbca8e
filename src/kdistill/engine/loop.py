"""The training loop: epochs of optimiser steps, evaluation, metrics lines and checkpoints.

It knows nothing of particular losses, tasks or teachers: it calls the Distiller, back-propagates
`out.loss`, and reports `out.parts`; it reads the teacher through one protocol
(`kdistill.distill.teacher.base.TeacherSource`: ``source.for_batch(batch)``) and changes batches
only through the hooks it is given (`kdistill.distill.transforms.BatchTransform`). Features are
plain flags on `TrainConfig`, not callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.data.arrays import Batch, move_to
from kdistill.data.batches import as_batch, can_restart, iter_batches, set_epoch
from kdistill.distill.distiller import Distiller
from kdistill.distill.teacher.base import TeacherSource, as_source, follow_epoch
from kdistill.distill.transforms import BatchTransform
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
from kdistill.engine.distributed import (
    all_gather,
    all_reduce_sum,
    any_rank,
    info,
    resolve_device,
    shard_loader,
    wrap_ddp,
)
from kdistill.engine.optim import make_optimizer, make_scheduler
from kdistill.engine.precision import autocast, check_precision, grad_scaler
from kdistill.engine.preflight import check_before_training, check_loader
from kdistill.engine.trackers import Tracker, open_trackers
from kdistill.errors import ConfigError, DataError, NonFiniteLossError
from kdistill.io import MetricsLog  # noqa: F401  (re-exported)

log = logging.getLogger("kdistill")

CHECKPOINT_NAME = "last"
POSTFIX_SECONDS = 0.5  # the progress bar's loss parts are refreshed this often (wall clock)
Evaluate = Callable[[nn.Module], dict[str, float]]


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


def lookup_teacher(source, index: Tensor, inputs: Tensor, device: torch.device):
    """(output, features) of the batch from stored teacher outputs, or (None, None) for the live
    teacher (`source` None). Kept for callers of the protocol before issue 26; the engine calls
    ``as_source(source).for_batch(batch)``, which checks `inputs` the same way."""
    got = as_source(source).for_batch(Batch(inputs, None, index)).to(device)
    return got.output, got.features


@dataclass
class Progress:
    """Where training stands: what a checkpoint must restore for an exact resume."""

    epoch: int = 0  # epochs finished
    step: int = 0  # batches finished in the current epoch
    part_sums: dict[str, float] = field(default_factory=dict)  # of the current epoch
    steps_seen: int = 0  # optimiser steps taken in the current epoch
    history: list[dict] = field(default_factory=list)
    skipped_batches: int = 0
    changed: dict[str, int] = field(default_factory=dict)  # by batch transform, this epoch


def _collapse_sums(progress: Progress, names: list[str], everywhere: bool = False) -> None:
    """Sum the epoch's loss sums and step counts over ranks onto rank 0 (others keep zeros, so
    that a later reduction stays exact), or with `everywhere` onto every rank (epoch end)."""
    world = info()
    if world.world_size == 1:
        return
    local = torch.tensor(
        [progress.steps_seen, *(progress.part_sums.get(n, 0.0) for n in names)],
        dtype=torch.float64,
    )
    total = all_reduce_sum(local).tolist()
    if world.is_main or everywhere:
        progress.steps_seen = int(total[0])
        progress.part_sums = dict(zip(names, total[1:])) if total[0] else {}
    else:
        progress.steps_seen, progress.part_sums = 0, {}


def _save(
    directory, distiller, optimizer, scheduler, progress: Progress, label, config, scaler
) -> None:
    """Every rank calls it (RNG states are gathered); only rank 0 writes the file."""
    world = info()
    rng = {"rng.torch": torch.get_rng_state()}
    if world.world_size > 1:
        for rank, state in enumerate(all_gather(rng["rng.torch"])):
            rng[f"rng.torch.rank{rank}"] = state
    if not world.is_main:
        return
    optim_tensors, optim_meta = optimizer_to_flat(optimizer)
    tensors = {**trained_state(distiller), **optim_tensors, **rng}
    state = {
        "label": label,
        "progress": dataclasses.asdict(progress),
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "world_size": world.world_size,
        "config": config.model_dump(),
    }
    save_checkpoint(directory, CHECKPOINT_NAME, tensors, state, keep_previous=True)


def _restore(checkpoint_dir, distiller, optimizer, scheduler, label, scaler) -> Progress:
    tensors, state, path = load_latest_checkpoint(Path(checkpoint_dir), CHECKPOINT_NAME)
    latest = Path(checkpoint_dir) / f"{CHECKPOINT_NAME}.safetensors"
    world = info()
    if path != latest:
        log.warning("%s: the latest checkpoint is unusable; resuming from %s", label, path)
        if latest.exists() and world.is_main:  # set it aside, so the next save keeps the good one
            latest.replace(latest.with_suffix(".corrupt"))
    load_trained_state(distiller, tensors, str(path))
    optimizer_from_flat(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    own_rng = f"rng.torch.rank{world.rank}"
    same_world = state.get("world_size", 1) == world.world_size
    torch.set_rng_state(
        tensors[own_rng] if same_world and own_rng in tensors else tensors["rng.torch"]
    )
    saved = dict(state["progress"])
    if saved.pop("sampled_batches", 0):  # written before issue 26, when it had no `changed`
        log.warning(
            "%s: the checkpoint predates per-transform counts: the resumed epoch's share of "
            "transformed batches counts only the batches after the resume",
            label,
        )
    progress = Progress(**saved)
    if not world.is_main:  # rank 0 carries the epoch's sums so far (see _collapse_sums)
        progress.steps_seen, progress.part_sums = 0, {}
    log.info("%s: resumed at epoch %d, step %d", label, progress.epoch + 1, progress.step)
    return progress


def _first_batch(loader) -> Batch:
    """The loader's first batch (for the checks and for sizing connectors), as a `Batch`."""
    for item in loader:
        return as_batch(item)
    raise ConfigError(f"the training loader ({type(loader).__name__}) yields no batches")


def _windows(items, size: int):
    """Consecutive lists of `size` items (the last one may be shorter): the micro-batches of
    each optimiser step."""
    window = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _window_token_counts(distiller: Distiller, batches: list[Batch]) -> dict[str, float]:
    """Each token-counting term's normaliser for the window: its counted positions summed over
    the window's micro-batches and over all ranks, divided by the number of ranks (DDP averages
    the ranks' gradients, so each rank's loss is its own sum × W / global count)."""
    totals: dict[str, int] = {}
    for batch in batches:
        for name, count in distiller.count_tokens(batch.target, batch.inputs).items():
            totals[name] = totals.get(name, 0) + count
    world = info().world_size
    if world > 1:  # every rank has the same terms, in the same order
        local = torch.tensor(list(totals.values()), dtype=torch.float64)
        totals = dict(zip(totals, all_reduce_sum(local).tolist()))
    return {name: total / world for name, total in totals.items()}


def _accumulate_window(
    model, batches: list[Batch], device, config: TrainConfig, scaler, source, token_counts
) -> tuple[dict[str, float], NonFiniteLossError | None, int]:
    """Forward and backward every micro-batch of one optimiser step, summing the gradients
    (DDP reduces them once, on the last micro-batch). Returns the parts summed over the window,
    and the error and position of the first micro-batch that gave a non-finite loss on any rank
    (the rest of the window is then not run; the caller skips the step)."""
    parts: dict[str, float] = {}
    world = info().world_size
    for position, batch in enumerate(batches):
        last = position == len(batches) - 1
        teacher = source.for_batch(batch).to(device)  # checked against the batch
        error: NonFiniteLossError | None = None
        with _gradient_sync(model, last):
            try:
                with autocast(config.precision, device):
                    out = model(
                        move_to(batch.inputs, device),
                        target=move_to(batch.target, device),
                        index=move_to(batch.index, device),
                        teacher_output=teacher.output,
                        teacher_features=teacher.features,
                        micro_batches=len(batches),
                        token_counts=token_counts,
                    )
            except NonFiniteLossError as caught:
                error = caught
            # under DDP every rank must take the same decision, or the others hang in backward
            if world > 1 and any_rank(error is not None) and error is None:
                error = NonFiniteLossError(
                    "another rank's share of the batch gave a non-finite loss"
                )
            if error is not None:
                return parts, error, position
            scaler.scale(out.loss).backward()
        for name, value in out.parts.items():
            parts[name] = parts.get(name, 0.0) + value
    return parts, None, 0


@dataclass
class _Uncounted:
    """Token counts of an epoch: per term, positions counted and label positions seen."""

    whole_epoch: bool  # False when resumed mid-epoch (the counts miss the first batches)
    counted: dict[str, int] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    warned: int = 0


UNCOUNTED_WARNINGS = 3  # per epoch; the epoch's check says how many batches there were


def _note_uncounted(distiller, batch, uncounted: _Uncounted, label, epoch, number) -> None:
    """Add the batch's counted positions per token-counting term; warn (naming the run, the
    batch, its samples and the count) when a term counts none of them."""
    counts = distiller.count_tokens(batch.target, batch.inputs)
    uncounted.batches += 1
    target = batch.target
    positions = int(target.numel()) if isinstance(target, torch.Tensor) else 0
    for name, count in counts.items():
        uncounted.counted[name] = uncounted.counted.get(name, 0) + count
        uncounted.positions[name] = uncounted.positions.get(name, 0) + positions
        if count == 0 and uncounted.warned < UNCOUNTED_WARNINGS:
            uncounted.warned += 1
            index = batch.index
            samples = index.reshape(-1)[:16].tolist() if isinstance(index, torch.Tensor) else None
            log.warning(
                "%s epoch %d, batch %d%s: term %r counts 0 of %d label positions (every label "
                "−100), so the batch trains it on nothing%s",
                label,
                epoch + 1,
                number + 1,
                f" (samples {samples})" if samples is not None else "",
                name,
                positions,
                "; later such batches of this epoch are not listed"
                if uncounted.warned == UNCOUNTED_WARNINGS
                else "",
            )


def _check_uncounted(distiller, uncounted: _Uncounted, label, epoch, allowed: bool) -> None:
    """DataError when a token-counting term counted no token over the whole epoch (summed over
    ranks), unless `allowed` (then a warning)."""
    names = [  # the same list on every rank, even one that ran no batch
        name
        for name, term in zip(distiller.term_names, distiller.terms)
        if getattr(term.loss, "counts_tokens", False)
    ]
    counted = [uncounted.counted.get(name, 0) for name in names]
    if info().world_size > 1:
        counted = [int(v) for v in all_reduce_sum(torch.tensor(counted, dtype=torch.float64))]
    for name, count in zip(names, counted):
        if count or not uncounted.whole_epoch:
            continue
        message = (
            f"{label}, epoch {epoch + 1}: term {name!r} counted 0 tokens over {uncounted.batches} "
            f"batches ({uncounted.positions.get(name, 0)} label positions on this rank, every one "
            "−100): it trained on nothing. Check the data's labels (prompt → completion data: "
            "a completion cut off by max_length, or masked by mistake)"
        )
        if not allowed:
            raise DataError(message + ", or set train.allow_uncounted_epochs: true to allow it")
        log.warning("%s (allowed by train.allow_uncounted_epochs)", message)


def _gradient_sync(model, sync: bool):
    """DDP's `no_sync()` for a micro-batch that is not the window's last (its gradients are
    summed locally and reduced with the last one's); nothing for a single process."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _detach_on_return(function):
    """`fit` leaves no kdistill hook on the models, whether it returns or raises: the trained
    student pickles and scripts; the distiller puts its taps back on its next forward."""

    @functools.wraps(function)
    def wrapper(distiller: Distiller, *args, **kwargs):
        try:
            return function(distiller, *args, **kwargs)
        finally:
            distiller.detach()

    return wrapper


@_detach_on_return
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
    teacher_outputs: TeacherSource | None = None,
    batch_transforms: Sequence[BatchTransform] = (),
    loggers: list[str | Tracker] | None = None,
) -> FitResult:
    """Train `distiller`'s student (and connectors) for `config.epochs` epochs.

    `train_loader`: kdistill's `BatchLoader`, a torch ``DataLoader``, or any re-iterable object
    with a `len()` whose items are ``(inputs, target[, index])`` tuples, dicts of model keyword
    arguments with the labels under ``"labels"`` (Hugging Face style; the models are called as
    ``model(**inputs)``), or kdistill `Batch`es (see `kdistill.data.batches.as_batch`). Tensors,
    nested in dicts, lists and tuples too, are moved to `config.device`. The loader decides the
    batch size: a `config.batch_size` set explicitly that differs from the loader's is a
    ConfigError (`engine.preflight.check_loader`). Each epoch starts with the loader's
    `set_epoch(epoch)`, or its sampler's (torch's ``DistributedSampler``).

    `teacher_outputs`: where the teacher's outputs come from (`kdistill.distill.teacher`): None,
    the live teacher (the distiller runs it every step, eager or sped up); or, for offline
    distillation, a source of stored outputs — a `TeacherCache`, `TokenTeacherCache`, a
    `MemoryTeacherOutputs` (`kdistill.distill.teacher.store`), any `TeacherSource`
    (``for_batch(batch)``) or an object whose `lookup(index, inputs)` returns `(output,
    features)` after checking that the batch's inputs are the samples the outputs were computed
    on (every batch is checked; a mismatch raises CacheError). A bare tensor or dict is refused
    (ConfigError). With stored outputs the teacher does not run in training.
    With `resume`, training continues from `checkpoint_dir` when it holds a checkpoint: weights,
    optimiser, schedule, RNG and position in the epoch are restored, so the result is the same,
    bit for bit on CPU, as an uninterrupted run. Mid-epoch checkpoints
    (`config.checkpoint_every_steps`) need a loader that can restart at a batch (`iter_from`,
    as kdistill's `BatchLoader` has); with any other loader they are skipped, with one warning,
    and a resume restarts at the last epoch boundary.

    `config.accumulate_steps` = k > 1: the gradients of k consecutive loader batches
    (micro-batches) are summed into one optimiser step; the last window of an epoch may be
    shorter. The schedule counts optimiser steps (ceil(batches / k) per epoch), mid-epoch
    checkpoints fall on window boundaries (every `checkpoint_every_steps` optimiser steps), a
    non-finite micro-batch skips its whole window, and the logged parts of a step are the sums
    over its window. Normalisation is that of one big batch: a term whose loss counts tokens
    (`kdistill.losses.token`) is divided by the counted positions of the whole window and of all
    ranks (`Distiller.count_tokens`, summed before the window's first forward); every other
    term is divided by the number of micro-batches (exact for equal-sized micro-batches).

    `batch_transforms` (`kdistill.distill.transforms`): hooks called, in order, on each
    micro-batch before it is counted and run, with the batch's key (its position in training,
    epoch · batches per epoch + batch, so a resume draws the same) — e.g. GKD's mixed data
    (`kdistill.distill.transforms.on_policy_transform`: with probability λ a batch's completions
    are the student's samples). Each may refuse the teacher source before training (ConfigError;
    sampling needs the live teacher). The epoch's record gives the share of batches each changed
    (``<name>_share``).

    Training on nothing is not silent: a batch in which a token-counting term counts no
    position (every label −100) is logged as a warning naming the run, the batch, its samples
    and the count (the first 3 of an epoch); an epoch in which such a term counts no token at
    all raises DataError at its end, unless `config.allow_uncounted_epochs` (then a warning).

    Before the first step the models run once on the first batch (`engine.preflight`): wrong
    input channels, teacher/student class-count mismatches and out-of-range labels fail here.
    `config.precision` bf16/fp16 runs the forward under autocast (`engine.precision`).
    Under torchrun (an initialised process group) a `BatchLoader` is sharded by rank with its
    batch size as the global batch; a ``DataLoader`` must bring its own ``DistributedSampler``
    (anything else is a ConfigError, `engine.distributed.shard_loader`); the distiller is
    wrapped in DDP without its teacher,
    training losses are averaged over ranks, and only rank 0 writes metrics and checkpoints
    (`engine.distributed`).

    `loggers`: trackers that also receive every epoch's record (`engine.trackers`):
    ``"tensorboard"`` / ``"mlflow"`` (made in `metrics_log`'s folder and closed on return) or
    `Tracker` objects (left open for the caller); None: `config.log`.
    """
    run = _start(distiller, train_loader, config, label, teacher_outputs, batch_transforms)
    if checkpoint_dir is not None:
        _resume(run, Path(checkpoint_dir), resume)
    folder = metrics_log.path.parent if metrics_log is not None else None
    trackers, made = (
        open_trackers(config.log if loggers is None else loggers, folder, run_name=label)
        if run.world.is_main
        else ([], [])
    )
    run.started = time.perf_counter()
    progress = run.progress
    while progress.epoch < config.epochs:
        epoch = progress.epoch
        budget_left = None  # optimiser steps `max_steps` leaves in this epoch
        if config.max_steps is not None:
            budget_left = config.max_steps - epoch * run.windows_per_epoch
        _train_epoch(run, epoch, budget_left, checkpoint_dir)
        record = _epoch_record(run, epoch, evaluate)
        progress.history.append(record)
        progress.epoch, progress.step, progress.part_sums, progress.steps_seen = epoch + 1, 0, {}, 0
        progress.changed = {}
        if budget_left is not None and budget_left <= run.windows_per_epoch:
            progress.epoch = config.epochs  # the step budget is spent: training is over
        if metrics_log is not None and run.world.is_main:  # the one place an epoch's record goes
            metrics_log.write(record)
        for tracker in trackers:
            tracker.log_epoch(record)
        if checkpoint_dir is not None:
            _save_run(run, checkpoint_dir)
    for tracker in made:
        tracker.close()
    return FitResult(progress.history, time.perf_counter() - run.started, progress.skipped_batches)


@dataclass
class _Run:
    """Everything one `fit` call trains with, made once by `_start`."""

    distiller: Distiller
    model: nn.Module  # the distiller, or its DDP wrapper
    loader: Any
    config: TrainConfig
    label: str
    world: Any
    device: torch.device
    source: TeacherSource
    transforms: list[BatchTransform]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    restartable: bool
    exact_counts: bool  # token losses normalised by each window's global count
    progress: Progress = field(default_factory=Progress)
    started: float = field(default_factory=time.perf_counter)
    postfix_due: float = 0.0  # when the bar's loss parts are next refreshed (time.monotonic)
    uncounted: _Uncounted | None = None  # this epoch's token counts (token-counting terms)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def windows_per_epoch(self) -> int:
        return math.ceil(self.steps_per_epoch / self.config.accumulate_steps)


def _start(distiller, train_loader, config, label, teacher_outputs, batch_transforms) -> _Run:
    """Check everything that can be checked before the first step, then build the distiller's
    connectors, the DDP wrapper, the optimiser, the schedule and the loss scaler."""
    world = info()
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    source = as_source(teacher_outputs)
    transforms = list(batch_transforms)
    for transform in transforms:
        transform.check(source, label)
    train_loader = shard_loader(train_loader, world)
    distiller.to(device)
    follow_epoch(source, getattr(train_loader, "epoch", 0))  # the first batch's epoch
    first_batch = _first_batch(train_loader)
    check_loader(train_loader, config, first_batch, label)
    check_before_training(distiller, first_batch, train_loader, device, source)
    distiller.build(move_to(first_batch.inputs, device), optimiser_follows=True)
    model = wrap_ddp(distiller, device)
    optimizer = make_optimizer(distiller.trainable_parameters(), config)
    accumulate = config.accumulate_steps
    scheduler = make_scheduler(optimizer, config, math.ceil(len(train_loader) / accumulate))
    # one-big-batch normalisation of token losses needs each window's global count up front
    exact_counts = (accumulate > 1 or world.world_size > 1) and any(
        getattr(term.loss, "counts_tokens", False) for term in distiller.terms
    )
    return _Run(
        distiller,
        model,
        train_loader,
        config,
        label,
        world,
        device,
        source,
        transforms,
        optimizer,
        scheduler,
        grad_scaler(config.precision, device),
        can_restart(train_loader),
        exact_counts,
    )


def _resume(run: _Run, directory: Path, resume: bool) -> None:
    """With `resume`, continue from the checkpoint in `directory` when there is one (see `fit`);
    warn first when mid-epoch checkpoints are asked for but the loader cannot restart."""
    config = run.config
    if config.checkpoint_every_steps and not run.restartable:
        log.warning(
            "%s: the training loader (%s) cannot restart mid-epoch (it has no iter_from), so "
            "checkpoint_every_steps=%d is ignored: checkpoints are written at epoch ends and a "
            "resume starts at the last epoch boundary",
            run.label,
            type(run.loader).__name__,
            config.checkpoint_every_steps,
        )
    if not resume or not any(directory.glob(f"{CHECKPOINT_NAME}*.safetensors")):
        return
    run.progress = _restore(
        directory, run.distiller, run.optimizer, run.scheduler, run.label, run.scaler
    )
    if run.progress.step and not run.restartable:
        raise ConfigError(
            f"{run.label}: the checkpoint in {directory} was written at step "
            f"{run.progress.step} of epoch {run.progress.epoch + 1}, but this training loader "
            f"({type(run.loader).__name__}) cannot restart mid-epoch; resume with the "
            "loader that wrote it (one with iter_from, e.g. kdistill's BatchLoader)"
        )


def _save_run(run: _Run, directory) -> None:
    _save(
        directory,
        run.distiller,
        run.optimizer,
        run.scheduler,
        run.progress,
        run.label,
        run.config,
        run.scaler,
    )


def _train_epoch(run: _Run, epoch: int, budget_left: int | None, checkpoint_dir) -> None:
    """The optimiser steps of one epoch (from `run.progress.step` on, after a resume), with the
    mid-epoch checkpoints; the epoch's sums end up the same on every rank."""
    config, progress, distiller = run.config, run.progress, run.distiller
    set_epoch(run.loader, epoch)
    follow_epoch(run.source, epoch)
    distiller.train()
    bar = tqdm(
        iter_batches(run.loader, progress.step),
        total=run.steps_per_epoch,
        initial=progress.step,
        desc=f"{run.label} {epoch + 1}/{config.epochs}",
        disable=not (config.progress and run.world.is_main),
        leave=False,
        dynamic_ncols=True,
    )
    counting = any(getattr(term.loss, "counts_tokens", False) for term in distiller.terms)
    run.uncounted = _Uncounted(whole_epoch=progress.step == 0) if counting else None
    accumulate = config.accumulate_steps
    for window in _windows(enumerate(bar, start=progress.step), accumulate):
        _train_window(run, epoch, window)
        progress.step = window[-1][0] + 1
        windows_done = math.ceil(progress.step / accumulate)
        if budget_left is not None and windows_done >= budget_left:
            break  # max_steps reached: this epoch ends here
        if progress.steps_seen and time.monotonic() >= run.postfix_due:  # a clock read, no sync
            run.postfix_due = time.monotonic() + POSTFIX_SECONDS
            bar.set_postfix(
                {k: f"{v / progress.steps_seen:.3f}" for k, v in progress.part_sums.items()},
                refresh=False,
            )
        if (
            checkpoint_dir is not None
            and config.checkpoint_every_steps
            and run.restartable
            and windows_done % config.checkpoint_every_steps == 0
            and progress.step < run.steps_per_epoch
        ):
            _collapse_sums(progress, distiller.term_names)
            _save_run(run, checkpoint_dir)
    bar.close()
    if run.uncounted is not None:
        _check_uncounted(distiller, run.uncounted, run.label, epoch, config.allow_uncounted_epochs)
    _collapse_sums(progress, distiller.term_names, everywhere=True)  # the same record on all


def _transformed(run: _Run, epoch: int, window: list) -> list[Batch]:
    """The window's loader items as `Batch`es, each passed through the batch transforms (keyed
    by its position in training, so that a resume draws the same)."""
    batches = [as_batch(item) for _, item in window]
    for transform in run.transforms:
        for position, (number, _) in enumerate(window):
            key = epoch * run.steps_per_epoch + number
            batches[position], changed = transform.apply(
                run.distiller.student, batches[position], key, run.world.rank
            )
            run.progress.changed[transform.name] = run.progress.changed.get(
                transform.name, 0
            ) + int(changed)
    return batches


def _train_window(run: _Run, epoch: int, window: list) -> None:
    """One optimiser step over the window's micro-batches, or its skip (a non-finite loss with
    ``on_nonfinite: skip``); the schedule steps either way."""
    config, progress, distiller, optimizer = run.config, run.progress, run.distiller, run.optimizer
    step = window[0][0]  # the window's first batch
    distiller.set_progress(epoch + step / run.steps_per_epoch)
    batches = _transformed(run, epoch, window)
    if run.uncounted is not None:
        for position, batch in enumerate(batches):
            _note_uncounted(distiller, batch, run.uncounted, run.label, epoch, window[position][0])
    token_counts = _window_token_counts(distiller, batches) if run.exact_counts else None
    optimizer.zero_grad(set_to_none=True)
    parts, error, failed = _accumulate_window(
        run.model, batches, run.device, config, run.scaler, run.source, token_counts
    )
    if error is not None:
        if config.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{run.label}, epoch {epoch + 1}, step {step + failed}: {error}",
                term=error.term,
            ) from error
        optimizer.zero_grad(set_to_none=True)  # the window's partial gradients
        progress.skipped_batches += len(batches)
        skipped = f"step {step}" if len(batches) == 1 else f"steps {step}-{window[-1][0]}"
        log.warning("%s epoch %d %s: skipped: %s", run.label, epoch + 1, skipped, error)
    else:
        if config.grad_clip is not None:
            run.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(distiller.trainable_parameters(), config.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        progress.steps_seen += 1
        for name, value in parts.items():
            progress.part_sums[name] = progress.part_sums.get(name, 0.0) + value
    run.scheduler.step()


def _epoch_record(run: _Run, epoch: int, evaluate: Evaluate | None) -> dict:
    """The epoch's metrics line: mean loss and parts per optimiser step, the share of batches
    each transform changed, and the evaluation's metrics (``val_…``)."""
    progress = run.progress
    seen = max(progress.steps_seen, 1)
    record = {
        "model": run.label,
        "epoch": epoch + 1,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": sum(progress.part_sums.values()) / seen,
        "train_parts": {k: v / seen for k, v in progress.part_sums.items()},
        "seconds": round(time.perf_counter() - run.started, 3),
    }
    batches_run = max(min(progress.step, run.steps_per_epoch), 1)
    for transform in run.transforms:
        record[f"{transform.name}_share"] = progress.changed.get(transform.name, 0) / batches_run
    if evaluate is not None:
        record.update({f"val_{k}": v for k, v in evaluate(run.distiller.student).items()})
    return record
