"""One output of a model that returns several (`(logits, features)`, `{"logits": …, …}`),
picked for good: `pick_output(model, 0)` makes `model(x)` return `select_output(model(x), 0)`.

A recipe's `output:` on the teacher or a student does this, so the hard loss, the evaluation and
every soft term read the same output. It is a forward hook (a picklable one), not a wrapper:
layer names (`named_modules()`), weight names and checkpoints stay the model's own.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdistill.distill.distiller import select_output
from kdistill.errors import ConfigError

__all__ = ["OutputPick", "pick_output", "picked_output"]

_ATTRIBUTE = "_kdistill_output"


class OutputPick:
    """The forward hook: the model's output → the output at `key` (a dict key or a position)."""

    def __init__(self, key: str | int, label: str):
        self.key = key
        self.label = label

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        try:
            return select_output(output, self.key, self.label)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            message = str(error.args[0] if error.args else error)
            raise ConfigError(f"{self.label}.output: {self.key!r}: {message}") from None


def pick_output(model: nn.Module, key: str | int | None, label: str = "model") -> nn.Module:
    """`model`, returning only its output at `key` from now on (None: unchanged). `label` names
    the recipe field in messages (`teacher`, `students.0`). Returns the same model."""
    if key is None:
        return model
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise TypeError(f"{label}.output must be a key (str) or a position (int), got {key!r}")
    if picked_output(model) is not None:
        raise ValueError(f"{label}: an output is already picked ({picked_output(model)!r})")
    model.register_forward_hook(OutputPick(key, label))
    setattr(model, _ATTRIBUTE, key)
    return model


def picked_output(model: nn.Module) -> str | int | None:
    """The output `pick_output` picked on `model`, or None."""
    return getattr(model, _ATTRIBUTE, None)
