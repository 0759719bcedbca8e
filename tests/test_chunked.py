"""Chunked vocabulary loss: value and gradients equal the dense token losses, the logits are
never built, and the Distiller refuses what would make it silently wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import kdistill as kd
from kdistill.errors import LayerNotFoundError
from kdistill.losses import (
    TVD,
    ChunkedTokenCE,
    ChunkedTokenLoss,
    ForwardKL,
    GeneralizedJSD,
    HeadInput,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TokenCE,
    chunked_token_loss,
)

N, L, D, DT, V = 3, 6, 5, 7, 13


def divergences(temperature: float, vocab_size: int | None = None):
    kw = {"temperature": temperature, "vocab_size": vocab_size}
    return [
        ForwardKL(**kw),
        ReverseKL(**kw),
        GeneralizedJSD(beta=0.3, **kw),
        SkewForwardKL(alpha=0.1, **kw),
        SkewReverseKL(alpha=0.2, **kw),
        TVD(**kw),
    ]


def _case(dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, L, D, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    ht = torch.randn(N, L, DT, generator=g, dtype=dtype)
    wt = torch.randn(V, DT, generator=g, dtype=dtype)
    bt = torch.randn(V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (N, L), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 4:] = -100  # padding at the end
    return h, w, b, ht, wt, bt, labels


def _dense(loss, h, w, b, teacher_logits, labels, **kw):
    """The reference: token.py's loss on the full logits built the plain way."""
    logits = h @ w.T + (0 if b is None else b)
    if isinstance(loss, TokenCE):
        return loss(logits, labels, **kw)
    return loss(logits, teacher_logits, labels, **kw)


def _grads(value, params):
    return torch.autograd.grad(value, [p for p in params if p is not None])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1000])  # M = 12: divides, does not, bigger
@pytest.mark.parametrize("teacher_form", ["logits", "head"])
@pytest.mark.parametrize("recompute", [True, False])
def test_every_divergence_matches_the_dense_loss(temperature, chunk_size, teacher_form, recompute):
    h, w, b, ht, wt, bt, labels = _case()
    teacher_logits = ht @ wt.T + bt
    teacher = teacher_logits if teacher_form == "logits" else HeadInput(ht, wt, bt)
    for loss in divergences(temperature):
        expected = _dense(loss, h, w, b, teacher_logits, labels)
        got = chunked_token_loss(
            loss, HeadInput(h, w, b), labels, teacher, chunk_size=chunk_size, recompute=recompute
        )
        assert got.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12), loss
        for g_dense, g_chunk in zip(_grads(expected, [h, w, b]), _grads(got, [h, w, b])):
            torch.testing.assert_close(g_chunk, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [2, 5])
