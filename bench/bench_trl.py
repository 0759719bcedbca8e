"""kdistill side by side with TRL's GKD trainer: loss conventions, training speed, loss memory.

Run it in a virtual environment that has TRL (kept apart from the project's own; `make
bench-trl` creates it and runs this), with kdistill on the path::

    python3 -m venv /work/venv-trl
    /work/venv-trl/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.24.0 \\
        tokenizers pyyaml pydantic safetensors numpy tqdm matplotlib
    PYTHONPATH=$PWD/src nice -n 10 /work/venv-trl/bin/python bench/bench_trl.py \\
        --json bench/results/trl-$(date +%F).json
    … --quick                              # smoke run (seconds; numbers meaningless)
    … --device cuda --dtype bf16           # on a GPU (bf16 autocast for both trainers)
    … --parts losses                       # one part only (losses, speed, memory)

Both libraries run in the same process (same torch, same threads). Three parts:

**(a) losses.** Fixed batches of King James Bible token blocks (the tokenizer and the trained
teacher of a ``kdistill run recipes/kjv_lm.yaml`` run folder, `--run-dir`; random tokens and
random models with ``--data random``), one batch with a masked prompt and right padding. For
β ∈ {0.1, 0.5, 0.9} and T ∈ {1, 2}: TRL's ``GKDTrainer.generalized_jsd_loss`` (called as its
``compute_loss`` calls it: logits ``[:, :-1]``, labels ``[:, 1:]``; once with ``temperature=T``
and once without, which is what the trainer does) against kdistill's `GeneralizedJSD(beta,
temperature=T)` on the unshifted batch. Each convention difference is measured: temperature
and T², the β side, the endpoints β ∈ {0, 1}, the reduction without labels, the normaliser the
Trainer passes (``num_items_in_batch``), −inf logits, bf16 logits. Gradients w.r.t. the student
logits are compared too.

**(b) speed.** tokens/s of training the same student (GPT-2, `lm_student`) from the same teacher
(`lm_teacher`) with the same batches (`--batch-size` × `--seq-len` tokens), AdamW (lr 1e-3, no
weight decay, constant schedule, gradient clipping at 1), JSD β = 0.5, `--threads` threads:
TRL's ``GKDTrainer.train()`` and kdistill's `kd.fit`, each end to end (their own loops; the
time per step is the time between consecutive steps: TRL's ``on_step_end`` callbacks, kdistill's
batch fetches), median over the steps after `--warmup`, rounds alternated. Two modes:
``offline`` (λ = 0: the given sequences, the teacher scoring them) and ``on_policy`` (λ = 0.5:
with probability ½ per batch the student samples the completion of the batch's prompt — the
first half of each block — at temperature 1, `--seq-len`/2 new tokens). kdistill's on-policy
row runs when ``kdistill.engine.config.OnPolicyConfig`` exists (issue 16's on-policy mode);
otherwise it says why it is left out.

**(c) memory.** Peak memory of one loss forward + backward at V = `--memory-vocab` (32,768)
and `--memory-tokens` tokens (8,192), from the student's last hidden states and head (D =
256) and the teacher's, each configuration in a fresh subprocess: the rise of the process's
peak resident set size (``VmHWM``, falling back to ``ru_maxrss``) over its value once the inputs
exist (CPU), or of ``torch.cuda.max_memory_allocated`` (GPU). Rows: TRL's dense
``generalized_jsd_loss``, kdistill's dense `GeneralizedJSD`, and kdistill's chunked loss (teacher
dense logits / teacher hidden states + head) when ``kdistill.losses.chunked`` exists. A
configuration is skipped, saying so, when its estimated peak exceeds 40 % of the memory
available.

The printed tables and the JSON (`--json`) hold every figure; targets are printed, never
asserted (kdistill ≥ 1.5× TRL tokens/s).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# OpenMP threads that spin while waiting (the default) make a 2-thread step 5–10× slower when
# other jobs share the cores; both libraries run under the same policy (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.exists() and importlib.util.find_spec("kdistill") is None:  # PYTHONPATH wins
    sys.path.insert(0, str(SRC))

import kdistill as kd  # noqa: E402
from kdistill import losses as L  # noqa: E402
from kdistill.data.text import IGNORE_INDEX, PAD_ID, SPECIAL_TOKENS  # noqa: E402
from kdistill.models.lm import lm_student, lm_teacher  # noqa: E402

DEFAULT_RUN_DIR = Path("/work/main/runs/kjv_lm")
BETAS = (0.1, 0.5, 0.9)
TEMPERATURES = (1.0, 2.0)
TARGET_SPEEDUP = 1.5  # kdistill tokens/s ≥ 1.5 × TRL's (issue 16); reported, never asserted
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- TRL, when it imports -----------------------------------------------------------------------
def import_trl():
    """(GKDTrainer, GKDConfig, version, None) or (None, None, None, why not). TRL ≥ 1.0 keeps
    GKD under ``trl.experimental.gkd``; older releases export it from ``trl``."""
    try:
        import trl
    except ImportError as error:
        return None, None, None, f"trl is not installed ({error}); see bench/README.md"
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            from trl.experimental.gkd import GKDConfig, GKDTrainer
        except ImportError:
            try:
                from trl import GKDConfig, GKDTrainer
            except ImportError as error:
                return None, None, None, f"trl {trl.__version__} has no GKDTrainer ({error})"
    return GKDTrainer, GKDConfig, trl.__version__, None


def versions() -> dict:
    found = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("trl", "transformers", "accelerate"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


# -- data and models ----------------------------------------------------------------------------
def hf_tokenizer(tokenizer_json: Path | None, vocab_size: int):
    """A transformers fast tokenizer (TRL's trainers want a `processing_class` with a pad id):
    the KJV BPE of the run folder, or a word-level one of `vocab_size` made-up tokens."""
    from transformers import PreTrainedTokenizerFast

    specials = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
    if tokenizer_json is not None:
        return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **specials)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(vocab), vocab_size)})
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, "<pad>")), **specials
    )


def load_blocks(args, seq_len: int) -> tuple[torch.Tensor, object, str]:
    """(token blocks ``B×seq_len`` int64, HF tokenizer, description). KJV: the books of the
    recipe's training split encoded with the run folder's tokenizer (read, never written)."""
    vocab = 2048
    if args.data == "kjv":
        tokenizer_json = args.run_dir / "tokenizer" / "tokenizer.json"
        if not tokenizer_json.exists():
            raise SystemExit(f"no tokenizer at {tokenizer_json}: pass --run-dir or --data random")
        from tokenizers import Tokenizer

        from kdistill.data.text import (
            DEFAULT_TEST_BOOKS,
            DEFAULT_VAL_BOOKS,
            chapter_documents,
            encode_documents,
            read_kjv,
            split_books,
        )

        train_books, _, _ = split_books(read_kjv(), DEFAULT_VAL_BOOKS, DEFAULT_TEST_BOOKS)
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        documents = chapter_documents(train_books[:6])  # Genesis … Joshua: ~250 k tokens
        stream = encode_documents(tokenizer, documents)
        usable = stream.numel() // seq_len * seq_len
        blocks = stream[:usable].view(-1, seq_len)
        return blocks, hf_tokenizer(tokenizer_json, vocab), f"KJV ({len(blocks)} blocks)"
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, vocab, (512, seq_len), generator=g)
    return blocks, hf_tokenizer(None, vocab), "random tokens"


def make_models(args, vocab: int = 2048):
    """(teacher, student): `lm_teacher` with the run folder's trained weights (KJV) and
    `lm_student` with the student-alone weights when present, else seeded random ones."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    teacher, student = lm_teacher(vocab), lm_student(vocab)
    notes = {"teacher": "random init (seed 0)", "student": "random init (seed 0)"}
    if args.data == "kjv":
        for model, key, name in (
            (teacher, "teacher", "teacher.safetensors"),
            (student, "student", "small__alone__seed0.safetensors"),
        ):
            path = args.run_dir / "models" / name
            if path.exists():
                state = load_file(str(path))
                missing, unexpected = model.load_state_dict(state, strict=False)
                extra = [k for k in missing if not k.endswith("lm_head.weight")]  # tied
                if extra or unexpected:
                    raise SystemExit(f"{path} does not fit {key}: missing {extra}, {unexpected}")
                notes[key] = str(path)
    return teacher.eval(), student, notes


def fixed_batches(blocks: torch.Tensor) -> list[dict]:
    """Two batches of 4 blocks: one plain, one with the first 40 labels of every row masked
    (a prompt) and rows 2, 3 right-padded after 100 and 70 tokens."""
    plain = blocks[:4].clone()
    ids = blocks[4:8].clone()
    mask = torch.ones_like(ids)
    for row, length in ((2, 100), (3, 70)):
        mask[row, length:] = 0
        ids[row, length:] = PAD_ID
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :40] = IGNORE_INDEX
    return [
        {"input_ids": plain, "attention_mask": torch.ones_like(plain), "labels": plain.clone()},
        {"input_ids": ids, "attention_mask": mask, "labels": labels},
    ]


