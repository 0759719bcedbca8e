"""The speed/memory benchmark: a quick smoke run through `kdistill bench`, and its memory probe."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_speed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_speed_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_bench_writes_json_and_a_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--threads", "1", "--steps", "2", "--warmup", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in (
        "student alone",
        "online distillation step",
        "cached distillation step",
        "teacher forward + tap `conv2`",
        "cache build",
        "cached vs student",
        "cached step, data check off",
        "cached check on vs off",
        "data check vs cached",
    ):
        assert row in printed
    results = json.loads(out.read_text())
    assert results["settings"]["batch_size"] == 32 and results["settings"]["threads"] == 1
    r = results["pairs"]["classic"]
    for mode in ("student", "teacher", "online", "cached", "build"):
        assert r[mode]["peak_rss_mib"] > r[mode]["base_rss_mib"] > 0
        assert r[mode]["threads"] == 1
    for mode in ("student", "teacher", "online", "cached"):
        assert r[mode]["steps"] == 2
        # samples/s is the batch over the median step time
        assert r[mode]["samples_per_s"] == pytest.approx(32 / (r[mode]["step_ms"] / 1e3), rel=1e-2)
    assert r["build"]["samples"] == 256
    paired = r["paired"]["steps"]  # the speed ratios come from the side-by-side run
    assert set(paired) == {
        "student",
        "teacher",
        "online",
        "cached",
        "cached_nocheck",
        "data_check",
    }
    for step in paired.values():
        assert step["steps"] == 2 and step["step_ms"] > 0
    # the ratios, recomputed here from the raw figures
    expected = {
        "cached_vs_student": paired["cached"]["step_ms"] / paired["student"]["step_ms"],
        "online_vs_teacher_plus_student": paired["online"]["step_ms"]
        / (paired["teacher"]["step_ms"] + paired["student"]["step_ms"]),
        "taps_vs_no_taps": r["teacher"]["tapped"]["step_ms"] / r["teacher"]["step_ms"],
        "build_vs_inference": r["build"]["seconds"] / r["build"]["inference"]["seconds"],
        "cached_memory_vs_student": r["cached"]["peak_rss_mib"] / r["student"]["peak_rss_mib"],
        "cached_check_on_vs_off": paired["cached"]["step_ms"] / paired["cached_nocheck"]["step_ms"],
        "data_check_vs_cached": paired["data_check"]["step_ms"] / paired["cached"]["step_ms"],
    }
    for key, value in expected.items():
        assert r["ratios"][key] == pytest.approx(value, rel=1e-3), key


def test_peak_rss_sees_torch_allocations():
    # 256 MiB of float32 written by torch must show in the peak resident set size that the
    # benchmark reports (tracemalloc would see none of it).
    code = (
        "import importlib.util, torch;"
        f"s = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r});"
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m);"
        "before = m.peak_rss_mib(); x = torch.ones(64 * 2**20); after = m.peak_rss_mib();"
        "print(before, after)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(float, done.stdout.split())
    assert after - before >= 200  # the peak before may sit above the RSS of that moment


def test_unknown_pair_is_refused():
    with pytest.raises(SystemExit, match="unknown pairs \\['bert'\\]"):
        load_bench().main(["--pairs", "bert"])


def test_repeats_keep_the_fastest_run_and_the_largest_peak():
    best_of = load_bench().best_of
    slow = {"mode": "cached", "step_ms": 9.0, "peak_rss_mib": 300.0, "samples_per_s": 1}
    fast = {"mode": "cached", "step_ms": 4.0, "peak_rss_mib": 290.0, "samples_per_s": 2}
    kept = best_of(best_of(None, slow), fast)
    assert kept["step_ms"] == 4.0 and kept["samples_per_s"] == 2
    assert kept["peak_rss_mib"] == 300.0 and kept["repeats"] == 2
    build = best_of(
        {"mode": "build", "seconds": 2.0, "peak_rss_mib": 1.0},
        {"mode": "build", "seconds": 3.0, "peak_rss_mib": 1.0},
    )
    assert build["seconds"] == 2.0
    # a paired run is kept whole: the one whose steps took least time altogether
    steps = {"student": {"step_ms": 5.0}, "cached": {"step_ms": 6.0}}
    calm = {"mode": "paired", "steps": steps, "peak_rss_mib": 1.0}
    busy = {"mode": "paired", "steps": {"student": {"step_ms": 4.0}, "cached": {"step_ms": 9.0}}}
    assert best_of(best_of(None, {**busy, "peak_rss_mib": 1.0}), calm)["steps"] is steps
