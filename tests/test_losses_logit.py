"""Reference tests for the logit losses (KD, CE, DKD, DIST, LogitMSE).

Every expected number here comes from a hand-worked case, an equivalent formula written out in the
test with plain torch / numpy / math, or float64 gradcheck -- never from the code under test.
The specification is the loss table in DESIGN.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from kdistill import losses as L

# ---------------------------------------------------------------------------------------------
# Independent reference implementations (float64, written differently from the library).
# ---------------------------------------------------------------------------------------------


def np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) = sum p log(p / q), with 0 log 0 = 0."""
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def np_kd(z_s: np.ndarray, z_t: np.ndarray, t: float) -> float:
    """T^2 * mean_n KL(softmax(z_t/T) || softmax(z_s/T)), one row at a time."""
    total = 0.0
    for n in range(z_s.shape[0]):
        total += np_kl(np_softmax(z_t[n] / t), np_softmax(z_s[n] / t))
    return t * t * total / z_s.shape[0]


def np_dkd_parts(
    z_s: np.ndarray, z_t: np.ndarray, target: np.ndarray, t: float
) -> tuple[float, float]:
    """(TCKD, NCKD), each x T^2, from the binary masses and an explicit K-1 class softmax."""
    tckd = nckd = 0.0
    n_rows = z_s.shape[0]
    for n in range(n_rows):
        y = int(target[n])
        p_s, p_t = np_softmax(z_s[n] / t), np_softmax(z_t[n] / t)
        b_s = np.array([p_s[y], 1.0 - p_s[y]])
        b_t = np.array([p_t[y], 1.0 - p_t[y]])
        tckd += np_kl(b_t, b_s)
        # NCKD: delete the target column, softmax over the K-1 classes that are left.
        q_s = np_softmax(np.delete(z_s[n], y) / t)
        q_t = np_softmax(np.delete(z_t[n], y) / t)
        nckd += np_kl(q_t, q_s)
    return t * t * tckd / n_rows, t * t * nckd / n_rows


def np_dist(z_s: np.ndarray, z_t: np.ndarray, beta: float, gamma: float, t: float) -> float:
    """Huang et al. 2022 with np.corrcoef per row (inter-class) and per column (intra-class)."""
    p_s = np.stack([np_softmax(r / t) for r in z_s])
    p_t = np.stack([np_softmax(r / t) for r in z_t])
    rho_rows = [np.corrcoef(p_s[n], p_t[n])[0, 1] for n in range(p_s.shape[0])]
    rho_cols = [np.corrcoef(p_s[:, k], p_t[:, k])[0, 1] for k in range(p_s.shape[1])]
    return t * t * (beta * (1 - np.mean(rho_rows)) + gamma * (1 - np.mean(rho_cols)))


def torch_kl_unscaled(z_s: torch.Tensor, z_t: torch.Tensor, t: float) -> torch.Tensor:
    """mean_n KL(p_t || p_s) with no T^2 factor."""
    log_p_s = torch.log_softmax(z_s / t, dim=1)
    log_p_t = torch.log_softmax(z_t / t, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def randint(high: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# Common contract: 0-dim output, `needs`, registry.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "needs"),
    [
        (L.KD(), ("student", "teacher")),
        (L.CE(), ("student", "target")),
        (L.DKD(), ("student", "teacher", "target")),
        (L.DIST(), ("student", "teacher")),
        (L.LogitMSE(), ("student", "teacher")),
    ],
    ids=["kd", "ce", "dkd", "dist", "logit_mse"],
)
def test_loss_is_module_with_needs_and_returns_scalar(loss, needs):
    assert isinstance(loss, nn.Module)
    assert tuple(loss.needs) == needs
    z_s, z_t, target = randn(4, 5, seed=0), randn(4, 5, seed=1), randint(5, 4, seed=2)
    inputs = {"student": z_s, "teacher": z_t, "target": target}
    out = loss(*(inputs[name] for name in needs))
    assert isinstance(out, torch.Tensor)
    assert out.dim() == 0
    assert torch.isfinite(out)


def test_registry_has_the_logit_losses():
    assert {"kd", "ce", "dkd", "dist", "logit_mse"} <= set(L.LOSSES.names())


@pytest.mark.parametrize(
    ("name", "cls"),
    [("kd", L.KD), ("ce", L.CE), ("dkd", L.DKD), ("dist", L.DIST), ("logit_mse", L.LogitMSE)],
)
def test_create_loss_by_name_gives_the_class(name, cls):
    assert isinstance(L.create_loss(name), cls)


def test_create_loss_passes_hyperparameters():
    loss = L.create_loss("kd", temperature=2.0)
    assert isinstance(loss, L.KD)
    assert loss.temperature == 2.0
    z_s, z_t = randn(3, 4, seed=3), randn(3, 4, seed=4)
    # same number as the unscaled KL at T = 2, times 2² = 4
    expected = 4.0 * torch_kl_unscaled(z_s, z_t, 2.0).item()
    assert loss(z_s, z_t).item() == pytest.approx(expected, rel=1e-9)


def test_create_loss_unknown_name_suggests_the_close_one():
    with pytest.raises(KeyError) as excinfo:
        L.create_loss("kdd")
    assert "'kd'" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# Errors: shapes, hyperparameters, targets.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_call",
    [
        lambda a, b: L.KD()(a, b),
        lambda a, b: L.DKD()(a, b, torch.zeros(2, dtype=torch.long)),
        lambda a, b: L.DIST()(a, b),
        lambda a, b: L.LogitMSE()(a, b),
    ],
    ids=["kd", "dkd", "dist", "logit_mse"],
)
def test_shape_mismatch_names_both_shapes(make_call):
    with pytest.raises(ValueError) as excinfo:
        make_call(torch.zeros(2, 3), torch.zeros(2, 4))
    message = str(excinfo.value)
    assert "(2, 3)" in message
    assert "(2, 4)" in message


