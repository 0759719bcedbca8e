"""The rewrites behind the teacher speed-up (`kdistill.distill.teacher.speedup`), each keeping
the function the teacher computes: BatchNorm folding (the formula in `fold_into`, the pairs from
the `torch.fx` graph in `find_fold_pairs`), channels-last convolutions, another dtype; and the
helpers that compare a copy with the eager teacher (`leaves`, `drift`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
