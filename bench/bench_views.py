"""Consistent augmentation, cached: what building the teacher's outputs on E epochs of views
costs against distilling online for the same E epochs, and what the views take on disk.

    python bench/bench_views.py                                 # 8192 Fashion-MNIST images, E = 2
    python bench/bench_views.py --samples 4096 --epochs 3 --json bench/results/views.json
    python bench/bench_views.py --quick                         # smoke run (numbers meaningless)

One process, `--threads` intra-op threads (default 2), the classic pair (classic_teacher →
middle_student) on the first `--samples` Fashion-MNIST training images (random Gaussian inputs
when the files are absent), batches of 128 with a padded random crop (pad 2) and flips, views
keyed by (seed, epoch, index). Timed, in this order:

- ``online``   `fit` for E epochs, the teacher run on every augmented batch (0.9·KD + 0.1·CE);
- ``build``    `build_view_cache` (float32) over the same loader's E epochs of views;
- ``cached``   `fit` for E epochs reading the views (the teacher never runs; bit-identical
  student to ``online``, checked here);
- ``alone``    `fit` for E epochs of the student alone (CE) on the same views;
- then the storage options, each a build of its own over one epoch of views: float16,
  bfloat16 and top-3 (float16), with the storage error the build measures (max |Δ logit|,
  mean KL at T = 1 and 4).

Reported: seconds of each, build ÷ online, (build + cached) ÷ online (one distillation run),
the number of runs after which build-once beats online every time, and bytes per view.
Timings on a machine that other jobs share are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdistill import losses as L
from kdistill.data import ArrayDataset, Augmentation, BatchLoader, load_fashion_mnist
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.teacher.store import build_view_cache
from kdistill.engine import TrainConfig, fit
from kdistill.models import create_model


def data(samples: int) -> tuple[ArrayDataset, str]:
    try:
        train = load_fashion_mnist("train")
        return train.subset(torch.arange(min(samples, len(train))), "fashion_mnist"), "fashion"
    except Exception:  # noqa: BLE001 - the files are optional for a timing run
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(samples, 1, 28, 28, generator=generator)
        targets = torch.randint(0, 10, (samples,), generator=generator)
        return ArrayDataset(inputs, targets, [str(c) for c in range(10)], "noise"), "noise"


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    dataset, source = data(args.samples)
    augmentation = Augmentation(pad=2, flip=True)

    def loader():
        return BatchLoader(dataset, 128, shuffle=True, seed=0, augmentation=augmentation)

    torch.manual_seed(0)
    teacher = create_model("classic_teacher").eval()
    if args.teacher:
        from kdistill.engine.checkpoint import load_state_dict_file

        teacher.load_state_dict(load_state_dict_file(args.teacher))
    config = TrainConfig(epochs=args.epochs, lr=0.01, progress=False)

    def train(terms, cache=None):
        torch.manual_seed(1)
        distiller = Distiller(teacher, create_model("middle_student"), terms)
        started = time.perf_counter()
        fit(distiller, loader(), config, teacher_outputs=cache)
        return time.perf_counter() - started, distiller.student.state_dict()

    def kd_terms():
        return [Term(L.KD(temperature=4.0), weight=0.9), Term(L.CE(), weight=0.1)]

    results: dict = {"samples": len(dataset), "data": source, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as folder:
        warm = TrainConfig(epochs=1, lr=0.01, progress=False)  # first-call costs, not timed
        small = dataset.subset(torch.arange(256))
        fit(
            Distiller(teacher, create_model("middle_student"), kd_terms()),
            BatchLoader(small, 128, augmentation=augmentation),
            warm,
        )
        online, online_state = train(kd_terms())
        started = time.perf_counter()
        cache = build_view_cache(teacher, loader(), Path(folder) / "f32", args.epochs)
        build = time.perf_counter() - started
        cached, cached_state = train(kd_terms(), cache)
        alone, _ = train([Term(L.CE())])
        identical = all(torch.equal(online_state[k], cached_state[k]) for k in online_state)
        results["seconds"] = {"online": online, "build": build, "cached": cached, "alone": alone}
        results["bit_identical"] = identical
        results["ratios"] = {
            "build / online": build / online,
            "(build + cached) / online": (build + cached) / online,
            "cached / alone": cached / alone,
        }
        # build once, then k runs: build + k·cached < k·online from k > build / (online − cached)
        results["runs_to_break_even"] = build / max(online - cached, 1e-9)
        views = len(dataset) * args.epochs
        # bytes per view without the input signatures (16 bytes a view, whatever the dtype)
        storage = {"float32": {"bytes_per_view": (cache.nbytes() - 16 * views) / views}}
        for name, options in (
            ("float16", {"dtype": "float16"}),
            ("bfloat16", {"dtype": "bfloat16"}),
            ("top-3 float16", {"dtype": "float16", "topk": 3}),
        ):
            other = build_view_cache(teacher, loader(), Path(folder) / name, 1, **options)
            errors = other.errors["output"]
            storage[name] = {
                "bytes_per_view": (other.nbytes() - 16 * len(dataset)) / len(dataset),
                "max_abs_error": errors["max_abs_error"],
                "mean_kl_T1": errors.get("mean_kl_T1"),
                "mean_kl_T4": errors.get("mean_kl_T4"),
            }
        results["storage"] = storage
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", help="trained classic_teacher weights (safetensors)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.epochs = 512, 1
    results = run(args)
    seconds = results["seconds"]
    print(
        f"{results['samples']} {results['data']} images, {results['epochs']} epoch(s) of views, "
        f"batch 128, {args.threads} thread(s)"
    )
    print("| step | seconds | × online |\n|---|---:|---:|")
    for name in ("online", "build", "cached", "alone"):
        print(f"| {name} | {seconds[name]:.2f} | {seconds[name] / seconds['online']:.3f} |")
    for name, value in results["ratios"].items():
        print(f"{name}: {value:.3f}")
    print(f"build once pays off from run {results['runs_to_break_even']:.2f} on")
    print(f"cached student bit-identical to the online one: {results['bit_identical']}")
    print("| storage | bytes / view | max abs error | mean KL T=1 | mean KL T=4 |")
    print("|---|---:|---:|---:|---:|")
    for name, row in results["storage"].items():
        print(
            f"| {name} | {row['bytes_per_view']:.0f} | {row.get('max_abs_error', 0):.3g} | "
            f"{row.get('mean_kl_T1') or 0:.3g} | {row.get('mean_kl_T4') or 0:.3g} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
