"""Pruning: unstructured magnitude pruning, and channel pruning that builds a smaller dense model.

**Magnitude pruning** (Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks") zeroes the fraction `amount` of weights with the smallest |w|, either over all
pruned layers together (`scope="global"`) or in each layer separately (`scope="layer"`).
`magnitude_masks` computes the masks; `apply_masks(model, masks, permanent=True)` multiplies
them in for good, while `permanent=False` keeps them attached during training
(`torch.nn.utils.prune` re-applies a mask on every forward, so fine-tuning cannot revive a zeroed
weight) until `make_permanent(model)`.

**Channel pruning** (Li et al. 2017, "Pruning Filters for Efficient ConvNets") removes the output
channels of a layer whose weights have the smallest L1 norm ‖W[c]‖₁, and with them the matching
input channels of the layers that consume them and the channels of the BatchNorm in between.
The result is an ordinary dense model with smaller layers, not a mask. Which layers feed which is
described by `ChannelGroup`s; `channel_groups(model)` knows the registry's `classic_teacher`,
`middle_student` and the CIFAR-ResNets (conv1 → bn1 → conv2 inside each BasicBlock, the only
convs whose outputs do not reach a residual sum). Pass your own groups for other models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from kdistill.models.classic import ClassicTeacher, MiddleStudent
from kdistill.models.resnet import BasicBlock, ResNet

PRUNABLE = (nn.Conv2d, nn.Linear)


# -- magnitude pruning ---------------------------------------------------------------------------
def prunable_weights(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Name → weight of the conv and linear layers (all of them, or those named in `layers`)."""
    modules = dict(model.named_modules())
    if layers is None:
        names = [name for name, module in modules.items() if isinstance(module, PRUNABLE)]
    else:
        names = list(layers)
        for name in names:
            if name not in modules or not isinstance(modules[name], PRUNABLE):
                raise ValueError(
                    f"cannot magnitude-prune {name!r}: not a Conv2d/Linear layer of "
                    f"{type(model).__name__}"
                )
    return {name: modules[name].weight for name in names}


def _smallest_mask(values: Tensor, amount: float) -> Tensor:
    """A 0/1 mask of `values`' shape zeroing exactly round(amount·n) smallest |values|."""
    flat = values.detach().abs().reshape(-1)
    k = round(amount * flat.numel())
    mask = torch.ones_like(flat)
    if k > 0:
        order = torch.argsort(flat, stable=True)  # ties: the earlier element goes first
        mask[order[:k]] = 0
    return mask.reshape(values.shape)


def magnitude_masks(
    model: nn.Module,
    amount: float,
    scope: str = "global",
    layers: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Masks zeroing the `amount` fraction of smallest-|w| weights, globally or per layer."""
    if not 0 <= amount < 1:
        raise ValueError(f"amount must lie in [0, 1), got {amount}")
    weights = prunable_weights(model, layers)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no Conv2d/Linear layer to prune")
    if scope == "layer":
        return {name: _smallest_mask(w, amount) for name, w in weights.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([w.detach().reshape(-1) for w in weights.values()])
    flat_mask = _smallest_mask(flat, amount)
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = flat_mask[start : start + weight.numel()].reshape(weight.shape)
        start += weight.numel()
    return masks


def apply_masks(model: nn.Module, masks: dict[str, Tensor], permanent: bool = True) -> nn.Module:
    """Zero the masked weights in place; `permanent=False` keeps the masks on while training."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        if permanent:
            with torch.no_grad():
                module.weight.mul_(mask.to(module.weight))
        else:
            torch_prune.custom_from_mask(module, "weight", mask.to(module.weight))
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks attached with `apply_masks(..., permanent=False)` into the weights."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")
    return model


def magnitude_prune(
    model: nn.Module, amount: float, scope: str = "global", layers: Iterable[str] | None = None
) -> nn.Module:
    """Zero the `amount` fraction of smallest-|w| conv/linear weights of `model`, in place."""
    return apply_masks(model, magnitude_masks(model, amount, scope, layers), permanent=True)


def sparsity(model: nn.Module) -> float:
    """Fraction of conv/linear weights that are exactly zero."""
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / total if total else 0.0


# -- channel pruning -----------------------------------------------------------------------------
@dataclass
class ChannelGroup:
    """Output channels of `producer` (a Conv2d or Linear), as seen by everything they reach.

    `norms`: BatchNorms applied to those channels. `consumers`: Conv2d/Linear layers whose input
    channels they are. `flatten` (per consumer name): spatial positions per channel when the
    producer's N×C×H×W output is flattened into a Linear (channel c owns inputs c·s … c·s+s−1).
    """

    producer: str
    consumers: list[str]
    norms: list[str] = field(default_factory=list)
    flatten: dict[str, int] = field(default_factory=dict)


class UnsupportedModelError(NotImplementedError):
    """Channel pruning does not know how this model's layers connect."""


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The prunable groups of the registry's models; other graphs need explicit groups."""
    if isinstance(model, (ClassicTeacher, MiddleStudent)):
        pooled = model.image_size // 2 // 2
        fc = "fc1" if isinstance(model, ClassicTeacher) else "fc"
        groups = [
            ChannelGroup("conv1", ["conv2"]),
            ChannelGroup("conv2", [fc], flatten={fc: pooled * pooled}),
        ]
        if isinstance(model, ClassicTeacher):
            groups.append(ChannelGroup("fc1", ["fc2"]))
        return groups
    if isinstance(model, ResNet):
        return [
            ChannelGroup(f"{name}.conv1", [f"{name}.conv2"], norms=[f"{name}.bn1"])
            for name, module in model.named_modules()
            if isinstance(module, BasicBlock)
        ]
    raise UnsupportedModelError(
        f"channel pruning does not know how the layers of {type(model).__name__} connect "
        "(it knows ClassicTeacher, MiddleStudent and the CIFAR ResNets); pass "
        "groups=[ChannelGroup(producer, consumers, norms, flatten), …] describing which layers "
        "consume each pruned layer's output channels"
    )


