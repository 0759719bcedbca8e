"""Reference tests for the dense losses (PixelKD, CWD, DetLogitMSE) and the multi-task terms.

Every expected number comes from a hand-worked case, an explicit loop over pixels / channels
written in numpy here, or float64 gradcheck -- never from the code under test. The specification
is the loss table and the multi-task formula in DESIGN.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill as kd
from kdistill import losses as L
from kdistill.distill.multitask import multitask_terms
from kdistill.losses.base import STUDENT, TARGET, DistillLoss

# ---------------------------------------------------------------------------------------------
# Independent references (numpy, float64, one pixel / one channel at a time).
# ---------------------------------------------------------------------------------------------


def np_softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def np_pixel_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """T² · mean over (n, h, w) of KL between the class softmaxes of one pixel."""
    n_, _, h_, w_ = s.shape
    total = 0.0
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                total += np_kl(np_softmax(t[n, :, h, w] / temp), np_softmax(s[n, :, h, w] / temp))
    return temp * temp * total / (n_ * h_ * w_)


def np_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """τ²/(N·C) · Σ_{n,c} KL between the softmaxes over one channel's H·W locations."""
    n_, c_ = s.shape[:2]
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            total += np_kl(np_softmax(t[n, c].ravel() / tau), np_softmax(s[n, c].ravel() / tau))
    return tau * tau * total / (n_ * c_)


def np_det_mse(s: np.ndarray, t: np.ndarray, box: float, obj: float, cls: float) -> float:
    e = (s - t) ** 2
    return box * e[..., :4].mean() + obj * e[..., 4].mean() + cls * e[..., 5:].mean()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# two classes / two locations, T = 2: teacher [2 ln 3, 0] / 2 → [3/4, 1/4]; student [0, 0] → [½, ½]
# KL([3/4, 1/4] ‖ [½, ½]) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
KL_34_HALF = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


# ---------------------------------------------------------------------------------------------
# Contract: registry, needs, connector flag.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "uses_connector"),
    [("pixel_kd", L.PixelKD, False), ("cwd", L.CWD, True), ("det_logit_mse", L.DetLogitMSE, False)],
)
def test_dense_losses_are_registered(name, cls, uses_connector):
    loss = L.create_loss(name)
    assert isinstance(loss, cls)
    assert tuple(loss.needs) == ("student", "teacher")
    assert loss.uses_connector is uses_connector


def test_defaults():
    assert L.PixelKD().temperature == 1.0
    assert L.CWD().tau == 4.0
    d = L.DetLogitMSE()
    assert (d.box, d.obj, d.cls) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("cls", "param"), [(L.PixelKD, "temperature"), (L.CWD, "tau")], ids=["pixel_kd", "cwd"]
)
@pytest.mark.parametrize("value", [0.0, -1.5])
def test_temperature_must_be_positive(cls, param, value):
    with pytest.raises(ValueError) as excinfo:
        cls(**{param: value})
    assert param in str(excinfo.value)
    assert str(value) in str(excinfo.value)


@pytest.mark.parametrize("param", ["box", "obj", "cls"])
def test_det_weights_must_be_non_negative(param):
    with pytest.raises(ValueError) as excinfo:
        L.DetLogitMSE(**{param: -0.5})
    assert param in str(excinfo.value)
    assert "-0.5" in str(excinfo.value)
    L.DetLogitMSE(**{param: 0.0})  # zero switches a part off


@pytest.mark.parametrize(
    ("loss", "a", "b"),
    [
        (L.PixelKD(), (2, 3, 4, 4), (2, 3, 4, 5)),
        (L.CWD(), (2, 3, 4, 4), (2, 5, 4, 4)),
        (L.DetLogitMSE(), (2, 6, 7), (2, 6, 8)),
    ],
    ids=["pixel_kd", "cwd", "det_logit_mse"],
)
def test_shape_mismatch_names_both_shapes(loss, a, b):
    with pytest.raises(ValueError) as excinfo:
        loss(torch.zeros(a), torch.zeros(b))
    assert str(a) in str(excinfo.value)
    assert str(b) in str(excinfo.value)


