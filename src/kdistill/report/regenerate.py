"""`kdistill report <results.json>`: the report of a run, regenerated from its results file.

A run writes `results.json` beside its report (`report.writer.write_run_report`): every trained
model's record (test and validation metrics per seed, parameters, cost, settings), the settings
chosen on validation and the tuning grid. From that file alone the results table — means,
standard deviations, gap closed, settings — is rebuilt exactly as the run printed it; the
published tables in `docs/results/` are such files. The recipe (task, metric labels, which
settings were tuned) is read from `recipe.yaml` beside the file when the run folder holds one,
else from the built-in recipe the file names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kdistill.errors import KdistillError


def read_results(path: str | Path) -> dict:
    """The parsed results file, refused with a one-line error when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KdistillError(f"{path}: no such results file") from None
    except json.JSONDecodeError as error:
        raise KdistillError(f"{path}: not a JSON results file ({error})") from None
    if not isinstance(data, dict) or not (
        isinstance(data.get("records"), list) or isinstance(data.get("stages"), list)
    ):
        raise KdistillError(
            f"{path}: not a run's results file (expected an object with 'recipe' and 'records', "
            "as `kdistill run` writes to <run>/results.json, or 'stages', as `kdistill compress` "
            "writes)"
        )
    return data


def results_recipe(path: Path, data: dict, recipe: str | Path | None = None):
    """The recipe of a results file: `recipe` when given, else `recipe.yaml` beside the file,
    else the built-in recipe named in the file."""
    from kdistill.recipes.schema import load_recipe

    if recipe is not None:
        return load_recipe(recipe)
    beside = path.parent / "recipe.yaml"
    if beside.is_file():
        return load_recipe(beside)
    builtin = Path(__file__).parents[1] / "recipes" / "builtin" / f"{data.get('recipe')}.yaml"
    if builtin.is_file():
        return load_recipe(builtin)
    raise KdistillError(
        f"{path}: recipe {data.get('recipe')!r} is not built in and no recipe.yaml lies beside "
        "the file; name it with --recipe"
    )


def summary_from_results(data: dict, recipe, out_dir: Path):
    """A `RunSummary` holding the file's records, with the metrics of the recipe's task."""
    from kdistill.recipes.plan import recipe_task
    from kdistill.recipes.run_store import RunRecord, RunSummary
    from kdistill.tasks.base import lower_is_better_metrics, percent_metrics

    task = recipe_task(recipe)
    names = {f.name for f in dataclasses.fields(RunRecord)}
    records = [RunRecord(**{k: v for k, v in r.items() if k in names}) for r in data["records"]]
    return RunSummary(
        out_dir,
        records,
        data.get("chosen") or {},
        data.get("tuning") or [],
        float(data.get("seconds") or 0.0),
        task.metrics,
        dict(task.labels),
        lower_is_better_metrics(task),
        percent_metrics(task),
    )


def results_table(path: str | Path, recipe: str | Path | None = None) -> str:
    """The run's results table (Markdown), rebuilt from its results file."""
    from kdistill.report.table import build_rows, markdown_table
    from kdistill.report.writer import show_settings_used

    path = Path(path)
    data = read_results(path)
    if "stages" in data:  # `kdistill compress`: one row per stage
        return compression_table_from(data)
    recipe = results_recipe(path, data, recipe)
    summary = summary_from_results(data, recipe, path.parent)
    metric = summary.metrics[0]
    rows = build_rows(summary.records, summary.lower_is_better, metric)
    show_settings_used(rows, recipe)
    columns = [(key, summary.labels.get(key, key)) for key in summary.metrics]
    return markdown_table(
        rows,
        columns if columns != [("accuracy", "accuracy")] else (),
        percent=summary.percent,
    )


def compression_table_from(data: dict) -> str:
    """The compression table of a `kdistill compress` results file."""
    from kdistill.compress.pipeline import Stage
    from kdistill.compress.report import compression_table

    names = {f.name for f in dataclasses.fields(Stage)}
    stages = [Stage(**{k: v for k, v in s.items() if k in names}) for s in data["stages"]]
    return compression_table(stages)


def regenerate_report(
    path: str | Path, out_dir: str | Path, recipe: str | Path | None = None
) -> list[str]:
    """Write the report files (report.md, report.html, results.json, plots) into `out_dir` from
    the results file; return the names written. Curves need the run's `metrics.jsonl`: copied
    along when it lies beside the file, else the report has no curves."""
    from kdistill.report.writer import write_run_report

    path = Path(path)
    out_dir = Path(out_dir)
    data = read_results(path)
    if "stages" in data:
        raise KdistillError(
            f"{path}: a compression results file; `kdistill report` prints its table, "
            "`kdistill compress` writes its whole report"
        )
    recipe = results_recipe(path, data, recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = path.parent / "metrics.jsonl"
    if metrics.is_file() and metrics.resolve() != (out_dir / "metrics.jsonl").resolve():
        (out_dir / "metrics.jsonl").write_bytes(metrics.read_bytes())
    summary = summary_from_results(data, recipe, out_dir)
    _, written = write_run_report(summary, recipe, f"kdistill report {path}")
    return written
