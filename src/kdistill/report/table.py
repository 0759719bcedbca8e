"""The results table: one row per model and method, mean ± std over seeds, and the gap closed.

gap closed = (distilled − student alone) / (teacher − student alone), on the mean test score
(accuracy, or the first metric of the task: mIoU, mAP@0.5, NLL): 1 means the distilled student
reached the teacher, 0 means distillation bought nothing, negative means it hurt. The formula
holds for metrics where lower is better (NLL, perplexity) as written.

The gap is only defined when the teacher is better than the student alone. Before any gap is
reported the teacher's **validation** score is compared with the student alone's (mean over seeds,
on the ranking metric): when the teacher does not beat it, every gap of that student is left out
and `Row.teacher_check` says so plainly with both figures — a percentage computed from a teacher
no better than the student would be meaningless, whatever its sign.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from kdistill.models.cost import format_bytes, format_count


@dataclass
class Row:
    model: str
    method: str
    params: int
    scores: list[float]  # the test score of each seed
    settings: dict
    gap_closed: float | None = None
    cost: dict | None = None  # ModelCost.as_dict() (models/cost.py), None when not measured
    metrics: dict[str, list[float]] = field(default_factory=dict)  # every test metric, per seed
    gaps: dict[str, float | None] = field(default_factory=dict)  # gap closed on each metric
    val_scores: list[float] = field(default_factory=list)  # validation score of each seed
    # why no gap is reported for this row's student (teacher not better on validation), or None
    teacher_check: str | None = None
    settings_shown: str | None = None  # every setting used (`format_used`); else `settings`

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


def beats(a: float, b: float, lower_is_better: bool = False) -> bool:
    """Whether score `a` is strictly better than `b`."""
    return a < b if lower_is_better else a > b


def gap_closed(
    distilled: float, alone: float, teacher: float, lower_is_better: bool = False
) -> float | None:
    """(distilled − alone) / (teacher − alone); None when the teacher is not better than alone
    (for a metric where lower is better, such as NLL, better means lower)."""
    if not beats(teacher, alone, lower_is_better):
        return None
    return (distilled - alone) / (teacher - alone)


def teacher_check(
    teacher_val: float | None,
    alone_val: Sequence[float],
    metric: str,
    lower_is_better: bool = False,
) -> str | None:
    """None when the teacher beats the student alone on validation (or when either figure is
    missing), else the sentence the report prints instead of a gap."""
    if teacher_val is None or not alone_val:
        return None
    alone = statistics.fmean(alone_val)
    if beats(teacher_val, alone, lower_is_better):
        return None
    return (
        f"the teacher does not beat the student alone on validation ({metric}: teacher "
        f"{teacher_val:.4g}, student alone {alone:.4g} mean over {len(alone_val)} seed(s)), so no "
        "gap closed is reported: improve the teacher (learning rate, warm-up, data, size) or pick "
        "a smaller student"
    )


def build_rows(
    records: Sequence, lower_is_better: Sequence[str] = (), metric: str | None = None
) -> list[Row]:
    """Group run records (label, student, method, seed, params, test_score, settings,
    test_metrics, val_metrics) into rows, with the gap closed of each distilled row.

    `metric`: the ranking metric (`test_score`'s); `lower_is_better`: the metrics where a lower
    value is better. The gaps of a student are only computed when the teacher beats that
    student alone on validation (`teacher_check`); records without validation figures skip the
    check (the gap then still needs the teacher better on test)."""
    lower = set(lower_is_better)
    rows: dict[tuple[str, str], Row] = {}
    for record in records:
        model = record.student or "teacher"
        key = (model, record.method)
        if key not in rows:
            rows[key] = Row(
                model,
                record.method,
                record.params,
                [],
                dict(record.settings),
                cost=getattr(record, "cost", None),
            )
        rows[key].scores.append(record.test_score)
        for name, value in getattr(record, "test_metrics", {}).items():
            rows[key].metrics.setdefault(name, []).append(value)
        val = getattr(record, "val_metrics", {}) or {}
        if metric is not None and metric in val:
            rows[key].val_scores.append(val[metric])
    teacher = rows.get(("teacher", "teacher"))
    for row in rows.values():
        alone = rows.get((row.model, "alone"))
        if teacher is None or alone is None or row.method == "teacher":
            continue
        row.teacher_check = teacher_check(
            teacher.val_scores[0] if teacher.val_scores else None,
            alone.val_scores,
            metric or "score",
            metric in lower,
        )
        if row.method == "alone" or row.teacher_check is not None:
            continue
        row.gap_closed = gap_closed(row.mean, alone.mean, teacher.mean, metric in lower)
        row.gaps = {
            name: gap_closed(
                statistics.fmean(values),
                statistics.fmean(alone.metrics[name]),
                statistics.fmean(teacher.metrics[name]),
                name in lower,
            )
            for name, values in row.metrics.items()
            if name in alone.metrics and name in teacher.metrics
        }
    return list(rows.values())


def format_percent(values: Sequence[float]) -> str:
    """ "89.12" for one seed, "89.12 ± 0.25" (mean ± sample std) for several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def format_value(values: Sequence[float], percent: bool = True) -> str:
    """`format_percent` for fractions (accuracy, mIoU); for other metrics (NLL in nats,
    perplexity, bits per byte) the value itself, "4.071 ± 0.012"."""
    if percent:
        return format_percent(values)
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def format_accuracy(row: Row) -> str:
    return format_percent(row.scores)


def format_settings(settings: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(settings.items())) or "—"


DEFAULT_MARK = " (default)"
DEFAULT_NOTE = (
    "Settings marked (default) were not chosen on validation: they are the recipe's values, or "
    "the loss's defaults where the recipe gives none."
)


def format_used(used: Sequence) -> str:
    """ "alpha=0.5, temperature=1" (chosen on validation), "alpha=0.9 (default)" (not tuned);
    `used`: `recipes.objective.Setting`s (name, value, chosen)."""
    return (
        ", ".join(f"{s.name}={s.value:g}" + ("" if s.chosen else DEFAULT_MARK) for s in used) or "—"
    )


def cost_batches(costs: Sequence[dict]) -> list[str]:
    """The latency batch sizes of the costs (those measured, in their order)."""
    batches: list[str] = []
    for cost in costs:
        batches += [b for b in cost["latency_ms"] if b not in batches]
    return batches


def cost_header(costs: Sequence[dict]) -> tuple[str, str]:
    """Header cells and alignment for the cost columns: MACs, size, the latency of each batch
    size (median [interquartile range] over the stated repeats) and peak memory."""
    first = costs[0]
    threads = first["threads"]
    batches = cost_batches(costs)
    repeats = sorted({cost.get("repeats", 0) for cost in costs if cost["latency_ms"]})
    spread = f", median [IQR] of {'/'.join(map(str, repeats))}" if repeats else ""
    cells = (
        " | MACs | size | "
        + " | ".join(f"latency b{b} (ms{spread}, {threads} thr)" for b in batches)
        + (" | " if batches else "")
        + f"peak mem (b{first['peak_batch']})"
    )
    return cells, "---:|---:|" + "---:|" * len(batches) + "---:|"


def format_ms(value: float) -> str:
    """Milliseconds to 3 significant digits: "0.127", "3.64", "41.2", "1234"."""
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def format_latency(cost: dict, batch: str) -> str:
    """ "0.127 [0.121–0.135]": the median and interquartile range; "—" when unmeasured."""
    if batch not in cost["latency_ms"]:
        return "—"
    median = format_ms(cost["latency_ms"][batch])
    iqr = cost.get("latency_iqr_ms", {}).get(batch)
    if iqr is None:
        return median
    return f"{median} [{format_ms(iqr[0])}–{format_ms(iqr[1])}]"


def cost_cells(cost: dict | None, batches: Sequence[str]) -> str:
    """MACs, size, latency per batch size and peak memory of one row ("—" when unmeasured)."""
    if cost is None:
        return " | —" * (3 + len(batches))
    latency = "".join(f" | {format_latency(cost, b)}" for b in batches)
    return (
        f" | {format_count(cost['macs'])} | {format_bytes(cost['size_bytes'])}{latency} "
        f"| {format_bytes(cost['peak_bytes'])}"
    )


NO_GAP = "n/a: teacher not better"


def format_gap(gap: float | None) -> str:
    if gap is None:
        return "—"
    return f"{round(100 * gap) or 0:+d} %"  # never "-0 %"


def gap_header(metrics: Sequence[tuple[str, str]]) -> str:
    """ " | gap closed", or " | gap closed (mIoU / mAP@0.5)" with several metric columns."""
    if len(metrics) > 1:
        return " | gap closed (" + " / ".join(label for _, label in metrics) + ")"
    return " | gap closed"


def markdown_table(
    rows: Sequence[Row],
    metrics: Sequence[tuple[str, str]] = (),
    percent: Sequence[str] | None = None,
) -> str:
    """The results table; with model costs (models/cost.py) when the rows carry them.

    `metrics`: (key, label) of the test metric columns, e.g. ``[("miou", "mIoU"),
    ("map50", "mAP@0.5")]``; by default one column of the rows' scores, "accuracy".
    `percent`: the metrics that are fractions shown in % (default: all); the others (NLL,
    perplexity, bits per byte) are shown as they are."""
    shown_in_percent = {key for key, _ in metrics} if percent is None else set(percent)
    seeds = max(len(row.scores) for row in rows)
    costs = [row.cost for row in rows if row.cost is not None]
    cost_head, cost_align = cost_header(costs) if costs else ("", "")
    batches = cost_batches(costs)
    header = [
        "| model | method | params"
        + cost_head
        + "".join(
            f" | test {label}"
            + (" %" if not metrics or key in shown_in_percent else "")
            + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else "")
            for key, label in metrics or [("", "accuracy")]
        )
        + gap_header(metrics)
        + " | settings (chosen on validation) |",
        "|---|---|---:|" + cost_align + "---:|" * max(1, len(metrics)) + "---:|---|",
    ]
    lines = []
    for row in rows:
        if row.teacher_check is not None and row.method != "alone":
            gap = NO_GAP
        elif len(metrics) > 1:
            gap = " / ".join(format_gap(row.gaps.get(key)) for key, _ in metrics)
        else:
            gap = format_gap(row.gap_closed)
        cells = cost_cells(row.cost, batches) if costs else ""
        if metrics:
            values = " | ".join(
                format_value(row.metrics[key], key in shown_in_percent) for key, _ in metrics
            )
        else:
            values = format_accuracy(row)
        lines.append(
            f"| {row.model} | {row.method} | {row.params:,}{cells} | {values} "
            f"| {gap} | {row.settings_shown or format_settings(row.settings)} |"
        )
    return "\n".join(header + lines)
