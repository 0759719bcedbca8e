"""On-policy (GKD λ) batches, completion sampling and sequence-level KD data (`kdistill.onpolicy`).

Expected sequences come from scripted models whose next token is a known function of the current
one (`ScriptedLM`), so every expected batch below is written out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdistill as kd
from kdistill.data import BatchLoader
from kdistill.data.arrays import Batch
from kdistill.data.completions import PromptCompletions, sequences_from_parts
from kdistill.data.text import EOS_ID, IGNORE_INDEX, PAD_ID
from kdistill.distill.onpolicy import (
    OnPolicy,
    batch_prompts,
    generate_completions,
    sequences_batch,
    teacher_sequences,
)
from kdistill.engine import TrainConfig, fit
from kdistill.engine.config import OnPolicyConfig
from kdistill.errors import ConfigError, DataError
from kdistill.losses.token import ForwardKL
from kdistill.models.lm import gpt2_lm

V = 8  # ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 … 7 words


class ScriptedLM(nn.Module):
    """Next token = NEXT[current token] with a margin of 60 nats (sampling is then as good as
    deterministic): 3→4→5→6→7→<eos>, <bos>→3, and <eos>→3 (so a row that is not stopped at its
    <eos> would go on). Records (training, grad enabled) of every call. A trainable bias makes
    it a student."""

    NEXT = {0: 3, 1: 3, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: EOS_ID}

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(V))
        self.calls: list[tuple[bool, bool]] = []
        self.dropout = nn.Dropout(0.5)  # a module whose behaviour depends on the mode

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((self.training, torch.is_grad_enabled()))
        table = torch.full((V, V), -30.0)
        for current, following in self.NEXT.items():
            table[current, following] = 30.0
        return table[input_ids] + self.bias


def batch_of(prompts, completions) -> Batch:
    input_ids, attention_mask, labels = sequences_from_parts(prompts, completions)
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask}, labels)


PROMPTS = [torch.tensor([1, 3]), torch.tensor([1, 4, 5])]
REFERENCE = [torch.tensor([3, 3, EOS_ID]), torch.tensor([7, EOS_ID])]


# -- sampling ------------------------------------------------------------------------------------
def test_completions_stop_at_eos_and_nothing_after_it_is_kept():
    model = ScriptedLM()
    got = generate_completions(model, PROMPTS, max_new_tokens=8, seed=0)
    # row 0: 3 → 4 5 6 7 <eos>; row 1: 5 → 6 7 <eos>, then it stays finished while row 0 runs
    assert [g.tolist() for g in got] == [[4, 5, 6, 7, EOS_ID], [6, 7, EOS_ID]]
    short = generate_completions(model, PROMPTS, max_new_tokens=2, seed=0)
    assert [g.tolist() for g in short] == [[4, 5], [6, 7]]  # cut by the budget: no <eos>


def test_the_on_policy_batch_masks_the_prompt_and_everything_after_eos():
    student = ScriptedLM()
    batch = batch_of(PROMPTS, REFERENCE)
    new, sampled = OnPolicy(lmbda=1.0, max_new_tokens=8).apply(student, batch, key=0)
    assert sampled
    # written out by hand: <bos> prompt | sampled completion incl. <eos> | padding
    assert new.inputs["input_ids"].tolist() == [
        [1, 3, 4, 5, 6, 7, EOS_ID],
        [1, 4, 5, 6, 7, EOS_ID, PAD_ID],
    ]
    assert new.inputs["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 1, 1, 0]]
    x = IGNORE_INDEX
    assert new.target.tolist() == [[x, x, 4, 5, 6, 7, EOS_ID], [x, x, x, 6, 7, EOS_ID, x]]


def test_sampled_batches_count_no_padding_and_no_prompt():
    torch.manual_seed(0)
    student = TinyLM(seed=1)
    data = random_completions(12, seed=0)
    inputs, labels = data.get_batch(torch.arange(12))
    new, _ = OnPolicy(lmbda=1.0, max_new_tokens=6).apply(student, Batch(inputs, labels), key=3)
    real = new.inputs["attention_mask"] == 1
    counted = new.target != IGNORE_INDEX
    assert not bool((counted & ~real).any())  # no counted padding
    for row, prompt in enumerate(batch_prompts(inputs, labels)):
        assert not bool(counted[row, : len(prompt)].any())  # prompt never counted
        assert torch.equal(new.inputs["input_ids"][row, : len(prompt)], prompt)
        # counted = every real token after the prompt
        assert torch.equal(counted[row, len(prompt) :], real[row, len(prompt) :])
    # the token losses accept it (they refuse a counted padding position)
    logits = torch.randn(*new.target.shape, V)
    value = ForwardKL()(
        logits, torch.randn_like(logits), new.target, attention_mask=new.inputs["attention_mask"]
    )
    assert math.isfinite(float(value))


def test_pure_sampling_follows_softmax_of_logits_over_temperature():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor([-1e9, -1e9, 0.0, 0.5, 1.0, -1e9, -1e9, -1e9]))

        def forward(self, input_ids, attention_mask=None):
            return self.logits.expand(*input_ids.shape, V)

    prompts = [torch.tensor([1])] * 6000
    for temperature in (1.0, 2.0):
        got = generate_completions(
            Fixed(), prompts, max_new_tokens=1, temperature=temperature, seed=5
        )
        counts = torch.bincount(torch.cat(got), minlength=V).double() / len(prompts)
        expected = torch.softmax(
            torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64) / temperature, 0
        )
        assert torch.allclose(counts[2:5], expected, atol=0.025), (temperature, counts)


def untied_gpt2():
    torch.manual_seed(3)
    return gpt2_lm(40, n_layer=2, n_embd=32, n_head=2, n_positions=64, tie_word_embeddings=False)


def test_hugging_face_generate_with_left_padding_matches_one_prompt_at_a_time():
    model = untied_gpt2()
    prompts = [torch.tensor([1, 7, 9, 11, 5]), torch.tensor([1, 20]), torch.tensor([1, 30, 6])]
    batched = generate_completions(model, prompts, max_new_tokens=8, greedy=True)
    alone = [generate_completions(model, [p], max_new_tokens=8, greedy=True)[0] for p in prompts]
    loop = generate_completions(model, prompts, max_new_tokens=8, greedy=True, use_generate=False)
    assert (
        [b.tolist() for b in batched] == [a.tolist() for a in alone] == [x.tolist() for x in loop]
    )
    assert len({tuple(b.tolist()) for b in batched}) == 3  # not a degenerate model


def test_hugging_face_sampling_is_pure_and_seeded(monkeypatch):
    model = untied_gpt2()
    seen = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["generation_config"])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    model.train()
    before = torch.get_rng_state()
    a = generate_completions(model, PROMPTS, max_new_tokens=6, temperature=0.7, seed=4)
    b = generate_completions(model, PROMPTS, max_new_tokens=6, temperature=0.7, seed=4)
    c = generate_completions(model, PROMPTS, max_new_tokens=6, temperature=0.7, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is not consumed
    assert [x.tolist() for x in a] == [x.tolist() for x in b] != [x.tolist() for x in c]
    config = seen[0]
    assert (config.do_sample, config.top_k, config.top_p, config.temperature) == (
        True,
        0,
        1.0,
        0.7,
    )
    assert model.training  # its mode is restored


def test_prompts_plus_budget_beyond_the_positions_fail_clearly():
    model = untied_gpt2()  # 64 positions
    with pytest.raises(ValueError, match=r"exceeds the model's 64 positions"):
        generate_completions(model, [torch.ones(60, dtype=torch.long)], max_new_tokens=8)


def test_prompts_are_read_from_labels_and_bad_batches_are_refused():
    batch = batch_of(PROMPTS, REFERENCE)
    assert [p.tolist() for p in batch_prompts(batch.inputs, batch.target)] == [[1, 3], [1, 4, 5]]
    labels = batch.target.clone()
    labels[1] = IGNORE_INDEX
    with pytest.raises(DataError, match="row 1 of the batch has no counted label"):
        batch_prompts(batch.inputs, labels)
    left = {"input_ids": batch.inputs["input_ids"], "attention_mask": torch.ones(2, 5).long()}
    left["attention_mask"][0, 0] = 0
    with pytest.raises(DataError, match="row 0's prompt holds padding"):
        batch_prompts(left, batch.target)
    with pytest.raises(DataError, match="also has"):
        batch_prompts({**batch.inputs, "position_ids": batch.inputs["input_ids"]}, batch.target)


# -- the coin ------------------------------------------------------------------------------------
class Refuses(nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("λ = 0 must never sample")


def test_lambda_zero_never_samples_and_one_always_does():
    batch = batch_of(PROMPTS, REFERENCE)
    never = OnPolicy(lmbda=0.0)
    for key in range(300):
        same, sampled = never.apply(Refuses(), batch, key)
        assert same is batch and not sampled
    always = OnPolicy(lmbda=1.0)
    assert all(always.draw(key)[0] for key in range(300))
    half = sum(OnPolicy(lmbda=0.5).draw(key)[0] for key in range(2000)) / 2000
    assert abs(half - 0.5) < 0.05


def test_draws_are_a_function_of_seed_and_key_only():
    a, b = OnPolicy(0.5, seed=1), OnPolicy(0.5, seed=1)
    torch.manual_seed(0)
    first = [a.draw(k) for k in range(50)]
    torch.manual_seed(123)  # the global RNG does not matter
    assert first == [b.draw(k) for k in range(50)]
    assert first != [OnPolicy(0.5, seed=2).draw(k) for k in range(50)]
    assert len({seed for _, seed in first}) == 50  # a sampling seed per batch


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lmbda": 1.5}, "lmbda must lie in"),
        ({"lmbda": 0.5, "temperature": 0.0}, "temperature must be > 0"),
        ({"lmbda": 0.5, "max_new_tokens": 0}, "max_new_tokens must be"),
    ],
)
def test_bad_settings_fail_clearly(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        OnPolicy(**kwargs)


# -- in kd.fit -----------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """Per-position (trivially causal) LM: embedding → linear; records the modes it runs in."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, 16)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(16, V)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.head(self.dropout(self.embed(input_ids)))


