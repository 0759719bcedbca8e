"""Dense models: shapes and parameter counts from formulas, YOLO targets / loss / decode / NMS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_models import DENSE_NAMES

import kdistill as kd
from kdistill.data import BatchLoader, make_scenes
from kdistill.losses import CE, YOLOLoss, create_loss
from kdistill.losses.base import STUDENT, TARGET
from kdistill.models import (
    DEFAULT_ANCHORS,
    Detector,
    MultiTaskNet,
    SegNet,
    count_parameters,
    create_model,
    decode,
    encode_targets,
    list_models,
    nms,
)


def conv(c_in: int, c_out: int, k: int = 3, bias: bool = False) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def encoder_params(c_in: int, widths: tuple[int, int, int, int]) -> int:
    w0 = widths[0]
    total = conv(c_in, w0) + bn(w0)
    for a, b in zip(widths, widths[1:]):
        total += conv(a, b) + bn(b) + conv(b, b) + bn(b)  # stride-2 `down`, then `conv`
    return total


def seg_branch_params(widths, ppm: int, decoder: tuple[int, int, int], classes: int) -> int:
    w0, w1, w2, w3 = widths
    branch = ppm // 4
    d1, d2, d3 = decoder
    pyramid = 4 * conv(w3, branch, 1, bias=True) + conv(w3 + 4 * branch, ppm) + bn(ppm)
    ups = conv(ppm + w2, d1) + bn(d1) + conv(d1 + w1, d2) + bn(d2) + conv(d2 + w0, d3) + bn(d3)
    return pyramid + ups + conv(d3, classes, 1, bias=True)


def det_branch_params(w3: int, neck: int, anchors: int, classes: int) -> int:
    return (
        conv(w3, neck) + bn(neck) + conv(neck, neck) + bn(neck)
        + conv(neck, anchors * (5 + classes), 1, bias=True)
    )  # fmt: skip


TEACHER, STUDENT_W = (16, 32, 48, 96), (4, 8, 12, 24)
COARSE_HEAD = conv(24, 11, 1, bias=True)  # the students' 1×1 class scores on the PPM output
EXPECTED_PARAMS = {
    "seg_teacher": encoder_params(1, TEACHER) + seg_branch_params(TEACHER, 96, (48, 32, 16), 11),
    "seg_student": encoder_params(1, STUDENT_W)
    + seg_branch_params(STUDENT_W, 24, (12, 8, 4), 11)
    + COARSE_HEAD,
    "det_teacher": encoder_params(1, TEACHER) + det_branch_params(96, 64, 3, 10),
    "det_student": encoder_params(1, STUDENT_W) + det_branch_params(24, 16, 3, 10),
    "multitask_teacher": encoder_params(1, TEACHER)
    + seg_branch_params(TEACHER, 96, (48, 32, 16), 11)
    + det_branch_params(96, 64, 3, 10),
    "multitask_student": encoder_params(1, STUDENT_W)
    + seg_branch_params(STUDENT_W, 24, (12, 8, 4), 11)
    + COARSE_HEAD
    + det_branch_params(24, 16, 3, 10),
}
# the counts the docstrings state
STATED = {
    "seg_teacher": 441_611,
    "seg_student": 28_174,
    "det_teacher": 269_021,
    "det_student": 17_609,
    "multitask_teacher": 536_952,
    "multitask_student": 34_763,
}


def synthetic_scenes(count: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(20, 28, 28, dtype=torch.uint8)
    labels = torch.arange(20) % 10
    for i, c in enumerate(labels.tolist()):
        w, h = 8 + 2 * c, 24 - c
        left = (28 - w) // 2
        images[i, 2 : 2 + h, left : left + w] = torch.randint(
            128, 256, (h, w), generator=generator, dtype=torch.uint8
        )
    return make_scenes(images, labels, count, seed=seed)


# --- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_parameter_counts_match_the_formula_and_the_docstrings(name):
    model = create_model(name)
    assert count_parameters(model) == EXPECTED_PARAMS[name] == STATED[name]


def test_sizes_fit_the_brief():
    assert 200_000 <= STATED["seg_teacher"] <= 500_000
    assert 10_000 <= STATED["seg_student"] <= 30_000


def test_dense_models_are_registered():
    assert set(DENSE_NAMES) <= set(list_models())


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_output_shapes(name):
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    seg_shape, det_shape = (2, 11, 64, 64), (2, 3, 8, 8, 15)
    if name.startswith("seg"):
        assert out.shape == seg_shape
    elif name.startswith("det"):
        assert out.shape == det_shape
    else:
        assert {key: tuple(value.shape) for key, value in out.items()} == {
            "seg": seg_shape,
            "det": det_shape,
        }


def test_other_sizes_and_channels():
    seg = SegNet(in_channels=3, num_classes=4, widths=(2, 4, 4, 8), ppm_channels=8)
    assert seg(torch.randn(1, 3, 32, 48)).shape == (1, 4, 32, 48)  # batch of 1 trains too
    det = Detector(num_classes=2, anchors=[[8, 8], [16, 16]], widths=(2, 4, 4, 8), neck_channels=4)
    assert det(torch.randn(2, 1, 32, 48)).shape == (2, 2, 4, 6, 7)  # rows = 32/8, cols = 48/8
    net = MultiTaskNet(num_classes=3, seg_classes=5, widths=(2, 4, 4, 8), ppm_channels=8)
    out = net(torch.randn(2, 1, 16, 16))
    assert out["seg"].shape == (2, 5, 16, 16) and out["det"].shape == (2, 3, 2, 2, 8)
    with pytest.raises(ValueError, match=r"N×1×H×W"):
        seg_student = create_model("seg_student")
        seg_student(torch.randn(2, 3, 64, 64))


def test_layer_names_for_taps():
    names = dict(create_model("multitask_student").named_modules())
    for layer in ("encoder.stem", "encoder.stage3", "ppm", "ppm.fuse", "decoder.up3"):
        assert layer in names
    assert {"seg_head", "det_neck", "det_head"} <= set(names)
    assert {"encoder.stage2", "neck", "head"} <= set(
        dict(create_model("det_student").named_modules())
    )
    assert {"ppm", "decoder", "head"} <= set(dict(create_model("seg_student").named_modules()))


def test_objectness_starts_at_the_prior():
    with torch.no_grad():
        out = create_model("det_student").eval()(torch.randn(2, 1, 64, 64))
    # the head's weights are tiny (std 0.01), so σ(obj) ≈ the 0.01 prior everywhere
    assert torch.allclose(out[..., 4].sigmoid(), torch.full((2, 3, 8, 8), 0.01), atol=0.01)


@pytest.mark.parametrize("name", ["seg_student", "det_student", "multitask_student"])
def test_models_are_fx_traceable(name):
    model = create_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 64, 64)
    expected, got = model(x), traced(x)
    if isinstance(expected, dict):
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    else:
        assert torch.equal(expected, got)


# --- encode_targets --------------------------------------------------------------------------


def test_encode_targets_on_a_hand_worked_box():
    # class 2, x 20..36, y 12..40 (exclusive ends): w = 16, h = 28, centre (28, 26).
    # stride 64/8 = 8: grid (3.5, 3.25) → column i = 3, row j = 3, offsets (0.5, 0.25).
    # Shape IoU with the anchors (13, 22), (24, 13), (25, 30):
    #   13·22 / (448 + 286 − 286) = 0.638;  16·13 / (448 + 312 − 208) = 0.377;
    #   16·28 / (448 + 750 − 448) = 0.597  → anchor 0.
    boxes = torch.tensor([[[2.0, 20, 12, 36, 40], [-1, 0, 0, 0, 0]]])
    target = encode_targets(boxes, DEFAULT_ANCHORS, 8, 64)
    assert target.shape == (1, 3, 8, 8, 6)
    expected = torch.tensor([0.5, 0.25, math.log(16 / 13), math.log(28 / 22), 1.0, 2.0])
    assert torch.allclose(target[0, 0, 3, 3], expected)
    assert int((target[..., 4] > 0).sum()) == 1
    others = target.clone()
    others[0, 0, 3, 3] = torch.tensor([0.0, 0, 0, 0, 0, -1])
    assert torch.equal(others[..., :5], torch.zeros(1, 3, 8, 8, 5))
    assert bool((others[..., 5] == -1).all())


def test_a_taken_slot_sends_the_box_to_its_next_best_anchor():
    box = [2.0, 20, 12, 36, 40]
    target = encode_targets(torch.tensor([[box, box]]), DEFAULT_ANCHORS, 8, 64)
    assert target[0, :, 3, 3, 4].tolist() == [1.0, 0.0, 1.0]  # anchor 0, then anchor 2 (0.597)
    assert target[0, 2, 3, 3, 2].item() == pytest.approx(math.log(16 / 25))


# --- the YOLO loss ---------------------------------------------------------------------------


def test_yolo_loss_declares_what_it_needs():
    loss = create_loss("yolo", box=2.0)
    assert isinstance(loss, YOLOLoss) and loss.box == 2.0
    assert YOLOLoss.needs == (STUDENT, TARGET) and YOLOLoss.target_is_class_index is False


def test_yolo_loss_of_zero_outputs_matches_a_hand_computation():
    # raw = 0: σ(tx) = σ(ty) = 0.5, tw = th = 0, every objectness BCE = log 2, class CE = log K.
    # One box (the hand-worked one): box = (0.5−0.5)² + (0.5−0.25)² + log(16/13)² + log(28/22)².
    boxes = torch.tensor([[[2.0, 20, 12, 36, 40]]])
    raw = torch.zeros(1, 3, 8, 8, 15)
    box = 0.25**2 + math.log(16 / 13) ** 2 + math.log(28 / 22) ** 2
    weights = {"box": 2.0, "obj": 3.0, "noobj": 0.5, "cls": 1.5}
    expected = 2.0 * box + 3.0 * math.log(2) + 0.5 * math.log(2) + 1.5 * math.log(10)
    assert YOLOLoss(**weights)(raw, boxes).item() == pytest.approx(expected, rel=1e-6)


def test_yolo_loss_without_boxes_is_the_negative_term_only():
    raw = torch.full((2, 3, 8, 8, 15), -1.0, requires_grad=True)
    boxes = torch.tensor([[-1.0, 0, 0, 0, 0]]).expand(2, 4, 5)
    value = YOLOLoss(noobj=2.0)(raw, boxes)
    assert value.item() == pytest.approx(2.0 * math.log1p(math.exp(-1.0)), rel=1e-6)
    value.backward()
    assert torch.isfinite(raw.grad).all()


def test_yolo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="A=3"):
        YOLOLoss()(torch.zeros(1, 2, 8, 8, 15), torch.zeros(1, 1, 5))
    with pytest.raises(ValueError, match="N×M×5"):
        YOLOLoss()(torch.zeros(1, 3, 8, 8, 15), torch.zeros(2, 1, 5))


def test_yolo_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    scenes = synthetic_scenes(8)
    model = create_model("det_student")
    loss_fn = YOLOLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(20):
        loss = loss_fn(model(scenes.inputs), scenes.boxes)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < 0.5 * values[0], values


# --- decode and NMS --------------------------------------------------------------------------


def raw_from_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Raw outputs that decode to exactly the encoded boxes: logit of the offsets, the log-sizes,
    objectness ±20 and a one-hot class logit of 20."""
    eps = 1e-6
    raw = torch.zeros(*target.shape[:-1], 5 + num_classes)
    raw[..., :2] = torch.logit(target[..., :2].clamp(eps, 1 - eps))
    raw[..., 2:4] = target[..., 2:4]
    positive = target[..., 4] > 0
    raw[..., 4] = torch.where(positive, 20.0, -20.0)
    classes = target[..., 5].clamp(min=0).long()
    raw[..., 5:] = 20.0 * F.one_hot(classes, num_classes) * positive[..., None]
    return raw


