"""The declared Task contract and `tasks.evaluate` on any loader (issue 25 part A, items 1 and
6): every member a caller reads exists on every task, with its default for a user's task; a
task refuses a data kind it does not read; `evaluate` takes a plain torch DataLoader for every
task, each metric checked against a hand computation."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdistill.data.completions import PromptCompletions, sequences_from_parts
from kdistill.data.dense import BoxDataset, MaskBoxDataset, MaskDataset
from kdistill.errors import ConfigError
from kdistill.tasks import (
    CompositeTask,
    DetectionTask,
    SegmentationTask,
    evaluate,
    get_task,
    task_names,
)
from kdistill.tasks.base import OPTIONAL_MEMBERS, REQUIRED_MEMBERS

SRC = Path(__file__).resolve().parents[1] / "src" / "kdistill"


class MinimalTask:
    """A user's task with the required members only."""

    name = "mine"
    metrics = ("score",)
    labels = {"score": "score"}
    default_hard_loss = "ce"

    def model_kwargs(self, data):
        return {}

    def new_metric(self, model, data):
        raise NotImplementedError


def test_every_task_has_every_member():
    for name in task_names():
        task = get_task(name)
        for member in (*REQUIRED_MEMBERS, *OPTIONAL_MEMBERS):
            assert hasattr(task, member), (name, member)
        assert task.data_kinds and task.default_data in task.data_kinds
    own = get_task(MinimalTask())
    assert own.target == "class" and own.model_output is None and own.eval_batch_size is None
    assert own.percent_metrics == ("score",) and own.report_section({}, None) == []
    assert not own.reads_text and not own.dense and not own.report_models
    assert own.outputs == {None: own} or set(own.outputs) == {None}
    assert "npz" in own.data_kinds and own.name == "mine"


def test_declared_values_of_the_built_in_tasks():
    lm, completion = get_task("language_modeling"), get_task("completion")
    assert (lm.target, lm.model_output, lm.default_data) == ("tokens", "logits", "kjv")
    assert lm.reads_text and lm.report_models and lm.eval_batch_size == 32
    assert completion.target == "completions" and completion.default_data == "kjv_completions"
    assert get_task("segmentation").dense and get_task("multitask").target == "mask+boxes"
    assert not get_task("classification").dense


