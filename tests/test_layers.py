"""Layer discovery: shapes and parameters of named modules, and proposed stage pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.cli import main
from kdistill.distill.layers import describe_layers, embedding_layer, propose_pairs, stage_ends
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
        (["layers", "resnet8", "--input", "1,x"], "expected sizes like 1,28,28"),
        (["layers", "resnet8", "--input", "1,28"], "cannot run on zeros of shape (2, 1, 28)"),
        (["layers", "resnet8", "--kwargs", "{widht: 4}"], "unexpected keyword 'widht'"),
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


def test_stages_inside_blocks_are_paired_at_every_shared_size():
    # each model wraps its conv blocks in one `features` Sequential: before, only the frontier
    # (features, pool, head) was searched, so the teacher (3×3) and student (7×7) shared nothing
    from kdistill.examples.my_models import TinyCNN, WideCNN

    teacher = describe_layers(WideCNN(channels=1, classes=10, width=8), (1, 28, 28))
    student = describe_layers(TinyCNN(channels=1, classes=10, width=4), (1, 28, 28))
    pairs = [(p.student, p.teacher, p.reason) for p in propose_pairs(teacher, student)]
    # by hand: a block is conv, bn, relu (same size), max-pool (half). The last module at each
    # size: teacher 28 features.0.2, 14 features.1.2, 7 features.2.2, 3 features; student
    # 28 features.0.2, 14 features.1.2, 7 features (its last block pools to 7×7)
    assert pairs[:3] == [
        ("features", "features.2.2", "stage end at 7×7 (connector)"),
        ("features.1.2", "features.1.2", "stage end at 14×14 (connector)"),
        ("features.0.2", "features.0.2", "stage end at 28×28 (connector)"),
    ]
    assert not any("3×3" in reason for _, _, reason in pairs)  # the teacher's alone


TOKEN_MODEL = """
from torch import nn

class TokenNet(nn.Module):
    def __init__(self, vocab, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.out(self.mix(self.embed(ids)))
"""


def test_cli_takes_import_path_specs_and_token_ids(tmp_path, monkeypatch, capsys):
    (tmp_path / "h4_token_models.py").write_text(TOKEN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["layers", "h4_token_models:TokenNet", "--kwargs", "{vocab: 11}"]
    assert main([*argv, "--input", "16", "--dtype", "long", "--batch", "3"]) == 0
    printed = capsys.readouterr().out
    assert "input 3×16 int64" in printed
    assert "| `embed` | Embedding | 16×8 | 88 |" in printed  # 11·8
    assert "| `out` | Linear | 16×11 | 99 |" in printed  # 8·11 + 11
    assert main([*argv, "--input", "16"]) == 2  # float zeros are not token ids
    assert "dtype torch.float32" in capsys.readouterr().err


def test_token_ids_of_the_given_dtype_reach_the_model():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x.clone()
            return x

    describe_layers(nn.Sequential(Probe()), (5,), batch_size=3, dtype=torch.long)
    assert seen["x"].dtype == torch.long and seen["x"].shape == (3, 5)


def test_layers_that_return_tuples_or_dicts_show_what_they_hold():
    from torch import nn

    from kdistill.distill.layers import describe_layers, layers_table

    class Pair(nn.Module):
        def forward(self, x):
            return x.flatten(1), x.mean(dim=(2, 3))

    class Keyed(nn.Module):
        def forward(self, x):
            return {"logits": x.flatten(1)[:, :3]}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.keyed = Pair(), Keyed()

        def forward(self, x):
            flat, _ = self.pair(x)
            return self.keyed(x)["logits"] + flat[:, :3]

    layers = {layer.name: layer for layer in describe_layers(Net(), (2, 3, 4))}
    # x is 2×3×4 per sample: flatten → 24, mean over H, W → 2; the dict holds 3 logits
    assert layers["pair"].output_shape is None and layers["pair"].structure == "(24, 2)"
    assert layers["keyed"].structure == "{logits: 3}"
    table = layers_table(list(layers.values()), "net")
    assert "| (24, 2) |" in table and "{logits: 3}" in table