@pytest.mark.parametrize(
    "make_call",
    [
        lambda x: L.KD()(x, x),
        lambda x: L.DKD()(x, x, torch.zeros(x.shape[0], dtype=torch.long)),
        lambda x: L.DIST()(x, x),
    ],
    ids=["kd", "dkd", "dist"],
)
@pytest.mark.parametrize("shape", [(6,), (2, 3, 4)])
def test_logit_losses_need_2d_inputs(make_call, shape):
    with pytest.raises(ValueError):
        make_call(torch.zeros(*shape))


@pytest.mark.parametrize(
    ("cls", "param"),
    [
        (L.KD, "temperature"),
        (L.DKD, "temperature"),
        (L.DKD, "alpha"),
        (L.DKD, "beta"),
        (L.DIST, "temperature"),
        (L.DIST, "beta"),
        (L.DIST, "gamma"),
    ],
)
def test_negative_hyperparameter_raises_naming_it_and_its_value(cls, param):
    with pytest.raises(ValueError) as excinfo:
        cls(**{param: -0.5})
    message = str(excinfo.value)
    assert param in message
    assert "-0.5" in message


@pytest.mark.parametrize("cls", [L.KD, L.DKD, L.DIST])
def test_zero_temperature_raises(cls):
    with pytest.raises(ValueError, match="temperature"):
        cls(temperature=0.0)


@pytest.mark.parametrize(("cls", "param"), [(L.DKD, "alpha"), (L.DKD, "beta"), (L.DIST, "gamma")])
def test_zero_weight_is_allowed(cls, param):
    cls(**{param: 0.0})  # only negative weights are invalid


@pytest.mark.parametrize("bad", [5, -1])
def test_dkd_target_out_of_range_raises(bad):
    z = randn(2, 5, seed=5)
    target = torch.tensor([0, bad])
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        L.DKD()(z, z + 1, target)


# ---------------------------------------------------------------------------------------------
# KD
# ---------------------------------------------------------------------------------------------


def test_kd_hand_worked_two_classes():
    # T = 2. Teacher logits [2 ln 3, 0] → z/T = [ln 3, 0] → p_t = [3/4, 1/4].
    # Student logits [0, 0] → p_s = [1/2, 1/2].
    # KL(p_t‖p_s) = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.304099 − 0.173287 = 0.130812
    # Second row: identical logits → KL = 0. Batch mean = 0.065406; × T² = 4 → 0.261624
    kl_row1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 4 * (kl_row1 + 0.0) / 2
    z_t = torch.tensor([[2 * math.log(3), 0.0], [1.0, -1.0]])
    z_s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    got = L.KD(temperature=2.0)(z_s, z_t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.261624, abs=1e-6)


