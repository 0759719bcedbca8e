"""One batch shape for the engine, whatever the loader yields.

`as_batch(obj)` turns one item of any loader into a :class:`~kdistill.data.arrays.Batch`:

- a ``Batch`` (kdistill's own `BatchLoader`): as it is;
- a tuple or list, as a torch ``DataLoader`` over a ``TensorDataset`` yields:
  ``(inputs,)``, ``(inputs, target)`` or ``(inputs, target, index)``;
- a dict (Hugging Face style): ``"labels"`` (or ``"label"``) is the target, ``"index"`` the
  sample positions, and every other key is a keyword argument of the models, which are called
  as ``model(**inputs)`` (e.g. ``input_ids``, ``attention_mask``, ``pixel_values``);
- a tensor: the inputs alone (no target, no index).

``inputs`` is a tensor or a dict of keyword arguments; `call_model` calls a model either way.
``index`` (int64, one position per sample) is only needed by terms such as CRD and by stored
teacher outputs; a loader that gives none gets a clear error from them, not a wrong lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.data.arrays import Batch, batch_size_of
from kdistill.errors import DataError

__all__ = [
    "INDEX_KEY",
    "TARGET_KEYS",
    "as_batch",
    "call_model",
    "can_restart",
    "describe_inputs",
    "distributed_sampler",
    "iter_batches",
    "set_epoch",
    "shard_count",
]

#: keys of a dict batch read as the target (Hugging Face collators name it "labels").
TARGET_KEYS = ("labels", "label")
#: key of a dict batch read as the samples' positions in the dataset.
INDEX_KEY = "index"


def as_batch(obj: Any) -> Batch:
    """``obj`` (one item a loader yielded) as a `Batch`; DataError for anything else."""
    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, Tensor):
        return Batch(inputs=obj)
    if isinstance(obj, Mapping):
        return _from_dict(obj)
    if isinstance(obj, list | tuple):
        if not 1 <= len(obj) <= 3:
            raise DataError(
                f"a batch given as a {type(obj).__name__} must be (inputs,), (inputs, target) or "
                f"(inputs, target, index); got {len(obj)} items ({describe_inputs(obj)}); "
                "pass a model's several inputs as a dict of keyword arguments"
            )
        inputs, target, index = (*obj, None, None)[:3]
        return _checked(inputs, target, index)
    raise DataError(
        f"cannot read a batch from a {type(obj).__name__}: a loader must yield tensors, "
        "(inputs, target[, index]) tuples, dicts of model keyword arguments (labels under "
        "'labels') or kdistill Batch objects"
    )


def _from_dict(obj: Mapping) -> Batch:
    target_keys = [key for key in TARGET_KEYS if key in obj]
    if len(target_keys) > 1:
        raise DataError(
            f"a dict batch holds both {target_keys[0]!r} and {target_keys[1]!r}; kdistill reads "
            "either as the target, so keep only one"
        )
    target = obj[target_keys[0]] if target_keys else None
    index = obj.get(INDEX_KEY)
    inputs = {k: v for k, v in obj.items() if k not in TARGET_KEYS and k != INDEX_KEY}
    if not inputs:
        raise DataError(
            f"a dict batch with keys {sorted(obj)} holds no model inputs: every key but "
            f"{[*TARGET_KEYS, INDEX_KEY]} is passed to the models as a keyword argument"
        )
    return _checked(inputs, target, index)


def _checked(inputs: Any, target: Any, index: Any) -> Batch:
    if not isinstance(inputs, Tensor | Mapping):
        raise DataError(
            f"a batch's inputs must be a tensor or a dict of model keyword arguments, got "
            f"{describe_inputs(inputs)}"
        )
    if isinstance(inputs, Mapping) and not all(isinstance(key, str) for key in inputs):
        raise DataError(f"a dict of model inputs needs string keys, got {list(inputs)}")
    if target is not None and not isinstance(target, Tensor | Mapping):
        raise DataError(
            f"a batch's target must be a tensor or a dict of tensors, got {describe_inputs(target)}"
        )
    size = batch_size_of(inputs)
    if index is not None:
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise DataError(
                f"a batch's index must be a 1-D integer tensor (one dataset position per sample), "
                f"got shape {tuple(index.shape)} {index.dtype}"
            )
        index = index.long()
        if size is not None and len(index) != size:
            raise DataError(
                f"a batch's index has {len(index)} entries but its inputs hold {size} samples "
                f"({describe_inputs(inputs)})"
            )
    return Batch(inputs=inputs, target=target, index=index)


def call_model(model: nn.Module, inputs: Tensor | Mapping[str, Any]) -> Any:
    """``model(**inputs)`` for a dict of keyword arguments, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def describe_inputs(value: Any) -> str:
    """A short description of what a batch holds, for error messages:
    ``tensor (4, 1, 8, 8) float32`` or ``{input_ids: (4, 7) int64, attention_mask: …}``."""
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        parts = (f"{key}: {_short(item)}" for key, item in value.items())
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of [" + ", ".join(_short(item) for item in value) + "]"
    return type(value).__name__


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping | list | tuple):
        return describe_inputs(value)
    return type(value).__name__


# -- loaders ------------------------------------------------------------------------------------
# kdistill reads any re-iterable object with a length whose items `as_batch` understands. These
# helpers find what such a loader can do (restart mid-epoch, take an epoch number, shard) without
# requiring any base class.


def can_restart(loader: Any) -> bool:
    """True when the loader can start an epoch at a given batch: it has
    ``iter_from(step) -> iterator over the current epoch's batches from batch `step` on``
    (kdistill's `BatchLoader` has it; any loader may implement it to get exact mid-epoch
    resume)."""
    return callable(getattr(loader, "iter_from", None))


def iter_batches(loader: Any, step: int = 0):
    """The current epoch's items from batch `step` on (`step` > 0 needs `can_restart`)."""
    if can_restart(loader):
        return loader.iter_from(step)
    if step:
        raise ValueError(
            f"a {type(loader).__name__} cannot start an epoch at batch {step} (it has no "
            "iter_from(step)); only epoch boundaries can be resumed"
        )
    return iter(loader)


def _samplers(loader: Any) -> list[Any]:
    """The loader's sampler and batch sampler (and the batch sampler's sampler), distinct."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: list[Any] = []
    for item in (
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ):
        if item is not None and all(item is not other for other in found):
            found.append(item)
    return found


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell the loader which epoch starts (its order may depend on it): ``loader.set_epoch``
    when it has one (kdistill's `BatchLoader`), else ``set_epoch`` of its samplers (torch's
    ``DistributedSampler``); loaders with neither are left alone."""
    if callable(getattr(loader, "set_epoch", None)):
        loader.set_epoch(epoch)
        return
    for sampler in _samplers(loader):
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)


def distributed_sampler(loader: Any) -> Any:
    """The loader's ``torch.utils.data.DistributedSampler``, or None."""
    from torch.utils.data.distributed import DistributedSampler

    for sampler in _samplers(loader):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def shard_count(loader: Any) -> int:
    """Into how many per-rank shards the loader splits each epoch: its ``world_size`` (kdistill's
    `BatchLoader`), its ``DistributedSampler``'s ``num_replicas``, else 1."""
    world_size = getattr(loader, "world_size", None)
    if isinstance(world_size, int) and world_size > 1:
        return world_size
    sampler = distributed_sampler(loader)
    return int(sampler.num_replicas) if sampler is not None else 1
