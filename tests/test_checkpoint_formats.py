"""Teacher checkpoints as people save them: nested dicts, `module.` prefixes, safetensors."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdistill.engine.checkpoint import load_state_dict_file, load_weights
from kdistill.errors import CheckpointError
from kdistill.models import create_model
from kdistill.recipes import load_recipe


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def training_checkpoint(tmp_path, model: nn.Module):
    """What a typical training script saves: weights, optimiser state, epoch."""
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}
    torch.save(state, path)
    return path


def test_nested_state_dict_without_key_names_the_keys_and_the_fix(tmp_path):
    path = training_checkpoint(tmp_path, net())
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path, field="teacher.")
    assert (
        "the file holds a dict with keys ['epoch', 'model', 'optimizer'] and no tensors at the "
        "top level; set teacher.checkpoint_key: model" in str(info.value)
    )


def test_nested_state_dict_loads_with_the_key_and_without_trust(tmp_path):
    model = net()
    path = training_checkpoint(tmp_path, model)
    weights = load_state_dict_file(path, key="model")
    assert same_weights(weights, model.state_dict())


def test_wrong_key_lists_the_keys_found(tmp_path):
    path = training_checkpoint(tmp_path, net())
    with pytest.raises(CheckpointError, match=r"no key 'state_dict'; .*\['epoch', 'model'"):
        load_state_dict_file(path, key="state_dict", field="teacher.")


def test_module_prefix_is_named_in_the_mismatch_and_stripped_on_request(tmp_path):
    model = net()
    wrapped = nn.DataParallel(model)  # keys "module.0.weight", …
    path = tmp_path / "ddp.pt"
    torch.save(wrapped.state_dict(), path)
    fresh = net(seed=1)
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh, load_state_dict_file(path), "teacher", str(path), field="teacher.")
    assert "every name in the file starts with 'module.': set teacher.strip_prefix: 'module.'" in (
        str(info.value)
    )
    load_weights(fresh, load_state_dict_file(path, strip_prefix="module."), "teacher", str(path))
    assert same_weights(fresh.state_dict(), model.state_dict())


def test_prefix_that_some_names_lack_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"module.a": torch.zeros(1), "b": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"1 of 2 weight names do not start with it.*\['b'\]"):
        load_state_dict_file(path, strip_prefix="module.", field="teacher.")


def test_safetensors_with_prefix_and_with_a_key(tmp_path):
    model = net()
    path = tmp_path / "w.safetensors"
    save_file({f"model.{k}": v for k, v in model.state_dict().items()}, str(path))
    assert same_weights(load_state_dict_file(path, strip_prefix="model."), model.state_dict())
    with pytest.raises(CheckpointError, match="one flat map of tensors.*strip_prefix: 'model.'"):
        load_state_dict_file(path, key="model", field="teacher.")


def test_whole_model_under_a_key_still_needs_trust(tmp_path):
    model = net()
    path = tmp_path / "whole.pt"
    torch.save({"model": model, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_state_dict_file(path, key="model")
    assert same_weights(load_state_dict_file(path, trust=True, key="model"), model.state_dict())


def test_recipe_teacher_loads_a_nested_ddp_checkpoint(tmp_path):
    pytest.importorskip("sklearn")
    from kdistill.recipes.runner import Experiment

    teacher = create_model("resnet8", in_channels=1, num_classes=10, width=4)
    path = tmp_path / "teacher.pt"
    prefixed = {f"module.{k}": v for k, v in teacher.state_dict().items()}
    torch.save({"model": prefixed, "optimizer": {"state": {}, "param_groups": []}}, path)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        textwrap.dedent(
            f"""
            name: ckpt
            data: {{dataset: digits, val_size: 100, train_limit: 300, test_limit: 50}}
            teacher:
              model: resnet8
              kwargs: {{width: 4}}
              checkpoint: {path}
              checkpoint_key: model
              strip_prefix: "module."
            students: [{{name: s, model: resnet8}}]
            distill: {{teacher_cache: "off"}}
            cost: {{enabled: false}}
            """
        )
    )
    experiment = Experiment(load_recipe(recipe_path), tmp_path / "run", progress=False)
    loaded, record = experiment.prepare_teacher()
    assert same_weights(loaded.state_dict(), teacher.state_dict())
    assert record.method == "teacher"


def test_checkpoint_options_without_a_checkpoint_are_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: x\nteacher: {model: mini_student, checkpoint_key: model}\n"
        "students: [{name: s, model: mini_student}]\n"
    )
    with pytest.raises(ValueError, match="checkpoint_key applies to teacher.checkpoint"):
        load_recipe(path)


def test_tied_weights_are_written_once_and_load_back_tied(tmp_path):
    # a language model ties its output head to its token embedding: one Parameter, two names
    from kdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight
            self.other = torch.nn.Linear(3, 3)

    model = Tied()
    state = model.state_dict()
    state["view"] = model.other.weight[0]  # a partial view of shared memory: its own copy
    save_checkpoint(tmp_path, "m", state, {"label": "tied"})
    tensors, meta = load_checkpoint(tmp_path, "m")
    assert set(tensors) == set(state)
    assert torch.equal(tensors["head.weight"], model.embed.weight.detach())
    assert torch.equal(tensors["view"], model.other.weight[0].detach())
    fresh = Tied()
    fresh.load_state_dict({k: v for k, v in tensors.items() if k != "view"})
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.head.weight, model.embed.weight)
