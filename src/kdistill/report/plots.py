"""Training curves (a validation metric per epoch, mean and spread over seeds) from
`metrics.jsonl` records, and the score-against-cost trade-off (mean ± std over seeds, each label
joined to its point)."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from kdistill.models.cost import format_count  # noqa: E402

_SEED = re.compile(r"/seed(\d+)$")


def _last_per_epoch(records: Sequence[dict], key: str) -> dict[str, dict[int, float]]:
    """label → epoch → value of `key` (a resumed run may log an epoch twice: the last counts);
    tuning trials are left out."""
    curves: dict[str, dict[int, float]] = {}
    for record in records:
        label = record.get("model", "")
        if key not in record or label.startswith("tune/"):
            continue
        curves.setdefault(label, {})[int(record["epoch"])] = float(record[key])
    return curves


def curve_bands(
    records: Sequence[dict],
    metric: str = "accuracy",
    seed: int | None = None,
    percent: bool = True,
) -> dict[str, tuple[list[int], list[float], list[float], int]]:
    """label → (epochs, mean, std, runs) of `val_<metric>` per epoch (in % when `percent`, as
    they are otherwise: NLL, perplexity), the runs of one model
    and method (`<student>/<method>/seed<k>`) grouped over the seeds k: mean over the seeds that
    reached that epoch, sample std (0 with one). With `seed`, only that seed's runs (and runs
    without a seed, such as the teacher)."""
    groups: dict[str, list[dict[int, float]]] = {}
    for label, points in _last_per_epoch(records, f"val_{metric}").items():
        found = _SEED.search(label)
        if seed is not None and found is not None and int(found.group(1)) != seed:
            continue
        groups.setdefault(_SEED.sub("", label), []).append(points)
    bands = {}
    for label, runs in sorted(groups.items()):
        epochs = sorted({epoch for run in runs for epoch in run})
        scale = 100 if percent else 1
        values = [[scale * run[e] for run in runs if e in run] for e in epochs]
        mean = [statistics.fmean(v) for v in values]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        bands[label] = (epochs, mean, std, len(runs))
    return bands


def plot_curves(
    records: Sequence[dict],
    path: Path,
    seed: int | None = None,
    metric: str = "accuracy",
    name: str = "accuracy",
    percent: bool = True,
) -> Path | None:
    """`val_<metric>` (shown as `name`, in % when `percent`) per epoch: one line per model and
    method, the mean over
    seeds with a band of ± one sample standard deviation where there are several
    (`curve_bands`); the teacher dashed. With `seed`, only that seed's runs. Tuning trials are
    left out."""
    bands = curve_bands(records, metric, seed, percent)
    if not bands:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, (epochs, mean, std, runs) in bands.items():
        style = "--" if label == "teacher" else "-"
        shown = label if runs == 1 else f"{label} ({runs} seeds)"
        (line,) = axis.plot(epochs, mean, style, marker="o", markersize=3, label=shown)
        if runs > 1:
            axis.fill_between(
                epochs,
                [m - d for m, d in zip(mean, std)],
                [m + d for m, d in zip(mean, std)],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(f"validation {name}" + (" (%)" if percent else ""))
    if max(runs for *_, runs in bands.values()) > 1:
        title = f"Validation {name} per epoch: mean over seeds, band ± 1 std"
    else:
        title = f"Validation {name} per epoch" + (f" (seed {seed})" if seed is not None else "")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


LABEL_GAP_POINTS = 10.0  # vertical distance between two labels' baselines
LABEL_SHIFT_POINTS = 8.0  # labels sit this far right of their point
DODGE_DECADES = 0.03  # points at the same x (one model, several methods) are spread this much


def spread_labels(heights: Sequence[float], gap: float) -> list[float]:
    """Label heights (display units, up is larger) as close as possible to `heights` with at
    least `gap` between neighbours and the same order: a higher point gets a higher label."""
    order = sorted(range(len(heights)), key=lambda i: -heights[i])
    placed: list[float] = []
    for index in order:
        wanted = heights[index]
        placed.append(wanted if not placed else min(wanted, placed[-1] - gap))
    shift = statistics.fmean(heights[i] - p for i, p in zip(order, placed))  # recentre the block
    result = [0.0] * len(heights)
    for index, height in zip(order, placed):
        result[index] = height + shift
    return result


def _dodged(xs: Sequence[float]) -> list[float]:
    """`xs` with the values that coincide (within 1 %) spread around their value on a log axis."""
    groups: dict[float, list[int]] = {}
    for index, x in enumerate(xs):
        groups.setdefault(round(math.log10(x), 2), []).append(index)
    result = list(xs)
    for members in groups.values():
        for rank, index in enumerate(members):
            offset = (rank - (len(members) - 1) / 2) * DODGE_DECADES
            result[index] = xs[index] * 10**offset
    return result


def plot_tradeoff(
    points: Sequence[dict],
    path: Path,
    latency_batch: str = "1",
    name: str = "accuracy",
    percent: bool = True,
) -> Path | None:
    """The test score (`name`) against parameters (left) and latency at `latency_batch` (right).

    `points`: dicts with `label`, `score` (0–1, the mean over seeds), optionally `std` (over
    seeds, drawn as an error bar of ± 1 std), `params` and `latency_ms` (batch size as a string →
    ms, as in `ModelCost.as_dict()`); points without a cost are left out. Log x axes. Points of
    one model (same x) are spread a little sideways so that each bar shows; each label sits to
    the right of its point, joined to it by a thin line, labels ordered as their points are.
    """
    points = [p for p in points if p.get("params") and p.get("latency_ms")]
    if not points:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    placed = []
    for axis, key, title in (
        (axes[0], "params", "parameters"),
        (axes[1], "latency", f"CPU latency at batch {latency_batch} (ms)"),
    ):
        raw = [p["params"] if key == "params" else p["latency_ms"][latency_batch] for p in points]
        xs = _dodged(raw)
        scale = 100 if percent else 1
        ys = [scale * p["score"] for p in points]
        for point, x, y in zip(points, xs, ys):
            axis.errorbar(
                [x], [y], yerr=[scale * point.get("std", 0.0)], fmt="o", markersize=4, capsize=3
            )
        axis.set_xscale("log")
        low, high = axis.get_xlim()
        axis.set_xlim(low, high * (high / low) ** 0.3)  # room for the labels on the right
        plain = FuncFormatter(lambda value, _: format_count(value) if value >= 1 else f"{value:g}")
        axis.xaxis.set_major_formatter(plain)
        axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        axis.set_xlabel(title)
        spread = " (mean ± std over seeds)" if any(p.get("std") for p in points) else ""
        axis.set_ylabel(f"test {name}" + (" %" if percent else "") + spread)
        axis.grid(alpha=0.3)
        placed.append((axis, xs, ys))
    axes[0].set_title(f"{name[:1].upper() + name[1:]} against size")
    axes[1].set_title(f"{name[:1].upper() + name[1:]} against latency")
    figure.tight_layout()  # the layout is final before labels are placed in display units
    points_to_pixels = figure.dpi / 72.0
    for axis, xs, ys in placed:
        pixels = axis.transData.transform(list(zip(xs, ys)))
        clusters: list[list[int]] = []  # labels that could collide: points close in x
        for index in sorted(range(len(xs)), key=lambda i: pixels[i][0]):
            if clusters and pixels[index][0] - pixels[clusters[-1][-1]][0] < 60 * points_to_pixels:
                clusters[-1].append(index)
            else:
                clusters.append([index])
        for cluster in clusters:
            heights = spread_labels(
                [pixels[i][1] for i in cluster], LABEL_GAP_POINTS * points_to_pixels
            )
            right = max(pixels[i][0] for i in cluster)
            for index, height in zip(cluster, heights):
                axis.annotate(
                    points[index]["label"],
                    (xs[index], ys[index]),
                    xytext=(
                        (right - pixels[index][0]) / points_to_pixels + LABEL_SHIFT_POINTS,
                        (height - pixels[index][1]) / points_to_pixels,
                    ),
                    textcoords="offset points",
                    fontsize=7,
                    va="center",
                    arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.5"},
                    annotation_clip=False,
                )
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
