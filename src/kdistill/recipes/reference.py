"""The recipe reference: every field of a recipe with its type, default, constraint and meaning,
generated from the pydantic schema (`recipes.schema.Recipe`) as it stands when this runs.

    kdistill reference --out docs/recipe-reference.md   (or: make reference)

A test compares the committed file with a fresh generation, so a field added to the schema
without regenerating the file fails the suite.
"""

from __future__ import annotations

import inspect
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kdistill.recipes.schema import Recipe

__all__ = ["recipe_reference", "schema_sections"]

COMMAND = "kdistill reference --out docs/recipe-reference.md"

# a section's heading for the shape of its path: `students[i]`, `distill.methods.<method>[i]`
_ITEM, _KEY = "[i]", ".<name>"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, UnionType):
        return get_args(annotation)
    return (annotation,)


def _anchor(path: str) -> str:
    """GitHub's heading anchor of the section `path` (its heading is the path in backticks)."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _type_name(annotation: Any, path: str) -> str:
    """A reader's spelling of a field type; schema classes link to their section."""
    if annotation is type(None):
        return "null"
    if _is_model(annotation):
        return f"[mapping](#{_anchor(path)})"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return " \\| ".join(_type_name(member, path) for member in args)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if origin is list:
        return f"list of {_type_name(args[0], path + _ITEM)}" if args else "list"
    if origin is dict:
        if len(args) == 2 and args[1] is not Any:
            return f"mapping: name → {_type_name(args[1], path + _KEY)}"
        return "mapping"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _plain(value: Any) -> Any:
    """A default as YAML would spell it (schema objects as their non-default fields)."""
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.model_dump(exclude_defaults=True).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel) and not value.model_dump(exclude_defaults=True):
        return "(all defaults)"
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`"


def _constraint(field: FieldInfo) -> str:
    text = str in _members(field.annotation)
    words = []
    for item in field.metadata:
        if isinstance(item, Ge):
            words.append(f"≥ {item.ge}")
        elif isinstance(item, Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, Le):
            words.append(f"≤ {item.le}")
        elif isinstance(item, Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, MinLen):
            unit = "character(s)" if text else "item(s)"
            words.append(f"at least {item.min_length} {unit}")
        elif isinstance(item, MaxLen):
            unit = "character(s)" if text else "item(s)"
            words.append(f"at most {item.max_length} {unit}")
    return ", ".join(words)


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, `<…>` outside code spans kept as text."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for index in range(0, len(parts), 2):  # outside backticks
        parts[index] = parts[index].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _nested(annotation: Any, path: str) -> list[tuple[str, type[BaseModel]]]:
    """The schema classes a field's annotation holds, with the path of their section."""
    found: list[tuple[str, type[BaseModel]]] = []
    for member in _members(annotation):
        if _is_model(member):
            found.append((path, member))
            continue
        origin, args = get_origin(member), get_args(member)
        if origin is list and args:
            found += _nested(args[0], path + _ITEM)
        elif origin is dict and len(args) == 2:
            found += _nested(args[1], path + _KEY)
    return found


def schema_sections(
    model: type[BaseModel] = Recipe, path: str = ""
) -> list[tuple[str, type[BaseModel]]]:
    """(path, class) of every mapping of a recipe, depth first in field order; a class met again
    under another path (the training budget under `train`, `teacher.train`, …) gets a section
    for each path."""
    sections = [(path, model)]
    for name, field in model.model_fields.items():
        child = f"{path}.{name}" if path else name
        for sub_path, sub_model in _nested(field.annotation, child):
            sections += schema_sections(sub_model, sub_path)
    return sections


def _intro(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    if model.__doc__ is None or doc == inspect.getdoc(BaseModel):
        return ""
    return doc.split("\n\n")[0].replace("\n", " ")


def recipe_reference() -> str:
    """The Markdown reference of every recipe field (see the module docstring)."""
    lines = [
        "# Recipe reference",
        "",
        "Every field of a recipe: its type, default, constraint and meaning. Generated from the "
        "schema (`kdistill.recipes.schema`) by",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        "Do not edit it by hand: `tests/test_reference.py` fails when it differs from a fresh "
        "generation. A field name that is not listed is refused with the closest valid name "
        "(`train.epoch: unknown field 'epoch'; did you mean 'epochs'?`). `[i]` stands for an "
        "item of a list, `<name>` for a key you choose (a method's name). Any field can be "
        "overridden on the command line: `kdistill run recipe.yaml --set train.epochs=3`.",
    ]
    seen: dict[type[BaseModel], str] = {}
    for path, model in schema_sections():
        title = f"`{path}`" if path else "Top level"
        lines += ["", f"## {title}", ""]
        if model in seen:
            lines.append(f"The same fields as [`{seen[model]}`](#{_anchor(seen[model])}).")
            continue
        seen[model] = path
        intro = _intro(model)
        if intro:
            lines += [intro, ""]
        lines += [
            "| field | type | default | constraint | description |",
            "|---|---|---|---|---|",
        ]
        for name, field in model.model_fields.items():
            child = f"{path}.{name}" if path else name
            lines.append(
                f"| `{name}` | {_type_name(field.annotation, child)} | {_cell(_default(field))} "
                f"| {_constraint(field)} | {_cell(field.description or '')} |"
            )
    return "\n".join(lines) + "\n"
