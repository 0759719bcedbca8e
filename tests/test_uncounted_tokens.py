"""Training on nothing is not silent (issue 27, item 2).

A batch in which a token-counting term counts no position (every label −100) contributes
nothing to that term: a warning names the run, the batch, its samples and the count. An epoch in
which a term counts no token at all trained it on nothing: an error (DataError) naming the term
and the count, unless `train.allow_uncounted_epochs` says that is wanted (then a warning).
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_onpolicy import TinyLM, random_completions

import kdistill as kd
from kdistill.data.text import IGNORE_INDEX
from kdistill.engine import TrainConfig, fit
from kdistill.errors import DataError
from kdistill.losses.token import ForwardKL


def batches(n: int, masked_rows) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """Prompt → completion batches of 4 rows (a plain list is a loader), the labels of
    `masked_rows` all −100 (their completions not counted, as a data bug would leave them)."""
    data = random_completions(n, seed=0)
    out = []
    for start in range(0, n, 4):
        index = torch.arange(start, start + 4)
        inputs, labels = data.get_batch(index)
        for row, sample in enumerate(index.tolist()):
            if sample in masked_rows:
                labels[row] = IGNORE_INDEX
        out.append((inputs, labels, index))
    return out


def train(loader, **config):
    student, teacher = TinyLM(seed=1), TinyLM(seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    settings = {"epochs": 1, "batch_size": 4, "lr": 0.05, "progress": False, **config}
    result = fit(
        kd.Distiller(teacher, student, [kd.Term(ForwardKL())]),
        loader,
        TrainConfig(**settings),
        label="s/fkl",
    )
    moved = any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    return result, moved


def test_an_epoch_without_a_counted_token_is_an_error():
    data = batches(8, range(8))
    assert all(int((labels != IGNORE_INDEX).sum()) == 0 for _, labels, _ in data)
    with pytest.raises(DataError, match=r"s/fkl.*epoch 1.*counted 0 tokens") as error:
        train(data)
    assert "allow_uncounted_epochs" in str(error.value)  # the way out is named


def test_an_epoch_without_a_counted_token_can_be_allowed_and_then_warns(caplog):
    data = batches(8, range(8))
    with caplog.at_level(logging.WARNING):
        result, moved = train(data, allow_uncounted_epochs=True)
    assert result.final["train_loss"] == 0.0 and not moved  # it trained on nothing …
    assert "counted 0 tokens" in caplog.text  # … and said so


def test_a_batch_without_a_counted_token_is_a_warning_naming_it(caplog):
    data = batches(12, range(4, 8))  # the second batch of three
    with caplog.at_level(logging.WARNING):
        _, moved = train(data)
    assert moved
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    about = [w for w in warnings if "0 of" in w]
    assert len(about) == 1, warnings
    positions = data[1][1].numel()
    assert "s/fkl" in about[0] and "batch 2" in about[0] and f"0 of {positions}" in about[0]
    assert "[4, 5, 6, 7]" in about[0]  # the samples
