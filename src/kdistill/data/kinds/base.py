"""The data-kind protocol, the registry and the helpers every kind shares.

A **data kind** reads one format of the user's files (or a built-in set) for one kind of
target, in the field's own conventions: a reader (`read`), a validator (`check`: the fields it
needs, the files exist; cheap, run when a recipe is read) and a fingerprint (`fingerprint`: a
sha256 over the kind, its options and the bytes of every file `read` reads, so a cache built
from other files is caught). Kinds are registered by ``(target, name)``: the same name may read
a format for several targets (``npz`` with ``y`` of class indices or of masks).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kdistill.errors import ConfigError, DataError
from kdistill.registry import unknown_name_message

__all__ = [
    "COMMON_KEYS",
    "TARGETS",
    "TASK_OF_TARGET",
    "DataKind",
    "DataSplits",
    "FileKind",
    "file_digest",
    "get_kind",
    "kinds_for",
    "read_data",
    "register_kind",
    "resolve",
    "spec_dict",
]

#: what a batch's target carries, and the built-in task that reads it.
TASK_OF_TARGET = {
    "class": "classification",
    "mask": "segmentation",
    "boxes": "detection",
    "mask+boxes": "multitask",
    "tokens": "language_modeling",
    "completions": "completion",
}
TARGETS = tuple(TASK_OF_TARGET)

#: data-section keys that belong to the caller (normalisation, sizes, augmentation), not to a
#: kind: never refused as unknown.
COMMON_KEYS = (
    "kind",
    "dataset",
    "normalize",
    "val_size",
    "train_limit",
    "test_limit",
    "val_limit",
    "augment",
    "tokenizer",
)


@dataclass
class DataSplits:
    """What a kind reads: the splits (``val`` None when the files have none: the caller holds
    part of ``train`` out), the fingerprint of the files read, a description (``info``: the
    kind, the files, the classes, COCO's category-id map, counts) and, for token kinds, the
    tokenizer used."""

    train: Any
    test: Any
    val: Any | None
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None


class DataKind(Protocol):
    """A registered reader + validator + fingerprint of one data format (see the module doc)."""

    name: str
    target: str
    layout: str  # the files it reads, one line
    options: tuple[str, ...]  # data-spec keys it reads

    def check(self, spec: Mapping[str, Any]) -> None: ...

    def files(self, spec: Mapping[str, Any]) -> list[Path]: ...

    def fingerprint(self, spec: Mapping[str, Any]) -> str: ...

    def read(
        self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0
    ) -> DataSplits: ...


_KINDS: dict[str, dict[str, DataKind]] = {target: {} for target in TARGETS}


def register_kind(kind: DataKind) -> DataKind:
    """Add `kind` under ``(kind.target, kind.name)``; ValueError when taken or the target is
    unknown. Returns `kind` (usable as a class decorator on an instance factory)."""
    if kind.target not in _KINDS:
        raise ValueError(f"data kind {kind.name!r}: target must be one of {TARGETS}")
    if kind.name in _KINDS[kind.target]:
        raise ValueError(f"data kind {kind.name!r} is registered twice for target {kind.target}")
    _KINDS[kind.target][kind.name] = kind
    return kind


def kinds_for(target: str) -> dict[str, DataKind]:
    """The kinds registered for `target`, by name (registration order)."""
    if target not in _KINDS:
        raise ValueError(f"unknown target {target!r}; targets: {list(TARGETS)}")
    return dict(_KINDS[target])


def _menu(target: str) -> str:
    return "; ".join(f"{name}: {kind.layout}" for name, kind in _KINDS[target].items())


def get_kind(target: str, name: str, task: str | None = None) -> DataKind:
    """The kind `name` of `target`; ConfigError naming the kinds `target` has (with the files
    each reads), and the tasks that read `name` when another target has it."""
    kinds = kinds_for(target)
    if name in kinds:
        return kinds[name]
    task = task or TASK_OF_TARGET[target]
    elsewhere = [TASK_OF_TARGET[t] for t in TARGETS if t != target and name in _KINDS[t]]
    if elsewhere:
        head = (
            f"data kind {name!r} is not read by task {task} (it is read by task "
            f"{' and '.join(elsewhere)})"
        )
    else:
        head = unknown_name_message(f"data kind of task {task}", name, kinds)
    raise ConfigError(f"data.kind: {head}; task {task} reads {_menu(target)}")


def spec_dict(spec: Any) -> dict[str, Any]:
    """A data spec as a plain dict: a mapping, or a pydantic model (`model_dump`)."""
    if spec is None:
        return {}
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump(mode="json", exclude_none=True)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"data: expected a mapping of fields, got {type(spec).__name__}")
    return {str(key): value for key, value in spec.items() if value is not None}


def _kind_name(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    options = dict(spec)
    name = options.get("kind")
    if name is None:
        dataset = options.get("dataset")
        if dataset is None:
            raise ConfigError("data.kind: missing; name the data kind (e.g. kind: coco)")
        dataset = str(dataset)
        if ":" in dataset:
            options.setdefault("factory", dataset)
            return "factory", options
        return {"arrays": "npz"}.get(dataset, dataset), options
    if not isinstance(name, str):
        raise ConfigError(f"data.kind: expected a name, got {name!r}")
    return name, options


def resolve(target: str, spec: Any, task: str | None = None) -> tuple[DataKind, dict[str, Any]]:
    """(the kind, its options) a data spec names for `target`, checked (`DataKind.check`).

    The spec names its kind with ``kind:``; a spec without one is read as a recipe's older
    ``dataset:`` field (a built-in name, ``imagefolder``, ``arrays`` → ``npz``, or
    ``package.module:factory`` → kind ``factory``). With ``kind:`` a key the kind does not read
    is refused (a typo); `COMMON_KEYS` belong to the caller."""
    options = spec_dict(spec)
    name, options = _kind_name(options)
    kind = get_kind(target, name, task)
    if "kind" in options:
        unknown = sorted(set(options) - set(kind.options) - set(COMMON_KEYS))
        if unknown:
            raise ConfigError(
                f"data: {', '.join(unknown)}: not read by data kind {name} (task "
                f"{task or TASK_OF_TARGET[target]}); it reads {list(kind.options) or 'nothing'} "
                f"({kind.layout})"
            )
    kind.check(options)
    return kind, options


def read_data(target: str, spec: Any, *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
    """`resolve` then `read`: the splits of the data `spec` names for `target`."""
    kind, options = resolve(target, spec)
    return kind.read(options, tokenizer=tokenizer, seed=seed)


def file_digest(
    paths: Iterable[Path], root: Path | None = None, extra: Mapping[str, Any] | None = None
) -> str:
    """sha256 over `extra` (JSON, sorted keys) and, for each path in sorted order, its path
    relative to `root` (default: the files' common folder), its size and its bytes: any
    edited, added, removed, renamed or moved file changes it; moving the whole folder does not."""
    digest = hashlib.sha256(json.dumps(dict(extra or {}), sort_keys=True, default=str).encode())
    paths = sorted(Path(p).resolve() for p in paths)
    if root is None and paths:
        root = Path(os.path.commonpath([p.parent for p in paths]))
    for path in paths:
        shown = path.relative_to(root).as_posix() if root is not None else path.name
        data = path.read_bytes()
        digest.update(f"{shown}:{len(data)};".encode())
        digest.update(data)
    return digest.hexdigest()


def need(spec: Mapping[str, Any], key: str, kind: str, what: str) -> Any:
    """`spec[key]`, or ConfigError naming the kind, the key and what it should hold."""
    value = spec.get(key)
    if value is None:
        raise ConfigError(f"data.{key}: data kind {kind} needs {key}: {what}")
    return value


def existing_dir(value: Any, key: str, kind: str, what: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise DataError(f"data.{key}: {path}: no such folder; data kind {kind} reads {what}")
    return path


def existing_file(value: Any, key: str, kind: str, what: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise DataError(f"data.{key}: {path}: no such file; data kind {kind} reads {what}")
    return path


class FileKind:
    """A kind that reads files: `fingerprint` digests `files(spec)` with the options that
    decide what is read. Subclasses set `name`, `target`, `layout`, `options` and define
    `check`, `files` and `read`."""

    name: str
    target: str
    layout: str
    options: tuple[str, ...] = ()
    fingerprinted: tuple[str, ...] = ()  # options (besides the files) that change what is read

    def __repr__(self) -> str:
        return f"<data kind {self.name} ({self.target}): {self.layout}>"

    def check(self, spec: Mapping[str, Any]) -> None:
        self.files(spec)

    def files(self, spec: Mapping[str, Any]) -> list[Path]:
        raise NotImplementedError

    def fingerprint(self, spec: Mapping[str, Any]) -> str:
        extra = {"kind": self.name, "target": self.target}
        extra.update({key: spec.get(key) for key in self.fingerprinted})
        return file_digest(self.files(spec), None, extra)

    def read(self, spec: Mapping[str, Any], *, tokenizer: Any = None, seed: int = 0) -> DataSplits:
        raise NotImplementedError
