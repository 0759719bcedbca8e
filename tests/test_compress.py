"""Pruning (magnitude, channel), int8 quantization, and the `kdistill compress` pipeline."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.cli import main
from kdistill.compress import (
    ChannelGroup,
    UnsupportedModelError,
    apply_masks,
    channel_groups,
    magnitude_masks,
    magnitude_prune,
    make_permanent,
    prune_channels,
    quantize_dynamic_linear,
    quantize_static,
    sparsity,
)
from kdistill.models import count_parameters, create_model


# -- magnitude pruning ---------------------------------------------------------------------------
def test_magnitude_pruning_per_layer_zeroes_exactly_the_smallest_fraction():
    layer = nn.Linear(4, 2, bias=False)
    values = torch.tensor([[0.5, -0.1, 0.8, -0.3], [0.2, -0.7, 0.05, 0.6]])
    with torch.no_grad():
        layer.weight.copy_(values)
    model = nn.Sequential(layer)
    magnitude_prune(model, 0.5, scope="layer")
    # |w| sorted: .05 .1 .2 .3 | .5 .6 .7 .8 — the four smallest go
    expected = torch.tensor([[0.5, 0.0, 0.8, 0.0], [0.0, -0.7, 0.0, 0.6]])
    assert torch.equal(layer.weight.detach(), expected)


def test_global_magnitude_pruning_ranks_all_layers_together():
    small, large = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        small.weight.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
        large.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 0.25]]))
    model = nn.Sequential(small, large)
    masks = magnitude_masks(model, 0.5, scope="global")
    # the 4 smallest of all 8 are 0.1, 0.2, 0.25, 0.3: three in `small`, one in `large`
    assert masks["0"].tolist() == [[0, 0], [0, 1]]
    assert masks["1"].tolist() == [[1, 1], [1, 0]]
    per_layer = magnitude_masks(model, 0.5, scope="layer")
    assert per_layer["0"].sum() == 2 and per_layer["1"].sum() == 2


def test_masks_survive_training_until_made_permanent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = magnitude_masks(model, 0.6)
    apply_masks(model, masks, permanent=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 8)).pow(2).sum().backward()
        optimizer.step()
    make_permanent(model)
    assert not any("weight_orig" in key for key in model.state_dict())
    zeroed = sum(int((1 - m).sum()) for m in masks.values())
    assert zeroed == round(0.6 * (64 + 24))
    assert sparsity(model) == pytest.approx(zeroed / 88)
    for name, mask in masks.items():
        assert torch.all(model.get_submodule(name).weight[mask == 0] == 0)


def test_magnitude_amount_is_validated():
    with pytest.raises(ValueError, match=r"amount must lie in \[0, 1\), got 1.2"):
        magnitude_masks(nn.Linear(2, 2), 1.2)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(nn.Linear(2, 2), 0.5, scope="rows")


# -- channel pruning -----------------------------------------------------------------------------
def test_channel_pruning_middle_student_parameter_count_by_hand():
    pruned = prune_channels(create_model("middle_student"), 0.5)
    # conv1 1→2: 2·9 + 2 = 20; conv2 2→4: 4·2·9 + 4 = 76; fc (4·7·7 = 196) → 10: 1970
    assert count_parameters(pruned) == 20 + 76 + 1970 == 2066
    assert pruned(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_removing_all_zero_channels_keeps_every_output():
    torch.manual_seed(0)
    model = create_model("middle_student").eval()
    with torch.no_grad():  # conv1 channels 1, 3 and conv2 channels 0, 5, 6, 7 output zero
        model.conv1.weight[[1, 3]] = 0
        model.conv1.bias[[1, 3]] = 0
        model.conv2.weight[[0, 5, 6, 7]] = 0
        model.conv2.bias[[0, 5, 6, 7]] = 0
    pruned = prune_channels(copy.deepcopy(model), 0.5).eval()
    assert pruned.conv1.out_channels == 2 and pruned.conv2.out_channels == 4
    # kept channels keep their weights: conv1 keeps 0, 2; conv2 keeps 1–4 (inputs 0, 2)
    assert torch.equal(pruned.conv1.weight, model.conv1.weight[[0, 2]])
    assert torch.equal(pruned.conv2.weight, model.conv2.weight[[1, 2, 3, 4]][:, [0, 2]])
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-6)


def test_classic_teacher_pruning_by_hand():
    model = create_model("classic_teacher", image_size=8, hidden=32)
    pruned = prune_channels(copy.deepcopy(model), 0.75)
    # conv1 1→16: 144 + 16; conv2 16→32: 4608 + 32; fc1 32·2·2 = 128 → 8: 1024 + 8; fc2 8 → 10
    assert count_parameters(pruned) == 160 + 4640 + 1032 + 90
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_resnet_block_pruning_keeps_outputs_when_removed_channels_are_zero():
    torch.manual_seed(0)
    model = create_model("resnet8", width=4).eval()
    drop = {}
    with torch.no_grad():
        for name in ("layer1.0", "layer2.0", "layer3.0"):
            block = model.get_submodule(name)
            channels = block.conv1.out_channels
            drop[name] = list(range(0, channels, 2))  # every other channel
            block.conv1.weight[drop[name]] = 0
            block.bn1.bias[drop[name]] = 0  # bn(0) = β − γ·μ/σ = 0 with β = μ = 0
            block.bn1.running_mean[drop[name]] = 0
            block.bn1.weight.uniform_(0.5, 1.5)
            block.bn1.running_var.uniform_(0.5, 2.0)
    pruned = prune_channels(copy.deepcopy(model), 0.5).eval()
    assert [g.producer for g in channel_groups(model)] == [
        "layer1.0.conv1",
        "layer2.0.conv1",
        "layer3.0.conv1",
    ]
    assert pruned.layer2[0].conv1.out_channels == 4 and pruned.layer2[0].bn1.num_features == 4
    assert pruned.layer2[0].conv2.in_channels == 4 and pruned.layer2[0].conv2.out_channels == 8
    # removed: half of each block's conv1 (4·1·9 → 2, 8·4·9 …) and of its BN and conv2 inputs
    removed = sum(
        c * (i * 9 + 2 + o * 9) for c, i, o in ((2, 4, 4), (4, 4, 8), (8, 8, 16))
    )  # per removed channel: its conv1 filter, BN γ and β, and its column of conv2
    assert count_parameters(model) - count_parameters(pruned) == removed
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)


def test_unknown_graphs_and_mismatched_groups_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="Sequential.*ChannelGroup"):
        prune_channels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)), 0.5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(6, 4, 3))
    with pytest.raises(ValueError, match="1 takes 6 inputs but 0 gives 4 channels"):
        prune_channels(model, 0.5, groups=[ChannelGroup("0", ["1"])])
    with pytest.raises(ValueError, match=r"producer\(s\) \['conv9'\]"):
        prune_channels(create_model("middle_student"), 0.5, only=["conv9"])


def test_explicit_groups_prune_a_user_model():
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    pruned = prune_channels(model, 0.5, groups=[ChannelGroup("0", ["2"])])
    assert pruned[0].out_channels == 3 and pruned[2].in_channels == 3


# -- quantization --------------------------------------------------------------------------------
def _relative_error(reference: torch.Tensor, got: torch.Tensor) -> float:
    return ((reference - got).abs().max() / reference.abs().max()).item()


def test_dynamic_int8_agrees_with_float_within_tolerance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    quantized = quantize_dynamic_linear(model)
    assert isinstance(quantized[0], torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(model[0], nn.Linear)  # the float model is left alone
    x = torch.randn(64, 32)
    # int8 weights: each product errs by ≤ half a quantization step; 3 % of the range is ample
    assert _relative_error(model(x), quantized(x)) < 0.03


@pytest.mark.parametrize("name", ["middle_student", "resnet8"])
def test_static_int8_agrees_with_float_within_tolerance(name):
    torch.manual_seed(0)
    kwargs = {"width": 4} if name == "resnet8" else {}
    model = create_model(name, **kwargs).eval()
    calibration = [torch.randn(32, 1, 28, 28) for _ in range(4)]
    quantized = quantize_static(model, calibration, calibration[0][:1])
    kinds = {m._get_name() for m in quantized.modules()}  # e.g. QuantizedConvReLU2d
    assert any(k.startswith("QuantizedConv") for k in kinds), kinds
    assert "DynamicQuantizedLinear" in kinds
    x = calibration[0]
    assert _relative_error(model(x), quantized(x)) < 0.1


# -- the pipeline, end to end on scikit-learn's digits -------------------------------------------
def test_compress_command_on_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    recipe = tmp_path / "compress.yaml"
    recipe.write_text(
        textwrap.dedent(
            """
            name: digits_compress
            data: {dataset: digits, val_size: 200}
            teacher:
              model: classic_teacher
              kwargs: {hidden: 64}
              train: {epochs: 2, lr: 0.003, batch_size: 64, progress: false}
            students: [{name: middle, model: middle_student}]
            train: {epochs: 1, lr: 0.01, batch_size: 64, progress: false}
            tune: {enabled: false}
            cost: {repeats: 1, warmup: 0, batch_sizes: [1, 8]}
            compress:
              channels: 0.75
              magnitude: 0.5
              finetune: {epochs: 1, lr: 0.003, batch_size: 64, progress: false}
              calibration_batches: 2
              export: [torchscript]
            """
        )
    )
    out = tmp_path / "run"
    assert main(["compress", str(recipe), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    names = [stage["name"] for stage in results["stages"]]
    assert names == [
        "teacher",
        "middle alone",
        "middle kd",
        "pruned",
        "pruned + fine-tuned",
        "pruned + distilled",
        "int8 dynamic",
        "int8",
    ]
    stages = {stage["name"]: stage for stage in results["stages"]}
    teacher, pruned = stages["teacher"], stages["pruned + distilled"]
    # classic teacher at 8×8, hidden 64: channels 64→16, 128→32, 64→16 hidden units
    assert pruned["params"] == (16 * 9 + 16) + (32 * 16 * 9 + 32) + (128 * 16 + 16) + (16 * 10 + 10)
    assert pruned["params"] < teacher["params"] / 10
    # half the conv/linear weights were zeroed and stayed zero through distillation
    weights = 16 * 9 + 32 * 16 * 9 + 128 * 16 + 16 * 10
    assert pruned["nonzero"] <= pruned["params"] - round(0.5 * weights)
    # the control row: the same pruned model and masks, retrained with the hard loss alone
    control = stages["pruned + fine-tuned"]
    assert control["params"] == pruned["params"]
    assert control["nonzero"] <= control["params"] - round(0.5 * weights)
    assert stages["int8"]["cost"]["size_bytes"] < pruned["cost"]["size_bytes"] / 2.5
    assert stages["int8"]["params"] == pruned["params"]
    exports = {Path(e["path"]).name: e for e in results["exports"]}
    assert set(exports) == {"student.pt", "student_int8.pt"}
    assert all(e["max_abs_diff"] <= 1e-4 for e in exports.values())
    report = (out / "report.md").read_text()
    assert "pruned + distilled" in report and "latency b1" in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and "pruned + distilled" in html
    assert 'src="http' not in html and "data:image/png;base64," in html
    assert "pruned + distilled" in printed


def test_builtin_compress_recipe_validates_and_a_recipe_without_the_section_is_refused(capsys):
    from kdistill.cli import resolve_recipe
    from kdistill.recipes import load_recipe

    recipe = load_recipe(resolve_recipe("fashion_mnist_compress"))
    assert recipe.compress is not None and recipe.compress.channels == 0.75
    assert main(["compress", "fashion_mnist", "--quiet"]) == 2
    assert "has no compress: section" in capsys.readouterr().err


def test_compress_method_must_exist(tmp_path):
    from kdistill.errors import ConfigError
    from kdistill.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: x\nteacher: {model: middle_student}\nstudents: [{name: m, model: mini_student}]\n"
        "compress: {method: fitnet}\n"
    )
    with pytest.raises(ConfigError, match="compress.method: 'fitnet' is not a method"):
        load_recipe(path)
