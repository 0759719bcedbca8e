"""Prompt → completion data (`kdistill.data.completions`), the completion task, and recipes that
train on generated completions (on-policy, sequence-level)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from test_text_data import fake_kjv_lines

from kdistill.data.completions import (
    PromptCompletions,
    encode_completions,
    sequences_from_parts,
    split_verse,
)
from kdistill.data.text import BOS_ID, EOS_ID, IGNORE_INDEX, train_bpe
from kdistill.errors import ConfigError, DataError
from kdistill.recipes import load_recipe
from kdistill.recipes.runner import Experiment
from kdistill.tasks import evaluate, get_task

VERSES = [
    "In the beginning God created the heaven and the earth.",
    "Jesus wept.",
    "And God said, Let there be light: and there was light.",
]


def test_a_verse_splits_into_its_first_and_second_half_by_words():
    assert split_verse(VERSES[0]) == ("In the beginning God created", "the heaven and the earth.")
    assert split_verse("Jesus wept.") == ("Jesus", "wept.")
    assert split_verse("a  b\tc") == ("a", "b c")  # ⌊3/2⌋ = 1 word of prompt
    with pytest.raises(ValueError, match="at least 2 words"):
        split_verse("Amen.")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(VERSES * 10, vocab_size=300)


def test_sequences_are_start_prompt_completion_eos_with_labels_on_the_completion(tokenizer):
    data, dropped = encode_completions(tokenizer, VERSES, max_length=64, name="t")
    assert dropped == 0 and len(data) == 3
    for row, verse in enumerate(VERSES):
        prompt, completion = split_verse(verse)
        n = int(data.prompt_lengths[row])
        ids = data.input_ids[row][data.attention_mask[row] == 1].tolist()
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert tokenizer.decode(ids[1:n]) == prompt
        assert tokenizer.decode(ids[n:-1]) == " " + completion
        labels = data.labels[row].tolist()
        assert labels[:n] == [IGNORE_INDEX] * n  # start token + prompt not counted
        assert labels[n : len(ids)] == ids[n:]  # completion + <eos> counted
        assert set(labels[len(ids) :]) <= {IGNORE_INDEX}  # right padding not counted
    assert data.texts[1] == ("Jesus", "wept.")
    # the metric's count: every completion token and each <eos>
    completions = sum(len(tokenizer.encode(" " + split_verse(v)[1]).ids) + 1 for v in VERSES)
    assert data.num_counted == completions


def test_too_long_verses_are_left_out_and_counted(tokenizer):
    def length(verse):  # start token + prompt + completion + <eos>
        prompt, completion = split_verse(verse)
        return 2 + len(tokenizer.encode(prompt).ids) + len(tokenizer.encode(" " + completion).ids)

    lengths = [length(v) for v in VERSES]
    limit = sorted(lengths)[1]  # the two shortest fit, the longest does not
    assert limit < max(lengths)
    data, dropped = encode_completions(tokenizer, VERSES, max_length=limit, name="t")
    assert dropped == 1 and len(data) == 2
    assert data.texts == [split_verse(v) for v, n in zip(VERSES, lengths) if n <= limit]
    data, _ = encode_completions(tokenizer, VERSES, max_length=64, name="t", start_id=EOS_ID)
    assert data.input_ids[:, 0].tolist() == [EOS_ID] * 3


def test_batches_are_trimmed_to_their_longest_sequence(tokenizer):
    data, _ = encode_completions(tokenizer, VERSES, max_length=64, name="t")
    inputs, labels = data.get_batch(torch.tensor([1]))
    assert inputs["input_ids"].shape[1] == int(data.attention_mask[1].sum())
    assert bool(inputs["attention_mask"].all()) and labels.shape == inputs["input_ids"].shape


def test_broken_layouts_are_refused():
    prompts = [torch.tensor([1, 5]), torch.tensor([1, 6, 7])]
    completions = [torch.tensor([8, 2]), torch.tensor([9, 9, 2])]
    ids, mask, labels = sequences_from_parts(prompts, completions)
    lengths, token_bytes = torch.tensor([2, 3]), torch.ones(10).long()
    PromptCompletions(ids, mask, labels, lengths, token_bytes)  # fine
    counted_prompt = labels.clone()
    counted_prompt[0, 1] = 5
    with pytest.raises(DataError, match="labels must be −100 on each prompt"):
        PromptCompletions(ids, mask, counted_prompt, lengths, token_bytes)
    left = mask.flip(1)
    with pytest.raises(DataError, match="right padding"):
        PromptCompletions(ids, left, labels, lengths, token_bytes)
    with pytest.raises(DataError, match="token ids must lie in"):
        PromptCompletions(ids, mask, labels, lengths, torch.ones(6).long())


def test_the_completion_task_scores_only_the_completions():
    # a model that puts all its mass on token 4: NLL 0 where the target is 4, huge elsewhere
    class Fours(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            logits = torch.full((*input_ids.shape, 10), -50.0)
            logits[..., 4] = 50.0
            return logits

    prompts = [torch.tensor([1, 7, 7, 7]), torch.tensor([1, 8])]
    completions = [torch.tensor([4, 4]), torch.tensor([4, 4, 4])]  # no <eos>: all 4s
    ids, mask, labels = sequences_from_parts(prompts, completions)
    data = PromptCompletions(ids, mask, labels, torch.tensor([4, 2]), torch.ones(10).long())
    from kdistill.data import BatchLoader

    metrics = evaluate(Fours(), BatchLoader(data, batch_size=2), get_task("completion"))
    assert metrics["nll"] == pytest.approx(0.0, abs=1e-6)  # the prompt's 7s and 8 never count
    assert metrics["next_token_accuracy"] == 1.0
    with pytest.raises(ValueError, match="not prompt → completion text"):
        get_task("completion").prepare(object())


# -- recipes -------------------------------------------------------------------------------------
RECIPE = """
name: completion-test
task: {task}
data:
  dataset: {dataset}
{data}
teacher: {{model: lm_teacher, kwargs: {{width: 16, n_layer: 1, n_head: 2}}}}
students: [{{name: s, model: lm_student, kwargs: {{width: 16}}}}]
cost: {{enabled: false}}
{extra}
"""


def recipe(tmp_path, data="", task="completion", dataset="kjv_completions", extra=""):
    path = tmp_path / "recipe.yaml"
    text = RECIPE.format(task=task, dataset=dataset, data=data, extra=extra)
    path.write_text(textwrap.dedent(text))
    return load_recipe(path)


METHODS = """
distill:
  teacher_cache: off
  methods:
    fkl: [{loss: forward_kl}]
    gkd: [{loss: forward_kl}]
    seqkd: [{loss: token_ce}]
  on_policy:
    gkd: {lmbda: 1.0, max_new_tokens: 6}
  sequence_level:
    seqkd: {max_new_tokens: 6}
