"""Module paths moved by issue 26 still import, as the very module at the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill._aliases import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_imports_the_module_at_its_new_path(old):
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    # the module keeps its own spec (reload, pickling and tracebacks name the new path)
    assert new.__spec__.name == MOVED[old]


def test_from_old_path_import_gives_the_same_class():
    from kdistill.cache import TeacherCache as old
    from kdistill.cache.tokens import TokenTeacherCache as old_tokens

    from kdistill.distill.teacher.store import TeacherCache as new
    from kdistill.distill.teacher.store.tokens import TokenTeacherCache as new_tokens

    assert old is new and old_tokens is new_tokens


def test_no_file_is_left_at_an_old_path():
    src = importlib.import_module("kdistill").__path__[0]
    left = [
        old
        for old in MOVED
        if (Path(src).parent / (old.replace(".", "/") + ".py")).exists()
        or (Path(src).parent / old.replace(".", "/")).is_dir()
    ]
    assert not left, f"files at old module paths (they would shadow the alias): {left}"


def test_old_paths_import_in_a_fresh_interpreter():
    # no kdistill module imported beforehand: `import kdistill.cache.tokens` alone must work
    code = (
        "import kdistill.cache.tokens as t, kdistill.engine.dense_metrics as d;"
        "assert t.__name__ == 'kdistill.distill.teacher.store.tokens';"
        "assert d.__name__ == 'kdistill.tasks.dense_metrics'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
