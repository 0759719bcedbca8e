"""The tiny causal-LM distillation that tests/test_integration_transformers.py trains, in one
process or under ``torchrun --nproc_per_node 2`` (then: ``python -m torch.distributed.run
--nproc_per_node 2 tests/hf_trainer_worker.py OUT BATCH ACCUMULATE``; rank 0 saves the trained
student's weights to OUT).

Sequences are right-padded to L = 8 with 2 to 8 real tokens each, so micro-batches count very
different numbers of positions: per-micro-batch normalisation would give other numbers.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch.utils.data import SequentialSampler

import kdistill as kd
from kdistill.engine.distributed import cleanup
from kdistill.losses import ForwardKL, TokenCE
from kdistill.models.lm import gpt2_lm

VOCAB, LENGTH, SAMPLES = 40, 8, 16


def samples() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(SAMPLES):
        real = 2 + (i * 5) % 7  # 2 … 8 real tokens
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=generator)
        mask = (torch.arange(LENGTH) < real).long()
        ids = ids * mask  # pad id 0
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(1)
    teacher = gpt2_lm(VOCAB, n_layer=2, n_embd=32, n_head=2, n_positions=LENGTH)
    student = gpt2_lm(VOCAB, n_layer=1, n_embd=16, n_head=2, n_positions=LENGTH)
    return teacher, student


def terms() -> list[kd.Term]:
    return [
        kd.Term(ForwardKL(temperature=2.0), 0.7, output="logits"),
        kd.Term(TokenCE(), 0.3, output="logits"),
    ]


LR = 0.5


def trainer(student, teacher, out_dir, batch: int, accumulate: int, **overrides):
    from transformers import TrainingArguments

    from kdistill.integrations.transformers import DistillationTrainer

    class InOrder(DistillationTrainer):
        """The data in its order, as the kd.fit loader gives it (the Trainer shuffles)."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

    settings = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    settings.update(overrides)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    return InOrder(
        model=student,
        teacher=teacher,
        terms=terms(),
        args=TrainingArguments(**settings),
        train_dataset=samples(),
        optimizers=(optimizer, None),
    )


def main(out: str, batch: int, accumulate: int) -> None:
    torch.set_num_threads(1)
    teacher, student = models()
    student = copy.deepcopy(student)
    trained = trainer(student, teacher, out + ".dir", batch, accumulate)
    trained.train()
    if trained.is_world_process_zero():
        torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, out)
    # leave the process group the Trainer joined, the ranks together: torchrun's ranks otherwise
    # tear gloo down at interpreter exit and one aborted under load ("terminate called without
    # an active exception", 1 of 3 CI runs)
    del trained
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
