"""The results table: one row per model and method, mean ± std over seeds, and the gap closed.

gap closed = (distilled − student alone) / (teacher − student alone), on mean test accuracy:
1 means the distilled student reached the teacher, 0 means distillation bought nothing,
negative means it hurt.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kdistill.report.cost import format_bytes, format_count


@dataclass
class Row:
    model: str
    method: str
    params: int
    accuracies: list[float]
    settings: dict
    gap_closed: float | None = None
    cost: dict | None = None  # ModelCost.as_dict() (report/cost.py), None when not measured

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def gap_closed(distilled: float, alone: float, teacher: float) -> float | None:
    """(distilled − alone) / (teacher − alone); None when the teacher is not better than alone."""
    if teacher - alone <= 0:
        return None
    return (distilled - alone) / (teacher - alone)


def build_rows(records: Sequence) -> list[Row]:
    """Group run records (label, student, method, seed, params, test_accuracy, settings)."""
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
        rows[key].accuracies.append(record.test_accuracy)
    teacher = rows.get(("teacher", "teacher"))
    for row in rows.values():
        alone = rows.get((row.model, "alone"))
        if teacher is not None and alone is not None and row.method not in ("alone", "teacher"):
            row.gap_closed = gap_closed(row.mean, alone.mean, teacher.mean)
    return list(rows.values())


def format_accuracy(row: Row) -> str:
    if len(row.accuracies) == 1:
        return f"{100 * row.mean:.2f}"
    return f"{100 * row.mean:.2f} ± {100 * row.std:.2f}"


def format_settings(settings: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(settings.items())) or "—"


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


def markdown_table(rows: Sequence[Row]) -> str:
    """The results table; with model costs (report/cost.py) when the rows carry them."""
    seeds = max(len(row.accuracies) for row in rows)
    costs = [row.cost for row in rows if row.cost is not None]
    cost_head, cost_align = cost_header(costs) if costs else ("", "")
    batches = list(costs[0]["latency_ms"]) if costs else []
    header = [
        "| model | method | params"
        + cost_head
        + " | test accuracy % "
        + (f"(mean ± std, {seeds} seeds)" if seeds > 1 else "")
        + " | gap closed | settings (chosen on validation) |",
        "|---|---|---:|" + cost_align + "---:|---:|---|",
    ]
    lines = []
    for row in rows:
        gap = "—" if row.gap_closed is None else f"{100 * row.gap_closed:+.0f} %"
        cells = cost_cells(row.cost, batches) if costs else ""
        lines.append(
            f"| {row.model} | {row.method} | {row.params:,}{cells} | {format_accuracy(row)} "
            f"| {gap} | {format_settings(row.settings)} |"
        )
    return "\n".join(header + lines)
