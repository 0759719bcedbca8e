"""kdistill inside PyTorch Lightning: `DistillationModule`, a `LightningModule` around a
`kd.Distiller`.

    module = DistillationModule(
        kd.Distiller(teacher, student, [kd.Term(L.KD(4.0), 0.9), kd.Term(L.CE(), 0.1)]),
        lr=1e-3, example_inputs=images[:2],   # example_inputs: terms with connectors
    )
    lightning.Trainer(max_epochs=10).fit(module, train_loader, val_loader)

- `training_step` returns the Distiller's loss and logs ``train/loss`` and each term's
  weighted value ``train/<term>`` (per step and per epoch); `validation_step` logs
  ``val/loss`` and each ``val/<term>``.
- The module's parameters, state dict and checkpoints are the student's, the connectors' and
  the loss-owned parameters' (``student.*``, ``connectors.*``, ``losses.*``, as `kd.fit`'s
  trained state) — never the teacher's. The teacher is held outside the module's children: it
  follows the module's device on each fit / validate / test start, and the Distiller keeps it
  in eval mode, without gradients, under ``torch.inference_mode``.
- `configure_optimizers` builds `optimizer` (default ``torch.optim.Adam``) over
  `Distiller.trainable_parameters()`: the student and connectors only. Connectors are sized
  on `example_inputs` when the module is made, before any optimiser exists.

A term that averages over counted tokens (`kdistill.losses.token`) is normalised per batch here:
Lightning's gradient accumulation and DDP average per-batch losses, which for token losses is
not the whole batch's per-token mean; with ``accumulate_grad_batches > 1`` or several devices
such terms are refused at fit start (use `kd.fit` or the Hugging Face `DistillationTrainer`,
which count tokens over the window).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import kdistill as kd
from kdistill.data.batches import as_batch
from kdistill.errors import ConfigError

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised by a test with the module hidden
    raise ImportError(
        "kdistill.integrations.lightning needs PyTorch Lightning: pip install 'kdistill[lightning]'"
    ) from error

__all__ = ["DistillationModule"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class DistillationModule(pl.LightningModule):
    """A LightningModule that trains `distiller`'s student (and connectors) with its loss.

    `optimizer`: a function of the parameters returning an optimiser (default Adam with `lr`).
    `example_inputs`: one batch of inputs, needed when a term creates connectors or loss-owned
    parameters (they must exist before `configure_optimizers`).
    """

    def __init__(
        self,
        distiller: kd.Distiller,
        *,
        lr: float = 1e-3,
        optimizer: OptimizerFactory | None = None,
        example_inputs: Any = None,
    ):
        super().__init__()
        if not isinstance(distiller, kd.Distiller):
            raise ConfigError(
                f"DistillationModule takes a kd.Distiller, got {type(distiller).__name__}; "
                "make one with kd.Distiller(teacher, student, terms=[...])"
            )
        sized = [
            name
            for name, term in zip(distiller.term_names, distiller.terms)
            if getattr(term.loss, "uses_connector", False) or hasattr(term.loss, "build")
        ]
        if example_inputs is not None:
            distiller.build(example_inputs, optimiser_follows=True)
        elif sized:
            raise ConfigError(
                f"terms {sized} may create connectors or loss parameters from the data's shapes; "
                "pass example_inputs=<one batch of inputs> so that they exist before "
                "configure_optimizers"
            )
        object.__setattr__(self, "_distiller", distiller)  # not a child: keeps the teacher out
        self.student = distiller.student
        self.connectors = distiller.connectors
        self.losses = distiller.losses
        self.lr = lr
        self.optimizer_factory = optimizer

    @property
    def distiller(self) -> kd.Distiller:
        return self._distiller

    @property
    def teacher(self) -> nn.Module | None:
        return self._distiller.teacher

    def forward(self, inputs: Any) -> Any:
        """The student's output (the model being trained)."""
        return self.student(**inputs) if isinstance(inputs, dict) else self.student(inputs)

    # -- the teacher follows the module, outside it -----------------------------------------
    def _place_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_fit_start(self) -> None:
        self._place_teacher()
        trainer = self.trainer
        counted = [
            name
            for name, term in zip(self.distiller.term_names, self.distiller.terms)
            if getattr(term.loss, "counts_tokens", False)
        ]
        if counted and (trainer.accumulate_grad_batches > 1 or trainer.world_size > 1):
            raise ConfigError(
                f"terms {counted} average over counted tokens, which Lightning's gradient "
                f"accumulation ({trainer.accumulate_grad_batches}) and DDP (world size "
                f"{trainer.world_size}) would average per batch instead of over the whole batch; "
                "train them with kd.fit or kdistill.integrations.transformers.DistillationTrainer"
            )

    def on_validation_start(self) -> None:
        self._place_teacher()

    def on_test_start(self) -> None:
        self._place_teacher()

    # -- steps ------------------------------------------------------------------------------
    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        item = as_batch(batch)
        out = self.distiller(item.inputs, target=item.target, index=item.index)
        size = _batch_size(item.inputs)
        on_step = stage == "train"
        self.log(f"{stage}/loss", out.loss.detach(), on_step=on_step, on_epoch=True,
                 batch_size=size, prog_bar=True)  # fmt: skip
        self.log_dict({f"{stage}/{name}": value for name, value in out.parts.items()},
                      on_step=on_step, on_epoch=True, batch_size=size)  # fmt: skip
        return out.loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batches = self.trainer.num_training_batches
        if batches and math.isfinite(batches):
            fraction = batch_idx / batches
            self.distiller.set_progress(self.current_epoch + fraction)  # warm-up ramps
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = self.distiller.trainable_parameters()  # student + connectors + loss heads
        if self.optimizer_factory is not None:
            return self.optimizer_factory(parameters)
        return torch.optim.Adam(parameters, lr=self.lr)


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    return int(inputs.shape[0])
