"""Dense-prediction metrics: segmentation mIoU / pixel accuracy and detection mAP.

Same pattern as `kdistill.engine.metrics`: `reset()`, `update()` per batch, `reduce()` across
ranks (a no-op in a single process), then `compute()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from kdistill.engine.distributed import all_reduce_sum, is_distributed


class SegmentationMetrics:
    """Confusion matrix over pixels → mIoU, pixel accuracy and IoU per class.

    ``confusion[t, p]`` counts pixels of target class t predicted as p; pixels whose target is
    `ignore_index` are skipped. IoU_c = TP / (TP + FP + FN). A class absent from both the target
    and the prediction (0 / 0) has IoU NaN and is left out of the mean: **mIoU is the mean IoU
    over the classes present in the target or in the prediction** (a class only predicted counts,
    with IoU 0). Pixel accuracy = correctly labelled pixels / non-ignored pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, output: Tensor, target: Tensor) -> None:
        """`output`: logits N×K×H×W (arg-maxed over K) or predicted classes N×H×W;
        `target`: classes N×H×W (may hold `ignore_index`)."""
        output = output.detach()
        if output.dim() == target.dim() + 1:
            if output.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {output.shape[1]} classes (shape {tuple(output.shape)}), "
                    f"expected num_classes={self.num_classes}"
                )
            prediction = output.argmax(dim=1)
        elif output.dim() == target.dim():
            if output.is_floating_point():
                raise TypeError(
                    f"predictions of shape {tuple(output.shape)} must hold integer classes, got "
                    f"dtype {output.dtype} (pass logits as N×K×H×W to have them arg-maxed)"
                )
            prediction = output
        else:
            raise ValueError(
                "output must be logits N×K×H×W or predictions N×H×W for a target N×H×W, got "
                f"shapes {tuple(output.shape)} and {tuple(target.shape)}"
            )
        if prediction.shape != target.shape:
            raise ValueError(
                f"predictions and target must cover the same pixels, got shapes "
                f"{tuple(prediction.shape)} and {tuple(target.shape)}"
            )
        if target.is_floating_point():
            raise TypeError(f"target must hold integer classes, got dtype {target.dtype}")
        prediction, target = prediction.flatten().long(), target.flatten().long()
        if self.ignore_index is not None:
            kept = target != self.ignore_index
            prediction, target = prediction[kept], target[kept]
        k = self.num_classes
        for values, what in ((target, "target"), (prediction, "predicted")):
            if values.numel() and (values.min() < 0 or values.max() >= k):
                raise ValueError(
                    f"{what} classes must lie in [0, {k - 1}]"
                    + (f" or be ignore_index={self.ignore_index}" if what == "target" else "")
                    + f", got min {int(values.min())} and max {int(values.max())}"
                )
        counts = torch.bincount(target * k + prediction, minlength=k * k)
        self.confusion += counts.view(k, k).cpu()

    def reduce(self) -> None:
        """Sum the confusion matrix over all ranks (a no-op in a single process)."""
        self.confusion = all_reduce_sum(self.confusion)

    def compute(self) -> dict[str, float | list[float]]:
        confusion = self.confusion.double()
        total = confusion.sum()
        if total == 0:
            raise ValueError("segmentation metrics of an empty evaluation set (no counted pixel)")
        true_positive = confusion.diag()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), math.nan)
        present = union > 0
        return {
            "miou": float(iou[present].mean()),
            "pixel_accuracy": float(true_positive.sum() / total),
            "iou_per_class": iou.tolist(),
        }


