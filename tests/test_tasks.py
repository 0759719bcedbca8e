"""The Task objects and the one objective builder (kdistill.tasks, recipes.objective)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.data import ArrayDataset, BatchLoader
from kdistill.errors import ConfigError
from kdistill.recipes import load_recipe
from kdistill.recipes.objective import build_objective
from kdistill.tasks import ClassificationTask, evaluate, get_task

RECIPES = Path(__file__).resolve().parents[1] / "src/kdistill/recipes/builtin"


class MeanAbsError:
    """A user's metric: mean |output − target| over every element (lower is better, negated)."""

    shardable = True

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, output, target):
        self.total += float((output.squeeze(1) - target.float()).abs().sum())
        self.count += target.numel()

    def reduce(self):
        pass

    def compute(self):
        return {"neg_mae": -self.total / self.count}


class RegressionTask:
    """A user's own task, importable as `test_tasks:RegressionTask`."""

    name = "regression"
    metrics = ("neg_mae",)
    labels = {"neg_mae": "−MAE"}
    default_hard_loss = "logit_mse"

    @property
    def outputs(self):
        return {None: self}

    def prepare(self, data):
        return data

    def model_kwargs(self, data):
        return {}

    def new_metric(self, model, data):
        return MeanAbsError()


def test_get_task_by_name_by_import_path_and_errors():
    assert get_task("classification").metrics == ("accuracy",)
    assert list(get_task("multitask").outputs) == ["seg", "det"]
    assert get_task("test_tasks:RegressionTask").name == "regression"
    with pytest.raises(ValueError, match="unknown task 'segmentaton'; did you mean 'segmentation'"):
        get_task("segmentaton")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
        get_task("no_such_pkg:Task")
    with pytest.raises(ValueError, match="not a kdistill Task"):
        get_task("torch:zeros_like")
    with pytest.raises(ValueError, match="not a kdistill Task; it lacks"):
        get_task("collections:OrderedDict")


def test_evaluate_feeds_the_task_metric_every_batch():
    # outputs = inputs (identity model), targets 0: MAE = mean |x| by hand
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1) - 3
    data = ArrayDataset(x, torch.zeros(10, dtype=torch.int64), ["a"])
    loader = BatchLoader(data, batch_size=3, shuffle=False)
    got = evaluate(nn.Identity(), loader, get_task("test_tasks:RegressionTask"))
    assert got == {"neg_mae": pytest.approx(-sum(abs(v - 3) for v in range(10)) / 10)}


def test_classification_evaluation_counts_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])
    target = torch.tensor([0, 0, 0, 1])  # argmax right on rows 0, 2, 3
    data = ArrayDataset(logits, target, ["a", "b"])
    got = evaluate(nn.Identity(), BatchLoader(data, batch_size=3), ClassificationTask())
    assert got["accuracy"] == pytest.approx(3 / 4)


def test_single_output_objective_weights_follow_the_formula(tmp_path):
    recipe = load_recipe(
        RECIPES / "fashion_mnist.yaml",
        ["distill.alpha=0.7", "distill.methods={kd: [{loss: kd, weight: 2}]}"],
    )
    task = get_task("classification")
    terms = {type(t.loss).__name__: t.weight for t in build_objective(task, recipe.distill, "kd")}
    assert terms == pytest.approx({"CE": 0.3, "KD": 1.4})  # (1 − α), α·w
    alone = build_objective(task, recipe.distill, None)
    assert [(t.name, t.weight) for t in alone] == [("hard", 1.0)]
    only_soft = build_objective(task, recipe.distill, "kd", {"alpha": 1.0})
    assert [type(t.loss).__name__ for t in only_soft] == [
        "KD"
    ]  # the zero-weight hard term is left out


def test_detection_takes_its_own_hard_loss_by_default():
    recipe = load_recipe(RECIPES / "scenes_detection.yaml", ["distill.hard_loss=null"])
    terms = build_objective(get_task("detection"), recipe.distill, None)
    assert type(terms[0].loss).__name__ == "YOLOLoss"


def test_recipe_task_errors_name_the_field():
    with pytest.raises(ConfigError, match="task: unknown task 'clasification'"):
        load_recipe(RECIPES / "fashion_mnist.yaml", ["task=clasification"])
    with pytest.raises(ConfigError, match="holds masks and boxes, not class labels"):
        load_recipe(RECIPES / "scenes_detection.yaml", ["task=classification"])
    recipe = load_recipe(RECIPES / "fashion_mnist.yaml", ["task=test_tasks:RegressionTask"])
    assert recipe.task == "test_tasks:RegressionTask"
