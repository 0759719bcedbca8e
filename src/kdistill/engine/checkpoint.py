"""Checkpoints: one safetensors file holding the tensors and, in its metadata, the JSON state.

A checkpoint `<dir>/<name>.safetensors` carries weights, optimiser moments and RNG state as
tensors, and in its header metadata the JSON state (epoch, step, config, …) and a SHA-256 digest
of the tensors. One file means one atomic rename: it is written to a temporary file, flushed to
disk and renamed into place, so a crash leaves either the old or the new checkpoint, never a mix.
With `keep_previous`, the checkpoint being replaced is kept as `<name>.prev.safetensors`, so a
corrupted latest checkpoint still leaves the previous good one usable. Nothing is ever unpickled.

Loading weights from elsewhere (`load_state_dict_file`: a teacher's state dict or safetensors
file) is safe too. The one exception is a whole model saved with `torch.save(model)`
(`save_whole_model`, for a student whose architecture changed, e.g. channel-pruned, so that a
state dict alone cannot rebuild it): reading it back means unpickling, which runs code from the
file, so `load_whole_model` and `load_state_dict_file` do it only when the caller passes
`trust=True` (the user's `--trust-checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kdistill.errors import CheckpointError

FORMAT_VERSION = 2
META_KEY = "kdistill"


def _create_temp_beside(path: Path) -> tuple[int, str]:
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
    fd, tmp = _create_temp_beside(path)
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


def checkpoint_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.safetensors"


def previous_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.prev.safetensors"


def save_checkpoint(
    directory: Path,
    name: str,
    tensors: Mapping[str, Tensor],
    state: dict,
    keep_previous: bool = False,
) -> Path:
    """Atomically write `<directory>/<name>.safetensors` with `state` in its metadata."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, name)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT_VERSION, "sha256": tensors_digest(contiguous), "state": state}
    fd, tmp = _create_temp_beside(path)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what a plain open() gives: 0o666 & ~umask
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        os.chmod(tmp, mode)  # safetensors writes its files owner-only (0o600)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(directory, name))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(directory: Path, name: str) -> tuple[dict[str, Tensor], dict]:
    """Read and verify a checkpoint; any defect raises CheckpointError saying which file and why."""
    return read_checkpoint_file(checkpoint_path(directory, name))


def read_checkpoint_file(path: Path) -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
    if META_KEY not in header:
        raise CheckpointError(
            f"{path}: a safetensors file without kdistill metadata (not written by kdistill's "
            "save_checkpoint); load plain weights with safetensors.torch.load_file"
        )
    try:
        meta = json.loads(header[META_KEY])
        version, expected, state = meta["format"], meta["sha256"], meta["state"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({error!r})") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format {version!r} (this kdistill reads format "
            f"{FORMAT_VERSION})"
        )
    actual = tensors_digest(tensors)
    if actual != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch (expected {expected}, found {actual}); "
            "the file is corrupt or was changed after it was written"
        )
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (state is not a mapping)")
    return tensors, state


def load_latest_checkpoint(directory: Path, name: str) -> tuple[dict[str, Tensor], dict, Path]:
    """The latest checkpoint, or the previous one when the latest is missing or corrupt.

    Raises CheckpointError naming both files when neither is usable.
    """
    latest, previous = checkpoint_path(directory, name), previous_path(directory, name)
    try:
        tensors, state = read_checkpoint_file(latest)
        return tensors, state, latest
    except CheckpointError as latest_error:
        if not previous.exists():
            raise
        try:
            tensors, state = read_checkpoint_file(previous)
        except CheckpointError as previous_error:
            raise CheckpointError(
                f"{latest_error}; and the previous one: {previous_error}"
            ) from None
        return tensors, state, previous


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
            problems.append(
                f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
            )
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


