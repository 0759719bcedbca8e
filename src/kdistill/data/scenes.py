"""Fashion-MNIST scenes: several garments on one canvas, with a semantic mask and boxes.

A dense-prediction dataset (segmentation + detection) built from 28×28 Fashion-MNIST items. Each
scene is a ``size×size`` black canvas holding ``min_items…max_items`` items, each drawn from the
given images at a random position and scale. Everything is generated once, deterministically from
a seed (one ``torch.Generator``), into tensors.

Conventions (what the tensors mean):

- **Item**: a source image scaled to [0, 1] (uint8 / 255; float images must already lie in
  [0, 1]), resized bilinearly (``align_corners=False``) to ``side×side`` with
  ``side = round(28·s)``, s uniform in ``scale_range``, then placed with its top-left corner at a
  uniform position that keeps the whole ``side×side`` patch inside the canvas.
- **Foreground** of an item: its resized pixels with intensity ``> fg_threshold · max`` (the max
  of that resized item); the other pixels of the item are set to 0 (the faint halo is dropped),
  so an item contributes exactly its foreground.
- **Image**: the pixel-wise *maximum* of the placed items' foregrounds (0 elsewhere), then
  normalised like `load_fashion_mnist` does: ``(x − 0.2860) / 0.3530``.
- **Mask** (``int64 size×size``): 0 for background, ``label + 1`` where an item is visible. A
  pixel belongs to the item whose intensity the maximum shows there (ties go to the *later*
  item, which is "in front"). Hence mask > 0 exactly where the un-normalised image is > 0, and
  the image value at a pixel is the intensity of the item the mask names.
- **Boxes** (``float32 max_items×5`` per scene): ``[class, x1, y1, x2, y2]`` in pixels, the tight
  box of the item's *whole* foreground (occluded parts included, as in amodal detection
  labels). x is the column, y the row; **x2 and y2 are exclusive** (the box covers columns
  x1 … x2−1), i.e. continuous pixel-edge coordinates with area ``(x2 − x1)·(y2 − y1)``, the
  convention of `kdistill.engine.dense_metrics.box_iou`. Rows are in placement order; unused
  rows are padding ``[-1, 0, 0, 0, 0]``.
- **Overlap limit**: a placement is rejected (and another source, scale and position drawn, up
  to ``max_tries`` times per item) when its box has IoU > ``max_overlap`` with an already placed
  box, or when after compositing any item (new or old) would keep fewer than ``min_visible`` of
  its foreground pixels visible in the mask. So every box contains mask pixels of its class.
  An item that cannot be placed is dropped; a scene left with fewer than ``min_items`` raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.data.arrays import _as_index
from kdistill.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
)
from kdistill.errors import DataError

__all__ = ["SceneDataset", "fashion_mnist_scenes", "make_scenes", "scene_statistics"]

TARGET_KINDS = ("both", "seg", "det")
ITEM_SIZE = 28


@dataclass(eq=False)
class SceneDataset:
    """Scenes held in memory: ``inputs`` ``N×1×S×S`` float32 (normalised), ``masks`` ``N×S×S``
    int64 in ``[0, len(classes)]`` (0 = background, c + 1 = class c), ``boxes`` ``N×M×5`` float32
    ``[class, x1, y1, x2, y2]`` (x2, y2 exclusive; padding rows have class −1).

    ``get_batch`` returns ``(inputs, {"seg": masks, "det": boxes})``, the multi-task target that
    `Batch`, the distiller and ``Term(output="seg")`` understand. ``num_classes`` counts object
    classes (the detector's K); a segmentation head needs ``num_seg_classes = K + 1``.
    """

    inputs: Tensor
    masks: Tensor
    boxes: Tensor
    classes: list[str]
    name: str = "scenes"
    target_kind: str = "both"  # what get_batch returns as the target: "both", "seg" or "det"

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        k = len(self.classes)
        if self.target_kind not in TARGET_KINDS:
            raise DataError(
                f"dataset {self.name!r}: target_kind must be one of {TARGET_KINDS}, got "
                f"{self.target_kind!r}"
            )
        for label, tensor in (
            ("inputs", self.inputs),
            ("masks", self.masks),
            ("boxes", self.boxes),
        ):
            if not isinstance(tensor, Tensor):
                raise DataError(
                    f"dataset {self.name!r}: {label} must be a tensor, got {type(tensor).__name__}"
                )
        if self.inputs.dim() != 4 or self.inputs.dtype != torch.float32:
            raise DataError(
                f"dataset {self.name!r}: inputs must be N×C×H×W float32, got shape "
                f"{tuple(self.inputs.shape)} {self.inputs.dtype}"
            )
        n, _, h, w = self.inputs.shape
        if tuple(self.masks.shape) != (n, h, w) or self.masks.dtype != torch.int64:
            raise DataError(
                f"dataset {self.name!r}: masks must be int64 of shape {(n, h, w)}, got "
                f"{tuple(self.masks.shape)} {self.masks.dtype}"
            )
        if self.boxes.dim() != 3 or self.boxes.shape[0] != n or self.boxes.shape[2] != 5:
            raise DataError(
                f"dataset {self.name!r}: boxes must be N×M×5 [class, x1, y1, x2, y2] with N={n}, "
                f"got shape {tuple(self.boxes.shape)}"
            )
        if self.masks.numel() and (self.masks.min() < 0 or self.masks.max() > k):
            raise DataError(
                f"dataset {self.name!r}: mask values must lie in [0, {k}] for {k} classes, "
                f"found [{int(self.masks.min())}, {int(self.masks.max())}]"
            )
        labels = self.boxes[..., 0]
        if labels.numel() and (labels.min() < -1 or labels.max() >= k):
            raise DataError(
                f"dataset {self.name!r}: box classes must lie in [0, {k}) or be -1 (padding), "
                f"found [{float(labels.min())}, {float(labels.max())}]"
            )

    def __len__(self) -> int:
        return len(self.inputs)

    def __repr__(self) -> str:
        return (
            f"SceneDataset(name={self.name!r}, size={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, max_items={self.max_items})"
        )

    @property
    def num_classes(self) -> int:
        """Object classes (K); the segmentation mask has K + 1 values."""
        return len(self.classes)

    @property
    def num_seg_classes(self) -> int:
        """Background + K: the channel count of a segmentation head for these masks."""
        return len(self.classes) + 1

    @property
    def max_items(self) -> int:
        """Rows of ``boxes`` per scene (the padded box count)."""
        return int(self.boxes.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one scene, ``(1, size, size)``."""
        return tuple(self.inputs.shape[1:])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, dict[str, Tensor] | Tensor]:
        """``(inputs[indices], {"seg": masks[indices], "det": boxes[indices]})``; with
        ``target_kind`` "seg" or "det" the target is that one tensor (a single-task model)."""
        target = {"seg": self.masks[indices], "det": self.boxes[indices]}
        if self.target_kind != "both":
            return self.inputs[indices], target[self.target_kind]
        return self.inputs[indices], target

    def with_target(self, kind: str) -> SceneDataset:
        """The same scenes, batches carrying the ``kind`` target ("both", "seg" or "det")."""
        return dataclasses.replace(self, target_kind=kind)

    def subset(self, indices: Sequence[int] | Tensor, name: str | None = None) -> SceneDataset:
        """A new dataset holding the scenes at ``indices`` (in that order)."""
        index = _as_index(indices, len(self), self.name)
        return SceneDataset(
            inputs=self.inputs[index],
            masks=self.masks[index],
            boxes=self.boxes[index],
            classes=list(self.classes),
            name=name if name is not None else f"{self.name}-subset",
            target_kind=self.target_kind,
        )

    def fingerprint(self) -> str:
        """sha256 hex digest over the dtypes, shapes and bytes of inputs, masks and boxes."""
        digest = hashlib.sha256()
        for label, tensor in (
            ("inputs", self.inputs),
            ("masks", self.masks),
            ("boxes", self.boxes),
        ):
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"{label}:{array.dtype.str}:{tuple(array.shape)};".encode())
            digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()


