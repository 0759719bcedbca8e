"""Issue 25 on the user's kind of data: `kdistill init` → `--dry-run` → run with a tiny budget,
the teacher's reported score checked against a computation made here.

The digits case: scikit-learn's 8×8 digits as two `.npz` files, a teacher trained outside
kdistill on the inputs as they are (x/16 in [0, 1]) and given by checkpoint. A run that
standardised the inputs would score it lower and say nothing; it must read them as they are,
or stop naming `data.normalize` and both scores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from own_data_models import DigitsMLP

from kdistill.cli import main
from kdistill.data import split_train_val
from kdistill.data.arrays import ArrayDataset

sklearn_datasets = pytest.importorskip("sklearn.datasets")

TRAIN = 1400  # digits 0 … 1399 train, the other 397 test
SEED = 0


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """train.npz / test.npz (x float32 N×1×8×8 in [0, 1]) and a teacher trained on them as
    they are, saved as a state dict: (folder, teacher)."""
    folder = tmp_path_factory.mktemp("digits")
    found = sklearn_datasets.load_digits()
    x = (found.images / 16.0).astype(np.float32)[:, None]
    y = found.target.astype(np.int64)
    np.savez(folder / "train.npz", x=x[:TRAIN], y=y[:TRAIN])
    np.savez(folder / "test.npz", x=x[TRAIN:], y=y[TRAIN:])
    torch.manual_seed(0)
    teacher = DigitsMLP(hidden=64)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(x[:TRAIN]), torch.from_numpy(y[:TRAIN])
    for _ in range(150):  # full batch: a few seconds, ~97 % on the test digits
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(inputs), targets).backward()
        optimizer.step()
    torch.save(teacher.state_dict(), folder / "teacher.pt")
    return folder, teacher.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def init(folder, out, *extra) -> dict:
    argv = [
        "init",
        "--teacher",
        "own_data_models:DigitsMLP",
        "--student",
        "own_data_models:DigitsMLP",
        "--student-kwargs",
        "{hidden: 8}",
        "--data",
        f"{folder / 'train.npz'},{folder / 'test.npz'}",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return yaml.safe_load(out.read_text())


TINY = ["--seeds", "1", "--no-tune", "--quiet", "--set", "train.epochs=1"]
TINY += ["--set", "cost.enabled=false", "--set", "data.val_size=200"]


def test_digits_checkpoint_teacher_is_scored_on_its_own_inputs(digits, tmp_path, capsys):
    folder, teacher = digits
    recipe_file = tmp_path / "digits.yaml"
    recipe = init(folder, recipe_file, "--teacher-checkpoint", str(folder / "teacher.pt"))
    assert recipe["data"]["normalize"] == "none"
    assert recipe["teacher"]["checkpoint"] == str(folder / "teacher.pt")
    text = recipe_file.read_text()
    assert "normalize: none" in text and "trained elsewhere" in text  # the comment says why
    assert main(["run", str(recipe_file), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    out = tmp_path / "run"
    assert main(["run", str(recipe_file), "--out", str(out), *TINY]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    reported = next(r for r in records if r["method"] == "teacher")["test_score"]
    test = np.load(folder / "test.npz")
    expected = accuracy(teacher, torch.from_numpy(test["x"]), torch.from_numpy(test["y"]))
    assert expected > 0.9  # a real teacher
    assert reported == pytest.approx(expected, abs=1e-9)
    assert not list((out / "checkpoints").glob("teacher*"))  # never trained again
    # the run store holds the plan the run executed: the teacher given, every training made
    from kdistill.recipes.run_store import read_plan

    plan = read_plan(out)
    assert plan["teacher"]["source"] == "checkpoint"
    assert plan["teacher"]["path"] == str(folder / "teacher.pt")
    made = [r["label"] for r in records if r["method"] != "teacher"]
    assert (
        [t["label"] for t in plan["trainings"]]
        == made
        == ["student/alone/seed0", "student/kd/seed0"]
    )


def test_digits_checkpoint_teacher_with_standardised_inputs_is_refused(digits, tmp_path, capsys):
    folder, teacher = digits
    recipe_file = tmp_path / "digits.yaml"
    init(folder, recipe_file, "--teacher-checkpoint", str(folder / "teacher.pt"))
    capsys.readouterr()
    argv = ["run", str(recipe_file), "--out", str(tmp_path / "run"), *TINY]
    assert main([*argv, "--set", "data.normalize=train"]) != 0
    error = capsys.readouterr().err
    assert "data.normalize" in error and "normalize: none" in error
    # both scores, computed here: the validation split as kdistill holds it out, read as it is
    # and standardised by the training part's per-channel mean and std (population std)
    train = np.load(folder / "train.npz")
    full = ArrayDataset(
        torch.from_numpy(train["x"]), torch.from_numpy(train["y"]), [str(k) for k in range(10)]
    )
    part, val = split_train_val(full, 200, seed=SEED, stratify=True)
    mean = part.inputs.double().mean().item()
    std = part.inputs.double().std(correction=0).item()
    raw = accuracy(teacher, val.inputs, val.targets)
    standardised = accuracy(teacher, ((val.inputs.double() - mean) / std).float(), val.targets)
    assert raw - standardised > 0.02  # the case: markedly better as read
    assert f"{100 * raw:.2f} %" in error and f"{100 * standardised:.2f} %" in error


def test_kdistill_teacher_keeps_its_normalisation(digits, tmp_path, capsys):
    folder, _ = digits
    recipe_file = tmp_path / "digits.yaml"
    init(folder, recipe_file)  # no checkpoint: the run trains the teacher, normalize: train
    first = tmp_path / "first"
    quick = [*TINY, "--set", "teacher.train.epochs=1"]
    assert main(["run", str(recipe_file), "--out", str(first), *quick]) == 0
    saved = first / "models" / "teacher.safetensors"
    from kdistill.engine.checkpoint import read_checkpoint_file

    _, state = read_checkpoint_file(saved)
    assert state["normalization"]["mode"] == "train" and len(state["normalization"]["mean"]) == 1
    capsys.readouterr()
    argv = ["run", str(recipe_file), "--out", str(tmp_path / "second"), *quick]
    argv += ["--set", f"teacher.checkpoint={saved}", "--set", "data.normalize=none"]
    assert main(argv) != 0
    error = capsys.readouterr().err
    assert "data.normalize" in error and "was trained by kdistill" in error
    assert "{mean: [" in error  # the fix: the statistics it was trained with


@pytest.mark.parametrize(
    ("student", "key"),
    [("own_data_models:TupleDigits", 1), ("own_data_models:DictDigits", "logits")],
)
def test_init_finds_the_scored_output_and_its_recipe_runs(digits, tmp_path, student, key):
    folder, teacher = digits
    recipe_file = tmp_path / "tuple.yaml"
    argv = ["init", "--teacher", "own_data_models:DigitsMLP", "--student", student]
    argv += ["--student-kwargs", "{hidden: 8}", "--teacher-checkpoint", str(folder / "teacher.pt")]
    argv += ["--data", f"{folder / 'train.npz'},{folder / 'test.npz'}", "--out", str(recipe_file)]
    assert main(argv) == 0
    recipe = yaml.safe_load(recipe_file.read_text())
    assert recipe["students"][0]["output"] == key  # the N×10 output, found on one batch
    assert "output" not in recipe["teacher"]  # a plain tensor
    assert main(["run", str(recipe_file), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    out = tmp_path / "run"
    assert main(["run", str(recipe_file), "--out", str(out), *TINY]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    # the student's reported score is its selected output's accuracy on the test digits,
    # recomputed here from the saved weights
    from own_data_models import TupleDigits

    from kdistill.engine.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(out / "models", "student__kd__seed0")
    model = TupleDigits(hidden=8)
    model.load_state_dict(tensors)
    test = np.load(folder / "test.npz")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(test["x"]))[1]
    expected = (logits.argmax(1) == torch.from_numpy(test["y"])).double().mean().item()
    reported = next(r for r in records if r["method"] == "kd")["test_score"]
    assert reported == pytest.approx(expected, abs=1e-9)


def test_an_output_the_model_lacks_is_named(digits, tmp_path, capsys):
    folder, _ = digits
    recipe_file = tmp_path / "digits.yaml"
    init(folder, recipe_file, "--teacher-checkpoint", str(folder / "teacher.pt"))
    capsys.readouterr()
    argv = ["run", str(recipe_file), "--dry-run", "--out", str(tmp_path / "dry")]
    assert main([*argv, "--set", "students.0.output=logits"]) != 0
    error = capsys.readouterr().err
    assert "students.student.output: 'logits'" in error and "Traceback" not in error
