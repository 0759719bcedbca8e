"""Tests for the engine: checkpoints, schedules, the training loop, resume and metrics.

Expected values come from hand computation (schedules, accuracy), from hashlib (checksums), from
reading the written files directly (JSON lines), or from a second, independent training run
(exact resume must reproduce the uninterrupted run bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdistill.engine.checkpoint as checkpoint_module
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distiller import Distiller, Term
from kdistill.engine import (
    Accuracy,
    FitResult,
    MetricsLog,
    TrainConfig,
    evaluate_classifier,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
    trained_state,
)
from kdistill.engine.checkpoint import load_weights
from kdistill.engine.optim import lr_factor, make_optimizer, make_scheduler
from kdistill.errors import CheckpointError, NonFiniteLossError
from kdistill.losses import CE, KD, FitNet
from kdistill.losses.base import INDEX, STUDENT, TARGET, DistillLoss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def sample_tensors() -> dict[str, Tensor]:
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
        "ids": torch.tensor([3, -1, 2**40], dtype=torch.int64),
        "half": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        "scalar": torch.tensor(0.1, dtype=torch.float64),
        "rng": torch.get_rng_state(),
    }


SAMPLE_STATE = {
    "epoch": 3,
    "step": 17,
    "lr": 0.1 + 0.2,  # a float that only round-trips exactly when written with full precision
    "name": "student α",
    "history": [{"epoch": 1, "train_loss": 1 / 3}],
    "flag": None,
}


def test_checkpoint_round_trip_is_exact(tmp_path):
    tensors = sample_tensors()
    save_checkpoint(tmp_path, "ck", tensors, SAMPLE_STATE)
    got, state = load_checkpoint(tmp_path, "ck")
    assert set(got) == set(tensors)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key
    assert state == SAMPLE_STATE


def test_checkpoint_json_holds_sha256_of_tensor_file(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    meta = json.loads((tmp_path / "ck.json").read_text())
    expected = hashlib.sha256((tmp_path / "ck.safetensors").read_bytes()).hexdigest()
    assert meta["sha256"] == expected


def test_no_temporary_files_are_left_after_saving(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    save_checkpoint(tmp_path, "ck", sample_tensors(), {"epoch": 4})  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]


def test_flipped_byte_in_tensor_file_fails_the_checksum(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    path = tmp_path / "ck.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x01  # inside the tensor payload, the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path, "ck")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "binary", "not-an-object"])
def test_damaged_json_raises_checkpoint_error(tmp_path, damage):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    path = tmp_path / "ck.json"
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_text("this is not json {")
    elif damage == "binary":
        path.write_bytes(b"\xff\xfe\x00\x9c garbage")
    else:
        path.write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, "ck")
    assert "ck.json" in str(info.value)


def test_json_without_state_raises_checkpoint_error(tmp_path):
    """Valid JSON with the right format and checksum but no `state` is still a defect."""
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    path = tmp_path / "ck.json"
    meta = json.loads(path.read_text())
    del meta["state"]
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path, "ck")


def test_missing_files_raise_checkpoint_error_naming_the_path(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, "nothing")
    assert str(tmp_path / "nothing.json") in str(info.value)

    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    (tmp_path / "ck.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, "ck")
    assert str(tmp_path / "ck.safetensors") in str(info.value)


def test_failed_tensor_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = sample_tensors()
    save_checkpoint(tmp_path, "ck", old, SAMPLE_STATE)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save_file(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")  # die half-way through the write
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save_file)
    new = {key: value + 1 if value.is_floating_point() else value for key, value in old.items()}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "ck", new, {"epoch": 99})
    monkeypatch.undo()

    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporary left behind
    got, state = load_checkpoint(tmp_path, "ck")
    assert state == SAMPLE_STATE
    assert all(torch.equal(got[k], old[k]) for k in old)


def test_failed_json_write_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """A crash after the new tensor file is in place but before its JSON is: the directory must
    still hold one complete checkpoint (the old or the new one), not a mismatched pair."""
    old = sample_tensors()
    save_checkpoint(tmp_path, "ck", old, SAMPLE_STATE)

    def broken_write_text(path, text):
        raise OSError("killed before the JSON was written")

    monkeypatch.setattr(checkpoint_module, "atomic_write_text", broken_write_text)
    new = {key: value + 1 if value.is_floating_point() else value for key, value in old.items()}
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, "ck", new, {"epoch": 99})
    monkeypatch.undo()

    got, state = load_checkpoint(tmp_path, "ck")
    if state == SAMPLE_STATE:
        assert all(torch.equal(got[k], old[k]) for k in old)
    else:
        assert state == {"epoch": 99}
        assert all(torch.equal(got[k], new[k]) for k in new)


def test_load_weights_reports_missing_key(tmp_path):
    model = nn.Linear(4, 3)
    state = {"weight": torch.zeros(3, 4)}
    with pytest.raises(CheckpointError) as info:
        load_weights(model, state, "student", "ck.safetensors")
    message = str(info.value)
    assert "bias" in message and "missing" in message and "ck.safetensors" in message


def test_load_weights_reports_wrong_shape_with_both_shapes():
    model = nn.Linear(4, 3)
    state = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    with pytest.raises(CheckpointError) as info:
        load_weights(model, state, "student", "ck")
    message = str(info.value)
    assert "weight" in message and "(3, 5)" in message and "(3, 4)" in message


def test_load_weights_reports_unexpected_key_and_loads_a_good_state():
    model = nn.Linear(4, 3)
    good = {"weight": torch.ones(3, 4), "bias": torch.full((3,), 2.0)}
    with pytest.raises(CheckpointError, match="extra"):
        load_weights(model, {**good, "extra": torch.zeros(1)}, "student", "ck")
    load_weights(model, good, "student", "ck")
    assert torch.equal(model.weight, torch.ones(3, 4))
    assert torch.equal(model.bias, torch.full((3,), 2.0))


# ---------------------------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------------------------


def test_cosine_schedule_hand_values():
    config = TrainConfig(epochs=2, schedule="cosine")
    # 2 epochs × 4 steps = 8 steps in all
    assert lr_factor(config, 0, 4) == pytest.approx(1.0)
    assert lr_factor(config, 2, 4) == pytest.approx(0.5 + math.sqrt(2) / 4)  # ½(1 + cos π/4)
    assert lr_factor(config, 4, 4) == pytest.approx(0.5)
    assert lr_factor(config, 6, 4) == pytest.approx(0.5 - math.sqrt(2) / 4)
    assert lr_factor(config, 8, 4) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(config, 20, 4) == pytest.approx(0.0, abs=1e-12)  # clamped after the end


def test_step_schedule_hand_values():
    config = TrainConfig(epochs=6, schedule="step", step_epochs=2, step_gamma=0.5)
    expected = {0: 1.0, 19: 1.0, 20: 0.5, 39: 0.5, 40: 0.25, 59: 0.25}
    for step, value in expected.items():
        assert lr_factor(config, step, 10) == pytest.approx(value), step


def test_constant_schedule():
    config = TrainConfig(epochs=3, schedule="constant")
    assert [lr_factor(config, s, 5) for s in (0, 7, 15)] == [1.0, 1.0, 1.0]


def test_scheduler_applies_the_factor_to_the_optimizer():
    config = TrainConfig(epochs=1, schedule="cosine", lr=0.2, optimizer="sgd")
    param = nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([param], config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    hand = [0.2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert lrs == pytest.approx(hand, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# a tiny, linearly separable problem
# ---------------------------------------------------------------------------------------------


def separable_dataset(n: int = 256, seed: int = 0) -> ArrayDataset:
    """Class c lights up rows band c of an 8×8 image (bands: rows 0–2, 3–5, 6–7) over noise."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    targets = targets[torch.randperm(n, generator=generator)]
    inputs = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    bands = [(0, 3), (3, 6), (6, 8)]
    for c, (lo, hi) in enumerate(bands):
        inputs[targets == c, :, lo:hi, :] += 1.0
    return ArrayDataset(inputs, targets, classes=["a", "b", "c"], name="bands")


