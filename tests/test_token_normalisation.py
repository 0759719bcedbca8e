"""One-big-batch normalisation of token losses: gradient accumulation and DDP ranks give the value
and the gradient of the whole batch, however unequal the micro-batches' counted tokens.

The reference is always the same batch run in one piece (float64, so agreement is to ~1e-15);
the micro-batches are built so that their counted-token counts differ a lot (one half is mostly
padding), which is where per-micro-batch normalisation is wrong — the tests check that too, so
they cannot pass by accident.
"""

from __future__ import annotations

import pytest
import torch
from test_distributed import run_worker_both_ways  # tests/ is on sys.path (prepend mode)
from test_engine import (  # noqa: F401  (data: a fixture)
    assert_bitwise_equal,
    data,
    interrupted_then_resumed_run,
    uninterrupted_run,
)
from torch import nn

from kdistill import losses as L
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.engine import loop as engine_loop
from kdistill.engine.preflight import check_before_training
from kdistill.errors import ConfigError
from kdistill.losses.base import STUDENT, DistillLoss

VOCAB, LENGTH = 11, 6
IGNORE = -100


class TinyLM(nn.Module):
    """A causal toy LM: position i sees the running mean of the embeddings of tokens ≤ i."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        h = torch.tanh(self.mix(h.cumsum(dim=1) / steps))
        return {"logits": self.head(h)}


def make_distiller(seed: int = 0) -> Distiller:
    torch.manual_seed(seed)
    teacher, student = TinyLM(6).double(), TinyLM(4).double()
    return Distiller(
        teacher,
        student,
        [
            Term(L.ForwardKL(temperature=2.0), output="logits"),
            Term(L.GeneralizedJSD(beta=0.3), 0.5, output="logits"),
            Term(L.TokenCE(), 0.5, output="logits"),
            Term(L.HiddenMSE(), 0.3, student="mix", teacher="mix"),  # 4 → 6 linear connector
            Term(L.LogitMSE(), 0.1, output="logits"),  # not a token loss: divided by k
        ],
    )


def batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences of the given lengths: input_ids, attention_mask, labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), LENGTH), generator=g)
    mask = torch.zeros(len(lengths), LENGTH, dtype=torch.long)
    for n, length in enumerate(lengths):
        mask[n, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


# one half mostly padding, the other full: counted tokens 1+0+2+1 = 4 vs 4·5 = 20 (shifted)
SHORT = batch([2, 1, 3, 2], seed=1)
LONG = batch([6, 6, 6, 6], seed=2)


def join(*parts: dict) -> dict:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


WHOLE = join(SHORT, LONG)


def inputs_of(b: dict) -> dict:
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def student_grads(distiller: Distiller) -> dict[str, torch.Tensor]:
    named = {
        **dict(distiller.student.named_parameters()),
        **dict(distiller.connectors.named_parameters(prefix="connectors")),
    }
    return {name: p.grad.detach().clone() for name, p in named.items()}


def built_distiller() -> Distiller:
    distiller = make_distiller()
    distiller.build(inputs_of(WHOLE))
    return distiller


def test_the_micro_batches_count_very_different_numbers_of_tokens():
    distiller = make_distiller()
    short = distiller.count_tokens(SHORT["labels"], inputs_of(SHORT))
    long = distiller.count_tokens(LONG["labels"], inputs_of(LONG))
    assert short == {"forward_kl": 4, "jsd": 4, "token_ce": 4, "hidden_mse": 8}
    assert long == {"forward_kl": 20, "jsd": 20, "token_ce": 20, "hidden_mse": 24}


def test_two_micro_batches_give_the_loss_and_gradients_of_the_whole_batch():
    whole, split = built_distiller(), built_distiller()
    out = whole(inputs_of(WHOLE), target=WHOLE["labels"])
    out.loss.backward()

    counts = {}
    for half in (SHORT, LONG):
        for name, count in split.count_tokens(half["labels"], inputs_of(half)).items():
            counts[name] = counts.get(name, 0) + count
    total, parts = 0.0, {}
    for half in (SHORT, LONG):
        piece = split(inputs_of(half), target=half["labels"], micro_batches=2, token_counts=counts)
        piece.loss.backward()
        total += piece.loss.item()
        for name, value in piece.parts.items():
            parts[name] = parts.get(name, 0.0) + value
    assert total == pytest.approx(out.loss.item(), rel=1e-12)
    for name, value in out.parts.items():
        assert parts[name] == pytest.approx(value, rel=1e-12), name
    expected, got = student_grads(whole), student_grads(split)
    assert set(got) == set(expected) and any("connectors" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-12, rtol=1e-10, msg=name)


def test_per_micro_batch_normalisation_would_differ():
    """Without the window's counts each half is averaged over its own tokens: the test above
    would then fail (the halves hold 4 and 20 counted tokens)."""
    whole, split = built_distiller(), built_distiller()
    whole(inputs_of(WHOLE), target=WHOLE["labels"]).loss.backward()
    for half in (SHORT, LONG):
        split(inputs_of(half), target=half["labels"], micro_batches=2).loss.backward()
    expected, got = student_grads(whole), student_grads(split)
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) > 1e-3


def sgd(**overrides) -> TrainConfig:
    values = dict(
        epochs=1, optimizer="sgd", momentum=0.0, lr=1.0, schedule="constant", progress=False
    )
    values.update(overrides)
    return TrainConfig(**values)


def trained(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {
        **{k: v.detach().clone() for k, v in distiller.student.state_dict().items()},
        **{f"c.{k}": v.detach().clone() for k, v in distiller.connectors.state_dict().items()},
    }


def test_fit_with_accumulate_steps_2_takes_the_whole_batch_step():
    """SGD with lr 1: the weights after one step differ by the gradient, so equal weights are
    equal gradients. The logged loss of the step is the whole batch's."""
    whole, split = built_distiller(), built_distiller()
    expected_loss = built_distiller()(inputs_of(WHOLE), target=WHOLE["labels"]).loss.item()
    one = fit(whole, [WHOLE], sgd())
    two = fit(split, [SHORT, LONG], sgd(accumulate_steps=2))
    a, b = trained(whole), trained(split)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-12, rtol=1e-10, msg=name)
    assert one.final["train_loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert two.final["train_loss"] == pytest.approx(expected_loss, rel=1e-12)
    for name, value in one.final["train_parts"].items():
        assert two.final["train_parts"][name] == pytest.approx(value, rel=1e-12)


def test_the_schedule_counts_optimiser_steps_and_the_last_window_may_be_short(monkeypatch):
    """3 batches, k = 2: windows [0, 1] and [2] — 2 optimiser steps, so a 1-epoch cosine ends at
    lr 0 (laid out over 3 steps it would end at 0.5·(1 + cos(2π/3)) = 0.25)."""
    steps = []
    optimizer_step = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return optimizer_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    result = fit(
        built_distiller(), [SHORT, LONG, SHORT], sgd(schedule="cosine", accumulate_steps=2)
    )
    assert len(steps) == 2
    assert result.final["lr"] == pytest.approx(0.0, abs=1e-15)


# the skipped first window steps the schedule before any optimiser step (as a skipped batch does)
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_a_non_finite_micro_batch_skips_its_whole_window():
    """Windows [A, B*] and [C, D] with B* non-finite: the first window's step is dropped whole
    (A's gradient too), so the weights are those of training on [C, D] alone."""
    poisoned = [False]

    class Probe(DistillLoss):
        needs = (STUDENT,)

        def forward(self, logits):
            value = logits.pow(2).mean() * 0.0
            return value * float("nan") if poisoned[0] else value

    def with_probe(distiller):
        distiller.terms.append(Term(Probe(), output="logits", name="probe"))
        distiller.term_names.append("probe")
        distiller.losses.append(distiller.terms[-1].loss)
        return distiller

    class Marking(list):
        """Batches; the second is poisoned while it is being used."""

        def __iter__(self):
            for number, item in enumerate(super().__iter__()):
                poisoned[0] = number == 1
                yield item
            poisoned[0] = False

    skipping, reference = with_probe(built_distiller()), with_probe(built_distiller())
    result = fit(
        skipping,
        Marking([SHORT, LONG, LONG, SHORT]),
        sgd(accumulate_steps=2, on_nonfinite="skip"),
    )
    fit(reference, [LONG, SHORT], sgd(accumulate_steps=2))
    assert result.skipped_batches == 2
    a, b = trained(reference), trained(skipping)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-12, rtol=1e-10, msg=name)


