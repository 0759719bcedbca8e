"""kdistill against torchdistill and a plain PyTorch loop, side by side in one process.

Run it with ``kdistill bench --versus`` or ``python bench/bench_versus.py``::

    python bench/bench_versus.py --json bench/results/versus.json      # classic + resnet
    python bench/bench_versus.py --quick                               # smoke run
    /work/venv-td/bin/python bench/bench_versus.py …                   # with torchdistill

Every configuration trains the same student on the same batches with the same loss,
0.9·KD(T=4) + 0.1·CE, Adam (lr 1e-3), `--threads` intra-op threads (default 2):

- ``plain``          a plain PyTorch loop: teacher under ``torch.no_grad``, the loss written out
  (``F.kl_div`` on log-softmax / softmax, ``batchmean``, × T²), backward, Adam step.
- ``torchdistill``   torchdistill's ``DistillationBox`` (``KDLoss``, alpha 0.1, in a
  ``WeightedSumLoss``): ``forward_process`` then ``post_forward_process`` (backward + step), as
  its training loop calls them. Only when ``import torchdistill`` works (see bench/README.md for
  the arrangement that makes it import on a CPU-only torch); otherwise left out, with the reason.
- ``online``         a kdistill `Distiller` step, the eager teacher run every step.
- ``online_fast``    the same with ``teacher_speedup="auto"`` (fold + channels_last here).
- ``online_compile`` with ``--compile``: ``teacher_speedup=fold,channels_last,compile``.
- ``cached``         the kdistill step reading the teacher's logits from `MemoryTeacherOutputs`.
- ``student``        the student alone (CE), a kdistill step.
- ``teacher``, ``teacher_fast``, ``teacher_bf16`` (``--bf16``): the teacher forward alone,
  eager, sped up (auto) and in bf16 — where the online step's time goes.
- ``fit_cached``, ``fit_online``, ``fit_online_fast``, ``fit_student``: `kd.fit`, one epoch of
  the same batches, end to end (loader, lookups, bookkeeping included; fit's own clock, which
  starts after its set-up): ms per batch = epoch seconds / batches.

Round-robin: each repetition runs every configuration for a block of `--steps` batches, the
order rotated every repetition, so all of them see the same machine; the step configurations
report the median step time over all their steps (batches fetched outside the clock), the fit
configurations the median over repetitions of their per-batch time. Minor page faults per step
(``getrusage().ru_minflt``) are counted alongside.

The whole round-robin runs twice, each time in a fresh process: with glibc's default malloc
thresholds (``malloc=default``, as any program runs) and with `kdistill.retain_freed_memory`
(``malloc=retained``, as the ``kdistill`` command runs). Ratios within one process are the fair
ones; the "as shipped" comparison (kdistill retained vs torchdistill default) crosses processes.

The loss check: on one fixed batch (64 samples), from students with the same initial weights,
the loss of each implementation; kdistill's must equal torchdistill's (or the plain loop's)
within 1e-5 relative. The bf16 teacher's change of that loss is reported too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
SRC = HERE.parent / "src"
if SRC.exists() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from bench_speed import PAIRS, make_data, make_model  # noqa: E402

DEFAULT_PAIRS = "classic,resnet"
TEMPERATURE, ALPHA = 4.0, 0.9  # loss = ALPHA·KD + (1 − ALPHA)·CE
MALLOC_MODES = ("default", "retained")
TARGETS = {  # from the issue; reported, never asserted
    "online_fast_vs_torchdistill": (">=", 1.3),
    "fit_cached_vs_student": ("<=", 1.15),
    "fit_online_vs_online": ("<=", 1.05),
    "fit_online_fast_vs_online_fast": ("<=", 1.05),
    "loss_rel_diff_vs_reference": ("<=", 1e-5),
}


# -- torchdistill, when it imports ---------------------------------------------------------------
def import_torchdistill():
    """(DistillationBox, None) or (None, why not).

    The PyPI torchvision wheel is a CUDA build: its compiled ops (`torchvision._C`) need
    libtorch_cuda and do not load on a CPU-only torch, and torchvision 0.28's
    `_meta_registrations` then fails on `register_fake("torchvision::nms")` for an operator that
    does not exist. torchdistill uses none of those ops for classification, so declaring the
    two schemas (no kernels) lets torchvision's Python part import; calling nms would fail.
    """
    import torch

    try:
        import torchdistill  # noqa: F401
    except ImportError as error:
        return None, f"torchdistill is not installed ({error})"
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            return None, f"torchvision does not import: {error}"
        library = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive below)
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchdistill.library = library
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        import torchvision  # noqa: F401
    except ImportError as error:
        return None, f"torchvision is not installed ({error})"
    import torchdistill.core.interfaces.forward_proc  # noqa: F401 (registers the forward procs)
    from torchdistill.core.distillation import DistillationBox

    return DistillationBox, None


def torchdistill_box(DistillationBox, teacher, student, device):
    config = {
        "num_epochs": 1,
        "teacher": {"requires_grad": False, "forward_proc": "forward_batch_only"},
        "student": {"requires_grad": True, "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "Adam", "kwargs": {"lr": 1e-3}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                "temperature": TEMPERATURE,
                                "alpha": 1 - ALPHA,  # torchdistill's alpha weighs the CE
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }
    box = DistillationBox(teacher, student, {}, config, device, None, False, 1)
    box.teacher_model.eval()
    box.student_model.train()
    return box


# -- the worker -----------------------------------------------------------------------------------
def plain_loss(student_logits, teacher_logits, target):
    import torch.nn.functional as F

    t = TEMPERATURE
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
    )
    return ALPHA * t * t * soft + (1 - ALPHA) * F.cross_entropy(student_logits, target)


def worker(args: argparse.Namespace) -> dict:
    import torch

    import kdistill as kd
    from kdistill import losses as L
    from kdistill.allocator import minor_page_faults, retain_freed_memory
    from kdistill.data import BatchLoader
    from kdistill.distill.teacher.store import MemoryTeacherOutputs
    from kdistill.engine.loop import lookup_teacher

    retained = retain_freed_memory() if args.malloc == "retained" else False
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pair = PAIRS[args.pair]
    batch_size, steps = args.batch_size, args.steps
    data = make_data(pair, batch_size * steps)
    loader = BatchLoader(data, batch_size=batch_size, shuffle=True, seed=0, drop_last=True)
    teacher = make_model(pair, "teacher").to(device)
    student0 = make_model(pair, "student")

    def student():
        return copy.deepcopy(student0).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def terms():
        return [kd.Term(L.KD(temperature=TEMPERATURE), ALPHA), kd.Term(L.CE(), 1 - ALPHA)]

    memory = MemoryTeacherOutputs.predict(teacher, BatchLoader(data, batch_size=512), device)
    result: dict = {
        "pair": args.pair,
        "malloc": args.malloc,
        "retained": retained,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }

    # the configurations: a step(batch) each, or an epoch() for kd.fit
    def distill_step(distiller, cached=False):
        optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
        source = memory if cached else None

        def step(batch):
            output, features = lookup_teacher(source, batch.index, batch.inputs, device)
            out = distiller(
                batch.inputs.to(device),
                target=batch.target.to(device),
                index=batch.index,
                teacher_output=output,
                teacher_features=features,
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()

        return step

    def plain_step():
        model = student()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(batch):
            x, y = batch.inputs.to(device), batch.target.to(device)
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = plain_loss(model(x), teacher_logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def teacher_forward(model):
        def step(batch):
            with torch.inference_mode():
                model(batch.inputs.to(device))

        return step

    def fit_epoch(distiller, cached=False):
        config = kd.TrainConfig(
            epochs=1,
            batch_size=batch_size,
            lr=1e-3,
            schedule="constant",
            progress=False,
            device=str(device),
        )

        def epoch():
            fitted = kd.fit(distiller, loader, config, teacher_outputs=memory if cached else None)
            return fitted.seconds

        return epoch

    steps_of: dict = {
        "plain": plain_step(),
        "online": distill_step(kd.Distiller(teacher, student(), terms())),
        "online_fast": distill_step(
            kd.Distiller(teacher, student(), terms(), teacher_speedup="auto")
        ),
        "cached": distill_step(kd.Distiller(teacher, student(), terms()), cached=True),
        "student": distill_step(kd.Distiller(None, student(), [kd.Term(L.CE())])),
        "teacher": teacher_forward(teacher),
    }
    DistillationBox, why = import_torchdistill()
    result["torchdistill"] = why  # replaced by the version when it imports
    if DistillationBox is not None:
        import torchdistill

        result["torchdistill"] = torchdistill.__version__
        box = torchdistill_box(DistillationBox, teacher, student(), device)

        def td_step(batch):
            x, y = batch.inputs.to(device), batch.target.to(device)
            loss = box.forward_process(x, y, {})
            box.post_forward_process(loss=loss)

        steps_of["torchdistill"] = td_step
    if args.compile:
        steps_of["online_compile"] = distill_step(
            kd.Distiller(teacher, student(), terms(), teacher_speedup="fold,channels_last,compile")
        )
    # the sped-up teacher alone, prepared on a first batch (as the distiller does)
    from kdistill.distill.teacher.speedup import FastTeacher

    first = next(iter(loader)).inputs.to(device)
    fast_teacher, _, _ = FastTeacher.prepare(teacher, ("auto",), [], first)
    runner = fast_teacher.runner or teacher
    steps_of["teacher_fast"] = teacher_forward(runner)
    slow_steps = {}
    if args.bf16:
        bf16_teacher, _, _ = FastTeacher.prepare(teacher, ("bf16",), [], first)
        slow_steps["teacher_bf16"] = teacher_forward(bf16_teacher.runner)
    epochs_of = {
        "fit_cached": fit_epoch(kd.Distiller(teacher, student(), terms()), cached=True),
        "fit_online": fit_epoch(kd.Distiller(teacher, student(), terms())),
        "fit_online_fast": fit_epoch(
            kd.Distiller(teacher, student(), terms(), teacher_speedup="auto")
        ),
        "fit_student": fit_epoch(kd.Distiller(None, student(), [kd.Term(L.CE())])),
    }

    # one warm-up pass of everything (prepares the sped-up teachers, compiles), then timed
    # repetitions, round-robin
    batches = list(loader)
    names = list(steps_of) + list(slow_steps) + list(epochs_of)
    step_times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}
    warm_seconds: dict[str, float] = {}
    for repeat in range(args.repeats + 1):
        turn = repeat % len(names)
        for name in names[turn:] + names[:turn]:
            if name in epochs_of:
                before = minor_page_faults()
                seconds = epochs_of[name]()
                if repeat:
                    step_times[name].append(seconds / len(batches))
                    faults[name].append((minor_page_faults() - before) / len(batches))
                else:
                    warm_seconds[name] = seconds
                continue
            step = steps_of.get(name) or slow_steps[name]
            block = batches if name in steps_of else batches[: max(1, len(batches) // 8)]
            started_block = time.perf_counter()
            for batch in block if repeat else block[:2]:
                before, started = minor_page_faults(), time.perf_counter()
                step(batch)
                sync()
                elapsed = time.perf_counter() - started
                if repeat:
                    step_times[name].append(elapsed)
                    faults[name].append(minor_page_faults() - before)
            if not repeat:
                warm_seconds[name] = time.perf_counter() - started_block

    result["configs"] = {
        name: {
            "step_ms": round(statistics.median(times) * 1e3, 3),
            "samples_per_s": round(batch_size / statistics.median(times), 1),
            "faults_per_step": round(statistics.median(faults[name]), 1),
            "measured": len(times),
            "warmup_s": round(warm_seconds.get(name, 0.0), 2),
        }
        for name, times in step_times.items()
    }
    result["loss_check"] = loss_check(
        kd, L, teacher, student0, data, device, DistillationBox, args.bf16
    )
    result["speedup"] = {"auto": fast_teacher.report.describe()}
    return result


def loss_check(kd, L, teacher, student0, data, device, DistillationBox, bf16: bool) -> dict:
    """The loss of one fixed batch, from identical students, by each implementation."""
    import torch

    batch = data.get_batch(torch.arange(min(64, len(data))))
    x, y = batch[0].to(device), batch[1].to(device)
    terms = [kd.Term(L.KD(temperature=TEMPERATURE), ALPHA), kd.Term(L.CE(), 1 - ALPHA)]

    def fresh():
        return copy.deepcopy(student0).to(device)

    with torch.no_grad():
        teacher_logits = teacher(x)
    losses = {"plain": float(plain_loss(fresh()(x), teacher_logits, y))}
    losses["kdistill"] = float(kd.Distiller(teacher, fresh(), terms)(x, target=y).loss)
    fast = kd.Distiller(teacher, fresh(), terms, teacher_speedup="auto")
    fast(x, target=y)  # the first call checks the copy and returns the eager teacher's values
    losses["kdistill_fast"] = float(fast(x, target=y).loss)
    if bf16:
        half = kd.Distiller(teacher, fresh(), terms, teacher_speedup="bf16")
        half(x, target=y)
        losses["kdistill_bf16"] = float(half(x, target=y).loss)
    if DistillationBox is not None:
        box = torchdistill_box(DistillationBox, teacher, fresh(), device)
        losses["torchdistill"] = float(box.forward_process(x, y, {}))
    reference = "torchdistill" if "torchdistill" in losses else "plain"
    rel = {
        name: abs(value - losses[reference]) / abs(losses[reference])
        for name, value in losses.items()
    }
    return {"reference": reference, "losses": losses, "rel_diff": rel}


# -- the parent ----------------------------------------------------------------------------------
def run_worker(pair: str, malloc: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--pairs",
        pair,
        "--malloc",
        malloc,
        *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED),
        *(["--compile"] if args.compile else []),
        *(["--bf16"] if args.bf16 else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)  # glibc's defaults unless the worker sets its own
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"versus worker {pair}/{malloc} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_SHARED = ("batch_size", "threads", "steps", "repeats", "device")


def ratios(runs: dict) -> dict:
    """The figures the issue asks for, from one pair's runs ({malloc: worker result})."""
    out: dict = {}
    for malloc, run in runs.items():
        c = {name: v["step_ms"] for name, v in run["configs"].items()}
        r = {
            "online_vs_plain": c["plain"] / c["online"],
            "online_fast_vs_plain": c["plain"] / c["online_fast"],
            "online_fast_vs_online": c["online"] / c["online_fast"],
            "cached_vs_student": c["cached"] / c["student"],
            "fit_cached_vs_student": c["fit_cached"] / c["student"],
            "fit_cached_vs_fit_student": c["fit_cached"] / c["fit_student"],
            "fit_online_vs_online": c["fit_online"] / c["online"],
            "fit_online_fast_vs_online_fast": c["fit_online_fast"] / c["online_fast"],
            "teacher_share_of_online": c["teacher"] / c["online"],
            "teacher_fast_vs_teacher": c["teacher"] / c["teacher_fast"],
        }
        if "torchdistill" in c:
            r["online_vs_torchdistill"] = c["torchdistill"] / c["online"]
            r["online_fast_vs_torchdistill"] = c["torchdistill"] / c["online_fast"]
            r["torchdistill_vs_plain"] = c["plain"] / c["torchdistill"]
        if "online_compile" in c:
            r["online_compile_vs_torchdistill"] = (
                c.get("torchdistill", c["plain"]) / c["online_compile"]
            )
        if "teacher_bf16" in c:
            r["teacher_bf16_vs_teacher"] = c["teacher"] / c["teacher_bf16"]
        r["loss_rel_diff_vs_reference"] = max(
            v for k, v in run["loss_check"]["rel_diff"].items() if k in ("kdistill", "plain")
        )
        out[malloc] = {k: float(f"{v:.4g}") for k, v in r.items()}
    if {"default", "retained"} <= set(runs):
        default = runs["default"]["configs"]
        retained = runs["retained"]["configs"]
        shipped = {
            "online_fast_retained_vs_plain_default": default["plain"]["step_ms"]
            / retained["online_fast"]["step_ms"],
            "retained_vs_default_online": default["online"]["step_ms"]
            / retained["online"]["step_ms"],
            "retained_vs_default_teacher": default["teacher"]["step_ms"]
            / retained["teacher"]["step_ms"],
        }
        if "torchdistill" in default:
            shipped["online_fast_retained_vs_torchdistill_default"] = (
                default["torchdistill"]["step_ms"] / retained["online_fast"]["step_ms"]
            )
        out["as_shipped"] = {k: float(f"{v:.4g}") for k, v in shipped.items()}
    return out


