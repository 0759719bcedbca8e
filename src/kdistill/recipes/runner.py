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

import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from kdistill.data import (
    ArrayDataset,
    BatchLoader,
    ChannelStats,
    SceneDataset,
    channel_stats,
    dataset_kind,
    fashion_mnist_scenes,
    hide_labels,
    load_train_test,
    repeat_to,
    split_train_val,
    standardize,
    take,
)
from kdistill.data.completions import (
    KJV_COMPLETIONS_DATASET,
    PromptCompletions,
    kjv_completion_splits,
)
from kdistill.data.text import BOS_ID, EOS_ID, TokenBlocks, kjv_splits
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.model_output import pick_output, picked_output
from kdistill.distill.onpolicy import teacher_sequences
from kdistill.distill.teacher.sequences import TeacherSequences
from kdistill.distill.teacher.store import (
    MemoryTeacherOutputs,
    TeacherCache,
    TokenTeacherCache,
    build_teacher_cache,
    build_token_cache,
    build_view_cache,
    loader_views,
    offline_teacher_outputs,
)
from kdistill.distill.transforms import on_policy_transform
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
from kdistill.engine.distributed import barrier, is_main_process, resolve_device
from kdistill.errors import CacheError, CheckpointError
from kdistill.models import count_parameters, model_from_spec
from kdistill.models.cost import CostBook
from kdistill.models.specs import pretrained_folder
from kdistill.recipes.objective import build_objective, task_options
from kdistill.recipes.schema import (
    SCENES_DATASET,
    TEXT_DATASETS,
    AugmentSpec,
    DistillSpec,
    ModelSpec,
    NormalizeSpec,
    Recipe,
    TeacherSpec,
    TokenCacheSpec,
)
from kdistill.recipes.teacher_check import check_input_reading, check_stored_normalization
from kdistill.tasks import (
    Task,
    best,
    evaluate,
    get_task,
    lower_is_better_metrics,
    percent_metrics,
    primary_metric,
)

EVAL_BATCH = 1000  # a task may ask for fewer (`eval_batch_size`: N×L×V logits)


Data = ArrayDataset | SceneDataset | TokenBlocks | PromptCompletions


@dataclass
class Splits:
    train: Data
    val: Data
    test: Data
    normalization: dict = field(default_factory=dict)  # how inputs were standardised (data.json)
    tokenizer: Any = None  # text: the tokenizer of the token ids (decodes samples for reports)
    # the validation split read the other way (("none", raw) when the recipe normalises,
    # ("train", standardised) when it does not): a loaded teacher is scored on both
    other_val: tuple[str, Data] | None = None
    text: dict | None = None  # text: books, tokens and bytes per split, tokenizer (data.json)


@dataclass
class RunRecord:
    """One trained model evaluated on the test set."""

    label: str
    student: str | None  # None for the teacher
    method: str  # "teacher", "alone" or a method name
    seed: int
    params: int
    test_score: float  # the task's first metric (Task.metrics): accuracy, mIoU or mAP@0.5
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    cost: dict | None = None  # ModelCost.as_dict() of the architecture (models/cost.py)
    test_metrics: dict[str, float] = field(default_factory=dict)  # every metric of the task
    # every metric on the validation split after training (the teacher-beats-alone check)
    val_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSummary:
    out_dir: Path
    records: list[RunRecord]
    chosen: dict[str, dict[str, dict]]  # student → method → settings
    tuning: list[dict]
    seconds: float
    metrics: tuple[str, ...] = ("accuracy",)  # the task's metrics; the first ranks
    labels: dict[str, str] = field(default_factory=lambda: {"accuracy": "accuracy"})
    lower_is_better: tuple[str, ...] = ()  # metrics where lower is better (NLL, perplexity)
    percent: tuple[str, ...] | None = None  # metrics that are fractions shown in % (None: all)
    # Markdown lines the task adds to the report (language models: sampled continuations)
    sections: list[str] = field(default_factory=list)