@pytest.mark.parametrize("recompute", [True, False])
def test_token_ce_matches_cross_entropy_of_the_shifted_logits(chunk_size, recompute):
    h, w, b, *_, labels = _case()
    logits = h @ w.T + b
    # independent formula: HF's causal-LM loss, shift by hand
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    got = ChunkedTokenCE(chunk_size=chunk_size, recompute=recompute)(HeadInput(h, w, b), labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    for g_dense, g_chunk in zip(_grads(expected, [h, w, b]), _grads(got, [h, w, b])):
        torch.testing.assert_close(g_chunk, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", [*divergences(1.5, vocab_size=10), TokenCE(vocab_size=10)])
def test_padded_head_compares_the_first_vocab_size_rows(loss):
    h, w, b, ht, wt, bt, labels = _case(seed=1)
    labels = labels.where(labels < 10, torch.tensor(3))
    teacher_logits = ht @ wt.T + bt
    teacher = None if isinstance(loss, TokenCE) else HeadInput(ht, wt, bt)
    expected = _dense(loss, h, w, b, teacher_logits, labels)
    got = chunked_token_loss(loss, HeadInput(h, w, b), labels, teacher, chunk_size=3)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    grads = _grads(got, [h, w, b])
    for g_dense, g_chunk in zip(_grads(expected, [h, w, b]), grads):
        torch.testing.assert_close(g_chunk, g_dense, rtol=1e-9, atol=1e-12)
    assert grads[1][10:].abs().max() == 0 and grads[2][10:].abs().max() == 0  # padding rows


def test_num_counted_shift_false_and_no_bias_match_the_dense_loss():
    h, w, _, ht, wt, bt, labels = _case(bias=False)
    teacher_logits = ht @ wt.T + bt
    for loss in (GeneralizedJSD(beta=0.7, shift=False), TokenCE(shift=False)):
        teacher = None if isinstance(loss, TokenCE) else teacher_logits
        expected = _dense(loss, h, w, None, teacher_logits, labels, num_counted=40)
        got = chunked_token_loss(
            loss, HeadInput(h, w), labels, teacher, chunk_size=4, num_counted=40
        )
        assert got.item() == pytest.approx(expected.item(), rel=1e-10)
        for g_dense, g_chunk in zip(_grads(expected, [h, w]), _grads(got, [h, w])):
            torch.testing.assert_close(g_chunk, g_dense, rtol=1e-9, atol=1e-12)


def test_float32_matches_the_dense_loss_to_float_tolerance():
    h, w, b, ht, wt, bt, labels = _case(dtype=torch.float32)
    teacher_logits = ht @ wt.T + bt
    loss = ForwardKL(temperature=2.0)
    expected = _dense(loss, h, w, b, teacher_logits, labels)
    got = chunked_token_loss(loss, HeadInput(h, w, b), labels, teacher_logits, chunk_size=5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for g_dense, g_chunk in zip(_grads(expected, [h, w, b]), _grads(got, [h, w, b])):
        torch.testing.assert_close(g_chunk, g_dense, rtol=1e-4, atol=1e-6)


def test_bf16_head_matches_the_dense_loss_on_its_bf16_logits():
    h, w, b, ht, wt, bt, labels = _case(dtype=torch.float32)
    hb, wb, bb = (x.detach().bfloat16().requires_grad_() for x in (h, w, b))
    teacher = (ht @ wt.T + bt).bfloat16()
    loss = GeneralizedJSD(beta=0.5)
    expected = loss(hb @ wb.T + bb, teacher, labels)  # bf16 logits, cast to float32 inside
    got = chunked_token_loss(loss, HeadInput(hb, wb, bb), labels, teacher, chunk_size=4)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-3)
    for g_dense, g_chunk in zip(_grads(expected, [hb, wb, bb]), _grads(got, [hb, wb, bb])):
        assert g_chunk.dtype == torch.bfloat16
        torch.testing.assert_close(g_chunk.float(), g_dense.float(), rtol=2e-2, atol=2e-3)


def test_gradcheck_float64():
    h, w, b, ht, wt, bt, labels = _case()
    teacher = HeadInput(ht, wt, bt)

    def value(h, w, b):
        return chunked_token_loss(
            GeneralizedJSD(beta=0.4, temperature=2.0),
            HeadInput(h, w, b),
            labels,
            teacher,
            chunk_size=5,
        )

    assert torch.autograd.gradcheck(value, (h, w, b))
    for recompute in (True, False):
        ce = ChunkedTokenCE(chunk_size=4, recompute=recompute)
        assert torch.autograd.gradcheck(
            lambda h, w, b, ce=ce: ce(HeadInput(h, w, b), labels), (h, w, b)
        )


@pytest.mark.parametrize("loss", [ForwardKL(), TokenCE()])
@pytest.mark.parametrize("recompute", [True, False])
def test_nothing_counted_is_zero_with_zero_gradients(loss, recompute):
    h, w, b, ht, wt, bt, _ = _case()
    labels = torch.full((N, L), -100)
    teacher = None if isinstance(loss, TokenCE) else HeadInput(ht, wt, bt)
    got = chunked_token_loss(loss, HeadInput(h, w, b), labels, teacher, recompute=recompute)
    assert got.item() == 0.0
    for grad in _grads(got, [h, w, b]):
        assert grad.abs().max() == 0


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[str, tuple[int, ...]]] = set()  # (operation, output shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
                self.shapes.add((func.__name__.split(".")[0], tuple(value.shape)))
        return out


@pytest.mark.parametrize("recompute", [True, False])
def test_no_tensor_of_all_positions_by_vocabulary_is_built(recompute):
    torch.manual_seed(0)
    n, length, d, vocab, chunk = 4, 64, 8, 512, 16
    h = torch.randn(n, length, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    labels = torch.randint(0, vocab, (n, length))
    teacher = HeadInput(torch.randn(n, length, d), torch.randn(vocab, d))
    with _LargestTensor() as seen:
        value = chunked_token_loss(
            ForwardKL(), HeadInput(h, w), labels, teacher, chunk_size=chunk, recompute=recompute
        )
        value.backward()
    assert seen.largest <= chunk * vocab  # one chunk's logits, never M×V (252×512)
    with _LargestTensor() as dense:  # the check itself sees the dense loss's logits
        ForwardKL()(h @ w.T, teacher.hidden @ teacher.weight.T, labels).backward()
    assert dense.largest == n * length * vocab


class _CountingLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class _TinyLM(nn.Module):
    """Embedding → tanh(linear) → head; `post` changes the logits after the head."""

    def __init__(self, width: int, post=None):
        super().__init__()
        self.embed = nn.Embedding(V, width)
        self.mix = nn.Linear(width, width)
        self.act = nn.Tanh()
        self.lm_head = _CountingLinear(width, V)
        self.post = post

    def forward(self, input_ids, attention_mask=None):
        logits = self.lm_head(self.act(self.mix(self.embed(input_ids))))
        return {"logits": logits if self.post is None else self.post(logits)}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, L), generator=g)
    labels = ids.clone()
    labels[1, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def test_distiller_term_equals_the_dense_term_and_no_head_runs():
    torch.manual_seed(0)
    teacher, student = _TinyLM(DT), _TinyLM(D)
    inputs, labels = _batch()
    dense = kd.Distiller(
        teacher,
        student,
        [
            kd.Term(GeneralizedJSD(beta=0.2, temperature=2.0), weight=0.7, output="logits"),
            kd.Term(TokenCE(), weight=0.3, output="logits"),
        ],
    )
    out = dense(inputs, target=labels)
    out.loss.backward()
    expected = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    student.lm_head.calls = teacher.lm_head.calls = 0
    chunked = kd.Distiller(
        teacher,
        student,
        [
            kd.Term(
                ChunkedTokenLoss("jsd", beta=0.2, temperature=2.0, chunk_size=4),
                weight=0.7,
                output="logits",
            ),
            kd.Term(ChunkedTokenCE(chunk_size=5), weight=0.3, output="logits"),
        ],
    )
    counts = chunked.count_tokens(labels, inputs)
    assert counts == {"chunked": N * (L - 1) - 1, "chunked_token_ce": N * (L - 1) - 1}
    got = chunked(inputs, target=labels)
    got.loss.backward()
    assert student.lm_head.calls == 0 and teacher.lm_head.calls == 0  # neither head ran
    assert got.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    for name, param in student.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6)
    assert "forward" not in vars(student.lm_head)  # the head's own forward is back
    assert student(**inputs)["logits"].shape == (N, L, V)