def load_state_dict_file(path: str | Path, trust: bool = False) -> dict[str, Tensor]:
    """Weights from a file, loaded safely: a kdistill checkpoint (verified), a plain safetensors
    file, or a PyTorch state dict (`.pt`/`.pth`) read with `torch.load(weights_only=True)`.

    A file that needs full unpickling (e.g. a whole model saved with `torch.save(model)`) is
    refused, because unpickling can run arbitrary code — unless `trust` is set (the user's
    `--trust-checkpoint`): it is then read with `torch.load(weights_only=False)` and a module
    gives its `state_dict()`.
    A kdistill checkpoint may prefix its keys (`student.`); pass the stripped dict to the model.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                is_kdistill = META_KEY in (handle.metadata() or {})
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
        if is_kdistill:
            return read_checkpoint_file(path)[0]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
    if trust:
        return _load_trusted_pickle(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: this file holds pickled Python objects, not just tensors "
            "(torch.load(weights_only=True) rejects it; e.g. a whole model saved with "
            "torch.save(model)). Unpickling can run arbitrary code, so kdistill does not do it by "
            "default. If you trust where the file comes from, pass --trust-checkpoint (recipe: "
            "teacher.trust_checkpoint: true); better, re-save it as model.state_dict() or "
            "safetensors"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(
            f"{path}: cannot be loaded as a state dict with weights_only=True ({error}). "
            "kdistill never unpickles arbitrary objects; save model.state_dict() or safetensors"
        ) from None
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors, got {type(loaded).__name__}"
        )
    return dict(loaded)


def _load_trusted_pickle(path: Path) -> dict[str, Tensor]:
    """`torch.load(weights_only=False)` (the user vouched for the file): a module (e.g. a whole
    model from `save_whole_model`) gives its `state_dict()`; a mapping of tensors, possibly under
    a "state_dict" / "model" key, is returned as it is."""
    loaded = _torch_load_unsafe(path)
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    elif isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            inner = loaded.get(key)
            if isinstance(inner, nn.Module):
                loaded = inner.state_dict()
                break
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if isinstance(loaded, Mapping) and all(isinstance(v, Tensor) for v in loaded.values()):
        return dict(loaded)
    raise CheckpointError(
        f"{path}: expected a model or a state dict of tensors, got {type(loaded).__name__}"
        + (" holding non-tensor values" if isinstance(loaded, Mapping) else "")
    )


def _torch_load_unsafe(path: Path) -> Any:
    """`torch.load(weights_only=False)`: only for files the caller said it trusts."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: the pickled model refers to code that cannot be imported here ({error}); "
            "a whole-model file stores only the names of its classes, so the code that defines "
            "them must be importable (same package and version) to load it"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(
            f"{path}: unreadable or corrupted file, cannot be loaded even with "
            f"weights_only=False ({type(error).__name__}: {error})"
        ) from None


# -- whole models (architecture + weights, pickled) ----------------------------------------------
def save_whole_model(model: nn.Module, path: str | Path) -> Path:
    """Write `torch.save(model)` to `path` atomically (temporary file, fsync, rename).

    For a model whose architecture differs from what its constructor builds (e.g. a
    channel-pruned student), which a state dict alone cannot rebuild. Reading it back means
    unpickling: `load_whole_model(path, trust=True)`. Prefer `model.state_dict()` (safetensors)
    whenever the architecture can be rebuilt from code.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_whole_model expects an nn.Module, got {type(model).__name__}")
    path = Path(path)
    try:
        atomic_write(path, lambda handle: torch.save(model, handle))
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: cannot pickle {type(model).__name__} as a whole model ({error}); "
            "remove hooks, lambdas or parametrizations (e.g. make pruning masks permanent) "
            "first, or save model.state_dict() instead"
        ) from None
    return path


def load_whole_model(path: str | Path, trust: bool = False) -> nn.Module:
    """A model written by `save_whole_model` / `torch.save(model)`, on the CPU.

    Unpickling runs code from the file, so without `trust` (the user's `--trust-checkpoint`)
    this refuses with a CheckpointError saying so; the file is only inspected with the safe
    `torch.load(weights_only=True)`, which tells a whole model from a state dict or a
    corrupted file. With `trust` it is read with `torch.load(weights_only=False)` and must hold
    an nn.Module. Every failure is a CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: a safetensors file holds only tensors, not a model's architecture; build "
            "the model and load the weights with load_state_dict_file"
        )
    if not trust:
        _refuse_untrusted_whole_model(path)
    loaded = _torch_load_unsafe(path)
    if not isinstance(loaded, nn.Module):
        raise CheckpointError(
            f"{path}: expected a whole model (an nn.Module saved with torch.save(model)), got "
            f"{type(loaded).__name__}"
            + (
                "; for a state dict, build the model and use load_state_dict_file"
                if isinstance(loaded, Mapping)
                else ""
            )
        )
    return loaded


def _refuse_untrusted_whole_model(path: Path) -> None:
    """Raise the CheckpointError that fits `path` when the caller has not trusted it."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: this file is a pickled whole model (torch.save(model)), and "
            "unpickling it runs code from the file, which can do anything. kdistill loads it "
            "only when told to: pass --trust-checkpoint (Python: trust=True) only for files you "
            "trust (ones you saved yourself or from a source you trust)"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(
            f"{path}: unreadable or corrupted model file ({type(error).__name__}: {error})"
        ) from None
    if isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path}: holds a state dict, not a whole model; build the model and load the "
            "weights with load_state_dict_file (no --trust-checkpoint needed)"
        )
    raise CheckpointError(
        f"{path}: holds a {type(loaded).__name__}, not a whole model (torch.save(model))"
    )
