"""Whole-model checkpoints (a pruned student saved with `torch.save(model)`) and the safe loading
of teacher weights: state dicts and safetensors load without trust, a pickled whole model only
with `trust=True` (the CLI's `--trust-checkpoint`)."""

from __future__ import annotations

import copy
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdistill.compress import ChannelGroup, prune_channels
from kdistill.engine.checkpoint import (
    load_state_dict_file,
    load_weights,
    load_whole_model,
    save_whole_model,
)
from kdistill.errors import CheckpointError


def odd_net(seed: int = 0) -> nn.Sequential:
    """Conv 3→7 → BN → ReLU → conv 7→5 → pool → linear 5→3, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 7, 3, padding=1),
        nn.BatchNorm2d(7),
        nn.ReLU(),
        nn.Conv2d(7, 5, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    return model.eval()


def pruned_net() -> nn.Sequential:
    """`odd_net` with 3 of conv 0's 7 output channels (and conv 3's inputs, BN 1) removed."""
    return prune_channels(odd_net(), 3 / 7, groups=[ChannelGroup("0", ["3"], norms=["1"])])


def fixed_inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randn(4, 3, 9, 9, generator=generator)


class Detonator:
    """Unpickling this creates a folder: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- save_whole_model / load_whole_model ---------------------------------------------------------
def test_pruned_model_round_trips_with_trust(tmp_path):
    model = pruned_net()
    assert model[0].out_channels == 4 and model[1].num_features == 4 and model[3].in_channels == 4
    # the sliced layers keep the eval mode of the layers they replace (BN uses running stats)
    assert [name for name, module in model.named_modules() if module.training] == []
    x = fixed_inputs()
    expected = model(x)

    path = save_whole_model(model, tmp_path / "student.pt")
    assert path == tmp_path / "student.pt" and path.stat().st_size > 0
    loaded = load_whole_model(path, trust=True)

    assert isinstance(loaded, nn.Sequential) and loaded is not model
    assert loaded[0].out_channels == 4 and loaded[1].num_features == 4
    assert loaded[3].in_channels == 4 and loaded[3].out_channels == 5
    assert not any(m.training for m in loaded.modules())  # saved in eval mode, stays so
    assert torch.equal(loaded[1].running_mean, model[1].running_mean)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded(x), expected)
    # and the point of it: the weights alone do not fit the architecture the code builds
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(odd_net(), loaded.state_dict(), "student", str(path))


def test_whole_model_without_trust_is_refused_and_not_unpickled(tmp_path):
    marker = tmp_path / "was-unpickled"
    model = pruned_net()
    model.payload = Detonator(marker)
    path = save_whole_model(model, tmp_path / "student.pt")

    with pytest.raises(CheckpointError) as info:
        load_whole_model(path)
    message = str(info.value)
    assert str(path) in message
    assert "pickled whole model" in message and "runs code" in message
    assert "--trust-checkpoint" in message and "trust=True" in message
    assert not marker.exists()

    # trust really unpickles (and so runs the file's code): that is what the flag vouches for
    load_whole_model(path, trust=True)
    assert marker.is_dir()


def test_load_whole_model_checks_what_the_file_holds(tmp_path):
    state = tmp_path / "state.pt"
    torch.save(odd_net().state_dict(), state)
    with pytest.raises(CheckpointError, match="holds a state dict, not a whole model"):
        load_whole_model(state)
    with pytest.raises(CheckpointError, match="got OrderedDict; for a state dict"):
        load_whole_model(state, trust=True)

    other = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], other)
    with pytest.raises(CheckpointError, match="holds a list, not a whole model"):
        load_whole_model(other)
    with pytest.raises(CheckpointError, match=r"expected a whole model .* got list"):
        load_whole_model(other, trust=True)

    weights = tmp_path / "w.safetensors"
    save_file(odd_net().state_dict(), str(weights))
    with pytest.raises(CheckpointError, match="only tensors"):
        load_whole_model(weights, trust=True)


@pytest.mark.parametrize("trust", [False, True], ids=["untrusted", "trusted"])
def test_missing_and_truncated_model_files_name_the_path(tmp_path, trust):
    with pytest.raises(CheckpointError, match="no such model file") as info:
        load_whole_model(tmp_path / "missing.pt", trust=trust)
    assert "missing.pt" in str(info.value)

    path = save_whole_model(pruned_net(), tmp_path / "student.pt")
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 10, 20):
        broken = tmp_path / f"broken{keep}.pt"
        broken.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="corrupted") as info:
            load_whole_model(broken, trust=trust)
        assert str(broken) in str(info.value)


