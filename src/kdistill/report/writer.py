"""Writes a run folder's `results.json`, `report.md`, `report.html`, `curves.png` and
`tradeoff.png` (the test score against parameters and latency, when model costs were
measured). The metric columns are the task's (`RunSummary.metrics`, labelled by
`RunSummary.labels`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kdistill.io import MetricsLog, atomic_write_text
from kdistill.models.cost import COST_NOTE
from kdistill.report.html import write_html
from kdistill.report.plots import plot_curves, plot_label_budget, plot_tradeoff
from kdistill.report.table import build_rows, format_settings, markdown_table


def write_report(summary, recipe, command: str) -> str:
    """Write the files and return the Markdown table (what the CLI prints)."""
    out_dir = Path(summary.out_dir)
    rows = build_rows(summary.records)
    metric = summary.metrics[0]
    name = summary.labels.get(metric, metric)
    columns = [(key, summary.labels.get(key, key)) for key in summary.metrics]
    # a single accuracy column keeps the classic layout (mean ± std of the scores)
    table = markdown_table(rows, columns if columns != [("accuracy", "accuracy")] else ())
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
        recipe.seed,
        metric=metric,
        name=name,
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
        f"Gap closed = (distilled − student alone) / (teacher − student alone), on mean {name}.",
    ]
    if summary.tuning:
        lines += [
            "",
            "## Settings chosen on the validation split",
            "",
            f"Each grid point trained with seed {recipe.tune.seed} and evaluated on the "
            f"{recipe.data.val_size} validation samples held out of the training set; "
            "the test set was not used for the choice.",
            "",
            f"| student | method | settings | validation {name} % |",
            "|---|---|---|---:|",
        ]
        for trial in summary.tuning:
            lines.append(
                f"| {trial['student']} | {trial['method']} | {format_settings(trial['settings'])} "
                f"| {100 * trial['val_score']:.2f} |"
            )
    if curves is not None:
        lines += ["", f"![validation {name} per epoch](curves.png)"]
    tradeoff = plot_tradeoff(
        [
            {"label": f"{row.model}/{row.method}", "score": row.mean, **(row.cost or {})}
            for row in rows
        ],
        out_dir / "tradeoff.png",
        name=name,
    )
    budgets = {s.name: s.labelled for s in recipe.students if getattr(s, "labelled", None)}
    if budgets and plot_label_budget(rows, budgets, out_dir / "labels.png", name) is not None:
        lines += ["", f"![test {name} against labelled images](labels.png)"]
    if tradeoff is not None:
        lines += ["", COST_NOTE, "", f"![{name} against parameters and latency](tradeoff.png)"]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    write_html("\n".join(lines) + "\n", out_dir, recipe.name)
    return table
