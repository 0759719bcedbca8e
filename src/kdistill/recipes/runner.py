"""The experiment a recipe describes, top to bottom:

1. load the data; hold a validation split out of the training set;
2. train the teacher (or load it: an explicit checkpoint, or the one a previous run of the same
   recipe left in the run folder);
3. for each student and method, choose the distillation settings on the validation split
   (`tune.grid`), never on the test set;
4. for each seed: train the student alone and distilled with the chosen settings — same
   initial weights, data order and budget — and evaluate every model on the test set;
5. write `metrics.jsonl`, checkpoints, `results.json`, `report.md` and `curves.png`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from kdistill.data import BatchLoader
from kdistill.distill.distiller import Term
from kdistill.distill.teacher.store import MemoryTeacherOutputs, TeacherCache
from kdistill.engine import MetricsLog, TrainConfig
from kdistill.engine.checkpoint import atomic_write_text, save_checkpoint
from kdistill.engine.distributed import barrier, is_main_process, resolve_device
from kdistill.engine.trackers import Tracker, open_trackers
from kdistill.models import count_parameters
from kdistill.models.cost import CostBook
from kdistill.recipes.objective import (  # noqa: F401  (grid_settings, settings_label: re-exported)
    build_objective,
    grid_settings,
    settings_label,
)
from kdistill.recipes.plan import RunPlan, make_plan, recipe_task
from kdistill.recipes.run_store import RunRecord, RunSummary, describe_metrics, write_plan
from kdistill.recipes.schema import AugmentSpec, DistillSpec, Recipe
from kdistill.recipes.splits import (  # noqa: F401  (re-exported: the names callers know)
    EVAL_BATCH,
    Data,
    Splits,
    build_model,
    load_splits,
    load_teacher_checkpoint,
)
from kdistill.recipes.student_stage import StudentSteps
from kdistill.recipes.teacher_stage import TeacherSteps
from kdistill.tasks import (
    Task,
    evaluate,
    get_task,
    lower_is_better_metrics,
    percent_metrics,
    primary_metric,
)

__all__ = [
    "EVAL_BATCH",
    "Experiment",
    "RunRecord",
    "RunSummary",
    "Splits",
    "alone_terms",
    "build_model",
    "describe_metrics",
    "grid_settings",
    "load_splits",
    "method_terms",
    "recipe_task",
    "settings_label",
]


def method_terms(
    distill: DistillSpec,
    method: str,
    settings: dict,
    num_samples: int | None = None,
    task: Task | str = "classification",
) -> list[Term]:
    """The terms of `method` with grid `settings` (`recipes.objective.build_objective`)."""
    return build_objective(get_task(task), distill, method, settings, num_samples)


def alone_terms(recipe: Recipe) -> list[Term]:
    """The student trained alone: the hard loss of each output of the task."""
    return build_objective(recipe_task(recipe), recipe.distill, None)


class Experiment(TeacherSteps, StudentSteps):
    """Executes one recipe's plan into `out_dir` (the run store); each public step can also be
    called on its own. The plan (`recipes.plan.make_plan`) is made once, here; the teacher's
    steps are in `recipes.teacher_stage`, the students' in `recipes.student_stage`."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path,
        resume: bool = False,
        progress: bool = True,
        plan: RunPlan | None = None,
    ):
        self.recipe = recipe
        self.plan = plan or make_plan(recipe)
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.is_main = is_main_process()  # under torchrun only rank 0 writes files and prints
        if not resume and self.is_main:  # a fresh run: forget the previous run's logs
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.out_dir / "tuning.json").unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        for config in (recipe.train, recipe.teacher.train):  # a missing CUDA fails here, first
            resolve_device(config.device)
        self.task = recipe_task(recipe)
        self.splits = load_splits(recipe, self.task, self.out_dir)
        self.teacher: nn.Module | None = None
        self.teacher_train_outputs: MemoryTeacherOutputs | TeacherCache | None = None
        self._costs: CostBook | None = None  # built on the first cost (`cost_of`)
        self._sequences: dict[str, Data] = {}  # method → sequence-level training data
        self.trackers: list[Tracker] = []  # train.log: one run of each tracker for the recipe
        if self.is_main:
            names = list(dict.fromkeys([*recipe.teacher.train.log, *recipe.train.log]))
            self.trackers = open_trackers(names, self.out_dir, recipe.name, recipe.name)[0]
            for tracker in self.trackers:
                tracker.log_params(recipe.model_dump(mode="json"))

    @property
    def eval_batch(self) -> int:
        """Batch size of evaluation and teacher-output passes: the task's `eval_batch_size`
        when it sets one (language models: N×L×V logits), else `EVAL_BATCH`."""
        return int(self.task.eval_batch_size or EVAL_BATCH)

    def say(self, message: str) -> None:
        if self.progress and self.is_main:
            tqdm.write(message)

    def cost_of(self, name: str, model: nn.Module, **kwargs) -> dict | None:
        """The cost (`recipe.cost`) of the model's architecture (`models.cost.architecture_key`,
        not `name`): counted once and shared by every model of that architecture. Its latency
        is filled in by `measure_latency`, for all architectures at once."""
        spec = self.recipe.cost
        if not spec.enabled:
            return None
        if self._costs is None:
            self._costs = CostBook(
                self.splits.train.input_shape,
                threads=spec.threads,
                repeats=spec.repeats,
                warmup=spec.warmup,
                batch_sizes=spec.batch_sizes,
            )
        return self._costs.add(model, name=name, **kwargs)

    def measure_latency(self) -> None:
        """Time every architecture costed so far in one interleaved pass (`CostBook`)."""
        if self._costs is not None:
            self._costs.measure_latency()

    def loader(self, data: Data, seed: int, batch_size: int, shuffle: bool) -> BatchLoader:
        return BatchLoader(data, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def student_loader(self, data: Data, seed: int, batch_size: int) -> BatchLoader:
        """A student's training batches: shuffled by `seed`, with the recipe's keyed
        augmentation (`data.augment`, views seeded by `augment.seed` or the recipe's seed)."""
        return self.augmented_loader(data, seed, batch_size, self.recipe.data.augment)

    def augmented_loader(
        self, data: Data, seed: int, batch_size: int, spec: AugmentSpec | None
    ) -> BatchLoader:
        """Training batches shuffled by `seed`, augmented as `spec` says (None: plain)."""
        if spec is None:
            return self.loader(data, seed, batch_size, shuffle=True)
        return BatchLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            seed=seed,
            augmentation=spec.augmentation(),
            augment_seed=self.recipe.seed if spec.seed is None else spec.seed,
        )

    def view_epochs(self) -> int:
        """Epochs of views the teacher's outputs must cover: the longest student budget."""
        budgets = [self.recipe.train.epochs, self.recipe.tune.epochs or 0]
        compress = self.recipe.compress
        if compress is not None and compress.finetune is not None:
            budgets.append(compress.finetune.epochs)
        return max(budgets)

    def evaluator(self, data: Data):
        """model → the task's metrics on `data` (`tasks.evaluate`)."""
        loader = self.loader(data, 0, self.eval_batch, shuffle=False)
        device = self.recipe.train.device
        return lambda model: evaluate(model, loader, self.task, device)

    @property
    def metric(self) -> str:
        """The metric that ranks models (tuning, gap closed): the recipe's `metric`, else the
        task's first (`tasks.primary_metric`: accuracy, mIoU, COCO AP@[.5:.95], …)."""
        return self.recipe.metric or primary_metric(self.task)

    def objective(self, method: str | None, settings: dict | None = None) -> list[Term]:
        """The terms of `method` (None: the student alone) with grid `settings`, for this
        recipe's task and training split (`recipes.objective.build_objective`)."""
        return build_objective(
            self.task, self.recipe.distill, method, settings, len(self.splits.train)
        )

    def train_config(self, base: TrainConfig, epochs: int | None = None) -> TrainConfig:
        updates: dict = {"progress": self.progress and base.progress}
        if epochs is not None:
            updates["epochs"] = epochs
        return base.model_copy(update=updates)

    def data_description(self) -> dict:
        """What the models were trained on: classes, shapes, sizes and the normalisation."""
        train = self.splits.train
        return {
            "dataset": self.recipe.data.dataset,
            "classes": list(getattr(train, "classes", [])),
            "input_shape": list(train.input_shape),
            "sizes": {name: len(getattr(self.splits, name)) for name in ("train", "val", "test")},
            "normalization": self.splits.normalization,
            **({"text": self.splits.text} if self.splits.text is not None else {}),
        }

    # -- the whole experiment ---------------------------------------------------------------
    def run(self, methods: list[str] | None = None) -> RunSummary:
        started = time.perf_counter()
        recipe = self.recipe
        methods = methods or list(recipe.distill.methods)
        if self.is_main:
            write_plan(self.out_dir, make_plan(recipe, methods).as_dict())
            atomic_write_text(
                self.out_dir / "recipe.yaml",
                recipe.as_yaml(),
            )
            atomic_write_text(
                self.out_dir / "data.json",
                json.dumps(self.data_description(), indent=1),
            )
        for spec in recipe.students:  # a refused or broken whole_model fails before training
            if spec.whole_model is not None:
                self.initial_student(spec, recipe.seed)
        _, teacher_record = self.prepare_teacher()
        records = [teacher_record]
        chosen: dict[str, dict[str, dict]] = {}
        tuning: list[dict] = []
        for spec in recipe.students:
            chosen[spec.name] = {}
            for method in methods:
                settings, trials = self.tune(spec, method)
                chosen[spec.name][method] = settings
                tuning.extend(trials)
                if trials:
                    self.say(
                        f"{spec.name}/{method}: chose {settings_label(settings)} on validation"
                    )
        # the first seed's models, for a task that shows them in the report (`report_section`)
        report_section = self.task.report_section if self.task.report_models else None
        shown: dict[str, nn.Module] = {"teacher": self.teacher} if report_section else {}
        for index in range(recipe.seeds):
            seed = recipe.seed + index
            for spec in recipe.students:
                plan = [("alone", self.objective(None), {})]
                for method in methods:
                    settings = chosen[spec.name][method]
                    plan.append(
                        (
                            method,
                            self.objective(method, settings),
                            settings,
                        )
                    )
                for method, terms, settings in plan:
                    label = f"{spec.name}/{method}/seed{seed}"
                    run_started = time.perf_counter()
                    student, metrics, val_metrics = self.train_student(
                        label, spec, seed, terms, method, self.splits.test
                    )
                    if self.is_main:
                        save_checkpoint(
                            self.out_dir / "models",
                            label.replace("/", "__"),
                            student.state_dict(),
                            {"label": label, "settings": settings},
                        )
                    if report_section and index == 0:
                        shown[f"{spec.name}/{method}"] = student
                    records.append(
                        RunRecord(
                            label,
                            spec.name,
                            method,
                            seed,
                            count_parameters(student),
                            metrics[self.metric],
                            settings,
                            time.perf_counter() - run_started,
                            self.cost_of(spec.name, student),
                            metrics,
                            val_metrics,
                        )
                    )
                    self.say(f"{label}: test {describe_metrics(metrics)}")
        self.measure_latency()  # every architecture of the run, in one pass, after training
        summary = RunSummary(
            self.out_dir,
            records,
            chosen,
            tuning,
            time.perf_counter() - started,
            (self.metric, *(m for m in self.task.metrics if m != self.metric)),  # ranking first
            dict(self.task.labels),
            lower_is_better_metrics(self.task),
            percent_metrics(self.task),
        )
        if report_section and self.is_main:
            summary.sections = list(report_section(shown, self.splits))
        for tracker in self.trackers:  # the results table: one row per trained model
            for record in records:
                row = {**record.test_metrics, "params": record.params, "seconds": record.seconds}
                tracker.log_results(record.label, {**row, "cost": record.cost or {}})
        return summary

    def close_trackers(self, files: list[Path] = ()) -> None:
        """Hand the run's report `files` to the trackers (artifacts) and close them."""
        for tracker in self.trackers:
            for path in files:
                if Path(path).is_file():
                    tracker.log_artifact(Path(path))
            tracker.close()
        self.trackers = []