def test_teacher_outputs_from_a_cache_are_read_as_dense_logits():
    torch.manual_seed(0)
    teacher, student = _TinyLM(DT), _TinyLM(D)
    inputs, labels = _batch()
    with torch.no_grad():
        cached = teacher(**inputs)
    distiller = kd.Distiller(
        teacher, student, [kd.Term(ChunkedTokenLoss("forward_kl"), output="logits")]
    )
    live = distiller(inputs, target=labels).loss
    from_cache = distiller(inputs, target=labels, teacher_output=cached).loss
    assert from_cache.item() == pytest.approx(live.item(), rel=1e-6)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_model_that_changes_its_logits_after_the_head_is_refused(side):
    torch.manual_seed(0)
    softcap = lambda z: 30 * torch.tanh(z / 30)  # noqa: E731 (Gemma-style softcapping)
    teacher = _TinyLM(DT, post=softcap if side == "teacher" else None)
    student = _TinyLM(D, post=softcap if side == "student" else None)
    inputs, labels = _batch()
    distiller = kd.Distiller(
        teacher, student, [kd.Term(ChunkedTokenLoss("forward_kl"), output="logits")]
    )
    with pytest.raises(
        ValueError, match=f"{side}'s output 'logits' is not what its head 'lm_head'"
    ):
        distiller(inputs, target=labels)


