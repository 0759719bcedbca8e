"""Sampling and greedy decoding ignore the model's own generation settings (issue 27, item 1).

With transformers ≥ 5 ``generate`` fills every `GenerationConfig` field its caller leaves unset
from ``model.generation_config``. A student (or teacher) whose generation config truncates,
penalises, suppresses or blocks n-grams would then sample from another distribution than
softmax(z / T), silently. Each test below sets one field on ``model.generation_config`` and
checks what `generate_completions` draws against softmax(z / T), z computed by an independent
float64 forward of the model, by Pearson's chi-square test at α = 1e-6 (the false-alarm rate of
one test: a correct sampler fails it once in a million runs; the draws are seeded, so a given
run is repeatable), and greedy decoding against a plain argmax loop.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from kdistill.data.arrays import Batch
from kdistill.data.completions import sequences_from_parts
from kdistill.distill.onpolicy import OnPolicy, generate_completions
from kdistill.models.lm import gpt2_lm

V = 16
EOS = 2
PROMPT = torch.tensor([1, 3, 4, 5, 6, 7, 8, 9])  # holds the likely tokens (n-grams, penalties)
DRAWS = 4000
ALPHA = 1e-6
TEMPERATURE = 0.9


def spread_gpt2():
    """A tiny GPT-2 whose next-token distribution after `PROMPT` is far from uniform (a few
    likely tokens, a tail of unlikely ones), so every truncation below removes real mass."""
    torch.manual_seed(16)
    model = gpt2_lm(V, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10.0)  # tied head: logits scale with it
    return model.eval()


def next_token_probs(model, temperature: float) -> torch.Tensor:
    """softmax(z / T) of the token after `PROMPT`, by a float64 forward of a copy."""
    import copy

    double = copy.deepcopy(model).double()
    with torch.no_grad():
        z = double(input_ids=PROMPT[None]).logits[0, -1]
    return torch.softmax(z / temperature, dim=-1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, critical value at ALPHA): Pearson's test of `counts` against `probs`,
    tokens expected fewer than 5 times pooled into one cell."""
    n = float(counts.sum())
    expected = probs * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    if float(wanted[-1]) < 5:  # a pooled cell too small to test: merge it into the smallest
        observed, wanted = observed[:-1].clone(), wanted[:-1].clone()
        observed[wanted.argmin()] += counts[~big].sum()
        wanted[wanted.argmin()] += expected[~big].sum()
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    return statistic, float(chi2.isf(ALPHA, len(wanted) - 1))


def draws(model, temperature=TEMPERATURE, seed=11) -> torch.Tensor:
    got = generate_completions(
        model, [PROMPT] * DRAWS, max_new_tokens=1, temperature=temperature, seed=seed, eos_id=EOS
    )
    return torch.bincount(torch.cat(got), minlength=V).double()


def total_variation(counts, probs) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


FIELDS = {
    # truncation
    "min_p": {"min_p": 0.5},
    "typical_p": {"typical_p": 0.3},
    "epsilon_cutoff": {"epsilon_cutoff": 0.08},
    "eta_cutoff": {"eta_cutoff": 0.08},
    "top_k": {"top_k": 2},
    "top_p": {"top_p": 0.5},
    # penalties
    "repetition_penalty": {"repetition_penalty": 5.0},
    "sequence_bias": {"sequence_bias": [[[9], -20.0]]},
    "min_length": {"min_length": 20, "eos_token_id": EOS},
    # suppression
    "suppress_tokens": {"suppress_tokens": [9, 4]},
    "begin_suppress_tokens": {"begin_suppress_tokens": [9, 4]},
    "bad_words_ids": {"bad_words_ids": [[9], [4]]},
    # n-gram blocking
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
}


