"""Datasets from your own code: `package.module:factory` returning `(train, test)`.

Each returned dataset is indexable (`len(d)`, `d[i]`) and `d[i]` is `(x, y)`: `x` a tensor or
array of one sample (`C×H×W`, or `H×W` which gets one channel), `y` an integer class index.
Both are copied into an in-memory `ArrayDataset` (uint8 inputs scaled by 1/255, others kept as
float32). The class names are the dataset's `classes` attribute when it has one (the torchvision
convention), else "0" … "K−1".

Errors (`DataError`, naming the factory and the sample index): a return value that is not a pair,
a dataset without `len` / indexing, a sample that is not `(x, y)`, samples of different shapes,
non-integer labels, and a dataset too large for memory (`MAX_IN_MEMORY_BYTES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError
from kdistill.importpath import import_callable

__all__ = ["MAX_IN_MEMORY_BYTES", "dataset_to_arrays", "load_factory_pair"]

MAX_IN_MEMORY_BYTES = 8 * 2**30
"""Largest float32 copy of a split that is built in memory (8 GiB)."""


def load_factory_pair(
    path: str, kwargs: Mapping[str, Any] | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """Call the factory at `path` with `kwargs` and convert its `(train, test)` datasets."""
    factory = import_callable(path, what="datasets")
    returned = factory(**dict(kwargs or {}))
    if not isinstance(returned, (tuple, list)) or len(returned) != 2:
        raise DataError(
            f"{path}: a dataset factory returns (train, test), got {type(returned).__name__}"
            + (f" of length {len(returned)}" if isinstance(returned, (tuple, list)) else "")
        )
    train, test = (dataset_to_arrays(d, f"{path} {split}") for d, split in zip(returned, SPLITS))
    if train.input_shape != test.input_shape:
        raise DataError(
            f"{path}: test samples are {test.input_shape} but train samples are "
            f"{train.input_shape}; both splits need the same shape"
        )
    classes = _class_names(returned[0], returned[1], train, test, path)
    return (
        ArrayDataset(train.inputs, train.targets, classes=classes, name="factory-train"),
        ArrayDataset(test.inputs, test.targets, classes=classes, name="factory-test"),
    )


SPLITS = ("train", "test")


def _to_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    array = np.asarray(value)  # numpy arrays, PIL images, nested lists
    return torch.from_numpy(np.ascontiguousarray(array))


def checked_len(dataset: Any, label: str) -> int:
    """`len(dataset)`; DataError naming `label` for a dataset without len / indexing or empty."""
    try:
        size = len(dataset)
    except TypeError:
        raise DataError(
            f"{label}: a dataset must have len() and d[i] (a map-style torch Dataset), got "
            f"{type(dataset).__name__}"
        ) from None
    if size == 0:
        raise DataError(f"{label}: the dataset is empty")
    return size


def dataset_to_arrays(dataset: Any, label: str) -> ArrayDataset:
    """Copy every `(x, y)` of an indexable dataset into an ArrayDataset (classes "0" … "K−1")."""
    size = checked_len(dataset, label)
    inputs: Tensor | None = None
    targets = torch.empty(size, dtype=torch.int64)
    for index in range(size):
        sample = dataset[index]
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise DataError(
                f"{label}: sample {index} is a {type(sample).__name__}; each sample must be (x, y)"
            )
        x, y = _to_tensor(sample[0]), _to_tensor(sample[1])
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if inputs is None:
            if x.dtype != torch.uint8 and not x.is_floating_point():
                raise DataError(f"{label}: x must be uint8 or floating point, got {x.dtype}")
            needed = size * x.numel() * 4
            if needed > MAX_IN_MEMORY_BYTES:
                raise DataError(
                    f"{label}: {size} samples of shape {tuple(x.shape)} need "
                    f"{needed / 2**30:.1f} GiB as float32, more than the "
                    f"{MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB a recipe holds in memory; train "
                    "from Python with a DataLoader instead (kd.fit)"
                )
            inputs = torch.empty((size, *x.shape), dtype=torch.float32)
            first_dtype = x.dtype
        elif x.dtype != first_dtype:
            raise DataError(
                f"{label}: sample {index} has dtype {x.dtype} but sample 0 has {first_dtype}; "
                "every sample needs the same dtype"
            )
        elif x.shape != inputs.shape[1:]:
            raise DataError(
                f"{label}: sample {index} has shape {tuple(x.shape)} but sample 0 has "
                f"{tuple(inputs.shape[1:])}; every sample needs the same shape"
            )
        if y.numel() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(
                f"{label}: sample {index}: y must be one integer class index, got {y.dtype} "
                f"of shape {tuple(y.shape)}"
            )
        inputs[index] = x.to(torch.float32) / 255.0 if first_dtype == torch.uint8 else x
        targets[index] = int(y)
    if int(targets.min()) < 0:
        raise DataError(f"{label}: labels must be ≥ 0, found {int(targets.min())}")
    classes = [str(k) for k in range(int(targets.max()) + 1)]
    return ArrayDataset(inputs, targets, classes=classes, name=label)


def _class_names(
    train_source: Any, test_source: Any, train: ArrayDataset, test: ArrayDataset, path: str
) -> list[str]:
    largest = max(train.num_classes, test.num_classes)
    named = getattr(train_source, "classes", None) or getattr(test_source, "classes", None)
    if named is None:
        return [str(k) for k in range(largest)]
    named = [str(name) for name in named]
    if largest > len(named):
        raise DataError(
            f"{path}: label {largest - 1} is out of range for the {len(named)} classes the "
            "dataset names (its `classes` attribute)"
        )
    return named
