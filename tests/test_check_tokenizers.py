"""`kdistill check` compares the teacher's and the student's tokenizers (issue 27, item 3).

Two models of the same vocabulary size whose tokenizers map the same strings to other ids
(here: two words swapped, and pad / eos swapped) would distil garbage: every logit of the
teacher is compared with the student's logit of another token. All the other checks pass such a
pair (they see ids, not strings); the tokenizer check fails it, naming the differences.
"""

from __future__ import annotations

import json

import pytest
import torch

from kdistill.cli import main
from kdistill.recipes.check import check_models

WORDS = ["the", "lord", "and", "said", "unto", "him", "god", "earth", "heaven", "light"]


def save_pair_member(folder, vocab: dict[str, int], pad: str, eos: str, seed: int = 1) -> str:
    """A tiny GPT-2 with a word-level tokenizer of `vocab` saved in `folder`: its spec."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return f"hf:{folder}"


def vocabulary(swap_words: bool = False, swap_specials: bool = False) -> dict[str, int]:
    specials = ["<pad>", "<eos>", "<unk>"]
    if swap_specials:
        specials[0], specials[1] = specials[1], specials[0]
    words = list(WORDS)
    if swap_words:
        words[0], words[1] = words[1], words[0]
    return {token: i for i, token in enumerate(specials + words)}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    teacher = save_pair_member(root / "teacher", vocabulary(), "<pad>", "<eos>", seed=0)
    same = save_pair_member(root / "same", vocabulary(), "<pad>", "<eos>")
    other = save_pair_member(
        root / "other", vocabulary(swap_words=True, swap_specials=True), "<pad>", "<eos>"
    )
    return teacher, same, other


def test_two_tokenizers_of_the_same_size_that_differ_fail_the_check(specs):
    teacher, _, other = specs
    report = check_models(teacher, other, samples=2, length=8)
    result = report.result("tokenizers")
    assert result.failed, report.table()
    # 4 tokens change ids (the, lord, <pad>, <eos>); pad and eos are other ids
    assert result.figure == 6, result
    for name in ("'the'", "'lord'", "pad", "eos"):
        assert name in result.detail, result.detail
    assert not report.passed


def test_the_same_tokenizer_passes_and_an_unknown_one_is_skipped(specs, tmp_path):
    teacher, same, _ = specs
    report = check_models(teacher, same, samples=2, length=8)
    assert report.result("tokenizers").status == "PASS" and report.result("tokenizers").figure == 0
    assert report.passed, report.table()
    # a model folder without a tokenizer: nothing to compare, said so
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(same[3:]).save_pretrained(tmp_path / "bare")
    report = check_models(teacher, f"hf:{tmp_path / 'bare'}", samples=2, length=8)
    assert report.result("tokenizers").status == "SKIP"
    assert "student" in report.result("tokenizers").detail


def test_the_cli_fails_on_the_mismatch(specs, capsys):
    teacher, _, other = specs
    code = main(
        [
            "check",
            "--teacher",
            teacher,
            "--student",
            other,
            "--json",
            "--samples",
            "2",
            "--length",
            "8",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and not out["passed"]
    assert [r["status"] for r in out["results"] if r["check"] == "tokenizers"] == ["FAIL"]
