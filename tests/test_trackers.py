"""Trackers: what `kd.fit` writes to metrics.jsonl is read back, number for number, by
TensorBoard's own reader (`EventAccumulator`) and by MLflow's client (`MlflowClient`)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import kdistill as kd
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.engine.trackers import (
    MLflowTracker,
    TensorBoardTracker,
    flat_scalars,
    open_trackers,
)
from kdistill.errors import ConfigError
from kdistill.io import MetricsLog
from kdistill.losses import CE, KD


def _tiny_fit(tmp_path, loggers, epochs=2):
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    y = (x[:, 0] > 0).long()
    teacher, student = nn.Linear(6, 2), nn.Linear(6, 2)
    distiller = kd.Distiller(
        teacher, student, [kd.Term(KD(temperature=2.0), 0.7), kd.Term(CE(), 0.3)]
    )
    loader = BatchLoader(ArrayDataset(x, y, classes=["a", "b"]), batch_size=8, shuffle=True, seed=0)
    config = kd.TrainConfig(epochs=epochs, batch_size=8, lr=0.05, progress=False)
    metrics = MetricsLog(tmp_path / "metrics.jsonl")

    def evaluate(model):
        with torch.no_grad():
            return {"accuracy": (model(x).argmax(1) == y).float().mean().item()}

    kd.fit(
        distiller, loader, config, evaluate=evaluate, label="s/kd", metrics_log=metrics,
        loggers=loggers,
    )  # fmt: skip
    return metrics.read()


def test_tensorboard_events_hold_every_metrics_line(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _tiny_fit(tmp_path, ["tensorboard"])
    assert len(records) == 2
    events = EventAccumulator(str(tmp_path / "tensorboard" / "s" / "kd"))
    events.Reload()
    expected = {}
    for record in records:
        for tag, value in flat_scalars(record).items():
            expected.setdefault(tag, []).append((record["epoch"], value))
    # the tags the loop writes: the learning rate, the loss and each term, the validation score
    assert {"lr", "train_loss", "train_parts/kd", "train_parts/ce", "val_accuracy"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in got] == [step for step, _ in points]
        for (_, value), (_, want) in zip(got, points):
            assert value == pytest.approx(want, rel=1e-6, abs=1e-7)  # stored as float32


def test_mlflow_run_holds_every_metrics_line(tmp_path):
    from mlflow.tracking import MlflowClient

    tracker = MLflowTracker(tmp_path / "mlflow", experiment="tiny", run_name="recipe")
    tracker.log_params({"train": {"lr": 0.05, "epochs": 2}, "name": "tiny"})
    records = _tiny_fit(tmp_path, [tracker])
    report = tmp_path / "report.md"
    report.write_text("| model | accuracy |\n")
    tracker.log_results("s/kd", {"accuracy": 0.75, "cost": {"macs": 12.0}})
    tracker.log_artifact(report)
    parent = tracker.run_id
    tracker.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # the parent (the recipe) and one nested run for the trained model
    child = next(run for run in runs if run.info.run_id != parent)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.run_name == "s/kd" and child.info.status == "FINISHED"
    for tag, value in flat_scalars(records[-1]).items():
        history = client.get_metric_history(child.info.run_id, tag)
        assert [m.step for m in history] == [r["epoch"] for r in records]
        assert history[-1].value == pytest.approx(value, rel=1e-12)
    parent_run = client.get_run(parent)
    assert parent_run.data.params == {"train.lr": "0.05", "train.epochs": "2", "name": "tiny"}
    assert parent_run.data.metrics == {"s/kd/accuracy": 0.75, "s/kd/cost/macs": 12.0}
    assert [a.path for a in client.list_artifacts(parent)] == ["report.md"]


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImportError, match=r"pip install 'kdistill\[mlflow\]'"):
        MLflowTracker(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'kdistill\[tensorboard\]'"):
        TensorBoardTracker(tmp_path)


def test_bad_logger_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker 'wandb'"):
        _tiny_fit(tmp_path, ["wandb"], epochs=1)
    with pytest.raises(ValueError, match="tensorboard"):
        kd.TrainConfig(log=["tensorbord"])
    with pytest.raises(ConfigError, match="needs a folder to write to: pass metrics_log="):
        open_trackers(["tensorboard"], None)


def test_a_recipe_run_with_train_log_fills_both_trackers(tmp_path):
    """`kdistill run` of a tiny detection recipe with ``train.log: [tensorboard, mlflow]``: each
    trained model's epochs in TensorBoard and in a nested MLflow run; the recipe as the parent
    run's parameters, the results table as its metrics, the report as its artifact."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_cli import needs_fashion_mnist
    from test_dense_recipes import SCENES

    from kdistill.cli import main

    if needs_fashion_mnist.args[0]:
        pytest.skip(needs_fashion_mnist.kwargs["reason"])
    text = SCENES.format(task="detection", teacher="det_student", student="det_student")
    text = text.replace("lr: 0.003}", "lr: 0.003, log: [tensorboard, mlflow]}")
    text += "distill: {alpha: 0.5, hard_loss: yolo, methods: {mse: [{loss: det_logit_mse}]}}\n"
    recipe = tmp_path / "dense.yaml"
    recipe.write_text(text)
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--quiet"]) == 0

    records = MetricsLog(run / "metrics.jsonl").read()
    students = [r for r in records if r["model"] != "teacher"]
    assert {r["model"] for r in students} == {"s/alone/seed0", "s/mse/seed0"}
    for record in students:
        events = EventAccumulator(str(run / "tensorboard" / record["model"]))
        events.Reload()
        for tag, value in flat_scalars(record).items():
            (event,) = events.Scalars(tag)
            assert (event.step, event.value) == (record["epoch"], pytest.approx(value, rel=1e-6))
        assert "val_ap" in flat_scalars(record)  # COCO AP@[.5:.95] on validation

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dense")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert set(children) == {"teacher", "s/alone/seed0", "s/mse/seed0"}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    for record in students:
        metrics = children[record["model"]].data.metrics
        assert metrics == pytest.approx(flat_scalars(record), rel=1e-12)
    assert parent.data.params["train.log"] == "['tensorboard', 'mlflow']"
    assert parent.data.params["task"] == "detection"
    records_json = json.loads((run / "results.json").read_text())["records"]
    results = {r["label"]: r for r in records_json}
    assert parent.data.metrics["s/mse/seed0/ap"] == pytest.approx(
        results["s/mse/seed0"]["test_metrics"]["ap"], rel=1e-12
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json"} <= artifacts
