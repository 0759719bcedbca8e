"""Segmentation (confusion matrix, mIoU, pixel accuracy) and detection (VOC AP, mAP) metrics.

Expected numbers are worked out by hand in the comments, or by a brute-force reference written
here; `reduce()` is checked by standing in for the collective calls of a second rank.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from kdistill.tasks import dense_metrics
from kdistill.tasks.dense_metrics import (
    DetectionMAP,
    SegmentationMetrics,
    average_precision_voc,
    box_iou,
)

# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------

# K = 4, ignore_index = 255. Pixels (target → prediction), the ignored one dropped:
#   0→0, 0→1, 1→1 / 1→2, (255→0 ignored), 0→0
# confusion (rows target, columns prediction):
#   t0: p0 = 2, p1 = 1;   t1: p1 = 1, p2 = 1;   t2, t3: none
# IoU0 = 2 / (2 + 0 FP + 1 FN) = 2/3;  IoU1 = 1 / (1 + 1 FP + 1 FN) = 1/3
# IoU2 = 0 / (0 + 1 FP + 0 FN) = 0 (only predicted: counts);  IoU3 = 0/0 → NaN (absent: left out)
# mIoU = (2/3 + 1/3 + 0) / 3 = 1/3;  pixel accuracy = 3 correct / 5 counted = 0.6
TARGET = torch.tensor([[[0, 0, 1], [1, 255, 0]]])
PREDICTION = torch.tensor([[[0, 1, 1], [2, 0, 0]]])
CONFUSION = [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def check_hand_worked(result: dict) -> None:
    assert result["miou"] == pytest.approx(1 / 3, rel=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(0.6, rel=1e-12)
    iou = result["iou_per_class"]
    assert iou[:3] == pytest.approx([2 / 3, 1 / 3, 0.0], rel=1e-12)
    assert math.isnan(iou[3])


def test_segmentation_hand_worked_from_predictions():
    metric = SegmentationMetrics(num_classes=4, ignore_index=255)
    metric.update(PREDICTION, TARGET)
    assert metric.confusion.tolist() == CONFUSION
    check_hand_worked(metric.compute())


def test_segmentation_logits_are_arg_maxed_over_dim_1():
    logits = F.one_hot(PREDICTION, 4).permute(0, 3, 1, 2).float() * 3 - 1  # N×K×H×W
    metric = SegmentationMetrics(num_classes=4, ignore_index=255)
    metric.update(logits, TARGET)
    assert metric.confusion.tolist() == CONFUSION
    check_hand_worked(metric.compute())


def test_segmentation_accumulates_over_batches_and_resets():
    metric = SegmentationMetrics(num_classes=4, ignore_index=255)
    # the same pixels split into two batches of one row each
    metric.update(PREDICTION[:, :1], TARGET[:, :1])
    metric.update(PREDICTION[:, 1:], TARGET[:, 1:])
    assert metric.confusion.tolist() == CONFUSION
    check_hand_worked(metric.compute())
    metric.reset()
    assert metric.confusion.sum() == 0
    with pytest.raises(ValueError, match="empty"):
        metric.compute()


def test_segmentation_without_ignore_index_rejects_an_out_of_range_label():
    metric = SegmentationMetrics(num_classes=4)
    with pytest.raises(ValueError, match=r"\[0, 3\].*max 255"):
        metric.update(PREDICTION, TARGET)


@pytest.mark.parametrize(
    ("output", "target", "error"),
    [
        (torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), ValueError),  # K=3≠4
        (
            torch.zeros(1, 2, 3, dtype=torch.long),
            torch.zeros(1, 2, 2, dtype=torch.long),
            ValueError,
        ),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), TypeError),  # float preds
        (torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), TypeError),  # float target
        (torch.full((1, 2, 2), 4), torch.zeros(1, 2, 2, dtype=torch.long), ValueError),
    ],
)
def test_segmentation_bad_inputs(output, target, error):
    with pytest.raises(error):
        SegmentationMetrics(num_classes=4).update(output, target)


def test_segmentation_reduce_sums_the_confusion_of_every_rank(monkeypatch):
    # rank 0 saw the first row, "rank 1" the second: after reduce the counts are those of both
    rank0 = SegmentationMetrics(num_classes=4, ignore_index=255)
    rank0.update(PREDICTION[:, :1], TARGET[:, :1])
    rank1 = SegmentationMetrics(num_classes=4, ignore_index=255)
    rank1.update(PREDICTION[:, 1:], TARGET[:, 1:])
    monkeypatch.setattr(dense_metrics, "all_reduce_sum", lambda t: t + rank1.confusion)
    rank0.reduce()
    assert rank0.confusion.tolist() == CONFUSION
    check_hand_worked(rank0.compute())


def test_segmentation_reduce_is_a_no_op_in_one_process():
    metric = SegmentationMetrics(num_classes=4, ignore_index=255)
    metric.update(PREDICTION, TARGET)
    metric.reduce()
    assert metric.confusion.tolist() == CONFUSION


# ---------------------------------------------------------------------------------------------
# average_precision_voc
# ---------------------------------------------------------------------------------------------


def test_voc_ap_hand_worked_curve():
    # points (r, p): (.2, 1), (.4, 1), (.4, .67), (.6, .75), (.8, .5)
    # envelope (max precision at recall ≥ r): (0,.2] → 1, (.2,.4] → 1, (.4,.6] → .75,
    # (.6,.8] → .5, (.8,1] → 0 (closing point)
    # area = .2·1 + .2·1 + .2·.75 + .2·.5 + .2·0 = 0.65
    recall = [0.2, 0.4, 0.4, 0.6, 0.8]
    precision = [1.0, 1.0, 0.67, 0.75, 0.5]
    assert average_precision_voc(recall, precision) == pytest.approx(0.65, rel=1e-12)
    assert average_precision_voc(torch.tensor(recall), torch.tensor(precision)) == pytest.approx(
        0.65, rel=1e-6
    )


def test_voc_ap_simple_cases():
    assert average_precision_voc([], []) == 0.0
    assert average_precision_voc([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)
    # a false positive first, then the only box: precision ½ at recall 1 → area ½
    assert average_precision_voc([0.0, 1.0], [0.0, 0.5]) == pytest.approx(0.5)


def brute_force_ap(recall: list[float], precision: list[float]) -> float:
    """∫₀¹ p̂(r) dr, p̂(r) = max precision over points with recall ≥ r (0 if none): p̂ is constant
    on each interval between consecutive distinct recalls, so one value per interval is exact."""
    levels = [0.0, *sorted(set(recall)), 1.0]
    area = 0.0
    for a, b in zip(levels[:-1], levels[1:]):
        if b > a:
            area += (b - a) * max([p for r, p in zip(recall, precision) if r >= b], default=0.0)
    return area


@pytest.mark.parametrize("seed", range(5))
def test_voc_ap_matches_brute_force_on_random_rankings(seed):
    rng = random.Random(seed)
    hits = [rng.random() < 0.4 for _ in range(30)]
    num_targets = sum(hits) + rng.randint(0, 3)  # some boxes may never be found
    tp = fp = 0
    recall, precision = [], []
    for hit in hits:
        tp, fp = tp + hit, fp + (not hit)
        recall.append(tp / num_targets)
        precision.append(tp / (tp + fp))
    expected = brute_force_ap(recall, precision)
    assert average_precision_voc(recall, precision) == pytest.approx(expected, rel=1e-12)


def test_voc_ap_rejects_bad_curves():
    with pytest.raises(ValueError, match="same length"):
        average_precision_voc([0.5, 1.0], [1.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        average_precision_voc([0.5, 0.4], [1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# box_iou
# ---------------------------------------------------------------------------------------------


def test_box_iou_hand_worked():
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 − 1 = 7 → 1/7; vs itself 1; apart 0;
    # two zero-area boxes: union 0 → 0
    a = torch.tensor([[0.0, 0, 2, 2], [5, 5, 5, 5]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [5, 5, 5, 5]])
    expected = torch.tensor([[1 / 7, 1, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(box_iou(a, b), expected)
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        box_iou(torch.zeros(2, 5), b)


# ---------------------------------------------------------------------------------------------
# DetectionMAP
# ---------------------------------------------------------------------------------------------

# Image A, ground truth: g1 class 0 [0,0,10,10]; g2 class 0 [20,20,30,30]; g3 class 1 [0,20,10,30]
# Image A, detections:
#   d1 .9 class 0 [0,0,10,10]   → TP (g1, IoU 1)
#   d2 .8 class 0 [1,0,10,10]   → IoU .9 with g1, already taken: duplicate → FP
#   d3 .6 class 1 [20,20,30,30] → exactly on g2, but g2 is class 0: wrong class → FP for class 1
#   d4 .5 class 1 [0,20,10,30]  → TP (g3)
#   d5 .4 class 0 [20,20,30,31] → TP (g2, IoU 100/110)
# Image B: no ground truth; d6 .7 class 0 [50,50,60,60] → FP
#
# Class 0 (2 boxes), by score: d1 TP, d2 FP, d6 FP, d5 TP
#   recall .5, .5, .5, 1;  precision 1, 1/2, 1/3, 1/2
#   envelope: 1 on (0, .5], 1/2 on (.5, 1] → AP0 = .5·1 + .5·.5 = 0.75
# Class 1 (1 box): d3 FP, d4 TP → recall 0, 1; precision 0, 1/2 → AP1 = 1·1/2 = 0.5
# mAP = (0.75 + 0.5) / 2 = 0.625
PREDICTIONS = [
    torch.tensor(
        [
            [1, 0, 10, 10, 0.8, 0],  # d2 (listed before d1: the order of the list is irrelevant)
            [0, 0, 10, 10, 0.9, 0],  # d1
            [20, 20, 30, 30, 0.6, 1],  # d3
            [0, 20, 10, 30, 0.5, 1],  # d4
            [20, 20, 30, 31, 0.4, 0],  # d5
        ]
    ),
    torch.tensor([[50, 50, 60, 60, 0.7, 0]]),  # d6
]
TARGETS = [
    torch.tensor([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30], [1, 0, 20, 10, 30]]),
    torch.zeros(0, 5),
]


def test_detection_map_hand_worked():
    metric = DetectionMAP(num_classes=2)
    metric.update(PREDICTIONS, TARGETS)
    result = metric.compute()
    assert result["ap_per_class"] == pytest.approx([0.75, 0.5], rel=1e-12)
    assert result["map50"] == pytest.approx(0.625, rel=1e-12)


def test_detection_padded_targets_give_the_same_result():
    padded = torch.full((2, 3, 5), -1.0)
    padded[0] = TARGETS[0]
    metric = DetectionMAP(num_classes=2)
    metric.update(PREDICTIONS, padded)
    assert metric.compute() == map_result(PREDICTIONS, TARGETS)
    # padding rows inside a list entry are dropped as well
    with_padding = [torch.cat([TARGETS[0], torch.full((2, 5), -1.0)]), torch.full((1, 5), -1.0)]
    assert map_result(PREDICTIONS, with_padding) == map_result(PREDICTIONS, TARGETS)


def map_result(predictions, targets, num_classes: int = 2) -> dict:
    metric = DetectionMAP(num_classes=num_classes)
    metric.update(predictions, targets)
    return metric.compute()


def test_detection_images_over_several_updates_match_one_update():
    metric = DetectionMAP(num_classes=2)
    metric.update(PREDICTIONS[:1], TARGETS[:1])
    metric.update(PREDICTIONS[1:], TARGETS[1:])
    assert metric.compute()["map50"] == pytest.approx(0.625, rel=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="ground-truth"):
        metric.compute()


def test_detection_takes_the_best_unmatched_box_not_the_best_box():
    # two class-0 boxes gA [0,0,10,10], gB [0,0,10,12]
    # d1 .9 [0,0,10,11]: IoU gA 100/110 = .909, gB 110/120 = .917 → takes gB
    # d2 .8 [0,0,10,12]: IoU gB 1 (taken), gA 100/120 = .833 → takes gA (TP; the VOC devkit's
    #   "best box or nothing" rule would call it FP) → recall .5, 1 at precision 1 → AP 1
    predictions = [torch.tensor([[0, 0, 10, 11, 0.9, 0], [0, 0, 10, 12, 0.8, 0]])]
    targets = [torch.tensor([[0, 0, 0, 10, 10], [0, 0, 0, 10, 12]])]
    assert map_result(predictions, targets, 1)["map50"] == pytest.approx(1.0)


def test_detection_iou_threshold_is_inclusive_and_configurable():
    # [0,0,10,5] on [0,0,10,10]: IoU exactly 50/100 = 0.5 → a match at 0.5, not at 0.75
    predictions = [torch.tensor([[0, 0, 10, 5, 0.9, 0]])]
    targets = [torch.tensor([[0, 0, 0, 10, 10]])]
    assert map_result(predictions, targets, 1) == {"map50": 1.0, "ap_per_class": [1.0]}
    metric = DetectionMAP(num_classes=1, iou_threshold=0.75)
    metric.update(predictions, targets)
    assert metric.compute() == {"map75": 0.0, "ap_per_class": [0.0]}


def test_detection_class_without_ground_truth_is_left_out_of_the_mean():
    # class 2 is only ever predicted (no box): AP NaN, not counted; class 1 has a box that no
    # detection finds: AP 0, counted
    predictions = [torch.tensor([[0, 0, 10, 10, 0.9, 0], [30, 30, 40, 40, 0.8, 2]])]
    targets = [torch.tensor([[0, 0, 0, 10, 10], [1, 50, 50, 60, 60]])]
    result = map_result(predictions, targets, num_classes=3)
    assert result["ap_per_class"][:2] == [1.0, 0.0]
    assert math.isnan(result["ap_per_class"][2])
    assert result["map50"] == pytest.approx(0.5)


def test_detection_equal_scores_keep_their_input_order():
    # a miss and a hit of equal score on one box: the stable sort keeps the listed order
    #   miss first → precision 0, 1/2 at recall 0, 1 → AP ½;  hit first → 1 at recall 1 → AP 1
    miss_first = [torch.tensor([[50, 50, 60, 60, 0.5, 0], [0, 0, 10, 10, 0.5, 0]])]
    hit_first = [miss_first[0].flip(0)]
    targets = [torch.tensor([[0, 0, 0, 10, 10]])]
    assert map_result(miss_first, targets, 1)["map50"] == pytest.approx(0.5)
    assert map_result(hit_first, targets, 1)["map50"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("predictions", "targets", "message"),
    [
        ([torch.zeros(1, 5)], [torch.zeros(0, 5)], r"R×6 .* \(1, 5\)"),
        ([torch.zeros(0, 6)], [torch.zeros(1, 4)], r"R×5 .* \(1, 4\)"),
        ([torch.tensor([[0, 0, 1, 1, 0.5, 2]])], [torch.zeros(0, 5)], r"\[0, 1\]"),
        ([torch.zeros(0, 6)], [torch.tensor([[0.5, 0, 0, 1, 1]])], "whole numbers"),
        ([torch.zeros(0, 6)] * 2, [torch.zeros(0, 5)], "2 images .* 1"),
    ],
)
def test_detection_bad_inputs(predictions, targets, message):
    with pytest.raises(ValueError, match=message):
        DetectionMAP(num_classes=2).update(predictions, targets)


def test_detection_reduce_gathers_the_records_of_every_rank(monkeypatch):
    # rank 0 saw image A, "rank 1" image B: after reduce every rank scores both images
    rank0, rank1 = DetectionMAP(num_classes=2), DetectionMAP(num_classes=2)
    rank0.update(PREDICTIONS[:1], TARGETS[:1])
    rank1.update(PREDICTIONS[1:], TARGETS[1:])

    def all_gather_object(gathered, mine):
        gathered[0], gathered[1] = mine, rank1.records

    monkeypatch.setattr(dense_metrics, "is_distributed", lambda: True)
    monkeypatch.setattr(dense_metrics.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dense_metrics.dist, "all_gather_object", all_gather_object)
    rank0.reduce()
    assert rank0.compute() == map_result(PREDICTIONS, TARGETS)


def test_detection_reduce_is_a_no_op_in_one_process():
    metric = DetectionMAP(num_classes=2)
    metric.update(PREDICTIONS, TARGETS)
    metric.reduce()
    assert metric.compute()["map50"] == pytest.approx(0.625, rel=1e-12)