# -- (a) loss conventions -----------------------------------------------------------------------
def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def trl_loss(GKDTrainer, s, t, labels, **kwargs):
    """TRL's loss as its ``compute_loss`` calls it: logits [:, :-1], labels [:, 1:]."""
    return GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], **kwargs)


def value_and_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    value = fn(s)
    (grad,) = torch.autograd.grad(value, s)
    return float(value.detach()), grad


def part_losses(args, GKDTrainer) -> dict:
    blocks, _, data_note = load_blocks(args, 128)  # fixed_batches' layout needs 128
    teacher, student, model_notes = make_models(args)
    batches = fixed_batches(blocks)
    with torch.no_grad():
        logits = [
            (
                student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
            )
            for b in batches
        ]
    rows = []
    for index, (batch, (s, t)) in enumerate(zip(batches, logits)):
        labels, mask = batch["labels"], batch["attention_mask"]
        counted = int((labels[:, 1:] != IGNORE_INDEX).sum())
        for beta in BETAS:
            for temperature in TEMPERATURES:
                loss = L.GeneralizedJSD(beta=beta, temperature=temperature)
                k, k_grad = value_and_grad(
                    lambda x, f=loss, t=t, y=labels, m=mask: f(x, t, y, attention_mask=m), s
                )
                trl_t, trl_grad = value_and_grad(
                    lambda x, b=beta, T=temperature, t=t, y=labels: trl_loss(
                        GKDTrainer, x, t, y, beta=b, temperature=T
                    ),
                    s,
                )
                trainer = float(trl_loss(GKDTrainer, s, t, labels, beta=beta))  # T not passed
                swapped = float(trl_loss(GKDTrainer, s, t, labels, beta=1 - beta))
                t2 = temperature * temperature
                grad_diff = float((k_grad - t2 * trl_grad).abs().max() / k_grad.abs().max())
                rows.append(
                    {
                        "batch": index,
                        "counted": counted,
                        "beta": beta,
                        "T": temperature,
                        "kdistill": k,
                        "trl_T": trl_t,
                        "trl_T_times_T2": t2 * trl_t,
                        "trl_trainer": trainer,
                        "trl_1_minus_beta": swapped,
                        "rel_diff_converted": rel(t2 * trl_t, k),
                        "grad_rel_diff_converted": grad_diff,
                        "rel_diff_trainer": rel(trainer, k),
                        "rel_diff_swapped_beta": rel(swapped, k),
                    }
                )
    s, t = logits[1]
    labels, mask = batches[1]["labels"], batches[1]["attention_mask"]
    n, length = labels.shape
    findings = {
        "endpoints": endpoint_rows(GKDTrainer, s, t, labels, mask),
        "reduction_without_labels": no_label_rows(GKDTrainer, logits[0], batches[0]),
        "num_items_in_batch": num_items_rows(GKDTrainer, s, t, labels, mask),
        "minus_inf_logits": minus_inf_rows(GKDTrainer, s, t, labels, mask),
        "bf16_logits": bf16_rows(GKDTrainer, s, t, labels, mask),
        "fully_masked": fully_masked_rows(GKDTrainer, s, t, labels),
        "shape": [n, length, int(s.shape[-1])],
    }
    return {"data": data_note, "models": model_notes, "rows": rows, **findings}


