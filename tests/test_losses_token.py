"""Reference tests for the token-level losses (`kdistill.losses.token`).

Every expected number comes from a hand-worked case or from a float64 numpy computation written
straight from the papers' formulas, one sequence position at a time (loops, not the library's
helpers), or from float64 gradcheck. The conventions under test are the module docstring's:
shift / ignore_index, p = softmax(z/T) on both sides and × T², the sum over the vocabulary
averaged over counted positions (or divided by `num_counted`), 0 with a zero gradient when nothing
counts, float32 at least, the vocabulary check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdistill import losses as L
from kdistill.losses.token import counted_rows

IGNORE = -100

# ---------------------------------------------------------------------------------------------
# Independent float64 references (numpy, one position at a time, formulas from the papers).
# ---------------------------------------------------------------------------------------------


def np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) = sum_v p log(p / q), with 0 log 0 = 0."""
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def np_forward_kl(p_s, p_t, **_):
    return np_kl(p_t, p_s)


def np_reverse_kl(p_s, p_t, **_):
    return np_kl(p_s, p_t)


def np_jsd(p_s, p_t, beta, **_):
    """GKD (Agarwal et al. 2024): M = beta p_t + (1 - beta) p_s,
    JSD = beta KL(p_t || M) + (1 - beta) KL(p_s || M)."""
    m = beta * p_t + (1 - beta) * p_s
    return beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m)


def np_skew_forward(p_s, p_t, alpha, **_):
    """DistiLLM (Ko et al. 2024): KL(p_t || alpha p_t + (1 - alpha) p_s)."""
    return np_kl(p_t, alpha * p_t + (1 - alpha) * p_s)


def np_skew_reverse(p_s, p_t, alpha, **_):
    """DistiLLM: KL(p_s || alpha p_s + (1 - alpha) p_t)."""
    return np_kl(p_s, alpha * p_s + (1 - alpha) * p_t)


def np_tvd(p_s, p_t, **_):
    return 0.5 * float(np.abs(p_t - p_s).sum())


def np_token_loss(divergence, z_s, z_t, labels, temperature=1.0, shift=True, **params) -> float:
    """T^2 * (sum over counted positions of the divergence) / (number of counted positions).

    With shift, the logits at position i are paired with labels[n, i + 1]; without, labels[n, i].
    """
    total, count = 0.0, 0
    n_rows, length = labels.shape
    for n in range(n_rows):
        for i in range(length):
            if shift:
                if i + 1 >= length or labels[n, i + 1] == IGNORE:
                    continue
            elif labels[n, i] == IGNORE:
                continue
            p_s = np_softmax(z_s[n, i] / temperature)
            p_t = np_softmax(z_t[n, i] / temperature)
            total += divergence(p_s, p_t, **params)
            count += 1
    return temperature**2 * total / max(count, 1)


def np_token_ce(z, labels, shift=True) -> float:
    total, count = 0.0, 0
    for n in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            j = i + 1 if shift else i
            if j >= labels.shape[1] or labels[n, j] == IGNORE:
                continue
            total -= math.log(np_softmax(z[n, i])[labels[n, j]])
            count += 1
    return total / max(count, 1)


