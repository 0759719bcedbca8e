"""Classification kinds (target ``class``): image folders, ``.npz`` arrays, a factory of
``(x, y)`` and the built-in Fashion-MNIST and digits — `ArrayDataset`s, as
`kdistill.data.sources` reads them (wrapped here, not rewritten)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.data.arrays import ArrayDataset
from kdistill.data.imagefolder import IMAGE_EXTENSIONS, SPLITS, image_folder_classes
from kdistill.data.kinds.base import (
    DataSplits,
    FileKind,
    existing_dir,
    existing_file,
    need,
    register_kind,
)
from kdistill.errors import ConfigError, DataError

__all__ = ["image_files", "split_digest"]


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted (hidden files skipped)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def split_digest(kind: str, extra: Mapping[str, Any], *datasets: Any) -> str:
    """sha256 over the kind, `extra` and the datasets' own fingerprints (kinds whose data is
    not files: a factory's, a built-in generated set)."""
    digest = hashlib.sha256(
        json.dumps({"kind": kind, **extra}, sort_keys=True, default=str).encode()
    )
    for data in datasets:
        digest.update(b"|" if data is None else data.fingerprint().encode())
    return digest.hexdigest()


class ImageFolderKind(FileKind):
    name = "imagefolder"
    target = "class"
    layout = (
        "root/train/<class>/*.png|jpg and root/test/<class>/* (optional root/val/<class>/*; "
        "torchvision ImageFolder)"
    )
    options = ("root",)

    def _splits(self, spec: Mapping[str, Any]) -> tuple[str, ...]:
        root = existing_dir(
            need(spec, "root", self.name, "a folder"), "root", self.name, self.layout
        )
        return (*SPLITS, "val") if (root / "val").is_dir() else SPLITS

    def check(self, spec: Mapping[str, Any]) -> None:
        root = Path(str(spec["root"])).expanduser()
        classes = {split: image_folder_classes(root / split) for split in self._splits(spec)}
        if classes.get("val", classes["train"]) != classes["train"]:
            raise DataError(
                f"{root / 'val'}: class folders {classes['val']} differ from train/'s "
                f"{classes['train']}; every split needs the same class folders"
            )

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        root = Path(str(spec["root"])).expanduser()
        return [path for split in self._splits(spec) for path in image_files(root / split)]

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        from kdistill.data.imagefolder import _channels_first, _read_split, load_image_folder

        self.check(spec)
        fingerprint = self.fingerprint(spec)
        train, test = load_image_folder(spec["root"])
        val = None
        if "val" in self._splits(spec):
            root = Path(str(spec["root"])).expanduser()
            arrays, labels, paths = _read_split(root / "val", list(train.classes))
            colour = train.input_shape[0] == 3
            if any(a.ndim == 3 for a in arrays) and not colour:
                raise DataError(
                    f"{root / 'val'}: holds colour images but train/ and test/ are grayscale; "
                    "save every split in one mode"
                )
            for array, path in zip(arrays, paths):
                if tuple(array.shape[:2]) != tuple(train.input_shape[1:]):
                    raise DataError(
                        f"{path}: image is {array.shape[0]}×{array.shape[1]} but train/ images "
                        f"are {train.input_shape[1]}×{train.input_shape[2]}; one size for all"
                    )
            stacked = np.stack([_channels_first(a, colour) for a in arrays])
            val = ArrayDataset(
                torch.from_numpy(stacked).to(torch.float32).div_(255.0),
                torch.tensor(labels, dtype=torch.int64),
                classes=list(train.classes),
                name="imagefolder-val",
            )
        info = {"kind": self.name, "root": str(spec["root"]), "classes": list(train.classes)}
        return DataSplits(train, test, val, fingerprint, info)


def npz_split_files(spec: Mapping[str, Any], kind: str, layout: str) -> list[Path]:
    """The `train`, `test` (and optional `val`) .npz files of a data spec, each checked to
    exist (DataError naming the field, the kind and its layout)."""
    found = []
    for key in ("train", "test", "val"):
        if key == "val" and spec.get("val") is None:
            continue
        value = need(spec, key, kind, "an .npz file holding x and y")
        found.append(existing_file(value, key, kind, layout))
    return found


