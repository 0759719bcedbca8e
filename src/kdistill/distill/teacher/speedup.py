"""A faster frozen teacher: the same function, computed in fewer or cheaper operations.

A teacher that never trains is a fixed function of its inputs, so it may be rewritten as long
as what it computes does not change. `Distiller(..., teacher_speedup=...)` (recipe field
``distill.teacher_speedup``) takes a list of these steps, applied in this order to a **copy**
of the teacher (the user's module is never changed, the student never touched):

- ``fold``: every BatchNorm that directly follows a convolution or a linear layer (and is that
  layer's only reader) is folded into it: ``W' = W·γ/√(σ²+ε)``, ``b' = (b − μ)·γ/√(σ²+ε) + β``
  (computed in float64), and the BatchNorm becomes an identity. Exact up to float rounding.
  The pairs are found on the `torch.fx` graph of the teacher; a teacher fx cannot trace is
  left unfolded (the reason is logged).
- ``channels_last``: the 2-D convolutions' weights and a 4-D input in NHWC memory order, which
  oneDNN's CPU convolutions (and cuDNN's tensor-core ones) run faster. Same values.
- ``bf16``: parameters and the input in bfloat16, the outputs cast back. Fast only where the
  hardware has bf16 matrix units (CPUs with AMX, GPUs with tensor cores); elsewhere slower.
  Not exact: its drift is measured and held to `BF16_TOLERANCE`.
- ``compile``: `torch.compile` (inductor) of the teacher's forward. When the compiler is
  missing or fails, the teacher runs without it and the reason is logged once.

``"auto"`` = ``fold`` + ``channels_last`` (+ ``bf16`` where `fast_bf16(device)`), the steps
that cost nothing to prepare; ``"off"`` (or None, or an empty list) runs the teacher as it is.

**Checked, never assumed.** On the first batch the teacher runs both ways: the eager teacher,
then the copy after each step; every output tensor and every tapped layer is compared, as
``max |Δ| / max |eager|`` over each tensor. A step whose figure exceeds the tolerance (1e-4 on
fp32 paths, `BF16_TOLERANCE` once bf16 is on) is refused: `TeacherSpeedupError` names the
step, the layer or output, the figure and the fix. The figures are logged and kept in
`SpeedupReport` (`Distiller.teacher_speedup_report`).

**Taps see what the user asked for.** A tapped layer is never folded away: a tapped BatchNorm,
or a tapped convolution whose output a fold would change, stays as it is (so its tap is exact
to the bit); layers around it are still folded. Tapping a ReLU after a folded conv-BN pair is
exact too: the ReLU's input is the folded pair's output. Under ``compile`` the taps' copies are
outputs of the compiled graph (the values of the layers, checked like the outputs).

**Stale copies are rebuilt.** The copy is made again (and checked again) on the next forward
when any of the teacher's parameters or buffers changed since (in place, e.g. by
`load_state_dict`, or moved by `.to()`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.distill.teacher.rewrite import (
    _BATCHNORMS,
    _tensors,
    drift,
    find_fold_pairs,
    fold_batchnorms,
    fold_into,
    input_shapes,
    leaves,
    map_tensors,
    shallow_copy,
    to_channels_last,
    to_dtype,
    weights_state,
)
from kdistill.errors import ConfigError, TeacherSpeedupError
from kdistill.registry import close_matches

log = logging.getLogger("kdistill")

__all__ = [  # the rewrites are re-exported from `rewrite`: tests and callers import them here
    "BF16_TOLERANCE",
    "FP32_TOLERANCE",
    "STEPS",
    "FastTeacher",
    "SpeedupReport",
    "cpu_has_amx",
    "fast_bf16",
    "find_fold_pairs",
    "fold_batchnorms",
    "fold_into",
    "parse_speedup",
    "resolve_steps",
    "shallow_copy",
    "to_channels_last",
]

STEPS = ("fold", "channels_last", "bf16", "compile")  # the order they are applied in
FP32_TOLERANCE = 1e-4  # max |Δ| / max |eager|, fp32 paths
BF16_TOLERANCE = 2e-2  # bfloat16 keeps 8 significant bits: ~0.4 % per rounding


def parse_speedup(value: str | Sequence[str] | None, field_name: str = "teacher_speedup") -> tuple:
    """The steps asked for, in application order; ``("auto",)`` stays symbolic (resolved on
    the device, see `resolve_steps`). Accepts None / ``"off"`` / ``[]`` (no steps), a step
    name, ``"auto"``, a comma- or ``+``-separated string, or a list of names."""
    if value is None or value is False:
        return ()
    names = value.replace("+", ",").split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if names in ([], ["off"], ["none"]):
        return ()
    if names == ["auto"]:
        return ("auto",)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        hints = [m for n in unknown for m in close_matches(n, list(STEPS), n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(
            f"{field_name}: unknown step(s) {unknown}{hint}; use 'off', 'auto' or a list of "
            f"{list(STEPS)}"
        )
    return tuple(step for step in STEPS if step in names)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Intel Sapphire Rapids and later): the only CPUs on
    which a bf16 teacher is faster than fp32 (AVX2 and AVX-512 machines emulate bf16 matmuls)."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if "AMX" in str(capability).upper():
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line for line in text.splitlines())


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are faster than fp32 on `device`: a CUDA GPU with bf16
    tensor cores (compute capability ≥ 8.0), or a CPU with AMX."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_has_amx()
    return False


def resolve_steps(steps: tuple, device: torch.device) -> tuple[str, ...]:
    """`steps` with ``auto`` replaced by fold + channels_last (+ bf16 where `fast_bf16`)."""
    if steps != ("auto",):
        return tuple(steps)
    return ("fold", "channels_last") + (("bf16",) if fast_bf16(device) else ())


@dataclass
class SpeedupReport:
    """What a speed-up did and what it changed, measured on the first batch.

    `steps`: the steps in use; `skipped`: step → why it is not in use; `folded`: (layer,
    BatchNorm) pairs folded; `kept`: BatchNorms left as they are, with the reason; `drift`:
    step → worst ``max |Δ| / max |eager|`` over the outputs and taps after that step (cumulative);
    `max_abs_diff`, `max_rel_diff`: the same for the final teacher, and `worst`: the tensor it
    was on; `tolerance`: the limit it was held to; `seconds`: preparation time (compilation
    included) on the first batch.
    """

    steps: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    worst: str = ""
    tolerance: float = FP32_TOLERANCE
    seconds: float = 0.0

    def describe(self) -> str:
        steps = "+".join(self.steps) if self.steps else "none"
        text = (
            f"teacher speed-up {steps}: max |Δ| {self.max_abs_diff:.3g} (relative "
            f"{self.max_rel_diff:.3g}, tolerance {self.tolerance:g}) against the eager teacher "
            f"on the first batch; prepared in {self.seconds:.1f} s"
        )
        if self.folded:
            text += f"; {len(self.folded)} BatchNorms folded"
        if self.kept:
            text += (
                f", {len(self.kept)} kept ({'; '.join(f'{k}: {v}' for k, v in self.kept.items())})"
            )
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return text


# -- the copy --------------------------------------------------------------------------------------
def _compile_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = next((line for line in text if line.strip()), type(error).__name__)
    return f"{type(error).__name__}: {first[:200]}"


class _Runner(nn.Module):
    """What the distiller calls: the copy, with its input in channels-last order and/or cast to
    the copy's dtype, and floating outputs cast back to the teacher's dtype."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.channels_last = False
        self.dtype: torch.dtype | None = None  # the copy's, when it differs from the teacher's
        self.out_dtype: torch.dtype | None = None

    def _input(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if self.dtype is not None and value.is_floating_point():
            value = value.to(self.dtype)
        if self.channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        return value

    def forward(self, *args, **kwargs):
        args = tuple(self._input(a) for a in args)
        kwargs = {key: self._input(value) for key, value in kwargs.items()}
        output = self.model(*args, **kwargs)
        if self.dtype is not None and self.out_dtype is not None:
            out_dtype = self.out_dtype
            output = map_tensors(output, lambda t: t.to(out_dtype) if t.is_floating_point() else t)
        return output


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


def _normal(value: Any) -> Any:
    """Inference-mode tensors (a compiled graph's outputs under `torch.inference_mode`) copied
    into normal ones, which autograd may save; others unchanged."""
    return map_tensors(value, lambda t: t.clone() if t.is_inference() else t)


class FastTeacher:
    """A teacher's prepared copy (`prepare`): call it like the teacher, under inference mode;
    `features()` gives the tapped layers of the last call; `report` what was done and measured.
    """

    def __init__(self, teacher: nn.Module, runner: nn.Module | None, taps, report: SpeedupReport):
        self.runner = runner  # None: the teacher runs as it is (nothing could be applied)
        self.out_dtype: torch.dtype | None = None
        self.uncompiled: nn.Module | None = None  # under compile: for other input shapes
        self.compiled_for: tuple = ()
        self.taps = taps
        self.report = report
        self._teacher = teacher
        self._state = weights_state(teacher)

    def stale(self) -> bool:
        """Whether the teacher's weights changed (or moved) since the copy was made."""
        return weights_state(self._teacher) != self._state

    def __call__(self, inputs: Any) -> tuple[Any, dict[str, Tensor]]:
        """(output, tapped features), computed by the copy; call it under inference mode, then
        pass both through `normal` outside it."""
        from kdistill.data.batches import call_model

        if self.taps is not None:
            self.taps.attach()
            self.taps.clear()
        runner = self.runner
        if self.uncompiled is not None and input_shapes(inputs) != self.compiled_for:
            runner = self.uncompiled
        output = call_model(runner, inputs)
        features = self.taps.collect() if self.taps is not None else {}
        if self.report.steps and "bf16" in self.report.steps:
            dtype = next((v.dtype for v in leaves(output).values() if v.is_floating_point()), None)
            if dtype is not None:
                features = {
                    k: v.to(dtype) if v.is_floating_point() else v for k, v in features.items()
                }
        return output, features

    @staticmethod
    def normal(value: Any) -> Any:
        return _normal(value)

    def detach(self) -> None:
        if self.taps is not None:
            self.taps.detach()

    @classmethod
    def prepare(
        cls,
        teacher: nn.Module,
        steps: tuple,
        layers: Sequence[str],
        inputs: Any,
        label: str = "teacher",
    ) -> tuple[FastTeacher, Any, dict[str, Tensor]]:
        """Make the copy of eval-mode `teacher` with `steps` and check it on `inputs` (see the
        module docstring). Returns (fast teacher, the eager teacher's output, its tapped
        `layers`) — the eager values, for the batch they were measured on.

        Raises TeacherSpeedupError when a step changes an output or a tapped layer beyond its
        tolerance (nothing is kept then).
        """
        from kdistill.distill.taps import Taps

        started = time.perf_counter()
        device = next((t.device for t in _tensors(teacher)), torch.device("cpu"))
        steps = resolve_steps(tuple(steps), device)
        report = SpeedupReport()
        reference, reference_features, ranks = _eager_reference(teacher, layers, inputs, label)
        try:
            model = shallow_copy(teacher).eval()
        except Exception as error:  # a module that cannot be copied (an open file, a lock)
            report.skipped = {
                step: f"the teacher cannot be copied ({_compile_reason(error)})" for step in steps
            }
            _log_once(
                f"{label}: teacher speed-up not applied: {report.skipped[steps[0]]}"
                if steps
                else ""
            )
            return cls(teacher, teacher, None, report), reference, reference_features
        if "fold" in steps:
            _fold(model, teacher, layers, ranks, report, label)
        taps = Taps(model, layers, label) if layers else None
        runner = _Runner(model)
        check = _Check(reference, reference_features, taps, inputs, report, label)
        if report.folded:
            check("fold", runner)
        if "channels_last" in steps:
            _channels_last(model, runner, inputs, report, check)
        if "bf16" in steps:
            _bf16(model, runner, report, check)
        call = _compile(runner, report, check, label) if "compile" in steps else runner
        report.steps = tuple(check.applied)
        report.seconds = time.perf_counter() - started
        log.info("%s: %s", label, report.describe())
        if not check.applied:  # nothing applies to this teacher: it runs as it is
            if taps is not None:
                taps.close()
            return cls(teacher, None, None, report), reference, reference_features
        fast = cls(teacher, call, taps, report)
        fast.out_dtype = runner.out_dtype
        if call is not runner:
            fast.uncompiled, fast.compiled_for = runner, input_shapes(inputs)
        return fast, reference, reference_features


def _eager_reference(teacher: nn.Module, layers: Sequence[str], inputs: Any, label: str):
    """(output, {layer: features}, {linear layer: its output's rank}) of the eager teacher on
    `inputs`: the values every step is checked against, and what folding needs to know."""
    from kdistill.data.batches import call_model
    from kdistill.distill.taps import Taps

    ranks: dict[str, int] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, i, o, name=name: ranks.__setitem__(name, getattr(o, "ndim", -1))
        )
        for name, module in teacher.named_modules()
        if isinstance(module, nn.Linear)
    ]
    reference_taps = Taps(teacher, layers, label) if layers else None
    try:
        with torch.inference_mode():
            reference = call_model(teacher, inputs)
            reference_features = reference_taps.collect() if reference_taps else {}
    finally:
        for hook in hooks:
            hook.remove()
        if reference_taps is not None:
            reference_taps.close()
    return reference, reference_features, ranks