def recipe_task(recipe: Recipe) -> Task:
    """The recipe's `Task` (`kdistill.tasks`), with the void label of its masks when it has one
    (`distill.ignore_index`)."""
    return get_task(recipe.task, **task_options(recipe.distill))


def load_splits(recipe: Recipe, task: Task | None = None, out_dir: Path | None = None) -> Splits:
    """Train / validation / test data carrying the targets of the recipe's task.

    `out_dir`: the run folder, where text data keeps its tokenizer (``<out_dir>/tokenizer``
    unless ``data.text.tokenizer_dir`` says; None and no folder given: not saved)."""
    task = task or recipe_task(recipe)
    spec = recipe.data
    if spec.dataset in TEXT_DATASETS:
        return text_splits(recipe, task, out_dir)
    builtin = dataset_kind(spec.dataset) == "registry"
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
    else:
        full_train, test = load_train_test(
            spec.dataset,
            root=spec.root,
            train=spec.train,
            test=spec.test,
            kwargs=spec.kwargs,
            builtin_normalize=spec.normalize == "auto",
        )
    full_train, test = task.prepare(full_train), task.prepare(test)
    stratify = isinstance(full_train, ArrayDataset)  # class labels (a scene holds several)
    full_train = take(full_train, spec.train_limit, seed=recipe.seed, stratify=stratify)
    test = take(test, spec.test_limit, seed=recipe.seed, stratify=stratify)
    train, val = split_train_val(full_train, spec.val_size, seed=recipe.seed, stratify=stratify)
    if spec.normalize == "auto" and (builtin or spec.dataset == SCENES_DATASET):
        return Splits(train, val, test, {"mode": "auto", "applied": "the dataset's own"})
    if spec.normalize == "none":
        other = (
            ("train", standardize(val, channel_stats(train))) if _standardizable(train) else None
        )
        return Splits(train, val, test, {"mode": "none"}, other_val=other)
    if isinstance(spec.normalize, NormalizeSpec):
        stats, mode = ChannelStats(tuple(spec.normalize.mean), tuple(spec.normalize.std)), "given"
    else:  # "train", or "auto" for data without a normalisation of its own
        stats, mode = channel_stats(train), "train"
    record = {"mode": mode, **stats.as_dict()}
    if mode == "train":
        record["computed_on"] = f"the training split ({len(train)} samples)"
    standardized = (standardize(data, stats) for data in (train, val, test))
    return Splits(*standardized, record, other_val=("none", val))


def _standardizable(data: Data) -> bool:
    """Float N×C×… images whose channels vary (what `channel_stats` takes)."""
    inputs = getattr(data, "inputs", None)
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 3:
        return False
    flat = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
    return bool((flat.std(dim=1) > 0).all())


def text_splits(recipe: Recipe, task: Task, out_dir: Path | None) -> Splits:
    """`data.dataset: kjv`: token blocks split by book (`kdistill.data.text.kjv_splits`);
    `kjv_completions`: its verses as prompt → completion sequences, split by the same books
    (`kdistill.data.completions.kjv_completion_splits`)."""
    spec, text = recipe.data, recipe.data.text
    folder = text.tokenizer_dir or (Path(out_dir) / "tokenizer" if out_dir is not None else None)
    common = {  # the corpus, its book split and the tokenizer: the same for both layouts
        "vocab_size": text.vocab_size,
        "val_books": text.val_books,
        "test_books": text.test_books,
        "tokenizer_dir": folder,
        "min_frequency": text.min_frequency,
        "program": text.program,
        "text_file": text.text_file,
        "train_limit": spec.train_limit,
        "test_limit": spec.test_limit,
        "seed": recipe.seed,
    }
    if spec.dataset == KJV_COMPLETIONS_DATASET:
        found = kjv_completion_splits(
            max_length=text.max_length,
            start_id=BOS_ID if text.start_token == "bos" else EOS_ID,
            end_token=text.end_token,
            **common,
        )
    else:
        found = kjv_splits(block_size=text.block_size, **common)
    train, val, test = (task.prepare(data) for data in (found.train, found.val, found.test))
    return Splits(train, val, test, {"mode": "none"}, found.tokenizer, found.info)


