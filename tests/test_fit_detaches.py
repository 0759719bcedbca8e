"""Issue 13: after `kd.fit` (returning or raising) no kdistill hook is left on the models, so the
student pickles and scripts; the distiller puts its taps back on its next forward."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch import Tensor, nn

from kdistill.data import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.losses import CE, FitNet


class Net(nn.Module):
    """Scriptable: conv → ReLU → GAP → fc."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def setup():
    torch.manual_seed(0)
    teacher, student = Net(6), Net(4)
    distiller = Distiller(
        teacher, student, [Term(FitNet(), student="conv", teacher="conv"), Term(CE())]
    )
    data = ArrayDataset(torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,)), list("abc"))
    return teacher, student, distiller, BatchLoader(data, batch_size=4)


def test_after_fit_the_student_pickles_scripts_and_the_distiller_taps_again():
    teacher, student, distiller, loader = setup()
    fit(distiller, loader, TrainConfig(epochs=1, progress=False))
    assert hooks(student) == 0 and hooks(teacher) == 0
    pickle.dumps(student)
    torch.save(student, io.BytesIO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch ≥ 2.10 deprecates jit
        scripted = torch.jit.script(student)
    x = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(scripted(x), student(x))

    # the distiller works on: FitNet on conv equals the hand-computed value
    distiller.eval()
    with torch.no_grad():
        out = distiller(x, target=torch.tensor([0, 2]))
        connector = distiller.connectors["fitnet"]
        expected = (connector(student.conv(x)) - teacher.conv(x)).pow(2).mean()
    assert out.raw_parts["fitnet"] == pytest.approx(expected.item(), rel=1e-5)
    assert hooks(student) == 1 and hooks(teacher) == 1
    distiller.detach()
    assert hooks(student) == 0 and hooks(teacher) == 0


def test_fit_that_raises_leaves_no_hook():
    teacher, student, distiller, loader = setup()

    def evaluate(model):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        fit(distiller, loader, TrainConfig(epochs=1, progress=False), evaluate=evaluate)
    assert hooks(student) == 0 and hooks(teacher) == 0
