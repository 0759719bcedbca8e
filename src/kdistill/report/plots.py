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
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from kdistill.models.cost import format_count  # noqa: E402
from kdistill.report.style import ReportStyle  # noqa: E402

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
    style: ReportStyle | None = None,
) -> Path | None:
    """`val_<metric>` (shown as `name`, in % when `percent`) per epoch: one line per model and
    method (colour = method, marker = model, from `style`; by default one built from the
    labels), the mean over
    seeds with a band of ± one sample standard deviation where there are several
    (`curve_bands`); the teacher dashed. With `seed`, only that seed's runs. Tuning trials are
    left out."""
    bands = curve_bands(records, metric, seed, percent)
    if not bands:
        return None
    style = style or ReportStyle.of_labels(bands)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, (epochs, mean, std, runs) in bands.items():
        dashes = "--" if label == "teacher" else "-"
        shown = label if runs == 1 else f"{label} ({runs} seeds)"
        colour, marker = style.of_label(label)
        (line,) = axis.plot(
            epochs, mean, dashes, color=colour, marker=marker, markersize=4, label=shown
        )
        line.set_gid(f"style:{label}")
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


LABEL_GAP_POINTS = 2.0  # free space between two labels stacked one above the other
LABEL_SHIFT_POINTS = 8.0  # labels sit this far right of the rightmost point of their group
LABEL_FONT_SIZE = 7
MARKER_PAD_POINTS = 4.0  # half the width of a marker or an error bar's cap
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


