"""Issue 14 item 2: a tap hands over its module's own output, even when code after the module
changes that output in place (the torchvision `BasicBlock` pattern: ``out = bn2(conv2(…));
out += identity; out = relu_(out)``, or ``nn.ReLU(inplace=True)``).

Expected values come from running the block's layers by hand with `torch.nn.functional`
(batch statistics in training mode, running statistics in eval mode), never from a tap.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.data import ArrayDataset
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.taps import Taps
from kdistill.distill.teacher.store import build_teacher_cache
from kdistill.losses import FitNet


class Block(nn.Module):
    """A torchvision-style BasicBlock: bn2's output is changed in place by the residual add and
    the ReLU (`functional`: ``out += x; torch.relu_(out)``; else ``nn.ReLU(inplace=True)``)."""

    def __init__(self, channels: int, functional: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.functional = functional

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu_(out) if self.functional else self.relu(out)


class Net(nn.Module):
    def __init__(self, channels: int, functional: bool):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.block = Block(channels, functional)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so eval ≠ train and bn ≠ identity."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.copy_(torch.linspace(-0.5, 0.5, module.num_features))
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.02, 0.1)  # about the conv outputs' variance


def bn(module: nn.BatchNorm2d, x: Tensor, training: bool) -> Tensor:
    if training:  # batch statistics, running statistics left alone
        return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
    return F.batch_norm(
        x,
        module.running_mean,
        module.running_var,
        module.weight,
        module.bias,
        False,
        0.0,
        module.eps,
    )


def bn2_by_hand(net: Net, x: Tensor, training: bool) -> Tensor:
    """bn2's output, computed layer by layer with functional ops."""
    block = net.block
    h = F.conv2d(x, net.stem.weight, net.stem.bias, padding=1)
    h = F.relu(bn(block.bn1, F.conv2d(h, block.conv1.weight, padding=1), training))
    return bn(block.bn2, F.conv2d(h, block.conv2.weight, padding=1), training)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("functional", [True, False], ids=["relu_", "ReLU(inplace)"])
@pytest.mark.parametrize("mode", ["train", "eval", "inference"])
def test_tap_holds_the_module_output_not_the_inplace_result(functional, mode):
    net = Net(4, functional)
    randomise_bn(net)
    net.train(mode == "train")
    x = torch.randn(6, 1, 5, 5)
    with torch.no_grad():
        expected = bn2_by_hand(net, x, training=mode == "train")
    assert (expected < 0).any()  # the in-place ReLU would have removed these
    with Taps(net, ["block.bn2"]) as taps:
        if mode == "inference":
            with torch.inference_mode():
                net(x)
        else:
            net(x)
        got = taps.collect()["block.bn2"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not got.is_inference()  # usable in autograd outside inference mode


@pytest.mark.parametrize("functional", [True, False], ids=["relu_", "ReLU(inplace)"])
def test_distiller_fitnet_on_inplace_block_matches_hand_built_forward(functional):
    """FitNet between the students' and the teacher's bn2: value and student gradients equal
    those of the hand-built forward (student in training mode, teacher frozen in eval)."""
    teacher, student = Net(4, functional), Net(4, functional)
    randomise_bn(teacher)
    randomise_bn(student)
    distiller = Distiller(
        teacher, student, [Term(FitNet(), student="block.bn2", teacher="block.bn2")]
    ).train()
    x = torch.randn(6, 1, 5, 5)

    out = distiller(x)
    out.loss.backward()
    got_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    with torch.no_grad():
        teacher_bn2 = bn2_by_hand(teacher, x, training=False)
    expected = (bn2_by_hand(student, x, training=True) - teacher_bn2).pow(2).mean()
    expected.backward()
    want_grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}

    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (
        set(got_grads)
        == set(want_grads)
        == {
            "stem.weight",
            "stem.bias",
            "block.conv1.weight",
            "block.bn1.weight",
            "block.bn1.bias",
            "block.conv2.weight",
            "block.bn2.weight",
            "block.bn2.bias",
        }
    )
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


def test_teacher_cache_stores_the_module_output(tmp_path):
    """The cache build taps the teacher the same way: a stored feature is bn2's own output."""
    teacher = Net(4, functional=True)
    randomise_bn(teacher)
    inputs = torch.randn(10, 1, 5, 5)
    data = ArrayDataset(inputs, torch.zeros(10, dtype=torch.int64), ["a", "b", "c"], "noise")
    cache = build_teacher_cache(teacher, data, tmp_path, layers=["block.bn2"], batch_size=4)
    _, features = cache.lookup(torch.arange(10), inputs)
    with torch.no_grad():
        expected = bn2_by_hand(teacher.eval(), inputs, training=False)
    assert (np.asarray(expected) < 0).any()
    torch.testing.assert_close(features["block.bn2"], expected, rtol=1e-5, atol=1e-5)
