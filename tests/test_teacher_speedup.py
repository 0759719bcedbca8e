"""The fast frozen teacher (`kdistill.teacher_speedup`): folding is the BatchNorm formula, the
sped-up teacher computes what the eager one does (outputs and taps), a drifting step is refused
with its figure, and neither the user's teacher nor the student is ever changed."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

import kdistill as kd
from kdistill import losses as L
from kdistill.distill.teacher import speedup as ts
from kdistill.distill.teacher.speedup import (
    FastTeacher,
    find_fold_pairs,
    fold_batchnorms,
    fold_into,
    parse_speedup,
    resolve_steps,
)
from kdistill.errors import ConfigError, TeacherSpeedupError
from kdistill.models import create_model
from kdistill.models.specs import model_from_spec


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so that a wrong fold
    shows (a fresh BatchNorm is almost the identity in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.5, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5, generator=g)
                module.bias.data.normal_(0, 0.3, generator=g)
    return model.eval()


def resnet_teacher() -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorms(create_model("resnet20", in_channels=1, num_classes=10, width=4))


def batchnorm_by_hand(x, bn) -> torch.Tensor:
    """(x − μ) / √(σ² + ε) · γ + β over dim 1: BatchNorm's eval-mode definition."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    gamma = bn.weight.view(shape) if bn.affine else 1.0
    beta = bn.bias.view(shape) if bn.affine else 0.0
    return (x - mean) / torch.sqrt(var + bn.eps) * gamma + beta


# -- the fold itself ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer, bn, shape",
    [
        (nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), (4, 3, 7, 7)),
        (nn.Conv2d(4, 6, 3, groups=2, bias=True), nn.BatchNorm2d(6, eps=1e-3), (2, 4, 6, 6)),
        (nn.Conv1d(3, 4, 5), nn.BatchNorm1d(4, affine=False), (2, 3, 9)),
        (nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), (2, 2, 3, 4, 4)),
        (nn.Linear(6, 4), nn.BatchNorm1d(4), (5, 6)),
    ],
)
def test_fold_matches_batchnorm_formula(layer, bn, shape):
    layer, bn = layer.double(), randomise_batchnorms(bn.double())
    x = torch.randn(*shape, dtype=torch.float64)
    expected = batchnorm_by_hand(layer(x), bn)  # the formula, not the module under test
    fold_into(layer, bn)
    assert torch.allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_fold_pairs_of_a_resnet_and_what_taps_keep():
    teacher = resnet_teacher()
    pairs, kept = find_fold_pairs(teacher, keep=[])
    # stem + 3 stages × 3 blocks × 2 convs + 2 strided shortcuts = 21 conv → BN pairs
    assert len(pairs) == 21 and not kept
    assert ("layer2.0.shortcut.conv", "layer2.0.shortcut.bn") in pairs
    pairs, kept = find_fold_pairs(teacher, keep=["layer1.0.bn1", "layer2.0.conv2", "layer3"])
    assert len(pairs) == 19  # a tap on a whole stage keeps its output, folds inside it
    assert kept == {"layer1.0.bn1": "tapped", "layer2.0.bn2": "layer2.0.conv2 is tapped"}


class SharedConvOutput(nn.Module):
    """conv → bn, but the conv's output is also added back: folding it would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


class ReusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class LinearBN(nn.Module):
    """Linear → BatchNorm1d on N×D (foldable) and on N×L×D (BatchNorm1d normalises L there)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc3 = nn.Linear(3, 3)
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x)) + self.bn3(self.fc3(x.view(-1, 4, 1).expand(-1, 4, 3))).sum(2)


def test_only_foldable_pairs_are_folded():
    pairs, kept = find_fold_pairs(SharedConvOutput().eval(), keep=[])
    assert pairs == [("conv2", "bn2")] and kept == {"bn": "conv's output has other readers"}
    pairs, kept = find_fold_pairs(ReusedConv().eval(), keep=[])
    assert pairs == [] and kept == {"bn": "a module called more than once"}
    pairs, kept = find_fold_pairs(LinearBN().eval(), keep=[], linear_ranks={"fc": 2, "fc3": 3})
    assert pairs == [("fc", "bn")] and kept == {"bn3": "follows fc3, whose output is not N×D"}