def endpoint_rows(GKDTrainer, s, t, labels, mask) -> dict:
    """TRL's β = 0 / 1 special cases against the interior values next to them, and what
    kdistill does (refuses the endpoints; ForwardKL / ReverseKL are the limits ÷ β). In
    float64."""
    s, t = s.double(), t.double()  # the limits ÷ β need float64 (float32 cancels at 1e-6)
    out = {}
    for beta in (0.0, 1e-6, 1e-3, 0.999, 1 - 1e-6, 1.0):
        out[f"trl_beta_{beta:g}"] = float(trl_loss(GKDTrainer, s, t, labels, beta=beta))
    out["kdistill_forward_kl"] = float(L.ForwardKL()(s, t, labels, attention_mask=mask))
    out["kdistill_reverse_kl"] = float(L.ReverseKL()(s, t, labels, attention_mask=mask))
    out["kdistill_jsd_1e-6_over_beta"] = float(
        L.GeneralizedJSD(beta=1e-6)(s, t, labels, attention_mask=mask) / 1e-6
    )
    out["kdistill_jsd_1-1e-6_over_1-beta"] = float(
        L.GeneralizedJSD(beta=1 - 1e-6)(s, t, labels, attention_mask=mask) / 1e-6
    )
    for beta in (0.0, 1.0):
        try:
            L.GeneralizedJSD(beta=beta)
            out[f"kdistill_beta_{beta:g}"] = "accepted"
        except ValueError as error:
            out[f"kdistill_beta_{beta:g}"] = f"ValueError: {str(error)[:90]}…"
    return out


def no_label_rows(GKDTrainer, logits, batch) -> dict:
    """labels=None: TRL sums over every position and the vocabulary and divides by the batch
    size N (one sequence, not one token); kdistill always averages per counted token."""
    s, t = logits
    labels = batch["labels"]
    n, length = labels.shape
    trl_none = float(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], None, beta=0.5))
    k = float(L.GeneralizedJSD(beta=0.5)(s, t, labels))
    return {
        "trl_labels_none": trl_none,
        "kdistill": k,
        "N": n,
        "positions": n * (length - 1),
        "trl_labels_none_times_N_over_positions": trl_none * n / (n * (length - 1)),
        "ratio_trl_over_kdistill": trl_none / k,
    }


def num_items_rows(GKDTrainer, s, t, labels, mask) -> dict:
    """``num_items_in_batch``: the Trainer counts the labels of the batch the data loader gave
    (shifted) before ``training_step`` runs; on an on-policy step TRL replaces the labels by
    the student's completions after that count, so the divisor is the data's completion count
    even when the samples are shorter. Simulated here: the same batch with the completions
    cut at 24 tokens (an early <eos>) divided by the original count."""
    original = int((labels[:, 1:] != IGNORE_INDEX).sum())
    cut = labels.clone()
    cut[:, 40 + 24 :] = IGNORE_INDEX
    new_mask = mask.clone()
    new_mask[:, 40 + 24 :] = 0
    actual = int((cut[:, 1:] != IGNORE_INDEX).sum())
    trl_stale = float(trl_loss(GKDTrainer, s, t, cut, beta=0.5, num_items_in_batch=original))
    trl_right = float(trl_loss(GKDTrainer, s, t, cut, beta=0.5, num_items_in_batch=actual))
    k = float(L.GeneralizedJSD(beta=0.5)(s, t, cut, attention_mask=new_mask))
    return {
        "counted_in_data_batch": original,
        "counted_in_sampled_batch": actual,
        "trl_divided_by_data_count": trl_stale,
        "trl_divided_by_sampled_count": trl_right,
        "kdistill": k,
        "ratio_stale_over_kdistill": trl_stale / k,
    }