def load_teacher_checkpoint(spec: TeacherSpec, teacher: nn.Module) -> None:
    """Load `spec.checkpoint` into `teacher` (its key, prefix and trust settings applied);
    errors name the `teacher.` fields."""
    weights = load_state_dict_file(
        spec.checkpoint,
        trust=spec.trust_checkpoint,
        key=spec.checkpoint_key,
        strip_prefix=spec.strip_prefix,
        field="teacher.",
    )
    load_weights(teacher, weights, "teacher", spec.checkpoint, field="teacher.")


def build_model(spec: ModelSpec, data: Data, seed: int, task: Task | None = None) -> nn.Module:
    """Seeded construction: the same seed gives the same initial weights.

    A registry model also gets the data's sizes its constructor accepts (`in_channels`,
    `num_classes`, `image_size`; `Task.model_kwargs`); any other model (import path,
    torchvision:, hf:, …) gets exactly the recipe's kwargs (`kdistill.models.specs`)."""
    task = task or get_task("classification")
    sizes = {**task.model_kwargs(data), "image_size": data.input_shape[-1]}
    torch.manual_seed(seed)
    model = model_from_spec(spec.model, spec.kwargs, data_sizes=sizes)
    return pick_output(model, spec.output, model_label(spec))


def model_label(spec: ModelSpec) -> str:
    """How messages name the recipe field of `spec`: `teacher` or `students.<name>`."""
    name = getattr(spec, "name", None)
    return "teacher" if name is None else f"students.{name}"


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


