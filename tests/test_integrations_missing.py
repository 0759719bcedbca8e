"""Each integration without its host library: an ImportError naming the pip command."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    "module, hidden, extra",
    [
        ("kdistill.integrations.transformers", "transformers", "transformers"),
        ("kdistill.integrations.lightning", "lightning.pytorch", "lightning"),
    ],
)
def test_a_missing_host_library_names_the_extra(monkeypatch, module, hidden, extra):
    monkeypatch.setitem(sys.modules, hidden, None)  # its import now fails
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'kdistill\[{extra}\]'"):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)  # not a half-imported module


def test_the_integrations_package_imports_no_host_library():
    import kdistill.integrations  # noqa: F401

    assert kdistill.integrations.__doc__
