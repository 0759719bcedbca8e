"""kdistill inside Hugging Face's `Trainer`: `DistillationTrainer`.

A `transformers.Trainer` subclass whose one override of substance is `compute_loss`, which runs a
`kd.Distiller` (frozen teacher + the Trainer's model as the student + kdistill terms). Everything
else — checkpoints, evaluation, logging callbacks, mixed precision, ``accelerate launch`` /
``torchrun`` — is the Trainer's own:

    trainer = DistillationTrainer(
        model=student, teacher=teacher,
        terms=[kd.Term(L.ForwardKL(), 0.5), kd.Term(L.TokenCE(), 0.5)],
        args=TrainingArguments("out", gradient_accumulation_steps=4), train_dataset=data,
    )
    trainer.train()

- **The teacher** is not the Trainer's model: it is never saved in checkpoints, never handed to
  the optimiser, never wrapped by DDP; it is moved to the Trainer's device and the Distiller
  puts it (and every submodule) in eval mode and runs it under ``torch.inference_mode`` on every
  forward. Instead of a live teacher, `teacher_outputs` may be stored outputs (a kdistill
  `TeacherCache`, a `TokenTeacherCache` of top-k token distributions, `MemoryTeacherOutputs`):
  the batches must then carry each sample's dataset position under ``"index"``, which the source
  checks against the batch's inputs. They serve training only: evaluation runs the live teacher,
  when one is given as well (else it is refused).
- **Normalisation** is that of one big batch, as in `kd.fit`: before an optimiser step's
  micro-batches run (the Trainer's `get_batch_samples`), each token-counting term's counted
  positions are summed over the window's micro-batches and over all processes
  (`Distiller.count_tokens`); each micro-batch's term is divided by that global count ÷ the
  number of processes (DDP averages the processes' gradients), so the summed gradients are those
  of the whole window as one batch whatever the padding of each micro-batch. Other terms are
  divided by the window's number of micro-batches. The loss is therefore already scaled for
  gradient accumulation (``loss_is_scaled_for_ga = True``); the Trainer's own
  `num_items_in_batch` (the labels of its own loss) is not used.
- **Logging**: each term's weighted value, averaged over the optimiser steps since the last log
  (and over processes), is added to the Trainer's training logs as ``loss/<term>`` next to
  ``loss`` — whatever reporting the Trainer has (TensorBoard, MLflow, W&B callbacks) gets it.
- **Evaluation** loss is the distillation loss of each batch on its own.

The student takes no trainable additions: a term that would create connectors or loss-owned
parameters (FitNet between different widths, CRD) is refused when the Trainer is made (the
Trainer's optimiser and DDP only know the model); train those with `kd.fit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import kdistill as kd
from kdistill.data.batches import INDEX_KEY, as_batch
from kdistill.errors import ConfigError

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - exercised by a test with the module hidden
    raise ImportError(
        "kdistill.integrations.transformers needs Hugging Face transformers 5 and accelerate: "
        "pip install 'kdistill[transformers]'"
    ) from error

if not hasattr(Trainer, "loss_is_scaled_for_ga"):  # transformers < 5 would rescale our loss
    import transformers

    raise ImportError(
        f"kdistill.integrations.transformers needs transformers >= 5 (installed: "
        f"{transformers.__version__}), whose Trainer takes a loss already normalised over the "
        "accumulated batch: pip install 'kdistill[transformers]'"
    )

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """`transformers.Trainer` training `model` (the student) through a `kd.Distiller`.

    `teacher`: the frozen teacher model (None when no term uses a teacher, or with
    `teacher_outputs`, whose weightless stand-in then takes its place).
    `terms`: kdistill `Term`s, e.g. ``[Term(ForwardKL(), 0.5), Term(TokenCE(), 0.5)]``.
    `teacher_outputs`: stored teacher outputs instead of running the teacher (see the module).
    `teacher_speedup`: as `kd.Distiller`'s. Every other argument is the Trainer's.
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises over the whole accumulated window

    def __init__(
        self,
        model: nn.Module | None = None,
        *args: Any,
        teacher: nn.Module | None = None,
        terms: Sequence[kd.Term] = (),
        teacher_outputs: Any = None,
        teacher_speedup: str | Sequence[str] | None = None,
        **kwargs: Any,
    ):
        if model is None:
            raise ConfigError("DistillationTrainer needs model= (the student)")
        if not terms:
            raise ConfigError(
                "DistillationTrainer needs terms=[kd.Term(...), ...], e.g. "
                "[kd.Term(kdistill.losses.ForwardKL(), 1.0)]"
            )
        if teacher_outputs is not None and not callable(getattr(teacher_outputs, "lookup", None)):
            raise ConfigError(
                f"teacher_outputs must be stored teacher outputs with lookup(index, inputs) "
                f"(TeacherCache, TokenTeacherCache, MemoryTeacherOutputs), got "
                f"{type(teacher_outputs).__name__}"
            )
        super().__init__(model, *args, **kwargs)
        self._stand_in = teacher is None and callable(getattr(teacher_outputs, "stand_in", None))
        if self._stand_in:
            teacher = teacher_outputs.stand_in()  # weightless: every output comes from the store
        self.distiller = kd.Distiller(teacher, model, list(terms), teacher_speedup=teacher_speedup)
        self.teacher_outputs = teacher_outputs
        if teacher is not None:
            teacher.to(self.args.device)
        self._refuse_extra_parameters()
        self._window: tuple[int, dict[str, float]] = (1, {})
        self._part_sums: dict[str, float] = {}
        self._windows_since_log = 0

    # -- what the Trainer does not know about ------------------------------------------------
    def _refuse_extra_parameters(self) -> None:
        """Connectors / loss-owned parameters would be outside the Trainer's optimiser, its DDP
        and its checkpoints: size them on one collated batch and refuse any that appear."""
        sized = [
            name
            for name, term in zip(self.distiller.term_names, self.distiller.terms)
            if getattr(term.loss, "uses_connector", False) or hasattr(term.loss, "build")
        ]
        if sized and self.train_dataset is not None:
            rows = [self.train_dataset[i] for i in range(min(2, len(self.train_dataset)))]
            batch = as_batch(self.data_collator(rows))
            self.distiller.build(_to(batch.inputs, self.args.device), optimiser_follows=True)
        extra = [
            name
            for name, module in (
                ("connectors", self.distiller.connectors),
                ("losses", self.distiller.losses),
            )
            if any(p.requires_grad for p in module.parameters())
        ]
        if extra:
            raise ConfigError(
                f"terms {sized} need trainable {' and '.join(extra)} (a connector between "
                "different widths, or a loss with its own parameters), which the Trainer's "
                "optimiser, DDP and checkpoints would not hold; tap layers of the same width, "
                "or train with kd.fit"
            )
        # from now on a forward that creates a parameter is an error, never an untrained one
        self.distiller.trainable_parameters()

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.teacher_outputs is not None and INDEX_KEY not in self._signature_columns:
            self._signature_columns.append(INDEX_KEY)  # stored outputs are looked up by index

    # -- one big batch per optimiser step --------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's window of micro-batches, and (kept for `compute_loss`) each
        token-counting term's count over the window and all processes ÷ the processes."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals: dict[str, float] = {}
        for item in batches:
            batch = as_batch(item)
            for name, count in self.distiller.count_tokens(batch.target, batch.inputs).items():
                totals[name] = totals.get(name, 0) + count
        world = self.accelerator.num_processes
        if world > 1 and totals:  # every process has the same terms, in the same order
            local = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
            summed = self.accelerator.reduce(local, reduction="sum").tolist()
            totals = dict(zip(totals, summed))
        self._window = (max(len(batches), 1), {k: v / world for k, v in totals.items()})
        self._windows_since_log += 1
        return batches, num_items

    @contextlib.contextmanager
    def _student_called_as(self, model: nn.Module):
        """The Distiller calls `model` — the Trainer's wrapping of the student (DDP, …), so that
        its gradient synchronisation and autocast apply — in place of the bare student."""
        distiller = self.distiller
        student = distiller._modules["student"]
        if model is student:
            yield
            return
        distiller._modules["student"] = model
        try:
            yield
        finally:
            distiller._modules["student"] = student

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Distiller's loss of this micro-batch (normalised as the module says); in
        evaluation, the batch's own distillation loss."""
        batch = as_batch(inputs)
        training = model.training
        micro_batches, counts = self._window if training else (1, {})
        teacher_output = teacher_features = None
        if self.teacher_outputs is not None and not training and self._stand_in:
            raise ConfigError(
                "evaluation with stored teacher outputs: they cover the training samples only; "
                "pass the live teacher too (teacher=..., used for evaluation) or evaluate the "
                "student without the DistillationTrainer"
            )
        if self.teacher_outputs is not None and training:
            if batch.index is None:
                raise ConfigError(
                    "teacher_outputs are looked up by each sample's dataset position: put it "
                    f"in the batches under {INDEX_KEY!r} (a column of the dataset)"
                )
            teacher_output, teacher_features = self.teacher_outputs.lookup(
                batch.index.cpu(), _to(batch.inputs, "cpu")
            )
            teacher_output = _to(teacher_output, self.args.device)
            teacher_features = _to(teacher_features, self.args.device)
        if training and self.state.max_steps:
            self.distiller.set_progress(self.state.epoch or 0.0)
        with self._student_called_as(model):
            out = self.distiller(
                batch.inputs,
                target=batch.target,
                index=batch.index,
                teacher_output=teacher_output,
                teacher_features=teacher_features,
                micro_batches=micro_batches,
                token_counts=counts,
            )
        if training:
            for name, value in out.parts.items():
                self._part_sums[name] = self._part_sums.get(name, 0.0) + value
        return (out.loss, out.student_output) if return_outputs else out.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with ``loss/<term>`` (each term's weighted value per optimiser
        step, averaged since the last training log and over processes) beside ``loss``."""
        if "loss" in logs and self._part_sums and self._windows_since_log:
            names = list(self._part_sums)
            values = torch.tensor(
                [self._part_sums[n] for n in names], dtype=torch.float64, device=self.args.device
            )
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            for name, value in zip(names, values.tolist()):
                logs[f"loss/{name}"] = value / self._windows_since_log
            self._part_sums = {}
            self._windows_since_log = 0
        super().log(logs, *args, **kwargs)


def _to(value: Any, device) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    if hasattr(value, "to"):
        return value.to(device)
    return value
