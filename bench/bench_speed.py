"""Speed and peak memory of distillation: student alone, online, from the teacher cache, and the
cache build. Run it with ``kdistill bench`` or ``python bench/bench_speed.py``::

    python bench/bench_speed.py                      # classic + resnet pairs, batch 128, 2 threads
    python bench/bench_speed.py --quick              # smoke run: classic pair, batch 32, 3 steps
    python bench/bench_speed.py --json bench.json --pairs classic,classic_mini,resnet

What is measured, per teacher/student pair, each configuration in a fresh subprocess (so peak
memory is that configuration's alone), `--threads` intra-op threads (default 2):

- ``student``  one optimiser step of the student alone (CE): forward, backward, Adam step.
- ``teacher``  one teacher forward (inference mode), without taps and with one tapped layer
  (forward hooks collecting it); the two are timed alternately, the taps' cost is their ratio.
  Likewise a student training step whose loss reads a tapped layer (CE + mean square of it),
  tapped by `Taps` (a copy of the output, safe from later in-place changes) and by a bare hook
  keeping a reference (the value in-place code would change): the copy's cost is their ratio.
- ``online``   one distillation step (0.9·KD + 0.1·CE) with the teacher run on the batch.
- ``cached``   the same step with teacher logits read from a `TeacherCache` by sample index;
  offline, as a user with a big teacher would run it: the teacher is never loaded,
  `cache.stand_in()` (no weights) takes its place in the Distiller. Every lookup checks the
  batch's inputs against the signatures stored at build time (`kdistill.cache`).
- ``build``    a bare teacher inference pass over `--samples` samples (batches of 512, as the
  build), then `build_teacher_cache` over the same data; both timed twice, the faster kept.

- ``paired``   the student, teacher-forward, online and cached steps again, in one process,
  round-robin on the same batches (the order rotated every step), each with its own student
  copy and optimiser. The speed ratios come from here: steps measured side by side see the
  same machine, whereas separate processes started minutes apart on a shared machine can
  differ by 50 % for no reason of their own (we saw a student step of 6 ms in one process and
  9 ms in the next). The separate ``student`` / ``online`` / ``cached`` workers give each
  configuration's own peak memory. Two more entries price the cache's data check: the cached
  step with the check off (``cached_nocheck``: the same reads, no input signatures), and the
  check alone (``data_check``: the batch gathered from the dataset as the loader does, then
  only its signatures computed and compared are timed — `fit`'s order, where the lookup
  directly follows the loader; the index conversion every lookup does is not counted).

Speed: the median of the timed steps' wall-clock times after warm-up steps (the median shrugs
off the odd slow step of a shared machine); samples/s = batch size / median step time. With
`--repeats N` every configuration runs in N fresh processes (in turn) and the fastest is kept
(the peak memory is the largest of them; of the paired runs, the one with the smallest sum of
step times is kept whole, so its ratios stay paired): use it on a machine that other jobs share.
Peak memory: the subprocess's peak resident set size, `VmHWM` of /proc/self/status on Linux
(`getrusage(RUSAGE_SELF).ru_maxrss` elsewhere; on Linux ru_maxrss would start at the parent's
peak, which exec carries over). It counts torch's CPU allocations (invisible to tracemalloc)
and the cache pages read through the memory map, on top of the interpreter, torch and the
synthetic data (`base` = the peak before any model exists). Inputs are seeded Gaussian noise
of the pair's input shape: speed does not depend on the pixel values.

Targets from the issues (reported, never asserted): cached ≤ 1.15× student; online ≤ 1.05×
(teacher forward + student step); taps ≤ 1.03× the teacher forward without; a student step
through a tap that copies ≤ 1.03× one through a reference-keeping hook; cache build ≤ 1.1×
the bare inference pass; cached peak memory ≤ 1.1× the student-alone peak; the data check
≤ 3 % of a cached step (cached step with the check on vs off ≤ 1.03, and the check alone
≤ 0.03 of the cached step — the second is the steadier figure: a few-% difference between two
whole steps is near the noise of a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# teacher, student (name, kwargs), input shape, classes, tapped teacher and student layers
PAIRS = {
    "classic": {
        "teacher": ("classic_teacher", {}),
        "student": ("middle_student", {}),
        "input": (1, 28, 28),
        "classes": 10,
        "tap": "conv2",
        "student_tap": "conv2",
    },
    "classic_mini": {
        "teacher": ("classic_teacher", {}),
        "student": ("mini_student", {}),
        "input": (1, 28, 28),
        "classes": 10,
        "tap": "conv2",
        "student_tap": "conv",
    },
    "resnet": {
        "teacher": ("resnet20", {}),
        "student": ("resnet8", {"width": 8}),
        "input": (1, 28, 28),
        "classes": 10,
        "tap": "layer2",
        "student_tap": "layer2",
    },
}
DEFAULT_PAIRS = "classic,resnet"
MODES = ("student", "teacher", "online", "build", "cached", "paired")  # build makes the cache
BUILD_BATCH = 512


# -- the worker: one configuration, in its own process --------------------------------------------
def peak_rss_mib() -> float:
    """Peak resident set size of this process image so far, in MiB.

    Linux: `VmHWM` (KiB) — ru_maxrss is no good there, exec keeps the parent's high-water mark
    in it, so a worker started by a big parent would report the parent's peak. Elsewhere:
    ru_maxrss (macOS reports bytes, others KiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def make_model(pair: dict, role: str):
    """The pair's teacher or student, seeded; only what a configuration needs is ever built,
    so that its peak memory holds nothing else."""
    import torch

    from kdistill.models import create_model

    kwargs = {"in_channels": pair["input"][0], "num_classes": pair["classes"]}
    torch.manual_seed(0 if role == "teacher" else 1)
    name, extra = pair[role]
    model = create_model(name, **kwargs, **extra)
    return model.eval() if role == "teacher" else model


def make_data(pair: dict, samples: int):
    import torch

    from kdistill.data import ArrayDataset

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, *pair["input"], generator=generator)
    targets = torch.randint(0, pair["classes"], (samples,), generator=generator)
    return ArrayDataset(inputs, targets, [str(c) for c in range(pair["classes"])], "bench-noise")


