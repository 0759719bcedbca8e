"""Training curves (validation accuracy per epoch) from `metrics.jsonl` records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def plot_curves(records: Sequence[dict], path: Path, seed: int) -> Path | None:
    """One line per model trained with `seed` (and the teacher); tuning trials are left out."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        label = record.get("model", "")
        if "val_accuracy" not in record or label.startswith("tune/"):
            continue
        if label != "teacher" and not label.endswith(f"/seed{seed}"):
            continue
        curves.setdefault(label, []).append((record["epoch"], record["val_accuracy"]))
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
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title(f"Validation accuracy per epoch (seed {seed})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_tradeoff(points: Sequence[dict], path: Path, latency_batch: str = "1") -> Path | None:
    """Accuracy against parameters (left) and against latency at `latency_batch` (right).

    `points`: dicts with `label`, `accuracy` (0–1), `params` and `latency_ms` (batch size as a
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
            y = 100 * point["accuracy"]
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
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].set_title("Accuracy against size")
    axes[1].set_title("Accuracy against latency")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
