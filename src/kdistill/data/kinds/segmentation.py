"""Segmentation kinds (target ``mask``): a mask folder, ``.npz`` with ``y`` ``N×H×W``, a
factory of ``(image, mask)`` and the built-in Fashion-MNIST scenes — `MaskDataset`s (scenes:
`SceneDataset` with its seg target).

Mask pixel = class index; the ``void`` value (default 255, VOC / Cityscapes) marks pixels left
out of the loss and of mIoU and is kept as it is, declared as the dataset's `ignore_index`. A
value that is neither a class nor void is an error naming the file and the pixel.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.dense import VOID, MaskDataset, check_mask_values
from kdistill.data.factory import checked_len
from kdistill.data.kinds.base import (
    DataSplits,
    FileKind,
    existing_dir,
    need,
    register_kind,
)
from kdistill.data.kinds.classification import FactoryKind, npz_split_files, split_digest
from kdistill.data.kinds.images import (
    check_not_binary_void,
    check_sizes,
    decode_images,
    decode_mask,
    image_stems,
    infer_classes,
    mask_files,
    resize_image,
    resize_mask,
    resize_option,
    split_folders,
    stack_images,
)
from kdistill.data.npz import read_npz_arrays
from kdistill.errors import DataError

__all__ = ["image_tensor", "read_mask_split", "void_of"]


def void_of(spec: Mapping[str, Any]) -> int | None:
    """The void label a spec gives (``void:``; default 255; ``void: null`` in a spec that sets
    it explicitly to None is not possible in YAML-less dicts, so ``void: none`` turns it off)."""
    value = spec.get("void", VOID)
    if value in (None, "none"):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"data.void: the void label, an integer (default 255), got {value!r}")
    return value


def read_mask_split(split_dir: Path) -> tuple[list[str], list[Path], list[np.ndarray], list]:
    """(stems, image paths, decoded images, masks) of one split folder, in stem order; each
    mask checked to have its image's size."""
    images = image_stems(split_dir / "images")
    masks = mask_files(split_dir, images)
    stems = sorted(images)
    paths = [images[stem] for stem in stems]
    arrays = decode_images(paths)
    decoded = []
    for stem, array in zip(stems, arrays):
        mask = decode_mask(masks[stem])
        if mask.shape != array.shape[:2]:
            raise DataError(
                f"{masks[stem]}: mask is {mask.shape[0]}×{mask.shape[1]} but its image "
                f"{images[stem].name} is {array.shape[0]}×{array.shape[1]}; they must match"
            )
        decoded.append((masks[stem], mask))
    return stems, paths, arrays, decoded


class MaskFolderKind(FileKind):
    name = "masks"
    target = "mask"
    layout = (
        "root/train/images/*.png|jpg + root/train/masks/*.png (same stems; pixel = class index, "
        "255 void), the same under root/test/ (and optional root/val/)"
    )
    options = ("root", "classes", "void", "image_size")
    fingerprinted = ("classes", "void", "image_size")

    def _root(self, spec: Mapping[str, Any]) -> Path:
        return existing_dir(
            need(spec, "root", self.name, "a folder"), "root", self.name, self.layout
        )

    def check(self, spec: Mapping[str, Any]) -> None:
        void_of(spec)
        resize_option(spec)
        for folder in split_folders(self._root(spec), ("images", "masks"), self.layout).values():
            mask_files(folder, image_stems(folder / "images"))

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        found = []
        for folder in split_folders(self._root(spec), ("images", "masks"), self.layout).values():
            images = image_stems(folder / "images")
            found += list(images.values()) + list(mask_files(folder, images).values())
        return found

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        fingerprint = self.fingerprint(spec)
        void = void_of(spec)
        folders = split_folders(self._root(spec), ("images", "masks"), self.layout)
        read = {split: read_mask_split(folder) for split, folder in folders.items()}
        size = resize_option(spec)
        if size is not None:  # images bilinear, masks nearest (no new class values)
            read = {
                split: (
                    stems,
                    paths,
                    [resize_image(a, size) for a in arrays],
                    [(p, resize_mask(m, size)) for p, m in masks],
                )
                for split, (stems, paths, arrays, masks) in read.items()
            }
        all_masks = [mask for _, _, _, masks in read.values() for _, mask in masks]
        train_masks = [mask for _, mask in read["train"][3]]
        check_not_binary_void(train_masks, void, str(folders["train"] / "masks"))
        classes = infer_classes(spec.get("classes"), all_masks, void, str(spec["root"]))
        colour = any(a.ndim == 3 for _, _, arrays, _ in read.values() for a in arrays)
        every_path = [p for _, paths, _, _ in read.values() for p in paths]
        every_array = [a for _, _, arrays, _ in read.values() for a in arrays]
        check_sizes(every_array, every_path)  # one size across the splits
        splits = {}
        for split, (stems, paths, arrays, masks) in read.items():
            for path, mask in masks:
                check_mask_values(mask, len(classes), void, str(path))
            splits[split] = MaskDataset(
                stack_images(arrays, paths, colour),
                torch.from_numpy(np.stack([mask for _, mask in masks])),
                classes,
                void,
                name=f"masks-{split}",
                info={"stems": stems},
            )
        info = {
            "kind": self.name,
            "root": str(spec["root"]),
            "classes": classes,
            "ignore_index": void,
            "images": {split: len(data) for split, data in splits.items()},
        }
        return DataSplits(splits["train"], splits["test"], splits.get("val"), fingerprint, info)