LABELS = {
    "plain": "plain PyTorch loop (online)",
    "torchdistill": "torchdistill 1.1.5 (online)",
    "online": "kdistill online, eager teacher",
    "online_fast": "kdistill online, teacher_speedup=auto",
    "online_compile": "kdistill online, fold+channels_last+compile",
    "cached": "kdistill cached (step)",
    "student": "student alone (step)",
    "fit_cached": "`kd.fit` cached, whole epoch",
    "fit_online": "`kd.fit` online eager, whole epoch",
    "fit_online_fast": "`kd.fit` online auto, whole epoch",
    "fit_student": "`kd.fit` student alone, whole epoch",
    "teacher": "teacher forward, eager",
    "teacher_fast": "teacher forward, auto",
    "teacher_bf16": "teacher forward, bf16",
}


def table(results: dict) -> str:
    lines = [
        "| pair | configuration | samples/s (malloc default) | samples/s (retained) | "
        "page faults / step (default → retained) |",
        "|---|---|---:|---:|---:|",
    ]
    for pair, runs in results["pairs"].items():
        first = next(iter(runs["runs"].values()))
        for name in LABELS:
            if name not in first["configs"]:
                continue
            cells = []
            for malloc in MALLOC_MODES:
                run = runs["runs"].get(malloc)
                cells.append(f"{run['configs'][name]['samples_per_s']:,.0f}" if run else "–")
            fault = " → ".join(
                f"{runs['runs'][m]['configs'][name]['faults_per_step']:,.0f}"
                for m in MALLOC_MODES
                if m in runs["runs"]
            )
            lines.append(f"| {pair} | {LABELS[name]} | {cells[0]} | {cells[1]} | {fault} |")
    lines += ["", "| pair | malloc | ratio | value | target |", "|---|---|---|---:|---:|"]
    for pair, runs in results["pairs"].items():
        for malloc, values in runs["ratios"].items():
            for key, value in values.items():
                target = TARGETS.get(key)
                mark = ""
                if target:
                    op, limit = target
                    ok = value >= limit if op == ">=" else value <= limit
                    mark = f"{op} {limit:g} {'✓' if ok else '✗'}"
                lines.append(
                    f"| {pair} | {malloc} | {key.replace('_', ' ')} | {value:.4g} | {mark} |"
                )
    for pair, runs in results["pairs"].items():
        for malloc, run in runs["runs"].items():
            if malloc == "default":
                check = run["loss_check"]
                lines.append(
                    f"\n{pair}: loss on a fixed batch of 64 — "
                    + ", ".join(f"{k} {v:.8g}" for k, v in check["losses"].items())
                    + f" (reference: {check['reference']}); torchdistill: {run['torchdistill']}"
                )
                lines.append(f"{pair}: {run['speedup']['auto']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="default", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps")
    parser.add_argument("--pairs", default=None, help=f"comma-separated of {sorted(PAIRS)}")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (quick: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=None, help="batches per block (default 16)")
    parser.add_argument("--repeats", type=int, default=None, help="round-robin rounds (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--bf16", action="store_true", help="also time a bf16 teacher")
    parser.add_argument(
        "--malloc-modes", default=",".join(MALLOC_MODES), help="default,retained (or one)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.batch_size = args.batch_size or (16 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.worker:
        args.pair = args.pairs
        print(json.dumps(worker(args)))
        return 0
    pairs = [
        p.strip() for p in (args.pairs or ("classic" if args.quick else DEFAULT_PAIRS)).split(",")
    ]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        raise SystemExit(f"bench: unknown pairs {unknown}; known: {sorted(PAIRS)}")
    modes = [m.strip() for m in args.malloc_modes.split(",") if m.strip()]
    started = time.perf_counter()
    results: dict = {
        "settings": {k: getattr(args, k) for k in _SHARED}
        | {"compile": args.compile, "bf16": args.bf16, "quick": args.quick},
        "python": sys.executable,
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
        "environment": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
        "pairs": {},
        "targets": TARGETS,
    }
    for pair in pairs:
        runs = {}
        for malloc in modes:
            print(f"versus: {pair}, malloc {malloc} …", file=sys.stderr, flush=True)
            runs[malloc] = run_worker(pair, malloc, args)
        results["pairs"][pair] = {"runs": runs, "ratios": ratios(runs)}
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_after"] = os.getloadavg()
    print(table(results))
    print(f"\n({results['seconds']} s; batch {args.batch_size}, {args.threads} threads)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
