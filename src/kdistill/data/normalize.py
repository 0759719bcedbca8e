"""Per-channel standardisation: `x' = (x − mean[c]) / std[c]`.

`channel_stats` computes the mean and the population standard deviation of each channel over
every sample and pixel of a dataset (`N×C×…` inputs; the recipe runner uses the training split);
`standardize` applies given statistics to a dataset. Statistics are accumulated in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError

__all__ = ["ChannelStats", "channel_stats", "standardize"]


@dataclass(frozen=True)
class ChannelStats:
    """One mean and one standard deviation per input channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def channel_stats(data: ArrayDataset | Any) -> ChannelStats:
    """Mean and population std (divisor N·H·W) of each channel of `data.inputs` (`N×C×…`).

    Raises DataError for an empty dataset, non-float inputs, or a constant channel (std 0,
    which would divide by zero)."""
    inputs = data.inputs
    if len(data) == 0:
        raise DataError(f"dataset {data.name!r}: no samples to compute mean and std on")
    if not inputs.is_floating_point() or inputs.dim() < 2:
        raise DataError(
            f"dataset {data.name!r}: per-channel statistics need float N×C×… inputs, got "
            f"{inputs.dtype} of shape {tuple(inputs.shape)}"
        )
    values = inputs.transpose(0, 1).reshape(inputs.shape[1], -1).to(torch.float64)
    mean = values.mean(dim=1)
    std = values.std(dim=1, correction=0)
    constant = [int(c) for c in torch.nonzero(std == 0).flatten()]
    if constant:
        raise DataError(
            f"dataset {data.name!r}: channel(s) {constant} have the same value everywhere "
            "(std 0), so they cannot be standardised; set data.normalize: none, or give "
            "data.normalize: {mean: [...], std: [...]}"
        )
    return ChannelStats(tuple(float(m) for m in mean), tuple(float(s) for s in std))


def standardize(data: Any, stats: ChannelStats) -> Any:
    """A new dataset with inputs `(x − mean[c]) / std[c]` (float32); `data` is not modified.

    `data`: any dataclass dataset with `inputs` `N×C×…` — `ArrayDataset`, `MaskDataset`,
    `BoxDataset`, `MaskBoxDataset`, `SceneDataset`: the copy keeps every other field (targets,
    masks, boxes, classes, void label)."""
    channels = data.inputs.shape[1] if data.inputs.dim() >= 2 else 0
    for label, values in (("mean", stats.mean), ("std", stats.std)):
        if len(values) != channels:
            raise DataError(
                f"normalize.{label}: {len(values)} value(s) for inputs with {channels} "
                f"channel(s) (shape {tuple(data.inputs.shape[1:])}); give one per channel"
            )
    if any(s <= 0 for s in stats.std):
        raise DataError(f"normalize.std: every value must be > 0, got {list(stats.std)}")
    shape = (1, channels) + (1,) * (data.inputs.dim() - 2)
    mean = _column(stats.mean, shape)
    std = _column(stats.std, shape)
    inputs = ((data.inputs.to(torch.float64) - mean) / std).to(torch.float32)
    if not dataclasses.is_dataclass(data):
        raise DataError(f"dataset {data.name!r}: standardize needs a dataclass with inputs")
    return dataclasses.replace(data, inputs=inputs)


def _column(values: Sequence[float], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64).reshape(shape)
