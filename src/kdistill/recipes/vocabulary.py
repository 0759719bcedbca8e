"""The token ids mean the same to the data, the teacher and the students (checked when a recipe
is read).

- A teacher saved with `save_pretrained` next to its tokenizer (`hf:<folder>` holding
  `tokenizer.json`) must be named by `data.tokenizer`: otherwise the data would be tokenised by a
  BPE trained on the training text, ids the teacher never saw.
- Every model folder holding a tokenizer must hold the same one as `data.tokenizer`: the same id
  for every token and the same special tokens (`data.tokenizer.compare_tokenizers`).
- Every model's vocabulary (its config's or its kwargs' `vocab_size`) covers the tokenizer's ids,
  and the teacher's and the students' vocabularies have one size (their logits are compared
  position by position).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdistill.data.tokenizer import compare_tokenizers, load_tokenizer, tokenizer_file
from kdistill.errors import ConfigError
from kdistill.models.specs import pretrained_folder
from kdistill.tasks import get_task

__all__ = ["check_vocabularies", "model_vocab_size", "teacher_tokenizer"]


def teacher_tokenizer(model: str) -> Path | None:
    """The `tokenizer.json` an `hf:<folder>` model spec holds, or None."""
    folder = pretrained_folder(model)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    return folder / "tokenizer.json"


def model_vocab_size(model: str, kwargs: dict[str, Any]) -> int | None:
    """The vocabulary a model spec builds: `kwargs.vocab_size`, else an `hf:<folder>`'s
    `config.json` `vocab_size`; None when the spec does not say (a registry model gets the data's
    size)."""
    if isinstance(kwargs.get("vocab_size"), int):
        return int(kwargs["vocab_size"])
    folder = pretrained_folder(model)
    if folder is not None and (folder / "config.json").is_file():
        size = json.loads((folder / "config.json").read_text()).get("vocab_size")
        return int(size) if isinstance(size, int) else None
    return None


def _models(recipe: Any) -> list[tuple[str, Any]]:
    return [("teacher", recipe.teacher)] + [
        (f"students.{spec.name}", spec) for spec in recipe.students
    ]


def check_vocabularies(recipe: Any) -> None:
    """Raise ConfigError (a ValueError: the recipe is refused when read) naming the field and
    the fix when the data's tokenizer and the models' vocabularies disagree (module doc)."""
    text = get_task(recipe.task).reads_text
    named = recipe.data.tokenizer
    if not text:
        if named is not None:
            raise ConfigError(
                f"data.tokenizer: task {recipe.task} reads no text; leave data.tokenizer out"
            )
        return
    own = teacher_tokenizer(recipe.teacher.model)
    if own is not None and named is None:
        raise ConfigError(
            f"data.tokenizer: the teacher {recipe.teacher.model} holds the tokenizer it was "
            f"trained with ({own}); name it, data.tokenizer: hf:{own.parent}, so that the data "
            "are its token ids (without it a new BPE would be trained on the text)"
        )
    if named is None:
        return
    size = load_tokenizer(named).get_vocab_size(with_added_tokens=True)
    for role, spec in _models(recipe):
        held = teacher_tokenizer(spec.model)
        if held is not None and held.resolve() != tokenizer_file(named).resolve():
            compare_tokenizers(named, f"hf:{held.parent}", "data.tokenizer", role)
    sizes = {}
    for role, spec in _models(recipe):
        vocab = model_vocab_size(spec.model, spec.kwargs)
        if vocab is None:
            continue
        if vocab < size:
            raise ConfigError(
                f"{role}: vocab_size {vocab} is smaller than the tokenizer's {size} tokens "
                f"(data.tokenizer {named}): ids ≥ {vocab} have no embedding; set "
                f"{role}.kwargs.vocab_size: {size}"
            )
        sizes[role] = vocab
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{role} {vocab}" for role, vocab in sizes.items())
        raise ConfigError(
            f"vocab_size differs between the models ({shown}): their logits are compared token "
            f"by token; build every student with the teacher's vocab_size "
            f"({sizes.get('teacher', max(sizes.values()))})"
        )
