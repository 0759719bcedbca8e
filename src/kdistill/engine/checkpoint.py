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

import json
import os
import pickle
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kdistill.errors import CheckpointError
from kdistill.io import (  # noqa: F401  (re-exported: the engine's file writers)
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    create_temp_beside,
    tensors_digest,
)

FORMAT_VERSION = 2
META_KEY = "kdistill"


def checkpoint_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.safetensors"


def previous_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.prev.safetensors"


def _store_shared_once(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors to write, aliases): a tensor that is the same view of the same memory as an
    earlier one (tied weights: a language model's embedding and output head) is written once and
    recorded as ``{alias: stored name}``; a partial overlap (another view of shared memory) is
    written as its own copy. safetensors refuses shared memory otherwise."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if tensor.numel() == 0:
            stored[name] = tensor.contiguous()
            continue
        storage = tensor.untyped_storage().data_ptr()
        view = (
            storage,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        shared = storage in storages
        storages.add(storage)
        stored[name] = tensor.clone() if shared else tensor.contiguous()
    return stored, aliases


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
    contiguous, aliases = _store_shared_once(tensors)
    meta = {"format": FORMAT_VERSION, "sha256": tensors_digest(contiguous), "state": state}
    if aliases:
        meta["aliases"] = aliases
    fd, tmp = create_temp_beside(path)
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
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(stored, str) and stored in tensors for stored in aliases.values()
    ):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (aliases {aliases!r})")
    for alias, stored in aliases.items():  # tied weights, written once
        tensors[alias] = tensors[stored]
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


def load_weights(
    model: nn.Module, state: Mapping[str, Tensor], label: str, source: str, field: str = ""
) -> None:
    """`load_state_dict(strict=True)` with a message naming the model, the file and the keys.

    When every name in `state` carries one extra prefix (`module.` from DataParallel / DDP,
    `_orig_mod.` from torch.compile, …) the message says to set `<field>strip_prefix`."""
    own = model.state_dict()
    tied = tied_names(model)
    state = {**state}
    for key in sorted(set(own) - set(state)):  # a tied head saved once (Hugging Face omits it)
        given = [name for name in tied.get(key, ()) if name in state]
        if given:
            state[key] = state[given[0]]
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
        prefix = _extra_prefix(state, own)
        hint = (
            f"; every name in the file starts with {prefix!r}: set {field}strip_prefix: {prefix!r}"
            if prefix
            else ""
        )
        raise CheckpointError(
            f"{source}: does not fit the {label} ({type(model).__name__}): "
            + ", ".join(problems)
            + hint
        )
    model.load_state_dict(state, strict=True)


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each weight name of `model` → the other names of the same tensor (tied weights, e.g. a
    language model's `lm_head.weight` and its token embedding): a file that stores one of them
    (as `save_pretrained` / safetensors do) fills the others."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return {
        name: [other for other in names if other != name]
        for names in by_tensor.values()
        if len(names) > 1
        for name in names
    }


def _extra_prefix(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str | None:
    """The dotted prefix whose removal turns the names of `state` into those of `own`."""
    if not state:
        return None
    parts = next(iter(state)).split(".")
    for count in range(1, len(parts)):
        prefix = ".".join(parts[:count]) + "."
        if all(key.startswith(prefix) for key in state) and {
            key[len(prefix) :] for key in state
        } == set(own):
            return prefix
    return None


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


def load_state_dict_file(
    path: str | Path,
    trust: bool = False,
    *,
    key: str | None = None,
    strip_prefix: str | None = None,
    field: str = "",
) -> dict[str, Tensor]:
    """Weights from a file, loaded safely: a kdistill checkpoint (verified), a plain safetensors
    file, or a PyTorch state dict (`.pt`/`.pth`) read with `torch.load(weights_only=True)`.

    `key`: the state dict sits inside a dict under this key (`{"model": state_dict,
    "optimizer": …, "epoch": 3}` → `key="model"`). `strip_prefix`: remove this prefix from every
    weight name (`"module."` for DataParallel / DDP); every name must carry it. `field` prefixes
    the option names in messages (`"teacher."` → "set teacher.checkpoint_key: model").

    A file that needs full unpickling (e.g. a whole model saved with `torch.save(model)`) is
    refused, because unpickling can run arbitrary code — unless `trust` is set (the user's
    `--trust-checkpoint`): it is then read with `torch.load(weights_only=False)` and a module
    gives its `state_dict()` (without `key`, a dict's "state_dict" or "model" entry is used).
    A kdistill checkpoint may prefix its keys (`student.`); pass `strip_prefix="student."`.
    Every failure is a CheckpointError naming the file, what it holds and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        if key is not None:
            raise CheckpointError(
                f"{path}: a safetensors file is one flat map of tensors, with no dict to pick "
                f"{key!r} from; remove {field}checkpoint_key (to drop a name prefix such as "
                f"'{key}.', set {field}strip_prefix: '{key}.')"
            )
        tensors = _read_safetensors_weights(path)
    elif trust:
        tensors = _state_dict_in(_load_trusted_pickle(path), path, key, field, trusted=True)
    else:
        tensors = _state_dict_in(_load_weights_only(path), path, key, field, trusted=False)
    if strip_prefix:
        tensors = _remove_prefix(tensors, strip_prefix, path, field)
    return tensors


def _read_safetensors_weights(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            is_kdistill = META_KEY in (handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
    if is_kdistill:
        return read_checkpoint_file(path)[0]
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None


def _load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, Tensor) for v in value.values())


def _state_dict_in(
    loaded: Any, path: Path, key: str | None, field: str, trusted: bool
) -> dict[str, Tensor]:
    """The state dict a loaded object holds (under `key` when given), or a CheckpointError
    that names what the file holds and the option that picks the weights out."""
    if key is not None:
        if not isinstance(loaded, Mapping):
            raise CheckpointError(
                f"{path}: {field}checkpoint_key is {key!r}, but the file holds a "
                f"{type(loaded).__name__}, not a dict; remove {field}checkpoint_key"
            )
        if key not in loaded:
            raise CheckpointError(
                f"{path}: no key {key!r}; the file holds a dict with keys "
                f"{_shown_keys(loaded)}" + _key_hint(loaded, field)
            )
        loaded = loaded[key]
    if isinstance(loaded, nn.Module) and trusted:
        loaded = loaded.state_dict()
    if trusted and key is None and isinstance(loaded, Mapping) and not _is_state_dict(loaded):
        for name in ("state_dict", "model"):  # the usual places, for files the user vouched for
            inner = loaded.get(name)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if _is_state_dict(inner):
                loaded = inner
                break
    where = f" under {key!r}" if key is not None else ""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors{where}, got {type(loaded).__name__}"
        )
    if _is_state_dict(loaded):
        return dict(loaded)
    tensors = [name for name, value in loaded.items() if isinstance(value, Tensor)]
    others = [name for name, value in loaded.items() if not isinstance(value, Tensor)]
    if not tensors:
        raise CheckpointError(
            f"{path}: the file holds a dict{where} with keys {_shown_keys(loaded)} and no tensors "
            "at the top level" + _key_hint(loaded, field, nested=key)
        )
    raise CheckpointError(
        f"{path}: the state dict{where} mixes tensors with other values (under "
        f"{_shown_keys(others)}); a state dict maps weight names to tensors only"
    )


def _shown_keys(keys: Any) -> str:
    names = sorted(str(name) for name in keys)
    return str(names[:10])[:-1] + (", …]" if len(names) > 10 else "]")


def _key_hint(loaded: Mapping, field: str, nested: str | None = None) -> str:
    """ "; set teacher.checkpoint_key: model" naming the entries that hold a state dict."""
    holders = [
        str(name)
        for name, value in loaded.items()
        if _is_state_dict(value) and value or isinstance(value, nn.Module)
    ]
    if not holders:
        return "; none of its entries is a state dict of tensors"
    if nested is not None:
        return f"; the weights are one level deeper, under {holders}"
    return f"; set {field}checkpoint_key: {holders[0]}" + (
        f" (entries holding tensors: {holders})" if len(holders) > 1 else ""
    )


def _remove_prefix(
    tensors: dict[str, Tensor], prefix: str, path: Path, field: str
) -> dict[str, Tensor]:
    lacking = [name for name in tensors if not name.startswith(prefix)]
    if lacking:
        raise CheckpointError(
            f"{path}: {field}strip_prefix is {prefix!r}, but {len(lacking)} of {len(tensors)} "
            f"weight names do not start with it (e.g. {lacking[:3]}); fix or remove "
            f"{field}strip_prefix"
        )
    return {name[len(prefix) :]: value for name, value in tensors.items()}


def _load_trusted_pickle(path: Path) -> Any:
    """`torch.load(weights_only=False)` (the user vouched for the file)."""
    return _torch_load_unsafe(path)


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