def minus_inf_rows(GKDTrainer, s, t, labels, mask) -> dict:
    """A vocabulary entry the teacher masks out (logit −inf, p = 0): TRL's ``F.kl_div`` with
    ``log_target=True`` computes 0·(−inf) = NaN; kdistill counts p = 0 terms as 0."""
    t_masked = t.clone()
    t_masked[..., 7] = -math.inf
    return {
        "trl": float(trl_loss(GKDTrainer, s, t_masked, labels, beta=0.5)),
        "kdistill": float(L.GeneralizedJSD(beta=0.5)(s, t_masked, labels, attention_mask=mask)),
        "kdistill_forward_kl": float(L.ForwardKL()(s, t_masked, labels, attention_mask=mask)),
        "trl_beta_0": float(trl_loss(GKDTrainer, s, t_masked, labels, beta=0.0)),
    }


def bf16_rows(GKDTrainer, s, t, labels, mask) -> dict:
    """bf16 logits: TRL computes in the logits' dtype (and rounds β to bf16); kdistill casts
    to float32 first. Relative error of each against its own float64 value."""
    out = {}
    for beta in BETAS:
        ref = float(L.GeneralizedJSD(beta=beta)(s.double(), t.double(), labels))
        sb, tb = s.bfloat16(), t.bfloat16()
        ref_b = float(L.GeneralizedJSD(beta=beta)(sb.double(), tb.double(), labels))
        trl_b = float(trl_loss(GKDTrainer, sb, tb, labels, beta=beta))
        k_b = float(L.GeneralizedJSD(beta=beta)(sb, tb, labels, attention_mask=mask))
        out[f"beta_{beta}"] = {
            "float64_of_bf16_logits": ref_b,
            "trl_bf16": trl_b,
            "kdistill_bf16": k_b,
            "trl_rel_err": rel(trl_b, ref_b),
            "kdistill_rel_err": rel(k_b, ref_b),
            "float64_of_fp32_logits": ref,
        }
    return out


def fully_masked_rows(GKDTrainer, s, t, labels) -> dict:
    none = torch.full_like(labels, IGNORE_INDEX)
    x = s.detach().clone().requires_grad_(True)
    trl = trl_loss(GKDTrainer, x, t, none, beta=0.5)
    trl.backward()
    y = s.detach().clone().requires_grad_(True)
    k = L.GeneralizedJSD(beta=0.5)(y, t, none)
    k.backward()
    return {
        "trl": float(trl.detach()),
        "trl_grad_abs_max": float(x.grad.abs().max()),
        "kdistill": float(k),
        "kdistill_grad_abs_max": float(y.grad.abs().max()),
    }


# -- (b) training speed -------------------------------------------------------------------------
class TimedBatches(list):
    """A list of batches that records when each is handed out: for a loop that fetches the
    next batch right after the previous optimiser step, the gaps are the step times."""

    def __iter__(self):
        self.stamps = []
        for item in super().__iter__():
            self.stamps.append(time.perf_counter())
            yield item
        self.stamps.append(time.perf_counter())


class PassOver(list):
    """`Batch`es of a whole dataset, for `MemoryTeacherOutputs.predict` (which reads the
    dataset's size from ``loader.dataset``)."""

    @property
    def dataset(self) -> range:
        return range(sum(len(batch.index) for batch in self))


def step_times(stamps: list[float], warmup: int) -> list[float]:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps[warmup:]