def _fold(model, teacher, layers, ranks, report: SpeedupReport, label: str) -> None:
    """Fold the BatchNorms of `model` (the copy) into the layers before them, where `teacher`'s
    graph allows (`find_fold_pairs`); the report says what was folded or why not."""
    if not any(isinstance(m, _BATCHNORMS) for m in model.modules()):
        report.skipped["fold"] = "no BatchNorm layers"
        return
    try:
        pairs, report.kept = find_fold_pairs(teacher, layers, ranks)
    except Exception as error:  # fx cannot trace data-dependent control flow
        report.skipped["fold"] = f"torch.fx cannot trace it ({_compile_reason(error)})"
        _log_once(f"{label}: BatchNorm folding skipped: {report.skipped['fold']}")
        return
    if pairs:
        fold_batchnorms(model, pairs)
        report.folded = pairs
    else:
        report.skipped["fold"] = "no foldable conv/linear → BatchNorm pair"


class _Check:
    """Measures each step on the first batch against the eager teacher (outputs and tapped
    layers) and raises TeacherSpeedupError when the worst drift exceeds the tolerance (fp32's,
    bf16's once bf16 is applied); `applied` lists the steps measured so far."""

    def __init__(self, reference, reference_features, taps, inputs, report, label: str):
        self.expected = {
            **leaves(reference),
            **{f"layer {name!r}": value for name, value in reference_features.items()},
        }
        self.taps, self.inputs, self.report, self.label = taps, inputs, report, label
        self.tolerance = FP32_TOLERANCE
        self.applied: list[str] = []

    def __call__(self, step: str, call: Callable) -> None:
        from kdistill.data.batches import call_model

        self.applied.append(step)
        taps, report, label = self.taps, self.report, self.label
        if taps is not None:
            taps.attach()
            taps.clear()
        with torch.inference_mode():
            output = call_model(call, self.inputs)
            features = taps.collect() if taps is not None else {}
        got = {
            **leaves(output),
            **{f"layer {name!r}": value for name, value in features.items()},
        }
        worst = (0.0, 0.0, "")
        for name, value in self.expected.items():
            if name not in got:
                raise TeacherSpeedupError(
                    f"{label} speed-up {step!r}: the {name} is missing from the sped-up "
                    "teacher's results; set teacher_speedup to 'off'"
                )
            absolute, relative = drift(value, got[name].to(value.dtype))
            if relative > worst[1] or (relative == worst[1] and absolute > worst[0]):
                worst = (absolute, relative, name)
        report.drift[step] = worst[1]
        if not worst[1] <= self.tolerance:
            kept = [s for s in self.applied if s != step]
            raise TeacherSpeedupError(
                f"{label} speed-up {step!r} changes the teacher's {worst[2]} by max |Δ| "
                f"{worst[0]:.3g} (relative to its largest value: {worst[1]:.3g}), above the "
                f"tolerance {self.tolerance:g}, on the first batch; leave {step!r} out of "
                f"teacher_speedup (e.g. {kept or 'off'})"
            )
        report.max_abs_diff, report.max_rel_diff, report.worst = worst


