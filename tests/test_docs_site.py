"""The documentation site (`mkdocs.yml`, `docs/`) builds with `mkdocs build --strict`: a broken
link, a link to a missing anchor, a page missing from the nav or a nav entry without its page,
and an API page whose module does not import all fail the build, and so this test.

Needs the `docs` extra (mkdocs, mkdocs-material, mkdocstrings[python]; also in `dev`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _need_mkdocs() -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(
            module, reason=f"{module} is not installed: pip install -e '.[docs]' to build the site"
        )


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")},
        timeout=300,
    )


def test_docs_site_builds_strictly(tmp_path):
    _need_mkdocs()
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "getting-started/index.html", "api/kdistill/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # the API reference is generated from the docstrings, not written by hand
    api = (tmp_path / "site" / "api" / "kdistill" / "index.html").read_text()
    assert 'id="kdistill.Distiller"' in api


def test_a_broken_link_fails_the_build(tmp_path):
    """The strictness is real: a copy of the site with one link to a page that does not exist
    fails to build."""
    _need_mkdocs()
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "src").symlink_to(ROOT / "src")
    page = copy / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = _build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def readme_as_index(readme: str) -> str:
    """The site's home page is the README with its links made relative to docs/."""
    return readme.replace("](docs/", "](").replace("[CHANGELOG.md](CHANGELOG.md)", "`CHANGELOG.md`")


def test_the_site_home_page_is_the_readme():
    """docs/index.md is the README (links rewritten): the front page is written once. After an
    edit of README.md: python -c 'from tests.test_docs_site import write_index; write_index()'."""
    index = (ROOT / "docs" / "index.md").read_text()
    assert index == readme_as_index((ROOT / "README.md").read_text())


def write_index() -> None:
    (ROOT / "docs" / "index.md").write_text(readme_as_index((ROOT / "README.md").read_text()))


def test_every_import_in_the_readme_and_docs_works():
    """The import lines of every Python block of the README and the guides still import (old
    module paths included: they are kept as aliases)."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    failures = []
    for page in pages:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                line = line.split("#")[0].rstrip()
                if re.match(r"^(import|from) kdistill\b", line) and not line.endswith(("(", ",")):
                    try:
                        exec(line, {})
                    except Exception as error:  # noqa: BLE001 - each failure is reported
                        failures.append(f"{page.name}: {line}: {error!r}")
    assert not failures, "\n".join(failures)
