"""kdistill.models: parameter counts from hand formulas, shapes, layer names, registry, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.models import (
    ClassicTeacher,
    MiddleStudent,
    MiniStudent,
    ResNet,
    count_parameters,
    create_model,
    list_models,
)

# Image classifiers: N×C×H×W in, N×K logits out.
CLASSIFIER_NAMES = [
    "classic_teacher",
    "middle_student",
    "mini_student",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
]
# Dense-prediction models (segmentation, detection, multi-task): tests/test_dense_models.py.
DENSE_NAMES = [
    "seg_teacher",
    "seg_student",
    "det_teacher",
    "det_student",
    "multitask_teacher",
    "multitask_student",
]
# Causal language models: tests/test_lm_models.py.
LM_NAMES = ["gpt2_lm", "llama_lm", "lm_teacher", "lm_student"]
ALL_NAMES = CLASSIFIER_NAMES + DENSE_NAMES + LM_NAMES


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    """Parameters of a k×k conv: weights c_in·c_out·k² (+ c_out biases)."""
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running stats are buffers, not parameters


# --- parameter counts ------------------------------------------------------------------------


def test_classic_teacher_parameter_count_from_formula():
    # 28×28 → pool → 14×14 → pool → 7×7, so fc1 sees 128·7·7 = 6,272 features.
    #   conv1 1·64·9 + 64        =       640
    #   conv2 64·128·9 + 128     =    73,856
    #   fc1   6,272·1024 + 1024  = 6,423,552
    #   fc2   1024·10 + 10       =    10,250
    #   total                    = 6,508,298
    expected = conv(1, 64, 3) + conv(64, 128, 3) + linear(128 * 7 * 7, 1024) + linear(1024, 10)
    assert expected == 6_508_298
    assert count_parameters(ClassicTeacher()) == expected


def test_mini_student_parameter_count_is_220():
    # conv 1·1·49 + 1 = 50; 28/7 = 4, so fc sees 16 features: 16·10 + 10 = 170; 50 + 170 = 220.
    assert conv(1, 1, 7) + linear(16, 10) == 220
    assert count_parameters(MiniStudent()) == 220


def test_middle_student_parameter_count_is_4266():
    # conv1 1·4·9 + 4 = 40; conv2 4·8·9 + 8 = 296; fc 8·7·7·10 + 10 = 3,930; total 4,266.
    assert conv(1, 4, 3) + conv(4, 8, 3) + linear(8 * 7 * 7, 10) == 4266
    assert count_parameters(MiddleStudent()) == 4266
    # wider channels: conv1 1·8·9 + 8 = 80; conv2 8·16·9 + 16 = 1,168; fc 784·10 + 10 = 7,850.
    assert count_parameters(MiddleStudent(channels=(8, 16))) == 80 + 1168 + 7850


def test_resnet8_parameter_count_from_layer_list():
    # Convs have no bias (BN follows). Width 16, one block per stage, 1 input channel.
    stem = conv(1, 16, 3, bias=False) + bn(16)  # 144 + 32 = 176
    layer1 = 2 * (conv(16, 16, 3, bias=False) + bn(16))  # identity shortcut: 4,672
    layer2 = (
        conv(16, 32, 3, bias=False)  # 4,608
        + bn(32)
        + conv(32, 32, 3, bias=False)  # 9,216
        + bn(32)
        + conv(16, 32, 1, bias=False)  # 1×1 projection shortcut: 512
        + bn(32)
    )  # 14,528
    layer3 = (
        conv(32, 64, 3, bias=False)  # 18,432
        + bn(64)
        + conv(64, 64, 3, bias=False)  # 36,864
        + bn(64)
        + conv(32, 64, 1, bias=False)  # 2,048
        + bn(64)
    )  # 57,728
    fc = linear(64, 10)  # 650
    expected = stem + layer1 + layer2 + layer3 + fc
    assert expected == 77_754
    assert count_parameters(create_model("resnet8")) == expected


def test_deeper_resnets_add_identity_blocks():
    # Each extra block in stage i (width w_i) adds 2 convs + 2 BNs: 2·(9·w_i² + 2·w_i).
    def extra_block(w: int) -> int:
        return 2 * (conv(w, w, 3, bias=False) + bn(w))

    per_extra_n = extra_block(16) + extra_block(32) + extra_block(64)  # 4,672 + 18,560 + 73,984
    base = 77_754
    for name, n in (("resnet14", 2), ("resnet20", 3), ("resnet32", 5)):
        assert count_parameters(create_model(name)) == base + (n - 1) * per_extra_n


def test_count_parameters_trainable_only():
    model = MiniStudent()
    model.conv.requires_grad_(False)
    assert count_parameters(model) == 220
    assert count_parameters(model, trainable_only=True) == 170


# --- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSIFIER_NAMES)
def test_output_shape_28x28(name):
    model = create_model(name, num_classes=7).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)


@pytest.mark.parametrize("name", ["classic_teacher", "middle_student", "resnet8", "resnet20"])
def test_output_shape_8x8_three_channels(name):
    kwargs = {} if name.startswith("resnet") else {"image_size": 8}
    model = create_model(name, in_channels=3, num_classes=5, **kwargs).eval()
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 5)


def test_mini_student_other_multiples_of_seven():
    assert MiniStudent(image_size=14)(torch.randn(3, 1, 14, 14)).shape == (3, 10)
    assert count_parameters(MiniStudent(image_size=14)) == 50 + linear(4, 10)


def test_mini_student_rejects_size_not_divisible_by_7():
    with pytest.raises(ValueError, match="divisible by 7"):
        MiniStudent(image_size=30)


def test_mini_student_is_affine():
    # No nonlinearity: f(a) - f(0) + f(b) - f(0) == f(a + b) - f(0).
    model = MiniStudent().eval()
    a, b, zero = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28), torch.zeros(2, 1, 28, 28)
    f0 = model(zero)
    torch.testing.assert_close(model(a + b) - f0, (model(a) - f0) + (model(b) - f0))


def test_wrong_input_size_names_expected_shape():
    with pytest.raises(ValueError, match=r"N×1×28×28.*\(2, 1, 32, 32\)"):
        ClassicTeacher()(torch.randn(2, 1, 32, 32))


def test_resnet_rejects_depth_not_6n_plus_2():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet(depth=10)


# --- layer names -----------------------------------------------------------------------------


def test_classic_named_modules():
    teacher = dict(ClassicTeacher().named_modules())
    for name in ("conv1", "relu1", "pool1", "conv2", "pool2", "flatten", "fc1", "dropout", "fc2"):
        assert name in teacher
    assert isinstance(teacher["conv1"], nn.Conv2d) and isinstance(teacher["fc2"], nn.Linear)
    assert {"conv", "flatten", "fc"} <= set(dict(MiniStudent().named_modules()))
    assert {"conv1", "conv2", "pool2", "fc"} <= set(dict(MiddleStudent().named_modules()))


def test_resnet_named_modules():
    modules = dict(create_model("resnet20").named_modules())
    for name in (
        "stem.conv",
        "layer1",
        "layer2",
        "layer3",
        "layer2.0.conv1",
        "layer2.0.bn1",
        "layer2.0.conv2",
        "layer2.0.bn2",
        "layer2.0.shortcut",
        "layer3.2.conv2",
        "fc",
    ):
        assert name in modules, name
    assert "layer3.3" not in modules  # resnet20 has 3 blocks per stage
    assert isinstance(modules["layer2.0.shortcut"], nn.Sequential)  # stride 2, 16 → 32
    assert isinstance(modules["layer2.1.shortcut"], nn.Identity)
    assert isinstance(modules["layer1.0.shortcut"], nn.Identity)


def test_resnet_stage_output_shapes():
    model = create_model("resnet8", width=8).eval()
    seen = {}
    hooks = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda _m, _i, out, n=n: seen.__setitem__(n, tuple(out.shape))
        )
        for n in ("layer1", "layer2", "layer3", "flatten")
    ]
    model(torch.randn(3, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    assert seen == {
        "layer1": (3, 8, 28, 28),
        "layer2": (3, 16, 14, 14),
        "layer3": (3, 32, 7, 7),
        "flatten": (3, 32),
    }


@pytest.mark.parametrize("name", ["classic_teacher", "middle_student", "resnet8"])
def test_hook_on_conv_sees_pre_activation(name):
    # ReLUs must not be in-place, or a tap on a conv would see its output clipped at zero.
    model = create_model(name).eval()
    layer = "stem.conv" if name.startswith("resnet") else "conv1"
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    model(torch.randn(3, 1, 28, 28))
    handle.remove()
    assert (captured[0] < 0).any()


# --- registry --------------------------------------------------------------------------------


def test_list_models():
    assert list_models() == sorted(ALL_NAMES)


def test_unknown_model_suggests_close_names():
    with pytest.raises(KeyError) as info:
        create_model("resnet2")
    message = str(info.value)
    assert "resnet2" in message and ("resnet20" in message or "resnet8" in message)


def test_create_model_passes_keyword_arguments():
    model = create_model("resnet14", width=8, in_channels=3, num_classes=100)
    assert model.fc.out_features == 100 and model.stem.conv.in_channels == 3
    assert model.layer3[0].conv2.out_channels == 32


def test_resnet_convs_use_kaiming_fan_out_init():
    # Kaiming normal, fan-out mode: std = sqrt(2 / (c_out·k²)); layer3 convs have 64·9 fan-out.
    torch.manual_seed(0)
    weight = create_model("resnet32").layer3[1].conv1.weight
    assert weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)


# --- training sanity -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["middle_student", "resnet8"])
def test_can_overfit_one_small_batch(name):
    torch.manual_seed(0)
    model = create_model(name)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses
