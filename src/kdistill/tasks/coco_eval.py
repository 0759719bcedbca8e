"""COCO detection metrics computed by `pycocotools` (the field's reference implementation).

`coco_metrics(images, num_classes, image_size)`: AP@[.5:.95] (``ap``), AP50 (``ap50``), AP75
(``ap75``) and, where the evaluation set has ground-truth boxes of that size, APs / APm / APl
(``ap_small``, ``ap_medium``, ``ap_large``: areas < 32², 32²–96², > 96² pixels), exactly as
`pycocotools.cocoeval.COCOeval(..., "bbox")` reports them (stats[0..5]; at most 100 detections
per image, the highest-scoring).

How kdistill's own ``map50`` differs (`dense_metrics.DetectionMAP`): the matching is the same
(each detection, in descending score, takes the unmatched ground-truth box of its class with the
highest IoU ≥ the threshold; continuous-coordinate IoU), but the area under the
precision–recall curve is VOC's all-point interpolation there and COCO's 101-point
interpolation here (the mean of the precision envelope at recall 0, 0.01, …, 1), so the two
mAP@0.5 values differ by up to about 1/101 per class; tests check both against pycocotools (the
101-point area of kdistill's curve equals pycocotools' AP50 / AP75 to 1e-6).

Boxes: predictions per image P×6 ``[x1, y1, x2, y2, score, class]``, targets G×5 ``[class, x1,
y1, x2, y2]`` (class −1: padding), pixels; converted here to COCO's ``[x, y, w, h]``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
from torch import Tensor

COCO_METRICS = ("ap", "ap50", "ap75")
COCO_SIZE_METRICS = ("ap_small", "ap_medium", "ap_large")
COCO_LABELS = {
    "ap": "AP@[.5:.95]",
    "ap50": "AP50",
    "ap75": "AP75",
    "ap_small": "APs",
    "ap_medium": "APm",
    "ap_large": "APl",
}
INSTALL = "pip install 'kdistill[coco]'"


def have_pycocotools() -> bool:
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        return False
    return True


def _import_cocoeval():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError(
            f"COCO metrics (AP@[.5:.95], AP50, AP75) are computed by pycocotools, which is not "
            f"installed: {INSTALL}"
        ) from error
    return COCO, COCOeval


def _xywh(boxes: Tensor) -> list[list[float]]:
    boxes = boxes.double()
    return torch.stack(
        [boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1
    ).tolist()


def coco_dicts(
    images: Sequence[tuple[Tensor, Tensor]], num_classes: int, image_size: tuple[int, int]
) -> tuple[dict, list[dict]]:
    """(COCO ground-truth dataset, COCO results list) of `images` = [(predictions P×6,
    targets G×5)], image ids 1…N, category ids = class + 1."""
    height, width = int(image_size[0]), int(image_size[1])
    gt: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }
    results: list[dict] = []
    for number, (predictions, targets) in enumerate(images, start=1):
        gt["images"].append({"id": number, "width": width, "height": height})
        targets = torch.as_tensor(targets).detach().cpu().reshape(-1, 5)
        targets = targets[targets[:, 0] != -1]
        for cls, box in zip(targets[:, 0].long().tolist(), _xywh(targets[:, 1:])):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": number,
                    "category_id": cls + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        predictions = torch.as_tensor(predictions).detach().cpu().reshape(-1, 6)
        for row, box in zip(predictions.double().tolist(), _xywh(predictions[:, :4])):
            results.append(
                {"image_id": number, "category_id": int(row[5]) + 1, "bbox": box, "score": row[4]}
            )
    return gt, results


def coco_eval(gt: dict, results: list[dict]):
    """A `COCOeval` on `gt` / `results` after evaluate(), accumulate() and summarize() (its
    printing silenced); None when there is no detection at all (every AP is then 0)."""
    COCO, COCOeval = _import_cocoeval()
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = gt
        ground_truth.createIndex()
        detections = ground_truth.loadRes(results)
        evaluation = COCOeval(ground_truth, detections, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def coco_metrics(
    images: Sequence[tuple[Tensor, Tensor]], num_classes: int, image_size: tuple[int, int]
) -> dict[str, float]:
    """AP@[.5:.95], AP50, AP75 and the size APs that exist, by pycocotools (see the module)."""
    gt, results = coco_dicts(images, num_classes, image_size)
    if not gt["annotations"]:
        raise ValueError("COCO AP of an evaluation set without any ground-truth box")
    evaluation = coco_eval(gt, results)
    if evaluation is None:  # no detection: every AP is 0, for the sizes that have boxes
        areas = [annotation["area"] for annotation in gt["annotations"]]
        ranges = {"ap_small": (0, 32**2), "ap_medium": (32**2, 96**2), "ap_large": (96**2, 1e10)}
        out = dict.fromkeys(COCO_METRICS, 0.0)
        for key, (low, high) in ranges.items():
            if any(low <= area <= high for area in areas):
                out[key] = 0.0
        return out
    stats = [float(value) for value in evaluation.stats[:6]]
    out = dict(zip(COCO_METRICS, stats[:3]))
    for key, value in zip(COCO_SIZE_METRICS, stats[3:6]):
        if value >= 0:  # −1: no ground-truth box of that size
            out[key] = value
    return out