def _channels_last(model, runner: _Runner, inputs: Any, report: SpeedupReport, check) -> None:
    """Channels-last convolutions, for a model with 2-D convolutions fed ``N×C×H×W`` inputs."""
    four_d = any(t.dim() == 4 for t in leaves(inputs, "input").values())
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        report.skipped["channels_last"] = "no 2-D convolutions"
    elif not four_d:
        report.skipped["channels_last"] = "the input is not an N×C×H×W tensor"
    else:
        to_channels_last(model)
        runner.channels_last = True
        check("channels_last", runner)


def _bf16(model, runner: _Runner, report: SpeedupReport, check: _Check) -> None:
    """bfloat16 weights and activations, outputs cast back to the teacher's dtype; checked at
    the bf16 tolerance from here on."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        report.skipped["bf16"] = "no floating-point parameters"
        return
    to_dtype(model, torch.bfloat16)
    runner.dtype, runner.out_dtype = torch.bfloat16, dtype
    check.tolerance = report.tolerance = BF16_TOLERANCE
    check("bf16", runner)


def _compile(runner: _Runner, report: SpeedupReport, check: _Check, label: str) -> nn.Module:
    """`torch.compile` of the runner, checked; the runner itself when compiling fails."""
    # one static graph for the batch shape of the first batch; other shapes (a last,
    # smaller batch) run the same copy uncompiled rather than waiting for a recompile
    compiled = torch.compile(runner, dynamic=False)
    try:
        check("compile", compiled)
        return compiled
    except TeacherSpeedupError:
        raise
    except Exception as error:  # no C compiler, an unsupported op, …
        check.applied.remove("compile")
        report.drift.pop("compile", None)
        report.skipped["compile"] = f"torch.compile failed: {_compile_reason(error)}"
        _log_once(
            f"{label}: torch.compile is not used, the teacher runs eagerly: "
            f"{report.skipped['compile']}"
        )
        return runner
