"""The run store: what a run writes into its folder, for `report`, `compress`, `check` and
`cache` to read. The front ends write models through here, not through engine internals."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdistill.engine.checkpoint import checkpoint_path, save_checkpoint, save_whole_model

__all__ = ["MODELS", "save_model"]

MODELS = "models"  # <run>/models: the weights of every model a run keeps


def save_model(
    run_dir: str | Path, name: str, model: nn.Module, state: dict, whole: bool = False
) -> Path:
    """Write `model` into the run folder `run_dir`: its weights as
    ``<run>/models/<name>.safetensors`` with `state` (JSON) beside them, atomically; with `whole`
    also the pickled model ``<name>.pt``, for an architecture `create_model` cannot rebuild (a
    pruned one; load it with ``load_whole_model(path, trust=True)``). Returns the weights' path.
    Raises CheckpointError when a file cannot be written."""
    models = Path(run_dir) / MODELS
    save_checkpoint(models, name, model.state_dict(), state)
    if whole:
        save_whole_model(model, models / f"{name}.pt")
    return checkpoint_path(models, name)