def _read_npz(path: Path) -> tuple[Tensor, np.ndarray, list[str] | None]:
    """(inputs N×C×H×W float32, y as stored, class names or None) of one .npz file."""
    x, y, classes = read_npz_arrays(path, "masks")
    return image_tensor(x, str(path)), y, classes


def image_tensor(x: Any, where: str) -> Tensor:
    """``N×C×H×W`` float32 from an ``N×H×W`` or ``N×C×H×W`` uint8 (÷ 255) or float array."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{where}: x must be N×H×W or N×C×H×W images, got shape {x.shape}")
    if x.shape[1] not in (1, 2, 3, 4) and x.shape[-1] in (1, 3, 4):
        raise DataError(
            f"{where}: x has shape {x.shape}, which looks channels-last (N×H×W×C); save it as "
            "N×C×H×W (x.transpose(0, 3, 1, 2))"
        )
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    if np.issubdtype(x.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    raise DataError(f"{where}: x must be uint8 or floating point, got {x.dtype}")


def mask_tensor(y: Any, inputs: Tensor, where: str) -> Tensor:
    """int64 ``N×H×W`` masks, checked against the images ``N×C×H×W``."""
    y = np.asarray(y)
    n, _, h, w = inputs.shape
    if y.ndim != 3 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{where}: y must be N×H×W integer masks (a class index per pixel), got {y.dtype} "
            f"of shape {y.shape}"
            + ("; 1-D class labels are read by task classification" if y.ndim == 1 else "")
        )
    if y.shape != (n, h, w):
        raise DataError(f"{where}: y has shape {y.shape} but x holds {n} images of {h}×{w}")
    return torch.from_numpy(y.astype(np.int64))


class MaskNpzKind(FileKind):
    name = "npz"
    target = "mask"
    layout = "train: and test: (optional val:) .npz files holding x (N×C×H×W) and y (N×H×W masks)"
    options = ("train", "test", "val", "classes", "void")
    fingerprinted = ("classes", "void")

    def check(self, spec: Mapping[str, Any]) -> None:
        void_of(spec)
        self.files(spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        return npz_split_files(spec, self.name, self.layout)

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        fingerprint = self.fingerprint(spec)
        void = void_of(spec)
        read = {}
        for key in ("train", "test", "val"):
            if spec.get(key) is None:
                continue
            path = Path(str(spec[key])).expanduser()
            inputs, y, names = _read_npz(path)
            read[key] = (path, inputs, mask_tensor(y, inputs, str(path)), names)
        shapes = {key: tuple(inputs.shape[1:]) for key, (_, inputs, _, _) in read.items()}
        if len(set(shapes.values())) > 1:
            raise DataError(f"data: the splits' images differ in shape: {shapes}")
        check_not_binary_void([read["train"][2]], void, f"{read['train'][0]}: y")
        given = spec.get("classes") or next((n for _, _, _, n in read.values() if n), None)
        classes = infer_classes(given, [m for _, _, m, _ in read.values()], void, "data")
        splits = {}
        for key, (path, inputs, masks, _) in read.items():
            check_mask_values(masks, len(classes), void, f"{path}: y")
            splits[key] = MaskDataset(inputs, masks, classes, void, name=f"npz-{key}")
        info = {"kind": self.name, "classes": classes, "ignore_index": void}
        return DataSplits(splits["train"], splits["test"], splits.get("val"), fingerprint, info)


def _to_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(value)))


def sample_image(value: Any, where: str) -> Tensor:
    """One sample's image as ``C×H×W`` float32: uint8 ÷ 255, float kept; ``H×W`` → 1 channel;
    a PIL image in its mode (L: 1 channel, RGB: 3)."""
    x = _to_tensor(value)
    if x.dim() == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
        x = x.permute(2, 0, 1)  # a PIL / numpy H×W×C image
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise DataError(f"{where}: the image must be C×H×W or H×W, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if not x.is_floating_point():
        raise DataError(f"{where}: the image must be uint8 or floating point, got {x.dtype}")
    return x.to(torch.float32)


def sample_mask(value: Any, image: Tensor, where: str) -> Tensor:
    mask = _to_tensor(value)
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or mask.is_floating_point() or mask.dtype == torch.bool:
        raise DataError(
            f"{where}: the mask must be H×W integer class indices, got {mask.dtype} of shape "
            f"{tuple(mask.shape)}"
        )
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise DataError(
            f"{where}: the mask is {tuple(mask.shape)} but the image is {tuple(image.shape)}"
        )
    return mask.to(torch.int64)


def samples(dataset: Any, label: str):
    """(index, sample) of an indexable dataset; DataError for one without len / indexing."""
    for index in range(checked_len(dataset, label)):
        yield index, dataset[index]


def stack_checked(images: list[Tensor], label: str) -> Tensor:
    first = images[0].shape
    for index, image in enumerate(images):
        if image.shape != first:
            raise DataError(
                f"{label}: sample {index}'s image is {tuple(image.shape)} but sample 0's is "
                f"{tuple(first)}; every image needs the same shape"
            )
    return torch.stack(images)


class MaskFactoryKind(FactoryKind):
    target = "mask"
    layout = "factory: package.module:function returning (train, test) datasets of (image, mask)"
    options = ("factory", "kwargs", "classes", "void")

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        path = str(spec["factory"])
        void = void_of(spec)
        sources = dict(zip(("train", "val", "test"), self.call(spec)))
        read = {}
        for split, source in sources.items():
            if source is None:
                continue
            label = f"{path} {split}"
            images, masks = [], []
            for index, sample in samples(source, label):
                where = f"{label}, sample {index}"
                if not isinstance(sample, tuple | list) or len(sample) != 2:
                    raise DataError(
                        f"{where}: each sample must be (image, mask), got {type(sample).__name__}"
                    )
                image = sample_image(sample[0], where)
                images.append(image)
                masks.append(sample_mask(sample[1], image, where))
            read[split] = (stack_checked(images, label), torch.stack(masks), source)
        check_not_binary_void([read["train"][1]], void, f"{path} train")
        given = spec.get("classes") or getattr(sources["train"], "classes", None)
        classes = infer_classes(given, [m for _, m, _ in read.values()], void, path)
        splits = {}
        for split, (inputs, masks, _) in read.items():
            check_mask_values(masks, len(classes), void, f"{path} {split}: masks")
            splits[split] = MaskDataset(inputs, masks, classes, void, name=f"factory-{split}")
        extra = {"factory": path, "kwargs": spec.get("kwargs") or {}, "void": void}
        fingerprint = split_digest(self.name + ":mask", extra, *splits.values())
        info = {"kind": self.name, **extra, "classes": classes, "ignore_index": void}
        return DataSplits(splits["train"], splits["test"], splits.get("val"), fingerprint, info)


class ScenesKind:
    """The built-in Fashion-MNIST scenes (`kdistill.data.scenes`), generated from the seed, as
    masks, boxes or both."""

    name = "fashion_mnist_scenes"
    layout = (
        "Fashion-MNIST garments pasted into scenes (generated from the seed; root: the idx files)"
    )
    options = ("root", "scenes", "train_count", "test_count", "size", "max_items")

    def __init__(self, target: str, target_kind: str) -> None:
        self.target = target
        self.target_kind = target_kind

    def __repr__(self) -> str:
        return f"<data kind {self.name} ({self.target}): {self.layout}>"

    def _settings(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        settings = {"train_count": 4000, "test_count": 1000, "size": 64, "max_items": 4}
        settings.update(dict(spec.get("scenes") or {}))
        settings.update({k: spec[k] for k in settings if k in spec})
        return settings

    def check(self, spec: Mapping[str, Any]) -> None:
        size = self._settings(spec)["size"]
        if size % 8:
            raise DataError(
                "data.size: the detectors' grid has stride 8: size must be a multiple of 8, "
                f"got {size}"
            )

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        return []

    def fingerprint(self, spec: Mapping[str, Any], seed: int = 0) -> str:
        return self.read(spec, seed=seed).fingerprint

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        from kdistill.data.scenes import fashion_mnist_scenes

        settings = self._settings(spec)
        train, test = fashion_mnist_scenes(spec.get("root"), seed=seed, **settings)
        train, test = train.with_target(self.target_kind), test.with_target(self.target_kind)
        extra = {"seed": seed, **settings}
        info = {
            "kind": self.name,
            **extra,
            "classes": list(train.classes),
            "normalized": "the scenes' own",
        }
        return DataSplits(train, test, None, split_digest(self.name, extra, train, test), info)


register_kind(ScenesKind("mask", "seg"))
register_kind(MaskFolderKind())
register_kind(MaskNpzKind())
register_kind(MaskFactoryKind())
