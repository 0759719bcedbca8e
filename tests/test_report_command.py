"""`kdistill report <results.json>`: a run's table and report rebuilt from its results file."""

from __future__ import annotations

import json
from pathlib import Path

from kdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "docs" / "results" / "demo.json"


def test_report_writes_the_report_files_from_the_results_file(tmp_path, capsys):
    assert main(["report", str(DEMO), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "| middle_n1000 | kd |" in out and "87.66 ± 0.16" in out
    report = (tmp_path / "report" / "report.md").read_text()
    assert "87.66 ± 0.16" in report and "+70 %" in report
    assert (tmp_path / "report" / "report.html").is_file()
    # the records are carried over unchanged
    again = json.loads((tmp_path / "report" / "results.json").read_text())
    assert again["records"] == json.loads(DEMO.read_text())["records"]


def test_report_refuses_a_file_that_is_not_a_results_file(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"pairs": {}}))
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a run's results file" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no such results file" in capsys.readouterr().err
