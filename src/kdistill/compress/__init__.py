"""Compression beside distillation: pruning (magnitude, channel) and int8 quantization, and the
`kdistill compress` pipeline that chains them: prune the teacher → distill → int8 → export."""

from kdistill.compress.prune import (
    ChannelGroup,
    UnsupportedModelError,
    apply_masks,
    channel_groups,
    channels_to_keep,
    magnitude_masks,
    magnitude_prune,
    make_permanent,
    prune_channels,
    sparsity,
)
from kdistill.compress.quantize import quantize_dynamic_linear, quantize_static

__all__ = [
    "ChannelGroup",
    "UnsupportedModelError",
    "apply_masks",
    "channel_groups",
    "channels_to_keep",
    "magnitude_masks",
    "magnitude_prune",
    "make_permanent",
    "prune_channels",
    "quantize_dynamic_linear",
    "quantize_static",
    "sparsity",
]
