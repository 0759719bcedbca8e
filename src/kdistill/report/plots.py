"""Training curves (validation accuracy per epoch) from `metrics.jsonl` records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
