"""Datasets and batches: in-memory arrays, seeded loaders, Fashion-MNIST and sklearn digits.

``load_dataset(name, split)`` builds a dataset by its registry name (``DATASETS.names()``).
The dense-prediction scenes (`make_scenes`, `fashion_mnist_scenes`, `SceneDataset`) are built
directly, not through the registry: the registry's datasets are classification `ArrayDataset`s
(one int64 label per sample) that the recipe runner subsamples and splits by label.

Your own data (`load_train_test`, `kdistill.data.sources`): an image folder per class
(`imagefolder`), `.npz` arrays (`arrays`) or a factory of torch Datasets (an import path);
`channel_stats` / `standardize` normalise them per channel.

Every format of every task — masks, COCO, YOLO, text, `.jsonl`, chat — is a registered data kind
(`kdistill.data.kinds`: reader, validator, fingerprint), read into `ArrayDataset`, `MaskDataset`,
`BoxDataset`, `MaskBoxDataset` (`kdistill.data.dense`), `TokenBlocks` or `PromptCompletions`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdistill.data.arrays import (
    UNLABELLED,
    ArrayDataset,
    Batch,
    BatchLoader,
    hide_labels,
    repeat_to,
    split_train_val,
    take,
)
from kdistill.data.augment import Augmentation
from kdistill.data.batches import as_batch
from kdistill.data.dense import BoxDataset, MaskBoxDataset, MaskDataset
from kdistill.data.digits import DIGITS_CLASSES, load_digits
from kdistill.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIRS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    resolve_fashion_mnist_root,
)
from kdistill.data.idx import read_idx
from kdistill.data.imagefolder import load_image_folder, write_image_folder
from kdistill.data.normalize import ChannelStats, channel_stats, standardize
from kdistill.data.scenes import SceneDataset, fashion_mnist_scenes, make_scenes
from kdistill.data.sources import dataset_kind, load_train_test
from kdistill.registry import Registry

__all__ = [
    "UNLABELLED",
    "Augmentation",
    "as_batch",
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIRS",
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ArrayDataset",
    "Batch",
    "BatchLoader",
    "BoxDataset",
    "MaskBoxDataset",
    "MaskDataset",
    "ChannelStats",
    "SceneDataset",
    "channel_stats",
    "dataset_kind",
    "fashion_mnist_scenes",
    "hide_labels",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "load_train_test",
    "make_scenes",
    "read_idx",
    "repeat_to",
    "resolve_fashion_mnist_root",
    "split_train_val",
    "standardize",
    "take",
    "write_image_folder",
]

#: dataset name → constructor ``(split, root=None, **kwargs) -> ArrayDataset``.
DATASETS: Registry[ArrayDataset] = Registry("dataset")


@DATASETS.register("fashion_mnist")
def _fashion_mnist(split: str, root: str | Path | None = None, **kwargs: Any) -> ArrayDataset:
    return load_fashion_mnist(split, root=root, **kwargs)


@DATASETS.register("digits")
def _digits(split: str, root: str | Path | None = None, **kwargs: Any) -> ArrayDataset:
    del root  # bundled with scikit-learn, nothing to locate
    return load_digits(split, **kwargs)


def load_dataset(
    name: str, split: str, root: str | Path | None = None, **kwargs: Any
) -> ArrayDataset:
    """``DATASETS.create(name, split=split, root=root, **kwargs)``; unknown names get
    suggestions."""
    return DATASETS.create(name, split=split, root=root, **kwargs)