def random_completions(n: int, seed: int) -> PromptCompletions:
    generator = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(n):
        p = int(torch.randint(1, 4, (), generator=generator))
        c = int(torch.randint(1, 5, (), generator=generator))
        prompts.append(
            torch.cat([torch.tensor([1]), torch.randint(3, V, (p,), generator=generator)])
        )
        completions.append(
            torch.cat([torch.randint(3, V, (c,), generator=generator), torch.tensor([2])])
        )
    input_ids, attention_mask, labels = sequences_from_parts(prompts, completions)
    lengths = torch.tensor([len(p) for p in prompts])
    return PromptCompletions(input_ids, attention_mask, labels, lengths, torch.ones(V).long())


def on_policy_fit(tmp_path=None, epochs=2, resume=False, lmbda=0.5, student=None, teacher=None):
    student = student or TinyLM(seed=1)
    teacher = teacher or TinyLM(seed=2)
    distiller = kd.Distiller(teacher, student, [kd.Term(ForwardKL())])
    config = TrainConfig(
        epochs=epochs,
        batch_size=4,
        lr=0.05,
        schedule="constant",
        progress=False,
        on_policy=OnPolicyConfig(lmbda=lmbda, max_new_tokens=4, seed=7),
    )
    loader = BatchLoader(random_completions(16, seed=0), batch_size=4, shuffle=True, seed=0)
    result = fit(distiller, loader, config, checkpoint_dir=tmp_path, resume=resume)
    return student, teacher, result