def channel_importance(weight: Tensor) -> Tensor:
    """L1 norm of each output channel: ‖W[c]‖₁ summed over inputs and kernel."""
    return weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1)


def channels_to_keep(weight: Tensor, amount: float) -> Tensor:
    """Indices (ascending) of the max(1, C − round(amount·C)) highest-L1 output channels."""
    channels = weight.shape[0]
    keep = max(1, channels - round(amount * channels))
    order = torch.argsort(channel_importance(weight), descending=True, stable=True)
    return order[:keep].sort().values


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _sliced_conv(conv: nn.Conv2d, out_index: Tensor | None, in_index: Tensor | None) -> nn.Conv2d:
    if conv.groups != 1:
        raise UnsupportedModelError(f"grouped convolution ({conv.groups} groups) is not handled")
    weight = conv.weight.detach()
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(weight)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            bias = conv.bias.detach()
            new.bias.copy_(bias[out_index] if out_index is not None else bias)
    return new


def _sliced_linear(linear: nn.Linear, out_index: Tensor | None, in_index: Tensor | None):
    weight = linear.weight.detach()
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None).to(weight)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias[out_index] if out_index is not None else bias)
    return new


def _sliced_norm(norm: nn.modules.batchnorm._BatchNorm, index: Tensor) -> nn.Module:
    new = type(norm)(
        len(index),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    ).to(norm.weight if norm.affine else norm.running_mean)
    with torch.no_grad():
        if norm.affine:
            new.weight.copy_(norm.weight[index])
            new.bias.copy_(norm.bias[index])
        if norm.track_running_stats:
            new.running_mean.copy_(norm.running_mean[index])
            new.running_var.copy_(norm.running_var[index])
            new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new


def _get(model: nn.Module, name: str, kinds: tuple[type, ...], role: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{role} {name!r} is not a module of {type(model).__name__}") from None
    if not isinstance(module, kinds):
        raise UnsupportedModelError(
            f"{role} {name!r} is a {type(module).__name__}; expected "
            + " or ".join(k.__name__ for k in kinds)
        )
    return module


def prune_group(model: nn.Module, group: ChannelGroup, amount: float) -> Tensor:
    """Remove `amount` of `group.producer`'s output channels in place; returns the kept indices."""
    producer = _get(model, group.producer, PRUNABLE, "producer")
    channels = producer.weight.shape[0]
    keep = channels_to_keep(producer.weight, amount)
    plans: list[tuple[str, nn.Module]] = []
    for name in group.norms:
        norm = _get(model, name, (nn.BatchNorm1d, nn.BatchNorm2d), "norm")
        if norm.num_features != channels:
            raise ValueError(
                f"{name} normalises {norm.num_features} channels but {group.producer} "
                f"produces {channels}"
            )
        plans.append((name, _sliced_norm(norm, keep)))
    for name in group.consumers:
        consumer = _get(model, name, PRUNABLE, "consumer")
        spatial = group.flatten.get(name, 1)
        expected = channels * spatial
        inputs = consumer.weight.shape[1]
        if inputs != expected:
            raise ValueError(
                f"{name} takes {inputs} inputs but {group.producer} gives {channels} channels"
                + (f" × {spatial} positions = {expected}" if spatial != 1 else "")
            )
        in_index = (keep[:, None] * spatial + torch.arange(spatial)).reshape(-1)
        if isinstance(consumer, nn.Conv2d):
            plans.append((name, _sliced_conv(consumer, None, in_index)))
        else:
            plans.append((name, _sliced_linear(consumer, None, in_index)))
    if isinstance(producer, nn.Conv2d):
        plans.append((group.producer, _sliced_conv(producer, keep, None)))
    else:
        plans.append((group.producer, _sliced_linear(producer, keep, None)))
    for name, module in plans:
        module.train(model.get_submodule(name).training)  # an eval-mode model stays in eval mode
        _set_module(model, name, module)
    return keep


def prune_channels(
    model: nn.Module,
    amount: float,
    groups: Sequence[ChannelGroup] | None = None,
    only: Iterable[str] | None = None,
) -> nn.Module:
    """Remove the `amount` fraction of lowest-L1 output channels of every group's producer.

    Works in place on `model` (pass a `copy.deepcopy` to keep the original) and returns it.
    `only`: producer names to prune (default: every group). The kept channels keep their
    weights, so a channel whose weights are all zero is removed without changing any output.
    """
    if not 0 <= amount < 1:
        raise ValueError(f"amount must lie in [0, 1), got {amount}")
    groups = list(groups) if groups is not None else channel_groups(model)
    if only is not None:
        wanted = list(only)
        known = [g.producer for g in groups]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ValueError(f"no channel group has producer(s) {unknown}; groups: {known}")
        groups = [g for g in groups if g.producer in wanted]
    for group in groups:
        prune_group(model, group, amount)
    return model