"""


@pytest.mark.parametrize(
    ("task", "dataset", "extra", "fragment"),
    [
        ("completion", "kjv", "", "task: completion reads data.dataset kjv_completions"),
        ("classification", "kjv_completions", "", "completion sequences.*choose task completion"),
        (
            "language_modeling",
            "kjv_completions",
            "",
            "task: language_modeling reads data.dataset kjv, got kjv_completions",
        ),
        (
            "language_modeling",
            "kjv",
            METHODS.replace("  sequence_level:\n    seqkd: {max_new_tokens: 6}\n", ""),
            "they need prompt → completion data",
        ),
        (
            "completion",
            "kjv_completions",
            METHODS.replace("gkd: {lmbda", "gdk: {lmbda"),
            r"distill.on_policy: \['gdk'\] are not methods",
        ),
        (
            "completion",
            "kjv_completions",
            METHODS.replace("seqkd: {max_new", "gkd: {max_new"),
            "in both distill.on_policy and distill.sequence_level",
        ),
        ("completion", "kjv_completions", METHODS.replace("1.0,", "1.5,"), "lmbda"),
    ],
)
def test_bad_completion_recipes_fail_when_read(tmp_path, task, dataset, extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe(tmp_path, task=task, dataset=dataset, extra=extra)


def test_text_settings_of_the_other_text_dataset_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="block_size: not read by dataset kjv_completions"):
        recipe(tmp_path, "  text: {block_size: 64}")
    with pytest.raises(ConfigError, match="max_length: not read by dataset kjv"):
        recipe(tmp_path, "  text: {max_length: 64}", task="language_modeling", dataset="kjv")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kjv") / "kjv.txt"
    path.write_text("\n".join(fake_kjv_lines()) + "\n")
    return path


@pytest.mark.slow
def test_a_completion_recipe_runs_every_kind_of_method(tmp_path, text_file):
    data = (
        f"  text: {{vocab_size: 300, max_length: 24, text_file: {text_file}}}\n"
        "  train_limit: 32\n  test_limit: 16"
    )
    extra = (
        METHODS
        + "train: {epochs: 1, max_steps: 2, batch_size: 8, progress: false}\n"
        + "seeds: 1\n"
        + "teacher:\n  model: lm_teacher\n  kwargs: {width: 16, n_layer: 1, n_head: 2}\n"
        + "  train: {epochs: 1, max_steps: 2, batch_size: 8}\n"
    )
    path = tmp_path / "recipe.yaml"
    text = RECIPE.format(task="completion", dataset="kjv_completions", data=data, extra="")
    text = text.replace(
        "teacher: {model: lm_teacher, kwargs: {width: 16, n_layer: 1, n_head: 2}}\n", ""
    )
    path.write_text(text + extra)
    experiment = Experiment(load_recipe(path), tmp_path / "run", progress=False)
    summary = experiment.run()
    methods = sorted({record.method for record in summary.records})
    assert methods == ["alone", "fkl", "gkd", "seqkd", "teacher"]
    assert list((tmp_path / "run" / "teacher_sequences").glob("sequences-*.safetensors"))
    assert any("Sampled completions" in line for line in summary.sections)
    shares = [
        line
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"s/gkd/seed0"' in line
    ]
    assert shares and '"on_policy_share": 1.0' in shares[0]


def test_the_builtin_completion_recipe_compares_the_four_ways():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "kjv_completion.yaml"
    spec = load_recipe(path)
    assert (spec.task, spec.data.dataset, spec.seeds) == ("completion", "kjv_completions", 3)
    distill = spec.distill
    assert {name: c.lmbda for name, c in distill.on_policy.items()} == {
        "on_policy_0.5": 0.5,
        "on_policy_1": 1.0,
    }
    assert list(distill.sequence_level) == ["seq_kd"]
    assert "supervised_kd" in distill.methods and "supervised_kd" not in distill.on_policy
    # λ = 0 and λ > 0 use the same divergence, so only the data differs
    assert distill.methods["supervised_kd"] == distill.methods["on_policy_0.5"]


def test_completions_can_end_with_the_newline_an_lm_ends_a_verse_with(tokenizer):
    from kdistill.data.completions import end_token_id

    newline = end_token_id(tokenizer, "newline")
    assert tokenizer.decode([newline]) == "\n" and end_token_id(tokenizer, "eos") == EOS_ID
    data, _ = encode_completions(tokenizer, VERSES, max_length=64, name="t", end_id=newline)
    for row in range(len(data)):
        ids = data.input_ids[row][data.attention_mask[row] == 1]
        assert int(ids[-1]) == newline and int(data.labels[row, len(ids) - 1]) == newline
    assert data.end_id == newline and data.subset([0]).end_id == newline
    assert data.with_sequences([torch.tensor([5])] * 3, "x").end_id == newline
