"""What the KJV text data costs: read + validate, train the byte-level BPE, tokenize + block,
and the token counts and bytes per token of each split (`kdistill.data.text.kjv_splits`).

    python bench/bench_kjv_data.py [--repeats 3] [--vocab-size 2048] [--block-size 128]
                                   [--models] [--json bench/results/kjv-data.json]

Each stage is timed `--repeats` times in one process (medians reported). "first run" trains
the tokenizer into an empty folder; "later runs" find it there and reuse it. `--models` adds
the time of one training step (forward + backward + AdamW, batch 32 × block) of `lm_teacher`
and `lm_student` on 1 and 2 threads, for budgeting the recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdistill.data.text import (
    DEFAULT_TEST_BOOKS,
    DEFAULT_VAL_BOOKS,
    chapter_documents,
    kjv_splits,
    load_or_train_tokenizer,
    read_kjv,
    split_books,
    text_blocks,
)


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def data_figures(repeats: int, vocab_size: int, block_size: int) -> dict:
    read_s, books = timed(read_kjv, repeats)
    train, val, test = split_books(books, DEFAULT_VAL_BOOKS, DEFAULT_TEST_BOOKS)
    documents = {
        s: chapter_documents(b) for s, b in (("train", train), ("val", val), ("test", test))
    }

    def fresh_tokenizer():
        with tempfile.TemporaryDirectory() as folder:
            return load_or_train_tokenizer(folder, documents["train"], vocab_size)[0]

    train_s, tokenizer = timed(fresh_tokenizer, repeats)
    block_s, blocks = timed(
        lambda: {s: text_blocks(d, tokenizer, block_size, s) for s, d in documents.items()},
        repeats,
    )
    with tempfile.TemporaryDirectory() as folder:
        first_s, first = timed(
            lambda: kjv_splits(tokenizer_dir=folder, vocab_size=vocab_size, block_size=block_size),
            1,
        )
        later_s, _ = timed(
            lambda: kjv_splits(tokenizer_dir=folder, vocab_size=vocab_size, block_size=block_size),
            repeats,
        )
    splits = first.info["splits"]
    return {
        "seconds": {
            "read_and_validate": read_s,
            "train_tokenizer": train_s,
            "tokenize_and_block": block_s,
            "kjv_splits_first_run": first_s,
            "kjv_splits_later_runs": later_s,
        },
        "splits": {
            s: {
                "books": len(splits[s]["books"]),
                "chapters": splits[s]["chapters"],
                "tokens": splits[s]["tokens"],
                "blocks": len(blocks[s]),
                "bytes": splits[s]["bytes"],
                "bytes_per_token": splits[s]["bytes_per_token"],
            }
            for s in ("train", "val", "test")
        },
        "vocab_size": tokenizer.get_vocab_size(),
        "block_size": block_size,
    }


def model_figures(vocab_size: int, block_size: int, steps: int = 3) -> dict:
    from kdistill.models import count_parameters, create_model

    results = {}
    for name in ("lm_teacher", "lm_student"):
        torch.manual_seed(0)
        model = create_model(name, vocab_size=vocab_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, vocab_size, (32, block_size))
        entry = {"parameters": count_parameters(model)}
        for threads in (1, 2):
            torch.set_num_threads(threads)

            def step(model=model, ids=ids, optimizer=optimizer):
                logits = model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

            step()  # warm-up
            entry[f"step_seconds_{threads}_threads"] = timed(step, steps)[0]
        results[name] = entry
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--models", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = data_figures(args.repeats, args.vocab_size, args.block_size)
    if args.models:
        results["models"] = model_figures(args.vocab_size, args.block_size)
    seconds = results["seconds"]
    print(
        f"## KJV data (vocab {results['vocab_size']}, block {results['block_size']}; "
        f"medians of {args.repeats})\n"
    )
    print("| stage | seconds |\n|---|---:|")
    for stage, value in seconds.items():
        print(f"| {stage.replace('_', ' ')} | {value:.2f} |")
    print("\n| split | books | chapters | tokens | blocks | bytes | bytes/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for split, row in results["splits"].items():
        print(
            f"| {split} | {row['books']} | {row['chapters']} | {row['tokens']:,} | "
            f"{row['blocks']:,} | {row['bytes']:,} | {row['bytes_per_token']:.3f} |"
        )
    for name, row in results.get("models", {}).items():
        print(
            f"\n{name}: {row['parameters']:,} parameters; one step 32×{args.block_size}: "
            f"{row['step_seconds_1_threads']:.2f} s (1 thread), "
            f"{row['step_seconds_2_threads']:.2f} s (2 threads)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
