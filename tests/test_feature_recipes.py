"""The feature / relation / combined recipes: they validate, name real layers of their models,
and the method sweep runs end to end on a small real Fashion-MNIST subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import needs_fashion_mnist  # tests/ is on sys.path (pytest's prepend import mode)

from kdistill.cli import main
from kdistill.distill.layers import describe_layers
from kdistill.models import create_model
from kdistill.recipes.runner import method_terms
from kdistill.recipes.schema import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "feature": {"fitnet", "at", "kd", "dkd", "dist", "sp", "rkd", "pkt", "cc", "crd"},
    "relation": {"rkd", "sp", "pkt"},
    "combined": {"kd", "kd+fitnet", "kd+at", "kd+rkd"},
}
SWEEP = "kd,dkd,dist,fitnet,at,sp,rkd,pkt,cc,crd"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_validates_and_taps_real_layers(name):
    recipe = load_recipe(REPO / "recipes" / f"fashion_mnist_{name}.yaml")
    assert set(recipe.distill.methods) == RECIPES[name]
    teacher = {layer.name for layer in describe_layers(create_model("resnet20"), (1, 28, 28))}
    student_spec = recipe.students[0]
    student_model = create_model(student_spec.model, **student_spec.kwargs)
    student = {layer.name for layer in describe_layers(student_model, (1, 28, 28))}
    for method, specs in recipe.distill.methods.items():
        for spec in specs:
            assert spec.teacher is None or spec.teacher in teacher, (method, spec.teacher)
            assert spec.student is None or spec.student in student, (method, spec.student)


def test_crd_gets_the_training_split_size_and_other_losses_keep_their_settings():
    recipe = load_recipe(REPO / "recipes" / "fashion_mnist_feature.yaml")
    (crd_term,) = [t for t in method_terms(recipe.distill, "crd", {}, 1234) if t.name != "hard"]
    assert crd_term.loss.num_samples == 1234 and crd_term.loss.num_negatives == 1024
    # a temperature grid reaches KD's T but never CRD's NCE temperature
    (crd_term,) = [
        t for t in method_terms(recipe.distill, "crd", {"temperature": 9.0}, 50) if t.name != "hard"
    ]
    assert crd_term.loss.nce_temperature == 0.07
    with pytest.raises(ValueError, match="num_samples"):
        method_terms(recipe.distill, "crd", {})


@needs_fashion_mnist
def test_the_method_sweep_runs_on_real_data(tmp_path):
    out = tmp_path / "sweep"
    quick = {
        "data.train_limit": 1200,
        "data.val_size": 200,
        "data.test_limit": 400,
        "teacher.train.epochs": 1,
        "train.epochs": 1,
        "cost.enabled": "false",
    }
    overrides = [arg for key, value in quick.items() for arg in ("--set", f"{key}={value}")]
    recipe = str(REPO / "recipes" / "fashion_mnist_feature.yaml")
    argv = ["run", recipe, *overrides, "--methods", SWEEP, "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["model"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {("teacher", "teacher"), ("resnet8", "alone")} | {
        ("resnet8", method) for method in SWEEP.split(",")
    }
    for (model, method), row in rows.items():
        assert 0.0 <= row["mean"] <= 1.0, (model, method)
    # the teacher's tapped layers were computed once, into the disk cache
    manifest = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    stored = json.dumps(manifest)
    for layer in ("layer1", "layer2", "layer3", "flatten"):
        assert f'"{layer}"' in stored, layer
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("/crd/" in line["model"] for line in lines), "the CRD student logged its epoch"