def describe_metrics(metrics: dict[str, float]) -> str:
    """ "accuracy 0.8912" / "miou 0.6120, pixel_accuracy 0.9511" (losses left out)."""
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "loss")


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
        for config in (recipe.train, recipe.teacher.train):  # a missing CUDA fails here, first
            resolve_device(config.device)
        self.task = recipe_task(recipe)
        self.splits = load_splits(recipe, self.task, self.out_dir)
        self.teacher: nn.Module | None = None
        self.teacher_train_outputs: MemoryTeacherOutputs | TeacherCache | None = None
        self._costs: CostBook | None = None  # built on the first cost (`cost_of`)
        self._sequences: dict[str, Data] = {}  # method → sequence-level training data

    @property
    def eval_batch(self) -> int:
        """Batch size of evaluation and teacher-output passes: the task's `eval_batch_size`
        when it sets one (language models: N×L×V logits), else `EVAL_BATCH`."""
        return int(getattr(self.task, "eval_batch_size", EVAL_BATCH))

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

    def student_data(self, spec: ModelSpec, seed: int, uses_teacher: bool) -> Data:
        """The training data of a student: the training split, or for a label-scarce student
        (`labelled: n`) the split with all but n (stratified, drawn by `seed`) labels hidden
        when it learns from the teacher, or those n labelled images alone — repeated to the
        split's size, so that it takes the same steps per epoch — when it does not."""
        labelled = getattr(spec, "labelled", None)
        if labelled is None:
            return self.splits.train
        train = self.splits.train
        scarce, kept = hide_labels(train, labelled, seed)
        if uses_teacher:
            return scarce
        return repeat_to(train.subset(kept, name=f"{train.name}-labelled{labelled}"), len(train))

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
        """The metric that ranks models: accuracy, mIoU or mAP@0.5 (`tasks.primary_metric`)."""
        return primary_metric(self.task)

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

    # -- teacher ----------------------------------------------------------------------------
    def teacher_identity(self) -> dict:
        """What a teacher saved in the run folder must match to be reused: its spec and budget
        (device and progress aside), the data and the seed."""
        spec: TeacherSpec = self.recipe.teacher
        return {
            "model": spec.model_dump(
                mode="json",
                exclude={
                    "checkpoint": True,
                    "checkpoint_key": True,
                    "strip_prefix": True,
                    "trust_checkpoint": True,
                    # fp32 is the default: leave it out so teachers saved before the field existed
                    # are still recognised; another precision is part of the identity
                    "train": {"progress", "device"}
                    | ({"precision"} if spec.train.precision == "fp32" else set()),
                    # added later: left out while off, so earlier teachers are still recognised
                    **({"augment": True} if spec.augment is None else {}),
                    **({"output": True} if spec.output is None else {}),
                    **({"fine_tune": True} if not spec.fine_tune else {}),
                },
            ),
            "data": self.recipe.data.identity(),
            "seed": self.recipe.seed,
        }

    def teacher_store(self) -> Path:
        """Where a trained teacher is kept for every recipe: ``<parent of the run
        folder>/teachers/<digest>``, the digest of `teacher_identity` (model, training, data,
        seed — not the recipe's name or its students). Another recipe whose teacher has the same
        identity, run into a folder beside this one, loads it instead of training it again."""
        identity = json.dumps(self.teacher_identity(), sort_keys=True).encode()
        return self.out_dir.parent / "teachers" / hashlib.sha256(identity).hexdigest()[:16]

    def prepare_teacher(self) -> tuple[nn.Module, RunRecord]:
        spec: TeacherSpec = self.recipe.teacher
        teacher = build_model(spec, self.splits.train, self.recipe.seed, self.task)
        models_dir = self.out_dir / "models"
        identity = self.teacher_identity()
        started = time.perf_counter()
        loaded = self.load_given_teacher(teacher)
        if loaded is not None and not spec.fine_tune:
            self.check_loaded_teacher(teacher, loaded)
        elif loaded is None and self._saved_teacher_matches(models_dir, identity):
            tensors, _ = load_checkpoint(models_dir, "teacher")
            load_weights(teacher, tensors, "teacher", str(checkpoint_path(models_dir, "teacher")))
            self.say(f"teacher: loaded {models_dir / 'teacher.safetensors'} (same recipe and data)")
        elif loaded is None and self._saved_teacher_matches(self.teacher_store(), identity):
            store = checkpoint_path(self.teacher_store(), "teacher")
            tensors, _ = read_checkpoint_file(store)
            load_weights(teacher, tensors, "teacher", str(store))
            if self.is_main:  # the run folder stays complete on its own
                save_checkpoint(models_dir, "teacher", teacher.state_dict(), self._teacher_state())
            self.say(
                f"teacher: reused {store} (trained by a run with the same teacher, training, "
                "data and seed)"
            )
        else:
            self.train_teacher(teacher, keep=loaded is None)
        teacher.eval()
        metrics = self.evaluator(self.splits.test)(teacher)
        val_metrics = self.evaluator(self.splits.val)(teacher)
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
            val_metrics=val_metrics,
        )
        self.say(f"teacher: test {describe_metrics(metrics)}")
        self.teacher = teacher
        self.teacher_train_outputs = self.prepare_teacher_outputs(teacher)
        return teacher, record

    def _teacher_state(self) -> dict:
        """What a saved teacher keeps beside its weights: its identity, and the normalisation
        of the inputs it was trained on (checked when a recipe loads it again)."""
        return {"identity": self.teacher_identity(), "normalization": self.splits.normalization}

    def load_given_teacher(self, teacher: nn.Module) -> str | None:
        """Load the trained weights the recipe gives (`teacher.checkpoint`; an `hf:<folder>`
        comes loaded); returns where they came from, or None when the teacher is not given."""
        spec: TeacherSpec = self.recipe.teacher
        if spec.checkpoint is not None:
            check_stored_normalization(spec.checkpoint, self.splits.normalization)
            load_teacher_checkpoint(spec, teacher)
            self.say(f"teacher: loaded {spec.checkpoint}")
            return f"teacher.checkpoint {spec.checkpoint}"
        if pretrained_folder(spec.model) is not None:
            self.say(f"teacher: loaded {spec.model} (its own trained weights)")
            return f"teacher.model {spec.model}"
        return None

    def check_loaded_teacher(self, teacher: nn.Module, source: str) -> dict[str, float]:
        """A teacher the run did not train, scored on the validation split as the recipe reads
        it and read the other way; refused when the other way is markedly better
        (`recipes.teacher_check.check_input_reading`)."""
        teacher.eval()
        device = self.recipe.train.device
        scores = check_input_reading(
            self.task,
            lambda data: evaluate(
                teacher, self.loader(data, 0, self.eval_batch, shuffle=False), self.task, device
            ),
            self.splits.val,
            str(self.splits.normalization.get("mode", "none")),
            self.splits.other_val,
            source,
        )
        self.say(
            "teacher: validation "
            + ", ".join(f"{value:.4f} ({mode})" for mode, value in scores.items())
        )
        return scores

    def train_teacher(self, teacher: nn.Module, keep: bool = True) -> None:
        """Train the teacher with `teacher.train` (after loading it, with `teacher.fine_tune`);
        saved in the run folder, and with `keep` in the store other recipes reuse."""
        spec: TeacherSpec = self.recipe.teacher
        self.say(f"teacher: training {spec.model} ({count_parameters(teacher):,} parameters)")
        config = self.train_config(spec.train)
        fit(
            Distiller(None, teacher, self.objective(None)),
            self.augmented_loader(
                self.splits.train, self.recipe.seed, config.batch_size, spec.augment
            ),
            config,
            evaluate=self.evaluator(self.splits.val),
            label="teacher",
            metrics_log=self.metrics,
            checkpoint_dir=self.out_dir / "checkpoints" / "teacher",
            resume=self.resume,
        )
        if self.is_main:
            state = self._teacher_state()
            save_checkpoint(self.out_dir / "models", "teacher", teacher.state_dict(), state)
            if keep:
                save_checkpoint(self.teacher_store(), "teacher", teacher.state_dict(), state)

    def teacher_layers(self) -> list[str]:
        """Every teacher layer a method of the recipe taps, in first-use order."""
        layers = [t.teacher for terms in self.recipe.distill.methods.values() for t in terms]
        return list(dict.fromkeys(layer for layer in layers if layer is not None))

    def prepare_teacher_outputs(
        self, teacher: nn.Module
    ) -> MemoryTeacherOutputs | TeacherCache | TokenTeacherCache | None:
        """The teacher's training-set outputs as `distill.teacher_cache` asks: in memory (logits),
        on disk (`<run>/teacher_cache`, reused while teacher, data and settings match), its
        top-k token distributions on disk (a `TokenCacheSpec`), or none. All carry the training
        inputs' signatures: every batch is checked against them."""
        distill = self.recipe.distill
        if isinstance(distill.teacher_cache, TokenCacheSpec):
            return self.prepare_token_cache(teacher, distill.teacher_cache)
        if distill.teacher_cache == "memory":
            views = self.views_loader()
            return MemoryTeacherOutputs.predict(
                teacher,
                views or self.loader(self.splits.train, 0, self.eval_batch, shuffle=False),
                self.recipe.train.device,
                epochs=None if views is None else self.view_epochs(),
            )
        if distill.teacher_cache == "off":
            return None
        cache = None
        if self.is_main:  # under torchrun rank 0 builds it; the other ranks wait, then read it
            cache, _ = self.disk_teacher_cache(teacher)
        barrier()
        if cache is None:
            wanted = self._cache_wanted(self.views_loader())
            cache = TeacherCache.open(
                self.out_dir / "teacher_cache", teacher, self.splits.train, **wanted
            )
        return cache

    def views_loader(self) -> BatchLoader | None:
        """With `data.augment`: the first seed's student loader, whose batches the teacher's
        stored views are built from (that run replays them bit for bit); otherwise None."""
        if self.recipe.data.augment is None:
            return None
        return self.student_loader(
            self.splits.train, self.recipe.seed, self.recipe.train.batch_size
        )

    def _cache_wanted(
        self,
        views: BatchLoader | None,
        layers: list[str] | None = None,
        dtype: str | None = None,
        topk: int | None = None,
    ) -> dict:
        """What a stored cache must match: layers, dtype, top-k (the recipe's unless given) and,
        with `views` (the loader of `views_loader`), the views of `view_epochs()` epochs."""
        distill = self.recipe.distill
        return {
            "layers": self.teacher_layers() if layers is None else layers,
            "dtype": dtype or distill.teacher_cache_dtype,
            "topk": distill.teacher_cache_topk if topk is None else topk,
            "views": None
            if views is None
            else {"epochs": self.view_epochs(), **loader_views(views)},
        }

    def disk_teacher_cache(
        self,
        teacher: nn.Module,
        directory: Path | None = None,
        *,
        layers: list[str] | None = None,
        dtype: str | None = None,
        topk: int | None = None,
        force: bool = False,
    ) -> tuple[TeacherCache, bool]:
        """The teacher's outputs over the training split in `directory` (default
        `<run>/teacher_cache`): with `data.augment`, on every view of `view_epochs()` epochs
        (`build_view_cache`), else on the plain samples (`build_teacher_cache`); `layers`,
        `dtype`, `topk` default to the recipe's. Reused while teacher, data and settings match
        (unless `force`), built otherwise. Returns the cache and whether it was built."""
        directory = self.out_dir / "teacher_cache" if directory is None else Path(directory)
        views = self.views_loader()
        wanted = self._cache_wanted(views, layers, dtype, topk)
        if not force:
            try:
                cache = TeacherCache.open(directory, teacher, self.splits.train, **wanted)
                self.say(f"teacher cache: reusing {directory}")
                return cache, False
            except CacheError as error:
                if (directory / "manifest.json").exists():
                    self.say(f"teacher cache: rebuilding ({error})")
        settings = {name: wanted[name] for name in ("layers", "dtype", "topk")}
        if views is not None:
            cache = build_view_cache(
                teacher,
                views,
                directory,
                wanted["views"]["epochs"],
                progress=self.progress,
                **settings,
            )
        else:
            cache = build_teacher_cache(
                teacher,
                self.splits.train,
                directory,
                batch_size=self.eval_batch,
                progress=self.progress,
                **settings,
            )
        self.say(cache.describe())
        return cache, True

    def prepare_token_cache(self, teacher: nn.Module, spec: TokenCacheSpec) -> TokenTeacherCache:
        """The teacher's top-k next-token distributions over the training blocks in
        `<run>/teacher_cache` (`kdistill.cache.tokens`), reused while teacher, data, k, T and
        dtype match; rank 0 builds, the other ranks wait and read."""
        directory = self.out_dir / "teacher_cache"
        wanted = {"topk": spec.topk, "temperature": spec.temperature, "dtype": spec.dtype}
        cache = None
        if self.is_main:
            try:
                cache = TokenTeacherCache.open(directory, teacher, self.splits.train, **wanted)
                self.say(f"teacher cache: reusing {directory}")
            except CacheError as error:
                if (directory / "manifest.json").exists():
                    self.say(f"teacher cache: rebuilding ({error})")
                cache = build_token_cache(
                    teacher,
                    self.splits.train,
                    directory,
                    batch_size=self.eval_batch,
                    output=getattr(self.task, "model_output", "logits"),
                    measure_positions=spec.measure_positions,
                    progress=self.progress,
                    **wanted,
                )
                self.say(cache.describe())
        barrier()
        if cache is None:
            cache = TokenTeacherCache.open(directory, teacher, self.splits.train, **wanted)
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
    ) -> tuple[nn.Module, dict[str, float], dict[str, float]]:
        """Train one student; returns it, its metrics on `evaluate_on` after the last epoch and
        its metrics on the validation split after the last epoch.

        `student`: train this model instead of building `spec`'s (e.g. a pruned teacher);
        `train`: its budget instead of the recipe's `train`.
        """
        if student is None:
            student = self.initial_student(spec, seed)
        uses_teacher = any(term.uses_teacher for term in terms)
        distiller = Distiller(
            self.teacher if uses_teacher else None,
            student,
            terms,
            teacher_speedup=self.recipe.distill.teacher_speedup if uses_teacher else None,
        )
        tapped = [t.teacher for t in terms if t.uses_teacher and t.teacher is not None]
        config = self.train_config(train or self.recipe.train, epochs)
        data = self.student_data(spec, seed, uses_teacher)
        distill = self.recipe.distill
        generated = method in distill.on_policy or method in distill.sequence_level
        transforms = []
        if method in distill.sequence_level:
            data = self.splits.train  # the prompts the teacher completed, in their order
            transforms.append(TeacherSequences(self.sequence_level_data(method)))
        loader = self.student_loader(data, seed, config.batch_size)
        if method in distill.on_policy:
            transforms.append(on_policy_transform(distill.on_policy[method], loader))
        try:
            result = fit(
                distiller,
                loader,
                config,
                evaluate=self.evaluator(self.splits.val),
                label=label,
                metrics_log=self.metrics,
                checkpoint_dir=self.out_dir / "checkpoints" / label if keep_checkpoint else None,
                resume=self.resume and keep_checkpoint,
                teacher_outputs=offline_teacher_outputs(
                    self.teacher_train_outputs if uses_teacher and not generated else None,
                    loader,
                    label,
                    tapped,
                ),
                batch_transforms=transforms,
            )
        finally:
            distiller.close()
        val_metrics = {
            key[len("val_") :]: value
            for key, value in result.final.items()
            if key.startswith("val_") and key != "val_loss"
        }
        if evaluate_on is self.splits.val and val_metrics:
            return student, val_metrics, val_metrics
        return student, self.evaluator(evaluate_on)(student), val_metrics

    def sequence_level_data(self, method: str) -> Data:
        """The training prompts with the teacher's completions (`distill.sequence_level`,
        Kim & Rush 2016), generated once into ``<run>/teacher_sequences`` and reused while the
        teacher, the data and the settings match (`kdistill.onpolicy.teacher_sequences`)."""
        spec = self.recipe.distill.sequence_level[method]
        if self.teacher is None:
            raise RuntimeError("sequence-level data needs the teacher: prepare_teacher() first")
        cached = self._sequences.get(method)
        if cached is None:
            train = self.splits.train
            cached, status = teacher_sequences(
                self.teacher.to(self.recipe.train.device),
                train,
                self.out_dir / "teacher_sequences",
                max_new_tokens=spec.max_new_tokens,
                batch_size=self.eval_batch,
                vocab_size=getattr(train, "vocab_size", None),
            )
            self.say(f"{method}: teacher sequences: {status}")
            self._sequences[method] = cached
        return cached

    def initial_student(self, spec: ModelSpec, seed: int) -> nn.Module:
        """`spec`'s model built with `seed`, or its `whole_model` file (the same weights for
        every seed: only the data order then differs)."""
        whole_model = getattr(spec, "whole_model", None)
        if whole_model is None:
            return build_model(spec, self.splits.train, seed, self.task)
        model = load_whole_model(whole_model, trust=spec.trust_checkpoint)
        if picked_output(model) is None:
            pick_output(model, spec.output, model_label(spec))
        return model

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
            terms = self.objective(method, settings)
            _, val_metrics, _ = self.train_student(
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
        chosen = best(self.task, self.metric, trials, key=lambda trial: trial["val_score"])
        return chosen["settings"], trials

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
        report_section = getattr(self.task, "report_section", None)
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
            self.task.metrics,
            dict(self.task.labels),
            lower_is_better_metrics(self.task),
            percent_metrics(self.task),
        )
        if report_section and self.is_main:
            summary.sections = list(report_section(shown, self.splits))
        return summary
