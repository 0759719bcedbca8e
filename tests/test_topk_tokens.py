"""Top-k teacher distributions (`kdistill.losses.topk`) and their on-disk store for token
sequences (`kdistill.cache.tokens`): exactness at k = V, the bucketed divergence against a hand
computation, the rest mass, temperature handling, training from the store and its checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import kdistill as kd
from kdistill.data import BatchLoader
from kdistill.data.text import pack_blocks
from kdistill.distill.teacher.store import (
    TeacherCache,
    TokenTeacherCache,
    build_token_cache,
    offline_teacher_outputs,
)
from kdistill.engine.config import TrainConfig
from kdistill.errors import CacheError
from kdistill.losses import (
    TVD,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
)
from kdistill.losses.topk import TopKDistribution, bucket_log_probs, topk_distribution
from kdistill.models.lm import gpt2_lm

DIVERGENCES = [
    ForwardKL(),
    ReverseKL(),
    GeneralizedJSD(beta=0.3),
    SkewForwardKL(alpha=0.1),
    SkewReverseKL(alpha=0.2),
    TVD(),
]
VOCAB = 11


def _case(seed=0, n=3, length=6, vocab=VOCAB, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, length, vocab, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(n, length, vocab, generator=generator, dtype=dtype) * 3
    labels = torch.randint(0, vocab, (n, length), generator=generator)
    if n > 1 and length > 3:
        labels[0, 3] = -100  # position 2 of sample 0 is not counted
        labels[1, 1:] = -100  # sample 1 counts nothing
    return student, teacher, labels


# -- the loss side ---------------------------------------------------------------------------
@pytest.mark.parametrize("loss", DIVERGENCES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_k_equal_v_reproduces_the_dense_loss_value_and_gradient(loss, temperature):
    loss.temperature = temperature
    student, teacher, labels = _case()
    student.requires_grad_(True)
    dense = loss(student, teacher, labels)
    (dense_grad,) = torch.autograd.grad(dense, student)
    stored = topk_distribution(teacher, VOCAB, temperature)  # every token, in its own order
    got = loss(student, stored, labels)
    (got_grad,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_grad, dense_grad, rtol=1e-10, atol=1e-14)


def _hand_buckets(log_p, ids):
    """(k+1) bucket probabilities of one position by plain summation (float64)."""
    p = log_p.exp()
    top = p[ids]
    rest = p.sum() - top.sum()
    return torch.cat([top, rest.reshape(1)])


def _hand_value(loss, p_s, p_t):
    """The divergence of two (k+1)-bucket distributions, written out per formula."""
    if isinstance(loss, ForwardKL):
        return (p_t * (p_t / p_s).log()).sum()
    if isinstance(loss, ReverseKL):
        return (p_s * (p_s / p_t).log()).sum()
    if isinstance(loss, GeneralizedJSD):
        b = loss.beta
        m = b * p_t + (1 - b) * p_s
        return b * (p_t * (p_t / m).log()).sum() + (1 - b) * (p_s * (p_s / m).log()).sum()
    if isinstance(loss, SkewForwardKL):
        m = loss.alpha * p_t + (1 - loss.alpha) * p_s
        return (p_t * (p_t / m).log()).sum()
    if isinstance(loss, SkewReverseKL):
        m = loss.alpha * p_s + (1 - loss.alpha) * p_t
        return (p_s * (p_s / m).log()).sum()
    return 0.5 * (p_t - p_s).abs().sum()


@pytest.mark.parametrize("loss", DIVERGENCES, ids=lambda loss: type(loss).__name__)
def test_top_k_value_is_the_bucketed_divergence_computed_by_hand(loss):
    loss.temperature = 2.0
    k = 3
    student, teacher, labels = _case(seed=1)
    stored = topk_distribution(teacher, k, 2.0)
    got = loss(student, stored, labels)
    # by hand: positions counted with the shift, bucket probabilities by plain sums
    total, count = 0.0, 0
    for n in range(student.shape[0]):
        for i in range(student.shape[1] - 1):
            if labels[n, i + 1] == -100:
                continue
            log_t = torch.log_softmax(teacher[n, i] / 2.0, -1)
            log_s = torch.log_softmax(student[n, i] / 2.0, -1)
            ids = torch.argsort(log_t, descending=True)[:k]
            total += float(_hand_value(loss, _hand_buckets(log_s, ids), _hand_buckets(log_t, ids)))
            count += 1
    assert got.item() == pytest.approx(4.0 * total / count, rel=1e-10)
    # and it is below the full divergence (data-processing inequality)
    assert got.item() <= loss(student, teacher, labels).item() + 1e-12


def test_forward_kl_gap_is_the_rest_mass_times_the_tail_kl():
    # KL(p‖q) − KL(p_b‖q_b) = R_t · KL(p_t|tail ‖ p_s|tail): an independent identity
    student, teacher, labels = _case(seed=2)
    student, teacher, labels = student[:1, :2], teacher[:1, :2], labels[:1, :2]
    labels[:] = 0
    k = 4
    full = ForwardKL()(student, teacher, labels)
    bucketed = ForwardKL()(student, topk_distribution(teacher, k), labels)
    log_t, log_s = teacher[0, 0].log_softmax(-1), student[0, 0].log_softmax(-1)
    tail = torch.argsort(log_t, descending=True)[k:]
    p_tail = log_t[tail].exp() / log_t[tail].exp().sum()
    q_tail = log_s[tail].exp() / log_s[tail].exp().sum()
    expected = log_t[tail].exp().sum() * (p_tail * (p_tail / q_tail).log()).sum()
    assert (full - bucketed).item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("loss", DIVERGENCES[:5], ids=lambda loss: type(loss).__name__)
def test_top_k_gradient_passes_gradcheck(loss):
    # TVD is left out: |x| has a kink, where finite differences disagree with the subgradient
    student, teacher, labels = _case(seed=4, n=2, length=3, vocab=6)
    labels[:] = 1
    stored = topk_distribution(teacher, 2, temperature=1.5)
    loss.temperature = 1.5
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss(z, stored, labels), (student,))


def test_rest_mass_is_exact_where_one_minus_the_sum_fails():
    # logits [0, −60, …, −60] (V = 5), k = 1: rest = 4·e^−60 / (1 + 4·e^−60), ≈ 3.5e−26;
    # 1 − p_top rounds to 0 in float64, so log1p(−Σp) would give −inf
    logits = torch.tensor([[0.0, -60.0, -60.0, -60.0, -60.0]], dtype=torch.float64)
    stored = topk_distribution(logits, 1)
    expected = math.log(4) - 60 - math.log1p(4 * math.exp(-60))
    assert stored.rest_log_mass.item() == pytest.approx(expected, rel=1e-14)
    assert 1.0 - math.exp(stored.log_probs.item()) == 0.0  # the naive rest: nothing left
    # the student side too
    log_p = torch.log_softmax(logits, -1)
    rest = bucket_log_probs(log_p, torch.tensor([[0]]))[0, 1]
    assert rest.item() == pytest.approx(expected, rel=1e-14)


def test_k_equal_v_has_no_rest_and_no_nan_gradient():
    student, teacher, labels = _case(seed=3, dtype=torch.float32)
    stored = topk_distribution(teacher, VOCAB)
    assert torch.isinf(stored.rest_log_mass).all()
    student.requires_grad_(True)
    value = GeneralizedJSD()(student, stored, labels)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all() and torch.isfinite(value)


def test_temperature_mismatch_is_refused_below_k_equal_v():
    student, teacher, labels = _case()
    stored = topk_distribution(teacher, 4, temperature=1.0)
    with pytest.raises(ValueError, match=r"temperature 1 .*temperature 2.*rebuild.*topk"):
        ForwardKL(temperature=2.0)(student, stored, labels)


def test_temperature_is_corrected_exactly_at_k_equal_v():
    student, teacher, labels = _case()
    stored = topk_distribution(teacher, VOCAB, temperature=1.0)
    dense = ReverseKL(temperature=3.0)(student, teacher, labels)
    assert ReverseKL(temperature=3.0)(student, stored, labels).item() == pytest.approx(
        dense.item(), rel=1e-12
    )


def test_top_k_distribution_checks_its_fields():
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="rest_log_mass has shape"):
        TopKDistribution(ids, torch.zeros(2, 3), torch.zeros(3), 1.0, 5)
    with pytest.raises(ValueError, match="k = 3 .*vocab_size = 2"):
        TopKDistribution(ids, torch.zeros(2, 3), torch.zeros(2), 1.0, 2)
    student, teacher, labels = _case()
    stored = topk_distribution(teacher[:, :4], 2)
    with pytest.raises(ValueError, match="positions of shape"):
        ForwardKL()(student, stored, labels)
    with pytest.raises(ValueError, match="over 11 tokens"):
        ForwardKL()(student[..., :9], topk_distribution(teacher, 2), labels.clamp(max=8))


# -- the store -------------------------------------------------------------------------------
def _blocks(seed=0, tokens=150, block=8, vocab=VOCAB, name="toy"):
    generator = torch.Generator().manual_seed(seed)
    stream = torch.randint(3, vocab, (tokens,), generator=generator)
    return pack_blocks(stream, block, torch.ones(vocab, dtype=torch.int64), name=name)


def _lm(seed):
    torch.manual_seed(seed)
    return gpt2_lm(VOCAB, n_layer=1, n_embd=16, n_head=2, n_positions=16)


def _train(teacher, blocks, stored):
    """The student after two SGD steps of forward KL at T = 2, online or from `stored`."""
    config = TrainConfig(epochs=1, batch_size=4, lr=0.5, max_steps=2, optimizer="sgd")
    student = _lm(1)
    terms = [kd.Term(ForwardKL(temperature=2.0), output="logits")]
    source = teacher if stored is None else stored.stand_in()
    loader = BatchLoader(blocks, batch_size=4, shuffle=True, seed=3)
    outputs = offline_teacher_outputs(stored, loader)
    kd.fit(kd.Distiller(source, student, terms), loader, config, teacher_outputs=outputs)
    return student.state_dict()


def test_a_training_step_from_stored_distributions_equals_the_online_teacher_at_k_equal_v(
    tmp_path,
):
    blocks = _blocks()
    teacher = _lm(0)
    # stored at T = 1, used at T = 2: corrected exactly (k = V)
    cache = build_token_cache(teacher, blocks, tmp_path / "c", topk=VOCAB, dtype="float32")
    online, offline = _train(teacher, blocks, None), _train(teacher, blocks, cache)
    moved = max(float((online[n] - _lm(1).state_dict()[n]).abs().max()) for n in online)
    assert moved > 1e-3  # the steps did change the student
    for name, value in online.items():  # float32 storage: equal to float32 rounding
        torch.testing.assert_close(offline[name], value, rtol=1e-5, atol=1e-6)
    assert cache.bytes_per_token == VOCAB * (2 + 4) + 4  # uint16 ids, float32 values
    # the comparison can fail: top-2 at T = 2 trains another student
    top2 = build_token_cache(teacher, blocks, tmp_path / "k2", topk=2, temperature=2.0)
    differs = _train(teacher, blocks, top2)
    assert max(float((differs[n] - online[n]).abs().max()) for n in online) > 1e-4


def test_stored_top_k_matches_the_teacher_and_records_its_error(tmp_path):
    blocks = _blocks()
    teacher = _lm(0)
    cache = build_token_cache(teacher, blocks, tmp_path / "c", topk=3, temperature=1.5)
    inputs, _ = blocks.get_batch(torch.tensor([4, 1]))
    dist = cache.lookup(torch.tensor([4, 1]), inputs)[0]["logits"]
    with torch.no_grad():
        logits = teacher(**inputs).logits.float()
    expected = topk_distribution(logits, 3, 1.5)
    assert torch.equal(dist.ids, expected.ids)
    torch.testing.assert_close(dist.log_probs, expected.log_probs, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(dist.rest_log_mass, expected.rest_log_mass, rtol=1e-3, atol=2e-3)
    quality = cache.quality
    assert quality["positions"] > 0 and 0 < quality["mean_kl_full_stored"] < 1
    assert quality["max_kl_full_stored"] >= quality["mean_kl_full_stored"]
    assert cache.bytes_per_token == 3 * (2 + 2) + 2
    assert cache.manifest["id_dtype"] == "uint16"


def test_the_recorded_storage_error_matches_a_direct_computation(tmp_path):
    blocks = _blocks()
    teacher = _lm(0)
    k = 4
    cache = build_token_cache(
        teacher, blocks, tmp_path / "c", topk=k, dtype="float32", measure_positions=10**6
    )
    with torch.no_grad():
        logits = teacher(**blocks.get_batch(torch.arange(len(blocks)))[0]).logits.double()
    counted = torch.zeros_like(blocks.labels, dtype=torch.bool)
    counted[:, :-1] = blocks.labels[:, 1:] != -100
    kls = []
    for row in logits[counted]:  # one position at a time: p, its top k, the rest spread evenly
        p = torch.softmax(row, -1)
        top = torch.argsort(p, descending=True)[:k]
        q = torch.full_like(p, float(p.sum() - p[top].sum()) / (VOCAB - k))
        q[top] = p[top]
        kls.append(float((p * (p / q).log()).sum()))
    quality = cache.quality
    assert quality["positions"] == int(counted.sum())
    assert quality["mean_kl_full_stored"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert quality["max_kl_full_stored"] == pytest.approx(max(kls), rel=1e-4)


def test_stale_teacher_other_data_and_other_settings_are_named(tmp_path):
    blocks = _blocks()
    teacher = _lm(0)
    build_token_cache(teacher, blocks, tmp_path / "c", topk=3)
    changed = _lm(0)
    with torch.no_grad():
        changed.transformer.wte.weight[5, 0] += 1e-3
    other = _blocks(seed=1)
    with pytest.raises(CacheError) as error:
        TokenTeacherCache.open(
            tmp_path / "c", changed, other, topk=4, temperature=2.0, dtype="float32"
        )
    for part in ("teacher weights differ", "dataset differs", "top-k differs",
                 "temperature differs", "dtype differs"):  # fmt: skip
        assert part in str(error.value)
    TokenTeacherCache.open(tmp_path / "c", teacher, blocks, topk=3, temperature=1.0)


def test_a_batch_of_other_inputs_is_refused_at_lookup(tmp_path):
    blocks = _blocks()
    cache = build_token_cache(_lm(0), blocks, tmp_path / "c", topk=3)
    inputs, _ = blocks.get_batch(torch.tensor([2, 3]))
    with pytest.raises(CacheError, match="not the inputs"):
        cache.lookup(torch.tensor([3, 2]), inputs)  # another order


def test_an_interrupted_build_is_refused(tmp_path):
    blocks = _blocks()
    teacher = _lm(0)
    calls = {"n": 0}

    def fail_on_second_batch(module, args, kwargs, output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = teacher.register_forward_hook(fail_on_second_batch, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(teacher, blocks, tmp_path / "c", topk=3, batch_size=8)
    handle.remove()
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"] is False
    with pytest.raises(CacheError, match="incomplete"):
        TokenTeacherCache.open(tmp_path / "c")
    # a rebuild over it works, and a complete build can be truncated → refused
    build_token_cache(teacher, blocks, tmp_path / "c", topk=3, batch_size=8)
    path = tmp_path / "c" / "topk.log_probs.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CacheError, match="truncated|rows"):
        TokenTeacherCache.open(tmp_path / "c")


def test_the_two_cache_kinds_refuse_each_other(tmp_path):
    build_token_cache(_lm(0), _blocks(), tmp_path / "c", topk=2)
    with pytest.raises(CacheError, match="TokenTeacherCache.open"):
        TeacherCache.open(tmp_path / "c")


def test_a_loader_of_dict_batches_builds_the_same_store(tmp_path):
    blocks = _blocks()
    teacher = _lm(0)
    plain = build_token_cache(teacher, blocks, tmp_path / "a", topk=3, measure_positions=0)
    loader = torch.utils.data.DataLoader(blocks, batch_size=5, shuffle=True)
    other = build_token_cache(teacher, loader, tmp_path / "b", topk=3, measure_positions=0)
    rows = np.arange(len(blocks))
    assert torch.equal(plain.read(rows).ids, other.read(rows).ids)
    torch.testing.assert_close(plain.read(rows).log_probs, other.read(rows).log_probs)


# -- recipes ---------------------------------------------------------------------------------
LM_RECIPE = """
name: kjv-topk
task: {task}
data:
  dataset: kjv
  train_limit: 12
  test_limit: 4
  text: {{vocab_size: 300, block_size: 16, text_file: {text}}}
