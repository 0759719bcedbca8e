"""A teacher the run did not train is checked on the run's own inputs.

A teacher given by `teacher.checkpoint` (or a pretrained `hf:<folder>`) was trained on inputs
this run does not see: the recipe's `data.normalize` may standardise images the teacher saw raw
(or the reverse). Nothing fails then — the teacher is simply worse, and the report advises
training it longer. So before it teaches, the teacher is evaluated on the validation split as the
recipe reads it and as it is read the other way (without normalisation when the recipe
normalises; with the training split's statistics when it does not); when the other reading is
markedly better the run stops, naming `data.normalize` and both scores.

A teacher kdistill trained stores the normalisation it was trained with (`normalization` in its
checkpoint's state); loading it again into a run that reads the inputs otherwise is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kdistill.errors import CheckpointError, ConfigError
from kdistill.tasks import Task, lower_is_better_metrics, percent_metrics, primary_metric

__all__ = [
    "MARGIN_POINTS",
    "MARGIN_RELATIVE",
    "check_input_reading",
    "check_stored_normalization",
    "markedly_better",
    "same_normalization",
]

MARGIN_POINTS = 0.02  # a fraction metric (accuracy, mIoU): 2 percentage points
MARGIN_RELATIVE = 0.05  # any other metric (NLL, perplexity): 5 % of the recipe's figure


def markedly_better(task: Task, metric: str, recipe_score: float, other_score: float) -> bool:
    """Whether `other_score` beats `recipe_score` by more than the margin, in the metric's
    direction (fractions: `MARGIN_POINTS`; others: `MARGIN_RELATIVE` of the recipe's score)."""
    fraction = metric in percent_metrics(task)
    margin = MARGIN_POINTS if fraction else MARGIN_RELATIVE * abs(recipe_score)
    if metric in lower_is_better_metrics(task):
        return recipe_score - other_score > margin
    return other_score - recipe_score > margin


def _show(task: Task, metric: str, value: float) -> str:
    if metric in percent_metrics(task):
        return f"{100 * value:.2f} %"
    return f"{value:.4f}"


def _reading(mode: str) -> str:
    return {
        "none": "normalize: none (inputs as read)",
        "train": "normalize: train (the training split's mean/std)",
        "given": "the recipe's normalize: {mean, std}",
        "auto": "normalize: auto",
    }.get(mode, f"normalize: {mode}")


def check_input_reading(
    task: Task,
    evaluate: Callable[[Any], Mapping[str, float]],
    val: Any,
    recipe_mode: str,
    other: tuple[str, Any] | None,
    source: str,
) -> dict[str, float]:
    """Evaluate the loaded teacher on `val` (the validation split as the recipe reads it) and,
    when `other` is given, on `other[1]` (the same split read as `other[0]` says: "none" or
    "train"); raise ConfigError when that reading scores markedly better. `source` names where
    the teacher came from (`teacher.checkpoint teacher.pt`). Returns both scores by reading."""
    metric = primary_metric(task)
    scores = {recipe_mode: float(evaluate(val)[metric])}
    if other is None:
        return scores
    other_mode, other_val = other
    scores[other_mode] = float(evaluate(other_val)[metric])
    if markedly_better(task, metric, scores[recipe_mode], scores[other_mode]):
        fix = (
            "data.normalize: none"
            if other_mode == "none"
            else "data.normalize: train (or the {mean: [...], std: [...]} it was trained with)"
        )
        raise ConfigError(
            f"data.normalize: the teacher ({source}) was not trained on the inputs this run "
            f"gives it: on the validation split it scores {metric} "
            f"{_show(task, metric, scores[recipe_mode])} with {_reading(recipe_mode)}, but "
            f"{_show(task, metric, scores[other_mode])} with {_reading(other_mode)}; set {fix}, "
            "the reading it was trained with"
        )
    return scores


def same_normalization(stored: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two `data.json` normalisation records transform the inputs alike: both none, or
    the same mean and std per channel (to 1e-5); "auto" (a built-in set's own) by its mode."""

    def key(record: Mapping[str, Any]) -> Any:
        if "mean" in record and "std" in record:
            return [round(float(v), 5) for v in [*record["mean"], *record["std"]]]
        return record.get("mode", "none")

    return key(stored) == key(current)


def check_stored_normalization(path: str | Path, current: Mapping[str, Any]) -> None:
    """`teacher.checkpoint` written by kdistill keeps the normalisation its teacher was trained
    with; refuse a run that reads the inputs otherwise. Other files carry none: nothing to do
    (the scores of `check_input_reading` then decide)."""
    from kdistill.engine.checkpoint import read_checkpoint_file

    path = Path(path)
    if path.suffix != ".safetensors":
        return
    try:
        _, state = read_checkpoint_file(path)
    except CheckpointError:
        return  # a plain safetensors file: no record of its inputs
    stored = state.get("normalization")
    if not isinstance(stored, Mapping) or same_normalization(stored, current):
        return
    raise ConfigError(
        f"data.normalize: teacher.checkpoint {path} was trained by kdistill on inputs read with "
        f"{_describe(stored)}, but this run reads them with {_describe(current)}; set "
        f"data.normalize to {_as_field(stored)}"
    )


def _describe(record: Mapping[str, Any]) -> str:
    if "mean" in record:
        return f"mean {list(record['mean'])} / std {list(record['std'])} ({record.get('mode')})"
    return f"normalize: {record.get('mode', 'none')}"


def _as_field(record: Mapping[str, Any]) -> str:
    if "mean" in record:
        return f"{{mean: {list(record['mean'])}, std: {list(record['std'])}}}"
    return str(record.get("mode", "none"))
