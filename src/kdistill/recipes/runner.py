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

import inspect
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from kdistill.cache import (
    MemoryTeacherOutputs,
    TeacherCache,
    build_teacher_cache,
    offline_teacher_outputs,
)
from kdistill.data import (
    ArrayDataset,
    BatchLoader,
    SceneDataset,
    fashion_mnist_scenes,
    load_dataset,
    split_train_val,
    take,
)
from kdistill.distiller import Distiller, Term
from kdistill.engine import MetricsLog, TrainConfig, fit
from kdistill.engine.checkpoint import (
    atomic_write_text,
    checkpoint_path,
    load_checkpoint,
    load_state_dict_file,
    load_weights,
    load_whole_model,
    read_checkpoint_file,
    save_checkpoint,
)
from kdistill.engine.distributed import barrier, is_main_process
from kdistill.errors import CacheError, CheckpointError
from kdistill.losses import create_loss
from kdistill.models import MODELS, count_parameters
from kdistill.multitask import multitask_terms
from kdistill.recipes.schema import (
    SCENES_DATASET,
    DistillSpec,
    ModelSpec,
    Recipe,
    TeacherSpec,
    loss_parameters,
)
from kdistill.recipes.tasks import TARGET_KIND, evaluate_task, model_sizes, primary_metric
from kdistill.report.cost import model_cost

EVAL_BATCH = 1000


Data = ArrayDataset | SceneDataset


@dataclass
class Splits:
    train: Data
    val: Data
    test: Data


@dataclass
class RunRecord:
    """One trained model evaluated on the test set."""

    label: str
    student: str | None  # None for the teacher
    method: str  # "teacher", "alone" or a method name
    seed: int
    params: int
    test_score: float  # the task's first metric (tasks.METRICS): accuracy, mIoU or mAP@0.5
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    cost: dict | None = None  # ModelCost.as_dict() of the architecture (report/cost.py)
    test_metrics: dict[str, float] = field(default_factory=dict)  # every metric of the task


@dataclass
class RunSummary:
    out_dir: Path
    records: list[RunRecord]
    chosen: dict[str, dict[str, dict]]  # student → method → settings
    tuning: list[dict]
    seconds: float


def load_splits(recipe: Recipe) -> Splits:
    spec = recipe.data
    if spec.dataset == SCENES_DATASET:
        scenes = spec.scenes
        full_train, test = fashion_mnist_scenes(
            spec.root,
            train_count=scenes.train_count,
            test_count=scenes.test_count,
            size=scenes.size,
            seed=recipe.seed,
            max_items=scenes.max_items,
        )
        full_train, test = (
            data.with_target(TARGET_KIND[recipe.task]) for data in (full_train, test)
        )
        stratify = False  # a scene holds several classes
    else:
        full_train = load_dataset(spec.dataset, "train", root=spec.root)
        test = load_dataset(spec.dataset, "test", root=spec.root)
        stratify = True
    full_train = take(full_train, spec.train_limit, seed=recipe.seed, stratify=stratify)
    test = take(test, spec.test_limit, seed=recipe.seed, stratify=stratify)
    train, val = split_train_val(full_train, spec.val_size, seed=recipe.seed, stratify=stratify)
    return Splits(train, val, test)


def build_model(spec: ModelSpec, data: Data, seed: int, task: str = "classification") -> nn.Module:
    """Seeded construction: the same seed gives the same initial weights."""
    constructor = MODELS.get(spec.model)
    kwargs = model_sizes(task, data)
    if "image_size" in inspect.signature(constructor).parameters:
        kwargs["image_size"] = data.input_shape[-1]
    kwargs.update(spec.kwargs)
    torch.manual_seed(seed)
    return constructor(**kwargs)


