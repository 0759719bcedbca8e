"""Exact resume through the command line: `kdistill run` killed by a signal, then `--resume`d,
ends with the same models — bit for bit — as a run that was never interrupted.

One run is interrupted three times, each in a different place:

1. SIGTERM in the middle of the teacher's epoch (it resumes from a mid-epoch checkpoint and
   replays the steps after it);
2. SIGKILL in the middle of the second tuning trial (trials keep no checkpoint: the finished
   trial is reused from tuning.json, the killed one starts again);
3. SIGKILL in the middle of the distilled student's second epoch.

The process kills itself with `os.kill` at the start of a chosen training step (a patched
`Distiller.set_progress` counts the steps), so the interruption lands at the same step on every
machine. Every process runs with one intra-op thread, as float sums depend on the split.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kdistill.engine.checkpoint import read_checkpoint_file

REPO = Path(__file__).resolve().parents[1]

# 1200 training images (1348 digits − 148 held out), batch 50: 24 steps per epoch.
RECIPE = """
name: resume
seed: 0
data: {dataset: digits, val_size: 148}
teacher:
  model: middle_student
  kwargs: {channels: [8, 16]}
  train: {epochs: 1, batch_size: 50, checkpoint_every_steps: 5, progress: false}
students:
  - {name: small, model: middle_student, kwargs: {channels: [2, 4]}}
train: {epochs: 2, batch_size: 50, lr: 0.01, checkpoint_every_steps: 5, progress: false}
tune: {grid: {alpha: [0.5, 0.9]}, epochs: 1}
cost: {enabled: false}
"""
STEPS = 24

# Runs `kdistill` and sends itself `signal` at the start of training step number `at` (1-based,
# counted over every model this process trains).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from kdistill.cli import main
    from kdistill.distill.distiller import Distiller

    at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
    original = Distiller.set_progress
    calls = [0]

    def counting(self, epochs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), sig)
        return original(self, epochs)

    Distiller.set_progress = counting
    sys.exit(main(sys.argv[3:]))
    """
)


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kdistill(args: list[str], kill_at: int | None = None, sig: str = "SIGKILL"):
    prefix = [sys.executable, "-m", "kdistill"]
    if kill_at is not None:
        prefix = [sys.executable, "-c", KILLER, str(kill_at), sig]
    return subprocess.run(
        [*prefix, *args], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )


def models(out: Path) -> dict[str, dict]:
    return {path.name: load_file(path) for path in sorted((out / "models").glob("*.safetensors"))}


def epoch_lines(out: Path) -> list[tuple]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["model"], r["epoch"], r["lr"], r["train_loss"], r["val_accuracy"], r["val_loss"])
        for r in lines
    ]


def checkpoint_position(out: Path, label: str) -> tuple[int, int]:
    _, state = read_checkpoint_file(out / "checkpoints" / label / "last.safetensors")
    return state["progress"]["epoch"], state["progress"]["step"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "resume.yaml"
    path.write_text(RECIPE)
    return path


def test_killed_and_resumed_run_matches_an_uninterrupted_run_bit_for_bit(recipe, tmp_path):
    # separate parents: each run trains its teacher (beside each other they would share it)
    reference, interrupted = tmp_path / "reference" / "run", tmp_path / "interrupted" / "run"
    done = kdistill(["run", str(recipe), "--out", str(reference), "--quiet"])
    assert done.returncode == 0, done.stderr[-3000:]

    args = ["run", str(recipe), "--out", str(interrupted), "--quiet"]
    # 1. teacher: steps 0–16 done, checkpoint at step 15, SIGTERM before step 17
    first = kdistill(args, kill_at=18, sig="SIGTERM")
    assert first.returncode == -signal.SIGTERM, first.stderr[-3000:]
    assert checkpoint_position(interrupted, "teacher") == (0, 15)
    assert not (interrupted / "models").exists()

    # 2. the teacher's 9 remaining steps, trial α=0.5 (24), then 6 steps into trial α=0.9
    second = kdistill([*args, "--resume"], kill_at=9 + STEPS + 7)
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    trials = json.loads((interrupted / "tuning.json").read_text())
    assert [t["settings"] for t in trials] == [{"alpha": 0.5}]

    # 3. trial α=0.9 again (24), the student alone (48), the distilled student 1 epoch + 13 steps
    third = kdistill([*args, "--resume"], kill_at=STEPS + 2 * STEPS + STEPS + 14)
    assert third.returncode == -signal.SIGKILL, third.stderr[-3000:]
    assert checkpoint_position(interrupted, "small/kd/seed0") == (1, 10)

    last = kdistill([*args, "--resume"])
    assert last.returncode == 0, last.stderr[-3000:]

    expected, got = models(reference), models(interrupted)
    names = ["small__alone__seed0.safetensors", "small__kd__seed0.safetensors"]
    assert sorted(got) == sorted(expected) == [*names, "teacher.safetensors"]
    for name, tensors in expected.items():
        assert set(got[name]) == set(tensors)
        for key, value in tensors.items():
            assert got[name][key].dtype == value.dtype
            assert got[name][key].equal(value), f"{name}: {key} differs"

    # the same epoch records (seconds aside) and the same tuning and test results
    assert epoch_lines(interrupted) == epoch_lines(reference)
    reference_results = json.loads((reference / "results.json").read_text())
    interrupted_results = json.loads((interrupted / "results.json").read_text())
    assert [(r["label"], r["test_score"]) for r in interrupted_results["records"]] == [
        (r["label"], r["test_score"]) for r in reference_results["records"]
    ]
    assert interrupted_results["tuning"] == reference_results["tuning"]