def _unit_images(images: Tensor) -> Tensor:
    """``images`` as ``N×28×28`` float32 in [0, 1]: uint8 / 255, float checked to lie in [0, 1]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or tuple(images.shape[1:]) != (ITEM_SIZE, ITEM_SIZE):
        raise DataError(f"images must be N×28×28 or N×1×28×28, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise DataError(f"images must be uint8 or float, got {images.dtype}")
    images = images.to(torch.float32)
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise DataError(
            f"float images must lie in [0, 1], found [{float(images.min()):.3g}, "
            f"{float(images.max()):.3g}] (load Fashion-MNIST with normalize=False, or pass uint8)"
        )
    return images


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes with exclusive ends."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


def _composite(layers: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(values, owner)`` of item foregrounds (each ``S×S``, 0 off the item) in placement
    order: the pixel-wise maximum and the index of the item that attains it, the *later* one on
    ties (``>=`` below). ``owner`` is meaningful only where ``values > 0``."""
    values = torch.zeros_like(layers[0])
    owner = torch.zeros(layers[0].shape, dtype=torch.int64)
    for index, layer in enumerate(layers):
        front = (layer > 0) & (layer >= values)
        values = torch.where(front, layer, values)
        owner = torch.where(front, index, owner)
    return values, owner