# (registered name, constructor params, numpy reference, reference params)
DIVERGENCES = [
    ("forward_kl", {}, np_forward_kl, {}),
    ("reverse_kl", {}, np_reverse_kl, {}),
    ("jsd", {"beta": 0.3}, np_jsd, {"beta": 0.3}),
    ("jsd", {"beta": 0.5}, np_jsd, {"beta": 0.5}),
    ("skew_forward_kl", {"alpha": 0.1}, np_skew_forward, {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.25}, np_skew_reverse, {"alpha": 0.25}),
    ("tvd", {}, np_tvd, {}),
]
DIVERGENCE_IDS = [f"{name}{params}" for name, params, _, _ in DIVERGENCES]
DIVERGENCE_NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def make_batch(n=3, length=6, vocab=7, seed=0, dtype=torch.float64):
    """Student / teacher logits N×L×V and labels with -100 on the right (padding) and at the
    start of row 1 (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, length, vocab, generator=g, dtype=dtype) * 2
    z_t = torch.randn(n, length, vocab, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (n, length), generator=g)
    labels[0, 4:] = IGNORE
    labels[1, :2] = IGNORE
    return z_s, z_t, labels


# ---------------------------------------------------------------------------------------------
# Values against the paper formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "reference", "ref_params"), DIVERGENCES, ids=DIVERGENCE_IDS
)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("shift", [True, False])
def test_divergence_matches_the_paper_formula(
    name, params, reference, ref_params, temperature, shift
):
    z_s, z_t, labels = make_batch()
    loss = L.create_loss(name, temperature=temperature, shift=shift, **params)
    got = loss(z_s, z_t, labels)
    expected = np_token_loss(
        reference, z_s.numpy(), z_t.numpy(), labels.numpy(), temperature, shift, **ref_params
    )
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES + ["token_ce"])
def test_gradcheck_float64(name):
    z_s, z_t, labels = make_batch(n=2, length=4, vocab=5, seed=1)
    loss = L.create_loss(name)
    z_s.requires_grad_(True)
    if name == "token_ce":
        assert torch.autograd.gradcheck(lambda s: loss(s, labels), (z_s,))
    else:
        z_t.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda s, t: loss(s, t, labels), (z_s, z_t))


@pytest.mark.parametrize("name", ["hidden_mse", "hidden_cosine"])
def test_gradcheck_float64_hidden(name):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    loss = L.create_loss(name)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, mask), (s, t))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_zero_with_zero_gradient_when_student_equals_teacher(name):
    z, _, labels = make_batch(seed=3)
    student = z.clone().requires_grad_(True)
    value = L.create_loss(name)(student, z.clone(), labels)
    (grad,) = torch.autograd.grad(value, student)
    assert abs(value.item()) < 1e-12
    assert grad.abs().max().item() < 1e-12


# ---------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------


def test_shift_pairs_logits_at_i_with_the_label_at_i_plus_1():
    """labels [-100, 1, -100]: with shift only position 0 counts (labels[1] != -100), without
    shift only position 1. Position 0: p_t = [.5, .5], p_s = [.75, .25]; position 1: p_t =
    [.75, .25], p_s = [.5, .5]; position 2 (never counted) is far apart."""
    ln3 = math.log(3)
    z_t = torch.tensor([[[0.0, 0.0], [ln3, 0.0], [9.0, -9.0]]], dtype=torch.float64)
    z_s = torch.tensor([[[ln3, 0.0], [0.0, 0.0], [-9.0, 9.0]]], dtype=torch.float64)
    labels = torch.tensor([[IGNORE, 1, IGNORE]])
    at_0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    at_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert at_0 != pytest.approx(at_1)
    assert L.ForwardKL(shift=True)(z_s, z_t, labels).item() == pytest.approx(at_0, rel=1e-12)
    assert L.ForwardKL(shift=False)(z_s, z_t, labels).item() == pytest.approx(at_1, rel=1e-12)
    assert int(L.ForwardKL(shift=True).count(labels)) == 1
    assert int(L.ForwardKL(shift=False).count(labels)) == 1


def test_token_ce_scores_each_position_on_the_next_label():
    """Position 0: p = [.25, .5, .25]; position 1: p = [.25, .25, .5]; position 2 uniform.
    labels [0, 1, 2]. shift: pos 0 on label 1 (p = .5), pos 1 on label 2 (p = .5) → ln 2.
    No shift: pos 0 on label 0 (.25), pos 1 on label 1 (.25), pos 2 on label 2 (1/3)."""
    ln2 = math.log(2)
    z = torch.tensor([[[0.0, ln2, 0.0], [0.0, 0.0, ln2], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2]])
    assert L.TokenCE(shift=True)(z, labels).item() == pytest.approx(ln2, rel=1e-12)
    no_shift = (2 * math.log(4) + math.log(3)) / 3
    assert L.TokenCE(shift=False)(z, labels).item() == pytest.approx(no_shift, rel=1e-12)


def test_token_ce_equals_cross_entropy_on_hand_shifted_labels():
    z, _, labels = make_batch(seed=4)
    shifted_logits = z[:, :-1].reshape(-1, z.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE)
    assert L.TokenCE()(z, labels).item() == pytest.approx(expected.item(), rel=1e-12)
    assert L.TokenCE()(z, labels).item() == pytest.approx(
        np_token_ce(z.numpy(), labels.numpy()), rel=1e-12
    )
    unshifted = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1))
    assert L.TokenCE(shift=False)(z, labels).item() == pytest.approx(unshifted.item(), rel=1e-12)


def test_temperature_on_both_sides_and_t_squared():
    """T = 2: teacher [2, 0] → softmax([1, 0]); student [0, 2] → softmax([0, 1]); the value is
    4 · KL(p_t ‖ p_s) = 4 · (a − b)·(1 − 0) with a, b = p_t[0], p_s[0] ... written out below."""
    z_t = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    z_s = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    e = math.e
    p_t = [e / (e + 1), 1 / (e + 1)]
    p_s = [1 / (e + 1), e / (e + 1)]
    kl = sum(p * math.log(p / q) for p, q in zip(p_t, p_s))
    got = L.ForwardKL(temperature=2.0, shift=False)(z_s, z_t, labels)
    assert got.item() == pytest.approx(4 * kl, rel=1e-12)
    # temperature on the teacher only (p_s = softmax([0, 2])) would give another number
    p_s_raw = [1 / (e * e + 1), e * e / (e * e + 1)]
    one_side = 4 * sum(p * math.log(p / q) for p, q in zip(p_t, p_s_raw))
    assert got.item() != pytest.approx(one_side, rel=1e-3)


def test_jsd_mixture_weights_are_not_swapped():
    """beta = 0.1, p_t = [.99, .01], p_s = [.5, .5]: M = .1 p_t + .9 p_s = [.549, .451];
    JSD = .1 KL(p_t ‖ M) + .9 KL(p_s ‖ M) ≈ 0.0589. The swapped weights (M = .9 p_t + .1 p_s,
    .9 KL(p_t ‖ M) + .1 KL(p_s ‖ M)) give ≈ 0.104."""
    z_t = torch.tensor([[math.log(99), 0.0]], dtype=torch.float64)
    z_s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([1])

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    p_t, p_s = [0.99, 0.01], [0.5, 0.5]
    m = [0.549, 0.451]
    expected = 0.1 * kl(p_t, m) + 0.9 * kl(p_s, m)
    m_swapped = [0.9 * 0.99 + 0.1 * 0.5, 0.9 * 0.01 + 0.1 * 0.5]
    swapped = 0.9 * kl(p_t, m_swapped) + 0.1 * kl(p_s, m_swapped)
    assert expected == pytest.approx(0.0589048, rel=1e-5)
    assert swapped == pytest.approx(0.1044910, rel=1e-5)
    got = L.GeneralizedJSD(beta=0.1, shift=False)(z_s, z_t, labels).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_tvd_hand_case():
    """p_t = [.75, .25], p_s = [.5, .5]: ½(|.25| + |−.25|) = .25."""
    z_t = torch.tensor([[math.log(3), 0.0]], dtype=torch.float64)
    z_s = torch.zeros(1, 2, dtype=torch.float64)
    assert L.TVD(shift=False)(z_s, z_t, torch.tensor([0])).item() == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# Endpoints of beta and alpha
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_refuses_beta_outside_the_open_interval(beta):
    with pytest.raises(ValueError, match=r"ForwardKL .*ReverseKL"):
        L.GeneralizedJSD(beta=beta)


def test_jsd_scaled_limits_are_the_documented_kls():
    """The docstring's pointers: JSD_β/β → KL(p_t‖p_s) as β → 0 (ForwardKL) and
    JSD_β/(1 − β) → KL(p_s‖p_t) as β → 1 (ReverseKL)."""
    z_s, z_t, labels = make_batch(seed=5)
    eps = 1e-6
    forward = L.ForwardKL()(z_s, z_t, labels).item()
    reverse = L.ReverseKL()(z_s, z_t, labels).item()
    near_0 = L.GeneralizedJSD(beta=eps)(z_s, z_t, labels).item() / eps
    near_1 = L.GeneralizedJSD(beta=1 - eps)(z_s, z_t, labels).item() / eps
    assert near_0 == pytest.approx(forward, rel=1e-4)
    assert near_1 == pytest.approx(reverse, rel=1e-4)
    assert forward != pytest.approx(reverse, rel=1e-2)


def test_skew_at_alpha_0_is_exactly_the_plain_kl():
    z_s, z_t, labels = make_batch(seed=6, dtype=torch.float32)
    assert torch.equal(
        L.SkewForwardKL(alpha=0.0)(z_s, z_t, labels), L.ForwardKL()(z_s, z_t, labels)
    )
    assert torch.equal(
        L.SkewReverseKL(alpha=0.0)(z_s, z_t, labels), L.ReverseKL()(z_s, z_t, labels)
    )
    # and α > 0 really skews (the test above could not pass by ignoring α)
    assert L.SkewForwardKL(alpha=0.1)(z_s, z_t, labels) < L.ForwardKL()(z_s, z_t, labels)


@pytest.mark.parametrize("cls", [L.SkewForwardKL, L.SkewReverseKL])
@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.2])
def test_skew_refuses_alpha_outside_0_1(cls, alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
        cls(alpha=alpha)


# ---------------------------------------------------------------------------------------------
# Masking and normalisation
# ---------------------------------------------------------------------------------------------


def padded(real: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], length: int, left: bool):
    """Rows of (student N_i×V, teacher N_i×V, tokens N_i) placed at the start (right padding) or
    the end (left padding) of `length` positions; padding positions get other random logits and
    label -100, and an attention mask of 0."""
    g = torch.Generator().manual_seed(11 if left else 12)
    vocab = real[0][0].shape[-1]
    z_s = torch.randn(len(real), length, vocab, generator=g, dtype=torch.float64) * 5
    z_t = torch.randn(len(real), length, vocab, generator=g, dtype=torch.float64) * 5
    labels = torch.full((len(real), length), IGNORE)
    mask = torch.zeros(len(real), length, dtype=torch.long)
    for n, (s, t, tokens) in enumerate(real):
        span = slice(length - len(tokens), length) if left else slice(0, len(tokens))
        z_s[n, span], z_t[n, span], labels[n, span], mask[n, span] = s, t, tokens, 1
    return z_s, z_t, labels, mask


def real_sequences(vocab=6):
    """Three sequences of 3, 5 and 1 tokens; the first token's label is -100 (a BOS or prompt
    token: no earlier position of the sequence predicts it)."""
    g = torch.Generator().manual_seed(13)
    sequences = []
    for k in (3, 5, 1):
        tokens = torch.randint(0, vocab, (k,), generator=g)
        tokens[0] = IGNORE
        s = torch.randn(k, vocab, generator=g, dtype=torch.float64)
        t = torch.randn(k, vocab, generator=g, dtype=torch.float64)
        sequences.append((s, t, tokens))
    return sequences


def loss_value(loss, name, z_s, z_t, labels, mask):
    if name == "token_ce":
        return loss(z_s, labels, attention_mask=mask)
    if name.startswith("hidden"):
        return loss(z_s, z_t, mask)
    return loss(z_s, z_t, labels, attention_mask=mask)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES + ["token_ce", "hidden_mse", "hidden_cosine"])
def test_left_and_right_padding_give_the_same_value(name):
    real = real_sequences()
    right = padded(real, 7, left=False)
    left = padded(real, 7, left=True)
    loss = L.create_loss(name)
    assert not torch.equal(right[0], left[0])
    assert loss_value(loss, name, *right).item() == pytest.approx(
        loss_value(loss, name, *left).item(), rel=1e-12
    )


@pytest.mark.parametrize("name", DIVERGENCE_NAMES + ["token_ce"])
def test_a_counted_padding_position_is_an_error_given_the_attention_mask(name):
    """Left padding with the first token labelled: the pad position before it would be scored
    on it (Hugging Face's loss counts it). Given the attention mask, that is refused."""
    real = real_sequences()
    for _, _, tokens in real:
        tokens[0] = 2
    z_s, z_t, labels, mask = padded(real, 7, left=True)
    loss = L.create_loss(name)
    with pytest.raises(ValueError, match=r"counted positions are padding .* first token"):
        loss_value(loss, name, z_s, z_t, labels, mask)
    right = padded(real, 7, left=False)  # right padding: the first token is never a target
    assert torch.isfinite(loss_value(loss, name, *right))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES + ["token_ce", "hidden_mse", "hidden_cosine"])
