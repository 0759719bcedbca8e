"""What every teacher-output store shares: the manifest, the fingerprints of the teacher and
the data, the storage dtypes, the weightless stand-in teacher.

The image-output store (`images`, `image_build`) and the token top-k store (`tokens`) both
write ``manifest.json`` last and atomically, with ``"complete": false`` while the arrays are
written (an interrupted build is refused on open), and record the teacher's weights digest and
the dataset's fingerprint, checked again when the store is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.distill.teacher.store.signatures import (
    SIGNATURE_FILE,
    SIGNATURE_METHOD,
    SIGNATURE_RTOL,
)
from kdistill.errors import CacheError
from kdistill.io import atomic_write_text, tensors_digest

log = logging.getLogger("kdistill")

MANIFEST = "manifest.json"

# storage dtype name → (numpy dtype on disk, torch dtype it holds)
CACHE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.int16), torch.bfloat16),  # bit patterns; viewed back on read
}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


# -- small pure helpers ---------------------------------------------------------------------------
def teacher_digest(teacher: nn.Module) -> str:
    """SHA-256 over the teacher's state dict (parameters and buffers: names, dtypes, bytes)."""
    return tensors_digest(teacher.state_dict())


def is_randomly_augmented(*sources: Any) -> bool:
    """True when a loader or dataset (or a loader's dataset) says it applies random augmentation.

    The convention is a truthy ``augment`` attribute; kdistill's own data pipeline has none.
    """
    for source in sources:
        if source is None:
            continue
        if getattr(source, "augment", False):
            return True
        if getattr(getattr(source, "dataset", None), "augment", False):
            return True
    return False


def loader_views(loader: Any) -> dict | None:
    """The keyed augmentation of a loader — ``{"augmentation": {…}, "seed": s}`` from its
    ``view_spec()`` (kdistill's `BatchLoader` with ``augmentation=``) — or None."""
    spec = getattr(loader, "view_spec", None)
    return spec() if callable(spec) else None


def _view_key(views: Mapping | None) -> dict | None:
    """What decides the views (augmentation and seed), without the epoch count."""
    if views is None:
        return None
    return {"augmentation": views["augmentation"], "seed": views["seed"]}


def _to_storage(value: Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the numpy array that is written to disk for storage `dtype`."""
    np_dtype, torch_dtype = CACHE_DTYPES[dtype]
    stored = value.detach().to("cpu", torch_dtype).contiguous()
    if torch_dtype == torch.bfloat16:
        return stored.view(torch.int16).numpy()
    return stored.numpy()


def _from_storage(array: np.ndarray, dtype: str) -> Tensor:
    """The float32 tensor that a stored numpy array holds."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if CACHE_DTYPES[dtype][1] == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def teacher_and_data(teacher: nn.Module, dataset: Any) -> dict[str, dict]:
    """The manifest's record of what a store was built from: the teacher's class and weights
    digest, the dataset's name, fingerprint and size (checked again when the store is opened)."""
    return {
        "teacher": {"class": type(teacher).__name__, "sha256": teacher_digest(teacher)},
        "dataset": {
            "name": getattr(dataset, "name", type(dataset).__name__),
            "fingerprint": dataset.fingerprint(),
            "size": len(dataset),
        },
    }


def check_written_once(written: np.ndarray, unit: str, need: str) -> None:
    """CacheError unless every entry of `written` (how many times the build wrote each row) is
    1: a loader that skipped samples or gave some twice would leave stored outputs missing or
    overwritten. `unit` names the rows, `need` says what the build needs."""
    if bool((written == 1).all()):
        return
    missing, repeated = int((written == 0).sum()), int((written > 1).sum())
    raise CacheError(
        f"the batches gave {missing} of {len(written)} {unit} no teacher output and {repeated} "
        f"more than one; {need}"
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_name(name: str, what: str) -> str:
    if not _SAFE_NAME.match(name):
        raise CacheError(
            f"{what} {name!r} cannot name a cache file: use letters, digits, '_', '.', '-'"
        )
    return name


class CachedTeacher(nn.Module):
    """A weightless stand-in for a teacher whose outputs all come from a cache.

    Offline distillation needs no teacher in memory:
    ``Distiller(cache.stand_in(), student, terms)`` with ``fit(..., teacher_outputs=cache)``.
    It holds an empty placeholder module at each cached layer name, so terms that tap teacher
    layers resolve; running it raises CacheError. One limit: a connector (student and teacher
    channels differ) is sized by `Distiller.build` running the teacher on the first batch, so
    a term that needs one needs the real teacher.
    """

    def __init__(self, layers: Iterable[str] = ()):
        super().__init__()
        for layer in layers:
            parent: nn.Module = self
            for part in layer.split("."):
                child = parent._modules.get(part)
                if child is None:
                    child = nn.Module()
                    parent.add_module(part, child)
                parent = child

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise CacheError(
            "the teacher is a CachedTeacher stand-in and cannot run: something asked for "
            "teacher outputs the cache did not give (pass teacher_outputs=cache to fit; terms "
            "whose connector must be sized on a first batch need the real teacher)"
        )


def teacher_difference(manifest: Mapping[str, Any], teacher: nn.Module) -> str | None:
    """What makes a store stale for `teacher` (its weights are not those the store was built
    from, by digest), or None."""
    expected, actual = manifest["teacher"]["sha256"], teacher_digest(teacher)
    if expected == actual:
        return None
    return (
        f"teacher weights differ (stored from {manifest['teacher']['class']} with weights sha256 "
        f"{_short(expected)}, this {type(teacher).__name__} has {_short(actual)}) — a stale store"
    )


def _short(digest: str) -> str:
    return digest[:12] + "…"


# -- the atomic build every store shares ----------------------------------------------------------
def check_build_folder(directory: Path) -> None:
    """CacheError when `directory` holds files but is no store: a build writes into a new or
    empty folder, or rebuilds a store in place."""
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
        raise CacheError(
            f"{directory}: not empty and not a teacher cache; build into a new or empty folder "
            "(an existing cache is rebuilt in place)"
        )


def begin_build(directory: Path, manifest: dict, patterns: Iterable[str]) -> None:
    """Mark `directory` unfinished (`manifest`, ``"complete": false``, written atomically) before
    any array is (re)written, then delete the previous build's arrays matching `patterns`: a
    crash from here on never leaves an old complete manifest beside half-new arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    for pattern in patterns:
        for old in directory.glob(pattern):
            old.unlink()


def finish_build(
    directory: Path, manifest: dict, signatures: np.ndarray, sample_shape: Any, started: float
) -> None:
    """Store the input signatures, then write `manifest` complete (atomically, last): with the
    signatures' file, method and digest, and the build's duration since `started`."""
    np.save(directory / SIGNATURE_FILE, signatures)
    manifest.update(
        complete=True,
        inputs={
            "shape": sample_shape,
            "signature": SIGNATURE_METHOD,
            "rtol": SIGNATURE_RTOL,
            "file": SIGNATURE_FILE,
            "sha256": _file_digest(directory / SIGNATURE_FILE),
        },
        build_seconds=round(time.perf_counter() - started, 3),
    )
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
