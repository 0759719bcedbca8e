"""Data kinds (issue 25 part A): every reader on a tiny by-hand example whose expected tensors
are written out here, each bad-file error, fingerprints that follow the files' bytes, and the
refusal of a kind the task does not read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.data.dense import BoxDataset, MaskBoxDataset, MaskDataset
from kdistill.data.kinds import get_kind, kinds_for, read_data, resolve
from kdistill.errors import ConfigError, DataError

PIL = pytest.importorskip("PIL.Image")


# -- helpers: tiny files ------------------------------------------------------------------------
def png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def gray(seed: int, h: int = 4, w: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


def mask_folder(root: Path, masks: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """root/<split>/images/<stem>.png (gray 4×6) + masks/<stem>.png; returns the images."""
    images = {}
    for split, by_stem in masks.items():
        for number, (stem, mask) in enumerate(sorted(by_stem.items())):
            image = gray(hash((split, stem)) % 1000 + number)
            images[f"{split}/{stem}"] = image
            png(root / split / "images" / f"{stem}.png", image)
            png(root / split / "masks" / f"{stem}.png", mask)
    return images


M1 = np.array([[0, 0, 1, 1, 2, 2]] * 4, dtype=np.uint8)
M2 = np.array([[255, 1, 1, 0, 0, 0]] * 4, dtype=np.uint8)  # a void column
M3 = np.array([[2, 2, 2, 0, 0, 1]] * 4, dtype=np.uint8)


# -- segmentation ------------------------------------------------------------------------------
def test_mask_folder_reads_images_masks_and_keeps_void(tmp_path):
    images = mask_folder(tmp_path, {"train": {"a": M1, "b": M2}, "test": {"c": M3}})
    splits = read_data("mask", {"kind": "masks", "root": str(tmp_path)})
    train, test = splits.train, splits.test
    assert isinstance(train, MaskDataset) and splits.val is None
    # stems in sorted order; x / 255 with one channel; masks as stored, 255 kept as void
    expected_inputs = np.stack([images["train/a"], images["train/b"]])[:, None] / 255.0
    assert torch.allclose(train.inputs, torch.tensor(expected_inputs, dtype=torch.float32))
    assert torch.equal(train.masks, torch.tensor(np.stack([M1, M2]), dtype=torch.int64))
    assert torch.equal(test.masks, torch.tensor(M3[None], dtype=torch.int64))
    # classes: 1 + the largest non-void value (2) over every split; void declared, not a class
    assert train.classes == ["0", "1", "2"] and train.num_seg_classes == 3
    assert train.ignore_index == 255 and splits.info["ignore_index"] == 255
    assert train.get_batch(torch.tensor([1]))[1][0, 0, 0] == 255


def test_mask_folder_optional_val_and_named_classes(tmp_path):
    mask_folder(tmp_path, {"train": {"a": M1}, "val": {"v": M3}, "test": {"c": M3}})
    splits = read_data(
        "mask", {"kind": "masks", "root": str(tmp_path), "classes": ["bg", "cat", "dog", "cow"]}
    )
    assert len(splits.val) == 1 and splits.train.classes == ["bg", "cat", "dog", "cow"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: png(r / "train/masks/zz.png", M1), r"zz\.png: mask without an image"),
        (lambda r: (r / "train/masks/a.png").unlink(), r"a\.png: image without a mask"),
        (lambda r: png(r / "train/masks/a.png", np.full((4, 6), 7)), r"a\.png: pixel .* value 7"),
        (
            lambda r: png(r / "train/masks/a.png", np.zeros((4, 6, 3))),
            r"a\.png: a RGB mask; masks hold one class index",
        ),
        (
            lambda r: png(r / "train/masks/a.png", np.zeros((3, 6))),
            r"a\.png: mask is 3×6 but its image .* is 4×6",
        ),
        (lambda r: shutil.rmtree(r / "test"), r"test: no such folder"),
    ],
)
def test_mask_folder_errors_name_the_file_and_the_fix(tmp_path, make, message):
    mask_folder(tmp_path, {"train": {"a": M1, "b": M2}, "test": {"c": M3}})
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        read_data("mask", {"kind": "masks", "root": str(tmp_path), "classes": 3})


def test_a_jpeg_mask_is_refused(tmp_path):
    mask_folder(tmp_path, {"train": {"a": M1}, "test": {"c": M3}})
    PIL.fromarray(M1).save(tmp_path / "train/masks/b.jpg")
    with pytest.raises(DataError, match=r"b\.jpg: masks must be PNG"):
        read_data("mask", {"kind": "masks", "root": str(tmp_path)})


def test_mask_npz_and_its_errors(tmp_path):
    x = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)
    np.savez(tmp_path / "train.npz", x=x, y=np.stack([M1, M2]).astype(np.int64))
    np.savez(tmp_path / "test.npz", x=x[:1], y=M3[None].astype(np.int64))
    spec = {"kind": "npz", "train": str(tmp_path / "train.npz"), "test": str(tmp_path / "test.npz")}
    splits = read_data("mask", spec)
    assert torch.allclose(
        splits.train.inputs, torch.tensor(x[:, None] / 255.0, dtype=torch.float32)
    )
    assert torch.equal(splits.test.masks, torch.tensor(M3[None], dtype=torch.int64))
    np.savez(tmp_path / "test.npz", x=x[:1], y=np.array([3]))
    with pytest.raises(
        DataError, match=r"test\.npz: y must be N×H×W .*read by task classification"
    ):
        read_data("mask", spec)
    np.savez(tmp_path / "test.npz", x=x[:1], y=np.full((1, 4, 6), 9))
    with pytest.raises(DataError, match=r"sample 0, pixel \(row 0, column 0\) has value 9"):
        read_data("mask", {**spec, "classes": 3})


class MaskItems:
    classes = ["bg", "fg", "edge"]

    def __init__(self, masks):
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return np.full((4, 6), 10 * i, dtype=np.uint8), torch.tensor(self.masks[i])


def mask_pairs():
    return MaskItems([M1, M2]), MaskItems([M3])


def test_mask_factory_of_image_mask_pairs():
    splits = read_data("mask", {"kind": "factory", "factory": "test_data_kinds:mask_pairs"})
    assert splits.train.classes == ["bg", "fg", "edge"]
    assert torch.allclose(splits.train.inputs[1], torch.full((1, 4, 6), 10 / 255))
    assert torch.equal(splits.train.masks[1], torch.tensor(M2, dtype=torch.int64))


# -- detection ---------------------------------------------------------------------------------
W, H = 10, 8


def coco_file(folder: Path, annotations: list[dict], images=None, categories=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "images": images or [{"id": 1, "file_name": "im1.png", "width": W, "height": H}],
        "annotations": annotations,
        "categories": categories or [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    path = folder / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def coco_root(root: Path, bbox=(1, 2, 3, 4), category=7) -> Path:
    for split in ("train", "test"):
        png(root / split / "images" / "im1.png", gray(1, H, W))
        coco_file(
            root / split, [{"id": 1, "image_id": 1, "category_id": category, "bbox": list(bbox)}]
        )
    return root


def yolo_root(root: Path, line: str, classes=("cat", "dog")) -> Path:
    for split in ("train", "test"):
        png(root / split / "images" / "im1.png", gray(1, H, W))
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        (root / split / "labels" / "im1.txt").write_text(line + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_coco_box_and_the_same_yolo_line_give_the_same_target(tmp_path):
    # COCO bbox [x, y, w, h] = [1, 2, 3, 4] → corners (1, 2) and (1 + 3, 2 + 4) = (4, 6).
    # Categories ids 7 (dog) and 3 (cat) → contiguous in id order: cat = 0, dog = 1.
    coco = read_data("boxes", {"kind": "coco", "root": str(coco_root(tmp_path / "coco"))})
    assert isinstance(coco.train, BoxDataset)
    assert coco.train.classes == ["cat", "dog"] and coco.train.category_ids == [3, 7]
    assert coco.info["category_ids"] == {"0": 3, "1": 7}
    expected = torch.tensor([[[1.0, 1.0, 2.0, 4.0, 6.0]]])
    assert torch.equal(coco.train.boxes, expected)
    # the same box in YOLO: centre (2.5, 4) / (10, 8) = (0.25, 0.5), size (3, 4) / (10, 8)
    yolo = read_data(
        "boxes", {"kind": "yolo", "root": str(yolo_root(tmp_path / "y", "1 0.25 0.5 0.3 0.5"))}
    )
    assert yolo.train.classes == ["cat", "dog"]
    assert torch.allclose(yolo.train.boxes, expected, atol=1e-5)
    assert torch.equal(coco.train.inputs, yolo.train.inputs)


def test_coco_leaves_crowd_annotations_out_and_pads_images_without_boxes(tmp_path):
    root = coco_root(tmp_path)
    png(root / "train/images/im2.png", gray(2, H, W))
    coco_file(
        root / "train",
        [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 8], "iscrowd": 1},
        ],
        images=[
            {"id": 1, "file_name": "im1.png", "width": W, "height": H},
            {"id": 2, "file_name": "im2.png", "width": W, "height": H},
        ],
    )
    splits = read_data("boxes", {"kind": "coco", "root": str(root)})
    assert torch.equal(
        splits.train.boxes, torch.tensor([[[0.0, 0, 0, 2, 2]], [[-1.0, 0, 0, 0, 0]]])
    )
    assert splits.info["crowd_annotations_left_out"] == 1


@pytest.mark.parametrize(
    ("annotation", "image", "message"),
    [
        ({"bbox": [8, 2, 3, 4]}, {}, r"annotations\[0\].*x1=8 .*x2=11.*outside the 10×8 image"),
        ({"category_id": 5}, {}, r"annotations\[0\]: category_id 5 is not in 'categories'"),
        ({"bbox": [1, 2, 3]}, {}, r"annotations\[0\]\.bbox: expected \[x, y, w, h\]"),
        ({"bbox": [1, 2, 0, 4]}, {}, r"has no area"),
        ({"image_id": 9}, {}, r"image_id 9 is not in 'images'"),
        ({}, {"width": 20}, r"image 1 \(im1\.png\) is 10×8 .* the file says 20×8"),
    ],
)
def test_coco_errors_name_the_file_and_field(tmp_path, annotation, image, message):
    root = coco_root(tmp_path)
    coco_file(
        root / "train",
        [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4], **annotation}],
        images=[{"id": 1, "file_name": "im1.png", "width": W, "height": H, **image}],
    )
    with pytest.raises(DataError, match=message) as caught:
        read_data("boxes", {"kind": "coco", "root": str(root)})
    assert "train/annotations.json" in str(caught.value).replace("\\", "/")


def test_coco_splits_must_share_their_categories(tmp_path):
    root = coco_root(tmp_path)
    coco_file(root / "test", [], categories=[{"id": 7, "name": "dog"}])
    with pytest.raises(DataError, match=r"test/annotations\.json: categories have ids \[7\]"):
        read_data("boxes", {"kind": "coco", "root": str(root)})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 0.25 0.5 0.3", r"im1\.txt, line 1: 4 numbers; a YOLO label line is `class cx cy w h`"),
        ("1 2.5 4 3 4", r"line 1: cx cy w h = .* must be fractions .* normalised"),
        ("2 0.25 0.5 0.3 0.5", r"line 1: class 2 is not a class index in \[0, 2\)"),
        ("0 0.1 0.1 0.2 0.2 0.3 0.3 0.1 0.4", r"9 numbers \(a segmentation polygon"),
        ("0 0.95 0.5 0.3 0.5", r"outside the 10×8 image"),
    ],
)
def test_yolo_errors_name_the_file_and_line(tmp_path, line, message):
    root = yolo_root(tmp_path, line)
    with pytest.raises(DataError, match=message):
        read_data("boxes", {"kind": "yolo", "root": str(root)})


def test_yolo_label_without_image_and_missing_classes(tmp_path):
    root = yolo_root(tmp_path, "0 0.5 0.5 0.2 0.2")
    (root / "train/labels/ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"ghost\.txt: label file without an image"):
        resolve("boxes", {"kind": "yolo", "root": str(root)})
    (root / "train/labels/ghost.txt").unlink()
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"data\.classes: YOLO labels hold class indices"):
        resolve("boxes", {"kind": "yolo", "root": str(root)})
    # an image without a label file is a background image (no boxes)
    (root / "train/labels/im1.txt").unlink()
    splits = read_data("boxes", {"kind": "yolo", "root": str(root), "classes": ["a", "b"]})
    assert torch.equal(splits.train.boxes, torch.tensor([[[-1.0, 0, 0, 0, 0]]]))


class BoxItems:
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(1, H, W), self.targets[i]


def torchvision_boxes():
    one = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]), "labels": torch.tensor([1])}
    two = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0], [5.0, 1.0, 9.0, 7.0]]), "labels": [0, 1]}
    return BoxItems([one, two]), BoxItems([one])


def bad_boxes():
    xywh = {"boxes": torch.tensor([[4.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([0])}
    return BoxItems([xywh]), BoxItems([xywh])


def test_box_factory_reads_torchvision_targets():
    splits = read_data("boxes", {"kind": "factory", "factory": "test_data_kinds:torchvision_boxes"})
    assert splits.train.classes == ["0", "1"]
    assert torch.equal(
        splits.train.boxes,
        torch.tensor(
            [[[1.0, 1, 2, 4, 6], [-1, 0, 0, 0, 0]], [[0.0, 0, 0, 2, 2], [1.0, 5, 1, 9, 7]]]
        ),
    )
    with pytest.raises(DataError, match=r"x2 ≤ x1 .* not \[x, y, w, h\]"):
        read_data("boxes", {"kind": "factory", "factory": "test_data_kinds:bad_boxes"})


def test_multitask_coco_with_masks(tmp_path):
    root = coco_root(tmp_path)
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:6, 1:4] = 1
    mask[0, 0] = 255
    for split in ("train", "test"):
        png(root / split / "masks" / "im1.png", mask)
    splits = read_data("mask+boxes", {"kind": "coco", "root": str(root)})
    data = splits.train
    assert isinstance(data, MaskBoxDataset) and data.seg_classes == ["0", "1"]
    inputs, target = data.get_batch(torch.tensor([0]))
    assert torch.equal(target["seg"][0], torch.tensor(mask, dtype=torch.int64))
    assert torch.equal(target["det"], torch.tensor([[[1.0, 1.0, 2.0, 4.0, 6.0]]]))
    assert data.with_target("seg").get_batch(torch.tensor([0]))[1].shape == (1, H, W)
    with pytest.raises(DataError, match=r"masks"):
        read_data("mask+boxes", {"kind": "coco", "root": str(coco_root(tmp_path / "nomasks"))})


# -- fingerprints ------------------------------------------------------------------------------
def test_fingerprints_follow_the_files_bytes(tmp_path):
    mask_folder(tmp_path / "m", {"train": {"a": M1}, "test": {"c": M3}})
    coco_root(tmp_path / "c")
    yolo_root(tmp_path / "y", "1 0.25 0.5 0.3 0.5")
    cases = [
        ("mask", {"kind": "masks", "root": str(tmp_path / "m")}, tmp_path / "m/train/masks/a.png"),
        (
            "boxes",
            {"kind": "coco", "root": str(tmp_path / "c")},
            tmp_path / "c/test/annotations.json",
        ),
        (
            "boxes",
            {"kind": "yolo", "root": str(tmp_path / "y")},
            tmp_path / "y/train/labels/im1.txt",
        ),
    ]
    for target, spec, edited in cases:
        kind, options = resolve(target, spec)
        before = kind.fingerprint(options)
        assert read_data(target, spec).fingerprint == before
        data = edited.read_bytes()
        if edited.suffix == ".png":
            png(edited, np.where(M1 == 2, 1, M1))
        else:
            edited.write_bytes(
                data.replace(b"0.3", b"0.2").replace(b"[1, 2, 3, 4]", b"[1, 2, 3, 3]")
            )
        assert kind.fingerprint(options) != before, edited
        edited.write_bytes(data)
        assert kind.fingerprint(options) == before
    # moving the whole folder keeps it; moving a file between splits changes it
    kind, options = resolve("mask", cases[0][1])
    before = kind.fingerprint(options)
    shutil.copytree(tmp_path / "m", tmp_path / "moved")
    assert kind.fingerprint({**options, "root": str(tmp_path / "moved")}) == before


# -- the registry and the tasks' refusals --------------------------------------------------------
def test_a_kind_of_another_task_is_refused_naming_what_the_task_reads():
    with pytest.raises(ConfigError, match=r"'coco' is not read by task segmentation.*masks: root"):
        resolve("mask", {"kind": "coco", "root": "x"})
    with pytest.raises(ConfigError, match=r"did you mean 'yolo'"):
        get_kind("boxes", "yollo")
    with pytest.raises(ConfigError, match=r"data: annotation: not read by data kind coco"):
        resolve("boxes", {"kind": "coco", "root": "x", "annotation": "a.json"})
    # a recipe's older `dataset:` names still resolve
    assert resolve("class", {"dataset": "digits", "root": None})[0].name == "digits"
    assert set(kinds_for("boxes")) == {"fashion_mnist_scenes", "coco", "yolo", "factory"}
