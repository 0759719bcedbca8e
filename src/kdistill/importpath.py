"""Objects named by an import path `package.module:attribute`, with errors that say the fix.

Used for models (`kdistill.models.specs`) and dataset factories (`kdistill.data.factory`); it
sits below both, importing nothing of kdistill but its errors and name matching.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from kdistill.errors import ConfigError
from kdistill.registry import close_matches

__all__ = ["import_callable"]


def import_callable(path: str, what: str = "model") -> Callable[..., Any]:
    """`package.module:attribute` (the attribute may be dotted: `Outer.inner`) → the object.

    A module that is not found is looked for once more with the current folder on `sys.path`
    (appended, as `python -m` would have it), so `kdistill run` started in a project folder finds
    that project's `mymodels.py`. Errors name the module or attribute and the fix."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(
            f"{path!r}: an import path is package.module:callable, e.g. mypkg.models:MyStudent"
        )
    module = _import_module(module_name, path)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            hint = close_matches(part, public, n=3)
            raise ConfigError(
                f"{path!r}: {getattr(target, '__name__', module_name)!r} has no attribute "
                f"{part!r}" + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(
            f"{path!r}: {attribute} is a {type(target).__name__}, not a class or function that "
            f"builds the {what}"
        )
    return target


def _import_module(module_name: str, path: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if not _is_missing(error, module_name):
            raise ConfigError(f"{path!r}: importing {module_name!r} failed: {error}") from None
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError as retry:
                if not _is_missing(retry, module_name):
                    raise ConfigError(
                        f"{path!r}: importing {module_name!r} failed: {retry}"
                    ) from None
        raise ConfigError(
            f"{path!r}: cannot import {module_name!r} ({error}); install the package, or run "
            "from the folder that holds it, or add that folder to PYTHONPATH"
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's module raised while importing
        raise ConfigError(
            f"{path!r}: importing {module_name!r} raised {type(error).__name__}: {error}"
        ) from None


def _is_missing(error: ModuleNotFoundError, module_name: str) -> bool:
    """True when the module itself (or a parent package) is missing, not one it imports."""
    missing = error.name or ""
    return module_name == missing or module_name.startswith(missing + ".")