def test_mid_epoch_checkpoints_fall_on_window_boundaries(monkeypatch, tmp_path):
    class Restartable(list):
        def iter_from(self, step):
            return iter(self[step:])

    saved = []

    def recording_save(directory, distiller, optimizer, scheduler, progress, *rest):
        saved.append(progress.step)

    monkeypatch.setattr(engine_loop, "_save", recording_save)
    fit(
        built_distiller(),
        Restartable([SHORT, LONG, SHORT, LONG, SHORT]),
        sgd(accumulate_steps=2, checkpoint_every_steps=1),
        checkpoint_dir=tmp_path,
    )
    assert saved == [2, 4, 0]  # after windows 1 and 2, then the epoch end (step reset to 0)


def test_resume_inside_an_accumulation_window_is_bit_exact(tmp_path, data):  # noqa: F811
    """8 batches per epoch, k = 3: windows [0-2], [3-5], [6-7]; a checkpoint after every
    optimiser step; Ctrl-C before batch 5 of epoch 1 (inside window 2): the resume restarts at
    the window's first batch (3) and ends bit for bit where the uninterrupted run does."""
    train, _ = data
    expected, full = uninterrupted_run(
        tmp_path, train, checkpoint_every_steps=1, accumulate_steps=3
    )
    got, _, saved = interrupted_then_resumed_run(
        tmp_path, train, stop_at=(1, 5), checkpoint_every_steps=1, accumulate_steps=3
    )
    assert (saved["epoch"], saved["step"]) == (1, 3)
    assert saved["steps_seen"] == 1
    assert_bitwise_equal(got, expected)


