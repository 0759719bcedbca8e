"""The plan: what a recipe asks for, worked out once when it is read.

`make_plan(recipe)` turns a validated recipe into a `RunPlan` — the task, the data source, where
the teacher comes from (loaded, pretrained or trained, and the identity a trained one is stored
under), every model with the output it is scored on, each method's objective and the trainings
in the order the run makes them. Executing it (`recipes.runner.Experiment`) writes a run folder
whose `plan.json` is this plan (`recipes.run_store`); `check`, `cache`, `compress` and the
report read the plan instead of working it out again from the recipe.

The plan holds no data and no model: making it is cheap, reads no file and trains nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdistill.models.specs import pretrained_folder
from kdistill.recipes.objective import grid_settings, settings_label, task_options
from kdistill.recipes.schema import Recipe, TeacherSpec
from kdistill.tasks import Task, get_task, primary_metric

__all__ = [
    "ModelPlan",
    "RunPlan",
    "TeacherPlan",
    "TrainingPlan",
    "make_plan",
    "recipe_task",
    "teacher_identity",
]


def recipe_task(recipe: Recipe) -> Task:
    """The recipe's `Task` (`kdistill.tasks`), with the void label of its masks when it has one
    (`distill.ignore_index`)."""
    return get_task(recipe.task, **task_options(recipe.distill))


def teacher_identity(recipe: Recipe) -> dict:
    """What a teacher saved by a run must match to be reused: its spec and budget (device and
    progress aside), the data and the seed. Fields added after the first recipes are left out
    while at their defaults, so teachers saved before them are still recognised."""
    spec: TeacherSpec = recipe.teacher
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
                **({"augment": True} if spec.augment is None else {}),
                **({"output": True} if spec.output is None else {}),
                **({"fine_tune": True} if not spec.fine_tune else {}),
            },
        ),
        "data": recipe.data.identity(),
        "seed": recipe.seed,
    }


@dataclass(frozen=True)
class TeacherPlan:
    """Where the teacher comes from: `source` is "checkpoint" (`teacher.checkpoint`),
    "pretrained" (an `hf:<folder>` with its weights) or "trained" (by the run, or reused from a
    run with the same `identity`, stored under `digest`). `fine_tune`: a loaded teacher is
    trained further first. A teacher the run does not train is checked on the run's inputs."""

    model: str
    source: str
    path: str | None
    fine_tune: bool
    identity: dict
    digest: str

    @property
    def trained_here(self) -> bool:
        return self.source == "trained" or self.fine_tune

    @property
    def given(self) -> str | None:
        """How messages name a teacher the recipe gives (None: the run trains it)."""
        if self.source == "checkpoint":
            return f"teacher.checkpoint {self.path}"
        if self.source == "pretrained":
            return f"teacher.model {self.model}"
        return None


@dataclass(frozen=True)
class ModelPlan:
    role: str  # "teacher" or "student"
    field: str  # the recipe field: teacher, students.<name>
    model: str
    output: str | int | None


@dataclass(frozen=True)
class TrainingPlan:
    """One final training: a student alone or with a method, for one seed; `grid` counts the
    settings tried on validation first (1: none)."""

    label: str
    student: str
    method: str  # "alone" or a method name
    seed: int
    grid: int


@dataclass(frozen=True)
class RunPlan:
    name: str
    task: str
    metric: str
    data: dict[str, Any]
    teacher: TeacherPlan
    models: tuple[ModelPlan, ...]
    methods: tuple[str, ...]
    objectives: dict[str, list[str]]  # method → its terms, in words
    trainings: tuple[TrainingPlan, ...]
    seeds: tuple[int, ...] = field(default=(0,))

    def as_dict(self) -> dict:
        """The plan as JSON-able data (`plan.json` of the run store)."""
        return asdict(self)

    def training_labels(self) -> list[str]:
        return [training.label for training in self.trainings]


def _teacher_plan(recipe: Recipe) -> TeacherPlan:
    spec = recipe.teacher
    identity = teacher_identity(recipe)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = pretrained_folder(spec.model)
    if spec.checkpoint is not None:
        source, path = "checkpoint", spec.checkpoint
    elif folder is not None:
        source, path = "pretrained", str(folder)
    else:
        source, path = "trained", None
    return TeacherPlan(spec.model, source, path, spec.fine_tune, identity, digest)


def _describe_term(spec: Any) -> str:
    params = ", ".join(f"{key}={value}" for key, value in sorted(spec.params.items()))
    where = []
    if spec.output is not None:
        where.append(f"output {spec.output!r}")
    if spec.student or spec.teacher:
        where.append(f"{spec.student or 'output'} → {spec.teacher or 'output'}")
    suffix = f" on {', '.join(where)}" if where else ""
    return f"{spec.weight:g} × {spec.loss}({params}){suffix}"


def make_plan(recipe: Recipe, methods: list[str] | None = None) -> RunPlan:
    """The `RunPlan` of `recipe`, limited to `methods` (default: every method)."""
    task = recipe_task(recipe)
    methods = list(methods or recipe.distill.methods)
    models = [ModelPlan("teacher", "teacher", recipe.teacher.model, recipe.teacher.output)]
    models += [
        ModelPlan("student", f"students.{spec.name}", spec.model, spec.output)
        for spec in recipe.students
    ]
    seeds = tuple(recipe.seed + index for index in range(recipe.seeds))
    trainings = [
        TrainingPlan(
            f"{spec.name}/{method}/seed{seed}",
            spec.name,
            method,
            seed,
            1 if method == "alone" else len(grid_settings(recipe, method)),
        )
        for seed in seeds
        for spec in recipe.students
        for method in ["alone", *methods]
    ]
    objectives = {
        method: [_describe_term(term) for term in recipe.distill.methods[method]]
        for method in methods
    }
    objectives["alone"] = [f"{recipe.distill.hard_loss or task.default_hard_loss} (hard)"]
    source = {"kind": recipe.data.kind} if recipe.data.kind else {"dataset": recipe.data.dataset}
    data = {**source, "identity": recipe.data.identity()}
    return RunPlan(
        recipe.name,
        recipe.task,
        recipe.metric or primary_metric(task),
        data,
        _teacher_plan(recipe),
        tuple(models),
        tuple(methods),
        objectives,
        tuple(trainings),
        seeds,
    )


def grid_labels(recipe: Recipe, method: str) -> list[str]:
    """The grid points of `method` as labels (`alpha=0.5,temperature=4`)."""
    return [settings_label(settings) for settings in grid_settings(recipe, method)]


def teacher_store(plan: RunPlan, out_dir: str | Path) -> Path:
    """Where a trained teacher is kept for every recipe: ``<parent of the run folder>/teachers/
    <digest>``, the digest of its identity (model, training, data, seed — not the recipe's name
    or its students). Another recipe whose teacher has the same identity, run into a folder
    beside this one, loads it instead of training it again."""
    return Path(out_dir).parent / "teachers" / plan.teacher.digest