def training_batches(blocks, args, on_policy: bool, count: int) -> list[dict]:
    """`count` batches of `batch_size` blocks (cycling), labels = ids; on-policy data: the
    first half of each block is the prompt (labels −100), the second half the completion."""
    out = []
    for i in range(count):
        rows = torch.arange(i * args.batch_size, (i + 1) * args.batch_size) % len(blocks)
        ids = blocks[rows].clone()
        labels = ids.clone()
        if on_policy:
            labels[:, : args.seq_len // 2] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def run_kdistill(args, teacher, student, batches, lmbda: float | None, cached=False) -> dict:
    config = dict(
        epochs=1,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.0,
        schedule="constant",
        warmup_steps=0,
        grad_clip=1.0,
        device=args.device,
        precision=args.dtype,
        progress=False,
    )
    if lmbda is not None:
        from kdistill.engine.config import OnPolicyConfig

        config["on_policy"] = OnPolicyConfig(
            lmbda=lmbda, temperature=1.0, max_new_tokens=args.seq_len // 2, seed=0
        )
    distiller = kd.Distiller(
        teacher, student, [kd.Term(L.GeneralizedJSD(beta=0.5), output="logits")]
    )
    outputs, build_s = None, None
    if cached:  # the teacher's logits computed once, before training (kdistill's offline mode)
        from kdistill.data.batches import as_batch
        from kdistill.distill.teacher.store import MemoryTeacherOutputs

        batches = [
            {**b, "index": torch.arange(i * len(b["labels"]), (i + 1) * len(b["labels"]))}
            for i, b in enumerate(batches)
        ]
        source = PassOver([as_batch(b) for b in batches])
        start = time.perf_counter()
        outputs = MemoryTeacherOutputs.predict(teacher, source, device=args.device)
        build_s = time.perf_counter() - start
    loader = TimedBatches(batches)
    start = time.perf_counter()
    kd.fit(distiller, loader, kd.TrainConfig(**config), teacher_outputs=outputs)
    total = time.perf_counter() - start
    return {"steps": step_times(loader.stamps, args.warmup), "total_s": total, "build_s": build_s}


def run_trl(
    args, GKDTrainer, GKDConfig, tokenizer, teacher, student, batches, lmbda, checkpointing=True
) -> dict:
    """`GKDTrainer.train()` on `batches`; `checkpointing`: TRL's default (SFTConfig turns
    gradient checkpointing on), or off as kdistill (and a plain PyTorch loop) runs."""
    from datasets import Dataset
    from transformers import TrainerCallback

    half = args.seq_len // 2
    records = {"num_items": [], "sampled": 0}

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        labels = torch.tensor([f["labels"] for f in features])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "prompts": ids[:, :half],
            "prompt_attention_mask": torch.ones_like(ids[:, :half]),
        }

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_step_end(self, *_, **__):
            self.stamps.append(time.perf_counter())

    rows = [
        {"input_ids": b["input_ids"][i].tolist(), "labels": b["labels"][i].tolist()}
        for b in batches
        for i in range(b["input_ids"].shape[0])
    ]
    clock = Clock()
    clock.stamps = []
    with tempfile.TemporaryDirectory() as out_dir:
        config = GKDConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=len(batches),
            learning_rate=1e-3,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            lmbda=lmbda,
            beta=0.5,
            temperature=1.0,
            max_new_tokens=half,
            seed=0,
            data_seed=0,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=args.device == "cpu",
            bf16=args.dtype == "bf16",
            max_length=None,
            gradient_checkpointing=checkpointing,
        )
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            trainer = GKDTrainer(
                model=student,
                teacher_model=teacher,
                args=config,
                data_collator=collate,
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=[clock],
            )
        original_loss = trainer.compute_loss
        original_generate = trainer.generate_on_policy_outputs

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            counted = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            given = None if num_items_in_batch is None else float(num_items_in_batch)
            records["num_items"].append((given, counted))
            return original_loss(model, inputs, return_outputs, num_items_in_batch)

        def generate(*a, **k):
            records["sampled"] += 1
            return original_generate(*a, **k)

        trainer.compute_loss = compute_loss
        trainer.generate_on_policy_outputs = generate
        random.seed(0)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    stale = sum(1 for given, counted in records["num_items"] if given not in (None, counted))
    return {
        "steps": step_times([start, *clock.stamps], args.warmup),
        "total_s": total,
        "sampled_steps": records["sampled"],
        "num_items_in_batch_differs_from_counted": stale,
        "num_items_examples": records["num_items"][:4],
    }


def step_breakdown(args, GKDTrainer, teacher, student, batch, repeats: int = 5) -> dict:
    """Median ms of each piece of one offline step, timed alone in this process: the teacher
    forward, the student forward + backward (through a trivial loss), each library's loss on
    the step's logits (forward + backward) and the AdamW step."""
    device = torch.device(args.device)
    teacher, student = teacher.to(device), student.to(device)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    labels = batch["labels"].to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    with torch.no_grad():
        s_logits = student(**inputs).logits
        t_logits = teacher(**inputs).logits
    jsd = L.GeneralizedJSD(beta=0.5)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def teacher_forward():
        with torch.inference_mode():
            teacher(**inputs)

    def student_step():
        student(**inputs).logits.mean().backward()

    def kdistill_loss():
        x = s_logits.detach().requires_grad_(True)
        jsd(x, t_logits, labels).backward()

    def trl_loss_step():
        x = s_logits.detach().requires_grad_(True)
        trl_loss(GKDTrainer, x, t_logits, labels, beta=0.5).backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    pieces = {
        "teacher_forward": teacher_forward,
        "student_forward_backward": student_step,
        "kdistill_loss_forward_backward": kdistill_loss,
        "trl_loss_forward_backward": trl_loss_step if GKDTrainer is not None else None,
        "adamw_step": optimizer_step,
    }
    out = {}
    for name, fn in pieces.items():
        if fn is None:
            continue
        times = []
        for _ in range(repeats + 1):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times[1:]) * 1e3
    optimizer.zero_grad(set_to_none=True)
    return out


def kdistill_sampled_steps(lmbda: float, count: int) -> int | None:
    """How many of the `count` batches kdistill's on-policy mode samples (its coin is a fixed
    function of the seed and the batch's position), when the mode exists."""
    try:
        from kdistill.distill.onpolicy import OnPolicy
    except ImportError:
        return None
    return sum(OnPolicy(lmbda=lmbda, seed=0).draw(key)[0] for key in range(count))