def batches(data, batch_size: int):
    """Shuffled batches forever (epoch after epoch), as training sees them."""
    from kdistill.data import BatchLoader

    loader = BatchLoader(data, batch_size=batch_size, shuffle=True, seed=0, drop_last=True)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_steps(step, source, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step(next(source))
    times = []
    for _ in range(steps):
        batch = next(source)
        started = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - started)
    return times


class UncheckedReads:
    """A `TeacherCache`'s reads without the data check: what the check costs, for the bench
    only (training always checks)."""

    def __init__(self, cache):
        self.cache = cache

    def lookup(self, index, inputs=None):
        from kdistill.distill.teacher.store import _as_rows

        return self.cache._read_rows(_as_rows(index, self.cache.size, "bench"))


def data_check(cache, data):
    """The check alone, in `fit`'s order: the batch is gathered from the dataset (as the loader
    does, untimed), then its input signatures are computed and compared with the stored ones
    (timed; the step returns that time)."""
    from kdistill.distill.teacher.store import _as_rows

    def step(batch) -> float:
        inputs, _ = data.get_batch(batch.index)
        rows = _as_rows(batch.index, cache.size, "bench")  # a lookup needs them with or without
        started = time.perf_counter()
        cache.signatures.check(rows, inputs)
        return time.perf_counter() - started

    return step