@pytest.mark.parametrize("model", [SharedConvOutput, LinearBN])
def test_folded_copy_computes_the_same_function(model):
    model = randomise_batchnorms(model().double())
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64) if model.__class__ is not LinearBN else None
    x = torch.randn(5, 4, dtype=torch.float64) if x is None else x
    expected = model(x)
    ranks = {"fc": 2, "fc3": 3}
    pairs, _ = find_fold_pairs(model, keep=[], linear_ranks=ranks)
    copy = ts.shallow_copy(model)
    fold_batchnorms(copy, pairs)
    assert torch.allclose(copy(x), expected, rtol=1e-12, atol=1e-12)


# -- the distiller's fast teacher -----------------------------------------------------------------
TERMS = [kd.Term(L.KD(), 0.9), kd.Term(L.CE(), 0.1)]
SIZES = {"in_channels": 1, "num_classes": 10, "image_size": 28}


def eager_and_fast(teacher, speedup, terms=TERMS, batch=6):
    torch.manual_seed(1)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    student = create_model("resnet8", in_channels=1, num_classes=10, width=4)
    fast = kd.Distiller(teacher, student, terms, teacher_speedup=speedup)
    eager = kd.Distiller(teacher, create_model("resnet8", width=4), terms)
    return x, y, fast, eager


def test_fold_and_channels_last_keep_outputs_and_taps(caplog):
    teacher = resnet_teacher()
    # taps on a BatchNorm, on the ReLU after a conv-BN pair that is folded, on a conv
    # (teacher layer → the student's layer it is compared with)
    taps = {
        "layer1.0.bn1": "layer1.0.bn1",
        "layer2.1.relu1": "layer2.0.relu1",
        "stem.conv": "stem.conv",
    }
    layers = list(taps)
    terms = TERMS + [kd.Term(L.FitNet(), 1.0, student=s, teacher=t) for t, s in taps.items()]
    x, y, fast, eager = eager_and_fast(teacher, "fold,channels_last", terms)
    with caplog.at_level(logging.INFO, logger="kdistill"):
        first = fast(x, target=y)  # prepares, checks, and hands over the eager values
    report = fast.teacher_speedup_report
    assert report.steps == ("fold", "channels_last")
    assert report.kept == {"layer1.0.bn1": "tapped", "stem.bn": "stem.conv is tapped"}
    assert ("layer2.1.conv1", "layer2.1.bn1") in report.folded and len(report.folded) == 19
    assert 0 < report.max_rel_diff < ts.FP32_TOLERANCE
    assert "teacher speed-up fold+channels_last: max |Δ|" in caplog.text
    eager_output, eager_features = eager.run_teacher(x)
    assert torch.equal(first.teacher_output, eager_output)  # the first batch: the eager values
    output, features = fast.run_teacher(x)  # from now on: the copy
    scale = eager_output.abs().max()
    assert (output - eager_output).abs().max() <= 1e-5 * scale
    for name in layers:
        assert features[name].shape == eager_features[name].shape
        assert not features[name].is_inference()
        assert torch.allclose(features[name], eager_features[name], rtol=1e-4, atol=1e-5), name
    # the first layers are not folded (their tap keeps them): bit for bit the eager values
    assert torch.equal(features["stem.conv"], eager_features["stem.conv"])
    fast(x, target=y).loss.backward()  # the copies enter the graph as constants