def test_kd_default_temperature_is_4():
    z_s, z_t = randn(3, 5, seed=6), randn(3, 5, seed=7)
    assert L.KD()(z_s, z_t).item() == pytest.approx(np_kd(z_s.numpy(), z_t.numpy(), 4.0), rel=1e-9)


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
def test_kd_matches_kl_div_and_numpy_loop(t):
    z_s, z_t = randn(8, 10, seed=8, scale=3), randn(8, 10, seed=9, scale=3)
    got = L.KD(temperature=t)(z_s, z_t).item()
    via_kl_div = (
        F.kl_div(
            F.log_softmax(z_s / t, dim=1),
            F.log_softmax(z_t / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )
    assert got == pytest.approx(via_kl_div.item(), rel=1e-9)
    assert got == pytest.approx(np_kd(z_s.numpy(), z_t.numpy(), t), rel=1e-9)


def test_kd_float32_matches_float64_reference():
    z_s, z_t = randn(8, 10, seed=10, scale=3), randn(8, 10, seed=11, scale=3)
    got = L.KD(temperature=4.0)(z_s.float(), z_t.float()).item()
    assert got == pytest.approx(np_kd(z_s.numpy(), z_t.numpy(), 4.0), rel=1e-5)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_kd_is_not_the_kldivloss_on_probabilities_bug():
    # DESIGN.md: feeding KLDivLoss plain softmax probabilities (not log-probabilities) is wrong,
    # as is reduction="mean" (divides by N·K) where "batchmean" (divides by N) is meant.
    t = 2.0
    z_s, z_t = randn(4, 6, seed=12, scale=2), randn(4, 6, seed=13, scale=2)
    got = L.KD(temperature=t)(z_s, z_t).item()
    correct = t * t * torch_kl_unscaled(z_s, z_t, t).item()
    p_s, p_t = torch.softmax(z_s / t, dim=1), torch.softmax(z_t / t, dim=1)
    buggy_probs = nn.KLDivLoss()(p_s, p_t).item()
    buggy_probs_scaled = t * t * nn.KLDivLoss(reduction="batchmean")(p_s, p_t).item()
    buggy_mean = t * t * nn.KLDivLoss(reduction="mean")(torch.log_softmax(z_s / t, 1), p_t).item()
    assert got == pytest.approx(correct, rel=1e-9)
    for buggy in (buggy_probs, buggy_probs_scaled, buggy_mean):
        assert abs(got - buggy) > 0.05 * abs(correct), (got, buggy)


@pytest.mark.parametrize("t", [0.5, 1.0, 3.0, 8.0])
def test_kd_scales_with_t_squared(t):
    z_s, z_t = randn(5, 7, seed=14, scale=2), randn(5, 7, seed=15, scale=2)
    unscaled = torch_kl_unscaled(z_s, z_t, t).item()
    assert L.KD(temperature=t)(z_s, z_t).item() == pytest.approx(t * t * unscaled, rel=1e-9)


def test_kd_invariant_to_per_row_constant():
    z_s, z_t = randn(5, 7, seed=16, scale=2), randn(5, 7, seed=17, scale=2)
    c_s, c_t = randn(5, 1, seed=18, scale=50), randn(5, 1, seed=19, scale=50)
    kd = L.KD(temperature=3.0)
    assert kd(z_s + c_s, z_t + c_t).item() == pytest.approx(kd(z_s, z_t).item(), rel=1e-9)


def test_kd_identical_logits_give_zero():
    z = randn(6, 9, seed=20, scale=5).float()
    assert abs(L.KD()(z, z.clone()).item()) < 1e-6


def test_kd_gradcheck_student():
    z_s = randn(3, 5, seed=21).requires_grad_()
    z_t = randn(3, 5, seed=22)
    kd = L.KD(temperature=2.0)
    assert torch.autograd.gradcheck(lambda s: kd(s, z_t), (z_s,))


def test_kd_gradient_is_t_times_prob_difference():
    # d/dz_s [T² · mean_n KL(p_t‖p_s)] = T² · (1/T)(p_s − p_t) / N = T (p_s − p_t) / N
    t, n = 3.0, 4
    z_s = randn(n, 6, seed=23, scale=2).requires_grad_()
    z_t = randn(n, 6, seed=24, scale=2)
    L.KD(temperature=t)(z_s, z_t).backward()
    expected = t * (torch.softmax(z_s.detach() / t, 1) - torch.softmax(z_t / t, 1)) / n
    torch.testing.assert_close(z_s.grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_huge_logits_finite_value_and_gradient(dtype):
    # T = 1. Row 1: p_t = one-hot at class 1, log p_s[1] = −2e4 → KL = 2e4.
    # Row 2: p_t = one-hot at class 0, log p_s[0] = 0 − logsumexp(0, 1e4, −1e4) ≈ −1e4 → KL = 1e4.
    # Mean = 1.5e4.
    z_s = torch.tensor([[1e4, -1e4, 0.0], [0.0, 1e4, -1e4]], dtype=dtype, requires_grad=True)
    z_t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]], dtype=dtype)
    out = L.KD(temperature=1.0)(z_s, z_t)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(1.5e4, rel=1e-6)
    out.backward()
    assert torch.isfinite(z_s.grad).all()


# ---------------------------------------------------------------------------------------------
# CE
# ---------------------------------------------------------------------------------------------