def on_policy_available() -> str | None:
    try:
        from kdistill.engine.config import OnPolicyConfig  # noqa: F401
    except ImportError as error:
        return f"kdistill has no on-policy mode here ({error})"
    return None


def part_speed(args, GKDTrainer, GKDConfig) -> dict:
    torch.set_num_threads(args.threads)
    blocks, tokenizer, data_note = load_blocks(args, args.seq_len)
    teacher, student0, _ = make_models(args)
    teacher0 = teacher
    state0 = {k: v.clone() for k, v in student0.state_dict().items()}
    count = args.warmup + args.steps
    tokens_per_step = args.batch_size * args.seq_len
    results: dict[str, dict] = {}
    modes = [
        mode
        for mode in [("offline", None, 0.0), ("on_policy", 0.5, 0.5)]
        if mode[0] in args.modes.split(",")
    ]
    why_not = on_policy_available()
    for round_ in range(args.rounds):
        for mode, kd_lmbda, trl_lmbda in modes:
            batches = training_batches(blocks, args, mode == "on_policy", count)
            order = ["trl", "kdistill"] if round_ % 2 == 0 else ["kdistill", "trl"]
            order.append("trl_no_checkpointing")  # TRL's default is checkpointing on
            if mode == "offline":
                order.append("kdistill_cached")
            for lib in order:
                key = f"{mode}/{lib}"
                entry = results.setdefault(key, {"steps": [], "total_s": [], "notes": {}})
                if lib == "kdistill" and mode == "on_policy" and why_not:
                    entry["skipped"] = why_not
                    continue
                if lib.startswith("trl") and GKDTrainer is None:
                    entry["skipped"] = args.trl_missing
                    continue
                student = lm_student(2048)
                student.load_state_dict(state0)
                teacher = teacher0
                if args.device != "cpu":
                    student, teacher = student.to(args.device), teacher.to(args.device)
                if lib.startswith("trl"):
                    got = run_trl(
                        *(args, GKDTrainer, GKDConfig, tokenizer, teacher, student, batches),
                        trl_lmbda,
                        checkpointing=lib == "trl",
                    )
                    entry["notes"].setdefault("sampled_steps", []).append(got["sampled_steps"])
                    entry["notes"].setdefault("num_items_in_batch_differs_from_counted", []).append(
                        got["num_items_in_batch_differs_from_counted"]
                    )
                    entry["notes"]["num_items_examples"] = got["num_items_examples"]
                else:
                    cached = lib == "kdistill_cached"
                    got = run_kdistill(args, teacher, student, batches, kd_lmbda, cached)
                    if cached:
                        entry["notes"].setdefault("cache_build_s", []).append(
                            round(got["build_s"], 2)
                        )
                    if kd_lmbda is not None:
                        entry["notes"].setdefault("sampled_steps", []).append(
                            kdistill_sampled_steps(kd_lmbda, count)
                        )
                entry["steps"] += got["steps"]
                entry["total_s"].append(got["total_s"])
                print(
                    f"  {key} round {round_ + 1}: {len(got['steps'])} timed steps, "
                    f"median {statistics.median(got['steps']) * 1e3:.0f} ms",
                    flush=True,
                )
    breakdown = step_breakdown(
        args, GKDTrainer, teacher0, lm_student(2048), training_batches(blocks, args, False, 1)[0]
    )
    summary = {}
    for key, entry in results.items():
        if entry["steps"]:
            entry["median_step_s"] = statistics.median(entry["steps"])
            entry["mean_step_s"] = statistics.fmean(entry["steps"])
            # on-policy steps are bimodal (sampled or not): the mean, not the median, is the rate
            step = entry["mean_step_s" if key.startswith("on_policy") else "median_step_s"]
            entry["tokens_per_s"] = tokens_per_step / step
        summary[key] = entry.get("tokens_per_s")
    ratios = {}  # "<mode>/<kdistill row>": its tokens/s ÷ TRL's in the same mode
    for key, value in summary.items():
        mode, lib = key.split("/")
        for reference in ("trl", "trl_no_checkpointing"):
            trl = summary.get(f"{mode}/{reference}")
            if lib.startswith("kdistill") and f"{mode}/{reference}" in summary:
                ratio = None if not (value and trl) else value / trl
                ratios[key if reference == "trl" else f"{key} vs {reference}"] = ratio
    return {
        "data": data_note,
        "tokens_per_step": tokens_per_step,
        "settings": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
            "optimizer": "AdamW lr 1e-3, wd 0, constant, clip 1.0",
            "loss": "JSD beta 0.5 (T 1)",
            "on_policy": "lambda 0.5, sampling T 1, max_new_tokens seq_len/2, prompt seq_len/2",
        },
        "results": results,
        "ratio_kdistill_over_trl": ratios,
        "breakdown_ms": breakdown,
    }