class SmallNet(nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.3):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, hidden)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.relu(self.fc1(self.flatten(x)))))


def make_distiller(seed: int = 0, dropout: float = 0.3) -> Distiller:
    """Teacher (hidden 32) + student (hidden 16, dropout) with KD, CE and a FitNet term whose
    linear connector (16 → 32) is trained and checkpointed with the student."""
    torch.manual_seed(seed)
    teacher = SmallNet(hidden=32, dropout=0.5)
    student = SmallNet(hidden=16, dropout=dropout)
    return Distiller(
        teacher,
        student,
        [
            Term(KD(temperature=2.0), weight=0.5),
            Term(CE(), weight=0.5),
            Term(FitNet(), weight=0.1, student="fc1", teacher="fc1"),
        ],
    )


def config(**overrides) -> TrainConfig:
    values = dict(epochs=3, batch_size=32, lr=1e-2, schedule="cosine", progress=False)
    values.update(overrides)
    return TrainConfig(**values)


class InterruptingLoader(BatchLoader):
    """A BatchLoader that raises KeyboardInterrupt when it is about to yield batch `step` of
    epoch `epoch` (0-based), as a Ctrl-C at that moment would."""

    def __init__(self, *args, stop_at: tuple[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def iter_from(self, step: int):
        batches = super().iter_from(step)
        epoch = self.epoch

        def generate():
            for number, batch in enumerate(batches, start=step):
                if (epoch, number) == self.stop_at:
                    raise KeyboardInterrupt
                yield batch

        return generate()


def final_weights(distiller: Distiller) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trained_state(distiller).items()}


def assert_bitwise_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def data():
    full = separable_dataset(288)
    return full.subset(range(256), name="train"), full.subset(range(256, 288), name="val")


def test_fit_learns_the_separable_problem(tmp_path, data):
    train, val = data
    torch.manual_seed(1)
    student = SmallNet()
    distiller = Distiller(None, student, [Term(CE())])
    loader = BatchLoader(train, batch_size=32, shuffle=True, seed=0)
    val_loader = BatchLoader(val, batch_size=64)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    before = evaluate_classifier(student, val_loader)
    result = fit(
        distiller,
        loader,
        config(epochs=4),
        evaluate=lambda model: evaluate_classifier(model, val_loader),
        label="alone",
        metrics_log=log,
        checkpoint_dir=tmp_path / "ck",
    )
    assert isinstance(result, FitResult)
    losses = [record["train_loss"] for record in result.history]
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0]
    assert result.final["val_accuracy"] >= 0.9  # chance is 1/3
    assert result.final["val_accuracy"] > before["accuracy"]
    assert result.skipped_batches == 0
    assert student.training  # evaluate restored the mode

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    for epoch, record in enumerate(records, start=1):
        assert {"model", "epoch", "train_loss", "train_parts", "val_accuracy"} <= set(record)
        assert record["model"] == "alone" and record["epoch"] == epoch
        assert set(record["train_parts"]) == {"ce"}
    assert records == log.read()
    assert (tmp_path / "ck" / "last.safetensors").exists()
    assert (tmp_path / "ck" / "last.json").exists()
    state = json.loads((tmp_path / "ck" / "last.json").read_text())["state"]
    assert state["epoch"] == 4 and state["step"] == 0


