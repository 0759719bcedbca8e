"""The results table: one row per model and method, mean ± std over seeds, and the gap closed.

gap closed = (distilled − student alone) / (teacher − student alone), on the mean test score
(accuracy, or the first metric of a dense task: mIoU, mAP@0.5): 1 means the distilled student
reached the teacher, 0 means distillation bought nothing, negative means it hurt.
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
    settings_shown: str | None = None  # every setting used (`format_used`); else `settings`

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


def gap_closed(distilled: float, alone: float, teacher: float) -> float | None:
    """(distilled − alone) / (teacher − alone); None when the teacher is not better than alone."""
    if teacher - alone <= 0:
        return None
    return (distilled - alone) / (teacher - alone)


def build_rows(records: Sequence) -> list[Row]:
    """Group run records (label, student, method, seed, params, test_score, settings,
    test_metrics)."""
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
    teacher = rows.get(("teacher", "teacher"))
    for row in rows.values():
        alone = rows.get((row.model, "alone"))
        if teacher is not None and alone is not None and row.method not in ("alone", "teacher"):
            row.gap_closed = gap_closed(row.mean, alone.mean, teacher.mean)
            row.gaps = {
                name: gap_closed(
                    statistics.fmean(values),
                    statistics.fmean(alone.metrics[name]),
                    statistics.fmean(teacher.metrics[name]),
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


def cost_header(costs: Sequence[dict]) -> tuple[str, str]:
    """Header cells and alignment for the cost columns (batch sizes of the first cost)."""
    first = costs[0]
    threads = first["threads"]
    batches = list(first["latency_ms"])
    cells = (
        " | MACs | size | "
        + " | ".join(f"latency b{b} (ms, {threads} thr)" for b in batches)
        + f" | peak mem (b{first['peak_batch']})"
    )
    return cells, "---:|---:|" + "---:|" * len(batches) + "---:|"


def cost_cells(cost: dict | None, batches: Sequence[str]) -> str:
    """MACs, size, latency per batch size and peak memory of one row ("—" when unmeasured)."""
    if cost is None:
        return " | —" * (3 + len(batches))
    latency = " | ".join(f"{cost['latency_ms'][b]:.2f}" for b in batches)
    return (
        f" | {format_count(cost['macs'])} | {format_bytes(cost['size_bytes'])} | {latency} "
        f"| {format_bytes(cost['peak_bytes'])}"
    )


def format_gap(gap: float | None) -> str:
    return "—" if gap is None else f"{100 * gap:+.0f} %"


def gap_header(metrics: Sequence[tuple[str, str]]) -> str:
    """ " | gap closed", or " | gap closed (mIoU / mAP@0.5)" with several metric columns."""
    if len(metrics) > 1:
        return " | gap closed (" + " / ".join(label for _, label in metrics) + ")"
    return " | gap closed"


def markdown_table(rows: Sequence[Row], metrics: Sequence[tuple[str, str]] = ()) -> str:
    """The results table; with model costs (models/cost.py) when the rows carry them.

    `metrics`: (key, label) of the test metric columns, e.g. ``[("miou", "mIoU"),
    ("map50", "mAP@0.5")]``; by default one column of the rows' scores, "accuracy"."""
    seeds = max(len(row.scores) for row in rows)
    costs = [row.cost for row in rows if row.cost is not None]
    cost_head, cost_align = cost_header(costs) if costs else ("", "")
    batches = list(costs[0]["latency_ms"]) if costs else []
    header = [
        "| model | method | params"
        + cost_head
        + "".join(
            f" | test {label} %" + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else "")
            for _, label in metrics or [("", "accuracy")]
        )
        + gap_header(metrics)
        + " | settings (chosen on validation) |",
        "|---|---|---:|" + cost_align + "---:|" * max(1, len(metrics)) + "---:|---|",
    ]
    lines = []
    for row in rows:
        if len(metrics) > 1:
            gap = " / ".join(format_gap(row.gaps.get(key)) for key, _ in metrics)
        else:
            gap = format_gap(row.gap_closed)
        cells = cost_cells(row.cost, batches) if costs else ""
        if metrics:
            values = " | ".join(format_percent(row.metrics[key]) for key, _ in metrics)
        else:
            values = format_accuracy(row)
        lines.append(
            f"| {row.model} | {row.method} | {row.params:,}{cells} | {values} "
            f"| {gap} | {row.settings_shown or format_settings(row.settings)} |"
        )
    return "\n".join(header + lines)
