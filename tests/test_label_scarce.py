"""Label-scarce transfer: n labelled images plus the rest without labels (`hide_labels`), the
hard pseudo-label control (`HardKD`), and the recipe's `labelled:` students."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import losses as L
from kdistill.data import UNLABELLED, ArrayDataset, BatchLoader, hide_labels, repeat_to
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.errors import ConfigError, DataError
from kdistill.recipes import Experiment, load_recipe


def make_data(n: int = 100, classes: int = 4) -> ArrayDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 1, 4, 4, generator=generator)
    targets = torch.arange(n) % classes  # 25 of each class
    return ArrayDataset(inputs, targets, [str(c) for c in range(classes)], "toy")


# -- data --------------------------------------------------------------------------------------
def test_hide_labels_keeps_a_stratified_draw_and_unlabels_the_rest():
    data = make_data()
    scarce, kept = hide_labels(data, 20, seed=1)
    assert torch.equal(scarce.inputs, data.inputs)  # same images, same order
    assert scarce.partly_labelled and scarce.num_labelled == 20 == len(kept)
    labelled = scarce.targets != UNLABELLED
    assert torch.equal(torch.nonzero(labelled).flatten(), kept)
    assert torch.equal(scarce.targets[kept], data.targets[kept])  # the real labels where kept
    # each class holds a quarter of the data, so it keeps 20 / 4 = 5 labels
    assert torch.bincount(scarce.targets[kept], minlength=4).tolist() == [5, 5, 5, 5]
    other, _ = hide_labels(data, 20, seed=2)
    assert not torch.equal(other.targets, scarce.targets)  # the draw depends on the seed
    # a subset of a partly labelled dataset stays partly labelled
    assert scarce.subset(torch.arange(10)).partly_labelled


def test_unlabelled_targets_need_a_partly_labelled_dataset():
    targets = torch.tensor([0, 1, UNLABELLED])
    with pytest.raises(DataError, match="marks unlabelled samples only in a dataset made by"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), targets, ["a", "b"])
    ArrayDataset(torch.zeros(3, 1, 2, 2), targets, ["a", "b"], partly_labelled=True)
    with pytest.raises(DataError, match=r"\[0, 2\) or -100"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, -1]), ["a", "b"], "x", True)
    with pytest.raises(DataError, match="cannot keep 101 labels of 100"):
        hide_labels(make_data(), 101)


def test_repeat_to_fills_the_steps_of_a_larger_set():
    small = make_data(7)
    repeated = repeat_to(small, 20)
    assert len(repeated) == 20
    assert torch.equal(repeated.targets, small.targets[torch.arange(20) % 7])


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_unlabelled_samples_give_the_hard_loss_no_gradient_at_all():
    # one step of CE on a batch of 100 where 20 are labelled equals, to rounding, CE on the 20
    # labelled samples alone (an independent computation with F.cross_entropy)
    scarce, kept = hide_labels(make_data(), 20, seed=0)
    torch.manual_seed(0)
    model = Linear()
    out = Distiller(None, model, [Term(L.CE())])(scarce.inputs, target=scarce.targets)
    out.loss.backward()
    got = model.fc.weight.grad.clone()
    model.zero_grad()
    reference = F.cross_entropy(model(scarce.inputs[kept]), scarce.targets[kept])
    reference.backward()
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(got, model.fc.weight.grad)
    # and a batch with no labelled sample at all: zero loss, zero gradient (never NaN)
    model.zero_grad()
    unlabelled = torch.full((5,), UNLABELLED)
    empty = Distiller(None, model, [Term(L.CE())])(scarce.inputs[:5], target=unlabelled)
    empty.loss.backward()
    assert empty.loss.item() == 0 and not model.fc.weight.grad.any()


def test_a_loss_that_does_not_ignore_unlabelled_targets_is_refused_before_training():
    scarce, _ = hide_labels(make_data(), 20, seed=0)
    distiller = Distiller(None, Linear(), [Term(L.CE(ignore_index=None))])
    with pytest.raises(DataError, match=r"labels out of range.*\[-100, 3\]"):
        fit(distiller, BatchLoader(scarce, 25), TrainConfig(epochs=1, progress=False))


# -- the hard pseudo-label control --------------------------------------------------------------
def test_hard_kd_is_cross_entropy_with_the_teachers_argmax():
    # teacher argmax = class 1; student softmax([1, 2, 0])[1] = e² / (e + e² + 1)
    student = torch.tensor([[1.0, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 1.0]])
    expected = -math.log(math.exp(2) / (math.exp(1) + math.exp(2) + 1))
    assert L.HardKD()(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # a batch: the mean over samples; a temperature-free, teacher-scale-free target
    student = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    teacher = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    log_p = torch.log_softmax(student.double(), dim=1)
    reference = -sum(log_p[n, int(teacher[n].argmax())] for n in range(6)) / 6
    assert L.HardKD()(student, teacher).item() == pytest.approx(float(reference), rel=1e-6)
    assert L.HardKD()(student, 10 * teacher).item() == L.HardKD()(student, teacher).item()
    # gradients reach the student only
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    L.HardKD()(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    assert L.create_loss("hard_kd").__class__ is L.HardKD


# -- the recipe --------------------------------------------------------------------------------
RECIPE = """
name: scarce
seed: 0
data: {dataset: digits, val_size: 100, train_limit: 400, test_limit: 50}
teacher: {model: middle_student, train: {epochs: 1, progress: false}}
students:
  - {name: s40, model: middle_student, kwargs: {channels: [2, 2]}, labelled: 40}