def test_trained_state_excludes_the_teacher():
    distiller = make_distiller()
    distiller.build(torch.randn(2, 1, 8, 8))
    keys = set(trained_state(distiller))
    assert keys
    assert all(k.split(".")[0] in {"student", "connectors", "losses"} for k in keys)
    assert {"student.fc1.weight", "connectors.fitnet.weight"} <= keys


def uninterrupted_run(tmp_path: Path, train: ArrayDataset, **overrides) -> tuple[dict, FitResult]:
    distiller = make_distiller()
    loader = BatchLoader(train, batch_size=32, shuffle=True, seed=5)
    result = fit(distiller, loader, config(**overrides), checkpoint_dir=tmp_path / "full")
    return final_weights(distiller), result


def interrupted_then_resumed_run(
    tmp_path: Path, train: ArrayDataset, stop_at: tuple[int, int], **overrides
) -> tuple[dict, FitResult, dict]:
    directory = tmp_path / "parts"
    loader = InterruptingLoader(train, batch_size=32, shuffle=True, seed=5, stop_at=stop_at)
    with pytest.raises(KeyboardInterrupt):
        fit(make_distiller(), loader, config(**overrides), checkpoint_dir=directory)
    saved = json.loads((directory / "last.json").read_text())["state"]

    resumed = make_distiller()  # fresh objects, same seed
    torch.manual_seed(12345)  # the global RNG must come from the checkpoint, not from here
    loader = BatchLoader(train, batch_size=32, shuffle=True, seed=5)
    result = fit(resumed, loader, config(**overrides), checkpoint_dir=directory, resume=True)
    return final_weights(resumed), result, saved


