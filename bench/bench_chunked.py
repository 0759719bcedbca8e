"""Chunked vocabulary loss against the dense token loss: peak memory and time of one forward +
backward at V = 32,768 and 8,192 tokens.

    OMP_NUM_THREADS=2 nice -n 10 python bench/bench_chunked.py            # the issue's sizes
    python bench/bench_chunked.py --chunk-size 2048 --repeats 3 --configs dense,chunked_head
    python bench/bench_chunked.py --quick                                   # smoke run
    python bench/bench_chunked.py --device cuda --dtype bf16                # on a GPU

Sizes (default): N = 8 sequences × L = 1024 tokens (8,192 positions, every label counted, so
M = 8 × 1023 = 8,184 scored positions after the shift), hidden width D = 256 for student and
teacher, vocabulary V = 32,768; float32 on the CPU (`--threads`, default 2). Inputs: the
student's last hidden states (``N×L×D``, requiring grad) and head (``V×D`` weight + bias, grad),
the teacher's hidden states and head, and — where a configuration takes them — the teacher's
dense logits ``N×L×V`` (1 GiB in float32), made before the measurement (an input, like the
teacher output a cache or an earlier forward would give).

Configurations, per loss (forward KL, JSD β = 0.5, and CE, which has no teacher):

- ``dense``           student logits ``h·Wᵀ + b`` then the loss of `kdistill.losses.token` on
  them and the teacher's given dense logits; forward + backward;
- ``dense_head``      (divergences) as ``dense`` but the teacher's logits are computed from its
  hidden states and head (no grad) inside the measurement: the baseline of ``chunked_head``;
- ``chunked_logits``  `chunked_token_loss` with the teacher's dense logits (rows read per chunk);
- ``chunked_head``    `chunked_token_loss` with the teacher as hidden states + head (its logits
  made per chunk, twice: forward and the recomputation in backward): neither side's ``N×L×V``
  exists.
- ``chunked_logits_fwdgrad`` / ``chunked_head_fwdgrad``: the same with ``recompute=False``.

Default configurations: dense, chunked_logits, chunked_head, chunked_logits_fwdgrad
(`--configs`); CE, which reads no teacher, runs dense and the chunked_logits ones.

Memory: each configuration runs in a fresh subprocess. After its inputs are built, the
process's peak resident set is reset (``/proc/self/clear_refs`` ← 5), one forward + backward
runs, and the peak is read from ``VmHWM`` of ``/proc/self/status``; reported is that peak minus
the resident set just before (``VmRSS``): the memory the loss computation itself adds, on top of
its inputs. (CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated memory before.)
Time: the first step's (default, ``--repeats 0``: one full-size step per configuration keeps
the run short on a shared 2-core machine), or the median of `--repeats` more steps timed after
it. `*_fwdgrad` configurations use ``recompute=False`` (gradients computed during the forward,
no recomputation in backward); the others recompute in backward, as the issue asks.

Ratios (chunked ÷ dense) are taken within one run of this script. Results go to
``bench/results/chunked-<date>.json`` (or `--json`) and a table is printed. Targets (issue 16):
peak ≤ 25 % of dense at ≤ 1.3× its time; printed as ✓/✗, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kdistill.losses import ForwardKL, GeneralizedJSD, HeadInput, TokenCE, chunked_token_loss

LOSSES = {
    "forward_kl": lambda: ForwardKL(),
    "jsd": lambda: GeneralizedJSD(beta=0.5),
    "ce": lambda: TokenCE(),
}
CONFIGS = (
    "dense",
    "dense_head",
    "chunked_logits",
    "chunked_head",
    "chunked_logits_fwdgrad",
    "chunked_head_fwdgrad",
)
DEFAULT_CONFIGS = "dense,chunked_logits,chunked_head,chunked_logits_fwdgrad"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _inputs(args, needs_teacher_logits: bool):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    n, length, d, v = args.batch, args.length, args.width, args.vocab

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    student = HeadInput(
        randn(n, length, d).requires_grad_(),
        randn(v, d, scale=d**-0.5).requires_grad_(),
        randn(v, scale=0.1).requires_grad_(),
    )
    teacher = HeadInput(randn(n, length, d), randn(v, d, scale=2 * d**-0.5), randn(v, scale=0.1))
    labels = torch.randint(0, v, (n, length), generator=g).to(device)
    teacher_logits = None
    if needs_teacher_logits:
        with torch.no_grad():
            teacher_logits = teacher.hidden @ teacher.weight.T + teacher.bias
    return student, teacher, teacher_logits, labels


def _step(args, loss_name: str, config: str, inputs) -> None:
    """One forward + backward of `config`; the gradients are dropped after."""
    student, teacher, teacher_logits, labels = inputs
    loss = LOSSES[loss_name]()
    if config.startswith("dense"):
        logits = student.hidden @ student.weight.T + student.bias
        if loss_name == "ce":
            value = loss(logits, labels)
        else:
            if config == "dense_head":
                with torch.no_grad():
                    teacher_logits = teacher.hidden @ teacher.weight.T + teacher.bias
            value = loss(logits, teacher_logits, labels)
        del logits, teacher_logits
    else:
        side = None if loss_name == "ce" else teacher
        if config.startswith("chunked_logits") and loss_name != "ce":
            side = teacher_logits
        value = chunked_token_loss(
            loss,
            student,
            labels,
            side,
            chunk_size=args.chunk_size,
            recompute=not config.endswith("_fwdgrad"),
        )
    value.backward()
    for tensor in (student.hidden, student.weight, student.bias):
        tensor.grad = None


def measure(args, loss_name: str, config: str) -> dict:
    """Run in a fresh process: the peak memory of one step over its inputs, then the time."""
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dense_teacher = config == "dense" or config.startswith("chunked_logits")
    inputs = _inputs(args, dense_teacher and loss_name != "ce")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    _step(args, loss_name, config, inputs)
    sync()
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _step(args, loss_name, config, inputs)
        sync()
        times.append(time.perf_counter() - start)
    return {
        "loss": loss_name,
        "config": config,
        "peak_bytes": peak - before,
        "first_s": first,
        "times_s": times,
        "median_s": statistics.median(times) if times else first,
    }


def configs_for(loss_name: str, configs: list[str]) -> list[str]:
    if loss_name == "ce":  # CE reads no teacher: the teacher's form makes no difference
        kept = [c for c in configs if c in ("dense", "chunked_logits", "chunked_logits_fwdgrad")]
        return kept or ["dense", "chunked_logits"]
    return configs


def baseline_of(config: str, measured: set[str]) -> str:
    if config.startswith("chunked_head") and "dense_head" in measured:
        return "dense_head"
    return "dense"


def run_all(args) -> dict:
    rows = []
    for loss_name in args.losses:
        for config in configs_for(loss_name, args.configs):
            command = [sys.executable, __file__, "--child", loss_name, config, *args.forward]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{loss_name}/{config} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"  {loss_name:11s} {config:15s} peak {row['peak_bytes'] / 2**30:6.2f} GiB  "
                f"median {row['median_s']:6.2f} s",
                flush=True,
            )
    by_key = {(r["loss"], r["config"]): r for r in rows}
    for row in rows:
        if row["config"].startswith("chunked"):
            measured = {r["config"] for r in rows if r["loss"] == row["loss"]}
            base_config = baseline_of(row["config"], measured)
            base = by_key[(row["loss"], base_config)]
            row["baseline"] = base_config
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
            row["time_ratio"] = row["median_s"] / base["median_s"]
            row["meets_target"] = row["memory_ratio"] <= 0.25 and row["time_ratio"] <= 1.3
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, "bench/bench_chunked.py", *sys.argv[1:]]),
        "sizes": {
            "N": args.batch,
            "L": args.length,
            "tokens": args.batch * args.length,
            "D": args.width,
            "V": args.vocab,
            "chunk_size": args.chunk_size,
        },
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "configs": args.configs,
        "memory": "peak RSS (VmHWM after clear_refs) minus RSS before the step"
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated minus memory_allocated before the step",
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        "| loss | configuration | peak over inputs | time (median) | memory ÷ dense | "
        "time ÷ dense | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratios = (
            f"{r['memory_ratio']:.1%} | {r['time_ratio']:.2f}× | "
            f"{'✓' if r['meets_target'] else '✗'} (vs {r['baseline']})"
            if "memory_ratio" in r
            else "— | — | —"
        )
        lines.append(
            f"| {r['loss']} | {r['config']} | {r['peak_bytes'] / 2**20:,.0f} MiB | "
            f"{r['median_s']:.2f} s | {ratios} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="forward_kl,jsd,ce")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed steps after the first (0: the first step, which also gives the memory)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("LOSS", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.vocab, args.width = 2, 64, 1024, 32
        args.chunk_size, args.repeats = min(args.chunk_size, 32), 1
    if args.child:
        print(json.dumps(measure(args, *args.child)))
        return
    args.losses = [name.strip() for name in args.losses.split(",")]
    args.configs = [name.strip() for name in args.configs.split(",")]
    if not set(args.configs) <= set(CONFIGS) or "dense" not in args.configs:
        parser.error(f"--configs must include dense and be among {', '.join(CONFIGS)}")
    unknown = sorted(set(args.losses) - set(LOSSES))
    if unknown:
        parser.error(f"unknown losses {unknown}; choose from {sorted(LOSSES)}")
    args.forward = [
        f"--{key.replace('_', '-')}={getattr(args, key)}"
        for key in ("batch", "length", "width", "vocab", "chunk_size", "repeats", "threads")
    ] + [f"--device={args.device}", f"--dtype={args.dtype}"]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # OpenMP threads that spin at every barrier lose their core to other jobs on a shared
    # machine (10–100× slower steps, see bench/README.md): passive waiting by default
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sizes = f"N={args.batch} L={args.length} D={args.width} V={args.vocab}"
    print(f"chunked vs dense, {sizes}, chunk {args.chunk_size}, {args.device} {args.dtype}")
    result = run_all(args)
    print(table(result))
    path = args.json or Path(__file__).parent / "results" / f"chunked-{result['date']}.json"
    if not args.quick or args.json:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {path}")


if __name__ == "__main__":
    main()
