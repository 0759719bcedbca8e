"""Issue 14 item 9: where PyTorch would raise a raw error, kdistill says what was wrong and how
to fix it in one line — models whose dtype is not the inputs', a CUDA device that is not there,
and `kdistill layers … | head` (no BrokenPipeError traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kdistill.data import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.engine.distributed import resolve_device
from kdistill.errors import ConfigError
from kdistill.losses import CE, KD, FitNet

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


# -- (a) a teacher or student whose parameters are not the inputs' dtype ------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_teacher_of_another_dtype_gets_the_inputs_cast_to_its_dtype(dtype):
    """The teacher sees `x.to(its dtype)`, exactly what its own forward on cast inputs gives."""
    torch.manual_seed(0)
    teacher, student = Net(6).to(dtype), Net(4)
    distiller = Distiller(
        teacher, student, [Term(KD()), Term(FitNet(), student="conv", teacher="conv")]
    )
    x = torch.randn(5, 1, 4, 4)
    out = distiller(x)  # was: RuntimeError "Input type (float) and bias type (double) …"
    with torch.no_grad():
        expected = teacher(x.to(dtype))
    assert out.teacher_output.dtype == dtype
    torch.testing.assert_close(out.teacher_output, expected, rtol=0, atol=0)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert student.conv.weight.grad is not None


def test_integer_inputs_are_not_cast_for_the_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    student = nn.Sequential(nn.Embedding(10, 2), nn.Flatten(), nn.Linear(6, 3))
    tokens = torch.randint(0, 10, (2, 3))
    out = Distiller(teacher, student, [Term(KD())])(tokens)
    with torch.no_grad():
        torch.testing.assert_close(out.teacher_output, teacher(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_student_of_another_dtype_fails_with_a_one_line_fix(dtype):
    distiller = Distiller(Net(6), Net(4).to(dtype), [Term(KD()), Term(CE())])
    name = str(dtype)
    message = (
        rf"^the student \(Net\) has {name} parameters but the inputs are torch.float32: cast one "
        rf"to the other \(student.to\(torch.float32\), or pass inputs.to\({name}\)\)$"
    )
    with pytest.raises(TypeError, match=message):
        distiller(torch.randn(2, 1, 4, 4), target=torch.tensor([0, 1]))


def test_other_student_errors_pass_through_unchanged():
    distiller = Distiller(None, Net(4), [Term(CE())])
    with pytest.raises(RuntimeError, match="channels"):
        distiller(torch.randn(2, 3, 4, 4), target=torch.tensor([0, 1]))  # 3 channels, not 1


# -- (b) train.device: cuda on a machine without CUDA -------------------------------------------
def test_cuda_device_without_cuda_names_the_field_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError,
        match=r"^train.device is 'cuda', but torch finds no CUDA "
        r"device.*set train.device: cpu \(on the command line: "
        r"--set train.device=cpu\)$",
    ):
        resolve_device("cuda")
    distiller = Distiller(None, Net(4), [Term(CE())])
    data = ArrayDataset(torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64), list("abc"))
    config = TrainConfig(epochs=1, device="cuda:0", progress=False)
    with pytest.raises(ConfigError, match="train.device is 'cuda:0'"):
        fit(distiller, BatchLoader(data, batch_size=2), config)


def test_cuda_index_beyond_the_devices_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        ConfigError,
        match=r"'cuda:2', but this machine has 2 CUDA device\(s\), "
        r"cuda:0 to cuda:1",
    ):
        resolve_device("cuda:2")


def test_unknown_device_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^train.device: 'gpu' is not a device name torch"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


# -- (c) `kdistill layers … | head`: no BrokenPipeError traceback -------------------------------
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


LAYERS = [sys.executable, "-m", "kdistill", "layers", "mini_student", "--input", "1,28,28"]


def test_layers_into_a_closed_pipe_exits_quietly():
    """The reader is gone before the first write (deterministic): exit status 141, as a Unix
    tool killed by SIGPIPE, and nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            LAYERS, stdout=write_end, stderr=subprocess.PIPE, text=True, env=cli_env(), timeout=120
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141


def test_layers_piped_into_head_prints_no_traceback():
    command = " ".join(LAYERS) + " | head -n 1"
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert done.stdout.startswith("## mini_student")
    assert done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    assert done.returncode in (0, 141)  # 141 when the pipe closed before the last write
