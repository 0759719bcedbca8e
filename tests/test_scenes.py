"""Fashion-MNIST scenes: determinism, the mask / box conventions, batching with dict targets."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_cli import needs_fashion_mnist

from kdistill.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    Batch,
    BatchLoader,
    SceneDataset,
    fashion_mnist_scenes,
    make_scenes,
)
from kdistill.errors import DataError

BACKGROUND = -FASHION_MNIST_MEAN / FASHION_MNIST_STD  # a black pixel after normalisation


def synthetic_items(count: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` uint8 28×28 items: class c (= i mod 10) is a centred rectangle of width
    8 + 2c and height 24 − c, filled with random intensities in [128, 255]."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 28, 28, dtype=torch.uint8)
    labels = torch.arange(count) % 10
    for i, c in enumerate(labels.tolist()):
        w, h = 8 + 2 * c, 24 - c
        top, left = (28 - h) // 2, (28 - w) // 2
        images[i, top : top + h, left : left + w] = torch.randint(
            128, 256, (h, w), generator=generator, dtype=torch.uint8
        )
    return images, labels


def box_iou(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def check_scene_conventions(scenes: SceneDataset, max_overlap: float = 0.3) -> None:
    """The rules of the module docstring, checked scene by scene."""
    size = scenes.inputs.shape[-1]
    for image, mask, boxes in zip(scenes.inputs[:, 0], scenes.masks, scenes.boxes):
        valid = boxes[:, 0] >= 0
        # padding rows come last and are exactly [-1, 0, 0, 0, 0]
        count = int(valid.sum())
        assert bool(valid[:count].all()) and not bool(valid[count:].any())
        assert torch.equal(
            boxes[count:], torch.tensor([-1.0, 0, 0, 0, 0]).expand(len(boxes) - count, 5)
        )
        # mask > 0 exactly where the (un-normalised) image is lit
        lit = image > BACKGROUND + 1e-5
        assert torch.equal(lit, mask > 0)
        box_classes = set()
        for label, x1, y1, x2, y2 in boxes[valid].tolist():
            assert label == int(label)
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            assert all(v == int(v) for v in (x1, y1, x2, y2))
            region = mask[int(y1) : int(y2), int(x1) : int(x2)]
            assert bool((region == label + 1).any()), f"box {label, x1, y1, x2, y2} shows no mask"
            box_classes.add(int(label) + 1)
        assert set(mask.unique().tolist()) <= box_classes | {0}
        for a, b in itertools.combinations(boxes[valid][:, 1:].tolist(), 2):
            assert box_iou(a, b) <= max_overlap + 1e-9


def test_same_seed_gives_the_same_scenes_and_another_seed_does_not():
    images, labels = synthetic_items()
    first = make_scenes(images, labels, 12, seed=3)
    second = make_scenes(images, labels, 12, seed=3)
    other = make_scenes(images, labels, 12, seed=4)
    assert torch.equal(first.inputs, second.inputs)
    assert torch.equal(first.masks, second.masks)
    assert torch.equal(first.boxes, second.boxes)
    assert first.fingerprint() == second.fingerprint()
    assert first.fingerprint() != other.fingerprint()


def test_shapes_dtypes_and_item_counts():
    images, labels = synthetic_items()
    scenes = make_scenes(images, labels, 30, size=48, max_items=3, min_items=2, seed=0)
    assert scenes.inputs.shape == (30, 1, 48, 48) and scenes.inputs.dtype == torch.float32
    assert scenes.masks.shape == (30, 48, 48) and scenes.masks.dtype == torch.int64
    assert scenes.boxes.shape == (30, 3, 5) and scenes.boxes.dtype == torch.float32
    items = (scenes.boxes[..., 0] >= 0).sum(dim=1)
    assert int(items.min()) >= 2 and int(items.max()) <= 3
    assert scenes.input_shape == (1, 48, 48)
    assert scenes.num_classes == 10 and scenes.num_seg_classes == 11
    assert scenes.classes == FASHION_MNIST_CLASSES
    assert scenes.max_items == 3 and len(scenes) == 30


def test_masks_and_boxes_follow_the_conventions_on_synthetic_items():
    images, labels = synthetic_items()
    check_scene_conventions(make_scenes(images, labels, 60, seed=1))


def test_one_item_at_scale_one_keeps_its_rectangle():
    # A 10-row × 12-column rectangle (rows 5-14, columns 8-19) at scale 1: the resize to 28×28 is
    # the identity, so the box is 12 wide and 10 high and the mask is the rectangle exactly.
    image = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    image[0, 0, 5:15, 8:20] = 200
    scenes = make_scenes(image, torch.tensor([7]), 5, max_items=1, scale_range=(1.0, 1.0), seed=0)
    for mask, boxes, inputs in zip(scenes.masks, scenes.boxes, scenes.inputs):
        label, x1, y1, x2, y2 = boxes[0].tolist()
        assert label == 7
        assert (x2 - x1, y2 - y1) == (12, 10)
        expected = torch.zeros(64, 64, dtype=torch.int64)
        expected[int(y1) : int(y2), int(x1) : int(x2)] = 8  # class 7 → mask value 8
        assert torch.equal(mask, expected)
        lit = inputs[0][mask > 0] * FASHION_MNIST_STD + FASHION_MNIST_MEAN
        assert torch.allclose(lit, torch.full_like(lit, 200 / 255), atol=1e-5)


def test_pixels_under_the_foreground_threshold_are_dropped():
    # intensity 200 inside, a faint band of 30 < 0.2 · 200 on its left: the band is background
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 5:15, 8:20] = 200
    image[0, 5:15, 2:8] = 30
    scenes = make_scenes(
        image, torch.tensor([0]), 3, max_items=1, scale_range=(1.0, 1.0), seed=0, normalize=False
    )
    for mask, boxes, inputs in zip(scenes.masks, scenes.boxes, scenes.inputs):
        _, x1, y1, x2, y2 = boxes[0].tolist()
        assert x2 - x1 == 12  # the band (columns 2-7) is not in the box
        assert int((mask > 0).sum()) == 120 and int((inputs > 0).sum()) == 120


def test_a_later_item_wins_a_tie():
    # two identical full squares at scale 1 in a 28×28 canvas land on the same pixels; with
    # max_overlap=1 and min_visible=0 both are kept, and the later one (class 1) owns the mask
    image = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    scenes = make_scenes(
        torch.cat([image, image]),
        torch.tensor([0, 1]),
        8,
        size=28,
        max_items=2,
        min_items=2,
        scale_range=(1.0, 1.0),
        seed=0,
        max_overlap=1.0,
        min_visible=0.0,
    )
    for mask, boxes in zip(scenes.masks, scenes.boxes):
        later = int(boxes[1, 0])
        assert torch.equal(mask, torch.full((28, 28), later + 1))


def test_unplaceable_items_raise_a_data_error():
    blank = torch.zeros(3, 28, 28, dtype=torch.uint8)  # no foreground to place
    with pytest.raises(DataError, match="fewer than min_items"):
        make_scenes(blank, torch.tensor([0, 1, 2]), 2, max_tries=3)


def test_bad_arguments_are_rejected():
    images, labels = synthetic_items(10)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        make_scenes(images.float(), labels, 2)  # float images must already be in [0, 1]
    with pytest.raises(ValueError, match="smaller than the largest item"):
        make_scenes(images, labels, 2, size=32)  # 28 · 1.4 = 39 px does not fit
    with pytest.raises(ValueError, match="min_items"):
        make_scenes(images, labels, 2, min_items=3, max_items=2)
    with pytest.raises(DataError, match="labels"):
        make_scenes(images, labels + 5, 2)


def test_float_images_in_unit_range_match_uint8():
    images, labels = synthetic_items(20)
    from_uint8 = make_scenes(images, labels, 6, seed=2)
    from_float = make_scenes(images.float().div(255).unsqueeze(1), labels, 6, seed=2)
    assert from_uint8.fingerprint() == from_float.fingerprint()


def test_get_batch_subset_and_loader_with_dict_targets():
    images, labels = synthetic_items()
    scenes = make_scenes(images, labels, 10, seed=0)
    inputs, target = scenes.get_batch(torch.tensor([4, 1]))
    assert torch.equal(inputs, scenes.inputs[[4, 1]])
    assert torch.equal(target["seg"], scenes.masks[[4, 1]])
    assert torch.equal(target["det"], scenes.boxes[[4, 1]])

    part = scenes.subset([4, 1], name="part")
    assert part.name == "part" and len(part) == 2
    assert torch.equal(part.boxes, scenes.boxes[[4, 1]])
    assert part.fingerprint() != scenes.fingerprint()
    with pytest.raises(IndexError):
        scenes.subset([10])

    batches = list(BatchLoader(scenes, batch_size=4, shuffle=True, seed=1))
    assert [len(b) for b in batches] == [4, 4, 2]
    batch = batches[0]
    assert set(batch.target) == {"seg", "det"}
    assert torch.equal(batch.target["det"], scenes.boxes[batch.index])
    moved = batch.to("meta")
    assert isinstance(moved, Batch)
    assert moved.inputs.device.type == "meta" and moved.index.device.type == "meta"
    assert {t.device.type for t in moved.target.values()} == {"meta"}


def test_dataset_checks_its_tensors():
    images, labels = synthetic_items()
    scenes = make_scenes(images, labels, 2, seed=0)
    with pytest.raises(DataError, match="mask values"):
        SceneDataset(scenes.inputs, scenes.masks + 11, scenes.boxes, scenes.classes)
    with pytest.raises(DataError, match="boxes must be"):
        SceneDataset(scenes.inputs, scenes.masks, scenes.boxes[..., :4], scenes.classes)


@needs_fashion_mnist
def test_scenes_from_real_fashion_mnist():
    train, test = fashion_mnist_scenes(train_count=80, test_count=40, seed=0)
    assert (len(train), len(test)) == (80, 40)
    assert train.name == "fashion_mnist_scenes-train" and test.name == "fashion_mnist_scenes-test"
    assert train.classes == FASHION_MNIST_CLASSES
    check_scene_conventions(train)
    check_scene_conventions(test)
    again, _ = fashion_mnist_scenes(train_count=80, test_count=1, seed=0)
    assert again.fingerprint() == train.fingerprint()
    other, _ = fashion_mnist_scenes(train_count=80, test_count=1, seed=1)
    assert other.fingerprint() != train.fingerprint()
    # foreground boxes of 28-px items scaled by 0.6-1.4
    sizes = train.boxes[..., 3:] - train.boxes[..., 1:3]
    valid = train.boxes[..., 0] >= 0
    assert float(sizes[valid].max()) <= 40