def test_decode_of_encoded_targets_gives_back_the_boxes():
    scenes = synthetic_scenes(6, seed=1)
    target = encode_targets(scenes.boxes, DEFAULT_ANCHORS, 8, 64)
    detections = decode(raw_from_targets(target, 10), DEFAULT_ANCHORS, 64, conf_threshold=0.5)
    assert len(detections) == 6
    for found, boxes in zip(detections, scenes.boxes):
        boxes = boxes[boxes[:, 0] >= 0]
        assert found.shape == (len(boxes), 6)
        assert bool((found[:, 4] > 0.99).all())
        # match by class and position (detections come in score order, boxes in scene order)
        for label, *corners in boxes.tolist():
            error = (found[:, :4] - torch.tensor(corners)).abs().max(dim=1).values
            best = int(error.argmin())
            assert error[best] < 1.0 and found[best, 5].item() == label


def test_decode_keeps_scores_above_the_threshold_in_order():
    raw = torch.full((1, 3, 8, 8, 7), -20.0)
    raw[0, 1, 2, 5, :5] = 0.0  # σ(obj) = 0.5, classes uniform over 2 → score 0.25
    raw[0, 0, 4, 4, 4] = 20.0  # score ≈ 0.5
    found = decode(raw, DEFAULT_ANCHORS, 64, conf_threshold=0.2)[0]
    assert found[:, 4].tolist() == pytest.approx([0.5, 0.25], abs=1e-6)
    # slot (anchor 1 = 24×13, row 2, column 5): centre (5.5·8, 2.5·8) = (44, 20)
    assert found[1, :4].tolist() == pytest.approx([32.0, 13.5, 56.0, 26.5])
    assert decode(raw, DEFAULT_ANCHORS, 64, conf_threshold=0.3)[0].shape == (1, 6)


