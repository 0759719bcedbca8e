"""`kdistill run <recipe> --dry-run`: check a whole recipe and estimate its wall time, without
training.

The dry run does what the run would do, on a few batches, in a scratch folder:

1. read and validate the recipe, load the data and hold out the validation split (timed: the
   run does the same);
2. build the teacher (and load its checkpoint when it has one), train it for `TIMED_STEPS`
   batches when the run would train it, evaluate it, keep its outputs over those batches
   (`distill.teacher_cache`), and measure its cost;
3. for each student: train it alone and with each method's terms for `TIMED_STEPS` batches,
   with the terms of the first grid point; every check the engine runs before the first step
   (input channels, class counts, labels over the whole training split, batches carrying what
   the terms need) runs here, so a mistake in any student or method fails now;
4. print the plan and the estimate.

Estimate: each training costs ``epochs × (steps × s/step + validation) + final evaluation``,
with s/step the median of the timed steps after the first (a warm-up), the evaluations scaled
from one timed evaluation batch by the number of samples, and steps per epoch those of the run's
loader. Tuning trials (one per grid point, when the grid has more than one) and the final
trainings (seeds × students × (alone + methods)) are counted apart; data loading, the teacher's
outputs over the training split, its test evaluation and the cost measurements are added.
Nothing is subtracted for `--resume`. The figures hold for this machine as loaded now.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data import BatchLoader
from kdistill.data.arrays import move_to
from kdistill.data.batches import set_epoch
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.teacher.store import loader_views
from kdistill.engine import fit
from kdistill.engine.config import TrainConfig
from kdistill.engine.distributed import resolve_device
from kdistill.engine.preflight import check_before_training
from kdistill.models import count_parameters
from kdistill.models.cost import count_macs, format_count
from kdistill.recipes.objective import settings_used
from kdistill.recipes.plan import teacher_store
from kdistill.recipes.run_store import saved_teacher_matches
from kdistill.recipes.runner import (
    EVAL_BATCH,
    Experiment,
    Splits,
    build_model,
    grid_settings,
)
from kdistill.recipes.schema import Recipe

__all__ = ["DryRun", "ModelLine", "TimedLoader", "Training", "dry_run"]

TIMED_STEPS = 4  # batches per epoch of a rehearsal; the very first one is a warm-up
REHEARSAL_EPOCHS = 2  # two epochs: the gap between them is the cost of an epoch's end


class TimedLoader:
    """The first `steps` batches of a training loader, with the moment each was asked for: the
    gap between two requests is one training step as the engine takes it (batch, forward,
    backward, optimiser, bookkeeping); the gap between one epoch's last request and the next
    epoch's first batch is the epoch's end (evaluation, metrics, checkpoint). `dataset` is what
    the engine's checks read (the labels of the whole training split), whatever subset the
    batches come from."""

    def __init__(self, loader: Any, steps: int, dataset: Any = None):
        self.loader = loader
        self.steps = max(1, min(steps, len(loader)))
        self.batch_size = loader.batch_size
        self.dataset = dataset if dataset is not None else loader.dataset
        self.passes: list[list[float]] = []  # the request times of each pass over the loader

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """The loader's epoch (its order and its views depend on it)."""
        set_epoch(self.loader, epoch)

    def view_spec(self) -> dict | None:
        """The loader's keyed augmentation (`cache.loader_views`), so stored views serve it."""
        return loader_views(self.loader)

    def __iter__(self) -> Iterator[Any]:
        stamps: list[float] = []
        self.passes.append(stamps)
        for item in itertools.islice(iter(self.loader), self.steps):
            stamps.append(time.perf_counter())
            yield item
        stamps.append(time.perf_counter())

    def _epochs(self) -> list[list[float]]:
        """The passes read to their end (the engine's first look at one batch is not one)."""
        return [stamps for stamps in self.passes if len(stamps) == self.steps + 1]

    def step_seconds(self) -> float:
        """The median step, the very first left out (it pays for warm-up) when others exist."""
        gaps = [b - a for stamps in self._epochs() for a, b in itertools.pairwise(stamps)]
        if not gaps:
            raise RuntimeError("the timed loader was not read to its end")
        return statistics.median(gaps[1:] if len(gaps) > 1 else gaps)

    def first_batch_at(self) -> float:
        """When the first epoch's first batch was handed out (the training set up by then)."""
        return self._epochs()[0][0]

    def epoch_end_seconds(self) -> float | None:
        """From the first epoch's last step to the second epoch's first batch; None with fewer
        than two epochs."""
        epochs = self._epochs()
        return epochs[1][0] - epochs[0][-1] if len(epochs) > 1 else None