def test_a_dense_term_reading_the_uncomputed_logits_is_refused():
    teacher, student = _TinyLM(DT), _TinyLM(D)
    inputs, labels = _batch()
    distiller = kd.Distiller(
        teacher,
        student,
        [
            kd.Term(ChunkedTokenLoss("forward_kl"), output="logits"),
            kd.Term(TokenCE(), output="logits"),
        ],
    )
    with pytest.raises(ValueError, match="make this term chunked too"):
        distiller(inputs, target=labels)


def test_bad_heads_and_inputs_fail_with_the_shapes_and_the_fix():
    teacher, student = _TinyLM(DT), _TinyLM(D)
    with pytest.raises(LayerNotFoundError, match="closest: lm_head"):
        kd.Distiller(teacher, student, [kd.Term(ChunkedTokenLoss(student_head="lm_heads"))])
    with pytest.raises(TypeError, match="'act' .*linear output head with a V×D weight"):
        kd.Distiller(teacher, student, [kd.Term(ChunkedTokenLoss(student_head="act"))])
    with pytest.raises(ValueError, match="token divergence"):
        ChunkedTokenLoss("kd")
    h, w, b, *_, labels = _case()
    with pytest.raises(ValueError, match=r"D = 5 but the head weight \(13, 4\)"):
        chunked_token_loss(TokenCE(), HeadInput(h, w[:, :4]), labels)
    with pytest.raises(ValueError, match="needs the teacher"):
        chunked_token_loss(ForwardKL(), HeadInput(h, w), labels)
    with pytest.raises(ValueError, match="12 vocabulary entries and the teacher's 13"):
        chunked_token_loss(ForwardKL(), HeadInput(h, w[:12]), labels, torch.zeros(N, L, V))


def test_recipe_term_passes_its_params_to_the_wrapped_loss():
    from kdistill.recipes.schema import TermSpec

    spec = TermSpec(loss="chunked", params={"loss": "jsd", "beta": 0.1, "chunk_size": 256})
    assert spec.params["beta"] == 0.1
    with pytest.raises(ValueError, match="beta"):
        TermSpec(loss="chunked", params={"loss": "forward_kl", "beta": 0.1})


def test_a_recipe_objective_with_chunked_terms_equals_the_dense_one():
    from kdistill.models.lm import gpt2_lm
    from kdistill.recipes.objective import build_objective
    from kdistill.recipes.schema import DistillSpec
    from kdistill.tasks import LanguageModelingTask

    torch.manual_seed(0)
    teacher = gpt2_lm(V, n_layer=1, n_embd=16, n_head=2)
    student = gpt2_lm(V, n_layer=1, n_embd=8, n_head=2)
    inputs, labels = _batch()
    task = LanguageModelingTask()

    def run(hard: str, soft: dict) -> tuple[float, torch.Tensor]:
        spec = DistillSpec(alpha=0.6, hard_loss=hard, methods={"m": [soft]})
        distiller = kd.Distiller(teacher, student, build_objective(task, spec, "m"))
        out = distiller(inputs, target=labels)
        out.loss.backward()
        grad = student.transformer.wte.weight.grad.clone()  # tied with lm_head
        student.zero_grad()
        return out.loss.item(), grad

    dense = run("token_ce", {"loss": "jsd", "params": {"beta": 0.3, "temperature": 2.0}})
    chunked = run(
        "chunked_token_ce",
        {"loss": "chunked", "params": {"loss": "jsd", "beta": 0.3, "temperature": 2.0}},
    )
    assert chunked[0] == pytest.approx(dense[0], rel=1e-5)
    torch.testing.assert_close(chunked[1], dense[1], rtol=1e-4, atol=1e-6)


def test_the_head_gets_its_forward_back_when_the_model_fails():
    teacher, student = _TinyLM(DT), _TinyLM(D, post=lambda z: z[..., :-1] + "bad")
    inputs, labels = _batch()
    distiller = kd.Distiller(
        teacher, student, [kd.Term(ChunkedTokenLoss("forward_kl"), output="logits")]
    )
    with pytest.raises(TypeError):
        distiller(inputs, target=labels)
    assert "forward" not in vars(student.lm_head) and "forward" not in vars(teacher.lm_head)
    assert student.lm_head(torch.zeros(2, D)).shape == (2, V)