class NpzKind(FileKind):
    name = "npz"
    target = "class"
    layout = "train: and test: (optional val:) .npz files holding x (N×C×H×W) and y (N classes)"
    options = ("train", "test", "val")

    def check(self, spec: Mapping[str, Any]) -> None:
        self.files(spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        return npz_split_files(spec, self.name, self.layout)

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        from kdistill.data.npz import load_npz_pair, read_npz

        fingerprint = self.fingerprint(spec)
        train, test = load_npz_pair(spec["train"], spec["test"])
        val = None
        if spec.get("val") is not None:
            x, y, _ = read_npz(spec["val"])
            val = ArrayDataset(x, y, classes=list(train.classes), name="arrays-val")
        info = {"kind": self.name, "files": [str(p) for p in self.files(spec)]}
        info["classes"] = list(train.classes)
        return DataSplits(train, test, val, fingerprint, info)


class FactoryKind:
    """``factory: package.module:function`` called with ``kwargs``, returning ``(train,
    test)`` or ``(train, val, test)``; its fingerprint is the digest of the samples it returns
    (a factory is code: only what it returns can be compared)."""

    name = "factory"
    target = "class"
    layout = "factory: package.module:function returning (train, test) datasets of (x, y)"
    options = ("factory", "kwargs")

    def __repr__(self) -> str:
        return f"<data kind {self.name} ({self.target}): {self.layout}>"

    def check(self, spec: Mapping[str, Any]) -> None:
        from kdistill.importpath import import_callable

        path = need(spec, "factory", self.name, "an import path package.module:function")
        import_callable(str(path), what="datasets")
        if not isinstance(spec.get("kwargs", {}), Mapping):
            raise ConfigError("data.kwargs: the factory's keyword arguments, a mapping")

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        return []

    def fingerprint(self, spec: Mapping[str, Any]) -> str:
        return self.read(spec).fingerprint

    def call(self, spec: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        """(train, val or None, test) as the factory returns them."""
        from kdistill.importpath import import_callable

        path = str(spec["factory"])
        returned = import_callable(path, what="datasets")(**dict(spec.get("kwargs") or {}))
        if not isinstance(returned, tuple | list) or len(returned) not in (2, 3):
            raise DataError(
                f"{path}: a dataset factory returns (train, test) or (train, val, test), got "
                f"{type(returned).__name__}"
                + (f" of length {len(returned)}" if isinstance(returned, tuple | list) else "")
            )
        if len(returned) == 2:
            return returned[0], None, returned[1]
        return returned[0], returned[1], returned[2]

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        from kdistill.data.factory import dataset_to_arrays, load_factory_pair

        path = str(spec["factory"])
        train_source, val_source, test_source = self.call(spec)
        if val_source is None:
            train, test = load_factory_pair(path, spec.get("kwargs"))
            val = None
        else:
            train = dataset_to_arrays(train_source, f"{path} train")
            val = dataset_to_arrays(val_source, f"{path} val")
            test = dataset_to_arrays(test_source, f"{path} test")
            largest = max(d.num_classes for d in (train, val, test))
            named = getattr(train_source, "classes", None)
            classes = [str(c) for c in named] if named else [str(k) for k in range(largest)]
            if largest > len(classes):
                raise DataError(
                    f"{path}: label {largest - 1} is out of range for the {len(classes)} classes "
                    "the dataset names (its `classes` attribute)"
                )
            train, val, test = (
                ArrayDataset(d.inputs, d.targets, classes=classes, name=f"factory-{s}")
                for d, s in ((train, "train"), (val, "val"), (test, "test"))
            )
        extra = {"factory": path, "kwargs": spec.get("kwargs") or {}}
        info = {"kind": self.name, **extra, "classes": list(train.classes)}
        return DataSplits(train, test, val, split_digest(self.name, extra, train, val, test), info)


class BuiltinKind:
    """A built-in classification set of the `kdistill.data.DATASETS` registry. With
    ``normalize: auto`` (the default) it comes with its own normalisation
    (``info["normalized"]``), otherwise as read."""

    target = "class"
    options = ("root",)

    def __init__(self, name: str, layout: str) -> None:
        self.name = name
        self.layout = layout

    def __repr__(self) -> str:
        return f"<data kind {self.name} ({self.target}): {self.layout}>"

    def check(self, spec: Mapping[str, Any]) -> None:
        pass  # the files are located when read (`load_dataset` names where it looked)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        if self.name != "fashion_mnist":
            return []
        from kdistill.data.fashion_mnist import FASHION_MNIST_FILES, resolve_fashion_mnist_root

        root = resolve_fashion_mnist_root(spec.get("root"))
        names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
        return sorted(p for p in root.iterdir() if p.is_file() and p.name.split(".")[0] in names)

    def fingerprint(self, spec: Mapping[str, Any]) -> str:
        return self.read(spec).fingerprint

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        from kdistill.data.sources import load_train_test

        own = spec.get("normalize", "auto") == "auto"
        train, test = load_train_test(self.name, root=spec.get("root"), builtin_normalize=own)
        info = {"kind": self.name, "classes": list(train.classes)}
        if own:
            info["normalized"] = f"{self.name}'s own"
        extra = {"normalized": own}
        return DataSplits(train, test, None, split_digest(self.name, extra, train, test), info)


register_kind(BuiltinKind("fashion_mnist", "the Fashion-MNIST idx files (root, $KDISTILL_DATA)"))
register_kind(BuiltinKind("digits", "scikit-learn's 8×8 digits (bundled)"))
register_kind(ImageFolderKind())
register_kind(NpzKind())
register_kind(FactoryKind())
