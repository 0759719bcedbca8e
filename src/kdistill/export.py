"""Export a trained student for deployment: TorchScript, and ONNX when `onnx` is installed.

Only the student is exported: connectors, loss heads and the teacher live in the `Distiller`,
never in the student, so passing a `Distiller` exports `distiller.student` alone. Every export is
loaded back (`torch.jit.load`, or an `onnxruntime` session) and its outputs compared with the
PyTorch model's on the example input and on a batch of another size; a difference above `atol`
raises `ExportError`.

    results = export_student(distiller, "out/student", example_input)
    # out/student.pt (TorchScript), out/student.onnx; results[i].max_abs_diff
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kdistill.errors import KdistillError

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


class ExportError(KdistillError, RuntimeError):
    """An export failed, or its outputs differ from the PyTorch model's."""


@dataclass
class ExportResult:
    format: str
    path: Path
    max_abs_diff: float
    size_bytes: int


def onnx_available() -> bool:
    """Whether the optional `onnx` and `onnxruntime` packages are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def _student_of(model: nn.Module) -> nn.Module:
    from kdistill.distill.distiller import Distiller

    return model.student if isinstance(model, Distiller) else model


def _check_batch(example_input: Tensor) -> Tensor:
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError(f"example_input must be a batch (N×…), got {tuple(example_input.shape)}")
    return example_input


def _other_batch(example_input: Tensor) -> Tensor:
    """A batch of a different size, to check that the batch dimension stayed dynamic."""
    size = example_input.shape[0] + 2
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, *example_input.shape[1:], generator=generator).to(example_input)


def _compare(label: str, reference: Tensor, got: Tensor, atol: float) -> float:
    if tuple(reference.shape) != tuple(got.shape):
        raise ExportError(
            f"{label}: output shape {tuple(got.shape)} differs from the PyTorch model's "
            f"{tuple(reference.shape)}"
        )
    diff = (reference.float() - got.float()).abs().max().item() if reference.numel() else 0.0
    if not diff <= atol:
        raise ExportError(
            f"{label}: outputs differ from the PyTorch model's by up to {diff:.3g} (atol {atol:g})"
        )
    return diff


def export_torchscript(model: nn.Module, path: Path, example_input: Tensor, atol: float) -> float:
    """`torch.jit.trace` → save → `torch.jit.load`; returns the largest output difference."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks are expected
        traced = torch.jit.trace(model, (example_input,), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        worst = 0.0
        for batch in (example_input, _other_batch(example_input)):
            worst = max(worst, _compare(f"{path} (TorchScript)", model(batch), loaded(batch), atol))
    return worst


def export_onnx(model: nn.Module, path: Path, example_input: Tensor, atol: float) -> float:
    """`torch.onnx.export` (TorchScript-based exporter, dynamic batch) → onnxruntime check."""
    import onnx
    import onnxruntime

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_input,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for batch in (example_input, _other_batch(example_input)):
            (got,) = session.run(None, {"input": batch.cpu().numpy()})
            worst = max(
                worst, _compare(f"{path} (ONNX)", model(batch), torch.from_numpy(got), atol)
            )
    return worst


def export_student(
    model: nn.Module,
    path: str | Path,
    example_input: Tensor,
    formats: Sequence[str] | None = None,
    atol: float = 1e-4,
) -> list[ExportResult]:
    """Export the student (of a `Distiller`, or a plain model) and verify each file.

    `path`: the file stem; `.pt` (TorchScript) and `.onnx` are appended. `formats`: default
    TorchScript, plus ONNX when `onnx` and `onnxruntime` are installed; asking for `"onnx"`
    without them raises ExportError with the install command. The model is exported in eval mode
    on CPU from a copy, so the caller's model is left as it was.
    """
    if formats is None:
        formats = ["torchscript"] + (["onnx"] if onnx_available() else [])
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    if "onnx" in formats and not onnx_available():
        raise ExportError(
            "ONNX export needs the optional packages onnx and onnxruntime: "
            "pip install 'kdistill[export]'"
        )
    student = copy.deepcopy(_student_of(model)).cpu().eval()
    example_input = _check_batch(example_input).detach().cpu()
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for fmt in formats:
        target = stem.with_name(stem.name + SUFFIX[fmt])
        try:
            if fmt == "torchscript":
                diff = export_torchscript(student, target, example_input, atol)
            else:
                diff = export_onnx(student, target, example_input, atol)
        except ExportError:
            raise
        except Exception as error:  # noqa: BLE001 - exporters raise many types
            raise ExportError(
                f"{fmt} export of {type(student).__name__} to {target} failed: {error}"
            ) from error
        results.append(ExportResult(fmt, target, diff, target.stat().st_size))
    return results
