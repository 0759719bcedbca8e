"""Which kind a path is (`kdistill init --data <path>`): the data spec of the registered kind
whose layout the path has, for a target; a ConfigError naming the layouts the target's kinds
read when none fits.

| target | a path holding … | spec |
|---|---|---|
| any | ``package.module:function`` | ``factory`` |
| any | a built-in name (``digits``, ``kjv``, …) | that kind |
| class | ``train/<class>/*`` | ``imagefolder`` |
| class, mask | ``train.npz`` + ``test.npz``, or ``…train….npz`` beside ``…test….npz`` | ``npz`` |
| mask | ``train/images`` + ``train/masks`` | ``masks`` |
| boxes, mask+boxes | ``train/annotations.json`` | ``coco`` |
| boxes, mask+boxes | ``train/labels`` | ``yolo`` |
| tokens | ``train.txt`` | ``text`` (root) |
| tokens | one ``.txt`` file | ``text`` (file, ``fractions: {val: 0.05, test: 0.05}``) |
| tokens, completions | ``train.jsonl`` | ``jsonl`` |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdistill.data.kinds.base import TASK_OF_TARGET, kinds_for, resolve
from kdistill.errors import ConfigError

__all__ = ["DEFAULT_FRACTIONS", "guess_spec"]

DEFAULT_FRACTIONS = {"val": 0.05, "test": 0.05}


def _npz_pair(path: Path) -> dict[str, Any] | None:
    if path.is_dir() and (path / "train.npz").is_file() and (path / "test.npz").is_file():
        return {"kind": "npz", "train": str(path / "train.npz"), "test": str(path / "test.npz")}
    if path.is_file() and path.suffix == ".npz" and "train" in path.name:
        test = path.with_name(path.name.replace("train", "test"))
        if test.is_file():
            return {"kind": "npz", "train": str(path), "test": str(test)}
    return None


def _candidates(target: str, path: Path) -> list[dict[str, Any]]:
    root = {"root": str(path)}
    train = path / "train"
    found: list[dict[str, Any]] = []
    if target in ("class", "mask") and _npz_pair(path):
        found.append(_npz_pair(path))  # type: ignore[arg-type]
    if target == "class" and train.is_dir() and not (train / "images").is_dir():
        found.append({"kind": "imagefolder", **root})
    if target == "mask" and (train / "images").is_dir() and (train / "masks").is_dir():
        found.append({"kind": "masks", **root})
    if target in ("boxes", "mask+boxes"):
        if (train / "annotations.json").is_file():
            found.append({"kind": "coco", **root})
        if (train / "labels").is_dir():
            found.append({"kind": "yolo", **root})
    if target == "tokens":
        if (path / "train.txt").is_file():
            found.append({"kind": "text", **root})
        elif path.is_file() and path.suffix == ".txt":
            found.append({"kind": "text", "file": str(path), "fractions": dict(DEFAULT_FRACTIONS)})
    if target in ("tokens", "completions") and (path / "train.jsonl").is_file():
        found.append({"kind": "jsonl", **root})
    return found


def guess_spec(target: str, data: str) -> dict[str, Any]:
    """The data spec of the kind `data` (a path, a built-in name or an import path) is, for
    `target`, checked (`resolve`); ConfigError naming what the target's kinds read otherwise."""
    kinds = kinds_for(target)
    if ":" in data and not Path(data).exists():
        spec: dict[str, Any] = {"kind": "factory", "factory": data}
    elif data in kinds and not Path(data).exists():
        spec = {"kind": data}
    else:
        path = Path(data).expanduser()
        found = _candidates(target, path) if path.exists() else []
        if not found:
            menu = "; ".join(f"{name}: {kind.layout}" for name, kind in kinds.items())
            where = "does not exist" if not path.exists() else "has none of their layouts"
            raise ConfigError(f"--data {data}: {where}; task {TASK_OF_TARGET[target]} reads {menu}")
        spec = found[0]
    resolve(target, spec)
    return spec
