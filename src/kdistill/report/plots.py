"""Training curves (a validation metric per epoch) from `metrics.jsonl` records, and the
score-against-cost trade-off."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def plot_curves(
    records: Sequence[dict], path: Path, seed: int, metric: str = "accuracy", name: str = "accuracy"
) -> Path | None:
    """One line per model trained with `seed` (and the teacher) of `val_<metric>` (shown as
    `name`) per epoch; tuning trials are left out."""
    curves: dict[str, list[tuple[int, float]]] = {}
    key = f"val_{metric}"
    for record in records:
        label = record.get("model", "")
        if key not in record or label.startswith("tune/"):
            continue
        if label != "teacher" and not label.endswith(f"/seed{seed}"):
            continue
        curves.setdefault(label, []).append((record["epoch"], record[key]))
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(curves.items()):
        points.sort()
        style = "--" if label == "teacher" else "-"
        axis.plot(
            [p[0] for p in points], [100 * p[1] for p in points], style, marker="o", label=label
        )
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"validation {name} (%)")
    axis.set_title(f"Validation {name} per epoch (seed {seed})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_tradeoff(
    points: Sequence[dict], path: Path, latency_batch: str = "1", name: str = "accuracy"
) -> Path | None:
    """The test score (`name`) against parameters (left) and latency at `latency_batch` (right).

    `points`: dicts with `label`, `score` (0–1), `params` and `latency_ms` (batch size as a
    string → ms, as in `ModelCost.as_dict()`); points without a cost are left out. Log x axes.
    """
    points = [p for p in points if p.get("params") and p.get("latency_ms")]
    if not points:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, key, title in (
        (axes[0], "params", "parameters"),
        (axes[1], "latency", f"CPU latency at batch {latency_batch} (ms)"),
    ):
        crowded: dict[tuple[float, float], int] = {}  # stack labels of coinciding points
        for point in points:
            x = point["params"] if key == "params" else point["latency_ms"][latency_batch]
            y = 100 * point["score"]
            spot = (round(math.log10(x), 1), round(y))
            above = crowded.get(spot, 0)
            crowded[spot] = above + 1
            axis.scatter([x], [y], s=30)
            axis.annotate(
                point["label"],
                (x, y),
                fontsize=7,
                xytext=(4, 3 + 9 * above),
                textcoords="offset points",
            )
        axis.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        axis.xaxis.set_major_formatter(plain)
        axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        axis.set_xlabel(title)
        axis.set_ylabel(f"test {name} (%)")
        axis.grid(alpha=0.3)
    axes[0].set_title(f"{name[:1].upper() + name[1:]} against size")
    axes[1].set_title(f"{name[:1].upper() + name[1:]} against latency")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_label_budget(
    rows: Sequence, budgets: dict[str, int], path: Path, name: str = "accuracy"
) -> Path | None:
    """Label-scarce transfer: the test score (mean ± std over seeds) of each method against the
    number of labelled training images, log x axis; the teacher (trained on every label) as a
    dashed line.

    `rows`: `report.table.Row`s; `budgets`: student name → its labelled images (`labelled:` of
    the recipe's students); students without a budget are left out.
    """
    lines: dict[str, list[tuple[int, float, float]]] = {}
    teacher = None
    for row in rows:
        if row.model == "teacher":
            teacher = row.mean
        elif row.model in budgets:
            lines.setdefault(row.method, []).append((budgets[row.model], row.mean, row.std))
    if not lines:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for method, points in sorted(lines.items(), key=lambda item: item[0] != "alone"):
        points.sort()
        axis.errorbar(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            yerr=[100 * p[2] for p in points],
            marker="o",
            capsize=3,
            label=method,
        )
    if teacher is not None:
        axis.axhline(100 * teacher, linestyle="--", color="grey", label="teacher (all labels)")
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    axis.set_xticks(sorted({p[0] for points in lines.values() for p in points}))
    axis.set_xlabel("labelled training images (the rest used without labels)")
    axis.set_ylabel(f"test {name} (%, mean ± std over seeds)")
    axis.set_title(f"Label-scarce transfer: test {name} against labelled images")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