@dataclass
class Training:
    """One line of the estimate: `count` trainings of the same kind."""

    what: str
    count: int
    epochs: int
    steps: int  # optimiser steps per epoch
    step_seconds: float
    epoch_end_seconds: float  # evaluation on the validation split, metrics, checkpoint
    final_seconds: float  # the evaluation after training (test set; validation for a trial)
    setup_seconds: float = 0.0  # model, checks before the first step, optimiser
    max_batches: int | None = None  # `max_steps` × `accumulate_steps`: the run stops there

    @property
    def seconds(self) -> float:
        batches = self.epochs * self.steps
        if self.max_batches is not None:
            batches = min(batches, self.max_batches)
        epochs = math.ceil(batches / max(self.steps, 1))
        per_run = batches * self.step_seconds + epochs * self.epoch_end_seconds
        return self.count * (self.setup_seconds + per_run + self.final_seconds)


@dataclass
class ModelLine:
    role: str
    name: str
    spec: str
    params: int
    macs: int | None


@dataclass
class DryRun:
    """What `dry_run` found: the plan of the run and its estimated wall time."""

    recipe: Recipe
    data: dict
    models: list[ModelLine]
    terms: dict[str, list[str]]  # "mini/kd" → each term: name, weight, loss, layers
    settings: dict[str, str]  # method → the settings its terms were built with (timing)
    grid: dict[str, int]  # method → grid points tried on validation (1: no tuning)
    teacher: str  # how the run gets its teacher
    trainings: list[Training]
    other: dict[str, float]  # seconds of data loading, teacher outputs, costs, …
    threads: int = field(default_factory=torch.get_num_threads)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.trainings) + sum(self.other.values())

    def text(self) -> str:
        recipe = self.recipe
        sizes = self.data["sizes"]
        shape = "×".join(map(str, self.data["input_shape"]))
        classes = self.data.get("classes") or []
        lines = [
            f"Dry run of recipe {recipe.name!r}: every model built, one batch through the "
            "teacher, each student and each method's terms, a few steps of each training timed. "
            "Nothing was trained or written.",
            "",
            f"data: {recipe.data.dataset}, {sizes['train']:,} training / {sizes['val']:,} "
            f"validation / {sizes['test']:,} test samples, input {shape}"
            + (f", {len(classes)} classes" if classes else ""),
            *(
                [f"students' batches: keyed views ({_views_text(recipe.data.augment)})"]
                if recipe.data.augment is not None
                else []
            ),
            f"teacher: {self.teacher}",
            "",
            "| role | name | model | params | MACs |",
            "|---|---|---|---:|---:|",
        ]
        for model in self.models:
            macs = format_count(model.macs) if model.macs is not None else "—"
            lines.append(
                f"| {model.role} | {model.name} | `{model.spec}` | {model.params:,} | {macs} |"
            )
        lines += ["", "Terms of each training (weight × loss; α and parameters as built):"]
        for what, terms in self.terms.items():
            lines.append(f"  {what}: " + " + ".join(terms))
        for method, settings in self.settings.items():
            points = self.grid.get(method, 1)
            if points > 1:
                lines.append(
                    f"  {method}: built with {settings}, the first of {points} grid points the "
                    "run tries on validation"
                )
            else:
                lines.append(f"  {method}: {settings} (not tuned)")
        final = [t for t in self.trainings if not t.what.startswith(("teacher", "tune "))]
        trials = [t for t in self.trainings if t.what.startswith("tune ")]
        teacher = [t for t in self.trainings if t.what.startswith("teacher")]
        seeds = ", ".join(str(recipe.seed + i) for i in range(recipe.seeds))
        lines += [
            "",
            f"seeds: {recipe.seeds} ({seeds})"
            f"; students {recipe.train.epochs} epochs of batch {recipe.train.batch_size}; "
            f"trainings: {sum(t.count for t in teacher)} teacher + "
            f"{sum(t.count for t in trials)} tuning trials + {sum(t.count for t in final)} "
            "final (seeds × students × (alone + methods)) = "
            f"{sum(t.count for t in self.trainings)}",
            "",
            f"Estimated wall time ({self.threads} thread(s), this machine as loaded now):",
            "",
            "| training | count | s set-up | epochs | steps/epoch | s/step | s/epoch end "
            "| s final evaluation | total |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in self.trainings:
            lines.append(
                f"| {t.what} | {t.count} | {t.setup_seconds:.2f} | {t.epochs} | {t.steps:,} "
                f"| {t.step_seconds:.4f} | {t.epoch_end_seconds:.2f} | {t.final_seconds:.2f} "
                f"| {_duration(t.seconds)} |"
            )
        for what, seconds in self.other.items():
            lines.append(f"| {what} | | | | | | | | {_duration(seconds)} |")
        lines += ["", f"Estimated total: {_duration(self.seconds)}"]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    """ "42 s", "3.4 min", "2.1 h" """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _Rehearsal(Experiment):
    """The recipe's experiment in a scratch folder, whose training loaders stop after
    `TIMED_STEPS` batches and record when each batch was asked for."""

    timed_steps = TIMED_STEPS
    checked_dataset: Any = None  # the whole training split, for the engine's label checks
    last_loader: TimedLoader | None = None

    timing = True  # off while the teacher's outputs are computed: they read whole loaders

    def _timed_loader(self, loader):
        if not self.timing or isinstance(loader, TimedLoader):
            return loader
        self.last_loader = TimedLoader(loader, self.timed_steps, self.checked_dataset)
        return self.last_loader

    def loader(self, data, seed: int, batch_size: int, shuffle: bool):
        loader = super().loader(data, seed, batch_size, shuffle)
        if not shuffle:  # evaluation and teacher outputs: as the run does them
            return loader
        return self._timed_loader(loader)

    def augmented_loader(self, data, seed: int, batch_size: int, spec):
        """Training batches, augmented ones included (their steps are timed too)."""
        return self._timed_loader(super().augmented_loader(data, seed, batch_size, spec))

    def view_epochs(self) -> int:
        """Every rehearsal runs `REHEARSAL_EPOCHS` epochs, whatever the recipe's budget."""
        return max(super().view_epochs(), REHEARSAL_EPOCHS)

    def prepare_teacher_outputs(self, teacher):
        self.timing = False  # the views of every epoch are built from the whole loader
        try:
            return super().prepare_teacher_outputs(teacher)
        finally:
            self.timing = True

    def student_data(self, spec, seed: int, uses_teacher: bool):
        """A label-scarce student's data as the run makes it — labels hidden on the whole
        training split, so `labelled: n` is checked against it — then its first samples."""
        if getattr(spec, "labelled", None) is None or self.checked_dataset is None:
            return super().student_data(spec, seed, uses_teacher)
        rehearsal = self.splits
        self.splits = dataclasses.replace(rehearsal, train=self.checked_dataset)
        try:
            data = super().student_data(spec, seed, uses_teacher)
        finally:
            self.splits = rehearsal
        return _first_samples(data, len(rehearsal.train))


def check_every_training(exp: Experiment, teacher: nn.Module, methods: list[str], train) -> None:
    """One batch of `train` through every student alone and with each method's terms (the
    first grid point), with the checks the engine runs before a first step and a finite loss;
    the first mistake raises, before anything is timed."""
    recipe = exp.recipe
    device = resolve_device(recipe.train.device)
    trainable = [p.requires_grad for p in teacher.parameters()]  # a Distiller freezes it
    for spec in recipe.students:
        for method in ["alone", *methods]:
            key = None if method == "alone" else method
            terms = exp.objective(key, grid_settings(recipe, key)[0] if key else {})
            student = exp.initial_student(spec, recipe.seed)
            uses_teacher = any(term.uses_teacher for term in terms)
            distiller = Distiller(teacher if uses_teacher else None, student, terms)
            try:
                distiller.to(device)
                loader = BatchLoader(train, recipe.train.batch_size, shuffle=True, seed=recipe.seed)
                batch = next(iter(loader))
                check_before_training(distiller, batch, loader, device)
                inputs = move_to(batch.inputs, device)
                distiller.build(inputs, optimiser_follows=True)
                with torch.no_grad():
                    distiller(
                        inputs,
                        target=move_to(batch.target, device),
                        index=move_to(batch.index, device),
                    )
            finally:
                distiller.close()
                for parameter, flag in zip(teacher.parameters(), trainable):
                    parameter.requires_grad_(flag)


def _views_text(spec: Any) -> str:
    """`pad 2, flip, mixup 0.5, seed 0` for an `AugmentSpec`."""
    parts = [f"pad {spec.pad} ({spec.padding})" if spec.pad else "no crop"]
    parts += ["flip"] if spec.flip else []
    parts += [f"mixup {spec.mixup:g}"] if spec.mixup else []
    parts += [f"seed {spec.seed}"] if spec.seed is not None else ["the recipe's seed"]
    return ", ".join(parts)


def _first_samples(data: Any, count: int) -> Any:
    return data.subset(torch.arange(min(count, len(data))), name=f"{data.name}-dry-run")


def _timed(function, *args, **kwargs) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def _describe_terms(terms: list[Term]) -> list[str]:
    described = []
    for term in terms:
        name = term.name or getattr(term.loss, "name", "") or type(term.loss).__name__.lower()
        where = ""
        if term.student is not None or term.teacher is not None:
            where = f" [{term.student or 'output'} → {term.teacher or 'output'}]"
        elif term.output is not None:
            where = f" [output {term.output!r}]"
        described.append(f"{term.weight:g} × {name} ({type(term.loss).__name__}){where}")
    return described


def _macs(model: nn.Module, data: Any, cost: dict | None) -> int | None:
    if cost is not None:
        return int(cost["macs"])
    try:
        example = next(iter(BatchLoader(data, batch_size=1))).inputs
        return count_macs(model, example)
    except Exception:  # noqa: BLE001 - MACs are informative; a model they fail on still runs
        return None


def dry_run(
    recipe: Recipe,
    out_dir: Path,
    methods: list[str] | None = None,
    timed_steps: int = TIMED_STEPS,
) -> DryRun:
    """Check `recipe` end to end and estimate its run into `out_dir` (see the module doc).

    `out_dir` is only read (a teacher saved there by the same recipe is reused by the run, so
    it is not counted). Raises the errors the run would raise, before any training."""
    methods = methods or list(recipe.distill.methods)
    with tempfile.TemporaryDirectory(prefix="kdistill-dry-run-") as scratch:
        exp, data_seconds = _timed(_Rehearsal, recipe, Path(scratch), progress=False)
        exp.timed_steps = timed_steps
        full: Splits = exp.splits
        description = exp.data_description()
        exp.checked_dataset = full.train
        largest = max(recipe.train.batch_size, recipe.teacher.train.batch_size)
        exp.splits = Splits(
            _first_samples(full.train, timed_steps * largest),
            _first_samples(full.val, EVAL_BATCH),
            _first_samples(full.test, EVAL_BATCH),
            full.normalization,
            other_val=None
            if full.other_val is None
            else (full.other_val[0], _first_samples(full.other_val[1], EVAL_BATCH)),
        )
        found = _Found(_Timer(exp, full), other={"data loading": data_seconds})
        how = _rehearse_teacher(exp, recipe, Path(out_dir), methods, Path(scratch), found)
        term_lines, settings_lines, grid = _rehearse_students(exp, recipe, methods, found)
        if recipe.cost.enabled:
            found.other["model costs"] = found.costs + _timed(exp.measure_latency)[1]
        return DryRun(
            recipe,
            description,
            found.models,
            term_lines,
            settings_lines,
            grid,
            how,
            _ordered(found.trainings),
            found.other,
        )


@dataclass
class _Timer:
    """Times of the rehearsal scaled to the full splits (`full`); `exp` rehearses on a few
    batches of them."""

    exp: Any
    full: Splits

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(Experiment.loader(self.exp, self.full.train, 0, batch_size, shuffle=True))

    def evaluation_seconds(self, model: nn.Module) -> float:
        """Seconds per sample of the task's evaluation of `model`."""
        _, seconds = _timed(self.exp.evaluator(self.exp.splits.val), model)
        return seconds / len(self.exp.splits.val)

    def training(
        self,
        what: str,
        count: int,
        config: TrainConfig,
        model: nn.Module,
        final: str,
        started: float,
        epochs: int | None = None,
    ) -> Training:
        """A `Training` from the rehearsal of `model` begun at `started` (perf_counter),
        whose loader is `exp.last_loader`."""
        exp, full = self.exp, self.full
        loader = exp.last_loader
        assert loader is not None
        per_sample = self.evaluation_seconds(model)
        seconds = per_sample * len(exp.splits.val)
        validation = per_sample * len(full.val)
        gap = loader.epoch_end_seconds()
        epoch_end = validation if gap is None else max(gap - seconds, 0.0) + validation
        max_steps = config.max_steps
        return Training(
            what,
            count,
            config.epochs if epochs is None else epochs,
            self.steps_per_epoch(loader.batch_size),
            loader.step_seconds(),
            epoch_end,
            per_sample * len(getattr(full, final)),
            loader.first_batch_at() - started,
            None if max_steps is None else max_steps * config.accumulate_steps,
        )


@dataclass
class _Found:
    """What the rehearsal measured so far."""

    timer: _Timer
    other: dict[str, float]
    trainings: list[Training] = field(default_factory=list)
    models: list[ModelLine] = field(default_factory=list)
    costs: float = 0.0  # seconds spent costing the models


def _how_the_teacher_comes(recipe: Recipe, exp: Any, out_dir: Path, teacher: nn.Module):
    """(whether the run trains the teacher, how the run gets it, in words); a checkpoint named
    by the recipe is loaded into `teacher` (and checked against it) here."""
    spec = recipe.teacher
    loaded = exp.load_given_teacher(teacher)
    if loaded is not None and not spec.fine_tune:
        scores = exp.check_loaded_teacher(teacher, loaded)  # the inputs it was trained on
        shown = ", ".join(f"{value:.4f} with normalize {mode}" for mode, value in scores.items())
        return False, f"loaded from {loaded.split(' ', 1)[1]} (fits the model; validation {shown})"
    if loaded is not None:
        return (
            True,
            f"loaded from {loaded.split(' ', 1)[1]}, then trained {spec.train.epochs} epochs",
        )
    if saved_teacher_matches(out_dir / "models", exp.teacher_identity()):
        return False, f"reused from {out_dir / 'models'} (trained by the same recipe)"
    store = teacher_store(exp.plan, out_dir)
    if saved_teacher_matches(store, exp.teacher_identity()):
        return False, f"reused from {store} (trained by a run with the same teacher, data and seed)"
    how = f"trained by the run, {spec.train.epochs} epochs" + (
        f" on keyed views ({_views_text(spec.augment)}), stored in {store}"
        if spec.augment is not None
        else ""
    )
    return True, how


def _rehearse_teacher(exp, recipe: Recipe, out_dir: Path, methods, scratch: Path, found) -> str:
    """Build (and, when the run trains it, rehearse training) the teacher, cost it and make its
    outputs as the run would; every training is checked first. How the run gets the teacher."""
    spec, full, timer = recipe.teacher, found.timer.full, found.timer
    teacher = build_model(spec, full.train, recipe.seed, exp.task)
    trains, how = _how_the_teacher_comes(recipe, exp, out_dir, teacher)
    check_every_training(exp, teacher, methods, full.train)  # mistakes fail here, quickly
    started = time.perf_counter()
    if trains:
        config = exp.train_config(spec.train, epochs=REHEARSAL_EPOCHS)
        fit(
            Distiller(None, teacher, exp.objective(None)),
            exp.augmented_loader(exp.splits.train, recipe.seed, config.batch_size, spec.augment),
            config,
            evaluate=exp.evaluator(exp.splits.val),
            label="teacher",
            metrics_log=exp.metrics,
            checkpoint_dir=scratch / "checkpoints" / "teacher",
        )
    teacher.eval()
    if trains:  # its test evaluation, made in any case, is counted below
        found.trainings.append(timer.training("teacher", 1, spec.train, teacher, "test", started))
        found.trainings[-1].final_seconds = 0.0
    found.other["teacher test evaluation"] = timer.evaluation_seconds(teacher) * len(full.test)
    cost, found.costs = _timed(exp.cost_of, "teacher", teacher)
    found.models.append(
        ModelLine(
            "teacher",
            "teacher",
            spec.model,
            count_parameters(teacher),
            _macs(teacher, full.train, cost),
        )
    )
    exp.teacher = teacher
    outputs, seconds = _timed(exp.prepare_teacher_outputs, teacher)
    exp.teacher_train_outputs = outputs
    if recipe.distill.teacher_cache != "off":
        scale = len(full.train) / len(exp.splits.train)
        found.other[f"teacher outputs ({recipe.distill.teacher_cache})"] = seconds * scale
    return how


def _rehearse_students(exp, recipe: Recipe, methods, found: _Found):
    """Rehearse every student alone and with each method (its first grid point), as the run
    trains them; (the terms of each, the settings of each method, grid points per method)."""
    timer = found.timer
    term_lines: dict[str, list[str]] = {}
    settings_lines: dict[str, str] = {}
    grid = {method: len(grid_settings(recipe, method)) for method in methods}
    tune_epochs = recipe.tune.epochs or recipe.train.epochs
    for student_spec in recipe.students:
        for method in ["alone", *methods]:
            key = None if method == "alone" else method
            settings = grid_settings(recipe, key)[0] if key else {}
            terms = exp.objective(key, settings)
            label = f"{student_spec.name}/{method}"
            started = time.perf_counter()
            student, _, _ = exp.train_student(
                label,
                student_spec,
                recipe.seed,
                terms,
                method,
                exp.splits.val,
                epochs=REHEARSAL_EPOCHS,
            )
            training = timer.training(label, recipe.seeds, recipe.train, student, "test", started)
            if key is not None and grid[key] > 1:
                trial = dataclasses.replace(
                    training,
                    what=f"tune {label}",
                    count=grid[key],
                    epochs=tune_epochs,
                    final_seconds=training.epoch_end_seconds,
                )
                found.trainings.append(trial)
            found.trainings.append(training)
            term_lines[label] = _describe_terms(terms)
            if key is not None and key not in settings_lines:
                used = settings_used(exp.task, recipe.distill, key, settings)
                settings_lines[key] = ", ".join(f"{s.name}={s.value:g}" for s in used)
            if method == "alone":
                cost, seconds = _timed(exp.cost_of, student_spec.name, student)
                found.costs += seconds
                found.models.append(
                    ModelLine(
                        "student",
                        student_spec.name,
                        student_spec.model,
                        count_parameters(student),
                        _macs(student, timer.full.train, cost),
                    )
                )
    return term_lines, settings_lines, grid


def _ordered(trainings: list[Training]) -> list[Training]:
    """Teacher first, then the tuning trials, then the final trainings (the run's order)."""

    def rank(training: Training) -> int:
        return 0 if training.what == "teacher" else 1 if training.what.startswith("tune ") else 2

    return sorted(trainings, key=rank)