def test_nms_on_hand_worked_boxes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    classes = torch.tensor([0, 0, 1, 0])
    # IoU(box 0, box 1) = 81 / (100 + 100 − 81) = 0.68 > 0.5: box 1 (same class) goes; box 2 is of
    # another class and stays; box 3 overlaps nothing. Order: by score.
    assert nms(boxes, scores, 0.5, classes).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.5).tolist() == [3, 0]  # class-agnostic: box 2 goes too
    assert nms(boxes, scores, 0.7, classes).tolist() == [3, 0, 1, 2]  # 0.68 is not > 0.7
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_decode_with_nms_drops_duplicates():
    raw = torch.full((1, 3, 8, 8, 7), -20.0)
    raw[0, 0, 3, 3, :4] = 0.0  # anchor 13×22 at the centre of cell (3, 3)
    raw[0, 0, 3, 3, 4:6] = 20.0
    raw[0, 2, 3, 3, :2] = 0.0  # anchor 25×30 at the same centre, same class, lower score
    raw[0, 2, 3, 3, 4:6] = torch.tensor([5.0, 20.0])
    raw[0, 2, 3, 3, 2:4] = torch.tensor([math.log(13 / 25), math.log(22 / 30)])  # same size
    assert decode(raw, DEFAULT_ANCHORS, 64, conf_threshold=0.5)[0].shape == (2, 6)
    assert decode(raw, DEFAULT_ANCHORS, 64, conf_threshold=0.5, iou_threshold=0.5)[0].shape == (
        1,
        6,
    )