def test_resume_at_an_epoch_boundary_is_bit_exact(tmp_path, data):
    train, _ = data
    expected, full = uninterrupted_run(tmp_path, train)
    got, resumed, saved = interrupted_then_resumed_run(tmp_path, train, stop_at=(1, 0))
    assert (saved["epoch"], saved["step"]) == (1, 0)  # the epoch-1 checkpoint was written
    assert_bitwise_equal(got, expected)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(resumed.history, full.history):
        assert a["train_loss"] == b["train_loss"]


def test_resume_in_the_middle_of_an_epoch_is_bit_exact(tmp_path, data):
    train, _ = data
    expected, _ = uninterrupted_run(tmp_path, train, checkpoint_every_steps=2)
    # 8 steps per epoch; mid-epoch checkpoints after steps 2, 4, 6; Ctrl-C before step 5 of
    # the second epoch, so the last checkpoint is (epoch index 1, step 4)
    got, _, saved = interrupted_then_resumed_run(
        tmp_path, train, stop_at=(1, 5), checkpoint_every_steps=2
    )
    assert (saved["epoch"], saved["step"]) == (1, 4)
    assert_bitwise_equal(got, expected)


def test_mid_epoch_resume_reports_the_same_epoch_loss(tmp_path, data):
    """The epoch record after a mid-epoch resume averages over the whole epoch, not only over
    the steps run after the resume."""
    train, _ = data
    _, full = uninterrupted_run(tmp_path, train, checkpoint_every_steps=2)
    _, resumed, _ = interrupted_then_resumed_run(
        tmp_path, train, stop_at=(1, 5), checkpoint_every_steps=2
    )
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(resumed.history, full.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), a["epoch"]


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, data):
    train, _ = data
    expected, _ = uninterrupted_run(tmp_path, train, epochs=1)
    distiller = make_distiller()
    loader = BatchLoader(train, batch_size=32, shuffle=True, seed=5)
    fit(distiller, loader, config(epochs=1), checkpoint_dir=tmp_path / "empty", resume=True)
    assert_bitwise_equal(final_weights(distiller), expected)


def test_offline_teacher_outputs_replace_the_teacher(data):
    train, _ = data
    torch.manual_seed(3)
    teacher, student = SmallNet(32), SmallNet(16, dropout=0.0)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    cached = predict(teacher, BatchLoader(train, batch_size=64))
    assert cached.shape == (256, 3)
    calls.clear()
    distiller = Distiller(teacher, student, [Term(KD()), Term(CE())])
    result = fit(
        distiller,
        BatchLoader(train, batch_size=32, shuffle=True),
        config(epochs=1),
        teacher_outputs=cached,
    )
    assert calls == []
    assert math.isfinite(result.final["train_loss"])