def _boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, ...]) -> bool:
    """Whether two (x0, y0, x1, y1) boxes share more than an edge."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_layout(
    pixels: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    shift: float,
    gap: float,
    bottom: float,
    top: float,
    extents: Sequence[tuple[float, float, float, float]] | None = None,
) -> list[tuple[float, float]] | None:
    """Where each label goes (left edge, vertical centre; display units), or None when the
    labels cannot all be stacked between `bottom` and `top` (then a legend is used).

    `extents`: each point's box (x0, y0, x1, y1) with its marker and error bars (default: the
    point itself). Each label of `sizes` (width, height) starts in a group of its own, just
    right of its point's box. A group's labels are aligned right of its points' boxes and
    stacked in the order of their points' heights, `gap` apart (`spread_labels`), kept between
    `bottom` and `top`. Two groups are merged and laid out again when a label of one intersects
    a label or a point's box of the other, until nothing intersects (at worst one group: a
    stack right of every point never intersects itself nor a point)."""
    if extents is None:
        extents = [(x, y, x, y) for x, y in pixels]
    groups = [[index] for index in range(len(pixels))]
    while True:
        placed: dict[int, tuple[float, float]] = {}
        boxes: list[tuple[int, tuple[float, float, float, float]]] = []
        for number, group in enumerate(groups):
            step = max(sizes[i][1] for i in group) + gap
            if step * len(group) > top - bottom:
                return None
            heights = spread_labels([pixels[i][1] for i in group], step)
            low = min(heights) - step / 2
            high = max(heights) + step / 2
            lift = max(0.0, bottom - low) - max(0.0, high - top)  # keep the stack inside
            left = max(extents[i][2] for i in group) + shift
            for index, height in zip(group, heights):
                width, tall = sizes[index]
                centre = height + lift
                placed[index] = (left, centre)
                boxes.append((number, (left, centre - tall / 2, left + width, centre + tall / 2)))
        owner = {index: number for number, group in enumerate(groups) for index in group}
        clash = next(
            (
                (a, b)
                for i, (a, box_a) in enumerate(boxes)
                for b, box_b in boxes[i + 1 :]
                if a != b and _boxes_overlap(box_a, box_b)
            ),
            None,
        ) or next(
            (
                (a, owner[index])
                for a, box in boxes
                for index, extent in enumerate(extents)
                if owner[index] != a and _boxes_overlap(box, extent)
            ),
            None,
        )
        if clash is None:
            return [placed[index] for index in range(len(pixels))]
        first, second = sorted(clash)
        groups[first] = groups[first] + groups[second]
        del groups[second]


def _label_sizes(figure, axis, labels: Sequence[str]) -> list[tuple[float, float]]:
    """(width, height) in display units of each label as `plot_tradeoff` draws it."""
    renderer = figure.canvas.get_renderer()
    sizes = []
    for label in labels:
        text = axis.text(0, 0, label, fontsize=LABEL_FONT_SIZE)
        box = text.get_window_extent(renderer)
        sizes.append((box.width, box.height))
        text.remove()
    return sizes


def _room_for_labels(axis, xs: Sequence[float], need: float) -> bool:
    """Widen the log x axis so that `need` display units fit right of the rightmost point;
    False when the axis is too narrow for it."""
    box = axis.get_window_extent()
    if need >= box.width:
        return False
    low, high = axis.get_xlim()
    span = math.log10(high / low)
    rightmost = (math.log10(max(xs) / low)) / span  # fraction of the width
    wanted = rightmost * box.width / (box.width - need)  # rightmost's fraction must shrink
    if wanted > 1:
        axis.set_xlim(low, low * 10 ** (span * wanted))
    return True


def _label_points(figure, axis, points, xs, ys, boxes, styles) -> None:
    """Each point's label right of it, joined to it by a thin line, without two labels
    intersecting nor a label covering a point (`label_layout`); a legend instead when they
    cannot all be stacked. `boxes`: each point's (x0, y0, x1, y1) with its error bars, data
    units."""
    labels = [p["label"] for p in points]
    to_pixels = figure.dpi / 72.0
    sizes = _label_sizes(figure, axis, labels)
    shift = LABEL_SHIFT_POINTS * to_pixels
    layout = None
    need = shift + MARKER_PAD_POINTS * to_pixels + max(w for w, _ in sizes) + 2
    if _room_for_labels(axis, [b[2] for b in boxes], need):
        pixels = [tuple(p) for p in axis.transData.transform(list(zip(xs, ys)))]
        pad = MARKER_PAD_POINTS * to_pixels  # the marker's and the caps' half-width
        extents = []
        for x0, y0, x1, y1 in boxes:
            (a, b), (c, d) = axis.transData.transform([(x0, y0), (x1, y1)])
            extents.append((a - pad, b - pad, c + pad, d + pad))
        box = axis.get_window_extent()
        layout = label_layout(
            pixels, sizes, shift, LABEL_GAP_POINTS * to_pixels, box.y0, box.y1, extents
        )
    if layout is None:  # too many points close together: a legend names them
        handles = [
            Line2D([], [], color=colour, marker=marker, linestyle="", label=label)
            for label, (colour, marker) in zip(labels, styles)
        ]
        axis.legend(handles=handles, fontsize=LABEL_FONT_SIZE, loc="best")
        return
    for label, x, y, pixel, (left, centre) in zip(labels, xs, ys, pixels, layout):
        axis.annotate(
            label,
            (x, y),
            xytext=((left - pixel[0]) / to_pixels, (centre - pixel[1]) / to_pixels),
            textcoords="offset points",
            fontsize=LABEL_FONT_SIZE,
            va="center",
            ha="left",
            arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.5"},
            annotation_clip=False,
        )


def plot_tradeoff(
    points: Sequence[dict],
    path: Path,
    latency_batch: str = "1",
    name: str = "accuracy",
    percent: bool = True,
    style: ReportStyle | None = None,
) -> Path | None:
    """The test score (`name`) against parameters (left) and latency at `latency_batch` (right).

    `points`: dicts with `label`, `score` (0–1, the mean over seeds), optionally `std` (over
    seeds, drawn as an error bar of ± 1 std), `params`, `latency_ms` (batch size as a string →
    ms, as in `ModelCost.as_dict()`) and `latency_iqr_ms` (its interquartile range, drawn as a
    horizontal bar); points without a cost are left out. Log x axes. Colour = method, marker =
    model (`style`; by default one built from the labels). Points of one model (same x) are
    spread a little sideways so that each bar shows; each label sits to the right of its
    point, joined to it by a thin line, labels ordered as their points are and never on top of
    one another (`label_layout`; a legend when they cannot be stacked).
    """
    points = [p for p in points if p.get("params") and p.get("latency_ms")]
    if not points:
        return None
    style = style or ReportStyle.of_labels(p["label"] for p in points)
    styles = [style.of_label(p["label"]) for p in points]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    placed = []
    for axis, key, title in (
        (axes[0], "params", "parameters"),
        (axes[1], "latency", f"CPU latency at batch {latency_batch} (ms, median [IQR])"),
    ):
        raw = [p["params"] if key == "params" else p["latency_ms"][latency_batch] for p in points]
        xs = _dodged(raw)
        scale = 100 if percent else 1
        ys = [scale * p["score"] for p in points]
        boxes = []
        for point, x, y, value, (colour, marker) in zip(points, xs, ys, raw, styles):
            xerr = None
            iqr = point.get("latency_iqr_ms", {}).get(latency_batch) if key == "latency" else None
            if iqr is not None:  # the bar spans the quartiles around the (dodged) median
                xerr = [[x * (1 - iqr[0] / value)], [x * (iqr[1] / value - 1)]]
            spread = scale * point.get("std", 0.0)
            boxes.append(
                (
                    x - (xerr[0][0] if xerr else 0.0),
                    y - spread,
                    x + (xerr[1][0] if xerr else 0.0),
                    y + spread,
                )
            )
            bars = axis.errorbar(
                [x],
                [y],
                yerr=[scale * point.get("std", 0.0)],
                xerr=xerr,
                fmt=marker,
                color=colour,
                markersize=6 if marker == "*" else 4.5,
                capsize=3,
            )
            bars.lines[0].set_gid(f"style:{point['label']}")
        axis.set_xscale("log")
        low, high = axis.get_xlim()
        axis.set_xlim(low, high * (high / low) ** 0.05)
        plain = FuncFormatter(lambda value, _: format_count(value) if value >= 1 else f"{value:g}")
        axis.xaxis.set_major_formatter(plain)
        axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        axis.set_xlabel(title)
        spread = " (mean ± std over seeds)" if any(p.get("std") for p in points) else ""
        axis.set_ylabel(f"test {name}" + (" %" if percent else "") + spread)
        axis.grid(alpha=0.3)
        placed.append((axis, xs, ys, boxes))
    axes[0].set_title(f"{name[:1].upper() + name[1:]} against size")
    axes[1].set_title(f"{name[:1].upper() + name[1:]} against latency")
    figure.tight_layout()  # the layout is final before labels are placed in display units
    for axis, xs, ys, boxes in placed:
        _label_points(figure, axis, points, xs, ys, boxes, styles)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_label_budget(
    rows: Sequence,
    budgets: dict[str, int],
    path: Path,
    name: str = "accuracy",
    style: ReportStyle | None = None,
) -> Path | None:
    """Label-scarce transfer: the test score (mean ± std over seeds) of each method against the
    number of labelled training images, log x axis; the teacher (trained on every label) as a
    dashed line.

    `rows`: `report.table.Row`s; `budgets`: student name → its labelled images (`labelled:` of
    the recipe's students); students without a budget are left out. A line per method in the
    method's colour; each point in its model's marker (`style`).
    """
    style = style or ReportStyle.of((row.model, row.method) for row in rows)
    lines: dict[str, list[tuple[int, float, float, str]]] = {}
    teacher = None
    for row in rows:
        if row.model == "teacher":
            teacher = row.mean
        elif row.model in budgets:
            lines.setdefault(row.method, []).append(
                (budgets[row.model], row.mean, row.std, row.model)
            )
    if not lines:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for method, points in sorted(lines.items(), key=lambda item: item[0] != "alone"):
        points.sort()
        colour = style.colour(method)
        axis.errorbar(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            yerr=[100 * p[2] for p in points],
            color=colour,
            capsize=3,
            label=method,
        )
        for budget, mean, _, model in points:
            (dot,) = axis.plot(
                [budget], [100 * mean], linestyle="", marker=style.marker(model), color=colour
            )
            dot.set_gid(f"style:{model}/{method}")
    if teacher is not None:
        axis.axhline(
            100 * teacher,
            linestyle="--",
            color=style.colour("teacher"),
            label="teacher (all labels)",
        )
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
