"""Writes a run folder's `results.json`, `report.md`, `report.html`, `curves.png` and
`tradeoff.png` (the test score against parameters and latency, when model costs were
measured). The metric columns are the task's (`RunSummary.metrics`, labelled by
`RunSummary.labels`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kdistill.io import MetricsLog, atomic_write_text
from kdistill.models.cost import COST_NOTE, latency_note
from kdistill.report.html import write_html
from kdistill.report.plots import plot_curves, plot_label_budget, plot_tradeoff
from kdistill.report.style import ReportStyle
from kdistill.report.table import (
    DEFAULT_MARK,
    DEFAULT_NOTE,
    build_rows,
    format_settings,
    format_used,
    format_value,
    markdown_table,
)

# what the runner writes beside the report, in the order the closing line names them
RUN_FILES = ("metrics.jsonl", "tuning.json", "recipe.yaml", "plan.json", "data.json")
RUN_FOLDERS = ("models", "checkpoints", "teacher_cache", "tensorboard", "mlflow")


def write_report(summary, recipe, command: str) -> str:
    """Write the files and return the Markdown table (what the CLI prints)."""
    return write_run_report(summary, recipe, command)[0]


def show_settings_used(rows, recipe) -> None:
    """Fill each distilled row's `settings_shown`: every setting it trained with, the ones not
    chosen on validation marked (default) (`recipes.objective.settings_used`)."""
    from kdistill.recipes.objective import settings_used
    from kdistill.recipes.plan import recipe_task

    task = recipe_task(recipe)
    for row in rows:
        if row.method in recipe.distill.methods:
            used = settings_used(task, recipe.distill, row.method, row.settings)
            row.settings_shown = format_used(used)


def run_files(out_dir: Path, written: list[str]) -> list[str]:
    """What the run folder holds from this run: the report files `written`, the runner's files
    and its folders (`models/ (5 files)`), in a fixed order."""
    out_dir = Path(out_dir)
    names = list(written) + [name for name in RUN_FILES if (out_dir / name).is_file()]
    for folder in RUN_FOLDERS:
        if (out_dir / folder).is_dir():
            count = sum(1 for path in (out_dir / folder).rglob("*") if path.is_file())
            names.append(f"{folder}/ ({count} files)")
    return names


def write_run_report(summary, recipe, command: str) -> tuple[str, list[str]]:
    """Write the files; return the Markdown table (what the CLI prints) and the names of the
    files written, in the order the closing line lists them."""
    out_dir = Path(summary.out_dir)
    metric = summary.metrics[0]
    lower = tuple(getattr(summary, "lower_is_better", ()))
    percent = getattr(summary, "percent", None)
    percent = tuple(summary.metrics) if percent is None else tuple(percent)
    rows = build_rows(summary.records, lower, metric)
    show_settings_used(rows, recipe)
    style = ReportStyle.of((row.model, row.method) for row in rows)  # every figure's colours
    name = summary.labels.get(metric, metric)
    columns = [(key, summary.labels.get(key, key)) for key in summary.metrics]
    # a single accuracy column keeps the classic layout (mean ± std of the scores)
    table = markdown_table(
        rows, columns if columns != [("accuracy", "accuracy")] else (), percent=percent
    )
    checks = sorted({row.teacher_check for row in rows if row.teacher_check is not None})
    results = {
        "recipe": recipe.name,
        "seconds": round(summary.seconds, 1),
        "records": [dataclasses.asdict(record) for record in summary.records],
        "rows": [{**dataclasses.asdict(row), "mean": row.mean, "std": row.std} for row in rows],
        "chosen": summary.chosen,
        "tuning": summary.tuning,
    }
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    curves = plot_curves(
        MetricsLog(out_dir / "metrics.jsonl").read(),
        out_dir / "curves.png",
        metric=metric,
        name=name,
        percent=metric in percent,
        style=style,
    )

    lines = [
        f"# {recipe.name}",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {summary.seconds / 60:.1f} min. Task: {recipe.task}. "
        f"Dataset: {recipe.data.dataset}; "
        f"teacher {recipe.teacher.model}; students trained {recipe.train.epochs} epochs "
        f"({recipe.train.optimizer}, lr {recipe.train.lr:g}, {recipe.train.schedule}); "
        f"{recipe.seeds} seed(s).",
        "",
        table,
        "",
        f"Gap closed = (distilled − student alone) / (teacher − student alone), on mean {name}"
        + (" (lower is better)." if metric in lower else "."),
    ]
    for check in checks:
        lines += ["", f"**No gap closed reported:** {check}."]
    if any(DEFAULT_MARK in (row.settings_shown or "") for row in rows):
        lines += ["", DEFAULT_NOTE]
    if summary.tuning:
        lines += [
            "",
            "## Settings chosen on the validation split",
            "",
            f"Each grid point trained with seed {recipe.tune.seed} and evaluated on the "
            "validation split (its size and how it was held out: `data.json`); the test set "
            "was not used for the choice.",
            "",
            f"| student | method | settings | validation {name}"
            + (" %" if metric in percent else "")
            + " |",
            "|---|---|---|---:|",
        ]
        for trial in summary.tuning:
            lines.append(
                f"| {trial['student']} | {trial['method']} | {format_settings(trial['settings'])} "
                f"| {format_value([trial['val_score']], metric in percent)} |"
            )
    legend = style.text()
    if curves is not None:
        lines += ["", legend]  # before the first figure; report.html draws it in colour
        lines += ["", f"![validation {name} per epoch, mean and spread over seeds](curves.png)"]
    sections = list(getattr(summary, "sections", []))
    if sections:
        lines += ["", *sections]
    tradeoff = plot_tradeoff(
        [
            {
                "label": "teacher" if row.method == "teacher" else f"{row.model}/{row.method}",
                "score": row.mean,
                "std": row.std,
                **(row.cost or {}),
            }
            for row in rows
        ],
        out_dir / "tradeoff.png",
        name=name,
        percent=metric in percent,
        style=style,
    )
    budgets = {s.name: s.labelled for s in recipe.students if getattr(s, "labelled", None)}
    labels_plot = (
        plot_label_budget(rows, budgets, out_dir / "labels.png", name, style=style)
        if budgets
        else None
    )
    if curves is None and (labels_plot is not None or tradeoff is not None):
        lines += ["", legend]
    if labels_plot is not None:
        lines += ["", f"![test {name} against labelled images](labels.png)"]
    costs = [row.cost for row in rows if row.cost is not None]
    timing = latency_note(costs)
    if costs:
        lines += ["", COST_NOTE] + (["", timing] if timing else [])
    if tradeoff is not None:
        lines += ["", f"![{name} against parameters and latency](tradeoff.png)"]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    write_html("\n".join(lines) + "\n", out_dir, recipe.name, raw={legend: style.html()})
    written = ["report.md", "report.html", "results.json"]
    written += [path.name for path in (curves, tradeoff, labels_plot) if path is not None]
    return table, written
