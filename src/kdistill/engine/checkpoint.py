"""Checkpoints: tensors in safetensors, everything else in JSON, both written atomically.

A checkpoint `<dir>/<name>` is two files: `<name>.safetensors` (weights, optimiser moments, RNG
state) and `<name>.json` (epoch, step, config, optimiser hyperparameters, and the SHA-256 of the
tensor file). Each is written to a temporary file, flushed to disk and renamed into place; the JSON
is renamed last, so a checkpoint whose JSON exists is complete. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdistill.errors import CheckpointError

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_tensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(contiguous, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: Path, name: str, tensors: Mapping[str, Tensor], state: dict) -> Path:
    """Write `<name>.safetensors` then `<name>.json` (with the tensor file's checksum)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path = directory / f"{name}.safetensors"
    _save_tensors(tensor_path, tensors)
    meta = {"format": FORMAT_VERSION, "sha256": sha256_file(tensor_path), "state": state}
    atomic_write_text(directory / f"{name}.json", json.dumps(meta, indent=1, sort_keys=True))
    return tensor_path


def load_checkpoint(directory: Path, name: str) -> tuple[dict[str, Tensor], dict]:
    """Read and verify a checkpoint; any defect raises CheckpointError saying which file and why."""
    directory = Path(directory)
    json_path = directory / f"{name}.json"
    tensor_path = directory / f"{name}.safetensors"
    if not json_path.exists():
        raise CheckpointError(f"{json_path}: no such checkpoint (its JSON file is missing)")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{json_path}: corrupt checkpoint metadata ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: unsupported checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}"
            f" (this kdistill reads format {FORMAT_VERSION})"
        )
    if not tensor_path.exists():
        raise CheckpointError(f"{tensor_path}: missing (its metadata {json_path.name} exists)")
    actual = sha256_file(tensor_path)
    if actual != meta.get("sha256"):
        raise CheckpointError(
            f"{tensor_path}: checksum mismatch (expected {meta.get('sha256')}, found {actual}); "
            "the file is corrupt or was changed after it was written"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{tensor_path}: unreadable safetensors file ({error})") from None
    return tensors, meta["state"]


def with_prefix(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def strip_prefix(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


def load_weights(model: nn.Module, state: Mapping[str, Tensor], label: str, source: str) -> None:
    """`load_state_dict(strict=True)` with a message naming the model, the file and the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if state[key].shape != own[key].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            problems.append("shape mismatches: " + "; ".join(wrong_shape[:5]))
        raise CheckpointError(
            f"{source}: does not fit the {label} ({type(model).__name__}): " + ", ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and the JSON-able rest."""
    full = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for param_id, slots in full["state"].items():
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param_id}.{slot}"] = value
            else:
                plain_state.setdefault(str(param_id), {})[slot] = value
    return tensors, {"param_groups": full["param_groups"], "plain_state": plain_state}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, slot = key.split(".", 2)
            state.setdefault(int(param_id), {})[slot] = value
    for param_id, slots in meta.get("plain_state", {}).items():
        state.setdefault(int(param_id), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