# -- (c) loss memory ----------------------------------------------------------------------------
MEMORY_ROWS = (
    "trl_dense",
    "kdistill_dense",
    "kdistill_chunked_teacher_logits",
    "kdistill_chunked_teacher_head",
)
ESTIMATED_COPIES = {  # peak rise ÷ one N·L×V float32 tensor (measured at 1,024 tokens, + 10 %)
    "trl_dense": 19,
    "kdistill_dense": 16,
    "kdistill_chunked_teacher_logits": 2,
    "kdistill_chunked_teacher_head": 2,
}


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(spec: dict) -> dict:
    """One loss forward + backward in this (fresh) process; the rise of the peak."""
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    tokens, vocab, width = spec["tokens"], spec["vocab"], spec["width"]
    n = 8
    length = tokens // n + 1  # shift: N·(L − 1) = tokens counted positions
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: (torch.randn(*shape, generator=g) * 0.5).to(device, dtype)  # noqa: E731
    h_s, w_s = make(n, length, width).requires_grad_(True), make(vocab, width).requires_grad_(True)
    h_t, w_t = make(n, length, width), make(vocab, width)
    labels = torch.randint(0, vocab, (n, length), generator=g).to(device)
    row = spec["row"]
    if row == "trl_dense":  # imports (and their memory) before the baseline
        GKDTrainer = import_trl()[0]
    elif row != "kdistill_dense":
        from kdistill.losses.chunked import HeadInput, chunked_token_loss
    if row == "kdistill_chunked_teacher_logits":  # the teacher's logits exist as an input
        with torch.no_grad():
            t_logits = h_t @ w_t.T
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = peak_rss_bytes()
    start = time.perf_counter()
    if row in ("trl_dense", "kdistill_dense"):
        with torch.no_grad():
            t_logits = h_t @ w_t.T
        s_logits = h_s @ w_s.T
        if row == "trl_dense":
            loss = GKDTrainer.generalized_jsd_loss(
                s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:], beta=0.5
            )
        else:
            loss = L.GeneralizedJSD(beta=0.5)(s_logits, t_logits, labels)
    else:
        from kdistill.losses.chunked import HeadInput, chunked_token_loss

        teacher = (
            t_logits if row == "kdistill_chunked_teacher_logits" else HeadInput(h_t, w_t, None)
        )
        loss = chunked_token_loss(
            L.GeneralizedJSD(beta=0.5),
            HeadInput(h_s, w_s, None),
            labels,
            teacher,
            chunk_size=spec["chunk_size"],
        )
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    return {
        "peak_rise_bytes": peak - base,
        "seconds": time.perf_counter() - start,
        "loss": float(loss),
        "measure": "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM rise",
    }


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def part_memory(args) -> dict:
    rows = {}
    have_chunked = True
    try:
        import kdistill.losses.chunked  # noqa: F401
    except ImportError as error:
        have_chunked = f"kdistill.losses.chunked does not exist here ({error})"
    have_trl = import_trl()[3]
    logits_bytes = args.memory_tokens * args.memory_vocab * 4
    for row in args.memory_rows.split(","):
        if row not in MEMORY_ROWS:
            raise SystemExit(f"--memory-rows: unknown row {row!r}; choose from {MEMORY_ROWS}")
        if row.startswith("kdistill_chunked") and have_chunked is not True:
            rows[row] = {"skipped": have_chunked}
            continue
        if row == "trl_dense" and have_trl:
            rows[row] = {"skipped": have_trl}
            continue
        tokens = args.memory_tokens
        free = available_bytes() if args.device == "cpu" else None
        while free is not None and ESTIMATED_COPIES[row] * tokens * args.memory_vocab * 4 > (
            0.4 * free
        ):
            tokens //= 2  # measured at fewer tokens, extrapolated linearly (said so)
        if tokens < 256:
            rows[row] = {"skipped": f"not enough memory ({free / 2**30:.1f} GiB available)"}
            continue
        spec = {
            "row": row,
            "tokens": tokens,
            "vocab": args.memory_vocab,
            "width": 256,
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "chunk_size": max(1, min(1024, tokens // 8)),
        }
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(kd.__file__).resolve().parents[1])},
        )
        if done.returncode != 0:
            rows[row] = {"error": done.stderr.strip().splitlines()[-1:]}
        else:
            rows[row] = json.loads(done.stdout.strip().splitlines()[-1])
            rows[row]["measured_tokens"] = tokens
            rows[row]["chunk_size"] = spec["chunk_size"] if "chunked" in row else None
            rise = rows[row]["peak_rise_bytes"]
            rows[row]["rise_at_requested_tokens"] = rise * args.memory_tokens / tokens
            rows[row]["copies"] = rise / (tokens * args.memory_vocab * 4)
            if tokens != args.memory_tokens:
                rows[row]["note"] = (
                    f"measured at {tokens} tokens (the estimate at {args.memory_tokens} exceeds "
                    f"40 % of the {free / 2**30:.1f} GiB available), scaled ×"
                    f"{args.memory_tokens / tokens:g}"
                )
        print(f"  {row}: {rows[row]}", flush=True)
    return {
        "tokens": args.memory_tokens,
        "vocab": args.memory_vocab,
        "width": 256,
        "one_logits_copy_bytes": logits_bytes,
        "rows": rows,
    }


