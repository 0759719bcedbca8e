"""The language-model recipe end to end on the real King James Bible (Debian's bible-kjv), at a
budget of seconds: teacher → student alone → distilled students, the report's table (NLL shown as
it is, lower is better), the teacher-beats-alone check and the sampled continuations."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "kjv_lm.yaml"

pytestmark = pytest.mark.skipif(
    shutil.which("bible") is None,
    reason="needs Debian's bible-kjv and bible-kjv-text (make data installs them)",
)

TINY = [
    "data.train_limit=96",
    "data.test_limit=24",
    "data.text.block_size=32",
    "teacher.kwargs={n_layer: 1, width: 32, n_head: 2}",
    "teacher.train.max_steps=12",
    "teacher.train.warmup_steps=2",
    "teacher.train.lr=0.01",
    "train.max_steps=4",
    "train.warmup_steps=1",
]


def test_the_kjv_recipe_runs_end_to_end_on_the_real_text(tmp_path):
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["students"][0]["kwargs"] = {"width": 16, "n_head": 2}
    path = tmp_path / "kjv_lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    args = ["run", str(path), "--out", str(out), "--seeds", "1", "--no-tune", "--quiet"]
    args += ["--methods", "forward_kl,jsd"]
    for override in TINY:
        args += ["--set", override]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    records = {record["label"]: record for record in results["records"]}
    assert set(records) == {"teacher", "small/alone/seed0", "small/forward_kl/seed0",
                            "small/jsd/seed0"}  # fmt: skip
    for record in records.values():
        metrics = record["test_metrics"]
        assert math.isfinite(metrics["nll"]) and 0 < metrics["nll"] < math.log(2048) + 1
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]), rel=1e-6)
        assert "nll" in record["val_metrics"]  # the teacher-beats-alone check reads these
    report = (out / "report.md").read_text()
    assert "test NLL |" in report  # shown as it is, not as a percentage
    assert "(lower is better)" in report
    assert "## Sampled continuations" in report and "| small/jsd |" in report
    teacher_val = records["teacher"]["val_metrics"]["nll"]
    alone_val = records["small/alone/seed0"]["val_metrics"]["nll"]
    if teacher_val < alone_val:
        assert "No gap closed reported" not in report
    else:
        assert "No gap closed reported" in report and "n/a: teacher not better" in report
    assert (out / "tokenizer" / "tokenizer.json").exists()
