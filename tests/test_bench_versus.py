"""The kdistill-vs-torchdistill benchmark (`bench/bench_versus.py`): its ratios, its table, and
that it runs without torchdistill (which is not a dependency)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdistill.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_versus.py"


def load_versus():
    spec = importlib.util.spec_from_file_location("bench_versus_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_of(ms: dict[str, float], faults: float = 0.0) -> dict:
    return {
        "configs": {
            name: {"step_ms": value, "samples_per_s": 128e3 / value, "faults_per_step": faults}
            for name, value in ms.items()
        },
        "loss_check": {
            "reference": "torchdistill",
            "losses": {"torchdistill": 0.5, "kdistill": 0.5000001},
            "rel_diff": {"kdistill": 2e-7, "plain": 0.0},
        },
        "torchdistill": "1.1.5",
        "speedup": {"auto": "teacher speed-up channels_last: …"},
    }


STEPS = {
    "plain": 100.0,
    "torchdistill": 104.0,
    "online": 101.0,
    "online_fast": 70.0,
    "cached": 6.0,
    "student": 5.5,
    "fit_cached": 6.2,
    "fit_online": 103.0,
    "fit_online_fast": 72.0,
    "fit_student": 5.8,
    "teacher": 95.0,
    "teacher_fast": 64.0,
}


def test_ratios_are_the_figures_the_issue_asks_for():
    versus = load_versus()
    default = run_of(STEPS, faults=18000)
    retained = run_of({**STEPS, "torchdistill": 80.0, "online_fast": 50.0}, faults=0)
    r = versus.ratios({"default": default, "retained": retained})
    # speed-ups are "how many times faster", overheads "how many times slower"
    assert r["default"]["online_fast_vs_torchdistill"] == pytest.approx(104 / 70, rel=1e-3)
    assert r["default"]["fit_cached_vs_student"] == pytest.approx(6.2 / 5.5, rel=1e-3)
    assert r["default"]["fit_online_vs_online"] == pytest.approx(103 / 101, rel=1e-3)
    assert r["default"]["teacher_share_of_online"] == pytest.approx(95 / 101, rel=1e-3)
    assert r["retained"]["online_fast_vs_torchdistill"] == pytest.approx(80 / 50, rel=1e-3)
    # as shipped: kdistill with its malloc setting against torchdistill without
    shipped = r["as_shipped"]["online_fast_retained_vs_torchdistill_default"]
    assert shipped == pytest.approx(104 / 50, rel=1e-3)
    assert r["default"]["loss_rel_diff_vs_reference"] == pytest.approx(2e-7)
    text = versus.table({"pairs": {"classic": {"runs": {"default": default}, "ratios": r}}})
    assert "| classic | torchdistill 1.1.5 (online) | 1,231 | – | 18,000 |" in text
    assert "online fast vs torchdistill | 1.486 | >= 1.3 ✓" in text
    assert "fit cached vs student | 1.127 | <= 1.15 ✓" in text


def test_torchdistill_absent_is_said_not_raised(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchdistill(name, *args, **kwargs):
        if name.startswith("torchdistill"):
            raise ImportError("No module named 'torchdistill'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchdistill)
    box, why = load_versus().import_torchdistill()
    assert box is None and "torchdistill is not installed" in why


@pytest.mark.slow  # two worker processes, every configuration: about a minute on 2 busy cores
def test_quick_versus_run(tmp_path, capsys):
    out = tmp_path / "versus.json"
    argv = ["bench", "--versus", "--quick", "--threads", "1", "--steps", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kdistill online, teacher_speedup=auto" in printed
    results = json.loads(out.read_text())
    runs = results["pairs"]["classic"]["runs"]
    assert set(runs) == {"default", "retained"}
    assert runs["retained"]["retained"] is True and runs["default"]["retained"] is False
    check = runs["default"]["loss_check"]
    assert check["rel_diff"]["kdistill"] < 1e-5
