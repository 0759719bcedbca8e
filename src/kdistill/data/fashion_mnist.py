"""Fashion-MNIST (Xiao et al. 2017) from its four official IDX files.

The files are looked up, in this order, in an explicit ``root``, in ``$KDISTILL_DATA`` (the
folder itself or its ``fashion-mnist`` subfolder) and in ``/usr/share/datasets/fashion-mnist``
(Debian's ``dataset-fashion-mnist`` package). Each file may be raw or gzipped (``.gz``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.data.arrays import ArrayDataset
from kdistill.data.idx import read_idx
from kdistill.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIRS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "resolve_fashion_mnist_root",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

FASHION_MNIST_MEAN = 0.2860
"""Mean pixel value of the 60000 training images after scaling to [0, 1] (x / 255)."""

FASHION_MNIST_STD = 0.3530
"""Standard deviation of all training pixels after scaling to [0, 1]; with the mean above,
``(x / 255 − 0.2860) / 0.3530`` gives the training set mean ≈ 0 and std ≈ 1."""

DEFAULT_FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
"""Searched last; Debian's ``dataset-fashion-mnist`` package installs the files here."""

ENV_VAR = "KDISTILL_DATA"

#: split → (images file, labels file), official names without the optional ``.gz``.
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IMAGE_SIZE = (28, 28)

_INSTALL_HINT = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or put the "
    f"files in a folder and pass --data-root / set {ENV_VAR}"
)


def _all_file_names() -> list[str]:
    return [name for pair in FASHION_MNIST_FILES.values() for name in pair]


def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (raw first), else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(folder: Path) -> list[str]:
    return [name for name in _all_file_names() if _find_file(folder, name) is None]


def _describe(folder: Path) -> str:
    """`/x (does not exist)` or `/x (missing: a, b)` for the not-found message."""
    if not folder.is_dir():
        return f"{folder} (does not exist)"
    return f"{folder} (missing: {', '.join(_missing_files(folder))})"


def resolve_fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The folder holding the four Fashion-MNIST files (each raw or ``.gz``).

    Search order: ``root`` (or ``root/fashion-mnist``) when given; else ``$KDISTILL_DATA`` (or
    ``$KDISTILL_DATA/fashion-mnist``); else ``DEFAULT_FASHION_MNIST_DIRS``. An explicit ``root``
    that does not hold the files is an error (no fallback), listing the missing files.
    """
    if root is not None:
        folder = Path(root).expanduser()
        for candidate in (folder, folder / "fashion-mnist"):
            if candidate.is_dir() and not _missing_files(candidate):
                return candidate.resolve()
        if not folder.is_dir():
            raise DataError(f"Fashion-MNIST data root {folder} does not exist; {_INSTALL_HINT}")
        raise DataError(
            f"Fashion-MNIST data root {folder} lacks files: "
            f"{', '.join(_missing_files(folder))} (each may be raw or .gz)"
        )
    candidates: list[Path] = []
    env_value = os.environ.get(ENV_VAR)
    if env_value:
        env_folder = Path(env_value).expanduser()
        candidates += [env_folder, env_folder / "fashion-mnist"]
    candidates += [Path(folder) for folder in DEFAULT_FASHION_MNIST_DIRS]
    for candidate in candidates:
        if candidate.is_dir() and not _missing_files(candidate):
            return candidate.resolve()
    searched = "; ".join(_describe(candidate) for candidate in candidates)
    env_note = "" if env_value else f" (${ENV_VAR} is not set)"
    raise DataError(
        f"Fashion-MNIST not found. Searched{env_note}: {searched}. A folder needs the four "
        f"official files {', '.join(_all_file_names())} (each raw or .gz). To get them, "
        f"{_INSTALL_HINT}."
    )


def _file_key(path: Path) -> tuple[str, int, int]:
    """Cache key of a file: path, size and modification time (a replaced file is re-read)."""
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _decode_split(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split's images (N×28×28 uint8) and labels (N uint8)."""
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{images_path}: expected 3-D uint8 images, got {images.ndim}-D {images.dtype} "
            f"with shape {images.shape}"
        )
    if images.shape[1:] != IMAGE_SIZE:
        raise DataError(
            f"{images_path}: expected {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} images, got "
            f"{images.shape[1]}×{images.shape[2]}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected 1-D uint8 labels, got {labels.ndim}-D {labels.dtype} "
            f"with shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels but {images_path.name} has {len(images)} images"
        )
    if len(labels) > 0 and labels.max() >= len(FASHION_MNIST_CLASSES):
        bad = int(np.argmax(labels >= len(FASHION_MNIST_CLASSES)))
        raise DataError(
            f"{labels_path}: label {int(labels[bad])} at position {bad} is out of range: "
            f"Fashion-MNIST has {len(FASHION_MNIST_CLASSES)} classes (labels 0-9)"
        )
    return images, labels


@functools.lru_cache(maxsize=4)
def _split_tensors(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int], normalize: bool
) -> tuple[Tensor, Tensor]:
    """``(inputs N×1×28×28 float32, targets N int64)``; inputs are x/255, then standardised."""
    images, labels = _decode_split(images_key, labels_key)
    inputs = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    if normalize:
        inputs.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return inputs, torch.from_numpy(labels).to(torch.int64)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, normalize: bool = True
) -> ArrayDataset:
    """Fashion-MNIST ``"train"`` (60000 images) or ``"test"`` (10000) as an ArrayDataset.

    inputs: ``N×1×28×28`` float32, ``x / 255`` and, with ``normalize``,
    ``(x / 255 − FASHION_MNIST_MEAN) / FASHION_MNIST_STD``; targets: int64 labels 0-9.
    Decoded files are cached in-process; each call returns a new ArrayDataset whose tensors may
    be shared with earlier calls (they are never modified in place).
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    folder = resolve_fashion_mnist_root(root)
    paths = []
    for name in FASHION_MNIST_FILES[split]:
        path = _find_file(folder, name)
        if path is None:  # removed since the folder was resolved
            raise DataError(f"{folder / name}: file not found (nor {name}.gz)")
        paths.append(path)
    inputs, targets = _split_tensors(_file_key(paths[0]), _file_key(paths[1]), bool(normalize))
    return ArrayDataset(
        inputs=inputs,
        targets=targets,
        classes=list(FASHION_MNIST_CLASSES),
        name=f"fashion_mnist-{split}",
    )
