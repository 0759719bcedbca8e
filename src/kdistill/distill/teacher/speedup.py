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

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError, TeacherSpeedupError
from kdistill.registry import close_matches

log = logging.getLogger("kdistill")

STEPS = ("fold", "channels_last", "bf16", "compile")  # the order they are applied in
FP32_TOLERANCE = 1e-4  # max |Δ| / max |eager|, fp32 paths
BF16_TOLERANCE = 2e-2  # bfloat16 keeps 8 significant bits: ~0.4 % per rounding
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
def _tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def weights_state(model: nn.Module) -> tuple:
    """What a prepared copy depends on: each parameter and buffer's identity, storage and
    in-place version (`load_state_dict`, `.to()`, an optimiser step all change it)."""
    return tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in _tensors(model))


def shallow_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model` (a step
    that changes a tensor puts a new one in the copy; the teacher's own are never touched)."""
    memo = {id(t): t for t in _tensors(model)}
    return copy.deepcopy(model, memo)


def _set_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=False))


def _fold_scale(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, y = x·scale + shift, in float64."""
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode `bn` (which reads `layer`'s output) into `layer`'s weight and bias, in
    place on `layer` (a module of the copy; new parameter tensors)."""
    scale, shift = _fold_scale(bn)
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        view = (-1, 1)
    elif getattr(layer, "transposed", False):  # ConvTranspose: out channels are dim 1
        raise ValueError("transposed convolutions are not folded")
    else:
        view = (-1,) + (1,) * (weight.dim() - 1)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(shift)
    new_weight = (weight.double() * scale.view(view)).to(weight.dtype)
    new_bias = (bias * scale + shift).to(weight.dtype)
    _set_parameter(layer, "weight", new_weight)
    _set_parameter(layer, "bias", new_bias)


def find_fold_pairs(
    model: nn.Module, keep: Iterable[str], linear_ranks: Mapping[str, int] | None = None
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(pairs, kept): the (layer, BatchNorm) names that `fold_into` may fold, from the fx
    graph, and the BatchNorms left out with the reason.

    A pair qualifies when the BatchNorm (eval mode, running statistics) reads the output of a
    Conv1d/2d/3d or of a Linear whose output is 2-D (N×D: BatchNorm1d then normalises the
    linear's features; `linear_ranks` gives the rank each linear produced on a batch), that
    output has no other reader, each module is called once, and neither is in `keep` (tapped
    layers, whose outputs must stay what they are). Raises the tracer's error when fx cannot
    trace `model`.
    """
    keep = set(keep)
    modules = dict(model.named_modules())
    graph = torch.fx.symbolic_trace(model).graph
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: list[tuple[str, str]] = []
    kept: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        bn_name, bn = node.target, modules[node.target]
        source = node.args[0] if node.args else None
        layer_name = (
            getattr(source, "target", None) if getattr(source, "op", "") == "call_module" else None
        )
        layer = modules.get(layer_name) if layer_name is not None else None
        reason = None
        if bn.running_mean is None or not bn.track_running_stats:
            reason = "no running statistics"
        elif not isinstance(layer, (*_CONVS, nn.Linear)):
            reason = "does not follow a convolution or linear layer"
        elif isinstance(layer, nn.Linear) and (linear_ranks or {}).get(layer_name) != 2:
            reason = f"follows {layer_name}, whose output is not N×D"
        elif len(source.users) != 1:
            reason = f"{layer_name}'s output has other readers"
        elif calls.get(bn_name, 0) != 1 or calls.get(layer_name, 0) != 1:
            reason = "a module called more than once"
        elif bn_name in keep:
            reason = "tapped"
        elif layer_name in keep:
            reason = f"{layer_name} is tapped"
        if reason is None:
            pairs.append((layer_name, bn_name))
        else:
            kept[bn_name] = reason
    return pairs, kept


def fold_batchnorms(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
    """Fold each (layer, BatchNorm) pair of `model` (a copy): new layer weights, the
    BatchNorm replaced by `nn.Identity`."""
    for layer_name, bn_name in pairs:
        fold_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
        model.set_submodule(bn_name, nn.Identity())


def to_channels_last(model: nn.Module) -> int:
    """The 2-D convolutions' weights of `model` (a copy) in channels-last order (new tensors);
    returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            weight = module.weight.detach().contiguous(memory_format=torch.channels_last)
            _set_parameter(module, "weight", weight)
            count += 1
    return count


def to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer of `model` (a copy) as `dtype` (new tensors)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point():
                _set_parameter(module, name, param.detach().to(dtype))
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`fn` applied to every tensor of a (nested) model output: tensor, mapping, list, tuple,
    namedtuple."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        mapped = {key: map_tensors(item, fn) for key, item in value.items()}
        try:
            return type(value)(mapped)
        except TypeError:
            return mapped
    if isinstance(value, list | tuple):
        items = [map_tensors(item, fn) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def leaves(value: Any, prefix: str = "output") -> dict[str, Tensor]:
    """The tensors of a (nested) output by a readable path: ``output``, ``output['seg']``,
    ``output[0]``."""
    if isinstance(value, Tensor):
        return {prefix: value}
    found: dict[str, Tensor] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            found.update(leaves(item, f"{prefix}[{key!r}]"))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found.update(leaves(item, f"{prefix}[{i}]"))
    return found


def input_shapes(inputs: Any) -> tuple:
    """The shapes and dtypes of the tensors of a batch's inputs (what a compiled graph is
    specialised to)."""
    return tuple(
        (name, tuple(value.shape), value.dtype) for name, value in leaves(inputs, "").items()
    )


def drift(reference: Tensor, value: Tensor) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |reference|) of two tensors of one shape; non-finite entries
    count as equal only where both are the same non-finite value."""
    if reference.shape != value.shape:
        return math.inf, math.inf
    ref = reference.detach().double()
    val = value.detach().double()
    same = (ref == val) | (ref.isnan() & val.isnan())
    delta = torch.where(same, torch.zeros_like(ref), (ref - val).abs())
    delta = torch.nan_to_num(delta, nan=math.inf)
    biggest = float(delta.max()) if delta.numel() else 0.0
    finite = ref[ref.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    if biggest == 0.0:
        return 0.0, 0.0
    return biggest, biggest / scale if scale > 0 else math.inf


class _ChannelsLastInput(nn.Module):
    """Hands a 4-D tensor input to the model in channels-last memory order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        args = tuple(
            a.contiguous(memory_format=torch.channels_last)
            if isinstance(a, Tensor) and a.dim() == 4
            else a
            for a in args
        )
        return self.model(*args, **kwargs)


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
        from kdistill.data.batches import call_model
        from kdistill.distill.taps import Taps

        started = time.perf_counter()
        device = next((t.device for t in _tensors(teacher)), torch.device("cpu"))
        steps = resolve_steps(tuple(steps), device)
        report = SpeedupReport()

        # the eager teacher, with the tapped layers and each linear layer's output rank
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
        expected = {
            **leaves(reference),
            **{f"layer {name!r}": value for name, value in reference_features.items()},
        }

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
            if not any(isinstance(m, _BATCHNORMS) for m in model.modules()):
                report.skipped["fold"] = "no BatchNorm layers"
            else:
                try:
                    pairs, report.kept = find_fold_pairs(teacher, layers, ranks)
                except Exception as error:  # fx cannot trace data-dependent control flow
                    report.skipped["fold"] = f"torch.fx cannot trace it ({_compile_reason(error)})"
                    _log_once(f"{label}: BatchNorm folding skipped: {report.skipped['fold']}")
                else:
                    if pairs:
                        fold_batchnorms(model, pairs)
                        report.folded = pairs
                    else:
                        report.skipped["fold"] = "no foldable conv/linear → BatchNorm pair"
        taps = Taps(model, layers, label) if layers else None
        runner = _Runner(model)
        tolerance = FP32_TOLERANCE
        applied: list[str] = []

        def measure(step: str, call: Callable) -> None:
            if taps is not None:
                taps.attach()
                taps.clear()
            with torch.inference_mode():
                output = call_model(call, inputs)
                features = taps.collect() if taps is not None else {}
            got = {
                **leaves(output),
                **{f"layer {name!r}": value for name, value in features.items()},
            }
            worst = (0.0, 0.0, "")
            for name, value in expected.items():
                if name not in got:
                    raise TeacherSpeedupError(
                        f"{label} speed-up {step!r}: the {name} is missing from the sped-up "
                        "teacher's results; set teacher_speedup to 'off'"
                    )
                absolute, relative = drift(value, got[name].to(value.dtype))
                if relative > worst[1] or (relative == worst[1] and absolute > worst[0]):
                    worst = (absolute, relative, name)
            report.drift[step] = worst[1]
            if not worst[1] <= tolerance:
                kept = [s for s in applied if s != step]
                raise TeacherSpeedupError(
                    f"{label} speed-up {step!r} changes the teacher's {worst[2]} by max |Δ| "
                    f"{worst[0]:.3g} (relative to its largest value: {worst[1]:.3g}), above the "
                    f"tolerance {tolerance:g}, on the first batch; leave {step!r} out of "
                    f"teacher_speedup (e.g. {kept or 'off'})"
                )
            report.max_abs_diff, report.max_rel_diff, report.worst = worst

        if report.folded:
            applied.append("fold")
            measure("fold", runner)
        if "channels_last" in steps:
            four_d = any(t.dim() == 4 for t in leaves(inputs, "input").values())
            if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
                report.skipped["channels_last"] = "no 2-D convolutions"
            elif not four_d:
                report.skipped["channels_last"] = "the input is not an N×C×H×W tensor"
            else:
                to_channels_last(model)
                runner.channels_last = True
                applied.append("channels_last")
                measure("channels_last", runner)
        if "bf16" in steps:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            if dtype is None:
                report.skipped["bf16"] = "no floating-point parameters"
            else:
                to_dtype(model, torch.bfloat16)
                runner.dtype, runner.out_dtype = torch.bfloat16, dtype
                tolerance = report.tolerance = BF16_TOLERANCE
                applied.append("bf16")
                measure("bf16", runner)
        call: nn.Module = runner
        if "compile" in steps:
            # one static graph for the batch shape of the first batch; other shapes (a last,
            # smaller batch) run the same copy uncompiled rather than waiting for a recompile
            compiled = torch.compile(runner, dynamic=False)
            try:
                applied.append("compile")
                measure("compile", compiled)
                call = compiled
            except TeacherSpeedupError:
                raise
            except Exception as error:  # no C compiler, an unsupported op, …
                applied.remove("compile")
                report.drift.pop("compile", None)
                report.skipped["compile"] = f"torch.compile failed: {_compile_reason(error)}"
                _log_once(
                    f"{label}: torch.compile is not used, the teacher runs eagerly: "
                    f"{report.skipped['compile']}"
                )
        report.steps = tuple(applied)
        report.seconds = time.perf_counter() - started
        log.info("%s: %s", label, report.describe())
        if not applied:  # nothing applies to this teacher: it runs as it is
            if taps is not None:
                taps.close()
            return cls(teacher, None, None, report), reference, reference_features
        fast = cls(teacher, call, taps, report)
        fast.out_dtype = runner.out_dtype
        if call is not runner:
            fast.uncompiled, fast.compiled_for = runner, input_shapes(inputs)
        return fast, reference, reference_features
