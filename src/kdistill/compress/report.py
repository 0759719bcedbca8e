"""The compression table, `report.md`, `report.html`, `curves.png` and `tradeoff.png`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kdistill.compress.pipeline import CompressSummary, Stage
from kdistill.io import MetricsLog, atomic_write_text
from kdistill.models.cost import COST_NOTE, format_bytes, format_count
from kdistill.report.html import write_html
from kdistill.report.plots import plot_curves, plot_tradeoff
from kdistill.report.table import format_latency


def compression_table(
    stages: Sequence[Stage], metric_label: str = "accuracy", percent: bool = True
) -> str:
    """One row per stage: the task's metric (`metric_label`; in % when `percent`), its change
    from the teacher, and the model's cost."""
    costs = [s.cost for s in stages if s.cost is not None]
    batches = list(costs[0]["latency_ms"]) if costs else []
    threads = costs[0]["threads"] if costs else 1
    peak_batch = costs[0]["peak_batch"] if costs else 0
    teacher = next((s for s in stages if s.name == "teacher"), None)
    scale = 100 if percent else 1
    head = (
        f"| model | test {metric_label}{' %' if percent else ''} | Δ vs teacher"
        f"{' (pts)' if percent else ''} | params | nonzero"
    )
    align = "|---|---:|---:|---:|---:|"
    if costs:
        head += (
            " | MACs | size | "
            + " | ".join(f"latency b{b} (ms, median [IQR], {threads} thr)" for b in batches)
            + f" | peak mem (b{peak_batch})"
        )
        align += "---:|---:|" + "---:|" * len(batches) + "---:|"
    lines = [head + " | what |", align + "---|"]
    for stage in stages:
        delta = "—"
        if teacher is not None and stage is not teacher:
            delta = f"{scale * (stage.test_score - teacher.test_score):+.2f}"
        cells = (
            f"| {stage.name} | {scale * stage.test_score:.2f} | {delta} | {stage.params:,} "
            f"| {stage.nonzero:,}"
        )
        if costs:
            cost = stage.cost
            if cost is None:
                cells += " | —" * (3 + len(batches))
            else:
                latency = " | ".join(format_latency(cost, b) for b in batches)
                cells += (
                    f" | {format_count(cost['macs'])} | {format_bytes(cost['size_bytes'])} "
                    f"| {latency} | {format_bytes(cost['peak_bytes'])}"
                )
        lines.append(cells + f" | {stage.description} |")
    return "\n".join(lines)


def write_compress_report(summary: CompressSummary, recipe, command: str) -> str:
    """Write the report files into the run folder; returns the table (what the CLI prints)."""
    out_dir = Path(summary.out_dir)
    table = compression_table(summary.stages, summary.metric_label, summary.percent)
    lines = [
        f"# {recipe.name}: prune → distill → int8",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {summary.seconds / 60:.1f} min. Dataset: {recipe.data.dataset}; "
        f"teacher {recipe.teacher.model}; one seed ({recipe.seed}).",
        "",
        table,
        "",
        "int8 models: params and MACs are those of the float model they were made from "
        "(int8 kernels are invisible to the flop counter); size and latency are measured on the "
        "int8 model. Nonzero = weights not exactly zero (what a sparse format would store).",
        "",
        COST_NOTE,
    ]
    if summary.exports:
        lines += ["", "## Exports (loaded back and compared with the PyTorch model)", ""]
        lines += ["| file | format | size | max abs difference |", "|---|---|---:|---:|"]
        for export in summary.exports:
            lines.append(
                f"| `{Path(export['path']).name}` | {export['format']} "
                f"| {format_bytes(export['size_bytes'])} | {export['max_abs_diff']:.2e} |"
            )
    for note in summary.notes:
        lines += ["", note]
    tradeoff = plot_tradeoff(
        [
            {"label": s.name, "score": s.test_score, **(s.cost or {}), "params": s.params}
            for s in summary.stages
        ],
        out_dir / "tradeoff.png",
        name=summary.metric_label,
        percent=summary.percent,
    )
    if tradeoff is not None:
        lines += ["", f"![{summary.metric_label} against parameters and latency](tradeoff.png)"]
    curves = plot_curves(
        MetricsLog(out_dir / "metrics.jsonl").read(),
        out_dir / "curves.png",
        recipe.seed,
        metric=summary.metric,
        name=summary.metric_label,
        percent=summary.percent,
    )
    if curves is not None:
        lines += ["", f"![validation {summary.metric_label} per epoch](curves.png)"]
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "report.md", markdown)
    write_html(markdown, out_dir, f"{recipe.name}: compression")
    return table