def method_terms(
    distill: DistillSpec,
    method: str,
    settings: dict,
    num_samples: int | None = None,
    task: str = "classification",
) -> list[Term]:
    """`(1 − α)·hard + α·Σ wᵢ·softᵢ`, with grid settings applied to the losses that take them.

    A loss that takes `num_samples` (CRD's memory bank) and is not given one in the recipe gets
    the training split's size, `num_samples`. A multitask recipe mixes per task instead
    (`multitask_method_terms`)."""
    if task == "multitask":
        return multitask_method_terms(distill, method, settings)
    alpha = settings.get("alpha", distill.alpha)
    terms = []
    if alpha < 1:
        terms.append(Term(create_loss(distill.hard_loss), weight=1 - alpha, name="hard"))
    for spec in distill.methods[method]:
        accepted = loss_parameters(spec.loss)
        params = {**spec.params, **{k: v for k, v in settings.items() if k in accepted}}
        if "num_samples" in accepted and "num_samples" not in params:
            if num_samples is None:
                raise ValueError(f"loss {spec.loss!r} needs num_samples (the dataset size)")
            params["num_samples"] = num_samples
        terms.append(
            Term(
                create_loss(spec.loss, **params),
                weight=alpha * spec.weight,
                student=spec.student,
                teacher=spec.teacher,
                output=spec.output,
                warmup_epochs=spec.warmup_epochs,
            )
        )
    return terms


def soft_loss(spec, settings: dict) -> nn.Module:
    """The loss of a recipe term, with the grid settings it takes applied."""
    accepted = loss_parameters(spec.loss)
    return create_loss(
        spec.loss, **spec.params, **{k: v for k, v in settings.items() if k in accepted}
    )


def multitask_method_terms(distill: DistillSpec, method: str | None, settings: dict) -> list[Term]:
    """The four multitask terms (`multitask_terms`): r·(1 − α)·hard and r·α·w·soft per task;
    `method` None is the student alone (α = 0 for both tasks). A grid `alpha` sets both α."""
    mix = distill.multitask
    soft = {}
    if method is not None:
        soft = {spec.output: spec for spec in distill.methods[method]}
    alpha = {
        key: settings.get("alpha", getattr(mix, f"alpha_{key}")) if key in soft else 0.0
        for key in ("seg", "det")
    }
    terms = multitask_terms(
        create_loss(mix.seg_hard_loss),
        soft_loss(soft["seg"], settings) if "seg" in soft else None,
        create_loss(mix.det_hard_loss),
        soft_loss(soft["det"], settings) if "det" in soft else None,
        alpha_seg=alpha["seg"],
        alpha_det=alpha["det"],
        ratio_seg=mix.ratio_seg,
        ratio_det=mix.ratio_det,
    )
    for term in terms:  # a soft term's own recipe weight multiplies r·α
        if term.name in ("seg_soft", "det_soft"):
            spec = soft[term.output]
            term.weight *= spec.weight
            term.warmup_epochs = spec.warmup_epochs
    return terms


def alone_terms(recipe: Recipe) -> list[Term]:
    """The student trained alone: the hard loss (of each task)."""
    if recipe.task == "multitask":
        return multitask_method_terms(recipe.distill, None, {})
    return [Term(create_loss(recipe.distill.hard_loss), name="hard")]


def describe_metrics(metrics: dict[str, float]) -> str:
    """ "accuracy 0.8912" / "miou 0.6120, pixel_accuracy 0.9511" (losses left out)."""
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "loss")


def needs_teacher_layers(distill: DistillSpec, method: str) -> bool:
    return any(spec.teacher is not None for spec in distill.methods[method])


def grid_settings(recipe: Recipe, method: str | None = None) -> list[dict]:
    """Every point of `tune.grid` for `method`: the plain keys (`alpha`, `temperature`, …) and
    the keys scoped to it (`cwd.tau` → `tau`); keys scoped to other methods are left out."""
    grid = recipe.tune.grid if recipe.tune.enabled else {}
    scoped = {}
    for key, values in grid.items():
        owner, dot, parameter = key.rpartition(".")
        if not dot:
            scoped[key] = values
        elif owner == method:
            scoped[parameter] = values
    if not scoped:
        return [{}]
    keys = sorted(scoped)
    return [dict(zip(keys, values)) for values in itertools.product(*(scoped[k] for k in keys))]


def settings_label(settings: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sorted(settings.items())) or "default"