def average_precision_voc(
    recall: Tensor | Sequence[float], precision: Tensor | Sequence[float]
) -> float:
    """Area under the precision-recall curve, VOC all-point interpolation (VOC 2010 onwards).

    `recall` / `precision`: the curve after each detection in descending-score order (recall
    non-decreasing). The curve is closed with (0, 0) in front and (1, 0) behind; precision is
    replaced by its envelope ``p̂(r) = max_{r' ≥ r} p(r')`` (monotone from the right); the area is
    ``Σ_i (r_{i+1} − r_i) · p̂(r_{i+1})`` over the points where recall changes.
    An empty curve (no detection) has area 0.
    """
    recall = torch.as_tensor(recall, dtype=torch.float64).cpu()
    precision = torch.as_tensor(precision, dtype=torch.float64).cpu()
    if recall.dim() != 1 or recall.shape != precision.shape:
        raise ValueError(
            "recall and precision must be 1-D and of the same length, got shapes "
            f"{tuple(recall.shape)} and {tuple(precision.shape)}"
        )
    if recall.numel() and bool((recall[1:] < recall[:-1]).any()):
        raise ValueError("recall must be non-decreasing (points in descending-score order)")
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    r = torch.cat([zero, recall, one])
    p = torch.cat([zero, precision, zero])
    envelope = p.flip(0).cummax(dim=0).values.flip(0)
    changes = torch.nonzero(r[1:] != r[:-1]).flatten()
    return float(((r[changes + 1] - r[changes]) * envelope[changes + 1]).sum())


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of boxes `a` (M×4) and `b` (N×4) given as [x1, y1, x2, y2] → M×N.

    Continuous coordinates: a box's area is (x2 − x1)·(y2 − y1) (no "+1 pixel"). Pairs whose
    union is empty (two degenerate boxes) have IoU 0.
    """
    if a.dim() != 2 or a.shape[1] != 4 or b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(
            f"boxes must be M×4 and N×4 [x1, y1, x2, y2], got {tuple(a.shape)} and {tuple(b.shape)}"
        )

    def area(boxes: Tensor) -> Tensor:
        return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)

    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    sides = (bottom_right - top_left).clamp(min=0)
    intersection = sides[..., 0] * sides[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny), 0)


class DetectionMAP:
    """Detection mean average precision at one IoU threshold (mAP@0.5 by default, VOC-style).

    `update(predictions, targets)` per batch: `predictions` a list (one entry per image) of P×6
    tensors ``[x1, y1, x2, y2, score, class]``; `targets` a list of G×5 tensors
    ``[class, x1, y1, x2, y2]`` or one padded N×M×5 tensor whose padding rows have class −1.

    Matching, per image and class: detections in descending score (stable sort, so ties keep
    their input order) each take the *still unmatched* ground-truth box of the same class with
    the highest IoU, if that IoU is ≥ `iou_threshold` (true positive); otherwise (no box left
    above the threshold — e.g. a duplicate of an already matched box) it is a false positive.
    Per class, all detections of all images are sorted by score (descending, stable; images in
    update order) into a precision-recall curve, and AP is its `average_precision_voc` area.
    mAP is the mean AP over classes with at least one ground-truth box; a class without any has
    AP NaN in ``ap_per_class`` and does not count. `compute()` →
    ``{"map50": mAP, "ap_per_class": [...]}`` (the key says the threshold: "map75" at 0.75).

    Each image is matched when it is added; its record (scores, classes, true-positive flags and
    ground-truth counts per class) is kept, and `reduce()` gathers the records of all ranks.
    """

    def __init__(self, num_classes: int, iou_threshold: float = 0.5) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
        self.num_classes = num_classes
        self.iou_threshold = float(iou_threshold)
        self.reset()

    def reset(self) -> None:
        self.records: list[dict[str, Tensor]] = []

    @property
    def key(self) -> str:
        return f"map{self.iou_threshold * 100:g}"

    def update(self, predictions: Sequence[Tensor], targets: Sequence[Tensor] | Tensor) -> None:
        if isinstance(predictions, Tensor):
            raise TypeError("predictions must be a list of P×6 tensors, one per image")
        if isinstance(targets, Tensor) and targets.dim() != 3:
            raise ValueError(
                f"padded targets must be N×M×5 [class, x1, y1, x2, y2], got shape "
                f"{tuple(targets.shape)}"
            )
        if len(predictions) != len(targets):
            raise ValueError(
                f"{len(predictions)} images of predictions but {len(targets)} of targets"
            )
        for image_predictions, image_targets in zip(predictions, targets):
            self.records.append(self._match_image(image_predictions, image_targets))

    def _match_image(self, predictions: Tensor, targets: Tensor) -> dict[str, Tensor]:
        predictions = _rows(predictions, 6, "predictions [x1, y1, x2, y2, score, class]")
        targets = _rows(targets, 5, "targets [class, x1, y1, x2, y2]")
        targets = targets[targets[:, 0] != -1]  # padding rows
        k = self.num_classes
        pred_classes = predictions[:, 5].long()
        gt_classes = targets[:, 0].long()
        for classes, values, what in (
            (pred_classes, predictions[:, 5], "predicted"),
            (gt_classes, targets[:, 0], "target"),
        ):
            if not torch.equal(classes.to(values.dtype), values):
                raise ValueError(f"{what} classes must be whole numbers, got {values.tolist()}")
            if classes.numel() and (classes.min() < 0 or classes.max() >= k):
                raise ValueError(
                    f"{what} classes must lie in [0, {k - 1}], got {sorted(set(classes.tolist()))}"
                )
        scores = predictions[:, 4]
        order = torch.sort(scores, descending=True, stable=True).indices
        iou = box_iou(predictions[:, :4], targets[:, 1:])  # P×G
        same_class = pred_classes[:, None] == gt_classes[None, :]
        matched = torch.zeros(len(targets), dtype=torch.bool)
        true_positive = torch.zeros(len(predictions), dtype=torch.bool)
        for d in order.tolist():
            candidates = torch.where(same_class[d] & ~matched, iou[d], -1.0)
            if candidates.numel() == 0:
                continue
            best = int(candidates.argmax())
            if candidates[best] >= self.iou_threshold:
                matched[best] = True
                true_positive[d] = True
        return {
            "scores": scores,
            "classes": pred_classes,
            "true_positive": true_positive,
            "num_targets": torch.bincount(gt_classes, minlength=k),
        }

    def reduce(self) -> None:
        """Under torchrun, gather every rank's image records (rank order) onto every rank;
        a no-op in a single process. Call once, before `compute()`."""
        if not is_distributed():
            return
        gathered: list[list[dict[str, Tensor]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.records)
        self.records = [record for records in gathered for record in (records or [])]

    def compute(self) -> dict[str, float | list[float]]:
        k = self.num_classes
        if self.records:
            scores = torch.cat([r["scores"] for r in self.records])
            classes = torch.cat([r["classes"] for r in self.records])
            true_positive = torch.cat([r["true_positive"] for r in self.records])
            num_targets = torch.stack([r["num_targets"] for r in self.records]).sum(dim=0)
        else:
            scores = torch.zeros(0, dtype=torch.float64)
            classes = torch.zeros(0, dtype=torch.long)
            true_positive = torch.zeros(0, dtype=torch.bool)
            num_targets = torch.zeros(k, dtype=torch.long)
        if int(num_targets.sum()) == 0:
            raise ValueError("mAP of an evaluation set without any ground-truth box")
        ap_per_class: list[float] = []
        for c in range(k):
            if num_targets[c] == 0:
                ap_per_class.append(math.nan)
                continue
            mine = classes == c
            order = torch.sort(scores[mine], descending=True, stable=True).indices
            hits = true_positive[mine][order].double()
            tp = hits.cumsum(0)
            fp = (1 - hits).cumsum(0)
            recall = tp / float(num_targets[c])
            precision = tp / (tp + fp)
            ap_per_class.append(average_precision_voc(recall, precision))
        counted = [ap for ap, n in zip(ap_per_class, num_targets.tolist()) if n > 0]
        return {self.key: sum(counted) / len(counted), "ap_per_class": ap_per_class}


def _rows(boxes: Tensor, width: int, what: str) -> Tensor:
    """`boxes` as a float64 CPU R×width tensor; an empty tensor of any shape is 0 rows."""
    boxes = torch.as_tensor(boxes).detach()
    if boxes.numel() == 0:
        return torch.zeros(0, width, dtype=torch.float64)
    if boxes.dim() != 2 or boxes.shape[1] != width:
        raise ValueError(f"{what} must be R×{width} per image, got shape {tuple(boxes.shape)}")
    return boxes.to(device="cpu", dtype=torch.float64)
