"""Old module paths that still import: `kdistill.cache` is `kdistill.distill.teacher.store`, etc.

Issue 26 moved the distillation core into `kdistill/distill/` (teacher sources in
`kdistill/distill/teacher/`) and the problem metrics into `kdistill/tasks/`. A user's
``import kdistill.cache`` or ``from kdistill.taps import Taps`` keeps working: a finder on
``sys.meta_path`` answers each old name with the module at its new path — the *same* module
object, so classes, ``isinstance`` and monkeypatching agree whichever path was used. No file is
left at an old path. The map is also in CHANGELOG.md and docs/architecture.md.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module path → new module path
MOVED: dict[str, str] = {
    "kdistill.distiller": "kdistill.distill.distiller",
    "kdistill.taps": "kdistill.distill.taps",
    "kdistill.connectors": "kdistill.distill.connectors",
    "kdistill.multitask": "kdistill.distill.multitask",
    "kdistill.layers": "kdistill.distill.layers",
    "kdistill.onpolicy": "kdistill.distill.onpolicy",
    "kdistill.teacher_speedup": "kdistill.distill.teacher.speedup",
    "kdistill.cache": "kdistill.distill.teacher.store",
    "kdistill.cache.tokens": "kdistill.distill.teacher.store.tokens",
    "kdistill.engine.dense_metrics": "kdistill.tasks.dense_metrics",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the module already at (or imported from) its new path."""

    def __init__(self, target: str):
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the alias spec on the module: give it back its own
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), ahead of the path-based finder."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