@pytest.mark.parametrize("num_counted", [None, 7.0])
def test_a_fully_masked_batch_gives_zero_with_zero_gradient(name, num_counted):
    z_s, z_t, _ = make_batch(dtype=torch.float32)
    z_s.requires_grad_(True)
    labels = torch.full(z_s.shape[:2], IGNORE)
    mask = torch.zeros(z_s.shape[:2], dtype=torch.long)
    loss = L.create_loss(name)
    if name == "token_ce":
        value = loss(z_s, labels, num_counted=num_counted)
    elif name.startswith("hidden"):
        value = loss(z_s, z_t, mask, num_counted=num_counted)
    else:
        value = loss(z_s, z_t, labels, num_counted=num_counted)
    (grad,) = torch.autograd.grad(value, z_s)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_a_fully_masked_row_does_not_count(name):
    """Row 1 fully masked: the value is the other rows' alone (no NaN, no dilution)."""
    z_s, z_t, labels = make_batch(seed=7)
    labels[1] = IGNORE
    keep = [0, 2]
    loss = L.create_loss(name)
    assert loss(z_s, z_t, labels).item() == pytest.approx(
        loss(z_s[keep], z_t[keep], labels[keep]).item(), rel=1e-12
    )


def test_num_counted_replaces_the_own_count():
    z_s, z_t, labels = make_batch(seed=8)
    loss = L.ForwardKL()
    own = int(loss.count(labels))
    assert own == 3 + 4 + 5  # labels[i+1] real: i = 0..2 (row 0), 1..4 (row 1), 0..4 (row 2)
    mean = loss(z_s, z_t, labels).item()
    assert loss(z_s, z_t, labels, num_counted=40.0).item() == pytest.approx(mean * own / 40)
    assert loss(z_s, z_t, labels, num_counted=torch.tensor(40)).item() == pytest.approx(
        mean * own / 40
    )
    with pytest.raises(ValueError, match="num_counted=0 but this batch has 12 counted"):
        loss(z_s, z_t, labels, num_counted=0)
    with pytest.raises(ValueError, match="num_counted must be a finite number"):
        loss(z_s, z_t, labels, num_counted=float("nan"))


