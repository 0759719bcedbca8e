"""The language-modelling Task: NLL, perplexity, next-token accuracy and bits per byte against
hand computations with a model of known probabilities; global counts across batches and shards;
metric direction (`lower_is_better`); sampled continuations.

The reference values are computed in plain Python (math.log over explicit probabilities, token
lists walked position by position), independently of the tensor code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill.data import BatchLoader
from kdistill.data.text import EOS_ID, IGNORE_INDEX, pack_blocks, train_bpe
from kdistill.tasks import (
    better_of,
    evaluate,
    get_task,
    is_better,
    lower_is_better,
    sample_continuations,
)
from kdistill.tasks.language_modeling import NextTokenMetric

V = 8
# bytes per token id: ids 0-2 are <pad>, <bos>, <eos> (0 bytes); id t ≥ 3 spells t - 2 bytes
TOKEN_BYTES = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5], dtype=torch.int64)


def bigram_probabilities() -> list[list[float]]:
    """p(next | current) for each current token: a fixed, uneven table (rows sum to 1)."""
    rows = []
    for current in range(V):
        weights = [1.0 + ((current * 3 + nxt * 5) % 7) for nxt in range(V)]
        total = sum(weights)
        rows.append([w / total for w in weights])
    return rows


class Bigram(nn.Module):
    """A causal LM whose logits at position i are log p(· | token i): known probabilities.
    Returns a Hugging Face CausalLMOutput (a dict-like output) and records its mode."""

    def __init__(self, extra_rows: int = 0):
        super().__init__()
        table = torch.tensor(bigram_probabilities(), dtype=torch.float64).log()
        padding = torch.full((V, extra_rows), -30.0, dtype=torch.float64)
        self.register_buffer("table", torch.cat([table, padding], dim=1).float())
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, for devices and modes
        self.modes: list[bool] = []

    def forward(self, input_ids, attention_mask=None):
        from transformers.modeling_outputs import CausalLMOutput

        self.modes.append(self.training)
        return CausalLMOutput(logits=self.table[input_ids] + self.weight)


def hand_metrics(streams: list[list[int]]) -> dict[str, float]:
    """The four metrics walked by hand over token streams (each stream: one block's real
    tokens, in order; position i predicts token i + 1)."""
    probabilities = bigram_probabilities()
    nll = correct = count = spelled = 0.0
    for stream in streams:
        for current, nxt in zip(stream[:-1], stream[1:]):
            row = probabilities[current]
            nll += -math.log(row[nxt])
            correct += float(max(range(V), key=lambda t: (row[t], -t)) == nxt)
            count += 1
            spelled += max(nxt - 2, 0)
    return {
        "nll": nll / count,
        "perplexity": math.exp(nll / count),
        "next_token_accuracy": correct / count,
        "bits_per_byte": nll / math.log(2) / spelled,
    }


TOKENS = [3, 5, 7, 4, 4, 6, 2, 3, 7, 7, 5, 6, 4, 3, 2, 5, 6, 7, 3, 4]  # 20 tokens, 2 = <eos>


def blocks_of(tokens=TOKENS, block_size=6):
    return pack_blocks(torch.tensor(tokens), block_size, TOKEN_BYTES, name="hand")


def real_streams(blocks) -> list[list[int]]:
    return [
        [t for t, m in zip(ids, mask) if m]
        for ids, mask in zip(blocks.input_ids.tolist(), blocks.attention_mask.tolist())
    ]


def test_metrics_match_a_hand_computation_with_known_probabilities():
    blocks = blocks_of()  # 4 blocks of 6, the last one padded
    assert blocks.attention_mask[-1].tolist() == [1, 1, 1, 1, 1, 0]
    expected = hand_metrics(real_streams(blocks))
    loader = BatchLoader(blocks, batch_size=3, shuffle=False)
    got = evaluate(Bigram(), loader, "language_modeling")
    assert set(got) == {"nll", "perplexity", "next_token_accuracy", "bits_per_byte"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    # the whole token stream is each token but the first, once: the same as one long block
    whole = hand_metrics([TOKENS])
    for key, value in whole.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_the_mean_is_over_tokens_of_the_whole_set_not_a_mean_of_batch_means():
    blocks = blocks_of()
    metric = NextTokenMetric(TOKEN_BYTES)
    model = Bigram()
    per_batch = []
    for batch in BatchLoader(blocks, batch_size=3, shuffle=False):  # 15 and 4 counted tokens
        output = model(**batch.inputs)
        single = NextTokenMetric(TOKEN_BYTES)
        single.update(output, batch.target)
        per_batch.append(single.compute()["nll"])
        metric.update(output, batch.target)
    got = metric.compute()["nll"]
    assert got == pytest.approx(hand_metrics(real_streams(blocks))["nll"], rel=1e-6)
    assert abs(got - sum(per_batch) / len(per_batch)) > 1e-3  # the two really differ here


def test_two_shards_summed_equal_the_whole():
    blocks = blocks_of(TOKENS * 3)
    model = Bigram()
    whole, shards = NextTokenMetric(TOKEN_BYTES), [NextTokenMetric(TOKEN_BYTES) for _ in "ab"]
    for number, batch in enumerate(BatchLoader(blocks, batch_size=2, shuffle=False)):
        output = model(**batch.inputs)
        whole.update(output, batch.target)
        shards[number % 2].update(output, batch.target)  # rank r takes every 2nd batch
    summed = NextTokenMetric(TOKEN_BYTES)
    summed.sums = shards[0].sums + shards[1].sums  # what reduce() (all_reduce_sum) does
    assert summed.compute() == pytest.approx(whole.compute(), rel=1e-12)
    assert shards[0].compute() != pytest.approx(whole.compute())
    assert get_task("lm").new_metric(model, blocks).shardable


def test_padding_rows_of_the_head_are_allowed_and_too_few_logits_are_not():
    blocks = blocks_of()
    loader = BatchLoader(blocks, batch_size=4, shuffle=False)
    padded = evaluate(Bigram(extra_rows=8), loader, "lm")
    assert padded["nll"] == pytest.approx(hand_metrics(real_streams(blocks))["nll"], rel=1e-5)
    metric = NextTokenMetric(torch.zeros(12, dtype=torch.int64))  # a 12-token tokenizer
    batch = next(iter(loader))
    with pytest.raises(ValueError, match="gives 8 logits per position but the tokenizer has 12"):
        metric.update(Bigram()(**batch.inputs), batch.target)
    bad = batch.target.clone()
    bad[0, 2] = 9
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 8\) or be -100, found"):
        NextTokenMetric(TOKEN_BYTES).update(Bigram()(**batch.inputs), bad)
    with pytest.raises(ValueError, match="no counted token"):
        NextTokenMetric(TOKEN_BYTES).compute()


def test_metric_keeps_shifting_and_masking_apart():
    # blocks [3, 4, 5, 6] and [6, 7, 3, <pad>]: the pad's label is -100, not counted
    blocks = pack_blocks(torch.tensor([3, 4, 5, 6, 7, 3]), 4, TOKEN_BYTES)
    assert blocks.labels.tolist() == [[3, 4, 5, 6], [6, 7, 3, IGNORE_INDEX]]
    streams = real_streams(blocks)
    got = evaluate(Bigram(), BatchLoader(blocks, batch_size=1), "lm")
    assert got["nll"] == pytest.approx(hand_metrics(streams)["nll"], rel=1e-6)
    unshifted = []  # what an off-by-one (logits at i scored against label i) would give
    p = bigram_probabilities()
    for stream in streams:
        unshifted += [-math.log(p[t][t]) for t in stream]
    assert abs(got["nll"] - sum(unshifted) / len(unshifted)) > 1e-3


def test_the_task_describes_itself():
    task = get_task("lm")
    assert task.name == "language_modeling" and get_task("language_modeling").name == task.name
    assert task.metrics[0] == "nll" and task.default_hard_loss == "token_ce"
    assert task.labels["nll"] == "NLL"
    assert task.model_kwargs(blocks_of()) == {"vocab_size": V}
    assert list(task.outputs) == [None]


# -- metric direction ----------------------------------------------------------------------------
def test_lower_is_better_for_losses_higher_for_accuracies():
    lm = get_task("lm")
    assert is_better(lm, "nll", 3.9, 4.1) and not is_better(lm, "nll", 4.1, 3.9)
    assert is_better(lm, "perplexity", 50.0, 60.0) and is_better(lm, "bits_per_byte", 1.1, 1.2)
    assert is_better(lm, "next_token_accuracy", 0.4, 0.3)
    assert better_of(lm, "nll", 4.2, 4.07) == 4.07
    assert better_of(lm, "next_token_accuracy", 0.2, 0.3) == 0.3
    assert better_of(lm, "nll", 4.0, 4.0) == 4.0 and not is_better(lm, "nll", 4.0, 4.0)
    classification = get_task("classification")
    assert is_better(classification, "accuracy", 0.9, 0.8)
    assert not lower_is_better(get_task("multitask"), "miou")
    assert not is_better(lm, "nll", math.nan, 4.0) and is_better(lm, "nll", 4.0, math.nan)
    with pytest.raises(ValueError, match="task classification has no metric 'nll'"):
        is_better(classification, "nll", 1.0, 2.0)
    # a user's task written without lower_is_better gets the declared default (): every metric
    # is better when higher
    own = get_task("test_tasks:RegressionTask")
    assert own.lower_is_better == () and is_better(own, "neg_mae", -1.0, -2.0)


# -- sampling ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["and the lord spake unto moses saying, speak unto the children"] * 20, 300)


def tiny_gpt2(vocab_size: int = 300):
    from kdistill.models.lm import gpt2_lm

    torch.manual_seed(0)
    return gpt2_lm(vocab_size, n_layer=1, n_embd=16, n_head=2, n_positions=16)


def test_sampling_is_deterministic_by_seed_and_restores_the_mode(tokenizer):
    model = tiny_gpt2().train()
    prompts = ["and the lord", "speak unto"]
    first = sample_continuations(model, tokenizer, prompts, max_new_tokens=6, seed=3)
    assert model.training  # mode restored
    again = sample_continuations(model, tokenizer, prompts, max_new_tokens=6, seed=3)
    assert first == again and all(isinstance(text, str) for text in first)
    other = sample_continuations(model, tokenizer, prompts, max_new_tokens=6, seed=4)
    assert other != first
    # a prompt's continuation does not depend on the prompts around it
    alone = sample_continuations(model, tokenizer, prompts[1:], max_new_tokens=6, seed=3)
    assert alone == first[1:]
    # the context window is the model's (16 positions): longer generations keep the latest
    long = sample_continuations(model, tokenizer, prompts[:1], max_new_tokens=20, seed=3)
    assert len(tokenizer.encode(long[0]).ids) >= 1


class Scripted(nn.Module):
    """Puts all probability on a scripted next token: `script[k]` after k generated tokens."""

    def __init__(self, script, prompt_length):
        super().__init__()
        self.script, self.prompt_length = script, prompt_length
        self.weight = nn.Parameter(torch.zeros(1))
        self.modes: list[bool] = []

    def forward(self, input_ids, attention_mask=None):
        self.modes.append(self.training)
        generated = input_ids.shape[1] - self.prompt_length
        logits = torch.full((1, input_ids.shape[1], 300), -1e4)
        logits[0, -1, self.script[generated]] = 0.0
        return {"logits": logits}


def test_sampling_stops_at_eos_and_returns_only_the_new_text(tokenizer):
    prompt = "and the lord"
    prompt_length = 1 + len(tokenizer.encode(prompt).ids)  # <eos> + the prompt
    words = tokenizer.encode(" spake unto moses").ids
    model = Scripted([*words, EOS_ID, *words], prompt_length).train()
    got = sample_continuations(model, tokenizer, [prompt], max_new_tokens=40, temperature=0.7)
    assert got == [" spake unto moses"]
    assert len(model.modes) == len(words) + 1 and not any(model.modes)  # eval mode inside
    assert model.training
    capped = sample_continuations(model, tokenizer, [prompt], max_new_tokens=2)
    assert capped == [tokenizer.decode(words[:2])]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_continuations(model, tokenizer, [prompt], temperature=0.0)


def test_a_freshly_initialised_gpt2_is_near_uniform_over_its_vocabulary():
    # GPT-2's init (std 0.02) gives logits near 0: NLL ≈ ln V and perplexity ≈ V, bits per byte
    # = NLL / ln 2 / (bytes per counted token)
    from kdistill.models.lm import gpt2_lm

    torch.manual_seed(0)
    model = gpt2_lm(V, n_layer=1, n_embd=16, n_head=2, n_positions=8)
    blocks = blocks_of()
    got = evaluate(model, BatchLoader(blocks, batch_size=2), "lm")
    assert got["nll"] == pytest.approx(math.log(V), abs=0.05)
    assert got["perplexity"] == pytest.approx(V, rel=0.06)
    bytes_per_token = sum(max(t - 2, 0) for t in TOKENS[1:]) / (len(TOKENS) - 1)
    assert got["bits_per_byte"] == pytest.approx(got["nll"] / math.log(2) / bytes_per_token)
