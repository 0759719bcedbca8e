"""No raw traceback reaches the user from any `kdistill` subcommand (issue 27, item 4).

Each subcommand runs on a bad input; it must end with a non-zero status and a clear error line
(``kdistill: error: …`` naming what was wrong, or argparse's ``kdistill …: error: …``) on
stderr, and no "Traceback". Before, `run` / `check` on a folder, `demo` / `reference` with an
output path under a file and `compress` on a teacher channel pruning does not know ended in a
raw traceback (the CLI caught only kdistill's own errors)."""

from __future__ import annotations

import pytest

from kdistill.cli import main

SUBCOMMANDS = ("run", "demo", "compress", "cache", "bench", "layers", "check", "recipes", "init")
SUBCOMMANDS += ("reference",)

UNPRUNABLE = """\
name: unprunable
data: {dataset: digits, val_size: 200}
teacher:
  model: kdistill.examples.my_models:WideCNN
  kwargs: {channels: 1, classes: 10, width: 8}
  train: {epochs: 1, batch_size: 64}
students:
  - {name: m, model: "kdistill.examples.my_models:TinyCNN", kwargs: {channels: 1, classes: 10}}
train: {epochs: 1, batch_size: 64}
tune: {enabled: false}
cost: {enabled: false}
compress: {channels: 0.5, export: [torchscript]}
"""


def cases(tmp_path):
    """(subcommand, argv, a fragment the error names) for each subcommand."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    unprunable = tmp_path / "unprunable.yaml"
    unprunable.write_text(UNPRUNABLE)
    under_file = str(a_file / "sub")
    return [
        ("run", ["run", str(folder)], "a_folder"),
        ("demo", ["demo", "--out", under_file, "--quiet"], "a_file"),
        ("compress", ["compress", str(unprunable), "--out", str(tmp_path / "c"), "--quiet"],
         "step 'pruned'"),
        ("cache", ["cache", str(bad_yaml)], "not valid YAML"),
        ("bench", ["bench", "--pairs", "nosuchpair", "--quick"], "nosuchpair"),
        ("layers", ["layers", "nosuchmodel"], "nosuchmodel"),
        ("check", ["check", str(folder)], "a_folder"),
        ("recipes", ["recipes", "--bogus"], "--bogus"),
        ("init", ["init", "--teacher", "nosuch", "--student", "nosuch", "--data",
                  str(tmp_path / "none"), "--out", str(tmp_path / "r.yaml")], "none"),
        ("reference", ["reference", "--out", str(a_file / "ref.md")], "a_file"),
    ]  # fmt: skip


def test_every_subcommand_is_covered(tmp_path):
    assert sorted(name for name, _, _ in cases(tmp_path)) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_a_bad_input_gives_a_clear_error_and_no_traceback(subcommand, tmp_path, capsys):
    if subcommand == "compress":
        pytest.importorskip("sklearn")  # the digits data
    (argv, fragment) = next((a, f) for name, a, f in cases(tmp_path) if name == subcommand)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: usage, then one error line
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err
    # kdistill's own "kdistill: error: …", argparse's "kdistill …: error: …", bench's "bench: …"
    lines = [line for line in err.splitlines() if line.startswith(("kdistill", subcommand))]
    assert lines, err
    assert fragment in err, err
    if subcommand == "compress":  # refused when the recipe is read: nothing was trained
        assert not (tmp_path / "c" / "metrics.jsonl").exists()
        assert not list(tmp_path.glob("**/*.safetensors"))