@pytest.mark.parametrize("loss", [L.PixelKD(), L.CWD()], ids=["pixel_kd", "cwd"])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4), (1, 2, 3, 4, 5)])
def test_map_losses_need_4d_inputs(loss, shape):
    with pytest.raises(ValueError, match=r"4-dimensional"):
        loss(torch.zeros(shape), torch.zeros(shape))


@pytest.mark.parametrize("last", [4, 5])
def test_det_logit_mse_needs_at_least_one_class_column(last):
    with pytest.raises(ValueError, match=r"5 \+ K"):
        L.DetLogitMSE()(torch.zeros(2, last), torch.zeros(2, last))


# ---------------------------------------------------------------------------------------------
# PixelKD
# ---------------------------------------------------------------------------------------------


def test_pixel_kd_hand_worked():
    # N=1, K=2, H=1, W=2, T=2. Pixel 1: teacher [2 ln 3, 0], student [0, 0] → KL = 0.130812.
    # Pixel 2: identical logits → 0. Mean over 2 pixels, × T² = 4 → 2·0.130812 = 0.261624.
    z_t = torch.tensor([[[[2 * math.log(3), 1.0]], [[0.0, -1.0]]]])
    z_s = torch.tensor([[[[0.0, 1.0]], [[0.0, -1.0]]]])
    got = L.PixelKD(temperature=2.0)(z_s, z_t).item()
    assert got == pytest.approx(4 * KL_34_HALF / 2, rel=1e-6)
    assert got == pytest.approx(0.261624, abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_pixel_kd_matches_per_pixel_loop(temp):
    z_s, z_t = randn(2, 4, 3, 5, seed=1, scale=3), randn(2, 4, 3, 5, seed=2, scale=3)
    expected = np_pixel_kd(z_s.numpy(), z_t.numpy(), temp)
    assert L.PixelKD(temperature=temp)(z_s, z_t).item() == pytest.approx(expected, rel=1e-10)


def test_pixel_kd_is_not_a_spatial_softmax():
    # every pixel's class distribution identical → 0, although the spatial maps differ a lot
    z_t = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    z_s = z_t + randn(1, 1, 3, 3, seed=3, scale=5).float()  # a per-pixel constant over classes
    assert abs(L.PixelKD()(z_s, z_t).item()) < 1e-6


# ---------------------------------------------------------------------------------------------
# CWD
# ---------------------------------------------------------------------------------------------


def test_cwd_hand_worked_one_channel_two_locations():
    # N=1, C=1, H=2, W=1, τ=2. The softmax runs over the channel's 2 locations:
    # teacher [2 ln 3, 0]/2 → [3/4, 1/4]; student [0, 0] → [½, ½]; KL = 0.130812.
    # τ²/(N·C) = 4 → 0.523248. (A softmax over the single channel would give 0 instead.)
    z_t = torch.tensor([2 * math.log(3), 0.0]).view(1, 1, 2, 1)
    z_s = torch.zeros(1, 1, 2, 1)
    got = L.CWD(tau=2.0)(z_s, z_t).item()
    assert got == pytest.approx(4 * KL_34_HALF, rel=1e-6)
    assert got == pytest.approx(0.523248, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_per_channel_loop(tau):
    y_s, y_t = randn(2, 3, 4, 5, seed=4, scale=3), randn(2, 3, 4, 5, seed=5, scale=3)
    expected = np_cwd(y_s.numpy(), y_t.numpy(), tau)
    assert L.CWD(tau=tau)(y_s, y_t).item() == pytest.approx(expected, rel=1e-10)


def test_cwd_ignores_a_per_channel_constant():
    # φ is a softmax over locations: adding a constant to a whole channel changes nothing
    y_s, y_t = randn(2, 3, 4, 4, seed=6), randn(2, 3, 4, 4, seed=7)
    shift = randn(2, 3, 1, 1, seed=8, scale=20)
    cwd = L.CWD(tau=2.0)
    assert cwd(y_s + shift, y_t).item() == pytest.approx(cwd(y_s, y_t).item(), rel=1e-9)


class Conv(nn.Module):
    def __init__(self, channels: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_cwd_in_a_distiller_gets_a_1x1_connector_from_3_to_5_channels():
    student, teacher = Conv(3, seed=0), Conv(5, seed=1)
    distiller = kd.Distiller(teacher, student, [kd.Term(L.CWD(), weight=1.0)])
    x = randn(2, 2, 6, 6, seed=9).float()
    distiller.build(x)
    connector = distiller.connectors["cwd"]
    convs = [m for m in connector.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1
    assert convs[0].in_channels == 3 and convs[0].out_channels == 5
    assert convs[0].kernel_size == (1, 1)
    out = distiller(x)
    with torch.no_grad():
        expected = np_cwd(
            connector(student(x)).double().numpy(), teacher(x).double().numpy(), tau=4.0
        )
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    out.loss.backward()
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# DetLogitMSE
# ---------------------------------------------------------------------------------------------


def test_det_logit_mse_hand_worked():
    # one anchor, K = 2: s − t = [1, 0, 0, 1 | 2 | 3, 1]
    #   box mean (1 + 0 + 0 + 1)/4 = 0.5;  obj 2² = 4;  cls (9 + 1)/2 = 5
    #   box=1, obj=0.5, cls=2 → 0.5 + 2 + 10 = 12.5
    t = torch.tensor([[[0.5, 0.5, 1.0, 1.0, 0.0, -1.0, 2.0]]])
    s = t + torch.tensor([[[1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 1.0]]])
    assert L.DetLogitMSE(box=1.0, obj=0.5, cls=2.0)(s, t).item() == pytest.approx(12.5, rel=1e-6)
    # defaults (1, 1, 1): 0.5 + 4 + 5
    assert L.DetLogitMSE()(s, t).item() == pytest.approx(9.5, rel=1e-6)


@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 9), (2, 3, 2, 2, 8)])
def test_det_logit_mse_matches_numpy_for_any_leading_shape(shape):
    s, t = randn(*shape, seed=10, scale=2), randn(*shape, seed=11, scale=2)
    expected = np_det_mse(s.numpy(), t.numpy(), 0.3, 2.0, 1.5)
    got = L.DetLogitMSE(box=0.3, obj=2.0, cls=1.5)(s, t).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_det_logit_mse_each_part_has_its_own_mean():
    # only class columns differ; 1 vs 20 classes: the cls mean stays 1, it does not dilute
    for k in (1, 20):
        t = torch.zeros(4, 5 + k)
        s = t.clone()
        s[:, 5:] = 1.0
        assert L.DetLogitMSE()(s, t).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# All three: gradcheck, identical inputs.
# ---------------------------------------------------------------------------------------------

CASES = [
    (L.PixelKD(temperature=2.0), (2, 3, 2, 3)),
    (L.CWD(tau=3.0), (2, 3, 2, 3)),
    (L.DetLogitMSE(box=0.5, obj=2.0, cls=1.0), (2, 3, 7)),
]
IDS = ["pixel_kd", "cwd", "det_logit_mse"]


@pytest.mark.parametrize(("loss", "shape"), CASES, ids=IDS)
def test_gradcheck_student_and_teacher(loss, shape):
    s = randn(*shape, seed=12, scale=2).requires_grad_()
    t = randn(*shape, seed=13, scale=2).requires_grad_()
    assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.parametrize(("loss", "shape"), CASES, ids=IDS)
def test_identical_inputs_give_zero(loss, shape):
    x = randn(*shape, seed=14, scale=4).float()
    assert abs(loss(x, x.clone()).item()) < 1e-6
    assert loss(x + randn(*shape, seed=15).float(), x).item() > 1e-4


@pytest.mark.parametrize(("loss", "shape"), CASES, ids=IDS)
def test_huge_inputs_stay_finite(loss, shape):
    s = randn(*shape, seed=16, scale=1e4).float().requires_grad_()
    t = randn(*shape, seed=17, scale=1e4).float()
    value = loss(s, t)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------------
# Multi-task terms
# ---------------------------------------------------------------------------------------------


def test_multitask_weights_follow_the_formula():
    # r_seg·(1−α_seg) = 2·0.7 = 1.4, r_seg·α_seg = 0.6, r_det·(1−α_det) = 0.5·0.4 = 0.2,
    # r_det·α_det = 0.3
    losses = [L.CE(), L.PixelKD(), L.LogitMSE(), L.DetLogitMSE()]
    terms = multitask_terms(*losses, alpha_seg=0.3, alpha_det=0.6, ratio_seg=2, ratio_det=0.5)
    got = {t.name: (t.weight, t.output, t.loss) for t in terms}
    assert list(got) == ["seg_hard", "seg_soft", "det_hard", "det_soft"]
    expected = {
        "seg_hard": (1.4, "seg", losses[0]),
        "seg_soft": (0.6, "seg", losses[1]),
        "det_hard": (0.2, "det", losses[2]),
        "det_soft": (0.3, "det", losses[3]),
    }
    for name, (weight, output, loss) in expected.items():
        assert got[name][0] == pytest.approx(weight, rel=1e-12)
        assert got[name][1] == output
        assert got[name][2] is loss


def test_multitask_custom_keys_and_default_ratios():
    terms = multitask_terms(
        L.CE(), L.PixelKD(), L.LogitMSE(), L.DetLogitMSE(),
        alpha_seg=0.5, alpha_det=0.25, seg_key="masks", det_key="boxes",
    )  # fmt: skip
    assert [(t.name, t.weight, t.output) for t in terms] == [
        ("seg_hard", 0.5, "masks"),
        ("seg_soft", 0.5, "masks"),
        ("det_hard", 0.75, "boxes"),
        ("det_soft", 0.25, "boxes"),
    ]


def test_multitask_leaves_out_zero_weight_terms():
    # α_seg = 1: no seg hard term; α_det = 0: no det soft term; the losses may then be None
    terms = multitask_terms(None, L.PixelKD(), L.LogitMSE(), None, alpha_seg=1.0, alpha_det=0.0)
    assert [(t.name, t.weight) for t in terms] == [("seg_soft", 1.0), ("det_hard", 1.0)]
    # r_det = 0: the detection task is left out entirely
    terms = multitask_terms(
        L.CE(), L.PixelKD(), None, None, alpha_seg=0.2, alpha_det=0.5, ratio_det=0.0
    )
    assert [t.name for t in terms] == ["seg_hard", "seg_soft"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha_seg": 1.5, "alpha_det": 0.5}, r"alpha_seg must lie in \[0, 1\], got 1.5"),
        ({"alpha_seg": 0.5, "alpha_det": -0.1}, r"alpha_det must lie in \[0, 1\], got -0.1"),
        ({"alpha_seg": 0.5, "alpha_det": 0.5, "ratio_seg": -1}, r"ratio_seg must be >= 0, got -1"),
        ({"alpha_seg": 0.5, "alpha_det": 0.5, "ratio_det": math.inf}, r"ratio_det .* finite"),
        ({"alpha_seg": math.nan, "alpha_det": 0.5}, r"alpha_seg .* finite"),
        ({"alpha_seg": 0.5, "alpha_det": 0.5, "ratio_seg": 0, "ratio_det": 0}, r"weight 0"),
    ],
)
def test_multitask_rejects_bad_alphas_and_ratios(kwargs, message):
    losses = [L.CE(), L.PixelKD(), L.LogitMSE(), L.DetLogitMSE()]
    with pytest.raises(ValueError, match=message):
        multitask_terms(*losses, **kwargs)


