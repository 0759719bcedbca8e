"""Tests for the engine: checkpoints, schedules, the training loop, resume and metrics.

Expected values come from hand computation (schedules, accuracy), from hashlib (checksums), from
reading the written files directly (JSON lines), or from a second, independent training run
(exact resume must reproduce the uninterrupted run bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file
from torch import Tensor, nn

import kdistill.engine.checkpoint as checkpoint_module
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.teacher.store import MemoryTeacherOutputs
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
from kdistill.engine.checkpoint import (
    load_latest_checkpoint,
    load_state_dict_file,
    load_weights,
    read_checkpoint_file,
)
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

# safetensors dtype codes → the torch dtype names the checkpoint digest is defined over
SAFETENSORS_DTYPES = {
    "F64": "torch.float64",
    "F32": "torch.float32",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "I64": "torch.int64",
    "I32": "torch.int32",
    "U8": "torch.uint8",
    "BOOL": "torch.bool",
}


def parse_safetensors(data: bytes) -> tuple[dict, bytes]:
    """The JSON header and the payload of a safetensors file, parsed by hand (not by the library
    under test): 8 bytes little-endian header length, the header, then the tensor bytes."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size].decode("utf-8")), data[8 + size :]


def digest_of_file_bytes(data: bytes) -> str:
    """SHA-256 over, in name order, `name|dtype|shape|` and the raw bytes of every tensor, taken
    from the serialised file itself."""
    header, payload = parse_safetensors(data)
    digest = hashlib.sha256()
    for name in sorted(key for key in header if key != "__metadata__"):
        info = header[name]
        start, end = info["data_offsets"]
        digest.update(
            f"{name}|{SAFETENSORS_DTYPES[info['dtype']]}|{tuple(info['shape'])}|".encode()
        )
        digest.update(payload[start:end])
    return digest.hexdigest()


def independent_digest(tensors: dict[str, Tensor]) -> str:
    return digest_of_file_bytes(safetensors_save(tensors))


def kdistill_meta(path: Path) -> dict:
    """The decoded `kdistill` metadata of a checkpoint file, read without kdistill."""
    header, _ = parse_safetensors(Path(path).read_bytes())
    return json.loads(header["__metadata__"]["kdistill"])


