"""`DistillationTrainer` (a Hugging Face `Trainer`) trains exactly what `kd.fit` trains.

A tiny GPT-2 student distilled from a tiny GPT-2 teacher on right-padded sequences of very
different lengths (tests/hf_trainer_worker.py). Expected values: `kd.fit` on the same fixed
batches (an independent loop: its own optimiser steps, accumulation and counting), and for the
first step a plain-torch computation of the whole window's per-token loss.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

import hf_trainer_worker as worker  # noqa: E402  (tests/ is on sys.path)

import kdistill as kd  # noqa: E402
from kdistill.errors import ConfigError  # noqa: E402
from kdistill.losses import FitNet  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def _window_loss_by_hand(teacher, student, rows) -> float:
    """0.7 · T² · Σ KL(p_t‖p_s) / n + 0.3 · Σ −log p_s(y) / n over the window's positions i
    whose next label is not −100 (n of them, over all its micro-batches), T = 2."""
    batch = _collate(rows)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    counted = batch["labels"][:, 1:] != -100
    t, s, nxt = t[:, :-1][counted], s[:, :-1][counted], batch["labels"][:, 1:][counted]
    log_pt, log_ps = F.log_softmax(t / 2, -1), F.log_softmax(s / 2, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).sum() * 4
    ce = -F.log_softmax(s, -1).gather(1, nxt[:, None]).sum()
    return float((0.7 * kl + 0.3 * ce) / counted.sum())


def _fit_reference(teacher, student, batch: int, accumulate: int):
    rows = worker.samples()
    loader = [_collate(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    distiller = kd.Distiller(teacher, student, worker.terms())
    config = kd.TrainConfig(
        epochs=1, optimizer="sgd", momentum=0.0, lr=worker.LR, schedule="constant",
        accumulate_steps=accumulate, progress=False,
    )  # fmt: skip
    return kd.fit(distiller, loader, config).final


def test_trainer_loss_and_weights_equal_kd_fit_with_accumulation(tmp_path):
    teacher, initial = worker.models()
    reference_student = copy.deepcopy(initial)
    reference = _fit_reference(teacher, reference_student, batch=2, accumulate=2)

    student = copy.deepcopy(initial)
    trainer = worker.trainer(student, teacher, tmp_path, batch=2, accumulate=2)
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 4  # 16 samples, windows of 2 micro-batches of 2

    # step 1 against the hand computation over its 4 sequences (2 micro-batches)
    first = _window_loss_by_hand(teacher, initial, worker.samples()[:4])
    assert steps[0]["loss"] == pytest.approx(first, rel=1e-6)
    # the epoch's mean loss and each term's mean, as kd.fit reports them
    mean = sum(entry["loss"] for entry in steps) / len(steps)
    assert mean == pytest.approx(reference["train_loss"], rel=1e-6)
    for name in ("forward_kl", "token_ce"):
        logged = sum(entry[f"loss/{name}"] for entry in steps) / len(steps)
        assert logged == pytest.approx(reference["train_parts"][name], rel=1e-6)
    # the same optimiser steps: the same weights
    for key, value in reference_student.state_dict().items():
        assert torch.allclose(student.state_dict()[key], value, atol=1e-6, rtol=0), key
    # the teacher: untouched, in eval mode, not in the optimiser
    for key, value in worker.models()[0].state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in student.parameters()}
    assert not optimised & {id(p) for p in teacher.parameters()}


def test_accumulation_normalises_by_the_window_token_count(tmp_path):
    # per-micro-batch means would weigh the 2-token and 8-token sequences alike: the values
    # differ, and the Trainer's first step is the window's count (test above); here the
    # accumulated run equals one batch of 4 with no accumulation
    teacher, initial = worker.models()
    one_batch = copy.deepcopy(initial)
    worker.trainer(one_batch, teacher, tmp_path / "a", batch=4, accumulate=1).train()
    accumulated = copy.deepcopy(initial)
    worker.trainer(accumulated, teacher, tmp_path / "b", batch=2, accumulate=2).train()
    for key, value in one_batch.state_dict().items():
        assert torch.allclose(accumulated.state_dict()[key], value, atol=1e-6, rtol=0), key


def test_checkpoints_hold_the_student_only(tmp_path):
    from safetensors.torch import load_file

    teacher, student = worker.models()
    trainer = worker.trainer(
        student, teacher, tmp_path, batch=4, accumulate=1, save_strategy="steps", save_steps=4,
        eval_strategy="no",
    )  # fmt: skip
    trainer.train()
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert set(saved) <= set(student.state_dict())
    assert max(v.numel() for v in saved.values()) < 40 * 32  # nothing of the 32-wide teacher
    # evaluation: the distillation loss of the (one) batch on its own, the student in eval mode
    metrics = trainer.evaluate(worker.samples()[:4])
    by_hand = _window_loss_by_hand(teacher, student.eval(), worker.samples()[:4])
    assert metrics["eval_loss"] == pytest.approx(by_hand, rel=1e-6)


def test_bf16_mixed_precision_trains_close_to_fp32(tmp_path):
    # the Trainer's autocast reaches the student through the Distiller (the losses stay fp32)
    teacher, initial = worker.models()
    losses = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        trainer = worker.trainer(copy.deepcopy(initial), teacher, tmp_path / name, 4, 1, bf16=bf16)
        trainer.train()
        losses[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses["bf16"] != losses["fp32"]  # autocast did run
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_terms_that_need_connectors_are_refused(tmp_path):
    teacher, student = worker.models()  # widths 32 and 16: FitNet needs a connector
    with pytest.raises(ConfigError, match=r"need trainable connectors.*kd\.fit"):
        from transformers import TrainingArguments

        from kdistill.integrations.transformers import DistillationTrainer

        DistillationTrainer(
            model=student,
            teacher=teacher,
            terms=[kd.Term(FitNet(), 1.0, student="transformer.h.0", teacher="transformer.h.1")],
            args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
            train_dataset=worker.samples(),
        )


def test_torchrun_two_processes_equal_one_process(tmp_path):
    # 2 CPU processes (gloo) × micro-batches of 2 × accumulation 2 = windows of 8 sequences,
    # against 1 process × batches of 4 × accumulation 2: the same windows, the same weights
    # (--standalone: a free rendezvous port, so parallel runs of this test do not collide)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    script = Path(worker.__file__)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), str(tmp_path / "two.pt"), "2", "2",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    worker.main(str(tmp_path / "one.pt"), 4, 2)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    teacher, initial = worker.models()
    moved = max((one[k] - initial.state_dict()[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training did change the weights
    for key, value in one.items():
        assert torch.allclose(two[key], value, atol=1e-6, rtol=0), key


def test_a_stored_top_k_teacher_trains_as_the_live_teacher(tmp_path):
    # token blocks carry their dataset index; stored with k = V in float32, the stored
    # distributions are the teacher's to float32 rounding: the same student either way
    from transformers import TrainingArguments

    from kdistill.data.text import pack_blocks
    from kdistill.distill.teacher.store.tokens import build_token_cache
    from kdistill.integrations.transformers import DistillationTrainer
    from kdistill.losses import ForwardKL
    from kdistill.models.lm import gpt2_lm

    vocab = 11
    stream = torch.randint(3, vocab, (150,), generator=torch.Generator().manual_seed(0))
    blocks = pack_blocks(stream, 8, torch.ones(vocab, dtype=torch.int64), name="toy")
    torch.manual_seed(0)
    teacher = gpt2_lm(vocab, n_layer=1, n_embd=16, n_head=2, n_positions=16)
    torch.manual_seed(1)
    initial = gpt2_lm(vocab, n_layer=1, n_embd=16, n_head=2, n_positions=16)
    store = build_token_cache(teacher, blocks, tmp_path / "store", topk=vocab, dtype="float32")

    def train(**source):
        student = copy.deepcopy(initial)
        args = TrainingArguments(
            str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
            lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", use_cpu=True,
            save_strategy="no", disable_tqdm=True, seed=3,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student,
            terms=[kd.Term(ForwardKL(temperature=2.0), output="logits")],
            args=args,
            train_dataset=blocks,
            optimizers=(torch.optim.SGD(student.parameters(), lr=0.5), None),
            **source,
        )
        trainer.train()
        return student.state_dict(), trainer

    (live, _), (stored, trainer) = train(teacher=teacher), train(teacher_outputs=store)
    # the store covers the training samples only: evaluation needs the live teacher
    with pytest.raises(ConfigError, match="pass the live teacher too"):
        trainer.evaluate(blocks)
    moved = max(float((live[k] - initial.state_dict()[k]).abs().max()) for k in live)
    assert moved > 1e-3
    for key, value in live.items():
        torch.testing.assert_close(stored[key], value, rtol=1e-5, atol=1e-6)
