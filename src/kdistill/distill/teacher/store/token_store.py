"""The token top-k store, read side: `TokenTeacherCache` (stored top-k teacher distributions of
token sequences, opened and checked) and the layout shared with its build (`tokens`); the format
is described in `kdistill.distill.teacher.store.tokens`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.distill.teacher.store.manifest import (
    CACHE_DTYPES,
    MANIFEST,
    CachedTeacher,
    _file_digest,
    _from_storage,
    _short,
    teacher_difference,
)
from kdistill.distill.teacher.store.signatures import (
    InputSignatures,
    _EpochRows,
)
from kdistill.errors import CacheError
from kdistill.losses.topk import TopKDistribution

__all__ = ["FILES", "TOKEN_CACHE_KIND", "TokenTeacherCache", "bytes_per_token", "id_dtype"]

TOKEN_CACHE_KIND = "token_topk"
TOKEN_FORMAT_VERSION = 1
FILES = {"ids": "topk.ids.npy", "log_probs": "topk.log_probs.npy", "rest": "topk.rest.npy"}
SIGNATURE_FILE = "inputs.signature.npy"
IGNORE_INDEX = -100


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer dtype that holds every token id of a V-token vocabulary."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size < 1 << 31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def bytes_per_token(k: int, vocab_size: int, dtype: str) -> int:
    """Bytes stored per position: k ids, k log-probabilities and one rest log-mass."""
    value = CACHE_DTYPES[dtype][0].itemsize
    return k * (id_dtype(vocab_size).itemsize + value) + value


class TokenTeacherCache(_EpochRows):
    """Stored top-k teacher distributions of token sequences (see the module docstring); a
    `TeacherSource`: pass it to ``kd.fit(..., teacher_outputs=cache)`` with
    ``Distiller(cache.stand_in(), student, terms)`` (the teacher need not be loaded).

    `lookup(index, inputs)` → (``{output: TopKDistribution}`` — or the distribution itself for
    a teacher returning a plain tensor — with ids ``N×L×k`` int64 and float32 log-probs, None),
    after checking the batch's inputs against the stored signatures. Open with `open`.
    """

    layers: list[str] = []  # no tapped teacher layers

    def __init__(self, directory: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.manifest = manifest
        self._arrays = arrays
        self.size = int(manifest["dataset"]["size"])
        self.views = None
        self.epoch = 0
        self.source = f"token teacher cache {directory}"
        self.signatures = InputSignatures(
            arrays[manifest["inputs"]["file"]], manifest["inputs"]["shape"], self.source
        )

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (
            f"TokenTeacherCache({str(self.directory)!r}, size={self.size}, topk={self.topk}, "
            f"temperature={self.temperature:g}, vocab_size={self.vocab_size}, dtype={self.dtype})"
        )

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def quality(self) -> dict[str, float]:
        """The storage error measured at build time (see the module docstring)."""
        return dict(self.manifest["quality"])

    @property
    def bytes_per_token(self) -> int:
        return int(self.manifest["bytes_per_token"])

    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())

    def stand_in(self) -> CachedTeacher:
        """A weightless teacher for `Distiller` when every teacher output comes from here."""
        return CachedTeacher()

    @classmethod
    def open(
        cls,
        directory: str | Path,
        teacher: nn.Module | None = None,
        dataset: Any = None,
        topk: int | str = "any",
        temperature: float | str = "any",
        dtype: str | None = None,
        verify: bool = False,
    ) -> TokenTeacherCache:
        """Open and validate stored token distributions; every argument given is checked
        against the manifest — `teacher` (weights digest), `dataset` (fingerprint), `topk`,
        `temperature`, `dtype` — and CacheError lists every difference. `verify` re-hashes
        the array files. An unfinished build, a missing or truncated file is refused."""
        directory = Path(directory)
        rebuild = "rebuild it (build_token_cache) or delete the folder"
        path = directory / MANIFEST
        if not path.exists():
            raise CacheError(f"{directory}: no {MANIFEST}; not a teacher cache; {rebuild}")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CacheError(f"{path}: unreadable manifest ({error}); {rebuild}") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != TOKEN_CACHE_KIND:
            raise CacheError(
                f"{directory}: not stored token distributions (a teacher-output cache of "
                f"another kind: open it with kdistill.cache.TeacherCache.open); {rebuild}"
            )
        if manifest.get("format") != TOKEN_FORMAT_VERSION:
            raise CacheError(
                f"{path}: token cache format {manifest.get('format')!r}, this kdistill reads "
                f"{TOKEN_FORMAT_VERSION}; {rebuild}"
            )
        if manifest.get("complete") is not True:
            raise CacheError(
                f"{directory}: incomplete stored token distributions — the build did not "
                f"finish (interrupted or failed), so its arrays are partly empty; {rebuild}"
            )
        problems = cls._differences(manifest, teacher, dataset, topk, temperature, dtype)
        if problems:
            raise CacheError(
                f"{directory}: the stored token distributions do not match: "
                + "; ".join(problems)
                + f"; {rebuild}"
            )
        arrays = {}
        files = {FILES[name]: manifest["files"][FILES[name]] for name in FILES}
        files[manifest["inputs"]["file"]] = manifest["inputs"]["sha256"]
        for file, sha256 in files.items():
            file_path = directory / file
            if not file_path.exists():
                raise CacheError(f"{file_path}: missing array file of the token cache; {rebuild}")
            try:
                array = np.load(file_path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:
                raise CacheError(
                    f"{file_path}: truncated or corrupt ({error}); {rebuild}"
                ) from None
            if array.shape[:1] != (manifest["dataset"]["size"],):
                raise CacheError(
                    f"{file_path}: holds {array.shape[0] if array.ndim else 0} rows, the "
                    f"manifest says {manifest['dataset']['size']}; {rebuild}"
                )
            if verify and _file_digest(file_path) != sha256:
                raise CacheError(f"{file_path}: checksum mismatch (changed after the build)")
            arrays[file] = array
        return cls(directory, manifest, arrays)

    @staticmethod
    def _differences(manifest, teacher, dataset, topk, temperature, dtype) -> list[str]:
        problems = []
        stale = None if teacher is None else teacher_difference(manifest, teacher)
        if stale is not None:
            problems.append(stale)
        if dataset is not None:
            fingerprint = getattr(dataset, "fingerprint", None)
            actual = fingerprint() if callable(fingerprint) else None
            expected = manifest["dataset"]["fingerprint"]
            if expected != actual:
                problems.append(
                    f"dataset differs (stored for {manifest['dataset']['name']!r}, "
                    f"{manifest['dataset']['size']} samples, fingerprint {_short(expected)}; "
                    f"given {getattr(dataset, 'name', type(dataset).__name__)!r}, "
                    f"{len(dataset)} samples, fingerprint "
                    f"{_short(actual) if actual else 'none'})"
                )
        if topk != "any" and topk != manifest["topk"]:
            problems.append(f"top-k differs (stored: {manifest['topk']}, asked for {topk})")
        if temperature != "any" and float(temperature) != manifest["temperature"]:
            problems.append(
                f"temperature differs (stored at {manifest['temperature']:g}, asked for "
                f"{float(temperature):g})"
            )
        if dtype is not None and dtype != manifest["dtype"]:
            problems.append(f"dtype differs (stored {manifest['dtype']}, asked for {dtype})")
        return problems

    def lookup(self, index: Tensor, inputs: Any = None) -> tuple[Any, None]:
        """(the distributions of the samples at dataset positions `index`, None) after checking
        that `inputs` are the samples they were computed on (CacheError otherwise; IndexError
        for an index outside [0, size))."""
        rows, view = self._rows(index)
        self.signatures.check(rows, inputs, view)
        dist = self.read(rows)
        key = self.manifest.get("output")
        return ({key: dist} if key is not None else dist), None

    def read(self, rows: np.ndarray | Tensor) -> TopKDistribution:
        """The stored distributions of dataset rows `rows`, unchecked (for inspection; training
        reads them through `lookup`, which checks the inputs first)."""
        rows = np.asarray(torch.as_tensor(rows).cpu().reshape(-1).numpy(), dtype=np.int64)
        ids = self._arrays[FILES["ids"]][rows]
        return TopKDistribution(
            torch.from_numpy(ids.astype(np.int64)),
            _from_storage(self._arrays[FILES["log_probs"]][rows], self.dtype),
            _from_storage(self._arrays[FILES["rest"]][rows], self.dtype),
            self.temperature,
            self.vocab_size,
        )

    def describe(self) -> str:
        """A few lines for people: what is stored, how big, and the measured storage error."""
        q = self.quality
        return (
            f"token teacher cache {self.directory}: {self.size} blocks of "
            f"{self.manifest['dataset']['name']!r}, teacher {self.manifest['teacher']['class']} "
            f"({_short(self.manifest['teacher']['sha256'])}), top-{self.topk} of "
            f"{self.vocab_size} tokens at T={self.temperature:g}, {self.dtype}, "
            f"{self.bytes_per_token} B per token, {self.nbytes() / 2**20:.1f} MiB\n"
            f"  on {q['positions']} positions: mean KL(full ‖ stored) "
            f"{q['mean_kl_full_stored']:.3g} nats (max {q['max_kl_full_stored']:.3g}), mean "
            f"rest mass {q['mean_rest_mass']:.3g}"
        )