def test_teacher_scores_in_eval_mode_and_the_student_samples_in_eval_without_gradients():
    student, teacher, result = on_policy_fit(epochs=1, lmbda=1.0)
    assert result.final["on_policy_share"] == 1.0
    assert teacher.calls and all(not training for training, _ in teacher.calls)
    sampling = [call for call in student.calls if not call[1]]
    training = [call for call in student.calls if call[1]]
    assert sampling and all(not mode for mode, _ in sampling)  # eval, no grad
    assert training and all(mode for mode, _ in training)  # back in train mode


def test_a_resumed_on_policy_run_draws_the_same_batches(tmp_path):
    whole, _, result = on_policy_fit(epochs=2)
    shares = [record["on_policy_share"] for record in result.history]
    assert 0 < sum(shares) < 2  # λ = 0.5: some batches sampled, some not
    on_policy_fit(tmp_path, epochs=1)
    resumed, _, _ = on_policy_fit(tmp_path, epochs=2, resume=True)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_on_policy_refuses_stored_teacher_outputs():
    class Stored:
        def lookup(self, index, inputs):
            raise AssertionError("not reached")

    distiller = kd.Distiller(TinyLM(2), TinyLM(1), [kd.Term(ForwardKL())])
    config = TrainConfig(
        epochs=1, batch_size=4, progress=False, on_policy=OnPolicyConfig(lmbda=0.5)
    )
    loader = BatchLoader(random_completions(8, seed=0), batch_size=4)
    with pytest.raises(ConfigError, match="teacher_cache: off"):
        fit(distiller, loader, config, teacher_outputs=Stored())