def test_ce_hand_worked_two_samples():
    # Row 1: logits [0, 0] → p = [1/2, 1/2], target 0 → −log(1/2) = ln 2 = 0.693147
    # Row 2: logits [ln 3, 0] → p = [3/4, 1/4], target 1 → −log(1/4) = ln 4 = 1.386294
    # Mean = (ln 2 + ln 4) / 2 = 1.5 ln 2 = 1.039721
    z = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    target = torch.tensor([0, 1])
    got = L.CE()(z, target)
    assert got.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_ce_label_smoothing_hand_worked():
    # ε = 0.2, K = 2: target distribution q = (1 − ε)·onehot + ε/K.
    # Row 1: q = [0.9, 0.1], p = [1/2, 1/2] → −Σ q log p = ln 2 = 0.693147
    # Row 2: q = [0.1, 0.9], p = [3/4, 1/4] → 0.1·ln(4/3) + 0.9·ln 4 = 0.028768 + 1.247665
    # Mean = (0.693147 + 1.276433) / 2 = 0.984790
    row2 = 0.1 * math.log(4 / 3) + 0.9 * math.log(4)
    expected = (math.log(2) + row2) / 2
    z = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    got = L.CE(label_smoothing=0.2)(z, torch.tensor([0, 1]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.984790, abs=1e-6)


def test_ce_matches_negative_log_softmax_at_target():
    z = randn(7, 5, seed=25, scale=3)
    target = randint(5, 7, seed=26)
    expected = np.mean(
        [-np.log(np_softmax(z[n].numpy())[int(target[n])]) for n in range(z.shape[0])]
    )
    assert L.CE()(z, target).item() == pytest.approx(expected, rel=1e-9)


def test_ce_gradcheck_and_gradient():
    z = randn(4, 5, seed=27).requires_grad_()
    target = randint(5, 4, seed=28)
    ce = L.CE()
    assert torch.autograd.gradcheck(lambda s: ce(s, target), (z,))
    ce(z, target).backward()
    expected = (torch.softmax(z.detach(), 1) - F.one_hot(target, 5).double()) / 4
    torch.testing.assert_close(z.grad, expected, rtol=1e-9, atol=1e-12)


def np_ce_void(z: np.ndarray, labels: np.ndarray, void: int, smoothing: float = 0.0) -> float:
    """Mean over the counted items (label ≠ void) of −Σ_k q_k log p_k, q the smoothed one-hot;
    `z` N×K or N×K×H×W, one item (sample or pixel) at a time; 0 when nothing is counted."""
    classes = z.shape[1]
    rows = np.moveaxis(z, 1, -1).reshape(-1, classes)
    total, count = 0.0, 0
    for row, label in zip(rows, labels.ravel()):
        if label == void:
            continue
        q = np.full(classes, smoothing / classes)
        q[label] += 1 - smoothing
        total -= float(np.sum(q * np.log(np_softmax(row))))
        count += 1
    return total / count if count else 0.0


def test_ce_hand_worked_with_a_padding_token():
    # the two rows of test_ce_hand_worked_two_samples, then a padding row (−100) with wild
    # logits: mean over the 2 counted rows = 1.5 ln 2, as without the padding row
    z = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [50.0, -50.0]])
    got = L.CE()(z, torch.tensor([0, 1, -100]))
    assert got.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_ce_void_pixels_match_a_per_pixel_loop(smoothing):
    z = randn(2, 4, 3, 5, seed=60, scale=2)
    g = torch.Generator().manual_seed(61)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[torch.rand(2, 3, 5, generator=g) < 0.4] = 255  # VOC / Cityscapes void
    expected = np_ce_void(z.numpy(), labels.numpy(), 255, smoothing)
    got = L.CE(label_smoothing=smoothing, ignore_index=255)(z, labels)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    z = z.requires_grad_()
    ce = L.CE(label_smoothing=smoothing, ignore_index=255)
    assert torch.autograd.gradcheck(lambda s: ce(s, labels), (z,))


def test_ce_all_void_batch_gives_zero_with_zero_gradient():
    z = randn(3, 4, seed=62).requires_grad_()
    value = L.CE()(z, torch.full((3,), -100))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_ce_and_dkd_accept_integer_labels_of_any_dtype(dtype):
    z = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert L.CE()(z, torch.tensor([0, 1], dtype=dtype)).item() == pytest.approx(
        1.5 * math.log(2), rel=1e-6
    )
    z_s, z_t, target = hand_dkd_inputs(2.0)
    tckd, nckd = L.DKD(temperature=2.0).tckd_nckd(z_s, z_t, target.to(dtype))
    assert (tckd.item(), nckd.item()) == pytest.approx((4 * HAND_TCKD, 4 * HAND_NCKD), rel=1e-9)


def test_ce_refuses_labels_that_are_not_class_indices():
    z = randn(2, 3, seed=63)
    with pytest.raises(TypeError, match=r"integer class indices, got dtype torch.float32 .*long"):
        L.CE()(z, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="torch.bool"):
        L.CE()(z, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"shape \(2,\) .*\(2, 3\).*got \(2, 1\)"):
        L.CE()(z, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"or be ignore_index=-100, got min 0 and max 255"):
        L.CE()(z, torch.tensor([0, 255]))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\], got min -100"):
        L.CE(ignore_index=None)(z, torch.tensor([0, -100]))


# ---------------------------------------------------------------------------------------------
# DKD
# ---------------------------------------------------------------------------------------------

# Hand-worked DKD case, K = 3, target 0, at T with logits = T · (log-probabilities):
#   student p_s = [1/3, 1/3, 1/3]            → b_s = [1/3, 2/3],  non-target p̂_s = [1/2, 1/2]
#   teacher exp = [4, 3, 1] / 8 → p_t = [1/2, 3/8, 1/8] → b_t = [1/2, 1/2], p̂_t = [3/4, 1/4]
#   TCKD/T² = 1/2·ln((1/2)/(1/3)) + 1/2·ln((1/2)/(2/3)) = 1/2·ln(9/8) = 0.058892
#   NCKD/T² = 3/4·ln((3/4)/(1/2)) + 1/4·ln((1/4)/(1/2)) = 3/4·ln(3/2) − 1/4·ln 2 = 0.130812
HAND_TCKD = 0.5 * math.log(9 / 8)
HAND_NCKD = 0.75 * math.log(1.5) - 0.25 * math.log(2)


