"""The tokenizer a recipe names (`data.tokenizer`), and the check that two agree.

The tokenizer belongs to the teacher: a teacher saved with `save_pretrained` holds the tokenizer
it was trained with, and the token ids of the data must be that tokenizer's, or the teacher is
scored (and teaches) on ids it never saw. A recipe names it explicitly:

| `data.tokenizer` | read from                                                             |
|------------------|-----------------------------------------------------------------------|
| `hf:<folder>`    | `<folder>/tokenizer.json` (a fast tokenizer's `save_pretrained`)      |
| `<folder>`       | the same                                                              |
| `<file>.json`    | a `tokenizers` file (`Tokenizer.save`)                                |

Two tokenizers agree when they map every token to the same id and name the same special tokens
(`compare_tokenizers`): the same vocabulary size with other ids is a disagreement, not a match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdistill.errors import ConfigError

__all__ = [
    "compare_tokenizers",
    "load_tokenizer",
    "special_tokens",
    "tokenizer_file",
]


def tokenizer_file(spec: str) -> Path:
    """The `tokenizer.json` a `data.tokenizer` value names; ConfigError naming the field and
    what to give when there is none."""
    text = spec.removeprefix("hf:")
    path = Path(text).expanduser()
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        where = f"{path} holds no tokenizer.json" if path.is_dir() else f"{path}: no such file"
        raise ConfigError(
            f"data.tokenizer: {spec!r}: {where}; give the teacher's folder (hf:<folder>, saved "
            "with tokenizer.save_pretrained(folder) from a fast tokenizer) or a tokenizer.json"
        )
    return candidate


def load_tokenizer(spec: str) -> Any:
    """The `tokenizers.Tokenizer` `spec` names (see the module table)."""
    path = tokenizer_file(spec)
    try:
        import tokenizers
    except ImportError as error:
        raise ConfigError(
            f"data.tokenizer needs the `tokenizers` package ({error}); pip install tokenizers"
        ) from None
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - the library's own error, named
        raise ConfigError(f"data.tokenizer: {path}: not a tokenizers file ({error})") from None


def special_tokens(tokenizer: Any, folder: Path | None = None) -> dict[str, str]:
    """Role → token text of the special tokens: those `tokenizer_config.json` /
    `special_tokens_map.json` in `folder` name (bos, eos, pad, unk), else the tokenizer's
    added special tokens keyed by their text."""
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            continue
        config = json.loads(path.read_text())
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(role)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                roles.setdefault(role, value)
    if not roles:
        for token in tokenizer.get_added_tokens_decoder().values():
            if getattr(token, "special", False):
                roles[token.content] = token.content
    return roles


def _folder(spec: str) -> Path | None:
    path = Path(spec.removeprefix("hf:")).expanduser()
    return path if path.is_dir() else None


def compare_tokenizers(first: str, second: str, first_name: str, second_name: str) -> None:
    """Raise ConfigError unless the tokenizers `first` and `second` (specs as in the module
    table) give every token the same id and the same special tokens. The message names both,
    the first tokens whose ids differ and the fix."""
    a, b = load_tokenizer(first), load_tokenizer(second)
    vocab_a, vocab_b = a.get_vocab(with_added_tokens=True), b.get_vocab(with_added_tokens=True)
    problems = []
    if len(vocab_a) != len(vocab_b):
        problems.append(f"{len(vocab_a)} tokens against {len(vocab_b)}")
    differ = sorted(
        (token for token in vocab_a if vocab_b.get(token) != vocab_a[token]),
        key=lambda token: vocab_a[token],
    )
    if differ:
        shown = ", ".join(
            f"{token!r}: {vocab_a[token]} vs {vocab_b.get(token, 'absent')}" for token in differ[:3]
        )
        problems.append(f"{len(differ)} token(s) with other ids ({shown})")
    special_a = special_tokens(a, _folder(first))
    special_b = special_tokens(b, _folder(second))
    if special_a != special_b:
        problems.append(f"special tokens {special_a} vs {special_b}")
    if problems:
        raise ConfigError(
            f"{first_name} ({first}) and {second_name} ({second}) are not the same tokenizer: "
            + "; ".join(problems)
            + f"; the token ids must mean the same to both models: use {first_name}'s tokenizer "
            "for both (data.tokenizer), or a student built for it"
        )