def test_multitask_missing_loss_for_a_weighted_term_is_an_error():
    with pytest.raises(ValueError, match=r"det_hard has weight 0.5 .* None"):
        multitask_terms(L.CE(), L.PixelKD(), None, L.DetLogitMSE(), alpha_seg=0.5, alpha_det=0.5)


class DetTargetMSE(DistillLoss):
    """A stand-in hard detection loss for the test: mean squared error to a regression target."""

    needs = (STUDENT, TARGET)
    target_is_class_index = False

    def forward(self, student, target):
        return (student - target).pow(2).mean()


class TwoHeads(nn.Module):
    """seg: N×3×4×4 class logits; det: N×2×(5+2) YOLO-style outputs."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Conv2d(2, 4, 3, padding=1)
        self.seg = nn.Conv2d(4, 3, 1)
        self.det = nn.Linear(4, 2 * 7)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"seg": self.seg(h), "det": self.det(h.mean(dim=(2, 3))).view(-1, 2, 7)}


def test_multitask_distiller_loss_equals_the_formula_by_hand():
    a_seg, a_det, r_seg, r_det, temp = 0.3, 0.6, 2.0, 0.5, 2.0
    teacher, student = TwoHeads(seed=0), TwoHeads(seed=1)
    terms = multitask_terms(
        L.CE(), L.PixelKD(temperature=temp), DetTargetMSE(), L.DetLogitMSE(box=2.0),
        alpha_seg=a_seg, alpha_det=a_det, ratio_seg=r_seg, ratio_det=r_det,
    )  # fmt: skip
    distiller = kd.Distiller(teacher, student, terms)
    x = randn(3, 2, 4, 4, seed=20).float()
    g = torch.Generator().manual_seed(21)
    target = {"seg": torch.randint(0, 3, (3, 4, 4), generator=g), "det": randn(3, 2, 7, seed=22)}
    target["det"] = target["det"].float()
    out = distiller(x, target=target)

    with torch.no_grad():
        s, t = student(x), teacher(x)
        seg_hard = F.cross_entropy(s["seg"], target["seg"])
        # per-pixel KL summed over everything, divided by the N·H·W = 48 pixels, × T²
        seg_soft = (
            temp**2
            * F.kl_div(
                F.log_softmax(s["seg"] / temp, 1),
                F.log_softmax(t["seg"] / temp, 1),
                log_target=True,
                reduction="sum",
            )
            / 48
        )
        det_hard = ((s["det"] - target["det"]) ** 2).mean()
        e = (s["det"] - t["det"]) ** 2
        det_soft = 2.0 * e[..., :4].mean() + e[..., 4].mean() + e[..., 5:].mean()
        expected = r_det * ((1 - a_det) * det_hard + a_det * det_soft) + r_seg * (
            (1 - a_seg) * seg_hard + a_seg * seg_soft
        )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.parts) == {"seg_hard", "seg_soft", "det_hard", "det_soft"}
    assert out.parts["det_soft"] == pytest.approx(r_det * a_det * det_soft.item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())


# ---------------------------------------------------------------------------------------------
# Void pixels (ignore_index): PixelKD and CWD take the labels and leave the void pixels out.
# ---------------------------------------------------------------------------------------------

VOID = 255


def np_pixel_kd_void(s, t, temp, labels, void):
    """T² · Σ over counted pixels of the per-pixel KL / number of counted pixels (0 if none)."""
    total, count = 0.0, 0
    n_, _, h_, w_ = s.shape
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                if labels[n, h, w] == void:
                    continue
                count += 1
                total += np_kl(np_softmax(t[n, :, h, w] / temp), np_softmax(s[n, :, h, w] / temp))
    return temp * temp * total / count if count else 0.0


def np_cwd_void(s, t, tau, labels, void):
    """Per (n, c): softmax over sample n's counted locations only, KL over them; the mean over
    the channels of the samples with a counted location, × τ²."""
    total, rows = 0.0, 0
    n_, c_ = s.shape[:2]
    for n in range(n_):
        kept = [i for i, label in enumerate(labels[n].ravel()) if label != void]
        if not kept:
            continue
        for c in range(c_):
            rows += 1
            p_t = np_softmax(t[n, c].ravel()[kept] / tau)
            p_s = np_softmax(s[n, c].ravel()[kept] / tau)
            total += np_kl(p_t, p_s)
    return tau * tau * total / rows if rows else 0.0


def void_labels(n, h, w, classes, seed, void_fraction=0.4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n, h, w), generator=g)
    return labels.masked_fill(torch.rand(n, h, w, generator=g) < void_fraction, VOID)


def test_pixel_and_channel_losses_read_the_labels_only_with_ignore_index():
    assert tuple(L.PixelKD().needs) == tuple(L.CWD().needs) == ("student", "teacher")
    for loss in (L.create_loss("pixel_kd", ignore_index=VOID), L.CWD(ignore_index=VOID)):
        assert tuple(loss.needs) == ("student", "teacher", "target")
        assert loss.ignore_index == VOID
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        L.CWD(ignore_index=2.5)


def test_pixel_kd_void_pixel_counts_nowhere_hand_worked():
    # N=1, K=2, H=1, W=2, T=2: pixel 1 teacher [2 ln 3, 0] vs student [0, 0] → KL 0.130812;
    # pixel 2 is void, its logits far apart. Mean over the 1 counted pixel × T² = 0.523248.
    z_t = torch.tensor([[[[2 * math.log(3), 30.0]], [[0.0, -30.0]]]])
    z_s = torch.tensor([[[[0.0, -30.0]], [[0.0, 30.0]]]])
    got = L.PixelKD(temperature=2.0, ignore_index=VOID)(z_s, z_t, torch.tensor([[[1, VOID]]]))
    assert got.item() == pytest.approx(0.523248, abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_pixel_kd_with_void_pixels_matches_per_pixel_loop(temp):
    z_s, z_t = randn(2, 4, 3, 5, seed=31, scale=3), randn(2, 4, 3, 5, seed=32, scale=3)
    labels = void_labels(2, 3, 5, 4, seed=33)
    assert (labels == VOID).any() and (labels != VOID).any()
    expected = np_pixel_kd_void(z_s.numpy(), z_t.numpy(), temp, labels.numpy(), VOID)
    got = L.PixelKD(temperature=temp, ignore_index=VOID)(z_s, z_t, labels.int())  # int32 too
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_cwd_void_location_leaves_both_softmaxes_hand_worked():
    # N=1, C=1, H=3, W=1, τ=2; location 3 void. Over the 2 counted locations: teacher
    # [2 ln 3, 0]/2 → [3/4, 1/4], student [0, 0] → [½, ½]; KL 0.130812, × τ² = 0.523248.
    # Counting the void location (teacher 9, student −9) would give about 4.9 instead.
    z_t = torch.tensor([2 * math.log(3), 0.0, 9.0]).view(1, 1, 3, 1)
    z_s = torch.tensor([0.0, 0.0, -9.0]).view(1, 1, 3, 1)
    labels = torch.tensor([[[0], [2], [VOID]]])
    got = L.CWD(tau=2.0, ignore_index=VOID)(z_s, z_t, labels).item()
    assert got == pytest.approx(0.523248, abs=1e-6)
    assert L.CWD(tau=2.0)(z_s, z_t).item() > 4


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_with_void_matches_loop_and_skips_an_all_void_sample(tau):
    y_s, y_t = randn(3, 2, 4, 3, seed=34, scale=3), randn(3, 2, 4, 3, seed=35, scale=3)
    labels = void_labels(3, 4, 3, 5, seed=36)
    labels[1] = VOID  # sample 1 has no counted location: its channels are left out
    expected = np_cwd_void(y_s.numpy(), y_t.numpy(), tau, labels.numpy(), VOID)
    got = L.CWD(tau=tau, ignore_index=VOID)(y_s, y_t, labels)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    "loss", [L.PixelKD(2.0, ignore_index=VOID), L.CWD(2.0, ignore_index=VOID)], ids=["pkd", "cwd"]
)
def test_void_pixels_neither_change_the_loss_nor_get_a_gradient(loss):
    z_s, z_t = randn(2, 3, 3, 4, seed=37), randn(2, 3, 3, 4, seed=38)
    labels = void_labels(2, 3, 4, 3, seed=39)
    void = (labels == VOID).unsqueeze(1).expand_as(z_s)
    wild_s = torch.where(void, 1e4 * torch.sign(randn(2, 3, 3, 4, seed=40)), z_s)
    wild_t = torch.where(void, -1e4 * torch.ones_like(z_t), z_t)
    wild_s.requires_grad_()
    value = loss(wild_s, wild_t, labels)
    assert value.item() == pytest.approx(loss(z_s, z_t, labels).item(), rel=1e-10)
    value.backward()
    assert torch.isfinite(wild_s.grad).all()
    assert (wild_s.grad[void] == 0).all() and (wild_s.grad[~void] != 0).any()


@pytest.mark.parametrize(
    "loss", [L.PixelKD(1.5, ignore_index=VOID), L.CWD(1.5, ignore_index=VOID)], ids=["pkd", "cwd"]
)
def test_void_pixels_gradcheck_student_and_teacher(loss):
    z_s = randn(2, 3, 2, 3, seed=41).requires_grad_()
    z_t = randn(2, 3, 2, 3, seed=42).requires_grad_()
    labels = void_labels(2, 2, 3, 3, seed=43)
    assert torch.autograd.gradcheck(lambda s, t: loss(s, t, labels), (z_s, z_t))


@pytest.mark.parametrize(
    "loss", [L.PixelKD(ignore_index=VOID), L.CWD(ignore_index=VOID)], ids=["pkd", "cwd"]
)
def test_an_all_void_batch_gives_zero_with_zero_gradient(loss):
    z_s = randn(2, 3, 2, 2, seed=44).requires_grad_()
    value = loss(z_s, randn(2, 3, 2, 2, seed=45), torch.full((2, 2, 2), VOID))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(z_s.grad, torch.zeros_like(z_s))


def test_void_mask_must_match_the_maps():
    loss = L.CWD(ignore_index=VOID)
    maps = randn(2, 3, 4, 4, seed=46)
    with pytest.raises(ValueError, match=r"N×H×W \(2, 4, 4\).*got \(2, 8, 8\)"):
        loss(maps, maps, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="integer labels"):
        loss(maps, maps, torch.zeros(2, 4, 4))


def test_void_pixels_in_a_distiller_with_ce_and_pixel_kd():
    """The Distiller hands the labels to PixelKD(ignore_index) as to CE: the weighted sum equals
    per-pixel loops over the counted pixels."""
    teacher, student = Conv(3, seed=1), Conv(3, seed=2)
    x = randn(2, 2, 3, 3, seed=47).float()
    labels = void_labels(2, 3, 3, 3, seed=48)
    distiller = kd.Distiller(
        teacher,
        student,
        [kd.Term(L.CE(ignore_index=VOID), 0.5), kd.Term(L.PixelKD(2.0, ignore_index=VOID), 0.5)],
    )
    out = distiller(x, target=labels)
    with torch.no_grad():
        s, t = student(x).double().numpy(), teacher(x).double().numpy()
    ce_terms = [
        -math.log(np_softmax(s[n, :, h, w])[labels[n, h, w]])
        for n in range(2)
        for h in range(3)
        for w in range(3)
        if labels[n, h, w] != VOID
    ]
    expected = 0.5 * np.mean(ce_terms) + 0.5 * np_pixel_kd_void(s, t, 2.0, labels.numpy(), VOID)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
