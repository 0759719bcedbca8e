"""Reference tests for the feature losses (AT, FeatureCosine, FeatureL1) and the relation losses
(SP, RKD, PKT, CC, CRD).

Every expected number comes from a hand-worked case, from a float64 reference written here with
explicit loops over samples / pairs / triplets (numpy, not the vectorised code under test), or from
float64 gradcheck. The specification is the loss table in DESIGN.md and each class's docstring.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from kdistill import losses as L
from kdistill.distill.distiller import Distiller, Term


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ---------------------------------------------------------------------------------------------
# Independent float64 references: loops over samples, pairs and triplets.
# ---------------------------------------------------------------------------------------------


def np_attention(f: np.ndarray, p: float) -> np.ndarray:
    """Per sample: mean over channels of |f|^p, flattened, divided by its L2 norm."""
    return np.stack([unit(np.mean(np.abs(f[n]) ** p, axis=0).reshape(-1)) for n in range(len(f))])


def np_at(f_s: np.ndarray, f_t: np.ndarray, p: float) -> float:
    return float(np.mean((np_attention(f_s, p) - np_attention(f_t, p)) ** 2))


def np_sp(f_s: np.ndarray, f_t: np.ndarray) -> float:
    n = len(f_s)

    def rows(f):
        f = f.reshape(n, -1)
        gram = np.array([[np.dot(f[i], f[j]) for j in range(n)] for i in range(n)])
        return np.stack([unit(gram[i]) for i in range(n)])

    return float(np.sum((rows(f_s) - rows(f_t)) ** 2) / (n * n))


def np_rkd_terms(e_s: np.ndarray, e_t: np.ndarray) -> tuple[float, float]:
    """(distance term, angle term), each already averaged, before the weights."""
    n = len(e_s)
    e_s, e_t = e_s.reshape(n, -1), e_t.reshape(n, -1)

    def psi_d(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[d > 0].mean()

    def psi_a(e):
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[i] - e[j], e[k] - e[j]
                    if np.linalg.norm(u) > 0 and np.linalg.norm(v) > 0:
                        out[i, j, k] = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
        return out

    d_s, d_t = psi_d(e_s), psi_d(e_t)
    a_s, a_t = psi_a(e_s), psi_a(e_t)
    distance = np.mean([smooth_l1(x) for x in (d_s - d_t).ravel()])
    angle = np.mean([smooth_l1(x) for x in (a_s - a_t).ravel()])
    return float(distance), float(angle)


def np_pkt(f_s: np.ndarray, f_t: np.ndarray, eps: float = 1e-7) -> float:
    n = len(f_s)

    def q(f):
        f = f.reshape(n, -1)
        k = np.array(
            [[(1 + np.dot(unit(f[i]), unit(f[j]))) / 2 for j in range(n)] for i in range(n)]
        )
        return np.stack([k[i] / k[i].sum() for i in range(n)])

    q_s, q_t = q(f_s), q(f_t)
    total = sum(
        q_t[i, j] * math.log((q_t[i, j] + eps) / (q_s[i, j] + eps))
        for i in range(n)
        for j in range(n)
    )
    return total / (n * n)


def np_cc(e_s: np.ndarray, e_t: np.ndarray, gamma: float, order: int) -> float:
    n = len(e_s)

    def kernel(e):
        e = e.reshape(n, -1)
        out = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                c = np.dot(unit(e[i]), unit(e[j]))
                taylor = sum((2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1))
                out[i, j] = math.exp(-2 * gamma) * taylor
        return out

    return float(np.sum((kernel(e_s) - kernel(e_t)) ** 2) / (n * n))


def np_gaussian_cc(e_s: np.ndarray, e_t: np.ndarray, gamma: float) -> float:
    """The same loss with the exact kernel exp(−γ‖ê_i − ê_j‖²) the Taylor series approximates."""
    n = len(e_s)

    def kernel(e):
        u = [unit(row) for row in e.reshape(n, -1)]
        return np.array(
            [[math.exp(-gamma * np.sum((u[i] - u[j]) ** 2)) for j in range(n)] for i in range(n)]
        )

    return float(np.sum((kernel(e_s) - kernel(e_t)) ** 2) / (n * n))


# ---------------------------------------------------------------------------------------------
# Common contract: registry, `needs`, connector flag, scalar output, batch-size errors.
# ---------------------------------------------------------------------------------------------

NAMES = {
    "at": L.AT,
    "cosine": L.FeatureCosine,
    "l1": L.FeatureL1,
    "sp": L.SP,
    "rkd": L.RKD,
    "pkt": L.PKT,
    "cc": L.CC,
    "crd": L.CRD,
}


@pytest.mark.parametrize(("name", "cls"), sorted(NAMES.items()))
def test_registered_by_name(name, cls):
    params = {"num_samples": 8} if name == "crd" else {}
    assert isinstance(L.create_loss(name, **params), cls)
    assert cls.name == name


@pytest.mark.parametrize(
    ("cls", "uses_connector"),
    [
        (L.AT, False),
        (L.FeatureCosine, True),
        (L.FeatureL1, True),
        (L.SP, False),
        (L.RKD, False),
        (L.PKT, False),
        (L.CC, False),
        (L.CRD, False),
    ],
)
def test_needs_and_connector_flags(cls, uses_connector):
    expected = ("student", "teacher", "index") if cls is L.CRD else ("student", "teacher")
    assert tuple(cls.needs) == expected
    assert cls.uses_connector is uses_connector


def test_crd_needs_num_samples():
    with pytest.raises(TypeError):
        L.CRD()  # the dataset size cannot be guessed


BATCH_MISMATCH = [
    ("at", lambda: L.AT(), (4, 2, 3, 3), (5, 2, 3, 3)),
    ("sp", lambda: L.SP(), (4, 3), (5, 3)),
    ("rkd", lambda: L.RKD(), (4, 3), (5, 6)),
    ("pkt", lambda: L.PKT(), (4, 3), (5, 3)),
    ("cc", lambda: L.CC(), (4, 3, 2, 2), (5, 3)),
    ("crd", lambda: L.CRD(3, 3, feature_dim=4, num_samples=8, num_negatives=2), (4, 3), (5, 3)),
]


@pytest.mark.parametrize(("make", "s_shape", "t_shape"), [c[1:] for c in BATCH_MISMATCH])
def test_batch_size_mismatch_names_both_shapes(make, s_shape, t_shape):
    loss = make()
    args = [torch.zeros(s_shape), torch.zeros(t_shape)]
    if "index" in loss.needs:
        args.append(torch.arange(s_shape[0]))
    with pytest.raises(ValueError) as excinfo:
        loss(*args)
    message = str(excinfo.value)
    assert str(s_shape) in message
    assert str(t_shape) in message


@pytest.mark.parametrize("cls", [L.FeatureCosine, L.FeatureL1])
def test_connector_losses_shape_mismatch_names_both_shapes(cls):
    with pytest.raises(ValueError) as excinfo:
        cls()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))
    assert "(2, 3, 4, 4)" in str(excinfo.value)
    assert "(2, 5, 4, 4)" in str(excinfo.value)


@pytest.mark.parametrize("cls", [L.SP, L.RKD, L.PKT, L.CC])
def test_relation_losses_reject_1d_inputs(cls):
    with pytest.raises(ValueError, match=r"\(4,\)"):
        cls()(torch.zeros(4), torch.zeros(4))


@pytest.mark.parametrize(
    ("make", "param", "value"),
    [
        (lambda v: L.AT(p=v), "p", 0.5),
        (lambda v: L.RKD(distance_weight=v), "distance_weight", -1.0),
        (lambda v: L.RKD(angle_weight=v), "angle_weight", -1.0),
        (lambda v: L.CC(gamma=v), "gamma", -0.5),
        (lambda v: L.CC(order=v), "order", 0),
        (lambda v: L.CRD(num_samples=v), "num_samples", 0),
        (lambda v: L.CRD(num_samples=8, num_negatives=v), "num_negatives", 0),
        (lambda v: L.CRD(num_samples=8, feature_dim=v), "feature_dim", 0),
        (lambda v: L.CRD(num_samples=8, nce_temperature=v), "nce_temperature", 0.0),
        (lambda v: L.CRD(num_samples=8, momentum=v), "momentum", 1.0),
    ],
)
def test_bad_hyperparameter_raises_naming_it_and_its_value(make, param, value):
    with pytest.raises(ValueError) as excinfo:
        make(value)
    assert param in str(excinfo.value)
    assert str(value) in str(excinfo.value)


def test_zero_weight_is_allowed():
    z_s, z_t = randn(4, 3, seed=0), randn(4, 3, seed=1)
    assert L.RKD(distance_weight=0.0, angle_weight=0.0)(z_s, z_t).item() == 0.0


# ---------------------------------------------------------------------------------------------
# AT
# ---------------------------------------------------------------------------------------------


def test_at_hand_worked():
    # Student, 2 channels over a 1×2 map: channel 1 [1, 0], channel 2 [1, 2].
    #   mean_c f² = [(1+1)/2, (0+4)/2] = [1, 2] → a_s = [1, 2]/√5.
    # Teacher, 1 channel [2, −2]: f² = [4, 4] → a_t = [1, 1]/√2 (sign does not matter).
    # mean over the 2 elements of (a_s − a_t)².
    a_s = np.array([1.0, 2.0]) / math.sqrt(5)
    a_t = np.array([1.0, 1.0]) / math.sqrt(2)
    expected = float(np.mean((a_s - a_t) ** 2))
    f_s = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])
    f_t = torch.tensor([[[[2.0, -2.0]]]])
    assert L.AT()(f_s, f_t).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0513167, rel=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_at_matches_loop_reference(p):
    f_s, f_t = randn(3, 4, 5, 6, seed=2), randn(3, 7, 5, 6, seed=3)
    expected = np_at(f_s.numpy(), f_t.numpy(), p)
    assert L.AT(p=p)(f_s, f_t).item() == pytest.approx(expected, rel=1e-10)


def test_at_default_p_is_2():
    f_s, f_t = randn(2, 3, 4, 4, seed=4), randn(2, 3, 4, 4, seed=5)
    assert L.AT()(f_s, f_t).item() == pytest.approx(np_at(f_s.numpy(), f_t.numpy(), 2), rel=1e-10)


@pytest.mark.parametrize("student_larger", [True, False])
def test_at_pools_the_larger_map_to_the_smaller(student_larger):
    # 4×4 against 2×2: adaptive average pooling is the mean of each 2×2 block of the
    # (unnormalised) attention map, then both maps are normalised.
    big, small = randn(2, 3, 4, 4, seed=6), randn(2, 5, 2, 2, seed=7)
    p = 2.0
    big_map = np.mean(np.abs(big.numpy()) ** p, axis=1)  # N×4×4
    pooled = big_map.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4))  # N×2×2 block means
    a_big = np.stack([unit(m.reshape(-1)) for m in pooled])
    a_small = np_attention(small.numpy(), p)
    expected = float(np.mean((a_big - a_small) ** 2))
    got = L.AT(p=p)(big, small) if student_larger else L.AT(p=p)(small, big)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_at_independent_of_channel_count():
    # duplicating every channel leaves the mean over channels, hence the attention map, unchanged
    f_s, f_t = randn(2, 3, 4, 4, seed=8), randn(2, 6, 4, 4, seed=9)
    at = L.AT(p=3.0)
    doubled = torch.cat([f_s, f_s], dim=1)
    assert at(doubled, f_t).item() == pytest.approx(at(f_s, f_t).item(), rel=1e-12)
    assert at(f_s, torch.cat([f_t, f_t, f_t], dim=1)).item() == pytest.approx(
        at(f_s, f_t).item(), rel=1e-12
    )


def test_at_uses_absolute_value_and_ignores_scale():
    f = randn(2, 3, 4, 4, seed=10)
    assert L.AT(p=3.0)(-f, f).item() == pytest.approx(0.0, abs=1e-15)  # |f|^p, not f^p
    other = randn(2, 3, 4, 4, seed=11)
    assert L.AT(p=2.0)(7.0 * f, other).item() == pytest.approx(L.AT()(f, other).item(), rel=1e-12)


def test_at_identical_features_give_zero():
    f = randn(3, 4, 5, 5, seed=12).float()
    assert L.AT()(f, f.clone()).item() == 0.0


def test_at_needs_4d_maps():
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        L.AT()(torch.zeros(4, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_at_gradcheck(p):
    f_s = randn(2, 3, 3, 3, seed=13).requires_grad_()
    f_t = randn(2, 2, 3, 3, seed=14)
    assert torch.autograd.gradcheck(lambda s: L.AT(p=p)(s, f_t), (f_s,))


# ---------------------------------------------------------------------------------------------
# FeatureCosine and FeatureL1
# ---------------------------------------------------------------------------------------------


def test_cosine_hand_worked():
    # row 1: same direction → cos 1; row 2: [1, 1]·[−1, 1] = 0 → cos 0.  1 − (1 + 0)/2 = 0.5
    s = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[5.0, 0.0], [-1.0, 1.0]])
    assert L.FeatureCosine()(s, t).item() == pytest.approx(0.5, rel=1e-7)


def test_cosine_matches_loop_reference_on_maps():
    s, t = randn(3, 2, 4, 4, seed=15), randn(3, 2, 4, 4, seed=16)
    a, b = s.numpy().reshape(3, -1), t.numpy().reshape(3, -1)
    expected = 1 - np.mean([np.dot(unit(a[n]), unit(b[n])) for n in range(3)])
    assert L.FeatureCosine()(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_cosine_ignores_per_sample_scale_and_is_zero_for_equal_features():
    s, t = randn(3, 8, seed=17), randn(3, 8, seed=18)
    scales = torch.tensor([[0.1], [3.0], [50.0]], dtype=torch.float64)
    cosine = L.FeatureCosine()
    assert cosine(s * scales, t).item() == pytest.approx(cosine(s, t).item(), rel=1e-12)
    assert abs(cosine(s.float(), s.float().clone()).item()) < 1e-6


def test_l1_hand_worked():
    # |differences| = [[1, 0], [0, 3]] → mean over 4 elements = 1
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 7.0]])
    assert L.FeatureL1()(s, t).item() == pytest.approx(1.0, rel=1e-7)


def test_l1_matches_numpy_and_is_zero_for_equal_features():
    s, t = randn(2, 3, 4, 4, seed=19), randn(2, 3, 4, 4, seed=20)
    expected = float(np.mean(np.abs(s.numpy() - t.numpy())))
    assert L.FeatureL1()(s, t).item() == pytest.approx(expected, rel=1e-12)
    assert L.FeatureL1()(s, s.clone()).item() == 0.0


@pytest.mark.parametrize("cls", [L.FeatureCosine, L.FeatureL1])
def test_cosine_l1_gradcheck(cls):
    s = randn(3, 2, 2, 2, seed=21).requires_grad_()
    t = randn(3, 2, 2, 2, seed=22)
    assert torch.autograd.gradcheck(lambda x: cls()(x, t), (s,))


# ---------------------------------------------------------------------------------------------
# SP
# ---------------------------------------------------------------------------------------------


def test_sp_hand_worked():
    # Student rows e1, e2: G_s = I (rows already unit).
    # Teacher rows e1, e1: G_t = all ones → rows [1, 1]/√2.
    # ‖G_s − G_t‖²_F = 2·((1 − 1/√2)² + (1/√2)²) = 2·(2 − √2); / N² = 4 → (2 − √2)/2 = 0.292893
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert L.SP()(s, t).item() == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-6)


def test_sp_matches_loop_reference_across_feature_sizes():
    s, t = randn(5, 3, 2, 2, seed=23), randn(5, 7, seed=24)
    assert L.SP()(s, t).item() == pytest.approx(np_sp(s.numpy(), t.numpy()), rel=1e-10)


def test_sp_unchanged_when_features_are_scaled():
    s, t = randn(5, 6, seed=25), randn(5, 4, seed=26)
    sp = L.SP()
    assert sp(7.5 * s, 0.1 * t).item() == pytest.approx(sp(s, t).item(), rel=1e-10)


def test_sp_identical_features_give_zero():
    f = randn(6, 10, seed=27).float()
    assert abs(L.SP()(f, f.clone()).item()) < 1e-7


def test_sp_gradcheck():
    s = randn(4, 3, seed=28).requires_grad_()
    t = randn(4, 5, seed=29)
    assert torch.autograd.gradcheck(lambda x: L.SP()(x, t), (s,))


# ---------------------------------------------------------------------------------------------
# RKD
# ---------------------------------------------------------------------------------------------


def test_rkd_hand_worked_collinear_points():
    # 1-D embeddings. Student 0, 1, 2: distances 1, 2, 1 (each pair twice), mean of the non-zero
    # ones 8/6 = 4/3 → ψ_s = [[0, .75, 1.5], [.75, 0, .75], [1.5, .75, 0]].
    # Teacher 0, 1, 3: distances 1, 3, 2 → mean 2 → ψ_t = [[0, .5, 1.5], [.5, 0, 1], [1.5, 1, 0]].
    # Differences ±0.25 at four entries → smooth-L1 ½·0.25² = 1/32 each → 4/32 / 9 = 1/72.
    # Both sides are collinear with the same order, so every angle agrees: angle term 0.
    s = torch.tensor([[0.0], [1.0], [2.0]])
    t = torch.tensor([[0.0], [1.0], [3.0]])
    got = L.RKD(distance_weight=25.0, angle_weight=50.0)(s, t)
    assert got.item() == pytest.approx(25.0 / 72, rel=1e-6)


def test_rkd_hand_worked_angle():
    # Student: a right angle at e_0 = 0 (e_1 = (1,0), e_2 = (0,1)); teacher: the same three points
    # on a line. Only the angle term (distance_weight 0).
    # Student cosines ψ(i, j, k) = ⟨ê_ij, ê_kj⟩ over the 27 ordered triplets: for each vertex j
    # the entries i = k ≠ j are 1 (2 per vertex). Off-diagonal (i ≠ k, both ≠ j):
    #   vertex 0: ê_10 = (1,0), ê_20 = (0,1) → 0;  vertex 1: ê_01 = (−1,0), ê_21 = (−1,1)/√2 → 1/√2
    #   vertex 2: ê_02 = (0,−1), ê_12 = (1,−1)/√2 → 1/√2.  (each appears twice: (i,k) and (k,i))
    # Teacher points 0, 1, 2 on a line: vertex 0 → cos 1; vertex 1 → −1; vertex 2 → 1.
    # Differences: vertex 0: 1 (×2), vertex 1: 1/√2 + 1 (×2), vertex 2: 1 − 1/√2 (×2).
    d0, d1, d2 = 1.0, 1 / math.sqrt(2) + 1, 1 - 1 / math.sqrt(2)
    expected = 2 * (smooth_l1(d0) + smooth_l1(d1) + smooth_l1(d2)) / 27
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0], [1.0], [2.0]])
    got = L.RKD(distance_weight=0.0, angle_weight=1.0)(s, t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("wd", "wa"), [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0), (3.0, 2.0)])
def test_rkd_matches_loop_reference(wd, wa):
    e_s, e_t = randn(5, 4, seed=30), randn(5, 2, 3, seed=31, scale=3)
    distance, angle = np_rkd_terms(e_s.numpy(), e_t.numpy())
    got = L.RKD(distance_weight=wd, angle_weight=wa)(e_s, e_t).item()
    assert got == pytest.approx(wd * distance + wa * angle, rel=1e-10)


def test_rkd_defaults_are_25_and_50():
    e_s, e_t = randn(4, 3, seed=32), randn(4, 3, seed=33)
    distance, angle = np_rkd_terms(e_s.numpy(), e_t.numpy())
    assert L.RKD()(e_s, e_t).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-10)


@pytest.mark.parametrize("angle_weight", [0.0, 50.0])
def test_rkd_unchanged_when_features_are_scaled_or_shifted(angle_weight):
    e_s, e_t = randn(6, 5, seed=34), randn(6, 3, seed=35)
    rkd = L.RKD(distance_weight=25.0, angle_weight=angle_weight)
    base = rkd(e_s, e_t).item()
    assert rkd(4.0 * e_s, e_t).item() == pytest.approx(base, rel=1e-10)
    assert rkd(e_s, 0.01 * e_t).item() == pytest.approx(base, rel=1e-10)
    assert rkd(e_s + 3.0, e_t).item() == pytest.approx(base, rel=1e-10)


def test_rkd_identical_embeddings_give_zero():
    e = randn(6, 5, seed=36).float()
    assert abs(L.RKD()(e, e.clone()).item()) < 1e-6


def test_rkd_gradcheck():
    e_s = randn(4, 3, seed=37).requires_grad_()
    e_t = randn(4, 2, seed=38)
    assert torch.autograd.gradcheck(lambda x: L.RKD()(x, e_t), (e_s,))


def test_rkd_duplicate_samples_keep_a_finite_gradient():
    # two identical student rows: a zero distance and zero difference vectors (no defined angle)
    e_s = randn(4, 3, seed=39)
    e_s[1] = e_s[0]
    e_s.requires_grad_()
    L.RKD()(e_s, randn(4, 3, seed=40)).backward()
    assert torch.isfinite(e_s.grad).all()
    all_zero = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    value = L.RKD()(all_zero, randn(4, 3, seed=41))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(all_zero.grad).all()


# ---------------------------------------------------------------------------------------------
# PKT
# ---------------------------------------------------------------------------------------------


def test_pkt_hand_worked():
    # Student e1, e2: cosines I → (1 + I)/2 = [[1, .5], [.5, 1]] → rows/1.5: [[2/3, 1/3], ...].
    # Teacher e1, e1: cosines all 1 → all 1 → rows [½, ½].
    # Each row: ½·log((½+ε)/(2/3+ε)) + ½·log((½+ε)/(1/3+ε)); two such rows; mean over 4 entries.
    eps = 1e-7
    row = 0.5 * math.log((0.5 + eps) / (2 / 3 + eps)) + 0.5 * math.log((0.5 + eps) / (1 / 3 + eps))
    expected = 2 * row / 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert L.PKT()(s, t).item() == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(0.5 * 0.5 * math.log(1.125), rel=1e-5)


def test_pkt_matches_loop_reference_across_feature_sizes():
    s, t = randn(6, 2, 3, 3, seed=42), randn(6, 5, seed=43)
    assert L.PKT()(s, t).item() == pytest.approx(np_pkt(s.numpy(), t.numpy()), rel=1e-10)


def test_pkt_unchanged_when_features_are_scaled_and_zero_for_equal_features():
    s, t = randn(5, 4, seed=44), randn(5, 4, seed=45)
    assert L.PKT()(9.0 * s, t).item() == pytest.approx(L.PKT()(s, t).item(), rel=1e-10)
    assert L.PKT()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-15)


def test_pkt_gradcheck():
    s = randn(4, 3, seed=46).requires_grad_()
    t = randn(4, 6, seed=47)
    assert torch.autograd.gradcheck(lambda x: L.PKT()(x, t), (s,))


# ---------------------------------------------------------------------------------------------
# CC
# ---------------------------------------------------------------------------------------------


def test_cc_hand_worked():
    # γ = 0.4, P = 2. Student e1, e2: c_12 = 0 → K_s[1,2] = e^{−0.8}·1 (only the p = 0 term).
    # Teacher e1, 2·e1: c_12 = 1 → K_t[1,2] = e^{−0.8}·(1 + 0.8 + 0.8²/2) = e^{−0.8}·2.12.
    # Diagonals agree (c = 1 on both sides). Two off-diagonal entries differ by e^{−0.8}·1.12:
    # loss = 2·(1.12·e^{−0.8})² / 4.
    expected = 2 * (1.12 * math.exp(-0.8)) ** 2 / 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert L.CC()(s, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("gamma", "order"), [(0.4, 2), (1.0, 1), (0.2, 4)])
def test_cc_matches_loop_reference(gamma, order):
    s, t = randn(5, 3, 2, 2, seed=48), randn(5, 6, seed=49)
    expected = np_cc(s.numpy(), t.numpy(), gamma, order)
    assert L.CC(gamma=gamma, order=order)(s, t).item() == pytest.approx(expected, rel=1e-10)


def test_cc_high_order_approaches_the_gaussian_kernel():
    # K is the Taylor series of exp(−γ‖ê_i − ê_j‖²); at order 25 the remainder is < 1e-20
    s, t = randn(5, 4, seed=50), randn(5, 7, seed=51)
    expected = np_gaussian_cc(s.numpy(), t.numpy(), 0.4)
    assert L.CC(gamma=0.4, order=25)(s, t).item() == pytest.approx(expected, rel=1e-9)


def test_cc_unchanged_when_features_are_scaled_and_zero_for_equal_features():
    s, t = randn(5, 4, seed=52), randn(5, 4, seed=53)
    assert L.CC()(0.3 * s, t).item() == pytest.approx(L.CC()(s, t).item(), rel=1e-10)
    assert L.CC()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-15)


def test_cc_gradcheck():
    s = randn(4, 3, seed=54).requires_grad_()
    t = randn(4, 5, seed=55)
    assert torch.autograd.gradcheck(lambda x: L.CC()(x, t), (s,))


# ---------------------------------------------------------------------------------------------
# CRD
# ---------------------------------------------------------------------------------------------


def np_crd_side(v, bank, candidates, tau, log_z, k, m):
    """−mean_n [log h(positive) + Σ log(1 − h(negatives))], h = e^l / (e^l + K/M), in loops."""
    total = 0.0
    for n in range(len(v)):
        for j, row in enumerate(candidates[n]):
            logit = np.dot(v[n], bank[row]) / tau - log_z
            h = math.exp(logit) / (math.exp(logit) + k / m)
            total -= math.log(h) if j == 0 else math.log(1 - h)
    return total / len(v)


def np_log_z(v, bank, candidates, tau, m):
    """log(M · mean over the N × (K+1) scores of exp(score / τ))."""
    scores = [np.dot(v[n], bank[row]) / tau for n in range(len(v)) for row in candidates[n]]
    return math.log(m * np.mean(np.exp(scores)))


def np_embed(head: nn.Linear, f: torch.Tensor) -> np.ndarray:
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    x = f.reshape(len(f), -1).numpy()
    return np.stack([unit(w @ x[n] + b) for n in range(len(x))])


def small_crd(**overrides) -> L.CRD:
    params = dict(
        student_dim=3, teacher_dim=5, feature_dim=4, num_samples=10, num_negatives=6, momentum=0.5
    )
    params.update(overrides)
    return L.CRD(**params)


def test_crd_hand_worked_single_sample_dataset():
    # M = 1: the positive and all K negatives are bank row 0, so on the first call every score
    # equals the mean and Z = M·mean(exp(score)) gives logit l = 0 for all of them.
    # h = 1/(1 + K/M) = 1/(1 + K); per side −log h − K·log(1 − h) = log(1 + K) + K·log((1 + K)/K).
    # K = 4, two sides: 2·(log 5 + 4·log 1.25) = 5.004024
    crd = L.CRD(3, 2, feature_dim=4, num_samples=1, num_negatives=4)
    got = crd(randn(1, 3, seed=56).float(), randn(1, 2, seed=57).float(), torch.tensor([0]))
    assert got.item() == pytest.approx(2 * (math.log(5) + 4 * math.log(1.25)), rel=1e-6)
    assert got.item() == pytest.approx(5.004024, rel=1e-6)


def test_crd_matches_loop_reference_over_two_calls():
    torch.manual_seed(0)
    crd = small_crd(nce_temperature=0.5).double()
    f_s, f_t = randn(4, 3, seed=58), randn(4, 5, seed=59)
    index = torch.tensor([1, 7, 3, 0])
    v_s, v_t = np_embed(crd.student_head, f_s), np_embed(crd.teacher_head, f_t)
    log_z = None
    for call in range(2):
        bank_s, bank_t = crd.memory_student.numpy().copy(), crd.memory_teacher.numpy().copy()
        with torch.random.fork_rng():
            torch.manual_seed(100 + call)
            got = crd(f_s, f_t, index).item()
            torch.manual_seed(100 + call)
            draw = torch.randint(0, 10, (4, 6))  # the draw the docstring specifies
        # row r of the draw goes to the sample with the r-th smallest dataset index
        rank = {value: r for r, value in enumerate(sorted(index.tolist()))}
        negatives = draw[[rank[value] for value in index.tolist()]]
        candidates = torch.cat([index.unsqueeze(1), negatives], dim=1).numpy()
        if log_z is None:  # Z is estimated on the first call only, then kept
            log_z = (
                np_log_z(v_s, bank_t, candidates, 0.5, 10),
                np_log_z(v_t, bank_s, candidates, 0.5, 10),
            )
        expected = np_crd_side(v_s, bank_t, candidates, 0.5, log_z[0], 6, 10) + np_crd_side(
            v_t, bank_s, candidates, 0.5, log_z[1], 6, 10
        )
        assert got == pytest.approx(expected, rel=1e-10), call
    np.testing.assert_allclose(crd.log_z.numpy(), np.array(log_z), rtol=1e-12)


def test_crd_banks_change_only_at_the_batch_indices():
    torch.manual_seed(1)
    crd = small_crd(momentum=0.25).double()
    f_s, f_t = randn(2, 3, seed=60), randn(2, 5, seed=61)
    index = torch.tensor([2, 5])
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    crd(f_s, f_t, index)
    v_s, v_t = np_embed(crd.student_head, f_s), np_embed(crd.teacher_head, f_t)
    others = [i for i in range(10) if i not in (2, 5)]
    for bank, before, v in (
        (crd.memory_student, before_s, v_s),
        (crd.memory_teacher, before_t, v_t),
    ):
        assert torch.equal(bank[others], before[others])
        for row, i in enumerate((2, 5)):
            expected = unit(0.25 * before[i].numpy() + 0.75 * v[row])
            np.testing.assert_allclose(bank[i].numpy(), expected, rtol=1e-12, atol=1e-14)
        # unit rows (the untouched ones were normalised in float32 before .double())
        np.testing.assert_allclose(bank.norm(dim=1).numpy(), np.ones(10), rtol=1e-6)


def test_crd_loss_and_banks_do_not_depend_on_the_order_of_the_batch():
    """Each sample's negatives follow its dataset index, not its position in the batch (so a
    batch split among DDP ranks gets the draws of one process): a permuted batch under the
    same seed gives the same loss and the same banks."""
    f_s, f_t = randn(5, 3, seed=70), randn(5, 5, seed=71)
    index = torch.tensor([8, 1, 6, 3, 0])
    results = []
    for order in (torch.arange(5), torch.tensor([3, 0, 4, 2, 1])):
        torch.manual_seed(4)
        crd = small_crd().double()
        torch.manual_seed(9)
        loss = crd(f_s[order], f_t[order], index[order]).item()
        results.append((loss, crd.memory_student.clone(), crd.memory_teacher.clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_crd_writes_a_repeated_index_once_from_its_first_occurrence():
    torch.manual_seed(2)
    crd = small_crd(momentum=0.5).double()
    f_s, f_t = randn(3, 3, seed=72), randn(3, 5, seed=73)
    before = crd.memory_student.clone()
    crd(f_s, f_t, torch.tensor([4, 7, 4]))
    v_s = np_embed(crd.student_head, f_s)
    expected = unit(0.5 * before[4].numpy() + 0.5 * v_s[0])  # not v_s[2]
    np.testing.assert_allclose(crd.memory_student[4].numpy(), expected, rtol=1e-12, atol=1e-14)


def test_crd_skip_step_is_a_no_op_in_one_process():
    crd = small_crd()
    before = crd.memory_student.clone(), crd.memory_teacher.clone(), torch.get_rng_state()
    crd.skip_step()  # only under DDP does it take part in the other ranks' gather
    assert torch.equal(crd.memory_student, before[0])
    assert torch.equal(crd.memory_teacher, before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_crd_banks_do_not_change_in_eval_mode():
    crd = small_crd().eval()
    before = crd.memory_student.clone(), crd.memory_teacher.clone()
    crd(randn(3, 3, seed=62).float(), randn(3, 5, seed=63).float(), torch.tensor([0, 1, 2]))
    assert torch.equal(crd.memory_student, before[0])
    assert torch.equal(crd.memory_teacher, before[1])


def test_crd_banks_and_z_are_buffers_in_the_state_dict():
    crd = small_crd()
    state = crd.state_dict()
    assert state["memory_student"].shape == (10, 4)
    assert state["memory_teacher"].shape == (10, 4)
    assert "log_z" in state
    assert "student_head.weight" in state
    assert all(p is not crd.memory_student for p in crd.parameters())


def test_crd_heads_and_student_features_get_gradients():
    crd = small_crd()
    f_s = randn(4, 3, seed=64).float().requires_grad_()
    f_t = randn(4, 5, seed=65).float()
    crd(f_s, f_t, torch.tensor([0, 1, 2, 3])).backward()
    for head in (crd.student_head, crd.teacher_head):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        assert head.bias.grad is not None
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0


def test_crd_gradcheck():
    crd = small_crd().double().eval()  # eval: the banks stay fixed between evaluations
    f_s = randn(3, 3, seed=66).requires_grad_()
    f_t = randn(3, 5, seed=67).requires_grad_()
    index = torch.tensor([4, 0, 9])

    def call(s, t):
        torch.manual_seed(7)  # the same negatives every evaluation
        return crd(s, t, index)

    with torch.random.fork_rng():
        call(f_s, f_t)  # fixes Z
        assert torch.autograd.gradcheck(call, (f_s, f_t))


def test_crd_loss_is_finite_and_decreases_on_a_toy_problem():
    torch.manual_seed(3)
    m = 32
    inputs = torch.randn(m, 6)
    teacher_features = torch.tanh(inputs @ torch.randn(6, 10))
    student = nn.Linear(6, 8)
    crd = L.CRD(8, 10, feature_dim=16, num_samples=m, num_negatives=16, nce_temperature=0.1)
    optimizer = torch.optim.Adam([*student.parameters(), *crd.parameters()], lr=0.02)
    history = []
    for _ in range(40):
        loss = crd(student(inputs), teacher_features, torch.arange(m))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5]), history


def test_crd_builds_heads_from_the_first_batch():
    crd = L.CRD(num_samples=8, feature_dim=4, num_negatives=3)
    assert crd.student_head is None
    f_s, f_t, index = torch.randn(2, 3, 2, 2), torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.warns(UserWarning, match="optimiser"):
        crd(f_s, f_t, index)
    assert (crd.student_head.in_features, crd.teacher_head.in_features) == (12, 5)
    assert crd.student_head.out_features == crd.teacher_head.out_features == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crd(f_s, f_t, index)  # built: no second warning
    with pytest.raises(ValueError, match="12"):
        crd(torch.randn(2, 7), f_t, index)


def test_crd_build_before_the_first_call_gives_no_warning():
    crd = L.CRD(num_samples=8, feature_dim=4, num_negatives=3)
    f_s, f_t = torch.randn(2, 6), torch.randn(2, 5)
    crd.build(f_s, f_t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crd(f_s, f_t, torch.tensor([0, 1]))


def test_crd_dims_both_or_neither():
    with pytest.raises(ValueError, match="teacher_dim"):
        L.CRD(student_dim=3, num_samples=8)


@pytest.mark.parametrize(
    ("index", "error"),
    [
        (torch.tensor([0, 8]), ValueError),  # out of range [0, 7]
        (torch.tensor([-1, 0]), ValueError),
        (torch.tensor([0, 1, 2]), ValueError),  # one per sample
        (torch.tensor([0.0, 1.0]), TypeError),
    ],
)
def test_crd_bad_index_raises(index, error):
    crd = L.CRD(3, 3, feature_dim=4, num_samples=8, num_negatives=2)
    with pytest.raises(error, match="index"):
        crd(torch.randn(2, 3), torch.randn(2, 3), index)


def test_crd_through_the_distiller_gets_the_index_and_trains_its_heads():
    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    student = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    crd = L.CRD(5, 6, feature_dim=4, num_samples=16, num_negatives=8)
    distiller = Distiller(teacher, student, [Term(crd, student="1", teacher="1")])
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert all(id(p) in trainable for p in crd.parameters())
    assert "losses.0.memory_teacher" in distiller.state_dict()
    x = torch.randn(4, 4)
    out = distiller(x, index=torch.tensor([3, 9, 0, 15]))
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert crd.student_head.weight.grad is not None
    with pytest.raises(ValueError, match="index"):
        distiller(x)


def test_distiller_build_sizes_crd_heads_before_the_optimiser_is_made():
    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    student = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    crd = L.CRD(feature_dim=4, num_samples=16, num_negatives=8)  # heads sized from the data
    distiller = Distiller(teacher, student, [Term(crd, student="1", teacher="1")])
    assert crd.student_head is None
    distiller.build(torch.randn(4, 4))  # what `fit` does before making the optimiser
    assert (crd.student_head.in_features, crd.teacher_head.in_features) == (5, 6)
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert {id(p) for p in crd.parameters()} <= trainable and len(list(crd.parameters())) == 4
    assert torch.isnan(crd.log_z).all()  # build computes no loss: Z is still unset
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "heads built on the first call" warning
        distiller(torch.randn(4, 4), index=torch.tensor([1, 2, 3, 4]))
