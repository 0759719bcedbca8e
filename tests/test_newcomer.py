"""What a new user meets (issue 19): `kdistill init` for their own models and images, a dry run
that checks everything and estimates the time, then the run as written, its closing line and the
settings column."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdistill.cli import main
from kdistill.data.imagefolder import write_image_folder
from kdistill.recipes import load_recipe
from kdistill.recipes.rehearsal import TimedLoader, Training

TEACHER = "kdistill.examples.my_models:WideCNN"
STUDENT = "kdistill.examples.my_models:TinyCNN"
TINY_BUDGET = [
    "--quiet",
    "--seeds",
    "1",
    "--no-tune",
    "--set",
    "train.epochs=1",
    "--set",
    "teacher.train.epochs=1",
    "--set",
    "cost.enabled=false",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An image folder as a user would have one: train/<class>/*.png and test/<class>/*.png,
    three classes of 16×16 grey images told apart by their brightness."""
    root = tmp_path_factory.mktemp("my_images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("test", 24)):
        labels = np.arange(count) % 3
        noise = rng.integers(0, 60, size=(count, 16, 16))
        write_image_folder(root, split, (noise + 80 * labels[:, None, None]).astype(np.uint8),
                           labels, ["boots", "coats", "shirts"])  # fmt: skip
    return root


def closing_names(output: str, out_dir: str) -> list[str]:
    """The names the closing line `<out>: a, b, models/ (3 files) (0.1 min)` lists."""
    line = next(line for line in output.splitlines() if line.startswith(f"{out_dir}: "))
    listed = re.sub(r" \(\d+\.\d min\)$", "", line.removeprefix(f"{out_dir}: "))
    return [re.sub(r" \(\d+ files\)$", "", name) for name in listed.split(", ")]


def test_init_dry_run_and_run_as_a_new_user_would(images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["init", "--teacher", TEACHER, "--student", STUDENT, "--data", str(images)]
    assert main([*argv, "--out", "mine.yaml"]) == 0
    assert "kdistill run mine.yaml --dry-run" in capsys.readouterr().out
    text = Path("mine.yaml").read_text()
    assert text.startswith("# A starter recipe") and "docs/recipe-reference.md" in text
    # the constructor arguments that name classes and channels come from the data: 3 class
    # folders, grey PNGs (by construction of the fixture), and the file says so
    data = yaml.safe_load(text)
    assert data["teacher"]["kwargs"] == {"channels": 1, "classes": 3}
    assert data["students"][0]["kwargs"] == {"channels": 1, "classes": 3}
    assert "channels, classes: from the data" in text
    recipe = load_recipe("mine.yaml")
    assert recipe.data.dataset == "imagefolder" and Path(recipe.data.root) == images
    assert list(recipe.distill.methods) == ["kd"] and recipe.tune.grid["alpha"] == [0.5, 0.9]
    assert main([*argv, "--out", "mine.yaml"]) == 2  # never overwritten without --force
    assert "already exists" in capsys.readouterr().err

    # the dry run, as written: the plan and an estimate; nothing trained, nothing written
    assert main(["run", "mine.yaml", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "teacher: trained by the run, 10 epochs" in plan
    assert f"| teacher | teacher | `{TEACHER}` | 93,283 |" in plan  # WideCNN(1, 3, width=32)
    assert f"| student | student | `{STUDENT}` | 375 |" in plan
    assert "student/kd: 0.5 × hard (CE) + 0.5 × kd (KD)" in plan  # the grid's first point
    # 1 teacher + 4 grid points (2 α × 2 T) + 3 seeds × (alone + kd)
    assert "trainings: 1 teacher + 4 tuning trials + 6 final" in plan
    assert re.search(r"Estimated total: \d", plan)
    assert not Path("runs").exists()

    # the run as written, on a tiny budget
    assert main(["run", "mine.yaml", *TINY_BUDGET]) == 0
    output = capsys.readouterr().out
    rows = [line.split("|") for line in output.splitlines() if line.startswith("| ")][1:]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [
        ("teacher", "teacher"),
        ("student", "alone"),
        ("student", "kd"),
    ]
    # --no-tune: the settings used are shown, marked as not chosen on validation
    assert rows[2][-2].strip() == "alpha=0.9 (default), temperature=4 (default)"
    assert rows[1][-2].strip() == "—"
    # the closing line names every file and folder the run left, and only those
    names = closing_names(output, "runs/mine")
    on_disk = sorted(path.name for path in Path("runs/mine").iterdir())
    assert sorted(name.rstrip("/") for name in names) == on_disk
    assert {"report.html", "report.md", "curves.png", "results.json", "models/"} <= set(names)
    report = Path("runs/mine/report.md").read_text()
    assert "Settings marked (default) were not chosen on validation" in report

    # a dry run of the same settings finds the teacher the run saved and does not count it
    assert main(["run", "mine.yaml", *TINY_BUDGET, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "teacher: reused from runs/mine/models" in plan
    assert "| teacher | 1 |" not in plan


def test_init_asks_for_arguments_it_cannot_take_from_the_data(images, tmp_path, monkeypatch,
                                                             capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    Path("mynets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Deep(nn.Module):
                def __init__(self, depth, num_classes=10, in_channels=3):
                    super().__init__()
                    self.body = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
                    self.depth = depth

                def forward(self, x):
                    return self.body(x)
            """
        )
    )
    argv = ["init", "--teacher", TEACHER, "--student", "mynets:Deep", "--data", str(images)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--student 'mynets:Deep'" in err and "depth" in err and "--student-kwargs" in err
    assert main([*argv, "--student-kwargs", "{depth: 2}"]) == 0
    student = yaml.safe_load(Path("recipe.yaml").read_text())["students"][0]
    # optional arguments named like class / channel counts take the data's values, not 10 / 3
    assert student["kwargs"] == {"depth": 2, "num_classes": 3, "in_channels": 1}


def test_init_names_the_data_forms_it_understands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["init", "--teacher", "middle_student", "--student", "mini_student"]
    assert main([*argv, "--data", "no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert "no/such/folder" in err and "train/ and test/" in err and "train.npz,test.npz" in err
    assert not Path("recipe.yaml").exists()


def test_dry_run_finds_a_mistake_in_a_method_before_any_training(images, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            name: r
            data: {{dataset: imagefolder, root: {images}, val_size: 6}}
            teacher: {{model: "{TEACHER}", kwargs: {{channels: 1, classes: 3, width: 4}}}}
            students:
              - {{name: s, model: "{STUDENT}", kwargs: {{channels: 1, classes: 3}}}}
            distill:
              methods:
                hint: [{{loss: fitnet, student: features.1, teacher: features.9}}]
            """
        )
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--dry-run", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: error:") and "features.9" in err
    assert not out.exists()


def test_training_seconds_by_hand():
    # 3 trainings, each set up in 0.25 s, 2 epochs of 10 steps of 0.5 s and an epoch end of
    # 1 s, then a final evaluation of 2 s: 3 · (0.25 + 2 · (10 · 0.5 + 1) + 2) = 42.75 s
    assert Training("x", 3, 2, 10, 0.5, 1.0, 2.0, 0.25).seconds == pytest.approx(42.75)


def test_timed_loader_measures_steps_and_the_epoch_end(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("kdistill.recipes.rehearsal.time.perf_counter", lambda: now[0])

    class Batches(list):
        batch_size = 2
        dataset = None

    timed = TimedLoader(Batches(range(10)), steps=3)
    assert len(timed) == 3 and timed.epoch_end_seconds() is None
    next(iter(timed))  # a first look at one batch (the engine's checks) is not an epoch
    steps = iter([5.0, 1.0, 2.0, 4.0, 3.0, 9.0])  # the first step pays for warm-up
    for _epoch in range(2):
        for _batch in timed:
            now[0] += next(steps)
        now[0] += 7.0  # evaluation and checkpoint between the epochs
    # gaps 5, 1, 2 | 4, 3, 9 without the first: median of 1, 2, 4, 3, 9 = 3
    assert timed.step_seconds() == pytest.approx(3.0)
    assert timed.epoch_end_seconds() == pytest.approx(7.0)


def test_version_names_kdistill_torch_and_python(capsys):
    import platform

    import torch

    import kdistill

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"kdistill {kdistill.__version__} (torch {torch.__version__}, "
        f"Python {platform.python_version()})"
    )


def test_every_command_help_ends_with_examples_that_parse(capsys):
    from kdistill.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    assert {"run", "demo", "init", "reference", "layers", "compress", "cache"} <= set(commands)
    for name, command in commands.items():
        text = command.format_help()
        examples = text.split("examples:\n", 1)[1].splitlines()
        lines = [line.split(" # ")[0].strip() for line in examples if line.startswith("  kdistill")]
        assert len(lines) >= 2, f"kdistill {name} --help shows {len(lines)} example(s)"
        for line in lines:  # every example is a command line the parser accepts
            if "|" in line or line.endswith("\\"):
                continue
            words = shlex.split(line)
            assert parser.parse_args(words[1:]).command == words[1]


def test_the_estimate_stops_where_max_steps_stops_the_run():
    from kdistill.recipes.rehearsal import Training

    # 3 epochs of 10 steps but max_steps 12: 12 steps at 0.5 s and two epoch ends of 1 s
    capped = Training("x", 1, 3, 10, 0.5, 1.0, 2.0, 0.25, max_batches=12)
    assert capped.seconds == pytest.approx(0.25 + 12 * 0.5 + 2 * 1.0 + 2.0)
    uncapped = Training("x", 1, 3, 10, 0.5, 1.0, 2.0, 0.25, max_batches=100)
    assert uncapped.seconds == pytest.approx(0.25 + 30 * 0.5 + 3 * 1.0 + 2.0)


def test_the_dry_run_times_augmented_students_on_their_own_loaders(tmp_path):
    """With `data.augment` (and `teacher.augment`) the students' batches come from augmenting
    loaders; each training line must time its own steps, not repeat the teacher's figures (it
    did: every student line showed the teacher's s/step and a negative set-up)."""
    from kdistill.recipes.rehearsal import dry_run

    path = tmp_path / "augmented.yaml"
    path.write_text(
        """
name: augmented
data: {dataset: digits, val_size: 100, train_limit: 400, test_limit: 50, augment: {pad: 1}}
teacher:
  model: middle_student
  kwargs: {channels: [16, 32]}
  augment: {pad: 1}
  train: {epochs: 1, progress: false}
students: [{name: s, model: middle_student, kwargs: {channels: [2, 2]}}]
train: {epochs: 1, progress: false}
distill: {teacher_cache: memory, methods: {kd: [{loss: kd}]}}
tune: {enabled: false}
cost: {enabled: false}
"""
    )
    plan = dry_run(load_recipe(path), tmp_path / "run")
    teacher, *students = plan.trainings
    assert teacher.what == "teacher" and [t.what for t in students] == ["s/alone", "s/kd"]
    for line in students:
        assert line.setup_seconds >= 0, line
        assert line.step_seconds != teacher.step_seconds, line
