"""The side-by-side benchmark with TRL's GKD trainer (`bench/bench_trl.py`): that it runs
without TRL (not a dependency), that its batches mask what they say, that its step clock
measures the gaps between batches, and — where TRL is installed — the conventions it reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_trl.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_trl_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


class Args:
    batch_size, seq_len = 3, 8


def test_fixed_batches_mask_the_prompt_and_the_padding():
    blocks = torch.arange(8 * 128).view(8, 128) % 2000 + 3
    plain, masked = bench.fixed_batches(blocks)
    assert (plain["labels"] == plain["input_ids"]).all()
    assert (masked["labels"][:, :40] == -100).all()  # the prompt
    assert int(masked["attention_mask"][2].sum()) == 100
    assert int(masked["attention_mask"][3].sum()) == 70
    # every padding position is labelled ignore_index; the real completion tokens are not
    padding = masked["attention_mask"] == 0
    assert (masked["labels"][padding] == -100).all()
    assert (masked["labels"][~padding & (torch.arange(128) >= 40)] != -100).all()


def test_training_batches_cycle_the_blocks_and_mask_half_for_on_policy():
    blocks = torch.arange(5 * 8).view(5, 8)
    offline = bench.training_batches(blocks, Args, on_policy=False, count=3)
    on_policy = bench.training_batches(blocks, Args, on_policy=True, count=3)
    assert len(offline) == 3 and offline[0]["input_ids"].shape == (3, 8)
    assert offline[1]["input_ids"][2].tolist() == blocks[0].tolist()  # row 5 wraps to block 0
    assert (offline[0]["labels"] == offline[0]["input_ids"]).all()
    assert (on_policy[0]["labels"][:, :4] == -100).all()
    assert (on_policy[0]["labels"][:, 4:] == on_policy[0]["input_ids"][:, 4:]).all()


def test_the_step_clock_takes_the_gaps_between_batch_fetches(monkeypatch):
    ticks = iter([1.0, 1.5, 2.5, 4.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    batches = bench.TimedBatches(["a", "b", "c"])
    assert list(batches) == ["a", "b", "c"]
    assert batches.stamps == [1.0, 1.5, 2.5, 4.0]
    assert bench.step_times(batches.stamps, warmup=1) == [1.0, 1.5]


@pytest.mark.slow  # two kd.fit runs of the LM pair: ~10 s on a quiet machine
def test_runs_without_trl_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "import_trl", lambda: (None, None, None, "trl is not installed"))
    out = tmp_path / "trl.json"
    bench.main(["--parts", "losses,speed", "--quick", "--data", "random", "--json", str(out)])
    import json

    report = json.loads(out.read_text())
    assert report["losses"] == {"skipped": "trl is not installed"}
    results = report["speed"]["results"]
    assert results["offline/trl"]["skipped"] == "trl is not installed"
    assert results["offline/kdistill"]["tokens_per_s"] > 0
    assert report["speed"]["ratio_kdistill_over_trl"]["offline/kdistill"] is None
    assert results["offline/kdistill_cached"]["tokens_per_s"] > 0


def test_with_trl_the_conversion_it_reports_holds(tmp_path):
    """kdistill(β, T) = T²·TRL(β, T); the trainer's value ignores T; TRL's β = 0 is the forward
    KL (a jump from ~0 just above it). Needs TRL (its own venv, see docs/trl.md)."""
    if bench.import_trl()[0] is None:
        pytest.skip("trl is not installed (bench/bench_trl.py runs in its own venv)")

    class Quick:
        data, run_dir, seq_len = "random", Path("/nonexistent"), 128

    report = bench.part_losses(Quick, bench.import_trl()[0])
    at = {(row["batch"], row["beta"], row["T"]): row for row in report["rows"]}
    for (batch, beta, temperature), row in at.items():
        assert row["rel_diff_converted"] < 1e-4  # float32, summed in different orders
        assert row["grad_rel_diff_converted"] < 1e-4
        # the trainer applies no temperature: at T = 2 it gives the T = 1 value
        t1 = at[(batch, beta, 1.0)]["kdistill"]
        assert row["trl_trainer"] == pytest.approx(t1, rel=1e-5)
        assert row["trl_T"] != pytest.approx(t1, rel=1e-3) or temperature == 1.0
    ends = report["endpoints"]
    assert ends["trl_beta_0"] == pytest.approx(ends["kdistill_forward_kl"], rel=1e-6)
    assert ends["trl_beta_1e-06"] < 1e-3 * ends["trl_beta_0"]
