"""Generated sequences as a teacher source: sequence-level KD (Kim & Rush 2016).

The teacher's greedy completions of the training prompts are made once and stored by
`kdistill.distill.onpolicy.teacher_sequences` (keyed by the teacher's weights, the data and the
decoding settings). `TeacherSequences` hands them to training batch by batch: it is a per-batch
transform (`kdistill.distill.transforms.BatchTransform`) that `fit(batch_transforms=[...])` calls
on each batch of the data the teacher completed, and returns the same prompts with the teacher's
completions — after checking, row by row, that the batch's prompts are the prompts the teacher
completed. A batch of other data, another order or a subset raises CacheError naming the sample;
never a silently wrong completion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdistill.data.arrays import Batch
from kdistill.distill.onpolicy import batch_prompts
from kdistill.distill.teacher.base import TeacherSource
from kdistill.errors import CacheError, ConfigError

__all__ = ["TeacherSequences"]


class TeacherSequences:
    """The teacher's completions of the training prompts, substituted into each batch.

    `generated`: prompt → completion data holding the teacher's completions of the prompts of
    the training data, row i for sample i (`teacher_sequences`' result: ``prompts()`` and
    ``get_batch(indices)`` → ``({"input_ids", "attention_mask"}, labels)``, right-padded).
    `apply(student, batch, key, rank)` → (the batch's rows of `generated`, True); the batch must
    carry its dataset indices. Raises CacheError when a row's prompt (its tokens before the first
    counted label) differs from the prompt stored for its index.
    """

    name = "sequence_level"

    def __init__(self, generated: Any, source: str = "teacher sequences"):
        self.generated = generated
        self.prompts = generated.prompts()
        self.source = source

    def __len__(self) -> int:
        return len(self.prompts)

    def check(self, source: TeacherSource, label: str) -> None:
        """Stored teacher outputs were computed on the data's completions, not the teacher's:
        ConfigError unless the teacher runs live."""
        if not getattr(source, "live", False):
            raise ConfigError(
                f"{label}: sequence-level KD trains on the teacher's completions, which stored "
                "teacher outputs do not cover; run the teacher online (teacher_cache: off)"
            )

    def apply(self, student: nn.Module, batch: Batch, key: int, rank: int) -> tuple[Batch, bool]:
        if batch.index is None:
            raise ConfigError(
                f"{self.source}: the batches carry no dataset index, so the teacher's "
                "completions cannot be matched to them; use kdistill's BatchLoader (or yield "
                "(inputs, target, index))"
            )
        index = torch.as_tensor(batch.index).reshape(-1).cpu()
        prompts = batch_prompts(batch.inputs, batch.target)
        for row, (sample, prompt) in enumerate(zip(index.tolist(), prompts)):
            if not 0 <= sample < len(self.prompts):
                raise CacheError(
                    f"{self.source}: sample index {sample} (row {row}) lies outside the "
                    f"{len(self.prompts)} prompts the teacher completed; the batches come from "
                    "other data: generate the sequences for the data you train on"
                )
            stored = self.prompts[sample]
            if not torch.equal(prompt.cpu(), stored):
                raise CacheError(
                    f"{self.source}: sample {sample} (row {row} of this batch) has a prompt of "
                    f"{len(prompt)} tokens that is not the {len(stored)}-token prompt the teacher "
                    "completed: the stored completions belong to other data (a subset, another "
                    "order, another split or tokenizer); generate them for the data you train "
                    "on (teacher_sequences), or train on the data they were made from"
                )
        inputs, target = self.generated.get_batch(index)
        return Batch(inputs, target, index), True

    def __repr__(self) -> str:
        return f"TeacherSequences({len(self)} completions, {self.source})"