# ---------------------------------------------------------------------------------------------
# non-finite losses in the loop
# ---------------------------------------------------------------------------------------------


class NaNOnSample(DistillLoss):
    """Cross-entropy, but NaN on any batch that holds dataset sample `bad`."""

    needs = (STUDENT, TARGET, INDEX)

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def forward(self, logits: Tensor, target: Tensor, index: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, target)
        if bool((index == self.bad).any()):
            return loss * float("nan")
        return loss


def test_skip_drops_the_nan_batch_and_counts_it(data):
    train, _ = data
    # sample 70 sits in batch 2 (samples 64..95) of an unshuffled loader with batches of 32
    torch.manual_seed(4)
    student = SmallNet(dropout=0.0)
    reference_student = SmallNet(dropout=0.0)
    reference_student.load_state_dict(student.state_dict())

    distiller = Distiller(None, student, [Term(NaNOnSample(bad=70), name="ce")])
    result = fit(
        distiller,
        BatchLoader(train, batch_size=32),
        config(epochs=2, on_nonfinite="skip", schedule="constant"),
    )
    assert result.skipped_batches == 2  # once per epoch
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert all(math.isfinite(r["train_loss"]) for r in result.history)

    # the same as training on the data without that batch at all
    without = train.subset([i for i in range(256) if not 64 <= i < 96])
    reference = Distiller(None, reference_student, [Term(CE(), name="ce")])
    expected = fit(
        reference, BatchLoader(without, batch_size=32), config(epochs=2, schedule="constant")
    )
    for key, value in student.state_dict().items():
        assert torch.equal(value, reference_student.state_dict()[key]), key
    for a, b in zip(result.history, expected.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_stop_raises_naming_epoch_step_and_term(data):
    train, _ = data
    torch.manual_seed(4)
    distiller = Distiller(None, SmallNet(), [Term(NaNOnSample(bad=70), name="hard")])
    with pytest.raises(NonFiniteLossError) as info:
        fit(distiller, BatchLoader(train, batch_size=32), config(on_nonfinite="stop"))
    message = str(info.value)
    assert "epoch 1" in message and "step 2" in message
    assert "hard" in message and info.value.term == "hard"


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_accuracy_against_a_hand_count():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 5.0]])
    target = torch.tensor([0, 2, 0, 2])
    # argmax = [0, 1, 0, 2] → 3 of 4 right
    hand_ce = [
        math.log(math.exp(2) + math.exp(1) + 1) - 2,
        math.log(1 + math.exp(3) + math.exp(1)) - 1,
        math.log(math.exp(1) + 1 + math.exp(0.5)) - 1,
        math.log(2 + math.exp(5)) - 5,
    ]
    metric = Accuracy()
    metric.update(logits[:3], target[:3])
    metric.update(logits[3:], target[3:])
    got = metric.compute()
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["loss"] == pytest.approx(sum(hand_ce) / 4, rel=1e-6)
    metric.reset()
    metric.update(logits[:2], target[:2])  # [right, wrong]
    assert metric.compute()["accuracy"] == pytest.approx(0.5)
    metric.reset()
    with pytest.raises(ValueError):
        metric.compute()


def test_evaluate_classifier_matches_a_hand_count(data):
    _, val = data
    torch.manual_seed(5)
    model = SmallNet().train()
    loader = BatchLoader(val, batch_size=10)  # 32 samples: batches of 10, 10, 10, 2
    got = evaluate_classifier(model, loader)
    assert model.training
    model.eval()
    with torch.no_grad():
        correct = sum(
            int(model(val.inputs[i : i + 1]).argmax()) == int(val.targets[i]) for i in range(32)
        )
    assert got["accuracy"] == pytest.approx(correct / 32)