class Experiment:
    """Runs one recipe into `out_dir`; each public step can also be called on its own."""

    def __init__(self, recipe: Recipe, out_dir: Path, resume: bool = False, progress: bool = True):
        self.recipe = recipe
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
        self.splits = load_splits(recipe)
        self.teacher: nn.Module | None = None
        self.teacher_train_outputs: MemoryTeacherOutputs | TeacherCache | None = None
        self._costs: dict[str, dict | None] = {}

    def say(self, message: str) -> None:
        if self.progress and self.is_main:
            tqdm.write(message)

    def cost_of(self, name: str, model: nn.Module, **kwargs) -> dict | None:
        """The model's cost (`recipe.cost`), measured once per architecture `name`."""
        spec = self.recipe.cost
        if not spec.enabled:
            return None
        if name not in self._costs:
            cost = model_cost(
                model,
                self.splits.train.input_shape,
                threads=spec.threads,
                repeats=spec.repeats,
                warmup=spec.warmup,
                batch_sizes=spec.batch_sizes,
                **kwargs,
            )
            self._costs[name] = cost.as_dict()
        return self._costs[name]

    def loader(self, data: Data, seed: int, batch_size: int, shuffle: bool) -> BatchLoader:
        return BatchLoader(data, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def evaluator(self, data: Data):
        """model → the task's metrics on `data` (`tasks.evaluate_task`)."""
        loader = self.loader(data, 0, EVAL_BATCH, shuffle=False)
        device = self.recipe.train.device
        return lambda model: evaluate_task(model, loader, self.recipe.task, device)

    @property
    def metric(self) -> str:
        """The metric that ranks models: accuracy, mIoU or mAP@0.5 (`tasks.primary_metric`)."""
        return primary_metric(self.recipe.task)

    def train_config(self, base: TrainConfig, epochs: int | None = None) -> TrainConfig:
        updates: dict = {"progress": self.progress and base.progress}
        if epochs is not None:
            updates["epochs"] = epochs
        return base.model_copy(update=updates)

    # -- teacher ----------------------------------------------------------------------------
    def prepare_teacher(self) -> tuple[nn.Module, RunRecord]:
        spec: TeacherSpec = self.recipe.teacher
        teacher = build_model(spec, self.splits.train, self.recipe.seed, self.recipe.task)
        models_dir = self.out_dir / "models"
        identity = {
            "model": spec.model_dump(
                mode="json",
                exclude={
                    "checkpoint": True,
                    "trust_checkpoint": True,
                    # fp32 is the default: leave it out so teachers saved before the field existed
                    # are still recognised; another precision is part of the identity
                    "train": {"progress", "device"}
                    | ({"precision"} if spec.train.precision == "fp32" else set()),
                },
            ),
            "data": self.recipe.data.model_dump(mode="json"),
            "seed": self.recipe.seed,
        }
        started = time.perf_counter()
        if spec.checkpoint is not None:
            weights = load_state_dict_file(spec.checkpoint, trust=spec.trust_checkpoint)
            load_weights(teacher, weights, "teacher", spec.checkpoint)
            self.say(f"teacher: loaded {spec.checkpoint}")
        elif self._saved_teacher_matches(models_dir, identity):
            tensors, _ = load_checkpoint(models_dir, "teacher")
            load_weights(teacher, tensors, "teacher", str(checkpoint_path(models_dir, "teacher")))
            self.say(f"teacher: loaded {models_dir / 'teacher.safetensors'} (same recipe and data)")
        else:
            self.say(f"teacher: training {spec.model} ({count_parameters(teacher):,} parameters)")
            config = self.train_config(spec.train)
            fit(
                Distiller(None, teacher, alone_terms(self.recipe)),
                self.loader(self.splits.train, self.recipe.seed, config.batch_size, shuffle=True),
                config,
                evaluate=self.evaluator(self.splits.val),
                label="teacher",
                metrics_log=self.metrics,
                checkpoint_dir=self.out_dir / "checkpoints" / "teacher",
                resume=self.resume,
            )
            if self.is_main:
                save_checkpoint(models_dir, "teacher", teacher.state_dict(), {"identity": identity})
        teacher.eval()
        metrics = self.evaluator(self.splits.test)(teacher)
        record = RunRecord(
            "teacher",
            None,
            "teacher",
            self.recipe.seed,
            count_parameters(teacher),
            metrics[self.metric],
            seconds=time.perf_counter() - started,
            cost=self.cost_of("teacher", teacher),
            test_metrics=metrics,
        )
        self.say(f"teacher: test {describe_metrics(metrics)}")
        self.teacher = teacher
        self.teacher_train_outputs = self.prepare_teacher_outputs(teacher)
        return teacher, record

    def teacher_layers(self) -> list[str]:
        """Every teacher layer a method of the recipe taps, in first-use order."""
        layers = [t.teacher for terms in self.recipe.distill.methods.values() for t in terms]
        return list(dict.fromkeys(layer for layer in layers if layer is not None))

    def prepare_teacher_outputs(
        self, teacher: nn.Module
    ) -> MemoryTeacherOutputs | TeacherCache | None:
        """The teacher's training-set outputs as `distill.teacher_cache` asks: in memory (logits),
        on disk (`<run>/teacher_cache`, reused while teacher, data and settings match), or none.
        Both carry the training inputs' signatures: every batch is checked against them."""
        distill = self.recipe.distill
        if distill.teacher_cache == "memory":
            return MemoryTeacherOutputs.predict(
                teacher,
                self.loader(self.splits.train, 0, EVAL_BATCH, shuffle=False),
                self.recipe.train.device,
            )
        if distill.teacher_cache == "off":
            return None
        directory = self.out_dir / "teacher_cache"
        settings = {
            "layers": self.teacher_layers(),
            "dtype": distill.teacher_cache_dtype,
            "topk": distill.teacher_cache_topk,
        }
        cache = None
        if self.is_main:  # under torchrun rank 0 builds it; the other ranks wait, then read it
            try:
                cache = TeacherCache.open(directory, teacher, self.splits.train, **settings)
                self.say(f"teacher cache: reusing {directory}")
            except CacheError as error:
                if (directory / "manifest.json").exists():
                    self.say(f"teacher cache: rebuilding ({error})")
                cache = build_teacher_cache(
                    teacher,
                    self.splits.train,
                    directory,
                    batch_size=EVAL_BATCH,
                    progress=self.progress,
                    **settings,
                )
                self.say(cache.describe())
        barrier()
        if cache is None:
            cache = TeacherCache.open(directory, teacher, self.splits.train, **settings)
        return cache

    @staticmethod
    def _saved_teacher_matches(models_dir: Path, identity: dict) -> bool:
        """A teacher saved by an earlier run of the same recipe on the same data, intact."""
        path = checkpoint_path(models_dir, "teacher")
        if not path.exists():
            return False
        try:
            _, state = read_checkpoint_file(path)
        except CheckpointError as error:
            tqdm.write(f"teacher: not reusing {path}: {error}")
            return False
        return state.get("identity") == identity

    # -- students ---------------------------------------------------------------------------
    def train_student(
        self,
        label: str,
        spec: ModelSpec,
        seed: int,
        terms: list[Term],
        method: str,
        evaluate_on: Data,
        epochs: int | None = None,
        keep_checkpoint: bool = True,
        student: nn.Module | None = None,
        train: TrainConfig | None = None,
    ) -> tuple[nn.Module, dict[str, float]]:
        """Train one student; returns it and its metrics on `evaluate_on` after the last epoch.

        `student`: train this model instead of building `spec`'s (e.g. a pruned teacher);
        `train`: its budget instead of the recipe's `train`.
        """
        if student is None:
            student = self.initial_student(spec, seed)
        uses_teacher = any(term.uses_teacher for term in terms)
        distiller = Distiller(self.teacher if uses_teacher else None, student, terms)
        cached = None
        if uses_teacher and (
            isinstance(self.teacher_train_outputs, TeacherCache)  # holds every tapped layer
            or not needs_teacher_layers(self.recipe.distill, method)
        ):
            cached = self.teacher_train_outputs
        config = self.train_config(train or self.recipe.train, epochs)
        loader = self.loader(self.splits.train, seed, config.batch_size, shuffle=True)
        try:
            fit(
                distiller,
                loader,
                config,
                evaluate=self.evaluator(self.splits.val),
                label=label,
                metrics_log=self.metrics,
                checkpoint_dir=self.out_dir / "checkpoints" / label if keep_checkpoint else None,
                resume=self.resume and keep_checkpoint,
                teacher_outputs=offline_teacher_outputs(cached, loader, label),
            )
        finally:
            distiller.close()
        return student, self.evaluator(evaluate_on)(student)

    def initial_student(self, spec: ModelSpec, seed: int) -> nn.Module:
        """`spec`'s model built with `seed`, or its `whole_model` file (the same weights for
        every seed: only the data order then differs)."""
        whole_model = getattr(spec, "whole_model", None)
        if whole_model is None:
            return build_model(spec, self.splits.train, seed, self.recipe.task)
        return load_whole_model(whole_model, trust=spec.trust_checkpoint)

    def tune(self, spec, method: str) -> tuple[dict, list[dict]]:
        """The grid point with the best validation score (`metric`; ties: the first listed).

        Finished trials are recorded in `tuning.json`; `--resume` reuses them.
        """
        trials: list[dict] = []
        candidates = grid_settings(self.recipe, method)
        if len(candidates) == 1:
            return candidates[0], trials
        done = {trial["label"]: trial for trial in self._read_tuning()} if self.resume else {}
        for settings in candidates:
            label = f"tune/{spec.name}/{method}/{settings_label(settings)}"
            if label in done:
                trials.append(done[label])
                continue
            terms = method_terms(
                self.recipe.distill, method, settings, len(self.splits.train), self.recipe.task
            )
            _, val_metrics = self.train_student(
                label,
                spec,
                self.recipe.tune.seed,
                terms,
                method,
                self.splits.val,
                epochs=self.recipe.tune.epochs,
                keep_checkpoint=False,
            )
            trial = {
                "label": label,
                "student": spec.name,
                "method": method,
                "settings": settings,
                "val_score": val_metrics[self.metric],
                "metric": self.metric,
            }
            trials.append(trial)
            self._record_tuning(trial)
            self.say(f"  {label}: validation {describe_metrics(val_metrics)}")
        best = max(trials, key=lambda trial: trial["val_score"])
        return best["settings"], trials

    def _read_tuning(self) -> list[dict]:
        path = self.out_dir / "tuning.json"
        return json.loads(path.read_text()) if path.exists() else []

    def _record_tuning(self, trial: dict) -> None:
        if not self.is_main:
            return
        trials = [t for t in self._read_tuning() if t["label"] != trial["label"]] + [trial]
        atomic_write_text(self.out_dir / "tuning.json", json.dumps(trials, indent=1))

    # -- the whole experiment ---------------------------------------------------------------
    def run(self, methods: list[str] | None = None) -> RunSummary:
        started = time.perf_counter()
        recipe = self.recipe
        methods = methods or list(recipe.distill.methods)
        if self.is_main:
            atomic_write_text(
                self.out_dir / "recipe.yaml",
                yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),
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
        for index in range(recipe.seeds):
            seed = recipe.seed + index
            for spec in recipe.students:
                plan = [("alone", alone_terms(recipe), {})]
                for method in methods:
                    settings = chosen[spec.name][method]
                    plan.append(
                        (
                            method,
                            method_terms(
                                recipe.distill,
                                method,
                                settings,
                                len(self.splits.train),
                                recipe.task,
                            ),
                            settings,
                        )
                    )
                for method, terms, settings in plan:
                    label = f"{spec.name}/{method}/seed{seed}"
                    run_started = time.perf_counter()
                    student, metrics = self.train_student(
                        label, spec, seed, terms, method, self.splits.test
                    )
                    if self.is_main:
                        save_checkpoint(
                            self.out_dir / "models",
                            label.replace("/", "__"),
                            student.state_dict(),
                            {"label": label, "settings": settings},
                        )
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
                        )
                    )
                    self.say(f"{label}: test {describe_metrics(metrics)}")
        summary = RunSummary(self.out_dir, records, chosen, tuning, time.perf_counter() - started)
        return summary
