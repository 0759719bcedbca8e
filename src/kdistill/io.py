"""Files: atomic writes that keep the usual permissions, tensor digests, the metrics log.

The lowest layer: the cache, the engine and the reports all write through these.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch
from torch import Tensor


def create_temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new, empty temporary file next to `path`, open for writing.

    It is created like a plain ``open(path, "w")`` creates a file — mode 0o666 filtered by the
    process umask (and the folder's default ACL, if any) — so that the file renamed into place
    gets the permissions any other file the user writes gets. (``tempfile.mkstemp`` would make
    it 0o600, owner-only, whatever the umask.)
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(handle)` on a temporary file in the same folder, fsync, then rename it over
    `path`; on any error the temporary file is removed and `path` is left as it was. The file
    gets the permissions a plain ``open()`` would give it (0o666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(
            value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        )
    return digest.hexdigest()


class MetricsLog:
    """Appends one JSON object per line (`metrics.jsonl`); each line is flushed at once.

    A record whose (model, epoch) is already in the file is not written again: a run killed
    after an epoch's line but before its checkpoint repeats that epoch on resume, identically.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._written: set[tuple] | None = None

    def write(self, record: dict) -> None:
        if self._written is None:
            self._written = {(r.get("model"), r.get("epoch")) for r in self.read()}
        key = (record.get("model"), record.get("epoch"))
        if key in self._written:
            return
        self._written.add(key)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
