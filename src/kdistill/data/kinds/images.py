"""Reading the images and masks of the dense kinds: ``<split>/images/*`` with
``<split>/masks/*.png`` of the same stems (the VOC / Cityscapes layout), decoded with Pillow.

Images: scaled to [0, 1] (x / 255); grayscale images give one channel, colour ones three, and
when a set mixes both every image gets three (grayscale repeated). Every image must have the
same size (kdistill's dense models take one size). Masks: one class index per pixel, read from
a grayscale (``L``), palette (``P``: the palette index is the class, as VOC stores them), 1-bit
or 16-bit PNG — never converted through RGB; a colour mask is refused, as is a lossy JPEG mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.imagefolder import IMAGE_EXTENSIONS, _decode
from kdistill.errors import DataError

__all__ = [
    "DENSE_SPLITS",
    "MASK_MODES",
    "decode_mask",
    "image_stems",
    "infer_classes",
    "mask_files",
    "split_folders",
    "stack_images",
]

DENSE_SPLITS = ("train", "val", "test")  # val optional
MASK_MODES = ("L", "P", "1", "I;16", "I;16L", "I;16B", "I")


def split_folders(root: Path, needed: Sequence[str], layout: str) -> dict[str, Path]:
    """``{split: root/split}`` for train, test (required) and val (when present)."""
    found = {}
    for split in DENSE_SPLITS:
        folder = root / split
        if folder.is_dir():
            found[split] = folder
        elif split != "val":
            raise DataError(f"{folder}: no such folder; this data kind reads {layout}")
    for folder in found.values():
        for sub in needed:
            if not (folder / sub).is_dir():
                raise DataError(f"{folder / sub}: no such folder; this data kind reads {layout}")
    return found


def image_stems(folder: Path) -> dict[str, Path]:
    """stem → image file of `folder` (hidden files and non-images skipped); DataError for two
    images of one stem (``a.png`` and ``a.jpg``) or an empty folder."""
    stems: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in stems:
            raise DataError(
                f"{path}: two images with the stem {path.stem!r} ({stems[path.stem].name} too); "
                "each image needs its own name"
            )
        stems[path.stem] = path
    if not stems:
        raise DataError(f"{folder}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return stems


def mask_files(split_dir: Path, images: Mapping[str, Path]) -> dict[str, Path]:
    """stem → mask PNG of ``split_dir/masks``, one per image of `images`; DataError naming the
    file for a mask without an image, an image without a mask, or a mask that is not a PNG."""
    folder = split_dir / "masks"
    masks: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() != ".png":
            raise DataError(
                f"{path}: masks must be PNG files (lossless: a JPEG changes class indices at "
                "edges); save it as .png"
            )
        if path.stem not in images:
            raise DataError(
                f"{path}: mask without an image: no {split_dir / 'images' / path.stem}.* "
                "(a mask and its image share the stem)"
            )
        masks[path.stem] = path
    missing = [stem for stem in images if stem not in masks]
    if missing:
        raise DataError(
            f"{images[missing[0]]}: image without a mask: no {folder / missing[0]}.png"
            + (f" ({len(missing)} images lack masks)" if len(missing) > 1 else "")
        )
    return masks


def decode_mask(path: Path) -> np.ndarray:
    """H×W int64 class indices of a mask PNG (see the module doc)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in MASK_MODES:
                raise DataError(
                    f"{path}: a {image.mode} mask; masks hold one class index per pixel: save "
                    "them as grayscale (L) or palette (P) PNGs, e.g. "
                    "Image.fromarray(mask.astype(np.uint8)).save(path)"
                )
            return np.asarray(image).astype(np.int64)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot be decoded as a PNG mask ({error})") from None


def stack_images(arrays: Sequence[np.ndarray], paths: Sequence[Path], colour: bool) -> Tensor:
    """``N×C×H×W`` float32 in [0, 1] from decoded H×W / H×W×3 uint8 arrays (C = 3 when
    `colour`); DataError naming the first image of another size."""
    first = arrays[0].shape[:2]
    for array, path in zip(arrays, paths):
        if array.shape[:2] != first:
            raise DataError(
                f"{path}: image is {array.shape[0]}×{array.shape[1]} but {paths[0]} is "
                f"{first[0]}×{first[1]}; every image must have the same size (resize them and "
                "their masks / boxes first)"
            )
    planes = []
    for array in arrays:
        if array.ndim == 2:
            array = array[None]
            array = np.repeat(array, 3, axis=0) if colour else array
        else:
            array = array.transpose(2, 0, 1)
        planes.append(array)
    return torch.from_numpy(np.stack(planes)).to(torch.float32).div_(255.0)


def decode_images(paths: Sequence[Path]) -> list[np.ndarray]:
    return [_decode(path) for path in paths]


def infer_classes(
    spec_classes: Any, masks: Sequence[np.ndarray | Tensor], void: int | None, where: str
) -> list[str]:
    """Class names: ``classes`` as given (a list of names, or a count K: "0" … "K−1"), else
    "0" … "K−1" with K = 1 + the largest non-void value of all masks."""
    if spec_classes is not None:
        if isinstance(spec_classes, bool):
            raise DataError(f"data.classes: a list of names or a count, got {spec_classes!r}")
        if isinstance(spec_classes, int):
            if spec_classes < 1:
                raise DataError(f"data.classes: a count must be ≥ 1, got {spec_classes}")
            return [str(k) for k in range(spec_classes)]
        names = [str(name) for name in spec_classes]
        if not names or len(set(names)) != len(names):
            raise DataError(f"data.classes: names must be distinct and non-empty, got {names}")
        return names
    largest = -1
    for mask in masks:
        values = torch.as_tensor(mask)
        if void is not None:
            values = values[values != void]
        if values.numel():
            if int(values.min()) < 0:
                raise DataError(f"{where}: mask values must be ≥ 0, found {int(values.min())}")
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise DataError(f"{where}: every mask pixel is void; nothing to learn")
    return [str(k) for k in range(largest + 1)]