def train_step(distiller, optimizer, cache=None):
    """What `fit` does per batch: (lookup,) forward, backward, optimiser step."""
    from kdistill.engine.loop import lookup_teacher

    device = next(distiller.student.parameters()).device

    def step(batch) -> None:
        output, features = lookup_teacher(cache, batch.index, batch.inputs, device)
        out = distiller(
            batch.inputs,
            target=batch.target,
            index=batch.index,
            teacher_output=output,
            teacher_features=features,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def paired_steps(args: argparse.Namespace, pair: dict, data, source, kd_terms) -> dict:
    """Student, teacher-forward, online and cached steps timed side by side, round-robin."""
    import torch

    from kdistill import losses as L
    from kdistill.distill.distiller import Distiller, Term
    from kdistill.distill.teacher.store import TeacherCache

    teacher = make_model(pair, "teacher")
    cache = TeacherCache.open(args.cache_dir, dataset=data)

    def distill_step(teacher_model, terms, teacher_outputs=None):
        distiller = Distiller(teacher_model, make_model(pair, "student"), terms)
        optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
        return train_step(distiller, optimizer, teacher_outputs)

    def teacher_forward(batch) -> None:
        with torch.inference_mode():
            teacher(batch.inputs)

    steps = {
        "student": distill_step(None, [Term(L.CE())]),
        "teacher": teacher_forward,
        "online": distill_step(teacher, kd_terms),
        "cached": distill_step(cache.stand_in(), kd_terms, cache),
        "cached_nocheck": distill_step(cache.stand_in(), kd_terms, UncheckedReads(cache)),
        "data_check": data_check(cache, data),
    }
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for number in range(args.warmup + args.steps):
        batch = next(source)
        turn = number % len(names)
        for name in names[turn:] + names[:turn]:
            started = time.perf_counter()
            own_time = steps[name](batch)  # a step that times itself returns its seconds
            if number >= args.warmup:
                elapsed = time.perf_counter() - started
                times[name].append(own_time if isinstance(own_time, float) else elapsed)
    return {name: summary(times[name], args.batch_size) for name in names}


def student_tap_steps(args: argparse.Namespace, pair: dict, student, source) -> dict:
    """Student steps reading a tapped layer: `Taps` (copy) and a bare hook (reference), in turn."""
    import torch
    import torch.nn.functional as F

    from kdistill.distill.taps import Taps

    layer = pair["student_tap"]
    module = dict(student.named_modules())[layer]
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    kept: dict = {}

    def step(batch, feature) -> None:
        loss = F.cross_entropy(student(batch.inputs), batch.target) + feature().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(batch, copied: bool) -> float:
        if copied:
            taps = Taps(student, [layer], "student")
            feature, remove = (lambda: taps.collect()[layer]), taps.close
        else:
            handle = module.register_forward_hook(lambda m, i, o: kept.update(feature=o))
            feature, remove = (lambda: kept["feature"]), handle.remove
        started = time.perf_counter()
        step(batch, feature)
        seconds = time.perf_counter() - started
        remove()
        return seconds

    for number in range(args.warmup):
        timed(next(source), copied=number % 2 == 0)
    reference, copied = [], []
    for _ in range(args.steps):
        batch = next(source)
        reference.append(timed(batch, copied=False))
        copied.append(timed(batch, copied=True))
    return {
        "layer": layer,
        "reference": summary(reference, args.batch_size),
        "copied": summary(copied, args.batch_size),
    }


def summary(times: list[float], batch_size: int) -> dict:
    median = statistics.median(times)
    return {
        "step_ms": round(median * 1e3, 4),
        "samples_per_s": round(batch_size / median, 1),
        "steps": len(times),
        "min_step_ms": round(min(times) * 1e3, 4),
    }


def worker(args: argparse.Namespace) -> dict:
    import torch

    from kdistill import losses as L
    from kdistill.distill.distiller import Distiller, Term
    from kdistill.distill.taps import Taps
    from kdistill.distill.teacher.store import TeacherCache, build_teacher_cache

    torch.set_num_threads(args.threads)
    pair = PAIRS[args.pair]
    data = make_data(pair, max(args.samples, 2 * args.batch_size))  # the same in every mode
    base = peak_rss_mib()
    teacher = make_model(pair, "teacher") if args.mode not in ("student", "cached") else None
    student = make_model(pair, "student")
    result: dict = {"pair": args.pair, "mode": args.mode, "threads": torch.get_num_threads()}
    source = batches(data, args.batch_size)
    kd_terms = [Term(L.KD(temperature=4.0), weight=0.9), Term(L.CE(), weight=0.1)]

    if args.mode == "student":
        distiller = Distiller(None, student, [Term(L.CE())])
        optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
        times = time_steps(train_step(distiller, optimizer), source, args.warmup, args.steps)
        result.update(summary(times, args.batch_size))
    elif args.mode in ("online", "cached"):
        cache = None
        if args.mode == "cached":  # offline: a weightless stand-in, the teacher is not loaded
            cache = TeacherCache.open(args.cache_dir, dataset=data)
            teacher = cache.stand_in()
        distiller = Distiller(teacher, student, kd_terms)
        optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
        step = train_step(distiller, optimizer, cache)
        result.update(summary(time_steps(step, source, args.warmup, args.steps), args.batch_size))
    elif args.mode == "teacher":
        taps = Taps(teacher, [pair["tap"]], "teacher")
        taps.close()  # registered only while timed

        def forward(batch, tapped: bool) -> None:
            with torch.inference_mode():
                if tapped:
                    taps.clear()
                    teacher(batch.inputs)
                    taps.collect()
                else:
                    teacher(batch.inputs)

        plain, tapped = [], []
        for _ in range(args.warmup):
            forward(next(source), False)
        for _ in range(args.steps):  # alternate, so load changes hit both alike
            batch = next(source)
            started = time.perf_counter()
            forward(batch, False)
            plain.append(time.perf_counter() - started)
            taps = Taps(teacher, [pair["tap"]], "teacher")
            started = time.perf_counter()
            forward(batch, True)
            tapped.append(time.perf_counter() - started)
            taps.close()
        result.update(summary(plain, args.batch_size))
        result["tapped"] = {"layer": pair["tap"], **summary(tapped, args.batch_size)}
        result["student_tap"] = student_tap_steps(args, pair, student, source)
    elif args.mode == "paired":
        result["steps"] = paired_steps(args, pair, data, source, kd_terms)
    elif args.mode == "build":
        from kdistill.data import BatchLoader

        def inference_pass() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for batch in BatchLoader(data, batch_size=BUILD_BATCH):
                    teacher(batch.inputs)
            return time.perf_counter() - started

        def build() -> float:
            started = time.perf_counter()
            build_teacher_cache(teacher, data, args.cache_dir, batch_size=BUILD_BATCH)
            return time.perf_counter() - started

        with torch.inference_mode():
            teacher(data.inputs[:BUILD_BATCH])  # warm-up
        inference = min(inference_pass(), inference_pass())
        built = min(build(), build())
        result["inference"] = {
            "seconds": round(inference, 4),
            "samples_per_s": round(len(data) / inference, 1),
        }
        result.update(seconds=round(built, 4), samples_per_s=round(len(data) / built, 1))
        result["samples"] = len(data)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["base_rss_mib"] = round(base, 1)
    return result


# -- the parent: runs the workers, computes ratios, prints and writes ----------------------------
def run_worker(mode: str, pair: str, args: argparse.Namespace, cache_dir: Path) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--pairs",
        pair,
        "--cache-dir",
        str(cache_dir),
        *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {pair}/{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_SHARED = ("batch_size", "threads", "steps", "warmup", "samples")  # passed on to the workers


def ratios(r: dict) -> dict:
    """The targets' ratios: speed from the paired run, taps from the teacher worker (which
    alternates the two), build from the build worker, memory from the separate workers."""
    paired = r["paired"]["steps"]
    student, teacher = paired["student"]["step_ms"], paired["teacher"]["step_ms"]
    return {
        "online_vs_student": paired["online"]["step_ms"] / student,
        "cached_vs_student": paired["cached"]["step_ms"] / student,
        "online_vs_teacher_plus_student": paired["online"]["step_ms"] / (teacher + student),
        "taps_vs_no_taps": r["teacher"]["tapped"]["step_ms"] / r["teacher"]["step_ms"],
        "student_tap_copy_vs_reference": r["teacher"]["student_tap"]["copied"]["step_ms"]
        / r["teacher"]["student_tap"]["reference"]["step_ms"],
        "build_vs_inference": r["build"]["seconds"] / r["build"]["inference"]["seconds"],
        "cached_memory_vs_student": r["cached"]["peak_rss_mib"] / r["student"]["peak_rss_mib"],
        "cached_check_on_vs_off": paired["cached"]["step_ms"] / paired["cached_nocheck"]["step_ms"],
        "data_check_vs_cached": paired["data_check"]["step_ms"] / paired["cached"]["step_ms"],
    }


TARGETS = {
    "cached_vs_student": 1.15,
    "online_vs_teacher_plus_student": 1.05,
    "taps_vs_no_taps": 1.03,
    "student_tap_copy_vs_reference": 1.03,
    "build_vs_inference": 1.10,
    "cached_memory_vs_student": 1.10,
    "cached_check_on_vs_off": 1.03,
    "data_check_vs_cached": 0.03,
}


def table(results: dict) -> str:
    lines = [
        "| pair | configuration | samples/s | ms / batch | × student step | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in results["pairs"].items():
        paired = r["paired"]["steps"]
        student = paired["student"]["step_ms"]
        pair = PAIRS[name]
        label = f"{name} ({pair['teacher'][0]} → {pair['student'][0]})"
        tapped = r["teacher"]["tapped"]
        rows = [  # (text, speed, peak memory): speed of the paired run, memory of its own worker
            ("student alone (CE step)", paired["student"], r["student"]),
            ("teacher forward", paired["teacher"], r["teacher"]),
            (  # the tapped forward is timed against the plain one in the teacher worker
                f"teacher forward + tap `{tapped['layer']}`",
                {
                    "step_ms": paired["teacher"]["step_ms"] * r["ratios"]["taps_vs_no_taps"],
                    "samples_per_s": paired["teacher"]["samples_per_s"]
                    / r["ratios"]["taps_vs_no_taps"],
                },
                {},
            ),
            ("online distillation step", paired["online"], r["online"]),
            ("cached distillation step", paired["cached"], r["cached"]),
            ("cached step, data check off", paired["cached_nocheck"], {}),
            ("data check alone (input signatures)", paired["data_check"], {}),
        ]
        for text, speed, memory in rows:
            rss = f"{memory['peak_rss_mib']:.0f}" if "peak_rss_mib" in memory else ""
            lines.append(
                f"| {label} | {text} | {speed['samples_per_s']:,.0f} | {speed['step_ms']:.2f} | "
                f"{speed['step_ms'] / student:.2f}× | {rss} |"
            )
        build = r["build"]
        lines.append(
            f"| {label} | teacher inference pass ({build['samples']} samples) | "
            f"{build['inference']['samples_per_s']:,.0f} | | | |"
        )
        lines.append(
            f"| {label} | cache build (float32 logits) | {build['samples_per_s']:,.0f} | | | "
            f"{build['peak_rss_mib']:.0f} |"
        )
    lines.append("")
    lines.append("| pair | check | measured | target |")
    lines.append("|---|---|---:|---:|")
    for name, r in results["pairs"].items():
        for key, limit in TARGETS.items():
            value = r["ratios"][key]
            mark = "✓" if value <= limit else "✗"
            lines.append(f"| {name} | {key.replace('_', ' ')} | {value:.3f} {mark} | ≤ {limit} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with `kdistill bench`)."""
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, small data")
    parser.add_argument("--pairs", default=None, help=f"comma-separated of {sorted(PAIRS)}")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (quick: 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 60)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10)")
    parser.add_argument(
        "--samples", type=int, default=None, help="samples of the cache build (default 8192)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every configuration in this many fresh processes; keep the fastest",
    )


def run(args: argparse.Namespace) -> dict:
    quick = args.quick
    args.pairs = args.pairs or ("classic" if quick else DEFAULT_PAIRS)
    args.batch_size = args.batch_size or (32 if quick else 128)
    args.steps = args.steps or (3 if quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10)
    args.samples = args.samples or (256 if quick else 8192)
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        raise SystemExit(f"bench: unknown pairs {unknown}; known: {sorted(PAIRS)}")
    import torch

    results: dict = {
        "settings": {k: getattr(args, k) for k in _SHARED}
        | {"quick": quick, "repeats": args.repeats},
        "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "pairs": {},
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        for pair in pairs:
            measured: dict = {}
            for repeat in range(args.repeats):
                for mode in MODES:
                    print(
                        f"bench: {pair} / {mode} ({repeat + 1}/{args.repeats}) …",
                        file=sys.stderr,
                        flush=True,
                    )
                    new = run_worker(mode, pair, args, Path(tmp) / pair)
                    measured[mode] = best_of(measured.get(mode), new)
            measured["ratios"] = {k: float(f"{v:.5g}") for k, v in ratios(measured).items()}
            results["pairs"][pair] = measured
    return results


def best_of(old: dict | None, new: dict) -> dict:
    """Of two runs of one configuration, the faster (a shared machine only ever slows a run
    down); peak memory is the larger of the two."""
    if old is None:
        return new
    if new["mode"] == "paired":

        def speed(run):
            return sum(step["step_ms"] for step in run["steps"].values())
    else:
        key = "seconds" if new["mode"] == "build" else "step_ms"

        def speed(run):
            return run[key]

    best = dict(new if speed(new) < speed(old) else old)
    best["peak_rss_mib"] = max(old["peak_rss_mib"], new["peak_rss_mib"])
    best["repeats"] = old.get("repeats", 1) + 1
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.pair, args.mode = args.pairs, args.worker
        print(json.dumps(worker(args)))
        return 0
    started = time.perf_counter()
    results = run(args)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    print(f"\n({results['seconds']} s; batch {args.batch_size}, {args.threads} threads)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