def write_with_metadata(path: Path, tensors: dict[str, Tensor], metadata: dict | None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x01  # inside the tensor payload: the header still parses
    path.write_bytes(bytes(data))


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


def test_checkpoint_metadata_holds_sha256_of_the_tensors(tmp_path):
    tensors = sample_tensors()
    path = save_checkpoint(tmp_path, "ck", tensors, SAMPLE_STATE)
    assert path == tmp_path / "ck.safetensors"
    data = path.read_bytes()
    header, _ = parse_safetensors(data)
    assert set(header["__metadata__"]) == {"kdistill"}
    meta = json.loads(header["__metadata__"]["kdistill"])
    assert meta["format"] == 2
    assert meta["state"] == SAMPLE_STATE
    # the digest covers what is in the file, and equals the digest of the tensors given
    assert meta["sha256"] == digest_of_file_bytes(data)
    assert meta["sha256"] == independent_digest(tensors)
    # it depends on the values, the names and the dtypes
    changed = dict(tensors, w=tensors["w"] + 1)
    renamed = {("W" if k == "w" else k): v for k, v in tensors.items()}
    retyped = dict(tensors, ids=tensors["ids"].to(torch.int32))
    for other in (changed, renamed, retyped):
        assert independent_digest(other) != meta["sha256"]


def test_a_hand_written_checkpoint_in_the_documented_format_loads(tmp_path):
    """The format is the documented one, not whatever save_checkpoint happens to write."""
    tensors = sample_tensors()
    meta = {"format": 2, "sha256": independent_digest(tensors), "state": SAMPLE_STATE}
    write_with_metadata(tmp_path / "ck.safetensors", tensors, {"kdistill": json.dumps(meta)})
    got, state = load_checkpoint(tmp_path, "ck")
    assert state == SAMPLE_STATE
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_no_temporary_files_are_left_after_saving(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    save_checkpoint(tmp_path, "ck", sample_tensors(), {"epoch": 4})  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]
    save_checkpoint(tmp_path, "ck", sample_tensors(), {"epoch": 5}, keep_previous=True)
    save_checkpoint(tmp_path, "ck", sample_tensors(), {"epoch": 6}, keep_previous=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.prev.safetensors", "ck.safetensors"]


def test_keep_previous_keeps_exactly_the_one_before(tmp_path):
    for epoch in (1, 2, 3):
        tensors = {"w": torch.full((2,), float(epoch))}
        save_checkpoint(tmp_path, "ck", tensors, {"epoch": epoch}, keep_previous=True)
    got, state = load_checkpoint(tmp_path, "ck")
    assert state == {"epoch": 3} and torch.equal(got["w"], torch.full((2,), 3.0))
    got, state = read_checkpoint_file(tmp_path / "ck.prev.safetensors")
    assert state == {"epoch": 2} and torch.equal(got["w"], torch.full((2,), 2.0))


def test_flipped_byte_in_tensor_file_fails_the_checksum(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    flip_payload_byte(tmp_path / "ck.safetensors")
    with pytest.raises(CheckpointError, match="checksum") as info:
        load_checkpoint(tmp_path, "ck")
    assert "ck.safetensors" in str(info.value)


@pytest.mark.parametrize("damage", ["truncate-payload", "truncate-header", "empty", "binary"])
def test_damaged_file_raises_checkpoint_error(tmp_path, damage):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE)
    path = tmp_path / "ck.safetensors"
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    if damage == "truncate-payload":
        path.write_bytes(data[: (header_end + len(data)) // 2])
    elif damage == "truncate-header":
        path.write_bytes(data[: header_end // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # bytes that are not UTF-8 in the middle of the JSON header
        at = data.index(b"epoch", 8)
        path.write_bytes(data[:at] + b"\xff\xfe\x00\x9c\xff" + data[at + 5 :])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, "ck")
    assert "ck.safetensors" in str(info.value)


def damaged_metadata(damage: str, tensors: dict[str, Tensor]) -> str:
    """The `kdistill` metadata string, damaged; the checksum is right wherever there is one."""
    good = json.dumps({"format": 2, "sha256": independent_digest(tensors), "state": SAMPLE_STATE})
    if damage == "garbage":
        return "this is not json {"
    if damage == "truncate":
        return good[: len(good) // 2]
    if damage == "empty":
        return ""
    if damage == "not-an-object":
        return "[1, 2, 3]"
    meta = json.loads(good)
    if damage == "no-state":
        del meta["state"]
    elif damage == "no-sha256":
        del meta["sha256"]
    elif damage == "no-format":
        del meta["format"]
    elif damage == "state-not-an-object":
        meta["state"] = [1, 2, 3]
    return json.dumps(meta)


@pytest.mark.parametrize(
    "damage",
    [
        "garbage",
        "truncate",
        "empty",
        "not-an-object",
        "no-state",
        "no-sha256",
        "no-format",
        "state-not-an-object",
    ],
)
def test_damaged_metadata_raises_checkpoint_error(tmp_path, damage):
    tensors = sample_tensors()
    path = tmp_path / "ck.safetensors"
    write_with_metadata(path, tensors, {"kdistill": damaged_metadata(damage, tensors)})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, "ck")
    assert "ck.safetensors" in str(info.value)


@pytest.mark.parametrize("version", [1, 3, "2", None])
def test_other_format_versions_are_refused(tmp_path, version):
    tensors = sample_tensors()
    meta = {"format": version, "sha256": independent_digest(tensors), "state": SAMPLE_STATE}
    write_with_metadata(tmp_path / "ck.safetensors", tensors, {"kdistill": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="format") as info:
        load_checkpoint(tmp_path, "ck")
    assert "ck.safetensors" in str(info.value)


def test_wrong_checksum_in_metadata_is_refused(tmp_path):
    tensors = sample_tensors()
    meta = {"format": 2, "sha256": hashlib.sha256(b"other").hexdigest(), "state": SAMPLE_STATE}
    write_with_metadata(tmp_path / "ck.safetensors", tensors, {"kdistill": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path, "ck")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path, metadata):
    write_with_metadata(tmp_path / "ck.safetensors", sample_tensors(), metadata)
    with pytest.raises(CheckpointError, match="without kdistill metadata") as info:
        load_checkpoint(tmp_path, "ck")
    assert "ck.safetensors" in str(info.value)


def test_missing_files_raise_checkpoint_error_naming_the_path(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, "nothing")
    assert str(tmp_path / "nothing.safetensors") in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_latest_checkpoint(tmp_path, "nothing")
    assert str(tmp_path / "nothing.safetensors") in str(info.value)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint_file(tmp_path / "elsewhere.safetensors")
    assert str(tmp_path / "elsewhere.safetensors") in str(info.value)


def half_writing_save_file(tensors, filename, *args, **kwargs):
    """`save_file` that dies half-way through writing the file."""
    data = safetensors_save(tensors, metadata=kwargs.get("metadata"))
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError("disk full")


def bumped(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        key: value + 1 if value.is_floating_point() else value for key, value in tensors.items()
    }


@pytest.mark.parametrize("keep_previous", [False, True])
def test_failed_tensor_write_leaves_previous_checkpoint_intact(
    tmp_path, monkeypatch, keep_previous
):
    old = sample_tensors()
    save_checkpoint(tmp_path, "ck", old, SAMPLE_STATE, keep_previous=keep_previous)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    monkeypatch.setattr(checkpoint_module, "save_file", half_writing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "ck", bumped(old), {"epoch": 99}, keep_previous=keep_previous)
    monkeypatch.undo()

    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporary left behind
    got, state = load_checkpoint(tmp_path, "ck")
    assert state == SAMPLE_STATE
    assert all(torch.equal(got[k], old[k]) for k in old)


@pytest.mark.parametrize("keep_previous", [False, True])
def test_failed_rename_leaves_the_last_good_checkpoint_loadable(
    tmp_path, monkeypatch, keep_previous
):
    """A crash at the final rename (after a complete temporary file was written): no temporary
    is left, and the newest complete checkpoint is still the one that loads."""
    older, old = sample_tensors(), bumped(sample_tensors())
    save_checkpoint(tmp_path, "ck", older, {"epoch": 1}, keep_previous=keep_previous)
    save_checkpoint(tmp_path, "ck", old, SAMPLE_STATE, keep_previous=keep_previous)
    latest = tmp_path / "ck.safetensors"
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == latest:
            raise OSError("killed during the rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, "ck", bumped(old), {"epoch": 99}, keep_previous=keep_previous)
    monkeypatch.undo()

    # no temporary left; with keep_previous the last good one was already moved aside
    expected_files = ["ck.prev.safetensors"] if keep_previous else ["ck.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected_files
    got, state, _ = load_latest_checkpoint(tmp_path, "ck")
    assert state == SAMPLE_STATE
    assert all(torch.equal(got[k], old[k]) for k in old)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    old, new = sample_tensors(), bumped(sample_tensors())
    save_checkpoint(tmp_path, "ck", old, SAMPLE_STATE, keep_previous=True)
    save_checkpoint(tmp_path, "ck", new, {"epoch": 99}, keep_previous=True)

    got, state, path = load_latest_checkpoint(tmp_path, "ck")  # both good: the latest
    assert state == {"epoch": 99} and path == tmp_path / "ck.safetensors"
    assert all(torch.equal(got[k], new[k]) for k in new)

    flip_payload_byte(tmp_path / "ck.safetensors")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path, "ck")  # the plain loader does not fall back
    got, state, path = load_latest_checkpoint(tmp_path, "ck")
    assert state == SAMPLE_STATE and path == tmp_path / "ck.prev.safetensors"
    assert all(torch.equal(got[k], old[k]) for k in old)

    (tmp_path / "ck.safetensors").unlink()  # latest missing: the previous one too
    got, state, path = load_latest_checkpoint(tmp_path, "ck")
    assert state == SAMPLE_STATE and path == tmp_path / "ck.prev.safetensors"


def test_both_checkpoints_corrupt_raises_naming_both_files(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_tensors(), SAMPLE_STATE, keep_previous=True)
    save_checkpoint(tmp_path, "ck", bumped(sample_tensors()), {"epoch": 99}, keep_previous=True)
    flip_payload_byte(tmp_path / "ck.safetensors")
    (tmp_path / "ck.prev.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError) as info:
        load_latest_checkpoint(tmp_path, "ck")
    message = str(info.value)
    assert str(tmp_path / "ck.safetensors") in message
    assert str(tmp_path / "ck.prev.safetensors") in message


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
# load_state_dict_file: weights from a file, never unpickling arbitrary objects
# ---------------------------------------------------------------------------------------------


class Detonator:
    """Unpickling this creates a folder: proof that a loader ran arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pt_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    got = load_state_dict_file(tmp_path / "w.pt")
    assert set(got) == {"weight", "bias"}
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    fresh = nn.Linear(4, 3)
    load_weights(fresh, got, "student", "w.pt")
    assert torch.equal(fresh.weight, model.weight)


def test_pickled_module_is_refused_without_being_unpickled(tmp_path):
    torch.save(nn.Linear(4, 3), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_state_dict_file(tmp_path / "model.pt")
    assert "model.pt" in str(info.value)

    marker = tmp_path / "was-unpickled"
    torch.save({"weight": torch.zeros(2), "payload": Detonator(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [[torch.zeros(2)], {"state_dict": {"weight": torch.zeros(2)}}, {"weight": 1.0}],
    ids=["list", "nested", "not-a-tensor"],
)
def test_pt_file_that_is_not_a_flat_state_dict_is_refused(tmp_path, content):
    torch.save(content, tmp_path / "w.pt")
    # a nested dict is refused with the key that holds the weights (checkpoint_key: state_dict)
    with pytest.raises(CheckpointError, match="state dict|checkpoint_key: state_dict"):
        load_state_dict_file(tmp_path / "w.pt")


def test_plain_safetensors_weights_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    write_with_metadata(tmp_path / "w.safetensors", model.state_dict(), None)
    got = load_state_dict_file(tmp_path / "w.safetensors")
    assert set(got) == {"weight", "bias"}
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_kdistill_checkpoint_weights_load_verified(tmp_path):
    tensors = sample_tensors()
    path = save_checkpoint(tmp_path, "ck", tensors, SAMPLE_STATE)
    got = load_state_dict_file(path)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    flip_payload_byte(path)
    with pytest.raises(CheckpointError, match="checksum"):
        load_state_dict_file(path)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt", "missing.pt"])
def test_unreadable_weights_files_are_refused(tmp_path, name):
    if name == "w.safetensors":
        data = safetensors_save({"w": torch.zeros(64)})
        (tmp_path / name).write_bytes(data[: len(data) - 16])  # truncated payload
    elif name == "w.pt":
        (tmp_path / name).write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(tmp_path / name)
    assert name in str(info.value)


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
    # one checkpoint per epoch, the one before kept, no temporary files left
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "last.prev.safetensors",
        "last.safetensors",
    ]
    progress = kdistill_meta(tmp_path / "ck" / "last.safetensors")["state"]["progress"]
    assert progress["epoch"] == 4 and progress["step"] == 0
    assert progress["history"] == records
    previous = kdistill_meta(tmp_path / "ck" / "last.prev.safetensors")["state"]["progress"]
    assert previous["epoch"] == 3 and previous["history"] == records[:3]


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
    tmp_path: Path,
    train: ArrayDataset,
    stop_at: tuple[int, int],
    damage: Callable[[Path], None] | None = None,
    **overrides,
) -> tuple[dict, FitResult, dict]:
    """Train until Ctrl-C at `stop_at`, apply `damage` to the checkpoint folder, then resume in
    fresh objects. Returns the final weights, the resumed run's result and the saved progress."""
    directory = tmp_path / "parts"
    loader = InterruptingLoader(train, batch_size=32, shuffle=True, seed=5, stop_at=stop_at)
    with pytest.raises(KeyboardInterrupt):
        fit(make_distiller(), loader, config(**overrides), checkpoint_dir=directory)
    saved = kdistill_meta(directory / "last.safetensors")["state"]["progress"]
    if damage is not None:
        damage(directory)

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
        assert a["lr"] == b["lr"]  # the schedule resumed where it was


def test_resume_in_the_middle_of_an_epoch_is_bit_exact(tmp_path, data):
    train, _ = data
    expected, _ = uninterrupted_run(tmp_path, train, checkpoint_every_steps=2)
    # 8 steps per epoch; mid-epoch checkpoints after steps 2, 4, 6; Ctrl-C before step 5 of
    # the second epoch, so the last checkpoint is (epoch index 1, step 4)
    got, _, saved = interrupted_then_resumed_run(
        tmp_path, train, stop_at=(1, 5), checkpoint_every_steps=2
    )
    assert (saved["epoch"], saved["step"]) == (1, 4)
    assert saved["steps_seen"] == 4 and saved["part_sums"]  # the partial epoch is saved
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


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_corrupt(
    tmp_path, data, caplog
):
    """Latest checkpoint (epoch index 1, step 4) corrupt: resume from the previous one (step 2)
    and still reproduce the uninterrupted run bit for bit."""
    train, _ = data
    expected, full = uninterrupted_run(tmp_path, train, checkpoint_every_steps=2)
    previous = {}

    def corrupt_latest(directory: Path) -> None:
        previous.update(kdistill_meta(directory / "last.prev.safetensors")["state"]["progress"])
        flip_payload_byte(directory / "last.safetensors")

    with caplog.at_level(logging.WARNING, logger="kdistill"):
        got, resumed, saved = interrupted_then_resumed_run(
            tmp_path, train, stop_at=(1, 5), damage=corrupt_latest, checkpoint_every_steps=2
        )
    assert (saved["epoch"], saved["step"]) == (1, 4)
    assert (previous["epoch"], previous["step"]) == (1, 2)
    assert "last.prev.safetensors" in caplog.text
    assert_bitwise_equal(got, expected)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(resumed.history, full.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), a["epoch"]
    # the finished run wrote good checkpoints over the damaged one
    _, state = load_checkpoint(tmp_path / "parts", "last")
    assert state["progress"]["epoch"] == 3


def test_resume_with_both_checkpoints_corrupt_raises(tmp_path, data):
    train, _ = data
    directory = tmp_path / "parts"
    loader = InterruptingLoader(train, batch_size=32, shuffle=True, seed=5, stop_at=(1, 5))
    with pytest.raises(KeyboardInterrupt):
        fit(make_distiller(), loader, config(checkpoint_every_steps=2), checkpoint_dir=directory)
    flip_payload_byte(directory / "last.safetensors")
    flip_payload_byte(directory / "last.prev.safetensors")
    loader = BatchLoader(train, batch_size=32, shuffle=True, seed=5)
    with pytest.raises(CheckpointError) as info:
        fit(make_distiller(), loader, config(), checkpoint_dir=directory, resume=True)
    message = str(info.value)
    assert "last.safetensors" in message and "last.prev.safetensors" in message


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
    cached = MemoryTeacherOutputs.of(cached, train)  # a bare tensor is refused (unchecked)
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


def test_metrics_log_does_not_repeat_an_epoch_line(tmp_path):
    # a resume after a kill between an epoch's metrics line and its checkpoint redoes that epoch
    log_path = tmp_path / "metrics.jsonl"
    MetricsLog(log_path).write({"model": "a", "epoch": 1, "train_loss": 0.5})
    again = MetricsLog(log_path)
    again.write({"model": "a", "epoch": 1, "train_loss": 0.5})
    again.write({"model": "a", "epoch": 2, "train_loss": 0.4})
    again.write({"model": "b", "epoch": 1, "train_loss": 0.9})
    lines = log_path.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 1]


def test_warmup_ramps_the_learning_rate_then_follows_the_schedule():
    from kdistill.engine.optim import lr_factor

    config = TrainConfig(epochs=1, schedule="constant", warmup_steps=4)
    assert [lr_factor(config, s, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = TrainConfig(epochs=1, schedule="cosine", warmup_steps=2)
    # step 1: ramp 1.0 times the cosine factor of step 1 of 10
    assert lr_factor(cosine, 1, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert lr_factor(cosine, 0, 10) == pytest.approx(0.5)


def test_max_steps_ends_training_after_that_many_optimiser_steps(tmp_path):
    # 10 samples, batch 2: 5 steps per epoch; 3 epochs but a budget of 7 steps → epoch 1 full,
    # epoch 2 stops after 2 steps, no third epoch; the cosine schedule spans the 7 steps
    torch.manual_seed(0)
    data = ArrayDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)), ["a", "b", "c"])
    loader = BatchLoader(data, batch_size=2, shuffle=True, seed=0)
    student = nn.Linear(4, 3)
    steps = []
    distiller = Distiller(None, student, [Term(CE())])
    optimizer_step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(self.param_groups[0]["lr"])
        return optimizer_step(self, *args, **kwargs)

    config = TrainConfig(
        epochs=3, batch_size=2, lr=0.1, schedule="cosine", max_steps=7, progress=False
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", counting_step)
        result = fit(distiller, loader, config, checkpoint_dir=tmp_path / "ck")
    assert len(steps) == 7
    assert [record["epoch"] for record in result.history] == [1, 2]
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 7)) for s in range(7)]
    assert steps == pytest.approx(expected)
    # a resume from the finished run trains nothing more
    again = fit(distiller, loader, config, checkpoint_dir=tmp_path / "ck", resume=True)
    assert len(steps) == 7 and len(again.history) == 2