def test_count_is_an_int64_scalar_for_every_counting_loss():
    labels = torch.tensor([[5, 2, IGNORE], [IGNORE, 1, 1]])
    for name in DIVERGENCE_NAMES + ["token_ce"]:
        loss = L.create_loss(name)
        assert loss.counts_tokens
        count = loss.count(labels)
        assert count.dtype == torch.int64 and count.dim() == 0
        assert int(count) == 3  # (0, 0) → 2; (1, 0) → 1; (1, 1) → 1
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert int(L.HiddenMSE().count(mask)) == 4


def test_count_matches_positions_by_hand():
    labels = torch.tensor([[5, 2, IGNORE], [IGNORE, 1, 1]])
    # shift: position i counts iff labels[:, i+1] != -100 → row 0: i=0; row 1: i=0, i=1
    assert int(L.ForwardKL().count(labels)) == 3
    # no shift: labels != -100 → 2 + 2
    assert int(L.ForwardKL(shift=False).count(labels)) == 4


# ---------------------------------------------------------------------------------------------
# Precision and extreme values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCE_NAMES + ["token_ce"])
def test_huge_logits_stay_finite(name):
    g = torch.Generator().manual_seed(9)
    z_s = (torch.randn(2, 5, 6, generator=g) * 1e4).requires_grad_(True)
    z_t = torch.randn(2, 5, 6, generator=g) * 1e4
    labels = torch.randint(0, 6, (2, 5), generator=g)
    loss = L.create_loss(name)
    value = loss(z_s, labels) if name == "token_ce" else loss(z_s, z_t, labels)
    (grad,) = torch.autograd.grad(value, z_s)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_minus_infinity_logits_have_probability_zero_and_no_nan(name):
    """A vocabulary entry masked out with −inf on both sides: p = 0 there, contributes 0; the
    value equals that of the logits without that entry."""
    z_s, z_t, labels = make_batch(vocab=5, seed=10, dtype=torch.float32)
    labels = labels.clamp(max=3).masked_fill(labels == IGNORE, IGNORE)
    z_s_inf = torch.cat([z_s[..., :4], torch.full_like(z_s[..., :1], -math.inf)], dim=-1)
    z_t_inf = torch.cat([z_t[..., :4], torch.full_like(z_t[..., :1], -math.inf)], dim=-1)
    z_s_inf.requires_grad_(True)
    loss = L.create_loss(name)
    value = loss(z_s_inf, z_t_inf, labels)
    (grad,) = torch.autograd.grad(value, z_s_inf)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    expected = loss(z_s[..., :4], z_t[..., :4], labels)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES + ["token_ce"])
