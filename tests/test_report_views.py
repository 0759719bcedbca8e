"""What the report shows (issue 19): the settings each model trained with, the spread over seeds
in curves.png and tradeoff.png, labels joined to their points, and progress that moves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

import kdistill.engine.loop as loop_module
import kdistill.report.plots as plots_module
from kdistill import losses as L
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.recipes import load_recipe
from kdistill.recipes.objective import build_objective, settings_used
from kdistill.recipes.runner import recipe_task
from kdistill.report.plots import curve_bands, plot_tradeoff, spread_labels
from kdistill.report.table import format_used

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("settings", [{}, {"alpha": 0.5, "temperature": 1.0}])
def test_settings_used_are_those_the_built_objective_holds(settings):
    recipe = load_recipe(RECIPES / "fashion_mnist.yaml")
    task = recipe_task(recipe)
    used = {s.name: s for s in settings_used(task, recipe.distill, "kd", settings)}
    hard, soft = build_objective(task, recipe.distill, "kd", settings, num_samples=10)
    # read back from the objects training uses: hard weight 1 − α, the KD loss's temperature
    assert used["alpha"].value == pytest.approx(1 - hard.weight)
    assert used["temperature"].value == soft.loss.temperature
    assert set(used) == {"alpha", "temperature"}
    assert all(s.chosen == bool(settings) for s in used.values())
    shown = format_used(used.values())
    if settings:
        assert shown == "alpha=0.5, temperature=1"
    else:  # what --no-tune trains with: the recipe's α = 0.9 and T = 4
        assert shown == "alpha=0.9 (default), temperature=4 (default)"


def test_settings_used_name_each_loss_when_a_method_has_several(tmp_path):
    recipe = load_recipe(RECIPES / "fashion_mnist_feature.yaml")
    used = settings_used(recipe_task(recipe), recipe.distill, "dkd", {"temperature": 2.0})
    values = {s.name: (s.value, s.chosen) for s in used}
    # DKD(alpha=1, beta=8, temperature=4) by default (losses/logit.py); its own α is not the
    # mixing α, so it is named by its loss
    assert values["dkd.alpha"] == (1.0, False) and values["beta"] == (8.0, False)
    assert values["temperature"] == (2.0, True)
    assert settings_used(recipe_task(recipe), recipe.distill, None) == []


def test_labels_keep_the_order_of_their_points_and_do_not_overlap():
    # the demo's case: middle/kd (89.11) sits just under middle/alone (89.26)
    heights = [89.26, 89.11, 40.0]
    placed = spread_labels(heights, gap=1.0)
    assert placed[0] > placed[1] > placed[2]
    assert placed[0] - placed[1] >= 1.0 - 1e-9
    assert placed[2] == pytest.approx(40.0, abs=0.5)  # a lone point keeps its label near it
    # far apart already: nothing moves
    assert spread_labels([10.0, 0.0], gap=1.0) == pytest.approx([10.0, 0.0])


def test_tradeoff_draws_the_spread_and_joins_each_label_to_its_point(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots_module.plt, "close", figures.append)
    # the demo's table (README): on this scale middle/kd and middle/alone are 2 pixels apart
    middle, mini = (
        {"params": 4266, "latency_ms": {"1": 0.09}},
        {"params": 220, "latency_ms": {"1": 0.10}},
    )
    points = [
        {"label": "teacher/teacher", "score": 0.9064, "std": 0.0,
         "params": 6508298, "latency_ms": {"1": 2.78}},
        {"label": "mini/alone", "score": 0.7677, "std": 0.0010, **mini},
        {"label": "mini/kd", "score": 0.7693, "std": 0.0030, **mini},
        {"label": "middle/alone", "score": 0.8926, "std": 0.0012, **middle},
        {"label": "middle/kd", "score": 0.8911, "std": 0.0025, **middle},
    ]  # fmt: skip
    assert plot_tradeoff(points, tmp_path / "tradeoff.png") == tmp_path / "tradeoff.png"
    (figure,) = figures
    try:
        for axis in figure.axes:
            labels = {text.get_text(): text for text in axis.texts}
            assert set(labels) == {p["label"] for p in points}
            for point in points:  # each label is anchored at its own point's score
                assert labels[point["label"]].xy[1] == pytest.approx(100 * point["score"])
            y = {name: text.get_window_extent().y0 for name, text in labels.items()}
            assert y["middle/alone"] > y["middle/kd"]  # the higher mean has the higher label
            assert y["mini/kd"] > y["mini/alone"]
            bars = [c for c in axis.containers if hasattr(c, "has_yerr") and c.has_yerr]
            spans = sorted(
                round(float(seg[1][1] - seg[0][1]), 4)
                for bar in bars
                for seg in bar.lines[2][0].get_segments()
            )
            # ± 1 std in percent points, bar length 2·std (the teacher's 0 draws no length)
            assert spans == pytest.approx([0.0, 0.2, 0.24, 0.5, 0.6], abs=1e-3)
    finally:
        plt.close(figure)


def test_curve_bands_are_the_mean_and_std_over_seeds():
    records = [
        {"model": "s/kd/seed0", "epoch": 1, "val_accuracy": 0.50},
        {"model": "s/kd/seed1", "epoch": 1, "val_accuracy": 0.60},
        {"model": "s/kd/seed0", "epoch": 2, "val_accuracy": 0.70},
        {"model": "s/kd/seed1", "epoch": 2, "val_accuracy": 0.80},
        {"model": "s/kd/seed1", "epoch": 2, "val_accuracy": 0.90},  # resumed: the last counts
        {"model": "teacher", "epoch": 1, "val_accuracy": 0.95},
        {"model": "tune/s/kd/alpha=0.5", "epoch": 1, "val_accuracy": 0.10},
    ]
    bands = curve_bands(records)
    assert set(bands) == {"s/kd", "teacher"}
    epochs, mean, std, runs = bands["s/kd"]
    assert epochs == [1, 2] and runs == 2
    assert mean == pytest.approx([55.0, 80.0])
    assert std == pytest.approx([50**0.5, 200**0.5])  # sample std of (50, 60) and (70, 90)
    assert bands["teacher"] == ([1], [95.0], [0.0], 1)
    assert set(curve_bands(records, seed=0)) == {"s/kd", "teacher"}
    assert curve_bands(records, seed=0)["s/kd"][1] == pytest.approx([50.0, 70.0])


class _RecordingBar:
    """Stands in for tqdm: iterates, and records every set_postfix call."""

    calls: list[dict] = []

    def __init__(self, iterable, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, values, refresh=True):
        _RecordingBar.calls.append(dict(values))

    def close(self):
        pass


@pytest.mark.parametrize(("interval", "expected"), [(0.0, 6), (3600.0, 1)])
def test_the_progress_postfix_is_refreshed_by_time(monkeypatch, interval, expected):
    monkeypatch.setattr(loop_module, "tqdm", _RecordingBar)
    monkeypatch.setattr(loop_module, "POSTFIX_SECONDS", interval)
    _RecordingBar.calls = []
    torch.manual_seed(0)
    data = ArrayDataset(torch.randn(12, 3), torch.arange(12) % 2, classes=["a", "b"])
    distiller = Distiller(None, nn.Linear(3, 2), [Term(L.CE(), 1.0)])
    result = fit(distiller, BatchLoader(data, batch_size=2), TrainConfig(epochs=1, lr=0.1))
    # interval 0: after each of the 6 steps; an hour: only after the first one
    assert len(_RecordingBar.calls) == expected
    last = _RecordingBar.calls[-1]
    if expected == 6:  # the last postfix is the epoch's mean loss, as the metrics record it
        assert float(last["ce"]) == pytest.approx(result.final["train_parts"]["ce"], abs=1e-3)