def test_under_no_grad_the_forward_makes_no_gradients():
    h, w, b, ht, wt, bt, labels = _case()
    teacher = HeadInput(ht, wt, bt)
    with torch.no_grad(), _LargestTensor() as seen:
        value = chunked_token_loss(
            ForwardKL(), HeadInput(h, w, b), labels, teacher, chunk_size=4, recompute=False
        )
    expected = _dense(ForwardKL(), h, w, b, ht @ wt.T + bt, labels)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    assert ("mm", (V, D)) not in seen.shapes  # no weight gradient gᵀ·h was made
    with _LargestTensor() as seen:  # the check sees it when gradients are on
        chunked_token_loss(
            ForwardKL(), HeadInput(h, w, b), labels, teacher, chunk_size=4, recompute=False
        )
    assert ("mm", (V, D)) in seen.shapes


@pytest.mark.parametrize("k", [4, V])
def test_a_stored_top_k_teacher_matches_the_dense_top_k_loss(k):
    from kdistill.losses.topk import topk_distribution

    h, w, b, ht, wt, bt, labels = _case()
    stored = topk_distribution(ht @ wt.T + bt, k, temperature=2.0)
    for loss in divergences(2.0):
        expected = _dense(loss, h, w, b, stored, labels)  # token.py's top-k path on logits
        got = chunked_token_loss(loss, HeadInput(h, w, b), labels, stored, chunk_size=5)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12), loss
        for g_dense, g_chunk in zip(_grads(expected, [h, w, b]), _grads(got, [h, w, b])):
            torch.testing.assert_close(g_chunk, g_dense, rtol=1e-8, atol=1e-12)
    if k == V:  # every token kept: the full divergence
        full = chunked_token_loss(
            ForwardKL(temperature=2.0), HeadInput(h, w, b), labels, HeadInput(ht, wt, bt)
        )
        topk = chunked_token_loss(ForwardKL(temperature=2.0), HeadInput(h, w, b), labels, stored)
        assert topk.item() == pytest.approx(full.item(), rel=1e-9)


def test_training_with_chunked_terms_never_runs_either_head():
    """kd.fit, its checks before the first step included, never computes a chunked term's
    N×L×V logits: neither the student's nor the teacher's head runs."""
    torch.manual_seed(0)
    teacher, student = _TinyLM(DT), _TinyLM(D)
    batches = [_batch(seed) for seed in range(3)]
    distiller = kd.Distiller(
        teacher,
        student,
        [
            kd.Term(ChunkedTokenLoss("forward_kl", chunk_size=4), weight=0.5, output="logits"),
            kd.Term(ChunkedTokenCE(chunk_size=4), weight=0.5, output="logits"),
        ],
    )
    config = kd.TrainConfig(epochs=1, lr=1e-2, progress=False)
    kd.fit(distiller, batches, config)
    assert student.lm_head.calls == 0 and teacher.lm_head.calls == 0
    assert "forward" not in vars(student.lm_head) and "forward" not in vars(teacher.lm_head)


def test_the_tuning_grid_reaches_the_wrapped_loss():
    """tune.grid `beta` / `m.temperature` set the chunked term's inner JSD; a parameter no loss
    of the method takes is still refused when the recipe is read."""
    from kdistill.recipes.objective import build_objective
    from kdistill.recipes.schema import DistillSpec, term_parameters
    from kdistill.tasks import LanguageModelingTask

    assert {"beta", "temperature", "chunk_size"} <= set(term_parameters("chunked", {"loss": "jsd"}))
    assert "beta" not in term_parameters("chunked", {"loss": "forward_kl"})
    spec = DistillSpec(
        alpha=0.5,
        hard_loss="chunked_token_ce",
        methods={"m": [{"loss": "chunked", "params": {"loss": "jsd", "beta": 0.5}}]},
    )
    terms = build_objective(LanguageModelingTask(), spec, "m", {"beta": 0.9, "temperature": 2.0})
    inner = [t.loss.inner for t in terms if isinstance(t.loss, ChunkedTokenLoss)]
    jsd = [loss for loss in inner if isinstance(loss, GeneralizedJSD)]
    assert len(jsd) == 1 and jsd[0].beta == 0.9 and jsd[0].temperature == 2.0