def test_bf16_inputs_are_computed_in_float32(name):
    z_s, z_t, labels = make_batch(seed=11, dtype=torch.float32)
    s16, t16 = z_s.bfloat16(), z_t.bfloat16()
    loss = L.create_loss(name)
    if name == "token_ce":
        got, expected = loss(s16, labels), loss(s16.float(), labels)
    else:
        got, expected = loss(s16, t16, labels), loss(s16.float(), t16.float(), labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # float64 stays float64
    if name == "token_ce":
        assert loss(z_s.double(), labels).dtype == torch.float64
    else:
        assert loss(z_s.double(), z_t.double(), labels).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Vocabulary, shapes and labels
# ---------------------------------------------------------------------------------------------


def test_padding_rows_of_a_head_are_ignored_with_vocab_size():
    z_s, z_t, labels = make_batch(vocab=5, seed=12)
    garbage = torch.full((*z_t.shape[:2], 3), 50.0, dtype=torch.float64)
    z_t_padded = torch.cat([z_t, garbage], dim=-1)  # 8 rows, 3 of them padding
    for name in DIVERGENCE_NAMES:
        expected = L.create_loss(name)(z_s, z_t, labels)
        got = L.create_loss(name, vocab_size=5)(z_s, z_t_padded, labels)
        assert got.item() == pytest.approx(expected.item(), rel=1e-12), name
    with pytest.raises(
        ValueError, match=r"student's logits have 5 .* teacher's 8: if the extra rows"
    ):
        L.ForwardKL()(z_s, z_t_padded, labels)
    with pytest.raises(ValueError, match=r"set vocab_size=<tokenizer size>"):
        L.ForwardKL()(z_s, z_t_padded, labels)
    with pytest.raises(ValueError, match=r"vocab_size=6 exceeds"):
        L.ForwardKL(vocab_size=6)(z_s, z_t_padded, labels)
    s_padded = torch.cat([z_s, garbage], dim=-1)
    assert L.TokenCE(vocab_size=5)(s_padded, labels).item() == pytest.approx(
        L.TokenCE()(z_s, labels).item(), rel=1e-12
    )


def test_a_label_beyond_the_compared_vocabulary_is_an_error():
    z_s, z_t, labels = make_batch(vocab=8, seed=13)
    labels[2, 3] = 6
    with pytest.raises(ValueError, match=r"token ids in \[0, 4\] .* max 6 .*vocab_size=5"):
        L.ForwardKL(vocab_size=5)(z_s, z_t, labels)
    with pytest.raises(ValueError, match=r"token ids in \[0, 4\]"):
        L.TokenCE(vocab_size=5)(z_s, labels)
    labels[2, 3] = -1  # negative but not ignore_index
    with pytest.raises(ValueError, match=r"min -1"):
        L.ReverseKL()(z_s, z_t, labels)


def test_n_by_v_logits_are_one_position_per_sample_and_need_shift_false():
    g = torch.Generator().manual_seed(14)
    z_s, z_t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, IGNORE, 3, 4])
    loss = L.ForwardKL(shift=False)
    assert loss(z_s, z_t, labels).item() == pytest.approx(
        loss(z_s[:, None], z_t[:, None], labels[:, None]).item()
    )
    assert int(loss.count(labels)) == 3
    with pytest.raises(ValueError, match="shift=False"):
        L.ForwardKL()(z_s, z_t, labels)
    with pytest.raises(ValueError, match="shift=False"):
        L.ForwardKL().count(labels)


