"""The run store: what a run writes into its folder, for `report`, `compress`, `check` and
`cache` to read. The front ends write models through here, not through engine internals."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from kdistill.engine.checkpoint import (
    atomic_write_text,
    checkpoint_path,
    read_checkpoint_file,
    save_checkpoint,
    save_whole_model,
)
from kdistill.errors import CheckpointError

__all__ = [
    "MODELS",
    "PLAN",
    "RunRecord",
    "RunSummary",
    "describe_metrics",
    "read_plan",
    "save_model",
    "saved_teacher_matches",
    "write_plan",
]

PLAN = "plan.json"  # <run>/plan.json: the plan the run executed (`recipes.plan.RunPlan`)

MODELS = "models"  # <run>/models: the weights of every model a run keeps


def save_model(
    run_dir: str | Path, name: str, model: nn.Module, state: dict, whole: bool = False
) -> Path:
    """Write `model` into the run folder `run_dir`: its weights as
    ``<run>/models/<name>.safetensors`` with `state` (JSON) beside them, atomically; with `whole`
    also the pickled model ``<name>.pt``, for an architecture `create_model` cannot rebuild (a
    pruned one; load it with ``load_whole_model(path, trust=True)``). Returns the weights' path.
    Raises CheckpointError when a file cannot be written."""
    models = Path(run_dir) / MODELS
    save_checkpoint(models, name, model.state_dict(), state)
    if whole:
        save_whole_model(model, models / f"{name}.pt")
    return checkpoint_path(models, name)


def write_plan(run_dir: str | Path, plan: dict) -> Path:
    """Write the plan a run executes (`RunPlan.as_dict()`) as ``<run>/plan.json``."""
    path = Path(run_dir) / PLAN
    atomic_write_text(path, json.dumps(plan, indent=1, default=str))
    return path


def read_plan(run_dir: str | Path) -> dict:
    """The plan ``<run>/plan.json`` holds; CheckpointError naming the folder when there is none
    (a run folder written before plans, or not a run folder)."""
    path = Path(run_dir) / PLAN
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {PLAN} (not a run folder, or written before plans)")
    return json.loads(path.read_text())


def saved_teacher_matches(models_dir: str | Path, identity: dict) -> bool:
    """A teacher saved (``<models_dir>/teacher.safetensors``) by an earlier run of the same
    teacher on the same data (`identity`, `recipes.plan.teacher_identity`), intact."""
    path = checkpoint_path(Path(models_dir), "teacher")
    if not path.exists():
        return False
    try:
        _, state = read_checkpoint_file(path)
    except CheckpointError as error:
        from tqdm.auto import tqdm

        tqdm.write(f"teacher: not reusing {path}: {error}")
        return False
    return state.get("identity") == identity


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


def describe_metrics(metrics: dict[str, float]) -> str:
    """ "accuracy 0.8912" / "miou 0.6120, pixel_accuracy 0.9511" (losses left out)."""
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "loss")