def test_no_task_probe_or_task_name_comparison_outside_tasks():
    found = subprocess.run(
        ["git", "grep", "-n", "-E", r"getattr\((self\.)?task,", "--", str(SRC)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    outside = [line for line in found if "/tasks/" not in line]
    assert outside == []


def test_check_refuses_a_kind_the_task_does_not_read(tmp_path):
    with pytest.raises(ConfigError, match=r"not read by task detection .* task detection reads"):
        get_task("detection").check({"kind": "masks", "root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"not read by task classification"):
        get_task("classification").check({"kind": "coco", "root": str(tmp_path)})
    get_task("classification").check({"dataset": "digits"})  # the built-in set


# -- evaluate on plain DataLoaders -------------------------------------------------------------
def test_classification_on_a_tensor_dataset():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])  # correct, correct, wrong: 2/3
    got = evaluate(
        nn.Identity(), DataLoader(TensorDataset(logits, labels), batch_size=2), "classification"
    )
    assert got["accuracy"] == pytest.approx(2 / 3)


def test_segmentation_on_a_plain_dataset_without_declared_sizes():
    # the model passes its input (the logits) through; target [0, 1, void, 1], prediction
    # [0, 0, 1, 1]: counted 0→0, 1→0, 1→1: IoU₀ = 1/2, IoU₁ = 1/2, mIoU ½, pixel accuracy 2/3
    logits = torch.tensor([[[[5.0, 5.0, 0.0, 0.0]], [[0.0, 0.0, 5.0, 5.0]]]])
    masks = torch.tensor([[[0, 1, 255, 1]]])
    plain = DataLoader(TensorDataset(logits, masks), batch_size=1)  # no num_seg_classes
    got = evaluate(nn.Identity(), plain, SegmentationTask(ignore_index=255))
    assert got == pytest.approx({"miou": 0.5, "pixel_accuracy": 2 / 3})
    # a MaskDataset declares its void label: the task needs no ignore_index
    declared = MaskDataset(logits, masks, ["bg", "fg"], 255)
    assert evaluate(nn.Identity(), DataLoader(declared, batch_size=1), "segmentation") == got
    with pytest.raises(ValueError, match="marks void pixels with 255; set distill.ignore_index"):
        evaluate(nn.Identity(), DataLoader(declared), SegmentationTask(ignore_index=0))


class GridDetector(nn.Module):
    """Returns a fixed raw output: one confident box per image in cell (0, 0) of a 2×2 grid."""

    def __init__(self, label: int):
        super().__init__()
        self.anchors = torch.tensor([[4.0, 4.0]])
        self.num_classes = 2
        self.label = label

    def forward(self, x):
        raw = torch.full((len(x), 1, 2, 2, 7), -10.0)
        raw[:, 0, 0, 0, :4] = 0.0  # centre (0 + σ(0))·8 = 4, size = the anchor: box [2, 2, 6, 6]
        raw[:, 0, 0, 0, 4] = 10.0
        raw[:, 0, 0, 0, 5 + self.label] = 10.0
        return raw


def test_detection_on_plain_and_torchvision_style_loaders():
    images = torch.zeros(2, 1, 16, 16)
    boxes = BoxDataset(images, torch.tensor([[[1.0, 2, 2, 6, 6]]] * 2), ["a", "b"])
    task = DetectionTask(coco=False)
    # the predicted box equals the labelled one (class 1): AP 1; predicted class 0: AP 0
    assert evaluate(GridDetector(1), DataLoader(boxes, batch_size=2), task)["map50"] == 1.0
    assert evaluate(GridDetector(0), DataLoader(boxes, batch_size=2), task)["map50"] == 0.0

    class Torchvision(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return images[i], {"boxes": torch.tensor([[2.0, 2, 6, 6]]), "labels": torch.tensor([1])}

    loader = DataLoader(Torchvision(), batch_size=2, collate_fn=lambda b: tuple(zip(*b)))
    assert evaluate(GridDetector(1), loader, task)["map50"] == 1.0


def test_multitask_on_a_plain_loader():
    images = torch.zeros(1, 1, 16, 16)
    data = MaskBoxDataset(
        images,
        torch.zeros(1, 16, 16, dtype=torch.int64),
        torch.tensor([[[1.0, 2, 2, 6, 6]]]),
        ["bg", "thing"],
        ["a", "b"],
    )

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.det = GridDetector(1)
            self.anchors = self.det.anchors

        def forward(self, x):
            seg = torch.zeros(len(x), 2, 16, 16)
            seg[:, 0] = 1.0  # every pixel background, as labelled: mIoU 1
            return {"seg": seg, "det": self.det(x)}

    task = CompositeTask("mt", {"seg": SegmentationTask(), "det": DetectionTask(coco=False)})
    got = evaluate(Both(), DataLoader(data, batch_size=1), task)
    assert got == pytest.approx({"miou": 1.0, "pixel_accuracy": 1.0, "map50": 1.0})


class FixedLM(nn.Module):
    """Logits that put probability ½ on token 3 and ½ / (V − 1) on each other token."""

    def __init__(self, vocab: int = 5):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        probs = torch.full((self.vocab,), 0.5 / (self.vocab - 1))
        probs[3] = 0.5
        return probs.log().expand(*input_ids.shape, self.vocab).clone()


def test_language_modeling_on_a_users_dict_loader():
    # labels [3, 3, 1, −100]: counted next tokens 3 (p ½) and 1 (p ⅛): NLL = (ln 2 + ln 8) / 2
    items = [
        {
            "input_ids": torch.tensor([3, 3, 1, 0]),
            "attention_mask": torch.tensor([1, 1, 1, 0]),
            "labels": torch.tensor([3, 3, 1, -100]),
        }
    ]
    got = evaluate(FixedLM(), DataLoader(items, batch_size=1), "language_modeling")
    nll = (math.log(2) + math.log(8)) / 2
    assert got["nll"] == pytest.approx(nll) and got["perplexity"] == pytest.approx(math.exp(nll))
    assert got["next_token_accuracy"] == pytest.approx(0.5)
    assert math.isnan(got["bits_per_byte"])  # no byte lengths in a user's loader


def test_completion_on_a_plain_loader_over_prompt_completions():
    ids, mask, labels = sequences_from_parts([torch.tensor([1, 4])], [torch.tensor([3, 2])])
    bytes_per_token = torch.tensor([0, 0, 0, 1, 1])  # tokens 3 and 4 spell one byte each
    data = PromptCompletions(ids, mask, labels, torch.tensor([2]), bytes_per_token)
    got = evaluate(FixedLM(), DataLoader(data, batch_size=1), "completion")
    # counted targets: 3 (p ½) and 2 (p ⅛); bytes 1 + 0
    nll_sum = math.log(2) + math.log(8)
    assert got["nll"] == pytest.approx(nll_sum / 2)
    assert got["bits_per_byte"] == pytest.approx(nll_sum / math.log(2) / 1)
