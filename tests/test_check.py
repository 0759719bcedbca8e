"""`kdistill check` (`kdistill.recipes.check`): every check passes on a correct pair, and each
one fails on a setup broken in the way it is meant to catch (a loss fed a plain softmax, a model
that ignores the attention mask, per-micro-batch normalisation, swapped JSD weights, an endpoint
accepted, a teacher with dropout in train mode, a noisy teacher, labels or vocabularies that do
not fit). Tiny random GPT-2s from `kdistill.models.lm`."""

from __future__ import annotations

import json
import sys
import textwrap
import types

import pytest
import torch
from test_text_data import fake_kjv_lines
from torch import nn

import kdistill as kd
from kdistill.cli import main
from kdistill.losses import token as token_module
from kdistill.losses.token import ForwardKL, GeneralizedJSD, kl, log_mixture
from kdistill.models.lm import gpt2_lm
from kdistill.recipes.check import check_pair, padded_batches

V = 48


def tiny(vocab: int = V, width: int = 16, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(width + vocab)
    return gpt2_lm(vocab, n_layer=1, n_embd=width, n_head=2, n_positions=24, dropout=dropout)


@pytest.fixture(scope="module")
def pair():
    return tiny(width=16).eval(), tiny(width=8)


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(3, V, (4, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()


def statuses(report, check):
    return {r.term: r.status for r in report.results if r.check == check}


def test_every_check_passes_on_a_correct_pair(pair, batch):
    teacher, student = pair
    student.train()
    terms = [kd.Term(ForwardKL(), output="logits"), GeneralizedJSD(beta=0.3, temperature=2.0)]
    report = kd.check_pair(teacher, student, batch, terms, standard=False)
    assert report.passed, report.table()
    ran = {r.check for r in report.results if r.status == "PASS"}
    assert ran >= {
        "identity_loss", "identity_gradient", "padding_side", "left_pad_pitfall",
        "micro_batches", "jsd_beta_0", "jsd_beta_1", "skew_alpha_0", "endpoints_refused",
        "teacher_eval", "teacher_deterministic", "labels_in_vocab", "vocab_sizes",
        "chunked_dense",
    }  # fmt: skip
    assert set(statuses(report, "identity_loss")) == {"forward_kl", "jsd(beta=0.3, T=2)"}
    endpoints = {r.term for r in report.results if r.check == "jsd_beta_0"}
    assert endpoints == {"GeneralizedJSD", "GeneralizedJSD(T=2)"}  # at each temperature
    # the student gets its mode and (no) gradients back
    assert student.training and all(p.grad is None for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert "| check | term | figure | tolerance | status |" in report.table()
    json.dumps(report.as_dict())


def test_the_standard_divergences_are_checked_too(pair, batch):
    report = check_pair(*pair, batch, checks=("identity",))
    assert report.passed, report.table()
    assert set(statuses(report, "identity_loss")) == {
        "forward_kl", "reverse_kl", "jsd(beta=0.5)", "skew_forward_kl(alpha=0.1)",
        "skew_reverse_kl(alpha=0.1)", "tvd",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown"):
        check_pair(*pair, batch, checks=("identity", "speed"))


class SoftmaxFedKL(ForwardKL):
    """The common bug: the student side given as probabilities, not log-probabilities."""

    def divergence(self, log_p_student, log_p_teacher):
        return kl(log_p_teacher, log_p_student.exp())


def test_identity_fails_for_a_loss_fed_a_plain_softmax(pair, batch):
    report = check_pair(*pair, batch, [SoftmaxFedKL()], standard=False, checks=("identity",))
    assert not report.passed
    line = report.result("identity_loss")
    assert line.status == "FAIL" and line.figure > 1 and "log_softmax" in line.fix
    assert report.result("identity_gradient").status == "FAIL"


class IgnoresMask(nn.Module):
    """A model that attends to every position whatever the attention mask says: left padding
    then leaks into the real positions."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        everything = torch.ones_like(input_ids)
        return self.inner(input_ids=input_ids, attention_mask=everything, position_ids=position_ids)


def test_padding_side_fails_for_models_that_ignore_the_attention_mask(pair, batch):
    teacher, student = (IgnoresMask(model) for model in pair)
    report = check_pair(teacher, student, batch, [ForwardKL()], standard=False, checks=("padding",))
    line = report.result("padding_side")
    assert line.status == "FAIL" and line.figure > 1e-3 and "attention_mask" in line.fix
    assert report.result("left_pad_pitfall").status == "PASS"


def test_the_padded_batches_hold_the_same_tokens_on_either_side(batch):
    (right, right_labels), (left, left_labels), (_, pitfall) = padded_batches(*batch)
    for i in range(4):
        r = right["input_ids"][i][right["attention_mask"][i] == 1]
        l_ = left["input_ids"][i][left["attention_mask"][i] == 1]
        assert torch.equal(r, l_) and torch.equal(r, batch[0]["input_ids"][i][: len(r)])
        counted = right_labels[i][1:] != -100, left_labels[i][1:] != -100
        assert int(counted[0].sum()) == int(counted[1].sum()) == len(r) - 1
        assert int((pitfall[i] != -100).sum()) == len(r)  # the first token's label counted
    # a prompt's labels (-100) stay -100 on both sides; the pitfall still counts a first token
    labels = batch[1].clone()
    labels[:, :3] = -100
    (_, right_labels), (_, left_labels), (_, pitfall) = padded_batches(batch[0], labels)
    assert (right_labels[:, :3] == -100).all() and (right_labels[:, 3] != -100).all()
    assert torch.equal((left_labels != -100).sum(1), (right_labels != -100).sum(1))
    assert torch.equal((pitfall != -100).sum(1), (right_labels != -100).sum(1) + 1)
    assert len({int(m.sum()) for m in right["attention_mask"]}) > 1  # unequal lengths
    assert torch.equal(left["position_ids"][0][-3:], torch.tensor([9, 10, 11]))


def test_prompt_masked_labels_pass_the_padding_checks(pair, batch):
    labels = batch[1].clone()
    labels[:, :4] = -100  # a prompt, not counted
    report = check_pair(*pair, (batch[0], labels), [ForwardKL()], standard=False,
                        checks=("padding", "micro_batches"))  # fmt: skip
    assert report.passed, report.table()


def test_left_pad_pitfall_fails_when_the_loss_does_not_refuse_padding(pair, batch, monkeypatch):
    monkeypatch.setattr(token_module, "check_real_positions", lambda *args: None)
    report = check_pair(*pair, batch, [ForwardKL()], standard=False, checks=("padding",))
    assert report.result("left_pad_pitfall").status == "FAIL"
    assert report.result("padding_side").status == "PASS"


def test_micro_batches_fail_with_per_micro_batch_normalisation(pair, batch, monkeypatch):
    def own_count(total, counted, num_counted):  # ignores the window's count
        return total / max(counted, 1)

    monkeypatch.setattr(token_module, "per_token_mean", own_count)
    report = check_pair(*pair, batch, [ForwardKL()], standard=False, checks=("micro_batches",))
    line = report.result("micro_batches")
    assert line.status == "FAIL" and line.figure > 1e-3 and "num_counted" in line.fix


class SwappedJSD(GeneralizedJSD):
    """The mixture weights swapped between the two KLs (a bug other tools shipped)."""

    def divergence(self, log_p_student, log_p_teacher):
        beta = self.beta
        log_m = log_mixture(log_p_teacher, log_p_student, beta)
        return (1 - beta) * kl(log_p_teacher, log_m) + beta * kl(log_p_student, log_m)


def test_endpoints_fail_for_swapped_jsd_weights(pair, batch):
    report = check_pair(*pair, batch, [SwappedJSD(0.5)], standard=False, checks=("endpoints",))
    assert report.result("jsd_beta_0").status == "FAIL"
    assert report.result("jsd_beta_1").status == "FAIL"
    assert report.result("jsd_beta_0").term == "SwappedJSD"
    assert report.result("skew_alpha_0").status == "PASS"


class Sharpened(nn.Module):
    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, **inputs):
        return {"logits": self.inner(**inputs).logits * self.scale}


def test_endpoints_pass_for_far_apart_distributions(pair, batch):
    # a teacher 300× sharper: reverse KL of tens of nats, p_s / p_t far beyond 1/β; the limits
    # are then taken at a raised temperature instead of failing a correct loss
    teacher = Sharpened(pair[0], 300.0).eval()
    report = check_pair(teacher, pair[1], batch, [ForwardKL()], standard=False,
                        checks=("endpoints",))  # fmt: skip
    assert report.passed, report.table()
    assert " at T=" in report.result("jsd_beta_1").detail


def test_endpoints_fail_when_alpha_1_is_accepted(pair, batch, monkeypatch):
    monkeypatch.setattr(token_module, "_check_skew", float)
    report = check_pair(*pair, batch, [ForwardKL()], standard=False, checks=("endpoints",))
    line = report.result("endpoints_refused")
    assert line.status == "FAIL" and line.figure == 2


def test_teacher_with_dropout_in_train_mode_fails(batch):
    teacher = tiny(width=16, dropout=0.1).train()
    report = check_pair(teacher, tiny(width=8), batch, standard=False, checks=("teacher",))
    line = report.result("teacher_eval")
    assert line.status == "FAIL" and line.figure > 0 and "teacher.eval()" in line.fix
    assert teacher.training  # its mode is given back
    assert report.result("teacher_deterministic").status == "PASS"  # eval mode, as it runs


class Noisy(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        logits = self.inner(**inputs).logits
        return {"logits": logits + 1e-3 * torch.randn_like(logits)}


def test_a_teacher_that_is_not_deterministic_fails(pair, batch):
    report = check_pair(Noisy(pair[0]).eval(), pair[1], batch, standard=False, checks=("teacher",))
    assert report.result("teacher_deterministic").status == "FAIL"
    assert report.result("teacher_eval").status == "PASS"


def test_labels_outside_the_vocabulary_fail(pair, batch):
    inputs, labels = batch
    labels = labels.clone()
    labels[1, 5] = V + 3
    report = check_pair(*pair, (inputs, labels), standard=False, checks=("teacher",))
    line = report.result("labels_in_vocab")
    assert line.status == "FAIL" and line.figure == 1 and f"below {V}" in line.fix


def test_mismatched_vocabularies_fail_and_padded_heads_pass_with_vocab_size(pair, batch):
    student = tiny(vocab=V + 8, width=8)
    report = check_pair(pair[0], student, batch, checks=("teacher", "identity"))
    line = report.result("vocab_sizes")
    assert line.status == "FAIL" and f"vocab_size={V}" in line.fix
    assert report.result("identity_loss", "forward_kl").status == "PASS"  # twin of the teacher
    fine = check_pair(pair[0], student, batch, vocab_size=V, checks=("teacher", "micro_batches"))
    assert fine.passed, fine.table()


def _chunked_module(scale: float) -> types.ModuleType:
    """A stand-in for `kdistill.losses.chunked` (its interface): the dense loss over two
    chunks of positions, times `scale` (1: right; else a wrong normalisation)."""
    module = types.ModuleType("kdistill.losses.chunked")
    module.HeadInput = lambda hidden, weight, bias=None: (hidden, weight, bias)

    def chunked_token_loss(loss, student, labels, teacher, *, chunk_size, attention_mask=None):
        hidden, weight, _ = student
        logits = torch.cat([hidden[:, :6] @ weight.T, hidden[:, 6:] @ weight.T], dim=1)
        return loss(logits, teacher, labels, attention_mask=attention_mask) * scale

    module.chunked_token_loss = chunked_token_loss
    return module


def test_chunked_equals_dense_when_the_chunked_loss_is_there(pair, batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "kdistill.losses.chunked", _chunked_module(1.0))
    good = check_pair(*pair, batch, [ForwardKL()], standard=False, checks=("chunked",))
    assert good.result("chunked_dense").status == "PASS", good.table()
    monkeypatch.setitem(sys.modules, "kdistill.losses.chunked", _chunked_module(1.01))
    bad = check_pair(*pair, batch, [ForwardKL()], standard=False, checks=("chunked",))
    line = bad.result("chunked_dense")
    assert line.status == "FAIL" and line.figure == pytest.approx(0.01 / 1.01, rel=1e-3)


def test_without_the_chunked_loss_the_check_is_skipped(pair, batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "kdistill.losses.chunked", None)  # import fails
    report = check_pair(*pair, batch, [ForwardKL()], standard=False, checks=("chunked",))
    assert report.result("chunked_dense").status == "SKIP" and report.passed


RECIPE = """
name: check-test
task: language_modeling
data:
  dataset: kjv
  text: {{vocab_size: 300, block_size: 16, text_file: {text}}}
teacher: {{model: lm_teacher, kwargs: {{width: 16, n_layer: 1, n_head: 2, n_positions: 16}}}}
students: [{{name: s, model: lm_student, kwargs: {{width: 8, n_layer: 1, n_positions: 16}}}}]
distill:
  methods:
    jsd: [{{loss: jsd, params: {{beta: 0.3}}}}]
tune: {{grid: {{jsd.beta: [0.3, 0.7]}}}}
cost: {{enabled: false}}
"""


def test_kdistill_check_on_a_recipe_and_on_hf_folders(tmp_path, capsys):
    text = tmp_path / "kjv.txt"
    text.write_text("\n".join(fake_kjv_lines()) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(text=text)))
    run_dir = tmp_path / "run"
    code = main(["check", str(recipe), "--run-dir", str(run_dir), "--checks", "identity,teacher",
                 "--json", "--length", "12"])  # fmt: skip
    found = json.loads(capsys.readouterr().out)
    assert code == 0 and found["passed"]
    terms = {r["term"] for r in found["results"] if r["check"] == "identity_loss"}
    assert {"jsd(beta=0.3)", "jsd(beta=0.7)", "forward_kl"} <= terms
    assert any("teacher untrained" in note for note in found["notes"])
    assert not run_dir.exists()  # read, never written

    tiny(width=16).save_pretrained(tmp_path / "teacher")
    tiny(width=8).save_pretrained(tmp_path / "student")
    tiny(vocab=V + 8, width=8).save_pretrained(tmp_path / "wide")
    spec = f"hf:{tmp_path}/"
    code = main(["check", "--teacher", spec + "teacher", "--student", spec + "student",
                 "--checks", "identity,teacher", "--length", "12"])  # fmt: skip
    table = capsys.readouterr().out
    assert code == 0 and "| identity_loss | tvd |" in table and "random token ids" in table
    code = main(["check", "--teacher", spec + "teacher", "--student", spec + "wide",
                 "--checks", "teacher", "--length", "12"])  # fmt: skip
    assert code == 1 and f"vocab_size={V}" in capsys.readouterr().out


def test_a_chunked_term_is_checked_through_the_divergence_it_wraps(pair, batch):
    """A ChunkedTokenLoss term is not skipped: its inner JSD(β = 0.9) gets the checks."""
    from kdistill.losses.chunked import ChunkedTokenLoss

    chunked = kd.Term(ChunkedTokenLoss("jsd", beta=0.9), output="logits")
    report = kd.check_pair(*pair, batch, [chunked], standard=False)
    assert report.passed, report.table()
    assert set(statuses(report, "identity_loss")) == {"jsd(beta=0.9)"}