def test_the_test_has_power_the_model_is_spread():
    """The fields above change this model's distribution a lot (else the tests prove nothing):
    the two likeliest tokens are prompt tokens holding most, not all, of the mass, and tokens
    below 8 % hold a real share."""
    probs = next_token_probs(spread_gpt2(), TEMPERATURE)
    top = torch.argsort(probs, descending=True)
    assert {int(top[0]), int(top[1])} <= set(PROMPT.tolist()), probs
    assert {int(top[0]), int(top[1])} == {9, 4}, probs  # what suppression / bias remove
    assert 0.15 < float(probs[probs < 0.08].sum()) < 0.5, probs
    assert float(probs.max()) < 0.6, probs
    assert float(probs[EOS]) > 0.02, probs  # what min_length suppresses


@pytest.mark.parametrize("field", list(FIELDS))
def test_sampling_ignores_the_models_generation_config(field):
    model = spread_gpt2()
    probs = next_token_probs(model, TEMPERATURE)
    for name, value in FIELDS[field].items():
        setattr(model.generation_config, name, value)
    counts = draws(model)
    statistic, critical = chi_square(counts, probs)
    assert statistic < critical, (
        f"{field}: chi-square {statistic:.1f} ≥ {critical:.1f} (α = {ALPHA}), total variation "
        f"{total_variation(counts, probs):.3f} from softmax(z/T)"
    )


def test_the_chi_square_test_rejects_a_wrong_distribution():
    """The test can fail: draws at T = 0.9 tested against softmax(z / 1.3) are rejected."""
    model = spread_gpt2()
    statistic, critical = chi_square(draws(model), next_token_probs(model, 1.3))
    assert statistic > critical


def argmax_loop(model, prompt, steps):
    tokens = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=tokens[None]).logits[0, -1].argmax()
            tokens = torch.cat([tokens, token[None]])
            if int(token) == EOS:
                break
    return tokens[len(prompt) :].tolist()


@pytest.mark.parametrize(
    "settings",
    [
        {"no_repeat_ngram_size": 1},
        {"suppress_tokens": [9, 4]},
        {"repetition_penalty": 5.0, "min_length": 20},
        {"num_beams": 3},
    ],
    ids=["no_repeat_ngram_size", "suppress_tokens", "penalties", "num_beams"],
)
def test_greedy_decoding_is_the_argmax_whatever_the_generation_config(settings):
    model = spread_gpt2()
    prompts = [PROMPT, torch.tensor([1, 5, 5]), torch.tensor([1, 9])]
    expected = [argmax_loop(model, p, 8) for p in prompts]
    for name, value in settings.items():
        setattr(model.generation_config, name, value)
    got = generate_completions(model, prompts, max_new_tokens=8, greedy=True, eos_id=EOS)
    assert [g.tolist() for g in got] == expected


def test_a_generate_that_changes_the_distribution_is_refused():
    """A model whose ``generate`` brings its own logits processor (not from the generation
    config kdistill replaces): sampling would not be softmax(z / T), so it is refused."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, 4] = -float("inf")
            return scores

    model = spread_gpt2()
    original = model.generate

    def generate(*args, **kwargs):
        return original(*args, logits_processor=LogitsProcessorList([Ban()]), **kwargs)

    model.generate = generate
    with pytest.raises(ValueError, match="logits processor|changes the distribution"):
        generate_completions(model, [PROMPT] * 4, max_new_tokens=2, seed=1, eos_id=EOS)


def test_on_policy_samples_ignore_the_students_generation_config():
    model = spread_gpt2()
    model.generation_config.min_p = 0.5
    probs = next_token_probs(model, 1.0)
    policy = OnPolicy(1.0, temperature=1.0, max_new_tokens=1, eos_id=EOS)
    ids, mask, labels = sequences_from_parts([PROMPT] * DRAWS, [torch.tensor([3])] * DRAWS)
    batch, sampled = policy.apply(
        model, Batch({"input_ids": ids, "attention_mask": mask}, labels), 0
    )
    assert sampled
    tokens = batch.inputs["input_ids"][:, len(PROMPT)]
    statistic, critical = chi_square(torch.bincount(tokens, minlength=V).double(), probs)
    assert statistic < critical