def test_the_teacher_and_the_student_are_left_alone():
    teacher = resnet_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y, fast, _ = eager_and_fast(teacher, "fold,channels_last,bf16")
    student_before = {k: v.clone() for k, v in fast.student.named_parameters()}
    fast(x, target=y)
    fast(x, target=y)
    after = teacher.state_dict()
    assert all(
        torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in after
    )
    assert teacher.stem.conv.weight.is_contiguous()  # not channels-last
    assert isinstance(teacher.stem.bn, nn.BatchNorm2d)
    assert all(torch.equal(student_before[k], v) for k, v in fast.student.named_parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.student.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    # the copy is not a submodule: state_dict, parameters and DDP see only the teacher
    assert set(fast.state_dict()) == set(kd.Distiller(teacher, fast.student, TERMS).state_dict())


def test_a_step_that_drifts_is_refused_with_its_figure(monkeypatch):
    teacher = resnet_teacher()

    def bad_channels_last(model):  # a faulty rewrite: one weight off by 1 %
        model.layer3[0].conv1.weight = nn.Parameter(model.layer3[0].conv1.weight * 1.01)
        return 1

    monkeypatch.setattr(ts, "to_channels_last", bad_channels_last)
    x, y, fast, _ = eager_and_fast(teacher, ["fold", "channels_last"])
    with pytest.raises(TeacherSpeedupError) as error:
        fast(x, target=y)
    message = str(error.value)
    assert "speed-up 'channels_last' changes the teacher's output by max |Δ|" in message
    assert "above the tolerance 0.0001" in message and "['fold']" in message
    relative = float(message.split("largest value: ")[1].split(")")[0])
    assert relative > 1e-4


def test_a_fold_that_ignored_a_tap_would_be_refused(monkeypatch):
    # the check, not the exclusion rule, is the last line: fold a tapped conv anyway and the
    # first batch shows its tap moved (it now reads conv + BN, not the conv)
    teacher = resnet_teacher()
    real = ts.find_fold_pairs
    monkeypatch.setattr(ts, "find_fold_pairs", lambda model, keep, ranks: real(model, [], ranks))
    terms = TERMS + [kd.Term(L.FitNet(), 1.0, student="stem.conv", teacher="stem.conv")]
    x, y, fast, _ = eager_and_fast(teacher, "fold", terms)
    with pytest.raises(
        TeacherSpeedupError, match="speed-up 'fold' changes the teacher's layer 'stem.conv'"
    ):
        fast(x, target=y)


def test_bf16_is_held_to_its_own_tolerance(monkeypatch):
    teacher = resnet_teacher()
    x, y, fast, eager = eager_and_fast(teacher, "bf16")
    fast(x, target=y)
    report = fast.teacher_speedup_report
    assert report.steps == ("bf16",) and report.tolerance == ts.BF16_TOLERANCE
    assert 1e-4 < report.max_rel_diff < ts.BF16_TOLERANCE  # bf16 does move the logits
    output, _ = fast.run_teacher(x)
    assert output.dtype == torch.float32
    monkeypatch.setattr(ts, "BF16_TOLERANCE", 1e-6)
    _, _, strict, _ = eager_and_fast(teacher, "bf16")
    with pytest.raises(TeacherSpeedupError, match="'bf16' changes .* above the tolerance 1e-06"):
        strict(x, target=y)


def test_a_changed_teacher_is_prepared_again():
    teacher = resnet_teacher()
    x, y, fast, eager = eager_and_fast(teacher, "fold")
    fast(x, target=y)
    first = fast.teacher_speedup_report
    teacher.load_state_dict(randomise_batchnorms(resnet_teacher(), seed=5).state_dict())
    fast(x, target=y)  # the copy is stale: made and checked again
    assert fast.teacher_speedup_report is not first
    output, _ = fast.run_teacher(x)
    expected, _ = eager.run_teacher(x)
    assert torch.allclose(output, expected, rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_with_the_reason_logged_once(monkeypatch, caplog):
    class NoCompiler:
        def __init__(self, module, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", NoCompiler)
    monkeypatch.setattr(ts, "_LOGGED", set())
    teacher = resnet_teacher()
    x, y, fast, eager = eager_and_fast(teacher, ["fold", "compile"])
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        fast(x, target=y)
        _, _, again, _ = eager_and_fast(teacher, ["fold", "compile"])
        again(x, target=y)
    report = fast.teacher_speedup_report
    assert report.steps == ("fold",)
    assert "No working C++ compiler" in report.skipped["compile"]
    assert caplog.text.count("torch.compile is not used") == 1
    output, _ = fast.run_teacher(x)
    assert torch.allclose(output, eager.run_teacher(x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_keeps_outputs_and_taps():  # inductor: tens of seconds on 2 cores
    teacher = resnet_teacher()
    terms = TERMS + [kd.Term(L.FitNet(), 1.0, student="layer1.0.bn1", teacher="layer1.0.bn1")]
    x, y, fast, eager = eager_and_fast(teacher, ["fold", "compile"], terms)
    fast(x, target=y)
    report = fast.teacher_speedup_report
    assert "compile" in report.steps, report.skipped
    output, features = fast.run_teacher(x)
    expected, expected_features = eager.run_teacher(x)
    assert torch.allclose(output, expected, rtol=1e-4, atol=1e-5)
    feature = features["layer1.0.bn1"]
    assert torch.allclose(feature, expected_features["layer1.0.bn1"], rtol=1e-4, atol=1e-5)
    assert not feature.is_inference()
    smaller, _ = fast.run_teacher(x[:3])  # another batch shape: uncompiled, no recompile
    assert torch.allclose(smaller, expected[:3], rtol=1e-4, atol=1e-5)


def test_a_teacher_without_batchnorm_or_convs_runs_as_it_is():
    torch.manual_seed(0)
    teacher = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(784, 10))).eval()
    x, y, fast, eager = eager_and_fast(teacher, "auto")
    fast(x, target=y)
    report = fast.teacher_speedup_report
    assert report.steps == () and set(report.skipped) == {"fold", "channels_last"}
    assert fast._fast_teacher.runner is None  # nothing to gain: the eager teacher runs
    assert torch.equal(fast.run_teacher(x)[0], eager.run_teacher(x)[0])


@pytest.mark.parametrize(
    "spec",
    [
        ("resnet20", {"width": 4}),  # registry
        ("classic_teacher", {"hidden": 32}),
        ("kdistill.examples.my_models:WideCNN", {"channels": 1, "classes": 10, "width": 4}),
    ],
)
def test_registry_and_import_path_teachers(spec):
    name, kwargs = spec
    torch.manual_seed(0)
    teacher = randomise_batchnorms(model_from_spec(name, kwargs, data_sizes=SIZES))
    x, y, fast, eager = eager_and_fast(teacher, "auto")
    fast(x, target=y)
    report = fast.teacher_speedup_report
    assert "channels_last" in report.steps
    assert ("fold" in report.steps) == any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    expected, _ = eager.run_teacher(x)
    output, _ = fast.run_teacher(x)
    assert (output - expected).abs().max() <= 1e-4 * expected.abs().max()


# -- the option ------------------------------------------------------------------------------------
def test_parse_speedup():
    assert parse_speedup(None) == parse_speedup("off") == parse_speedup([]) == ()
    assert parse_speedup(False) == ()
    assert parse_speedup("auto") == ("auto",)
    assert parse_speedup("compile+fold") == ("fold", "compile")  # applied in a fixed order
    assert parse_speedup(["bf16", "channels_last"]) == ("channels_last", "bf16")
    with pytest.raises(ConfigError, match=r"\['chanels_last'\] \(did you mean channels_last"):
        parse_speedup("fold,chanels_last")
    with pytest.raises(ConfigError, match=r"unknown step\(s\) \['fuse'\]; use 'off', 'auto'"):
        parse_speedup(["fuse"])


def test_auto_leaves_bf16_out_without_fast_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(ts, "cpu_has_amx", lambda: False)
    assert resolve_steps(("auto",), cpu) == ("fold", "channels_last")
    monkeypatch.setattr(ts, "cpu_has_amx", lambda: True)
    assert resolve_steps(("auto",), cpu) == ("fold", "channels_last", "bf16")
    assert resolve_steps(("fold",), cpu) == ("fold",)


def test_recipe_field_reaches_the_distiller():
    from kdistill.recipes.schema import DistillSpec

    assert DistillSpec().teacher_speedup == "off"
    assert DistillSpec(teacher_speedup=False).teacher_speedup == "off"  # YAML's bare `off`
    assert DistillSpec(teacher_speedup=["fold", "compile"]).teacher_speedup == ["fold", "compile"]
    with pytest.raises(ValueError, match="distill.teacher_speedup: unknown step"):
        DistillSpec(teacher_speedup="fast")


def test_fast_teacher_prepare_returns_eager_values_for_the_batch():
    teacher = resnet_teacher()
    x = torch.randn(4, 1, 28, 28)
    fast, output, features = FastTeacher.prepare(teacher, ("fold",), [], x)
    with torch.inference_mode():
        assert torch.equal(output, teacher(x))
    assert features == {} and fast.report.steps == ("fold",) and not fast.stale()