def test_accumulate_steps_is_validated():
    with pytest.raises(ValueError, match="accumulate_steps"):
        TrainConfig(accumulate_steps=0)


def test_token_counts_must_name_counting_terms():
    distiller = built_distiller()
    with pytest.raises(ValueError, match=r"token_counts names \['nope'\]"):
        distiller(inputs_of(WHOLE), target=WHOLE["labels"], token_counts={"nope": 3})
    with pytest.raises(ValueError, match="logit_mse.*does not count tokens"):
        distiller(inputs_of(WHOLE), target=WHOLE["labels"], token_counts={"logit_mse": 3})


def test_the_distiller_passes_the_attention_mask():
    """Hidden-state terms read the batch's attention mask (padding positions do not count), and
    the token divergences refuse a counted padding position (left padding)."""
    distiller = built_distiller()
    counts = distiller.count_tokens(WHOLE["labels"], inputs_of(WHOLE))
    assert counts["hidden_mse"] == int(WHOLE["attention_mask"].sum())
    without_mask = distiller.count_tokens(WHOLE["labels"], {"input_ids": WHOLE["input_ids"]})
    assert without_mask["hidden_mse"] == WHOLE["input_ids"].numel()  # all ones
    left = {
        key: value.flip(1) for key, value in WHOLE.items()
    }  # left padding, first token labelled
    with pytest.raises(ValueError, match="counted positions are padding"):
        distiller(inputs_of(left), target=left["labels"])


# -- preflight: token logits compare the last dimension ----------------------------------------


