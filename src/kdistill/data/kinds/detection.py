"""Detection kinds (target ``boxes``) and multi-task kinds (target ``mask+boxes``).

- ``coco``: ``root/<split>/annotations.json`` (COCO: ``images`` with ``id``, ``file_name``,
  ``width``, ``height``; ``annotations`` with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w,
  h]`` in pixels; ``categories`` with ``id``, ``name``) and the images under
  ``root/<split>/images/``. Category ids are mapped to contiguous class indices in increasing id
  order; the map (``category_ids[index] = id``) is kept in the dataset and in ``info`` so a run
  can store it. Crowd annotations (``iscrowd: 1``) are left out, as torchvision's references do.
- ``yolo``: ``root/<split>/images/*`` and ``root/<split>/labels/<stem>.txt``, one
  ``class cx cy w h`` line per box, normalised to the image (Ultralytics); an image without a
  label file has no boxes. Class names: ``classes:`` or ``root/classes.txt`` (one per line).
- ``factory``: items ``(image, {"boxes": M×4 xyxy pixels, "labels": M})`` (torchvision).

Boxes become kdistill's rows ``[class, x1, y1, x2, y2]`` (`kdistill.data.dense`), checked to
have an area and to lie in their image. The same readers with ``root/<split>/masks/<stem>.png``
give multi-task data (``{"seg": mask, "det": boxes}``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.dense import (
    BoxDataset,
    MaskBoxDataset,
    box_rows,
    check_box,
    check_mask_values,
    coco_to_xyxy,
    pad_box_rows,
    yolo_to_xyxy,
)
from kdistill.data.kinds.base import DataSplits, FileKind, existing_dir, need, register_kind
from kdistill.data.kinds.classification import FactoryKind, split_digest
from kdistill.data.kinds.images import (
    decode_images,
    decode_mask,
    image_stems,
    infer_classes,
    mask_files,
    split_folders,
    stack_images,
)
from kdistill.data.kinds.segmentation import (
    ScenesKind,
    sample_image,
    sample_mask,
    samples,
    stack_checked,
    void_of,
)
from kdistill.errors import DataError

__all__ = ["read_coco", "read_yolo_labels"]

COCO_FILE = "annotations.json"


# -- COCO --------------------------------------------------------------------------------------
def _field(item: Any, key: str, kinds: tuple[type, ...], where: str) -> Any:
    if not isinstance(item, Mapping) or key not in item:
        keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise DataError(f"{where}: no {key!r} (found {keys}); COCO needs it")
    value = item[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(
            f"{where}.{key}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}"
        )
    return value


def load_coco_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON: {error}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a COCO file holds an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(
                f"{path}: no {key!r} list (found keys {sorted(data)}); a COCO file holds "
                "images, annotations and categories"
            )
    return data


def coco_categories(data: Mapping[str, Any], path: Path) -> tuple[list[int], list[str]]:
    """(ids in increasing order, their names): class index i is ``ids[i]``."""
    found: dict[int, str] = {}
    for number, category in enumerate(data["categories"]):
        where = f"{path}: categories[{number}]"
        cid = _field(category, "id", (int,), where)
        name = _field(category, "name", (str,), where)
        if cid in found:
            raise DataError(f"{where}: category id {cid} appears twice")
        found[cid] = name
    if not found:
        raise DataError(f"{path}: 'categories' is empty; list the object classes")
    ids = sorted(found)
    return ids, [found[i] for i in ids]


def read_coco(
    path: Path, images_dir: Path, ids: list[int] | None = None
) -> tuple[list[str], list[Path], list[np.ndarray], list[Tensor], list[int], list[str], int]:
    """(stems, image paths, decoded images, box rows per image, category ids, names, crowd
    annotations left out) of one COCO split; `ids`: the category ids another split defined (its
    map must be the same)."""
    data = load_coco_json(path)
    cat_ids, names = coco_categories(data, path)
    if ids is not None and cat_ids != ids:
        raise DataError(
            f"{path}: categories have ids {cat_ids} but the training split's are {ids}; every "
            "split needs the same categories (the class indices follow from them)"
        )
    index_of = {cid: i for i, cid in enumerate(cat_ids)}
    images: dict[int, dict[str, Any]] = {}
    for number, image in enumerate(data["images"]):
        where = f"{path}: images[{number}]"
        iid = _field(image, "id", (int,), where)
        if iid in images:
            raise DataError(f"{where}: image id {iid} appears twice")
        entry = {
            "file_name": _field(image, "file_name", (str,), where),
            "width": _field(image, "width", (int,), where),
            "height": _field(image, "height", (int,), where),
            "rows": [],
        }
        images[iid] = entry
    if not images:
        raise DataError(f"{path}: 'images' is empty")
    crowd = 0
    for number, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{number}]"
        iid = _field(annotation, "image_id", (int,), where)
        cid = _field(annotation, "category_id", (int,), where)
        bbox = _field(annotation, "bbox", (list,), where)
        if iid not in images:
            raise DataError(f"{where}: image_id {iid} is not in 'images'")
        if cid not in index_of:
            raise DataError(f"{where}: category_id {cid} is not in 'categories' (ids {cat_ids})")
        if len(bbox) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in bbox
        ):
            raise DataError(f"{where}.bbox: expected [x, y, w, h] (4 numbers, pixels), got {bbox}")
        if annotation.get("iscrowd", 0):
            crowd += 1
            continue
        entry = images[iid]
        box = check_box(
            coco_to_xyxy(bbox),
            entry["width"],
            entry["height"],
            f"{where} (image {entry['file_name']})",
            "COCO boxes are [x, y, w, h] in pixels with (x, y) the top-left corner",
        )
        entry["rows"].append([float(index_of[cid]), *box])
    order = sorted(images, key=lambda i: images[i]["file_name"])
    paths, stems, rows = [], [], []
    for iid in order:
        entry = images[iid]
        file = images_dir / entry["file_name"]
        if not file.is_file():
            raise DataError(
                f"{path}: image {iid}: {file} does not exist (file_name is read under {images_dir})"
            )
        paths.append(file)
        stems.append(Path(entry["file_name"]).stem)
        rows.append(torch.tensor(entry["rows"], dtype=torch.float32).reshape(-1, 5))
    arrays = decode_images(paths)
    for iid, file, array in zip(order, paths, arrays):
        entry = images[iid]
        if array.shape[:2] != (entry["height"], entry["width"]):
            raise DataError(
                f"{path}: image {iid} ({file.name}) is {array.shape[1]}×{array.shape[0]} "
                f"(width×height) but the file says {entry['width']}×{entry['height']}; the boxes "
                "are in the pixels the file names: fix width / height or the image"
            )
    return stems, paths, arrays, rows, cat_ids, names, crowd


# -- YOLO --------------------------------------------------------------------------------------
def read_yolo_labels(path: Path, classes: int, width: int, height: int) -> Tensor:
    """``M×5`` rows of one YOLO label file (``class cx cy w h`` per line, normalised)."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from None
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}, line {number}"
        if len(parts) != 5:
            extra = (
                " (a segmentation polygon? detection labels are boxes)" if len(parts) > 5 else ""
            )
            raise DataError(
                f"{where}: {len(parts)} numbers{extra}; a YOLO label line is `class cx cy w h` "
                f"(5 numbers: the class index, then the box centre and size as fractions of the "
                f"image), got {line.strip()!r}"
            )
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{where}: not numbers: {line.strip()!r}") from None
        label, cx, cy, w, h = values
        if label != int(label) or not 0 <= label < classes:
            raise DataError(
                f"{where}: class {parts[0]} is not a class index in [0, {classes}) (the "
                "classes are data.classes / classes.txt, in order)"
            )
        if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in (cx, cy, w, h)):
            raise DataError(
                f"{where}: cx cy w h = {parts[1:]} must be fractions of the image in [0, 1] "
                "(YOLO labels are normalised: divide pixels by the image width / height)"
            )
        box = check_box(
            yolo_to_xyxy(cx, cy, w, h, width, height),
            width,
            height,
            where,
            "a YOLO box is `class cx cy w h` with the centre and size normalised to the image",
        )
        rows.append([float(label), *box])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def yolo_classes(spec: Mapping[str, Any]) -> list[str]:
    given = spec.get("classes")
    if given is None:
        file = Path(str(spec["root"])).expanduser() / "classes.txt"
        if not file.is_file():
            raise DataError(
                f"data.classes: YOLO labels hold class indices; give their names (data.classes: "
                f"[...]) or a file {file} with one name per line"
            )
        given = [
            line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return infer_classes(given, [], None, "data.classes")


def yolo_label_files(split_dir: Path, images: Mapping[str, Path]) -> dict[str, Path]:
    folder = split_dir / "labels"
    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix != ".txt":
            raise DataError(f"{path}: YOLO labels are .txt files (one `class cx cy w h` per line)")
        if path.stem not in images:
            raise DataError(
                f"{path}: label file without an image: no {split_dir / 'images' / path.stem}.*"
            )
        found[path.stem] = path
    return found


# -- the kinds ---------------------------------------------------------------------------------
def _masks_for(split_dir: Path, stems: list[str], arrays: list[np.ndarray]) -> list:
    images = {stem: split_dir / "images" / stem for stem in stems}
    masks = mask_files(split_dir, images)
    decoded = []
    for stem, array in zip(stems, arrays):
        mask = decode_mask(masks[stem])
        if mask.shape != array.shape[:2]:
            raise DataError(
                f"{masks[stem]}: mask is {mask.shape[0]}×{mask.shape[1]} but its image is "
                f"{array.shape[0]}×{array.shape[1]}; they must match"
            )
        decoded.append((masks[stem], mask))
    return decoded


class _BoxFiles(FileKind):
    """COCO / YOLO for boxes (``with_masks`` False) or masks + boxes (True)."""

    with_masks = False

    def __init__(self, with_masks: bool) -> None:
        self.with_masks = with_masks
        self.target = "mask+boxes" if with_masks else "boxes"
        if with_masks:
            self.layout += " + root/<split>/masks/<stem>.png (pixel = class index, 255 void)"
            self.options = (*self.options, "seg_classes", "void")
            self.fingerprinted = (*self.fingerprinted, "seg_classes", "void")

    def _root(self, spec: Mapping[str, Any]) -> Path:
        return existing_dir(
            need(spec, "root", self.name, "a folder"), "root", self.name, self.layout
        )

    def _folders(self, spec: Mapping[str, Any]) -> dict[str, Path]:
        needed = self.needed + (("masks",) if self.with_masks else ())
        return split_folders(self._root(spec), needed, self.layout)

    def split_boxes(self, split_dir: Path, spec: Mapping[str, Any], state: dict) -> tuple:
        raise NotImplementedError

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        fingerprint = self.fingerprint(spec)
        state: dict[str, Any] = {}
        read = {}
        for split, folder in self._folders(spec).items():
            stems, paths, arrays, rows = self.split_boxes(folder, spec, state)
            masks = _masks_for(folder, stems, arrays) if self.with_masks else None
            read[split] = (stems, paths, arrays, rows, masks)
        colour = any(a.ndim == 3 for _, _, arrays, _, _ in read.values() for a in arrays)
        stack_images(
            [a for r in read.values() for a in r[2]],
            [p for r in read.values() for p in r[1]],
            colour,
        )
        width = max(len(r) for _, _, _, rows, _ in read.values() for r in rows)
        classes, ids = state["classes"], state.get("category_ids")
        void = void_of(spec) if self.with_masks else None
        seg_classes = None
        if self.with_masks:
            every = [m for *_, masks in read.values() for _, m in masks]
            seg_classes = infer_classes(spec.get("seg_classes"), every, void, str(spec["root"]))
        splits = {}
        for split, (stems, paths, arrays, rows, masks) in read.items():
            inputs = stack_images(arrays, paths, colour)
            boxes = pad_box_rows(rows, max(width, 1))
            if self.with_masks:
                for path, mask in masks:
                    check_mask_values(mask, len(seg_classes), void, str(path))
                splits[split] = MaskBoxDataset(
                    inputs,
                    torch.from_numpy(np.stack([m for _, m in masks])),
                    boxes,
                    seg_classes,
                    classes,
                    void,
                    name=f"{self.name}-{split}",
                    category_ids=ids,
                    info={"stems": stems},
                )
            else:
                splits[split] = BoxDataset(
                    inputs, boxes, classes, f"{self.name}-{split}", ids, {"stems": stems}
                )
        info = {
            "kind": self.name,
            "root": str(spec["root"]),
            "classes": classes,
            "images": {split: len(d) for split, d in splits.items()},
            "boxes": {split: int((d.boxes[..., 0] >= 0).sum()) for split, d in splits.items()},
        }
        if ids is not None:
            info["category_ids"] = {str(i): cid for i, cid in enumerate(ids)}
        if state.get("crowd"):
            info["crowd_annotations_left_out"] = state["crowd"]
        if self.with_masks:
            info.update(seg_classes=seg_classes, ignore_index=void)
        return DataSplits(splits["train"], splits["test"], splits.get("val"), fingerprint, info)


class CocoKind(_BoxFiles):
    name = "coco"
    layout = (
        "root/<split>/annotations.json (COCO: images, annotations with bbox [x, y, w, h] "
        "pixels, categories) + root/<split>/images/<file_name>, splits train, test (val optional)"
    )
    options = ("root", "annotations")
    fingerprinted = ("annotations",)
    needed = ("images",)

    def _json(self, folder: Path, spec: Mapping[str, Any]) -> Path:
        path = folder / str(spec.get("annotations") or COCO_FILE)
        if not path.is_file():
            raise DataError(f"{path}: no such file; data kind coco reads {self.layout}")
        return path

    def check(self, spec: Mapping[str, Any]) -> None:
        if self.with_masks:
            void_of(spec)
        for folder in self._folders(spec).values():
            self._json(folder, spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        found = []
        for folder in self._folders(spec).values():
            path = self._json(folder, spec)
            data = load_coco_json(path)
            found.append(path)
            found += [
                folder / "images" / str(image.get("file_name"))
                for image in data["images"]
                if isinstance(image, Mapping)
                and (folder / "images" / str(image.get("file_name"))).is_file()
            ]
            if self.with_masks:
                found += sorted((folder / "masks").glob("*.png"))
        return found

    def split_boxes(self, split_dir: Path, spec: Mapping[str, Any], state: dict) -> tuple:
        stems, paths, arrays, rows, ids, names, crowd = read_coco(
            self._json(split_dir, spec), split_dir / "images", state.get("category_ids")
        )
        state.setdefault("category_ids", ids)
        state.setdefault("classes", names)
        state["crowd"] = state.get("crowd", 0) + crowd
        return stems, paths, arrays, rows


class YoloKind(_BoxFiles):
    name = "yolo"
    layout = (
        "root/<split>/images/* + root/<split>/labels/<stem>.txt (`class cx cy w h` per line, "
        "normalised), class names in data.classes or root/classes.txt"
    )
    options = ("root", "classes")
    fingerprinted = ("classes",)
    needed = ("images", "labels")

    def check(self, spec: Mapping[str, Any]) -> None:
        if self.with_masks:
            void_of(spec)
        for folder in self._folders(spec).values():
            yolo_label_files(folder, image_stems(folder / "images"))
        yolo_classes(spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        found = []
        root = self._root(spec)
        if spec.get("classes") is None and (root / "classes.txt").is_file():
            found.append(root / "classes.txt")
        for folder in self._folders(spec).values():
            images = image_stems(folder / "images")
            found += list(images.values()) + list(yolo_label_files(folder, images).values())
            if self.with_masks:
                found += sorted((folder / "masks").glob("*.png"))
        return found

    def split_boxes(self, split_dir: Path, spec: Mapping[str, Any], state: dict) -> tuple:
        classes = state.setdefault("classes", yolo_classes(spec))
        images = image_stems(split_dir / "images")
        labels = yolo_label_files(split_dir, images)
        stems = sorted(images)
        paths = [images[stem] for stem in stems]
        arrays = decode_images(paths)
        rows = []
        for stem, array in zip(stems, arrays):
            height, width = array.shape[:2]
            if stem in labels:
                rows.append(read_yolo_labels(labels[stem], len(classes), width, height))
            else:
                rows.append(torch.zeros(0, 5))  # an image without a label file: background
        return stems, paths, arrays, rows


class BoxFactoryKind(FactoryKind):
    """Items ``(image, {"boxes": M×4 xyxy pixels, "labels": M})`` (``mask+boxes``: ``(image,
    {"seg": mask, "det": {"boxes", "labels"}})``)."""

    def __init__(self, with_masks: bool) -> None:
        self.with_masks = with_masks
        self.target = "mask+boxes" if with_masks else "boxes"
        item = (
            '{"seg": mask, "det": {"boxes", "labels"}}'
            if with_masks
            else '{"boxes": xyxy, "labels"}'
        )
        self.layout = (
            f"factory: package.module:function returning (train, test) datasets of (image, {item})"
        )
        self.options = ("factory", "kwargs", "classes") + (
            ("seg_classes", "void") if with_masks else ()
        )

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        path = str(spec["factory"])
        void = void_of(spec) if self.with_masks else None
        sources = dict(zip(("train", "val", "test"), self.call(spec)))
        read = {}
        for split, source in sources.items():
            if source is None:
                continue
            label = f"{path} {split}"
            images, rows, masks = [], [], []
            for index, sample in samples(source, label):
                where = f"{label}, sample {index}"
                target = (
                    sample[1] if isinstance(sample, tuple | list) and len(sample) == 2 else None
                )
                det = (
                    target.get("det") if self.with_masks and isinstance(target, Mapping) else target
                )
                if not isinstance(det, Mapping) or (self.with_masks and "seg" not in target):
                    raise DataError(
                        f"{where}: each sample must be (image, {self.layout.split('(image, ')[1]}"
                    )
                image = sample_image(sample[0], where)
                found = box_rows(det.get("boxes"), det.get("labels"), where)
                height, width = image.shape[1:]
                for row in found:
                    check_box(
                        tuple(row[1:].tolist()), width, height, where, "boxes are xyxy in pixels"
                    )
                images.append(image)
                rows.append(found)
                if self.with_masks:
                    masks.append(sample_mask(target["seg"], image, where))
            read[split] = (stack_checked(images, label), rows, masks)
        every = [r for _, rows, _ in read.values() for r in rows]
        labels = [int(r[0]) for rows in every for r in rows]
        given = spec.get("classes") or getattr(sources["train"], "classes", None)
        classes = infer_classes(given, [torch.tensor(labels or [0])], None, path)
        width = max([len(r) for r in every] + [1])
        seg_classes = None
        if self.with_masks:
            all_masks = [m for _, _, ms in read.values() for m in ms]
            seg_classes = infer_classes(spec.get("seg_classes"), all_masks, void, path)
        splits = {}
        for split, (inputs, rows, masks) in read.items():
            boxes = pad_box_rows(rows, width)
            if self.with_masks:
                stacked = torch.stack(masks)
                check_mask_values(stacked, len(seg_classes), void, f"{path} {split}: masks")
                splits[split] = MaskBoxDataset(
                    inputs, stacked, boxes, seg_classes, classes, void, name=f"factory-{split}"
                )
            else:
                splits[split] = BoxDataset(inputs, boxes, classes, f"factory-{split}")
        extra = {"factory": path, "kwargs": spec.get("kwargs") or {}, "target": self.target}
        fingerprint = split_digest(self.name, extra, *splits.values())
        info = {"kind": self.name, **extra, "classes": classes}
        if self.with_masks:
            info.update(seg_classes=seg_classes, ignore_index=void)
        return DataSplits(splits["train"], splits["test"], splits.get("val"), fingerprint, info)


register_kind(ScenesKind("boxes", "det"))
register_kind(CocoKind(with_masks=False))
register_kind(YoloKind(with_masks=False))
register_kind(BoxFactoryKind(with_masks=False))
register_kind(ScenesKind("mask+boxes", "both"))
register_kind(CocoKind(with_masks=True))
register_kind(YoloKind(with_masks=True))
register_kind(BoxFactoryKind(with_masks=True))