def test_bad_shapes_and_labels_are_refused_with_a_message():
    z_s, z_t, labels = make_batch()
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 6\)"):
        L.ForwardKL()(z_s, z_t, labels[:, :5])
    with pytest.raises(TypeError, match="integer token ids"):
        L.ForwardKL()(z_s, z_t, labels.double())
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 5\) \(the teacher logits"):
        L.ForwardKL()(z_s, z_t[:, :5], labels)
    with pytest.raises(ValueError, match=r"N×L×V \(or N×V\)"):
        L.ForwardKL()(z_s[..., None], z_t[..., None], labels)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.ForwardKL(temperature=0)


def test_counted_rows_helper_aligns_logits_with_next_labels():
    z = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    labels = torch.tensor([[IGNORE, 1, 0], [1, IGNORE, 1]])
    rows, targets = counted_rows(z, labels)
    # counted: (0, 0) → label 1, (0, 1) → label 0, (1, 1) → label 1
    assert torch.equal(rows, z[[0, 0, 1], [0, 1, 1]])
    assert targets.tolist() == [1, 0, 1]


# ---------------------------------------------------------------------------------------------
# Hidden states
# ---------------------------------------------------------------------------------------------


def np_hidden(s, t, mask, cosine):
    total, count = 0.0, 0
    for n in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[n, i] != 1:
                continue
            if cosine:
                total += 1 - float(s[n, i] @ t[n, i]) / (
                    np.linalg.norm(s[n, i]) * np.linalg.norm(t[n, i])
                )
            else:
                total += float(np.mean((s[n, i] - t[n, i]) ** 2))
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("cosine", [False, True])
def test_hidden_losses_average_over_real_positions_only(cosine):
    g = torch.Generator().manual_seed(15)
    s = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    loss = L.HiddenCosine() if cosine else L.HiddenMSE()
    expected = np_hidden(s.numpy(), t.numpy(), mask.numpy(), cosine)
    assert loss(s, t, mask).item() == pytest.approx(expected, rel=1e-12)
    assert loss(s, t, mask.bool()).item() == pytest.approx(expected, rel=1e-12)
    if not cosine:  # no padding: FitNet's mean over all elements
        full = torch.ones(3, 5, dtype=torch.long)
        assert loss(s, t, full).item() == pytest.approx(L.FitNet()(s, t).item(), rel=1e-12)


def test_hidden_losses_check_the_mask():
    s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but the hidden"):
        L.HiddenMSE()(s, s, torch.ones(2, 4))
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1 \\(real token\\) only"):
        L.HiddenMSE()(s, s, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="N×L×D"):
        L.HiddenMSE()(s[:, 0], s[:, 0], torch.ones(2, 3))