train: {epochs: 1, progress: false}
distill:
  methods:
    kd: [{loss: kd}]
    hard_kd: [{loss: hard_kd}]
tune: {enabled: false}
cost: {enabled: false}
"""


def test_a_labelled_student_trains_alone_on_its_labels_and_distilled_on_every_image(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    recipe = load_recipe(path)
    experiment = Experiment(recipe, tmp_path / "run", progress=False)
    train = experiment.splits.train
    spec = recipe.students[0]
    alone = experiment.student_data(spec, seed=3, uses_teacher=False)
    distilled = experiment.student_data(spec, seed=3, uses_teacher=True)
    # distilled: every training image, 40 with their label
    assert torch.equal(distilled.inputs, train.inputs) and distilled.num_labelled == 40
    kept = torch.nonzero(distilled.targets != UNLABELLED).flatten()
    # alone: those 40 labelled images only, repeated to as many samples (steps) per epoch
    assert len(alone) == len(train) and not alone.partly_labelled
    assert torch.equal(alone.inputs[:40], train.inputs[kept])
    assert torch.equal(alone.targets[:40], train.targets[kept])
    assert torch.equal(alone.inputs[40:80], train.inputs[kept])
    # another seed draws other labelled images
    assert not torch.equal(experiment.student_data(spec, 4, True).targets, distilled.targets)
    summary = experiment.run()
    methods = sorted(record.method for record in summary.records if record.student == "s40")
    assert methods == ["alone", "hard_kd", "kd"]


def test_labelled_students_get_a_plot_of_the_score_against_labels(tmp_path):
    from kdistill.report.writer import write_report

    text = textwrap.dedent(RECIPE).replace(
        "labelled: 40}", "labelled: 40}\n  - {name: s80, model: middle_student, labelled: 80}"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("    hard_kd: [{loss: hard_kd}]\n", ""))
    recipe = load_recipe(path)
    summary = Experiment(recipe, tmp_path / "run", progress=False).run()
    write_report(summary, recipe, "test")
    assert (tmp_path / "run/labels.png").stat().st_size > 0
    assert "labels.png" in (tmp_path / "run/report.md").read_text()
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert {row["model"] for row in results["rows"]} == {"teacher", "s40", "s80"}


def test_labelled_and_augment_need_class_labels(tmp_path):
    text = """
    name: dense
    task: segmentation
    data: {dataset: fashion_mnist_scenes, augment: {pad: 2}}
    teacher: {model: seg_teacher}
    students: [{name: s, model: seg_student}]
    distill: {methods: {pixel_kd: [{loss: pixel_kd}]}}
    """
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError, match="augment crops and flips the inputs only"):
        load_recipe(path)
    path.write_text(
        textwrap.dedent(text)
        .replace(", augment: {pad: 2}", "")
        .replace("seg_student}", "seg_student, labelled: 5}")
    )
    with pytest.raises(ConfigError, match="labelled .label-scarce transfer. hides class labels"):
        load_recipe(path)
