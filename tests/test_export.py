"""Student export: TorchScript and ONNX files load back and give the PyTorch model's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdistill as kd
from kdistill import export as export_module
from kdistill import losses as L
from kdistill.compress import quantize_static
from kdistill.export import ExportError, export_student
from kdistill.models import create_model


@pytest.fixture
def student():
    torch.manual_seed(0)
    return create_model("middle_student").eval()


def test_torchscript_export_loads_back_and_matches(tmp_path, student):
    example = torch.randn(4, 1, 28, 28)
    (result,) = export_student(student, tmp_path / "student", example, formats=["torchscript"])
    assert result.path == tmp_path / "student.pt" and result.size_bytes > 0
    assert result.max_abs_diff <= 1e-5
    loaded = torch.jit.load(str(result.path))
    x = torch.randn(7, 1, 28, 28)  # another batch size, checked here independently
    torch.testing.assert_close(loaded(x), student(x), rtol=1e-5, atol=1e-5)


def test_a_distiller_exports_its_student_without_connectors(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("middle_student", channels=(8, 16)).eval()
    student = create_model("middle_student", channels=(4, 8))
    distiller = kd.Distiller(
        teacher, student, [kd.Term(L.FitNet(), student="conv2", teacher="conv2")]
    )
    x = torch.randn(4, 1, 28, 28)
    distiller(x, target=torch.zeros(4, dtype=torch.long))  # builds the 1×1 connector
    assert len(list(distiller.connectors.parameters())) > 0
    (result,) = export_student(distiller, tmp_path / "s", x, formats=["torchscript"])
    loaded = torch.jit.load(str(result.path))
    assert set(loaded.state_dict()) == set(student.state_dict())  # no connector, no teacher
    student.eval()
    torch.testing.assert_close(loaded(x), student(x))


def test_onnx_export_matches_under_onnxruntime(tmp_path, student):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    example = torch.randn(4, 1, 28, 28)
    results = export_student(student, tmp_path / "student", example)
    assert [r.format for r in results] == ["torchscript", "onnx"]
    onnx_result = results[1]
    assert onnx_result.path.suffix == ".onnx" and onnx_result.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(onnx_result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(9, 1, 28, 28)  # the batch dimension is dynamic
    (got,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), student(x), rtol=1e-4, atol=1e-4)


def test_int8_model_exports_to_torchscript(tmp_path, student):
    calibration = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    int8 = quantize_static(student, calibration, calibration[0][:1])
    (result,) = export_student(int8, tmp_path / "q", calibration[0], formats=["torchscript"])
    assert result.max_abs_diff <= 1e-4


class BranchesOnData(nn.Module):
    """Tracing records one branch; inputs that take the other branch expose the difference."""

    def forward(self, x):
        return x * 2 if x.min() > 0 else x * 3


def test_an_export_that_changes_the_outputs_is_refused(tmp_path):
    with pytest.raises(ExportError, match="outputs differ from the PyTorch model's"):
        export_student(BranchesOnData(), tmp_path / "b", torch.ones(2, 3), formats=["torchscript"])


def test_onnx_without_the_optional_packages_names_the_extra(tmp_path, student, monkeypatch):
    monkeypatch.setattr(export_module, "onnx_available", lambda: False)
    with pytest.raises(ExportError, match=r"kdistill\[export\]"):
        export_student(student, tmp_path / "s", torch.randn(1, 1, 28, 28), formats=["onnx"])
    results = export_student(student, tmp_path / "s", torch.randn(1, 1, 28, 28))
    assert [r.format for r in results] == ["torchscript"]  # the default skips ONNX
    with pytest.raises(ExportError, match="unknown export format"):
        export_student(student, tmp_path / "s", torch.randn(1, 1, 28, 28), formats=["tflite"])
