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


class TupleNet(nn.Module):
    """Returns (logits, features): logits = x @ W, features = 2·x (a feature width ≠ classes)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x @ self.weight, 2 * x


def test_evaluate_takes_a_task_name_and_picks_a_tuple_output():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    model = TupleNet(torch.eye(2))  # logits = x: argmax right on rows 0 and 1
    loader = BatchLoader(ArrayDataset(x, y, ["a", "b"]), batch_size=2)
    got = evaluate(model, loader, "classification", output=0)
    assert got["accuracy"] == pytest.approx(2 / 3)


def test_a_feature_term_on_a_tuple_output_is_not_a_class_count_mismatch():
    """FitNet on the (N×D) feature output of tuple models whose widths differ (4 vs 2) goes
    through a linear connector; the class-count check is for logit losses only."""
    import kdistill as kd
    from kdistill.losses import CE, FitNet

    torch.manual_seed(0)
    x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
    teacher = nn.Sequential(nn.Linear(2, 4))

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = teacher

        def forward(self, inputs):
            features = self.body(inputs)
            return features[:, :2], features

    student = TupleNet(torch.randn(2, 2))
    distiller = kd.Distiller(
        Teacher(),
        student,
        [kd.Term(FitNet(), output=1), kd.Term(CE(), output=0)],
    )
    loader = BatchLoader(ArrayDataset(x, y, ["a", "b"]), batch_size=8)
    result = kd.fit(distiller, loader, kd.TrainConfig(epochs=1, progress=False))
    assert set(result.final["train_parts"]) == {"fitnet", "ce"}
    assert isinstance(distiller.connectors["fitnet"], nn.Linear)


def test_position_zero_picks_a_plain_tensor_and_other_positions_are_errors():
    from kdistill.distill.distiller import select_output

    logits = torch.randn(3, 2)
    assert select_output(logits, 0, "teacher") is logits
    with pytest.raises(ValueError, match="only output, position 0"):
        select_output(logits, 1, "teacher")


def test_best_follows_the_metric_direction():
    from types import SimpleNamespace

    from kdistill.tasks import best, lower_is_better_metrics, percent_metrics

    trials = [{"v": 4.1}, {"v": 3.9}, {"v": 3.9}, {"v": 4.3}]
    lm = SimpleNamespace(metrics=("nll", "accuracy"), lower_is_better=("nll",))
    assert best(lm, "nll", trials, key=lambda t: t["v"]) is trials[1]  # lowest, first of ties
    assert best(lm, "accuracy", trials, key=lambda t: t["v"]) is trials[3]
    plain = SimpleNamespace(metrics=("accuracy",))
    assert lower_is_better_metrics(plain) == () and percent_metrics(plain) == ("accuracy",)