# --- with the rest of kdistill ---------------------------------------------------------------


def test_a_multitask_student_trains_through_the_distiller_on_scene_batches():
    torch.manual_seed(0)
    scenes = synthetic_scenes(8)
    student = create_model("multitask_student")
    distiller = kd.Distiller(
        None,
        student,
        terms=[
            kd.Term(CE(), output="seg", name="seg_hard"),
            kd.Term(YOLOLoss(), output="det", name="det_hard"),
        ],
    )
    batch = next(iter(BatchLoader(scenes, batch_size=4, shuffle=True)))
    out = distiller(batch.inputs, target=batch.target, index=batch.index)
    assert set(out.parts) >= {"seg_hard", "det_hard"}
    out.loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["seg_student", "multitask_student"])
def test_coarse_head_adds_upsampled_class_scores_of_the_context_map(name):
    # FCN-style score fusion: logits = head(decoder) + bilinear↑(head_coarse(ppm output));
    # checked against the same model without the coarse head (its other weights copied) plus
    # the coarse scores computed here from a hook on `ppm`
    torch.manual_seed(0)
    fused = create_model(name).eval()  # the registered students have the coarse head
    plain = create_model(name, coarse_head=False).eval()
    missing = plain.load_state_dict(fused.state_dict(), strict=False)
    coarse = "head_coarse" if name == "seg_student" else "seg_head_coarse"
    assert missing.unexpected_keys == [f"{coarse}.weight", f"{coarse}.bias"]
    context = {}
    fused.ppm.register_forward_hook(lambda m, args, out: context.setdefault("ppm", out))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        got = fused(x)
        expected = plain(x)
        head = getattr(fused, coarse)
        extra = F.interpolate(head(context["ppm"]), size=(64, 64), mode="bilinear")
    got = got if name == "seg_student" else got["seg"]
    expected = expected if name == "seg_student" else expected["seg"]
    torch.testing.assert_close(got, expected + extra)
    assert count_parameters(fused) - count_parameters(plain) == 24 * 11 + 11
    traced = torch.fx.symbolic_trace(fused)
    assert torch.equal(traced(x) if name == "seg_student" else traced(x)["seg"], got)