teacher:
  model: lm_teacher
  kwargs: {{width: 16, n_layer: 1, n_head: 2}}
  train: {{epochs: 1, max_steps: 2, batch_size: 4}}
students: [{{name: s, model: lm_student, kwargs: {{width: 16, n_head: 2}}}}]
train: {{epochs: 1, max_steps: 2, batch_size: 4}}
distill:
  teacher_cache: {cache}
  methods:
    forward_kl: [{{loss: forward_kl, params: {{temperature: {temperature}}}}}]
tune: {{enabled: false}}
cost: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def kjv_text(tmp_path_factory):
    from test_text_data import fake_kjv_lines

    path = tmp_path_factory.mktemp("kjv") / "kjv.txt"
    path.write_text("\n".join(fake_kjv_lines()) + "\n")
    return path


def _recipe(tmp_path, text, cache="{topk: 8, temperature: 2.0}", temperature=2.0, task=None):
    from kdistill.recipes import load_recipe

    path = tmp_path / "recipe.yaml"
    body = LM_RECIPE.format(
        task=task or "language_modeling", text=text, cache=cache, temperature=temperature
    )
    path.write_text(body)
    return load_recipe(path)


def test_a_recipe_trains_from_stored_top_k_distributions(tmp_path, kjv_text):
    from kdistill.recipes.runner import Experiment

    experiment = Experiment(_recipe(tmp_path, kjv_text), tmp_path / "run", progress=False)
    teacher, _ = experiment.prepare_teacher()
    cache = experiment.teacher_train_outputs
    assert isinstance(cache, TokenTeacherCache)
    assert (cache.topk, cache.temperature, cache.dtype) == (8, 2.0, "float16")
    terms = experiment.objective("forward_kl")
    spec = experiment.recipe.students[0]
    student, metrics, _ = experiment.train_student("s/fkl", spec, 0, terms, "forward_kl",
                                                   experiment.splits.val)  # fmt: skip
    assert math.isfinite(metrics["nll"])
    # a second run reuses it; a changed teacher makes it rebuild
    assert isinstance(experiment.prepare_teacher_outputs(teacher), TokenTeacherCache)
    with torch.no_grad():
        next(teacher.parameters()).view(-1)[0] += 1.0
    experiment.prepare_teacher_outputs(teacher)
    TokenTeacherCache.open(tmp_path / "run" / "teacher_cache", teacher)  # rebuilt for it


def test_a_recipe_refuses_stored_distributions_at_another_temperature(tmp_path, kjv_text):
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"top-8 .*temperature 2, but it uses temperature 1"):
        _recipe(tmp_path, kjv_text, temperature=1.0)
    _recipe(tmp_path, kjv_text, cache="{topk: 300}", temperature=1.0)  # k = V: exact


def test_a_loader_that_skips_samples_is_refused(tmp_path):
    """Every sample exactly once: a loader dropping its last partial batch leaves some blocks
    without stored distributions, and the build says so instead of storing zeros for them."""
    blocks = _blocks()
    assert len(blocks) % 4 != 0  # the last batch is partial
    loader = torch.utils.data.DataLoader(blocks, batch_size=4, drop_last=True)
    with pytest.raises(CacheError, match="samples no teacher output"):
        build_token_cache(_lm(0), loader, tmp_path / "c", topk=3)
