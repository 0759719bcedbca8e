"""Name → constructor registries (models, losses) with helpful errors for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to `name` (difflib ratio), best first; substring hits are kept too."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    for candidate in candidates:
        if len(found) >= n:
            break
        if name and name in candidate and candidate not in found:
            found.append(candidate)
    return found


def unknown_name_message(kind: str, name: str, candidates: Iterable[str]) -> str:
    """`unknown loss 'kdd'; did you mean 'kd', 'dkd'? (known: ...)`"""
    candidates = sorted(candidates)
    suggestions = close_matches(name, candidates)
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    shown = ", ".join(candidates[:40]) + (" …" if len(candidates) > 40 else "")
    return f"unknown {kind} {name!r}{hint} (known: {shown})"


class Registry(Generic[T]):
    """A name → constructor map. `register` is a decorator; `create` builds by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._constructors: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(constructor: Callable[..., T]) -> Callable[..., T]:
            if name in self._constructors:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._constructors[name] = constructor
            return constructor

        return add

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._constructors[name]
        except KeyError:
            raise KeyError(unknown_name_message(self.kind, name, self._constructors)) from None

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._constructors)

    def __contains__(self, name: object) -> bool:
        return name in self._constructors