def hand_dkd_inputs(t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z_s = torch.zeros(1, 3, dtype=torch.float64)
    z_t = t * torch.tensor([[math.log(4), math.log(3), 0.0]], dtype=torch.float64)
    return z_s, z_t, torch.tensor([0])


def test_dkd_hand_worked_parts():
    assert HAND_TCKD == pytest.approx(0.058892, abs=1e-6)
    assert HAND_NCKD == pytest.approx(0.130812, abs=1e-6)
    t = 2.0
    tckd, nckd = L.DKD(temperature=t).tckd_nckd(*hand_dkd_inputs(t))
    assert tckd.item() == pytest.approx(4 * HAND_TCKD, rel=1e-9)
    assert nckd.item() == pytest.approx(4 * HAND_NCKD, rel=1e-9)


def test_dkd_hand_worked_total_with_defaults():
    # α = 1, β = 8, T = 4: 16·(1·0.058892 + 8·0.130812) = 17.685845
    got = L.DKD()(*hand_dkd_inputs(4.0))
    assert got.item() == pytest.approx(16 * (HAND_TCKD + 8 * HAND_NCKD), rel=1e-9)


def test_dkd_hand_worked_is_a_decomposition_of_kd():
    # KL(p_t‖p_s) = TCKD + (1 − p_t[target])·NCKD (Zhao et al. eq. 5), 1 − p_t[0] = 1/2:
    # 0.058892 + 0.5·0.130812 = 0.124298; direct: 1/2 ln(3/2) + 3/8 ln(9/8) + 1/8 ln(3/8)
    direct = 0.5 * math.log(1.5) + 0.375 * math.log(9 / 8) + 0.125 * math.log(3 / 8)
    assert HAND_TCKD + 0.5 * HAND_NCKD == pytest.approx(direct, rel=1e-12)
    t = 2.0
    z_s, z_t, target = hand_dkd_inputs(t)
    assert L.KD(temperature=t)(z_s, z_t).item() == pytest.approx(4 * direct, rel=1e-9)


def test_dkd_parts_decompose_kd_on_random_rows():
    t = 3.0
    dkd, kd = L.DKD(temperature=t), L.KD(temperature=t)
    for seed in range(5):
        z_s, z_t = randn(1, 6, seed=100 + seed, scale=3), randn(1, 6, seed=200 + seed, scale=3)
        target = randint(6, 1, seed=300 + seed)
        tckd, nckd = dkd.tckd_nckd(z_s, z_t, target)
        p_t_target = torch.softmax(z_t / t, 1)[0, target[0]].item()
        assert kd(z_s, z_t).item() == pytest.approx(
            tckd.item() + (1 - p_t_target) * nckd.item(), rel=1e-9
        )


@pytest.mark.parametrize(
    ("alpha", "beta", "t"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.0)]
)
def test_dkd_matches_numpy_reference(alpha, beta, t):
    z_s, z_t = randn(8, 10, seed=29, scale=3), randn(8, 10, seed=30, scale=3)
    target = randint(10, 8, seed=31)
    ref_tckd, ref_nckd = np_dkd_parts(z_s.numpy(), z_t.numpy(), target.numpy(), t)
    dkd = L.DKD(alpha=alpha, beta=beta, temperature=t)
    tckd, nckd = dkd.tckd_nckd(z_s, z_t, target)
    assert tckd.item() == pytest.approx(ref_tckd, rel=1e-9)
    assert nckd.item() == pytest.approx(ref_nckd, rel=1e-9)
    expected = alpha * ref_tckd + beta * ref_nckd
    assert dkd(z_s, z_t, target).item() == pytest.approx(expected, rel=1e-9)


