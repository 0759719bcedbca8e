"""What a bf16 teacher changes: its logits, the distillation loss on a batch, the student's final
accuracy after a short run, and its forward time — on this machine.

    python bench/bf16_teacher.py --json bench/results/bf16-teacher.json

A resnet8 teacher (width 16) is trained on scikit-learn's 8×8 digits (fp32), then one student
(resnet8, width 4) is distilled twice from it with the same seed, data order and budget,
0.9·KD(T=4) + 0.1·CE, the teacher run every step: once as it is (``teacher_speedup="off"``) and
once in bf16 (``teacher_speedup="bf16"``). Reported: the bf16 teacher's drift on the first batch
(`SpeedupReport`), the KD loss of one fixed batch under each teacher (same student), both
students' test accuracy, and the teacher forward time fp32 vs bf16 (median of `--repeats`,
alternating, batch 128 of 28×28 inputs for the classic and resnet20 teachers of `bench_speed`).
bf16 only pays on hardware with bf16 matrix units (AMX CPUs, tensor-core GPUs); kdistill's
``auto`` leaves it out elsewhere (`kdistill.teacher_speedup.fast_bf16`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
for path in (HERE, SRC):
    if path.exists() and str(path) not in sys.path:
        sys.path.insert(0, str(path))


def accuracy(model, data) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        predicted = model(data.inputs).argmax(1)
    return float((predicted == data.targets).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--epochs", type=int, default=8, help="student epochs (teacher: same)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed teacher forwards")
    args = parser.parse_args(argv)

    import torch

    import kdistill as kd
    from kdistill import losses as L
    from kdistill.data import BatchLoader, load_digits
    from kdistill.distill.teacher.speedup import FastTeacher, cpu_has_amx
    from kdistill.models import create_model

    torch.set_num_threads(args.threads)
    kd.retain_freed_memory()
    train, test = load_digits("train"), load_digits("test")
    config = kd.TrainConfig(epochs=args.epochs, batch_size=64, lr=3e-3, progress=False)

    def loader():
        return BatchLoader(train, batch_size=64, shuffle=True, seed=0)

    torch.manual_seed(0)
    teacher = create_model("resnet8", in_channels=1, num_classes=10, width=16)
    kd.fit(kd.Distiller(None, teacher, [kd.Term(L.CE())]), loader(), config)
    teacher.eval()
    result: dict = {
        "teacher_accuracy": accuracy(teacher, test),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": cpu_has_amx(),
        "threads": args.threads,
        "epochs": args.epochs,
    }
    terms = [kd.Term(L.KD(temperature=4.0), 0.9), kd.Term(L.CE(), 0.1)]
    students = {}
    for speedup in ("off", "bf16"):
        torch.manual_seed(1)
        student = create_model("resnet8", in_channels=1, num_classes=10, width=4)
        distiller = kd.Distiller(teacher, student, terms, teacher_speedup=speedup)
        started = time.perf_counter()
        kd.fit(distiller, loader(), config)
        students[speedup] = {
            "accuracy": accuracy(student, test),
            "fit_seconds": round(time.perf_counter() - started, 2),
        }
        if speedup == "bf16":
            report = distiller.teacher_speedup_report
            students[speedup]["drift"] = {
                "max_abs": report.max_abs_diff,
                "max_rel": report.max_rel_diff,
                "tolerance": report.tolerance,
            }
    result["students"] = students

    # the loss of one fixed batch under each teacher, the same (fresh) student
    x, y = test.inputs[:128], test.targets[:128]
    torch.manual_seed(1)
    student = create_model("resnet8", in_channels=1, num_classes=10, width=4)
    losses = {}
    for speedup in ("off", "bf16"):
        distiller = kd.Distiller(teacher, student, terms, teacher_speedup=speedup)
        distiller(x, target=y)  # prepares (and checks) the bf16 copy on this batch
        out = distiller(x, target=y)
        losses[speedup] = {"loss": float(out.loss.detach()), "parts": out.raw_parts}
    result["fixed_batch_loss"] = losses
    result["fixed_batch_loss_rel_change"] = abs(
        losses["bf16"]["loss"] - losses["off"]["loss"]
    ) / abs(losses["off"]["loss"])

    # forward time, fp32 against bf16, on the benchmark's teachers
    from bench_speed import PAIRS, make_model

    timing = {}
    for name in ("classic", "resnet"):
        model = make_model(PAIRS[name], "teacher")
        batch = torch.randn(128, *PAIRS[name]["input"])
        half, _, _ = FastTeacher.prepare(model, ("bf16",), [], batch)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        with torch.inference_mode():
            for repeat in range(args.repeats + 1):
                for label, run in (("fp32", model), ("bf16", half.runner)):
                    started = time.perf_counter()
                    run(batch)
                    if repeat:
                        times[label].append(time.perf_counter() - started)
        fp32, bf16 = (statistics.median(times[k]) * 1e3 for k in ("fp32", "bf16"))
        timing[name] = {
            "fp32_ms": round(fp32, 1),
            "bf16_ms": round(bf16, 1),
            "bf16_vs_fp32": round(bf16 / fp32, 2),
        }
    result["teacher_forward"] = timing
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
