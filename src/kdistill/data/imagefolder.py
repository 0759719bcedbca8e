"""Image folders (the torchvision `ImageFolder` convention), decoded with Pillow into memory.

    root/train/<class>/<image>.png      root/test/<class>/<image>.jpg

Classes are the sub-folder names of `train/`, sorted; label i is the i-th name. `test/` must
hold the same class folders. Files are read in sorted order; hidden files and files without an
image extension (`IMAGE_EXTENSIONS`) are skipped. Images are scaled to [0, 1] (x / 255):
grayscale images (modes 1, L, LA) give one channel, any other 8-bit mode (RGB, RGBA, P, CMYK, …)
is converted to RGB; when the two splits mix grayscale and colour images, grayscale ones are
repeated to three channels. Every image must have the same size.

Errors (`DataError`, naming the file or folder): a missing `train/` / `test/`, no class folders,
a class folder without images, class folders that differ between the splits, a file Pillow
cannot decode, 16-bit or float images, images of different sizes.

The whole dataset is held in memory (an `ArrayDataset`), meant for sets that fit there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdistill.data.arrays import ArrayDataset
from kdistill.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_folder_classes",
    "load_image_folder",
    "peek_image_folder",
    "write_image_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_GRAY_MODES = ("1", "L", "LA", "La")
_UNSUPPORTED_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SPLITS = ("train", "test")


def image_folder_classes(split_dir: Path) -> list[str]:
    """The sorted class sub-folder names of one split folder (hidden folders skipped)."""
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir}: no such folder; an image folder root holds train/ and test/, each with "
            "one sub-folder per class"
        )
    classes = sorted(
        entry.name for entry in split_dir.iterdir() if entry.is_dir() and entry.name[0] != "."
    )
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    return classes


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        path
        for path in class_dir.iterdir()
        if path.is_file() and path.name[0] != "." and path.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(
            f"{class_dir}: no images in this class folder (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _decode(path: Path) -> np.ndarray:
    """H×W (grayscale) or H×W×3 (colour) uint8 array."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in _UNSUPPORTED_MODES:
                raise DataError(
                    f"{path}: {mode} images (16-bit or float) are not supported; save 8-bit "
                    "grayscale or RGB images"
                )
            converted = image.convert("L" if mode in _GRAY_MODES else "RGB")
            return np.asarray(converted, dtype=np.uint8).copy()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot be decoded as an image ({error})") from None


def _read_split(split_dir: Path, classes: list[str]) -> tuple[list[np.ndarray], list[int], list]:
    arrays, labels, paths = [], [], []
    for label, name in enumerate(classes):
        for path in _image_files(split_dir / name):
            arrays.append(_decode(path))
            labels.append(label)
            paths.append(path)
    return arrays, labels, paths


def load_image_folder(root: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """`(train, test)` ArrayDatasets of `root/train` and `root/test` (see the module doc).

    inputs: `N×C×H×W` float32 in [0, 1] (C = 1 for all-grayscale folders, else 3);
    targets: int64 class indices into the sorted class-folder names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder root {root} does not exist")
    train_classes = image_folder_classes(root / "train")
    test_classes = image_folder_classes(root / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"{root}: train/ and test/ must hold the same class folders; only in train/: "
            f"{only_train}, only in test/: {only_test}"
        )
    splits = {split: _read_split(root / split, train_classes) for split in SPLITS}
    colour = any(array.ndim == 3 for arrays, _, _ in splits.values() for array in arrays)
    first_shape, first_path = splits["train"][0][0].shape[:2], splits["train"][2][0]
    datasets = []
    for split in SPLITS:
        arrays, labels, paths = splits[split]
        for array, path in zip(arrays, paths):
            if array.shape[:2] != first_shape:
                raise DataError(
                    f"{path}: image is {array.shape[0]}×{array.shape[1]} but {first_path} is "
                    f"{first_shape[0]}×{first_shape[1]}; every image must have the same size "
                    "(resize them first)"
                )
        stacked = np.stack([_channels_first(array, colour) for array in arrays])
        inputs = torch.from_numpy(stacked).to(torch.float32).div_(255.0)
        datasets.append(
            ArrayDataset(
                inputs,
                torch.tensor(labels, dtype=torch.int64),
                classes=list(train_classes),
                name=f"imagefolder-{split}",
            )
        )
    return datasets[0], datasets[1]


def peek_image_folder(root: str | Path) -> tuple[list[str], int, tuple[int, int]]:
    """(classes, channels, (H, W)) of an image folder from the first training image of each
    class, without decoding the whole set (`kdistill init`). Channels: 3 when one of those
    images is in colour, else 1 (`load_image_folder` decides on every image of both splits)."""
    root = Path(root).expanduser()
    classes = image_folder_classes(root / "train")
    image_folder_classes(root / "test")  # the folder exists and holds classes
    firsts = [_decode(_image_files(root / "train" / name)[0]) for name in classes]
    channels = 3 if any(array.ndim == 3 for array in firsts) else 1
    return classes, channels, (int(firsts[0].shape[0]), int(firsts[0].shape[1]))


def _channels_first(array: np.ndarray, colour: bool) -> np.ndarray:
    if array.ndim == 2:
        array = array[None]
        return np.repeat(array, 3, axis=0) if colour else array
    return array.transpose(2, 0, 1)


def write_image_folder(
    root: str | Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
) -> int:
    """Write `images` (`N×H×W` uint8 grayscale or `N×H×W×3` RGB) as PNG files
    `root/<split>/<class>/<index>.png`; returns the number written. Class folder names are the
    class names with `/` replaced by `-` (sorted order decides the labels when read back)."""
    from PIL import Image

    folder = Path(root) / split
    for index, (image, label) in enumerate(zip(images, labels)):
        class_dir = folder / classes[int(label)].replace("/", "-")
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(class_dir / f"{index:05d}.png")
    return len(images)