def make_scenes(
    images: Tensor,
    labels: Tensor,
    count: int,
    size: int = 64,
    max_items: int = 4,
    min_items: int = 1,
    scale_range: tuple[float, float] = (0.6, 1.4),
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
    fg_threshold: float = 0.2,
    max_overlap: float = 0.3,
    min_visible: float = 0.5,
    max_tries: int = 20,
    normalize: bool = True,
    name: str = "scenes",
) -> SceneDataset:
    """``count`` scenes of ``size×size`` built from ``images`` (``N×28×28`` or ``N×1×28×28``,
    uint8 or float in [0, 1]) and their ``labels`` (``N`` ints in ``[0, len(classes))``).

    See the module docstring for the mask, box and overlap rules. Deterministic given the
    arguments: all randomness comes from one ``torch.Generator`` seeded with ``seed``.
    ``classes`` defaults to the 10 Fashion-MNIST class names. With ``normalize`` the inputs are
    ``(x − FASHION_MNIST_MEAN) / FASHION_MNIST_STD``, else x in [0, 1].
    """
    items = _unit_images(images)
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    classes = list(FASHION_MNIST_CLASSES if classes is None else classes)
    if len(labels) != len(items):
        raise DataError(f"{len(items)} images but {len(labels)} labels")
    if len(items) == 0:
        raise DataError("no source images to build scenes from")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(
            f"labels must lie in [0, {len(classes)}) for {len(classes)} classes, found "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if not 1 <= min_items <= max_items:
        raise ValueError(f"need 1 <= min_items <= max_items, got {min_items} and {max_items}")
    low, high = (float(v) for v in scale_range)
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
    largest = round(ITEM_SIZE * high)
    if size < largest:
        raise ValueError(
            f"size={size} is smaller than the largest item ({largest} px at scale {high})"
        )
    if not 0 <= fg_threshold < 1:
        raise ValueError(f"fg_threshold must lie in [0, 1), got {fg_threshold}")
    if not 0 <= max_overlap <= 1:
        raise ValueError(f"max_overlap must lie in [0, 1], got {max_overlap}")
    if not 0 <= min_visible <= 1:
        raise ValueError(f"min_visible must lie in [0, 1], got {min_visible}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")

    generator = torch.Generator().manual_seed(seed)
    label_list = labels.tolist()
    canvases = torch.zeros(count, size, size)
    masks = torch.zeros(count, size, size, dtype=torch.int64)
    boxes = torch.zeros(count, max_items, 5)
    boxes[:, :, 0] = -1
    for scene in range(count):
        wanted = int(torch.randint(min_items, max_items + 1, (1,), generator=generator))
        layers: list[Tensor] = []  # each item's foreground on the full canvas
        placed: list[tuple[int, tuple[int, int, int, int], int]] = []  # label, box, fg pixels
        for _ in range(wanted):
            for _ in range(max_tries):
                source = int(torch.randint(len(items), (1,), generator=generator))
                scale = low + (high - low) * float(torch.rand((), generator=generator))
                side = max(1, round(ITEM_SIZE * scale))
                top = int(torch.randint(size - side + 1, (1,), generator=generator))
                left = int(torch.randint(size - side + 1, (1,), generator=generator))
                patch = F.interpolate(
                    items[source][None, None],
                    size=(side, side),
                    mode="bilinear",
                    align_corners=False,
                )[0, 0].clamp(0, 1)
                peak = float(patch.max())
                foreground = patch > fg_threshold * peak
                if peak <= 0 or not bool(foreground.any()):
                    continue  # a blank item has nothing to show or box
                rows = torch.nonzero(foreground.any(dim=1)).flatten()
                cols = torch.nonzero(foreground.any(dim=0)).flatten()
                box = (
                    left + int(cols[0]),
                    top + int(rows[0]),
                    left + int(cols[-1]) + 1,
                    top + int(rows[-1]) + 1,
                )
                if any(_box_iou(box, other) > max_overlap for _, other, _ in placed):
                    continue
                layer = torch.zeros(size, size)
                layer[top : top + side, left : left + side] = torch.where(foreground, patch, 0.0)
                values, owner = _composite([*layers, layer])
                visible = torch.bincount(owner[values > 0], minlength=len(layers) + 1).tolist()
                totals = [fg for _, _, fg in placed] + [int(foreground.sum())]
                if any(v < min_visible * t for v, t in zip(visible, totals)):
                    continue
                layers.append(layer)
                placed.append((label_list[source], box, totals[-1]))
                break
        if len(placed) < min_items:
            raise DataError(
                f"scene {scene}: placed {len(placed)} items, fewer than min_items={min_items}, "
                f"after {max_tries} tries per item (lower max_items / min_items or the scale, "
                "or raise max_overlap)"
            )
        values, owner = _composite(layers)
        item_labels = torch.tensor([label for label, _, _ in placed])
        canvases[scene] = values
        masks[scene] = torch.where(values > 0, item_labels[owner] + 1, 0)
        for row, (label, box, _) in enumerate(placed):
            boxes[scene, row] = torch.tensor([label, *box], dtype=torch.float32)
    inputs = canvases.unsqueeze(1)
    if normalize:
        inputs = (inputs - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return SceneDataset(inputs=inputs, masks=masks, boxes=boxes, classes=classes, name=name)


def _split_seed(seed: int, split: str) -> int:
    """A 63-bit generator seed for one split, derived from ``(seed, split)`` by sha256."""
    digest = hashlib.sha256(f"kdistill-scenes:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def fashion_mnist_scenes(
    root: str | Path | None = None,
    train_count: int = 10000,
    test_count: int = 2000,
    size: int = 64,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[SceneDataset, SceneDataset]:
    """``(train, test)`` scenes: train scenes drawn from the Fashion-MNIST training images, test
    scenes from the test images (no item is shared), each split with its own generator seed
    derived from ``seed``. ``kwargs`` go to `make_scenes` (``max_items``, ``scale_range``, …).
    The files are found as `load_fashion_mnist` finds them (``root``, ``$KDISTILL_DATA``,
    ``/usr/share/datasets/fashion-mnist``).

    Generation takes about 1 ms per scene on one CPU core (10000 scenes ≈ 10 s); it is not
    cached.
    """
    result = []
    for split, count in (("train", train_count), ("test", test_count)):
        source = load_fashion_mnist(split, root=root, normalize=False)
        result.append(
            make_scenes(
                source.inputs,
                source.targets,
                count,
                size=size,
                seed=_split_seed(seed, split),
                classes=source.classes,
                name=f"fashion_mnist_scenes-{split}",
                **kwargs,
            )
        )
    return result[0], result[1]


def scene_statistics(dataset: SceneDataset) -> dict[str, float]:
    """Items per scene, box sizes (pixels) and foreground fraction: a quick sanity summary."""
    valid = dataset.boxes[..., 0] >= 0
    sizes = dataset.boxes[..., 3:5] - dataset.boxes[..., 1:3]
    widths, heights = sizes[..., 0][valid], sizes[..., 1][valid]
    return {
        "items_per_scene": float(valid.sum(dim=1).double().mean()),
        "box_width_mean": float(widths.mean()),
        "box_height_mean": float(heights.mean()),
        "box_side_min": float(torch.minimum(widths, heights).min()),
        "box_side_max": float(torch.maximum(widths, heights).max()),
        "foreground_fraction": float((dataset.masks > 0).double().mean()),
        "boxes": float(valid.sum()),
        "pixels": float(math.prod(dataset.masks.shape)),
    }
