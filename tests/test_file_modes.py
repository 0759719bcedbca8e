"""Files written atomically get the permissions a plain open() gives, not mkstemp's 0o600."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

from kdistill.engine.checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    save_checkpoint,
    save_whole_model,
)

WRITERS = {
    "atomic_write_text": lambda folder: atomic_write_text(folder / "report.md", "# report\n"),
    "atomic_write_bytes": lambda folder: atomic_write_bytes(folder / "results.json", b"{}"),
    "save_checkpoint": lambda folder: save_checkpoint(
        folder, "student", {"w": torch.ones(2)}, {"epoch": 1}, keep_previous=True
    ),
    "save_whole_model": lambda folder: save_whole_model(nn.Linear(2, 2), folder / "m.pt"),
}
WRITTEN = {
    "atomic_write_text": "report.md",
    "atomic_write_bytes": "results.json",
    "save_checkpoint": "student.safetensors",
    "save_whole_model": "m.pt",
}


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path, umask, writer):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:  # the reference: what open() gives
            handle.write("x")
        WRITERS[writer](tmp_path)
        WRITERS[writer](tmp_path)  # written again over the first file: still the same mode
    finally:
        os.umask(old)
    expected = mode_of(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask  # the reference itself, computed by hand
    assert mode_of(tmp_path / WRITTEN[writer]) == expected
    # no temporary file left behind
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
