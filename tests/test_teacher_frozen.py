"""Issue 14 item 4: the teacher runs in eval mode on every forward, whatever `.train()` was
called on it (or on one of its submodules) after the Distiller was made.

Expected outputs come from an untouched copy of the teacher run in eval mode by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from kdistill.distill.distiller import Distiller, Term
from kdistill.losses import KD, FitNet


class BNDropoutNet(nn.Module):
    """conv → BatchNorm → ReLU → GAP → Dropout(0.5) → fc: train mode changes its outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.drop(h))


def make(seed: int) -> BNDropoutNet:
    torch.manual_seed(seed)
    return BNDropoutNet()


def stats(model: BNDropoutNet) -> list[Tensor]:
    return [t.clone() for t in (model.bn.running_mean, model.bn.running_var)]


@pytest.mark.parametrize(
    "unfreeze",
    [
        lambda teacher, distiller: teacher.train(),
        lambda teacher, distiller: teacher.bn.train(),  # a submodule alone
        lambda teacher, distiller: teacher.drop.train(),
        lambda teacher, distiller: [m.train() for m in distiller.modules()],  # a wrapper
    ],
    ids=["teacher.train()", "teacher.bn.train()", "teacher.drop.train()", "all modules"],
)
def test_teacher_runs_in_eval_mode_whatever_train_was_called_on(unfreeze):
    teacher = make(0)
    reference = copy.deepcopy(teacher).eval()
    distiller = Distiller(
        teacher, make(1), [Term(KD()), Term(FitNet(), student="bn", teacher="bn")]
    ).train()
    before = stats(teacher)
    x = torch.randn(8, 1, 5, 5)
    with torch.no_grad():
        expected_logits = reference(x)
        expected_bn = reference.bn(reference.conv(x))
    for _ in range(2):  # two forwards: dropout would differ between them, BN stats would drift
        unfreeze(teacher, distiller)
        out = distiller(x)
        torch.testing.assert_close(out.teacher_output, expected_logits, rtol=0, atol=0)
        # the FitNet term compares the student's bn with the teacher's eval-mode bn output
        student_bn = distiller.student.bn(distiller.student.conv(x))
        assert out.raw_parts["fitnet"] == pytest.approx(
            (student_bn - expected_bn).pow(2).mean().item(), rel=1e-5
        )
    for got, want in zip(stats(teacher), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert distiller.student.training  # the student keeps the distiller's mode


def test_teacher_in_eval_mode_in_build():
    teacher = make(0)
    distiller = Distiller(teacher, make(1), [Term(FitNet(), student="bn", teacher="bn")])
    before = stats(teacher)
    teacher.train()
    distiller.build(torch.randn(8, 1, 5, 5))
    for got, want in zip(stats(teacher), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
