"""In-memory datasets of images with masks, boxes or both, and the box conventions, written once.

**Boxes.** Inside kdistill a box is a row ``[class, x1, y1, x2, y2]`` in pixels, continuous
pixel-edge coordinates (a box covering columns 0 … 9 has x1 = 0, x2 = 10; area
``(x2 − x1)·(y2 − y1)``), the convention of `kdistill.data.scenes`, `tasks.dense_metrics.box_iou`
and `ops.boxes.encode_targets`. An image's rows are padded to the dataset's largest count with
``[-1, 0, 0, 0, 0]``. The field's conventions convert to it here and nowhere else:

- COCO ``bbox`` ``[x, y, w, h]`` (pixels, (x, y) the top-left corner) →
  ``x, y, x + w, y + h``;
- YOLO label line ``class cx cy w h`` (fractions of the image width W / height H) →
  ``(cx − w/2)·W, (cy − h/2)·H, (cx + w/2)·W, (cy + h/2)·H``;
- torchvision target ``{"boxes": M×4 xyxy pixels, "labels": M}`` → as given.

**Masks** hold one class index per pixel (int64); pixels equal to the dataset's `ignore_index`
(255, the VOC / Cityscapes void label) are void: left out of the loss and of mIoU.

`MaskDataset` (task segmentation), `BoxDataset` (detection) and `MaskBoxDataset` (multitask)
share `SceneDataset`'s interface: ``get_batch`` for kdistill's `BatchLoader`, ``dataset[i]`` for
a torch ``DataLoader`` (masks and padded box rows stack with the default collate), ``subset``,
``fingerprint``, ``with_target`` and the sizes the tasks read (`input_shape`, `num_classes`,
`num_seg_classes`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.arrays import _as_index
from kdistill.errors import DataError

__all__ = [
    "VOID",
    "BoxDataset",
    "MaskBoxDataset",
    "MaskDataset",
    "box_rows",
    "check_mask_values",
    "coco_to_xyxy",
    "pad_box_rows",
    "yolo_to_xyxy",
]

VOID = 255  # the void label of VOC / Cityscapes masks
BOX_TOLERANCE = 0.5  # pixels a box may reach past the image (rounding in exported files)


# -- box conventions --------------------------------------------------------------------------
def coco_to_xyxy(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` (pixels, top-left corner) → ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def yolo_to_xyxy(
    cx: float, cy: float, w: float, h: float, width: int, height: int
) -> tuple[float, float, float, float]:
    """YOLO ``cx cy w h`` (fractions of the image's `width` / `height`) → pixel
    ``(x1, y1, x2, y2)``."""
    return (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height


def check_box(
    box: Sequence[float], width: int, height: int, where: str, fix: str
) -> tuple[float, float, float, float]:
    """`box` (x1, y1, x2, y2 pixels) checked to have a positive size and to lie in the image
    (up to `BOX_TOLERANCE` px, then clipped); DataError naming `where` and `fix` otherwise."""
    x1, y1, x2, y2 = box
    if not all(np.isfinite(v) for v in box):
        raise DataError(f"{where}: box {list(box)} holds a non-finite number")
    if x2 <= x1 or y2 <= y1:
        raise DataError(
            f"{where}: box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} has no area "
            f"(width {x2 - x1:g}, height {y2 - y1:g}); {fix}"
        )
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise DataError(
            f"{where}: box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} lies outside the "
            f"{width}×{height} image; {fix}"
        )
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def box_rows(boxes: Any, labels: Any, where: str) -> Tensor:
    """torchvision's ``boxes`` (M×4 xyxy pixels) and ``labels`` (M) as kdistill's ``M×5``
    rows ``[class, x1, y1, x2, y2]`` (float32); DataError for other shapes or labels."""
    boxes = torch.as_tensor(boxes if boxes is not None else [], dtype=torch.float32)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise DataError(
            f"{where}: boxes must be M×4 [x1, y1, x2, y2] in pixels (torchvision's convention), "
            f"got shape {tuple(boxes.shape)}"
        )
    labels = torch.as_tensor(labels if labels is not None else [], dtype=torch.float64).reshape(-1)
    if len(labels) != len(boxes):
        raise DataError(f"{where}: {len(boxes)} boxes but {len(labels)} labels")
    if len(labels) and (bool((labels != labels.round()).any()) or float(labels.min()) < 0):
        raise DataError(f"{where}: labels must be class indices ≥ 0, got {labels.tolist()}")
    if len(boxes) and bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
        bad = int(torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0])
        raise DataError(
            f"{where}: box {bad} {boxes[bad].tolist()} has x2 ≤ x1 or y2 ≤ y1; boxes are "
            "[x1, y1, x2, y2] (corners), not [x, y, w, h] (convert COCO boxes with x2 = x + w)"
        )
    return torch.cat([labels.to(torch.float32)[:, None], boxes], dim=1)


def pad_box_rows(rows: Sequence[Tensor], width: int | None = None) -> Tensor:
    """``N×M×5``: each image's rows padded with ``[-1, 0, 0, 0, 0]`` to M = the largest count
    (at least 1, or `width`)."""
    largest = max([len(r) for r in rows] + [1])
    width = largest if width is None else width
    out = torch.zeros(len(rows), width, 5)
    out[:, :, 0] = -1
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# -- masks ------------------------------------------------------------------------------------
def check_mask_values(mask: np.ndarray | Tensor, num_classes: int, void: int | None, where: str):
    """DataError naming `where`, the value and its first pixel (row, column) when `mask` holds
    a value that is neither a class in [0, num_classes) nor `void`."""
    values = mask.numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    bad = (values < 0) | (values >= num_classes)
    if void is not None:
        bad &= values != void
    if bad.any():
        position = tuple(int(v) for v in np.argwhere(bad)[0])
        value = int(values[position])
        void_text = f" or the void label {void}" if void is not None else ""
        sample = f"sample {position[0]}, " if len(position) == 3 else ""
        raise DataError(
            f"{where}: {sample}pixel (row {position[-2]}, column {position[-1]}) has value "
            f"{value}, not a class in [0, {num_classes}){void_text}; give data.classes with every "
            "class (a mask pixel is a class index), or mark void pixels with the void label"
        )


def _digest(label_tensors: Sequence[tuple[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    for label, tensor in label_tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{label}:{array.dtype.str}:{tuple(array.shape)};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _check_inputs(inputs: Any, name: str) -> tuple[int, int, int, int]:
    if not isinstance(inputs, Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        what = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise DataError(f"dataset {name!r}: inputs must be a float N×C×H×W tensor, got {what}")
    n, c, h, w = inputs.shape
    return int(n), int(c), int(h), int(w)


def _check_masks(masks: Any, shape: tuple[int, int, int], classes: int, void, name: str) -> None:
    if not isinstance(masks, Tensor) or tuple(masks.shape) != shape or masks.dtype != torch.int64:
        what = (
            f"{tuple(masks.shape)} {masks.dtype}"
            if isinstance(masks, Tensor)
            else type(masks).__name__
        )
        raise DataError(f"dataset {name!r}: masks must be int64 of shape {shape}, got {what}")
    check_mask_values(masks, classes, void, f"dataset {name!r}: masks")


def _check_boxes(boxes: Any, n: int, classes: int, name: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 3 or boxes.shape[0] != n:
        what = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise DataError(
            f"dataset {name!r}: boxes must be N×M×5 [class, x1, y1, x2, y2] with N={n}, got {what}"
        )
    if boxes.shape[2] != 5:
        raise DataError(f"dataset {name!r}: boxes must have 5 columns, got {tuple(boxes.shape)}")
    labels = boxes[..., 0]
    if labels.numel() and (labels.min() < -1 or labels.max() >= classes):
        raise DataError(
            f"dataset {name!r}: box classes must lie in [0, {classes}) or be -1 (padding), found "
            f"[{float(labels.min()):g}, {float(labels.max()):g}]"
        )


@dataclass(eq=False)
class MaskDataset:
    """Images with masks: ``inputs`` ``N×C×H×W`` float32, ``masks`` ``N×H×W`` int64 (class
    index per pixel, `ignore_index` on void pixels), ``classes`` the mask classes (background
    included when the masks have one). ``num_seg_classes = len(classes)``."""

    inputs: Tensor
    masks: Tensor
    classes: list[str]
    ignore_index: int | None = VOID
    name: str = "masks"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        n, _, h, w = _check_inputs(self.inputs, self.name)
        _check_masks(self.masks, (n, h, w), len(self.classes), self.ignore_index, self.name)

    def __len__(self) -> int:
        return len(self.inputs)

    def __repr__(self) -> str:
        return (
            f"MaskDataset(name={self.name!r}, size={len(self)}, input_shape={self.input_shape}, "
            f"num_seg_classes={self.num_seg_classes}, ignore_index={self.ignore_index})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_seg_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.inputs[i], self.masks[i]

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[indices], self.masks[indices]

    def with_target(self, kind: str) -> MaskDataset:
        if kind != "seg":
            raise ValueError(
                f"dataset {self.name!r} holds masks only, no boxes (asked for {kind!r}); task "
                "segmentation reads it"
            )
        return self

    def subset(self, indices: Sequence[int] | Tensor, name: str | None = None) -> MaskDataset:
        index = _as_index(indices, len(self), self.name)
        return MaskDataset(
            self.inputs[index],
            self.masks[index],
            list(self.classes),
            self.ignore_index,
            name if name is not None else f"{self.name}-subset",
            dict(self.info),
        )

    def fingerprint(self) -> str:
        return _digest([("inputs", self.inputs), ("masks", self.masks)])


@dataclass(eq=False)
class BoxDataset:
    """Images with boxes: ``inputs`` ``N×C×H×W`` float32, ``boxes`` ``N×M×5`` float32
    ``[class, x1, y1, x2, y2]`` pixels (padding rows class −1), ``classes`` the object classes
    (no background). ``category_ids[i]``: the id class i had in the source (COCO category ids),
    kept so a run can store the map."""

    inputs: Tensor
    boxes: Tensor
    classes: list[str]
    name: str = "boxes"
    category_ids: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        n, _, _, _ = _check_inputs(self.inputs, self.name)
        _check_boxes(self.boxes, n, len(self.classes), self.name)

    def __len__(self) -> int:
        return len(self.inputs)

    def __repr__(self) -> str:
        return (
            f"BoxDataset(name={self.name!r}, size={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, max_boxes={self.boxes.shape[1]})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.inputs[i], self.boxes[i]

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[indices], self.boxes[indices]

    def with_target(self, kind: str) -> BoxDataset:
        if kind != "det":
            raise ValueError(
                f"dataset {self.name!r} holds boxes only, no masks (asked for {kind!r}); task "
                "detection reads it"
            )
        return self

    def subset(self, indices: Sequence[int] | Tensor, name: str | None = None) -> BoxDataset:
        index = _as_index(indices, len(self), self.name)
        return BoxDataset(
            self.inputs[index],
            self.boxes[index],
            list(self.classes),
            name if name is not None else f"{self.name}-subset",
            self.category_ids,
            dict(self.info),
        )

    def fingerprint(self) -> str:
        return _digest([("inputs", self.inputs), ("boxes", self.boxes)])


@dataclass(eq=False)
class MaskBoxDataset:
    """Images with masks and boxes (multi-task): targets ``{"seg": masks, "det": boxes}``;
    ``seg_classes`` name the mask values, ``classes`` the box classes."""

    inputs: Tensor
    masks: Tensor
    boxes: Tensor
    seg_classes: list[str]
    classes: list[str]
    ignore_index: int | None = VOID
    name: str = "masks+boxes"
    category_ids: list[int] | None = None
    target_kind: str = "both"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seg_classes, self.classes = list(self.seg_classes), list(self.classes)
        n, _, h, w = _check_inputs(self.inputs, self.name)
        _check_masks(self.masks, (n, h, w), len(self.seg_classes), self.ignore_index, self.name)
        _check_boxes(self.boxes, n, len(self.classes), self.name)
        if self.target_kind not in ("both", "seg", "det"):
            raise DataError(f"dataset {self.name!r}: target_kind must be both, seg or det")

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_seg_classes(self) -> int:
        return len(self.seg_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def _target(self, masks: Tensor, boxes: Tensor) -> Any:
        both = {"seg": masks, "det": boxes}
        return both if self.target_kind == "both" else both[self.target_kind]

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        return self.inputs[i], self._target(self.masks[i], self.boxes[i])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Any]:
        return self.inputs[indices], self._target(self.masks[indices], self.boxes[indices])

    def with_target(self, kind: str) -> MaskBoxDataset:
        return self.subset(torch.arange(len(self)), name=self.name, target_kind=kind)

    def subset(
        self,
        indices: Sequence[int] | Tensor,
        name: str | None = None,
        target_kind: str | None = None,
    ) -> MaskBoxDataset:
        index = _as_index(indices, len(self), self.name)
        return MaskBoxDataset(
            self.inputs[index],
            self.masks[index],
            self.boxes[index],
            list(self.seg_classes),
            list(self.classes),
            self.ignore_index,
            name if name is not None else f"{self.name}-subset",
            self.category_ids,
            target_kind or self.target_kind,
            dict(self.info),
        )

    def fingerprint(self) -> str:
        return _digest([("inputs", self.inputs), ("masks", self.masks), ("boxes", self.boxes)])