# -- printing -----------------------------------------------------------------------------------
def fmt(x, digits=5) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def print_losses(report: dict) -> None:
    print(f"\n(a) losses on fixed batches ({report['data']}); kdistill = GeneralizedJSD(β, T),")
    print("    TRL(T) = generalized_jsd_loss(beta=β, temperature=T), trainer = as compute_loss")
    print("    calls it (no temperature)")
    print(
        "| batch | β | T | kdistill | TRL(T) | T²·TRL(T) | rel. diff | grad rel. diff |"
        " TRL trainer | TRL(1−β) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(
            f"| {r['batch']} | {r['beta']} | {r['T']:g} | {fmt(r['kdistill'], 6)} | "
            f"{fmt(r['trl_T'], 6)} | {fmt(r['trl_T_times_T2'], 6)} | "
            f"{r['rel_diff_converted']:.1e} | {r['grad_rel_diff_converted']:.1e} | "
            f"{fmt(r['trl_trainer'], 6)} | {fmt(r['trl_1_minus_beta'], 6)} |"
        )
    for key in (
        "endpoints",
        "reduction_without_labels",
        "num_items_in_batch",
        "minus_inf_logits",
        "fully_masked",
    ):
        print(f"\n{key}:")
        for name, value in report[key].items():
            print(f"  {name}: {fmt(value, 6)}")
    print("\nbf16 logits (relative error against float64 on the same bf16 logits):")
    for name, value in report["bf16_logits"].items():
        print(f"  {name}: TRL {value['trl_rel_err']:.1e}, kdistill {value['kdistill_rel_err']:.1e}")


def print_speed(report: dict) -> None:
    s = report["settings"]
    print(
        f"\n(b) training speed ({report['data']}, batch {s['batch_size']} × {s['seq_len']}, "
        f"{s['steps']} timed steps × {s['rounds']} rounds, {s['threads']} threads, "
        f"{s['device']} {s['dtype']})"
    )
    print("| mode | library | median step (ms) | mean step (ms) | tokens/s | notes |")
    print("|---|---|---:|---:|---:|---|")
    for key, entry in report["results"].items():
        mode, lib = key.split("/")
        if "skipped" in entry and not entry["steps"]:
            print(f"| {mode} | {lib} | — | — | — | {entry['skipped']} |")
            continue
        notes = ", ".join(
            f"{k}={v}" for k, v in entry["notes"].items() if k != "num_items_examples"
        )
        print(
            f"| {mode} | {lib} | {entry['median_step_s'] * 1e3:.0f} | "
            f"{entry['mean_step_s'] * 1e3:.0f} | {entry['tokens_per_s']:.0f} | {notes} |"
        )
    print(
        "  one offline step's pieces, timed alone (median ms): "
        + ", ".join(f"{name} {ms:.0f}" for name, ms in report["breakdown_ms"].items())
    )
    for key, ratio in report["ratio_kdistill_over_trl"].items():
        mark = "—" if ratio is None else ("✓" if ratio >= TARGET_SPEEDUP else "✗")
        print(f"  tokens/s ratio {key}: {fmt(ratio, 3)} (target ≥ {TARGET_SPEEDUP}) {mark}")


def print_memory(report: dict) -> None:
    print(
        f"\n(c) loss peak memory, V = {report['vocab']:,}, {report['tokens']:,} tokens "
        f"(one logits copy = {report['one_logits_copy_bytes'] / 2**30:.2f} GiB)"
    )
    print(
        "| loss | measured at tokens | peak rise (GiB) | × one logits copy | "
        f"at {report['tokens']:,} tokens (GiB) | seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row, value in report["rows"].items():
        if "peak_rise_bytes" not in value:
            why = value.get("skipped") or value.get("error")
            print(f"| {row} | — | — | — | — | {why} |")
            continue
        print(
            f"| {row} | {value['measured_tokens']:,} | {value['peak_rise_bytes'] / 2**30:.2f} | "
            f"{value['copies']:.1f} | {value['rise_at_requested_tokens'] / 2**30:.2f} | "
            f"{value['seconds']:.1f} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="losses,speed,memory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--modes", default="offline,on_policy", help="speed part's modes")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default="kjv", choices=("kjv", "random"))
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--memory-tokens", type=int, default=8192)
    parser.add_argument("--memory-vocab", type=int, default=32768)
    parser.add_argument("--memory-rows", default=",".join(MEMORY_ROWS))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 1, 1
        args.batch_size, args.seq_len = 2, 32
        args.memory_tokens, args.memory_vocab = 256, 2048
    torch.set_num_threads(args.threads)
    GKDTrainer, GKDConfig, trl_version, args.trl_missing = import_trl()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kdistill": str(Path(kd.__file__).resolve().parent),
        "command": " ".join(sys.argv),
        "versions": versions(),
        "nproc": os.cpu_count(),
        "load_average": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    parts = args.parts.split(",")
    started = time.perf_counter()
    if "losses" in parts:
        if GKDTrainer is None:
            report["losses"] = {"skipped": args.trl_missing}
        else:
            report["losses"] = part_losses(args, GKDTrainer)
            print_losses(report["losses"])
    if "speed" in parts:
        report["speed"] = part_speed(args, GKDTrainer, GKDConfig)
        print_speed(report["speed"])
    if "memory" in parts:
        report["memory"] = part_memory(args)
        print_memory(report["memory"])
    report["seconds"] = time.perf_counter() - started
    report["load_average_end"] = os.getloadavg()
    print(f"\n{report['seconds']:.0f} s; versions {report['versions']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
