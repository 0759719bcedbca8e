"""Where a recipe's classification data comes from: one name, one `(train, test)` pair.

| `dataset`                | reads                                                 | module      |
|--------------------------|-------------------------------------------------------|-------------|
| a registry name          | `DATASETS` (`fashion_mnist`, `digits`), `root`        | (registry)  |
| `imagefolder`            | `root/train/<class>/*.png`, `root/test/<class>/*.png` | imagefolder |
| `arrays`                 | the `.npz` files `train` and `test` (`x`, `y`)        | npz         |
| `package.module:factory` | `factory(**kwargs)` → `(train, test)` torch Datasets  | factory     |

Registry datasets apply their own normalisation unless `builtin_normalize` is False; the other
sources are returned unnormalised (uint8 scaled to [0, 1]) — the caller standardises them
(`kdistill.data.normalize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError

__all__ = ["ARRAYS", "IMAGE_FOLDER", "dataset_kind", "load_train_test"]

IMAGE_FOLDER = "imagefolder"
ARRAYS = "arrays"


def dataset_kind(name: str) -> str:
    """ "imagefolder", "arrays", "factory" (an import path) or "registry"."""
    if name in (IMAGE_FOLDER, ARRAYS):
        return name
    return "factory" if ":" in name else "registry"


def load_train_test(
    name: str,
    *,
    root: str | Path | None = None,
    train: str | Path | None = None,
    test: str | Path | None = None,
    kwargs: Mapping[str, Any] | None = None,
    builtin_normalize: bool = True,
) -> tuple[ArrayDataset, ArrayDataset]:
    """The `(train, test)` ArrayDatasets `name` stands for (see the module table)."""
    kind = dataset_kind(name)
    if kind == IMAGE_FOLDER:
        from kdistill.data.imagefolder import load_image_folder

        if root is None:
            raise DataError("dataset imagefolder needs root: a folder holding train/ and test/")
        return load_image_folder(root)
    if kind == ARRAYS:
        from kdistill.data.npz import load_npz_pair

        if train is None or test is None:
            raise DataError("dataset arrays needs train: and test: .npz files")
        return load_npz_pair(train, test)
    if kind == "factory":
        from kdistill.data.factory import load_factory_pair

        return load_factory_pair(name, kwargs)
    from kdistill.data import load_dataset

    options = {} if builtin_normalize else {"normalize": False}
    return (
        load_dataset(name, "train", root=root, **options),
        load_dataset(name, "test", root=root, **options),
    )
