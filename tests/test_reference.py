"""The recipe reference (docs/recipe-reference.md) is generated from the schema and kept current."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from kdistill.cli import main
from kdistill.recipes.reference import COMMAND, recipe_reference, schema_sections
from kdistill.recipes.schema import Recipe

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"


def test_the_committed_reference_is_current():
    assert REFERENCE.read_text() == recipe_reference(), (
        f"docs/recipe-reference.md is stale: regenerate it with `{COMMAND}` (or make reference)"
    )


def _schema_classes(model: type[BaseModel], found: set) -> set:
    """Every schema class reachable from `model`, walked independently of the generator."""
    found.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            stack += list(get_args(annotation))
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if annotation not in found:
                    _schema_classes(annotation, found)
    return found


def test_every_field_of_every_schema_class_is_in_the_reference_with_a_description():
    text = recipe_reference()
    classes = _schema_classes(Recipe, set())
    assert {model for _, model in schema_sections()} == classes
    undocumented = []
    for model in classes:
        for name, field in model.model_fields.items():
            if not field.description:
                undocumented.append(f"{model.__name__}.{name}")
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} is not in the reference"
    assert not undocumented, f"fields without a description: {undocumented}"


def test_reference_rows_read_type_default_and_constraint_from_the_schema():
    text = recipe_reference()
    # by hand from schema.py / engine/config.py: seeds: int, default 1, ge=1; alpha ≤ 1
    assert "| `seeds` | int | `1` | ≥ 1 |" in text
    assert "| `alpha` | float | `0.9` | ≥ 0, ≤ 1 |" in text
    assert "| `optimizer` | `adam` \\| `adamw` \\| `sgd` | `adam` |" in text
    assert "| `teacher` | [mapping](#teacher) | required |" in text
    # the teacher's budget has its own default: 2 epochs instead of TrainConfig's 3
    assert "| `train` | [mapping](#teachertrain) | `{epochs: 2}` |" in text
    assert "## `distill.methods.<name>[i]`" in text and "## `students[i]`" in text


def test_the_cli_writes_the_same_text(tmp_path, capsys):
    out = tmp_path / "reference.md"
    assert main(["reference", "--out", str(out)]) == 0
    assert out.read_text() == recipe_reference()
    capsys.readouterr()
    assert main(["reference"]) == 0
    assert capsys.readouterr().out == recipe_reference()
