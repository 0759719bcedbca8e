"""Layer discovery: shapes and parameters of named modules, and proposed stage pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.cli import main
from kdistill.layers import describe_layers, embedding_layer, propose_pairs, stage_ends
from kdistill.models import create_model


def by_name(layers):
    return {layer.name: layer for layer in layers}


def test_shapes_and_parameters_of_a_hand_built_model():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(1, 3, kernel_size=3, padding=1))  # 3·1·9 + 3 = 30
    model.add_module("pool", nn.MaxPool2d(2))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(3 * 4 * 4, 5))  # 48·5 + 5 = 245
    layers = by_name(describe_layers(model, (1, 8, 8), batch_size=3))
    assert layers["conv"].output_shape == (3, 3, 8, 8)
    assert layers["pool"].output_shape == (3, 3, 4, 4)
    assert layers["flat"].output_shape == (3, 48)
    assert layers["fc"].output_shape == (3, 5)
    assert (layers["conv"].params, layers["pool"].params, layers["fc"].params) == (30, 0, 245)
    assert [layer.name for layer in describe_layers(model, (1, 8, 8))] == list(layers)


def test_containers_count_their_children_and_the_model_is_left_as_found():
    model = create_model("resnet8", width=4)
    model.train()
    layers = by_name(describe_layers(model, (1, 28, 28)))
    stage = dict(model.named_modules())["layer2"]
    assert layers["layer2"].params == sum(p.numel() for p in stage.parameters())
    assert layers["layer2"].output_shape == (2, 8, 14, 14)
    assert layers["layer2.0.conv1"].depth == 2
    assert model.training  # restored
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_a_module_called_twice_reports_its_last_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.shared(self.shared(x)[:, :4]))

    layers = describe_layers(Twice(), (4,))
    assert [layer.name for layer in layers] == ["shared", "head"]


def test_resnet_pairs_match_stages_by_spatial_size():
    teacher = describe_layers(create_model("resnet20"), (1, 28, 28))
    student = describe_layers(create_model("resnet8", width=8), (1, 28, 28))
    pairs = propose_pairs(teacher, student)
    assert [(p.student, p.teacher) for p in pairs] == [
        ("layer3", "layer3"),  # 7×7
        ("layer2", "layer2"),  # 14×14
        ("layer1", "layer1"),  # 28×28: the stage ends after layer1, not at the stem
        ("flatten", "flatten"),  # the embedding before fc
    ]
    assert pairs[0].student_shape == (2, 32, 7, 7) and pairs[0].teacher_shape == (2, 64, 7, 7)
    assert "connector" in pairs[0].reason


def test_classic_pairs_and_dropout_is_not_an_embedding():
    teacher = describe_layers(create_model("classic_teacher"), (1, 28, 28))
    student = describe_layers(create_model("middle_student"), (1, 28, 28))
    assert list(stage_ends(teacher)) == [(28, 28), (14, 14), (7, 7)]
    assert stage_ends(teacher)[(14, 14)].name == "relu2"
    assert embedding_layer(teacher).name == "relu3"  # not `dropout`, which follows it
    pairs = propose_pairs(teacher, student)
    assert [(p.student, p.teacher) for p in pairs][:3] == [
        ("pool2", "pool2"),
        ("relu2", "relu2"),
        ("relu1", "relu1"),
    ]


def test_no_pair_when_sizes_never_match():
    teacher = describe_layers(create_model("classic_teacher"), (1, 28, 28))
    student = describe_layers(create_model("mini_student"), (1, 28, 28))  # 4×4 only
    assert all("stage" not in p.reason for p in propose_pairs(teacher, student))


def test_cli_prints_both_models_and_the_pairs(capsys):
    argv = ["layers", "--teacher", "resnet20", "--student", "resnet8", "--input", "1,28,28"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "## teacher resnet20" in printed and "## student resnet8" in printed
    assert "| `layer3` | `layer3` | 64×7×7 | 64×7×7 | stage end at 7×7 (same channels) |" in printed
    assert main(["layers", "middle_student"]) == 0
    assert "| `conv1` | Conv2d | 4×28×28 | 40 |" in capsys.readouterr().out  # 1·4·9 + 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["layers", "resnet2O"], "unknown model 'resnet2O'"),
        (["layers", "resnet8", "--input", "1,28"], "three positive sizes"),
        (["layers", "--teacher", "resnet20"], "both --teacher and --student"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_input_is_zeros_of_the_given_shape():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x.clone()
            return x.flatten(1)

    describe_layers(nn.Sequential(Probe()), (2, 3, 5))
    assert torch.equal(seen["x"], torch.zeros(2, 2, 3, 5))
