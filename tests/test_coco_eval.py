"""COCO AP by pycocotools beside kdistill's own mAP@0.5.

Where the definitions coincide they must agree to 1e-6: kdistill's matching (DetectionMAP) with
COCO's 101-point interpolation, computed here in a few lines, equals pycocotools' AP50, AP75 and
AP@[.5:.95]. Where they differ (VOC all-point vs 101-point area) a hand-computed example shows by
how much.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("pycocotools")

from kdistill.tasks.coco_eval import coco_dicts, coco_eval, coco_metrics  # noqa: E402
from kdistill.tasks.dense_metrics import DetectionMAP  # noqa: E402
from kdistill.tasks.detection import DetectionTask  # noqa: E402


def _ap101(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """COCO's area: mean over r = 0, 0.01, …, 1 of max{precision at recall ≥ r} (0 if none)."""
    points = []
    for r in torch.linspace(0, 1, 101, dtype=torch.float64):
        reached = precision[recall >= r - 1e-12]
        points.append(float(reached.max()) if reached.numel() else 0.0)
    return sum(points) / 101


def _kdistill_ap101(images, num_classes: int, threshold: float) -> float:
    """kdistill's matching (DetectionMAP) and curve, integrated the COCO way, mean over the
    classes with ground truth."""
    metric = DetectionMAP(num_classes, threshold)
    metric.update([p for p, _ in images], [t for _, t in images])
    scores = torch.cat([r["scores"] for r in metric.records])
    classes = torch.cat([r["classes"] for r in metric.records])
    hits = torch.cat([r["true_positive"] for r in metric.records]).double()
    totals = torch.stack([r["num_targets"] for r in metric.records]).sum(0)
    aps = []
    for c in range(num_classes):
        if totals[c] == 0:
            continue
        mine = classes == c
        order = torch.sort(scores[mine], descending=True, stable=True).indices
        tp = hits[mine][order].cumsum(0)
        fp = (1 - hits[mine][order]).cumsum(0)
        aps.append(_ap101(tp / float(totals[c]), tp / (tp + fp).clamp(min=1)))
    return sum(aps) / len(aps)


def _random_images(count=12, num_classes=3, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        g = int(torch.randint(1, 5, (1,), generator=generator))
        xy = torch.rand(g, 2, generator=generator) * (size - 20)
        wh = 4 + torch.rand(g, 2, generator=generator) * 40
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        classes = torch.randint(0, num_classes, (g, 1), generator=generator).double()
        targets = torch.cat([classes, boxes.double()], 1)
        # detections: jittered copies of the boxes (some with the wrong class), plus clutter
        jitter = boxes + torch.randn(g, 4, generator=generator) * 3
        flip = torch.rand(g, generator=generator) < 0.2
        det_classes = torch.where(flip, (classes[:, 0] + 1) % num_classes, classes[:, 0])
        n_clutter = int(torch.randint(0, 4, (1,), generator=generator))
        cxy = torch.rand(n_clutter, 2, generator=generator) * (size - 20)
        clutter = torch.cat([cxy, cxy + 5 + torch.rand(n_clutter, 2, generator=generator) * 20], 1)
        boxes_all = torch.cat([jitter, clutter]).clamp(0, size)
        scores = torch.rand(len(boxes_all), generator=generator)
        cls_all = torch.cat(
            [det_classes, torch.randint(0, num_classes, (n_clutter,), generator=generator).double()]
        )
        predictions = torch.cat([boxes_all.double(), scores[:, None].double(), cls_all[:, None]], 1)
        images.append((predictions, targets))
    return images


def test_pycocotools_ap_equals_kdistill_matching_with_101_point_area():
    images = _random_images()
    got = coco_metrics(images, 3, (64, 64))
    ap50 = _kdistill_ap101(images, 3, 0.5)
    ap75 = _kdistill_ap101(images, 3, 0.75)
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    ap = sum(_kdistill_ap101(images, 3, t) for t in thresholds) / 10
    assert 0.05 < ap < ap50 < 1  # a curve with misses and false positives, not a trivial one
    assert got["ap50"] == pytest.approx(ap50, abs=1e-6)
    assert got["ap75"] == pytest.approx(ap75, abs=1e-6)
    assert got["ap"] == pytest.approx(ap, abs=1e-6)
    # the VOC all-point mAP@0.5 of the same detections: another area under the same curve
    voc = DetectionMAP(3)
    voc.update([p for p, _ in images], [t for _, t in images])
    assert abs(voc.compute()["map50"] - got["ap50"]) < 0.02


def test_interpolation_difference_on_a_hand_example():
    # one image, two boxes of class 0; detections by score: hit, miss, hit
    # precision-recall points: (0.5, 1), (0.5, 1/2), (1, 2/3)
    # VOC all-point: 0.5·1 + 0.5·2/3 = 5/6;   COCO 101-point: (51·1 + 50·2/3) / 101
    targets = torch.tensor([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]], dtype=torch.float64)
    predictions = torch.tensor(
        [[0, 0, 10, 10, 0.9, 0], [40, 40, 50, 50, 0.8, 0], [20, 20, 30, 30, 0.7, 0]],
        dtype=torch.float64,
    )
    voc = DetectionMAP(1)
    voc.update([predictions], [targets])
    assert voc.compute()["map50"] == pytest.approx(5 / 6, abs=1e-12)
    got = coco_metrics([(predictions, targets)], 1, (64, 64))
    assert got["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)
    assert got["ap"] == pytest.approx(got["ap50"], abs=1e-6)  # exact boxes: every IoU is 1
    # 10×10 boxes are small (area < 32²): APs exists, APm / APl do not
    assert got["ap_small"] == pytest.approx(got["ap"], abs=1e-9)
    assert "ap_medium" not in got and "ap_large" not in got


def test_boxes_reach_pycocotools_as_xywh_with_ids():
    targets = torch.tensor([[1, 2, 3, 12, 8], [-1, 0, 0, 0, 0]], dtype=torch.float64)
    predictions = torch.tensor([[2, 3, 12, 8, 0.5, 1]], dtype=torch.float64)
    gt, results = coco_dicts([(predictions, targets)], 2, (16, 20))
    assert gt["images"] == [{"id": 1, "width": 20, "height": 16}]
    assert gt["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 3, 10, 5], "area": 50,
         "iscrowd": 0}
    ]  # fmt: skip
    assert results == [{"image_id": 1, "category_id": 2, "bbox": [2, 3, 10, 5], "score": 0.5}]
    assert coco_eval(gt, results).stats[0] == pytest.approx(1.0)


def test_no_detection_is_zero_ap_and_the_task_lists_coco_first():
    targets = torch.tensor([[0, 0, 0, 10, 10]], dtype=torch.float64)
    got = coco_metrics([(torch.zeros(0, 6), targets)], 1, (64, 64))
    assert got == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ap_small": 0.0}
    task = DetectionTask()
    assert task.metrics[0] == "ap" and "map50" in task.metrics
    assert task.labels["ap"] == "AP@[.5:.95]"
    assert DetectionTask(coco=False).metrics == ("map50",)
    assert math.isfinite(coco_metrics(_random_images(2), 3, (64, 64))["ap"])
