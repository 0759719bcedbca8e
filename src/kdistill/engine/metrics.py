"""Evaluation metrics as small objects: `update()` per batch, `compute()` at the end.

Counts are kept as tensors so a distributed run can sum them across ranks before `compute()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.data.arrays import move_to
from kdistill.data.batches import as_batch, call_model, shard_count
from kdistill.distill.distiller import select_output
from kdistill.engine.distributed import all_reduce_sum, info
from kdistill.errors import ConfigError, DataError


class Accuracy:
    """Top-1 accuracy and mean cross-entropy over everything seen since `reset()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(3, dtype=torch.float64)  # correct, total, summed loss

    def update(self, logits: Tensor, target: Tensor) -> None:
        logits = logits.detach().float()
        correct = (logits.argmax(dim=1) == target).sum()
        loss = F.cross_entropy(logits, target, reduction="sum")
        self.counts += torch.stack(
            [correct.double(), torch.tensor(float(len(target))), loss.double().cpu()]
        )

    def reduce(self) -> None:
        """Sum the counts over all ranks (a no-op in a single process); call before compute()."""
        self.counts = all_reduce_sum(self.counts)

    def compute(self) -> dict[str, float]:
        correct, total, loss = self.counts.tolist()
        if total == 0:
            raise ValueError("accuracy of an empty evaluation set")
        return {"accuracy": correct / total, "loss": loss / total}


def _check_unsharded(loader, world) -> None:
    """Evaluation splits an unsharded loader by batch; a loader already sharded by rank (a
    ``DistributedSampler``, which also pads with repeated samples) would count wrongly."""
    if world.world_size > 1 and shard_count(loader) > 1:
        raise ConfigError(
            f"evaluation loaders must not be sharded by rank ({type(loader).__name__} splits "
            "each epoch over ranks): each rank already evaluates every W-th batch of the whole "
            "loader, and a DistributedSampler pads with repeated samples; pass a plain loader"
        )


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader,
    device: str | torch.device = "cpu",
    output: str | int | None = None,
) -> dict[str, float]:
    """Accuracy and loss of `model` (restored to its previous mode) over `loader`.

    `loader` yields anything `kdistill.data.batches.as_batch` reads (kdistill batches, torch
    ``DataLoader`` tuples, dicts with ``"labels"``); its batches must carry labels. `output`
    picks the logits from a model with several outputs (a key, e.g. ``"logits"`` of a Hugging
    Face ``ModelOutput``, or a tuple position), as `Term(output=...)` does.
    Under torchrun each rank evaluates every W-th batch (rank r the batches r, r+W, …) and the
    counts are summed over ranks, so every rank returns the figures of the whole loader.
    """
    world = info()
    _check_unsharded(loader, world)
    was_training = model.training
    model.eval()
    metric = Accuracy()
    try:
        for number, item in enumerate(loader):
            if number % world.world_size != world.rank:
                continue
            batch = as_batch(item)
            if batch.target is None:
                raise DataError(
                    "evaluate_classifier needs labels, but the loader's batches carry none; "
                    "yield (inputs, target) tuples or dicts with a 'labels' key"
                )
            logits = select_output(
                call_model(model, move_to(batch.inputs, device)), output, "model"
            )
            metric.update(logits, batch.target.to(device))
    finally:
        model.train(was_training)
    metric.reduce()
    return metric.compute()


@torch.no_grad()
def predict(model: nn.Module, loader, device: str | torch.device = "cpu") -> Tensor | dict:
    """The model's outputs over an unshuffled loader, stacked in dataset order (eval mode);
    a model with dict outputs (multi-task) gives a dict of stacked tensors."""
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for item in loader:
            output = call_model(model, move_to(as_batch(item).inputs, device))
            if isinstance(output, dict):
                outputs.append({key: value.float().cpu() for key, value in output.items()})
            else:
                outputs.append(output.float().cpu())
    finally:
        model.train(was_training)
    if outputs and isinstance(outputs[0], dict):
        return {key: torch.cat([output[key] for output in outputs]) for key in outputs[0]}
    return torch.cat(outputs)
