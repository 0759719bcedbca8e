"""Stored top-k teacher distributions on the KJV teacher: bytes per token and storage error.

For each k, `build_token_cache` stores the trained KJV teacher's (``runs/kjv_lm``, 4-layer GPT-2,
V = 2,048) top-k next-token distributions over a seeded subset of the training blocks, and this
script reports, on every counted position of those blocks:

- bytes per token stored (k ids + k log-probs + the rest's log-mass) against float16 logits;
- the build's own measurement: mean / max KL(full ‖ stored) and KL(stored ‖ full) in nats, the
  stored distribution's rest mass spread evenly over the V − k other tokens, and the rest mass;
- what a loss sees: forward and reverse KL from the teacher to a real student (the run's
  student trained alone, seed 0) computed on the full distributions and from the stored top-k
  ones (the (k + 1)-bucket divergence, ≤ the full one), and their relative gap.

Nothing is downloaded; the run folder is only read (the tokenizer is copied to a temporary
folder). Usage::

    python bench/bench_topk_cache.py [--run /work/main/runs/kjv_lm] [--blocks 256]
        [--ks 8,32,128] [--dtype float16] [--json bench/results/topk-cache.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdistill.data.text import kjv_splits
from kdistill.distill.teacher.store import build_token_cache
from kdistill.engine.checkpoint import load_weights, read_checkpoint_file
from kdistill.losses import ForwardKL, ReverseKL
from kdistill.models.lm import lm_student, lm_teacher


def _model(build, path: Path, vocab: int) -> torch.nn.Module:
    model = build(vocab_size=vocab)
    tensors, _ = read_checkpoint_file(path)
    load_weights(model, tensors, path.stem, str(path))
    return model.eval()


@torch.no_grad()
def _logits(model, blocks, batch: int = 32) -> torch.Tensor:
    parts = []
    for start in range(0, len(blocks), batch):
        inputs, _ = blocks.get_batch(torch.arange(start, min(start + batch, len(blocks))))
        parts.append(model(**inputs).logits.float())
    return torch.cat(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("/work/main/runs/kjv_lm"))
    parser.add_argument("--blocks", type=int, default=256, help="training blocks (seeded subset)")
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        shutil.copytree(args.run / "tokenizer", tokenizer_dir)
        splits = kjv_splits(tokenizer_dir=tokenizer_dir, train_limit=args.blocks, seed=0)
        blocks = splits.train
        vocab = blocks.vocab_size
        teacher = _model(lm_teacher, args.run / "models" / "teacher.safetensors", vocab)
        student = _model(lm_student, args.run / "models" / "small__alone__seed0.safetensors", vocab)
        teacher_logits = _logits(teacher, blocks)
        student_logits = _logits(student, blocks)
        labels = blocks.labels
        counted = int((labels[:, 1:] != -100).sum())
        t = args.temperature
        full = {
            "forward_kl": float(ForwardKL(temperature=t)(student_logits, teacher_logits, labels)),
            "reverse_kl": float(ReverseKL(temperature=t)(student_logits, teacher_logits, labels)),
        }
        rows = []
        for k in (int(k) for k in args.ks.split(",")):
            started = time.perf_counter()
            cache = build_token_cache(
                teacher,
                blocks,
                Path(tmp) / f"k{k}",
                topk=k,
                temperature=t,
                dtype=args.dtype,
                measure_positions=len(blocks) * blocks.block_size,  # every block
            )
            seconds = time.perf_counter() - started
            stored = cache.read(np.arange(len(blocks)))
            row = {
                "k": k,
                "bytes_per_token": cache.bytes_per_token,
                "build_seconds": round(seconds, 2),
                **cache.quality,
            }
            for name, loss in (("forward_kl", ForwardKL), ("reverse_kl", ReverseKL)):
                value = float(loss(temperature=t)(student_logits, stored, labels))
                row[f"{name}_topk"] = value
                row[f"{name}_relative_gap"] = (full[name] - value) / full[name]
            rows.append(row)
            print(json.dumps(row))
    dense = 2 * vocab
    lines = [
        f"KJV teacher ({args.run}), {len(blocks)} training blocks, {counted} counted positions, "
        f"V = {vocab}, T = {t:g}, {args.dtype}; float16 logits: {dense} B per token. Student: "
        f"small/alone/seed0, full forward KL {full['forward_kl']:.4f}, reverse KL "
        f"{full['reverse_kl']:.4f} nats/token.",
        "",
        "| k | bytes/token | vs fp16 logits | mean KL(full‖stored) | max | mean KL(stored‖full) "
        "| max | mean rest mass | max | forward KL gap | reverse KL gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['bytes_per_token']} | {r['bytes_per_token'] / dense:.1%} "
            f"| {r['mean_kl_full_stored']:.4f} | {r['max_kl_full_stored']:.3f} "
            f"| {r['mean_kl_stored_full']:.4f} | {r['max_kl_stored_full']:.3f} "
            f"| {r['mean_rest_mass']:.4f} | {r['max_rest_mass']:.3f} "
            f"| {r['forward_kl_relative_gap']:.2%} | {r['reverse_kl_relative_gap']:.2%} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "run": str(args.run),
                    "blocks": len(blocks),
                    "counted_positions": counted,
                    "vocab_size": vocab,
                    "temperature": t,
                    "dtype": args.dtype,
                    "full": full,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
