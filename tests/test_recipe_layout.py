"""Issue 25 item 7: the recipe layer as plan → execute, in small pieces. No class of `recipes/`
over ~300 lines (`Experiment` was a 624-line service locator); the circle check itself is in
`test_import_layers.py`."""

from __future__ import annotations

import ast
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "src" / "kdistill" / "recipes"
LIMIT = 320  # "about 300"


def class_sizes(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {
        f"{path.name}:{node.name}": node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }


def test_no_class_of_recipes_over_the_limit():
    sizes = {name: n for path in RECIPES.glob("*.py") for name, n in class_sizes(path).items()}
    assert "runner.py:Experiment" in sizes
    assert {name: n for name, n in sizes.items() if n > LIMIT} == {}


def test_the_size_check_sees_a_long_class(tmp_path):
    planted = tmp_path / "big.py"
    planted.write_text("class Big:\n" + "    x = 1\n" * LIMIT)
    assert class_sizes(planted) == {"big.py:Big": LIMIT + 1}


def test_the_plan_is_made_once_from_the_recipe_and_names_the_teacher_source():
    from kdistill.recipes import load_recipe
    from kdistill.recipes.plan import make_plan

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "fashion_mnist.yaml")
    plan = make_plan(recipe)
    assert plan.teacher.source == "trained" and plan.teacher.given is None
    expected = [
        f"{s.name}/{m}/seed{recipe.seed + i}"
        for i in range(recipe.seeds)
        for s in recipe.students
        for m in ["alone", *recipe.distill.methods]
    ]
    assert plan.training_labels() == expected
    assert plan.metric == "accuracy"
