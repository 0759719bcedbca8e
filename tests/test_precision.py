"""Mixed precision: `TrainConfig.precision` bf16 autocasts the forward on the CPU, losses still
see float32, training stays close to fp32; fp16 needs CUDA."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, evaluate_classifier, fit
from kdistill.engine.precision import autocast, check_precision, grad_scaler
from kdistill.errors import ConfigError
from kdistill.losses import CE, KD
from kdistill.losses.base import STUDENT, TEACHER, DistillLoss


def bands(n: int = 192) -> ArrayDataset:
    """Class c brightens rows band c of an 8×8 image over noise (linearly separable)."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(n) % 3
    inputs = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    for c, (lo, hi) in enumerate([(0, 3), (3, 6), (6, 8)]):
        inputs[targets == c, :, lo:hi, :] += 1.0
    return ArrayDataset(inputs, targets, ["a", "b", "c"], "bands")


class Net(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class DtypeProbe(DistillLoss):
    """Records the dtypes it is called with; contributes 0 to the loss."""

    needs = (STUDENT, TEACHER)

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        self.seen.update({student.dtype, teacher.dtype})
        return (student - student.detach()).sum()


def train(precision: str) -> tuple[Distiller, DtypeProbe, set[torch.dtype], float]:
    torch.manual_seed(0)
    teacher, student = Net(32), Net(16)
    probe = DtypeProbe()
    distiller = Distiller(
        teacher,
        student,
        [Term(KD(2.0), 0.5), Term(CE(), 0.5), Term(probe, weight=0.0, name="probe")],
    )
    outputs: set[torch.dtype] = set()
    hook = student.fc2.register_forward_hook(lambda m, i, o: outputs.add(o.dtype))
    data = bands()
    config = TrainConfig(epochs=3, batch_size=32, lr=1e-2, precision=precision, progress=False)
    result = fit(distiller, BatchLoader(data, batch_size=32, shuffle=True, seed=0), config)
    hook.remove()
    return distiller, probe, outputs, result.final["train_loss"]


def test_bf16_on_cpu_autocasts_the_models_and_gives_losses_float32():
    _, probe, outputs, _ = train("bf16")
    assert torch.bfloat16 in outputs  # the student's layers really ran in bf16
    assert probe.seen == {torch.float32}  # …and the losses saw float32


def test_bf16_training_stays_close_to_fp32():
    full, _, outputs, loss32 = train("fp32")
    half, _, _, loss16 = train("bf16")
    assert outputs == {torch.float32}
    # bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4 %) per op; after 18 steps the
    # weights agree to ~1 % of their largest entry (measured: ≤ 0.8 %), the epoch loss to 1 %
    pairs = list(zip(full.student.named_parameters(), half.student.parameters()))
    for (name, a), b in pairs:
        assert b.dtype == torch.float32  # master weights stay float32
        assert (a - b).abs().max() < 0.02 * a.abs().max(), name
    assert any(not torch.equal(a, b) for (_, a), b in pairs)  # bf16 did change the arithmetic
    assert loss16 == pytest.approx(loss32, rel=0.01)
    loader = BatchLoader(bands(), batch_size=64)
    acc32 = evaluate_classifier(full.student, loader)["accuracy"]
    acc16 = evaluate_classifier(half.student, loader)["accuracy"]
    assert acc32 > 0.9 and abs(acc16 - acc32) <= 0.03


def test_fp16_on_cpu_is_a_config_error():
    with pytest.raises(ValidationError, match="fp16 needs a CUDA device"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device"):
        check_precision("fp16", "cpu")
    # fit checks too (a config copied with model_copy(update=…) skips validation)
    config = TrainConfig(epochs=1, progress=False).model_copy(update={"precision": "fp16"})
    distiller = Distiller(None, Net(), [Term(CE())])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        fit(distiller, BatchLoader(bands(32), batch_size=16), config)


def test_fp32_has_no_autocast_and_a_pass_through_scaler():
    device = torch.device("cpu")
    with autocast("fp32", device):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", device):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    scaler = grad_scaler("fp32", device)
    loss = torch.tensor(3.0)
    assert not scaler.is_enabled() and scaler.scale(loss) is loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision_trains(precision):
    torch.manual_seed(0)
    distiller = Distiller(Net(32), Net(16), [Term(KD(2.0), 0.5), Term(CE(), 0.5)])
    config = TrainConfig(
        epochs=3, batch_size=32, lr=1e-2, precision=precision, device="cuda", progress=False
    )
    fit(distiller, BatchLoader(bands(), batch_size=32, shuffle=True, seed=0), config)
    accuracy = evaluate_classifier(distiller.student, BatchLoader(bands(), batch_size=64), "cuda")
    assert accuracy["accuracy"] > 0.9