def test_class_that_cannot_be_imported_is_explained(tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    (source / "kd_tmp_arch.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Odd(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(3, 5)

                def forward(self, x):
                    return self.fc(x)
            """
        )
    )
    monkeypatch.syspath_prepend(str(source))
    import kd_tmp_arch

    path = save_whole_model(kd_tmp_arch.Odd(), tmp_path / "odd.pt")
    monkeypatch.delitem(sys.modules, "kd_tmp_arch")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(source)])
    with pytest.raises(CheckpointError, match="cannot be imported") as info:
        load_whole_model(path, trust=True)
    assert "kd_tmp_arch" in str(info.value) and str(path) in str(info.value)


# -- atomic writes -------------------------------------------------------------------------------
def test_atomic_write_leaves_only_the_file_and_replaces_it(tmp_path):
    folder = tmp_path / "models"
    first = pruned_net()
    path = save_whole_model(first, folder / "student.pt")  # creates the folder
    assert sorted(p.name for p in folder.iterdir()) == ["student.pt"]

    second = odd_net(seed=1)
    save_whole_model(second, path)
    assert sorted(p.name for p in folder.iterdir()) == ["student.pt"]
    x = fixed_inputs()
    assert torch.equal(load_whole_model(path, trust=True)(x), second(x))


def test_failed_save_keeps_the_old_file_and_no_temp_file(tmp_path):
    model = pruned_net()
    path = save_whole_model(model, tmp_path / "student.pt")
    before = path.read_bytes()

    unpicklable = odd_net(seed=2)
    unpicklable.register_forward_hook(lambda module, args, output: output)
    with pytest.raises(CheckpointError, match="cannot pickle Sequential") as info:
        save_whole_model(unpicklable, path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]
    x = fixed_inputs()
    assert torch.equal(load_whole_model(path, trust=True)(x), model(x))

    with pytest.raises(TypeError, match="nn.Module"):
        save_whole_model(model.state_dict(), tmp_path / "sd.pt")
    assert not (tmp_path / "sd.pt").exists() and leftovers(tmp_path) == []


# -- teachers from state dicts: safe, no trust needed --------------------------------------------
@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_teacher_from_state_dict_loads_without_trust(tmp_path, kind):
    teacher = odd_net(seed=3)
    path = tmp_path / f"teacher.{kind}"
    if kind == "pt":
        torch.save(teacher.state_dict(), path)
    else:
        save_file(teacher.state_dict(), str(path))

    weights = load_state_dict_file(path, trust=False)
    fresh = odd_net(seed=4)
    x = fixed_inputs()
    assert not torch.equal(fresh(x), teacher(x))
    load_weights(fresh, weights, "teacher", str(path))
    assert torch.equal(fresh(x), teacher(x))
    assert torch.equal(fresh[1].running_var, teacher[1].running_var)


def test_state_dict_loader_given_a_whole_model(tmp_path):
    model = pruned_net()
    path = save_whole_model(model, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)

    weights = load_state_dict_file(path, trust=True)
    assert set(weights) == set(model.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    shell = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in shell.parameters():
            parameter.zero_()
    load_weights(shell, weights, "teacher", str(path))
    x = fixed_inputs()
    assert torch.equal(shell(x), model(x))


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_truncated_state_dict_names_the_path(tmp_path, kind):
    path = tmp_path / f"teacher.{kind}"
    if kind == "pt":
        torch.save(odd_net().state_dict(), path)
    else:
        save_file(odd_net().state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for trust in (False, True):
        with pytest.raises(CheckpointError) as info:
            load_state_dict_file(path, trust=trust)
        assert str(path) in str(info.value)


# -- kdistill compress saves the pruned student as a whole model too -----------------------------
def test_compress_saves_the_pruned_student_as_a_whole_model(tmp_path, monkeypatch):
    from kdistill.compress.pipeline import CompressionRun

    student = pruned_net()
    run = CompressionRun.__new__(CompressionRun)  # only the saving step, no training
    run.out_dir = tmp_path
    run.method = "kd"
    monkeypatch.setattr(run, "retrain_pruned", lambda pruned, masks, method: student)
    assert run.distill_pruned(student, None) is student

    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        "pruned_distilled.pt",
        "pruned_distilled.safetensors",
    ]
    loaded = load_whole_model(models / "pruned_distilled.pt", trust=True)
    x = fixed_inputs()
    assert torch.equal(loaded(x), student(x))
    weights = load_state_dict_file(models / "pruned_distilled.safetensors")
    for k, v in student.state_dict().items():
        assert torch.equal(weights[k], v), (k, weights[k], v)