# -- sequence-level KD ---------------------------------------------------------------------------
def scripted_data() -> PromptCompletions:
    input_ids, attention_mask, labels = sequences_from_parts(PROMPTS, REFERENCE)
    return PromptCompletions(
        input_ids, attention_mask, labels, torch.tensor([2, 3]), torch.ones(V).long()
    )


def test_teacher_sequences_are_generated_once_reused_and_regenerated_on_change(tmp_path):
    teacher, data = ScriptedLM(), scripted_data()
    made, status = teacher_sequences(teacher, data, tmp_path, max_new_tokens=8)
    assert status.startswith("generated") and teacher.calls
    x = IGNORE_INDEX
    assert made.labels.tolist() == [[x, x, 4, 5, 6, 7, EOS_ID], [x, x, x, 6, 7, EOS_ID, x]]
    assert torch.equal(made.prompt_lengths, data.prompt_lengths)
    teacher.calls.clear()
    again, status = teacher_sequences(teacher, data, tmp_path, max_new_tokens=8)
    assert status.startswith("reused") and not teacher.calls
    assert torch.equal(again.input_ids, made.input_ids)
    with torch.no_grad():
        teacher.bias[0] += 1.0  # other weights: another digest
    _, status = teacher_sequences(teacher, data, tmp_path, max_new_tokens=8)
    assert status.startswith("generated") and teacher.calls
    _, status = teacher_sequences(teacher, data, tmp_path, max_new_tokens=3)
    assert status.startswith("generated")  # other settings
    _, status = teacher_sequences(teacher, data.subset([1]), tmp_path, max_new_tokens=8)
    assert status.startswith("generated")  # other data
    for path in tmp_path.glob("*.safetensors"):  # a damaged file is regenerated, not read
        path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    _, status = teacher_sequences(teacher, data, tmp_path, max_new_tokens=8)
    assert status.startswith("generated")


def test_sequences_batch_is_right_padded():
    batch = sequences_batch(
        PROMPTS, [torch.tensor([EOS_ID]), torch.tensor([], dtype=torch.long)], None
    )
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch.target.tolist() == [[-100, -100, EOS_ID], [-100, -100, -100]]


def test_sampling_and_teacher_sequences_stop_at_the_data_end_token(tmp_path):
    # end token 6 instead of <eos>: row 0 (… 3) gives 4 5 6, row 1 (… 5) gives 6
    got = generate_completions(ScriptedLM(), PROMPTS, max_new_tokens=8, eos_id=6)
    assert [g.tolist() for g in got] == [[4, 5, 6], [6]]
    new, _ = OnPolicy(lmbda=1.0, max_new_tokens=8, eos_id=6).apply(
        ScriptedLM(), batch_of(PROMPTS, REFERENCE), key=0
    )
    x = IGNORE_INDEX
    assert new.target.tolist() == [[x, x, 4, 5, 6], [x, x, x, 6, x]]
    data = scripted_data()
    data.end_id = 6
    made, _ = teacher_sequences(ScriptedLM(), data, tmp_path, max_new_tokens=8)
    assert made.labels.tolist() == [[x, x, 4, 5, 6], [x, x, x, 6, x]]