def test_dkd_nckd_minus_1000_trick_equals_target_column_deleted():
    # The paper's code masks the target with `z/T − 1000·onehot` and softmaxes over all K classes;
    # on moderate logits that equals deleting the target column and softmaxing over K − 1 classes.
    t = 4.0
    z_s, z_t = randn(6, 7, seed=32, scale=3), randn(6, 7, seed=33, scale=3)
    target = randint(7, 6, seed=34)
    mask = F.one_hot(target, 7).double()
    log_q_s = F.log_softmax(z_s / t - 1000.0 * mask, dim=1)
    log_q_t = F.log_softmax(z_t / t - 1000.0 * mask, dim=1)
    trick = t * t * (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean().item()
    _, ref_nckd = np_dkd_parts(z_s.numpy(), z_t.numpy(), target.numpy(), t)
    assert trick == pytest.approx(ref_nckd, rel=1e-9)  # the two references agree
    _, nckd = L.DKD(temperature=t).tckd_nckd(z_s, z_t, target)
    assert nckd.item() == pytest.approx(ref_nckd, rel=1e-9)


def test_dkd_tckd_from_binary_masses():
    t = 2.0
    z_s, z_t = randn(5, 4, seed=35, scale=2), randn(5, 4, seed=36, scale=2)
    target = randint(4, 5, seed=37)
    p_s_y = torch.softmax(z_s / t, 1).gather(1, target[:, None])
    p_t_y = torch.softmax(z_t / t, 1).gather(1, target[:, None])
    b_s = torch.cat([p_s_y, 1 - p_s_y], dim=1)
    b_t = torch.cat([p_t_y, 1 - p_t_y], dim=1)
    expected = t * t * (b_t * (b_t.log() - b_s.log())).sum(1).mean().item()
    tckd, _ = L.DKD(temperature=t).tckd_nckd(z_s, z_t, target)
    assert tckd.item() == pytest.approx(expected, rel=1e-9)


def test_dkd_nckd_ignores_the_target_logits():
    # NCKD depends only on the non-target logits: changing the target logit (even hugely) of the
    # student or the teacher must not change it.
    t = 1.0
    z_s, z_t = randn(4, 5, seed=38, scale=2), randn(4, 5, seed=39, scale=2)
    target = torch.tensor([0, 1, 2, 4])
    rows = torch.arange(4)
    _, ref = L.DKD(temperature=t).tckd_nckd(z_s, z_t, target)
    for shift_s, shift_t in [(7.0, -3.0), (2e3, 0.0), (0.0, 2e3), (-2e3, 2e3)]:
        s, tt = z_s.clone(), z_t.clone()
        s[rows, target] += shift_s
        tt[rows, target] += shift_t
        _, nckd = L.DKD(temperature=t).tckd_nckd(s, tt, target)
        assert nckd.item() == pytest.approx(ref.item(), rel=1e-9), (shift_s, shift_t)


def test_dkd_weights_are_linear_in_the_parts():
    z_s, z_t = randn(4, 6, seed=40, scale=2), randn(4, 6, seed=41, scale=2)
    target = randint(6, 4, seed=42)
    tckd, nckd = L.DKD(temperature=2.0).tckd_nckd(z_s, z_t, target)
    only_t = L.DKD(alpha=1.0, beta=0.0, temperature=2.0)(z_s, z_t, target)
    only_n = L.DKD(alpha=0.0, beta=1.0, temperature=2.0)(z_s, z_t, target)
    both = L.DKD(alpha=3.0, beta=5.0, temperature=2.0)(z_s, z_t, target)
    assert only_t.item() == pytest.approx(tckd.item(), rel=1e-12)
    assert only_n.item() == pytest.approx(nckd.item(), rel=1e-12)
    assert both.item() == pytest.approx(3 * tckd.item() + 5 * nckd.item(), rel=1e-9)


def test_dkd_identical_logits_give_zero():
    z = randn(6, 9, seed=43, scale=5).float()
    target = randint(9, 6, seed=44)
    assert abs(L.DKD()(z, z.clone(), target).item()) < 1e-6


def test_dkd_gradcheck_student():
    z_s = randn(3, 5, seed=45).requires_grad_()
    z_t = randn(3, 5, seed=46)
    target = torch.tensor([0, 3, 4])
    dkd = L.DKD(alpha=1.0, beta=2.0, temperature=2.0)
    assert torch.autograd.gradcheck(lambda s: dkd(s, z_t, target), (z_s,))


def huge_dkd_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # One row, K = 3, target 0, T = 1:
    #   student [1e4, −1e4, 0]: p_s[0] = 1 to float precision, log(1 − p_s[0]) ≈ −1e4
    #   teacher [−1e4, 1e4, 0]: b_t ≈ [0, 1]
    #   TCKD = 1·(log 1 − log b_s[1]) ≈ 1e4
    #   NCKD: non-target logits student [−1e4, 0], teacher [1e4, 0] → p̂_t ≈ [1, 0],
    #         log p̂_s[0] ≈ −1e4 → NCKD ≈ 1e4
    z_s = torch.tensor([[1e4, -1e4, 0.0]], dtype=dtype, requires_grad=True)
    z_t = torch.tensor([[-1e4, 1e4, 0.0]], dtype=dtype)
    return z_s, z_t, torch.tensor([0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dkd_huge_logits_finite_value_and_gradient(dtype):
    z_s, z_t, target = huge_dkd_inputs(dtype)
    out = L.DKD(temperature=1.0)(z_s, z_t, target)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(z_s.grad).all()


def test_dkd_huge_logits_value():
    # See huge_dkd_inputs: TCKD ≈ NCKD ≈ 1e4, so α·TCKD + β·NCKD = 1e4 + 8e4 = 9e4.
    z_s, z_t, target = huge_dkd_inputs(torch.float64)
    tckd, nckd = L.DKD(temperature=1.0).tckd_nckd(z_s, z_t, target)
    assert tckd.item() == pytest.approx(1e4, rel=1e-6)
    assert nckd.item() == pytest.approx(1e4, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# DIST
# ---------------------------------------------------------------------------------------------


def test_dist_hand_worked_two_classes():
    # K = 2, so p = [q, 1 − q] and everything follows from q:
    #   row ρ(p_s[n], p_t[n]) = sign((q_s − 1/2)(q_t − 1/2))   (two centred points ±(q − 1/2))
    #   column 1 is 1 − column 0, so both columns have ρ(q_s, q_t) over the batch.
    # q_s = [0.8, 0.6, 0.1], q_t = [0.9, 0.2, 0.4]
    #   rows: (+,+) → 1, (+,−) → −1, (−,−) → 1; mean 1/3 → inter = 1 − 1/3 = 2/3
    #   columns: q_s − 0.5 = [0.3, 0.1, −0.4], q_t − 0.5 = [0.4, −0.3, −0.1]
    #     ρ = (0.12 − 0.03 + 0.04) / (√0.26 · √0.26) = 0.13 / 0.26 = 1/2 → intra = 1/2
    # β = 2, γ = 3, T = 2: 4 · (2·2/3 + 3·1/2) = 4 · 17/6 = 34/3
    t = 2.0
    q_s = torch.tensor([0.8, 0.6, 0.1], dtype=torch.float64)
    q_t = torch.tensor([0.9, 0.2, 0.4], dtype=torch.float64)
    z_s = t * torch.stack([q_s.log(), (1 - q_s).log()], dim=1)
    z_t = t * torch.stack([q_t.log(), (1 - q_t).log()], dim=1)
    got = L.DIST(beta=2.0, gamma=3.0, temperature=t)(z_s, z_t)
    assert got.item() == pytest.approx(34 / 3, rel=1e-6)
    # The inter- and intra-class parts separately, through β and γ:
    inter = L.DIST(beta=1.0, gamma=0.0, temperature=1.0)(z_s / t, z_t / t)
    intra = L.DIST(beta=0.0, gamma=1.0, temperature=1.0)(z_s / t, z_t / t)
    assert inter.item() == pytest.approx(2 / 3, rel=1e-6)
    assert intra.item() == pytest.approx(1 / 2, rel=1e-6)


@pytest.mark.parametrize(
    ("beta", "gamma", "t"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (0.0, 1.0, 2.0), (1.0, 0.0, 1.0)]
)
def test_dist_matches_numpy_corrcoef(beta, gamma, t):
    z_s, z_t = randn(6, 5, seed=47, scale=3 * t), randn(6, 5, seed=48, scale=3 * t)
    expected = np_dist(z_s.numpy(), z_t.numpy(), beta, gamma, t)
    got = L.DIST(beta=beta, gamma=gamma, temperature=t)(z_s, z_t).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_dist_matches_numpy_corrcoef_with_many_classes():
    # Many classes and a small batch, as in CIFAR-100 training: some class columns hold only tiny
    # probabilities, so their centred norms are small. ρ is still a plain Pearson correlation
    # (scale-free), so nothing like an additive eps in its denominator may bias it.
    z_t = randn(8, 100, seed=63, scale=5)
    z_s = z_t + randn(8, 100, seed=64, scale=0.5)
    expected = np_dist(z_s.numpy(), z_t.numpy(), 1.0, 1.0, 1.0)
    assert L.DIST()(z_s, z_t).item() == pytest.approx(expected, rel=1e-5)
    assert abs(L.DIST()(z_t, z_t.clone()).item()) < 1e-6


def test_dist_defaults_are_1_1_1():
    z_s, z_t = randn(6, 5, seed=49, scale=2), randn(6, 5, seed=50, scale=2)
    expected = np_dist(z_s.numpy(), z_t.numpy(), 1.0, 1.0, 1.0)
    assert L.DIST()(z_s, z_t).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_dist_invariant_to_per_row_constant():
    # DIST works on softmax probabilities, which do not change when a row gets a constant added.
    z_s, z_t = randn(5, 7, seed=51, scale=2), randn(5, 7, seed=52, scale=2)
    c_s, c_t = randn(5, 1, seed=53, scale=50), randn(5, 1, seed=54, scale=50)
    dist = L.DIST(beta=1.0, gamma=2.0, temperature=2.0)
    assert dist(z_s + c_s, z_t + c_t).item() == pytest.approx(dist(z_s, z_t).item(), rel=1e-9)


def test_dist_identical_logits_give_zero():
    z = randn(6, 9, seed=55, scale=3).float()
    assert abs(L.DIST()(z, z.clone()).item()) < 1e-6


def test_dist_gradcheck_student():
    z_s = randn(4, 5, seed=56, scale=2).requires_grad_()
    z_t = randn(4, 5, seed=57, scale=2)
    dist = L.DIST(beta=1.0, gamma=2.0, temperature=2.0)
    assert torch.autograd.gradcheck(lambda s: dist(s, z_t), (z_s,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dist_huge_logits_finite_value_and_gradient(dtype):
    # T = 1; every row saturates to a one-hot:
    #   p_s rows e0, e1, e2;  p_t rows e1, e0, e2.
    #   ρ(e_i, e_j) for i ≠ j in 3-D: centred (2,−1,−1)/3 · (−1,2,−1)/3 = −3/9, norms² 6/9 → −1/2
    #   rows: −1/2, −1/2, 1 → mean 0 → inter = 1; columns: same pattern → intra = 1. Total 2.
    big = 1e4
    z_s = torch.tensor(
        [[big, -big, 0.0], [-big, big, 0.0], [0.0, -big, big]], dtype=dtype, requires_grad=True
    )
    z_t = torch.tensor([[-big, big, 0.0], [big, -big, 0.0], [0.0, -big, big]], dtype=dtype)
    out = L.DIST()(z_s, z_t)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(2.0, rel=1e-5)
    out.backward()
    assert torch.isfinite(z_s.grad).all()


# ---------------------------------------------------------------------------------------------
# LogitMSE
# ---------------------------------------------------------------------------------------------


def test_logit_mse_hand_worked():
    # differences [[1, 0], [0, 3]] → squares 1, 0, 0, 9 → mean over 4 elements = 10/4 = 2.5
    z_s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z_t = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    assert L.LogitMSE()(z_s, z_t).item() == pytest.approx(2.5, rel=1e-7)


def test_logit_mse_matches_numpy():
    z_s, z_t = randn(7, 11, seed=58, scale=3), randn(7, 11, seed=59, scale=3)
    expected = float(np.mean((z_s.numpy() - z_t.numpy()) ** 2))
    assert L.LogitMSE()(z_s, z_t).item() == pytest.approx(expected, rel=1e-12)


def test_logit_mse_identical_logits_give_zero():
    z = randn(6, 9, seed=60, scale=5).float()
    assert L.LogitMSE()(z, z.clone()).item() == 0.0


def test_logit_mse_gradcheck_and_gradient():
    z_s = randn(3, 4, seed=61).requires_grad_()
    z_t = randn(3, 4, seed=62)
    mse = L.LogitMSE()
    assert torch.autograd.gradcheck(lambda s: mse(s, z_t), (z_s,))
    mse(z_s, z_t).backward()
    # d/dz_s mean((z_s − z_t)²) = 2 (z_s − z_t) / (N·K)
    torch.testing.assert_close(z_s.grad, 2 * (z_s.detach() - z_t) / 12, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_mse_huge_logits_finite(dtype):
    # (1e4 − (−1e4))² = 4e8 for 2 of 4 elements, 0 for the others → mean 2e8
    z_s = torch.tensor([[1e4, 0.0], [-1e4, 5.0]], dtype=dtype, requires_grad=True)
    z_t = torch.tensor([[-1e4, 0.0], [1e4, 5.0]], dtype=dtype)
    out = L.LogitMSE()(z_s, z_t)
    assert out.item() == pytest.approx(2e8, rel=1e-6)
    out.backward()
    assert torch.isfinite(z_s.grad).all()


# ---------------------------------------------------------------------------------------------
# Property test: finite and non-negative on random finite logits.
# ---------------------------------------------------------------------------------------------


@st.composite
def logit_pairs(draw, min_classes: int = 2):
    n = draw(st.integers(1, 4))
    k = draw(st.integers(min_classes, 6))
    elements = st.floats(-50, 50, allow_nan=False, allow_infinity=False)
    z_s = draw(hnp.arrays(np.float64, (n, k), elements=elements))
    z_t = draw(hnp.arrays(np.float64, (n, k), elements=elements))
    target = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    t = draw(st.sampled_from([0.5, 1.0, 4.0]))
    return torch.from_numpy(z_s), torch.from_numpy(z_t), torch.from_numpy(target), t


@settings(max_examples=50, deadline=None)
@given(logit_pairs(min_classes=3))
def test_property_logit_losses_finite_non_negative_with_finite_gradients(data):
    z_s, z_t, target, t = data
    calls = {
        "kd": lambda s: L.KD(temperature=t)(s, z_t),
        "dkd": lambda s: L.DKD(temperature=t)(s, z_t, target),
        "dist": lambda s: L.DIST(temperature=t)(s, z_t),
        "logit_mse": lambda s: L.LogitMSE()(s, z_t),
    }
    for name, call in calls.items():
        s = z_s.clone().requires_grad_()
        value = call(s)
        assert torch.isfinite(value), (name, value)
        assert value.item() >= -1e-6, (name, value)
        value.backward()
        assert torch.isfinite(s.grad).all(), (name, s.grad)


@settings(max_examples=50, deadline=None)
@given(logit_pairs(min_classes=2))
def test_property_kd_matches_numpy_reference(data):
    z_s, z_t, _, t = data
    expected = np_kd(z_s.numpy(), z_t.numpy(), t)
    assert L.KD(temperature=t)(z_s, z_t).item() == pytest.approx(expected, rel=1e-7, abs=1e-9)