class FixedLM(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def preflight(teacher_vocab: int, student_vocab: int, loss) -> None:
    distiller = Distiller(FixedLM(teacher_vocab), FixedLM(student_vocab), [Term(loss)])
    labels = torch.randint(0, min(teacher_vocab, student_vocab), (2, 3))
    from kdistill.data.arrays import Batch

    first = Batch(inputs={"input_ids": torch.randint(0, VOCAB, (2, 3))}, target=labels)
    check_before_training(distiller, first, [first], torch.device("cpu"))


def test_preflight_reads_the_vocabulary_of_token_logits_on_the_last_dimension():
    """N×L×V with L = 3 ≠ V = 9: labels up to 8 are valid tokens (dimension 1 would say 3
    classes), and a teacher with V = 12 is a vocabulary mismatch (dimension 1 would agree)."""
    preflight(9, 9, L.ForwardKL())  # labels in [0, 9): valid for V = 9, not for L = 3
    with pytest.raises(
        ConfigError, match=r"teacher outputs 12 classes and the student 9.*vocab_size"
    ):
        preflight(12, 9, L.ForwardKL())
    preflight(12, 9, L.ForwardKL(vocab_size=9))  # padding rows of the teacher's head


# -- two DDP ranks (gloo) -------------------------------------------------------------------------

DDP_WORKER = '''
import json, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from kdistill import losses as L
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.engine.distributed import all_gather, cleanup, info, init_distributed

VOCAB, LENGTH = 11, 6


class TinyLM(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return {"logits": self.head(torch.tanh(self.mix(h.cumsum(dim=1) / steps)))}


class Sequences(Dataset):
    """Even samples mostly padding, odd samples full: unshuffled, rank 0 of 2 gets the short
    ones and rank 1 the long ones."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (16, LENGTH), generator=g)
        self.mask = torch.zeros(16, LENGTH, dtype=torch.long)
        for n in range(16):
            self.mask[n, : (LENGTH if n % 2 else 1 + n % 3)] = 1
        self.ids = self.ids.masked_fill(self.mask == 0, 0)

    def __len__(self):
        return 16

    def __getitem__(self, n):
        return {"input_ids": self.ids[n], "attention_mask": self.mask[n],
                "labels": self.ids[n].masked_fill(self.mask[n] == 0, -100)}


init_distributed("cpu")
world = info()
data = Sequences()
record = {"world": world.world_size}
for accumulate in (1, 2):
    torch.manual_seed(0)
    teacher, student = TinyLM(6).double(), TinyLM(4).double()
    distiller = Distiller(teacher, student, [
        Term(L.ForwardKL(temperature=2.0), output="logits"),
        Term(L.TokenCE(), 0.5, output="logits"),
        Term(L.HiddenMSE(), 0.3, student="mix", teacher="mix"),
        Term(L.LogitMSE(), 0.1, output="logits"),
    ])
    sampler = DistributedSampler(data, shuffle=False) if world.world_size > 1 else None
    loader = DataLoader(data, batch_size=4 // world.world_size, sampler=sampler)
    first = next(iter(loader))
    local = distiller.count_tokens(first["labels"], {"attention_mask": first["attention_mask"]})
    config = TrainConfig(epochs=2, optimizer="sgd", momentum=0.0, lr=0.5, schedule="constant",
                         accumulate_steps=accumulate, progress=False)
    result = fit(distiller, loader, config)
    weights = torch.cat([p.detach().reshape(-1) for p in distiller.trainable_parameters()])
    record[str(accumulate)] = {
        "weights": weights.tolist(),
        "same_on_every_rank": all(torch.equal(w, weights) for w in all_gather(weights)),
        "train_loss": result.final["train_loss"],
        "local_counts": local,
    }
with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as handle:
    json.dump(record, handle)
cleanup()
'''


def test_two_ranks_with_unequal_token_counts_match_one_process(tmp_path):
    """2 gloo ranks, rank 0's shares mostly padding, rank 1's full (first batch: 2 vs 10 counted
    tokens), with and without accumulation: every rank ends with the weights of one process on
    the whole batches (float64, to 1e-10), and logs the same training loss."""
    alone, ranks = run_worker_both_ways(tmp_path, DDP_WORKER)
    assert ranks[0]["1"]["local_counts"]["forward_kl"] == 2
    assert ranks[1]["1"]["local_counts"]["forward_kl"] == 10
    for accumulate in ("1", "2"):
        for record in ranks:
            got = record[accumulate]
            assert got["same_on_every_rank"]
            torch.testing.assert_close(
                torch.tensor(got["weights"], dtype=torch.float64),
                torch.tensor(alone[accumulate]["weights"], dtype=torch.float64),
                atol=1e-10,
                rtol=1e-10,
                msg=f"accumulate_steps={accumulate}",
            )
            assert got["train_loss"] == pytest.approx(alone[accumulate]["train_loss"], rel=1e-10)
