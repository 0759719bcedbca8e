"""Tests for the Distiller, its Terms, taps and connectors.

Every expected value is computed here from the model outputs / tapped features with plain torch
(own forward hooks, F.conv2d, hand-written batch norm, F.kl_div, pooling by F.avg_pool2d, ...),
never by re-running the distiller's own code path. The specification is DESIGN.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.distill.distiller import Distiller, DistillOutput, Term, select_output
from kdistill.distill.taps import Taps, find_modules
from kdistill.errors import LayerNotFoundError, NonFiniteLossError
from kdistill.losses import CE, KD, FitNet, LogitMSE

# ---------------------------------------------------------------------------------------------
# tiny models and helpers
# ---------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """conv1 (1→c1, 3×3, pad 1) → ReLU → conv2 (c1→c2, 3×3, pad 1, stride) → ReLU → GAP → fc."""

    def __init__(self, c1: int, c2: int, classes: int = 3, stride2: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, stride=stride2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class MLP(nn.Module):
    """fc1 (d_in→hidden) → ReLU → fc2 (hidden→classes)."""

    def __init__(self, d_in: int, hidden: int, classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class BNDropoutTeacher(nn.Module):
    """conv → BatchNorm → ReLU → GAP → Dropout(0.5) → fc: train mode would change its outputs."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.bn(self.conv(x)))).flatten(1)
        return self.fc(self.drop(x))


class DictModel(nn.Module):
    """Returns {"seg": N×K×H×W, "det": N×A×(5+K)} like a multi-task net."""

    def __init__(self, width: int = 4, classes: int = 3, anchors: int = 2):
        super().__init__()
        self.body = nn.Conv2d(1, width, 3, padding=1)
        self.seg = nn.Conv2d(width, classes, 1)
        self.det = nn.Linear(width, anchors * (5 + classes))
        self.anchors, self.classes = anchors, classes

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = torch.relu(self.body(x))
        det = self.det(h.mean(dim=(2, 3))).view(len(x), self.anchors, 5 + self.classes)
        return {"seg": self.seg(h), "det": det}


class TupleBlock(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x * 2


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TupleBlock()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.block(x)
        return self.fc(a + b)


class SharedBlockModel(nn.Module):
    """`block` runs twice per forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.block(x)))


class NaNStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * float("nan")


class HugeStudent(nn.Module):
    """Finite logits whose squared difference overflows float32 to inf."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * 0 + 1e30


def record_outputs(module: nn.Module, store: dict, key: str):
    """Our own forward hook (independent of kdistill.taps): keep a detached copy of the output."""

    def hook(_module, _inputs, output):
        store[key] = output.detach().clone()

    return module.register_forward_hook(hook)


def kd_by_hand(z_s: Tensor, z_t: Tensor, t: float) -> float:
    """T² · KL(p_t ‖ p_s) averaged over the batch, via F.kl_div(batchmean) in float64."""
    z_s, z_t = z_s.double(), z_t.double()
    log_p_s = F.log_softmax(z_s / t, dim=1)
    p_t = F.softmax(z_t / t, dim=1)
    return float(F.kl_div(log_p_s, p_t, reduction="batchmean")) * t * t


def ce_by_hand(z: Tensor, y: Tensor) -> float:
    """mean_n (logsumexp(z_n) − z_n[y_n]) in float64."""
    z = z.double()
    return float((torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]).mean())


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# the teacher stays frozen
# ---------------------------------------------------------------------------------------------


def test_teacher_stays_in_eval_mode_and_its_batchnorm_statistics_do_not_move():
    teacher = BNDropoutTeacher().train()  # handed over in train mode on purpose
    student = TinyCNN(2, 4)
    distiller = Distiller(teacher, student, [Term(KD(), weight=0.9), Term(CE(), weight=0.1)])
    distiller.eval()
    distiller.train()
    assert distiller.training and student.training
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())

    mean0 = teacher.bn.running_mean.clone()
    var0 = teacher.bn.running_var.clone()
    tracked0 = teacher.bn.num_batches_tracked.clone()
    x = torch.randn(6, 1, 8, 8) * 3 + 1  # far from the initial running stats (0, 1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    outputs = [distiller(x, target=y).teacher_output for _ in range(4)]
    distiller.train(True)
    outputs.append(distiller(x, target=y).teacher_output)

    assert torch.equal(teacher.bn.running_mean, mean0)
    assert torch.equal(teacher.bn.running_var, var0)
    assert torch.equal(teacher.bn.num_batches_tracked, tracked0)
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])  # no dropout: deterministic
    # the same as the teacher evaluated by hand in eval mode
    with torch.no_grad():
        expected = teacher.eval()(x)
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)


def test_teacher_parameters_are_frozen_and_get_no_gradient():
    teacher = BNDropoutTeacher()
    student = TinyCNN(2, 4)
    distiller = Distiller(teacher, student, [Term(KD()), Term(CE())])
    distiller.train()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    out = distiller(x, target=y)
    out.loss.backward()
    for p in teacher.parameters():
        assert not p.requires_grad
        assert p.grad is None
    for name, p in student.named_parameters():
        assert p.grad is not None, name


def test_trainable_parameters_are_exactly_student_and_connectors():
    teacher = TinyCNN(8, 8)
    student = TinyCNN(4, 4)
    distiller = Distiller(
        teacher, student, [Term(KD()), Term(FitNet(), student="conv1", teacher="conv2")]
    )
    distiller.build(torch.randn(2, 1, 8, 8))
    assert len(distiller.connectors) == 1
    got = [id(p) for p in distiller.trainable_parameters()]
    expected = {id(p) for p in student.parameters()} | {
        id(p) for p in distiller.connectors.parameters()
    }
    assert len(got) == len(set(got)), "a parameter is listed twice"
    assert set(got) == expected
    assert not set(got) & {id(p) for p in teacher.parameters()}


# ---------------------------------------------------------------------------------------------
# loss = weighted sum of terms; parts, raw parts and names
# ---------------------------------------------------------------------------------------------


def test_loss_is_the_hand_computed_weighted_sum_of_kd_and_ce():
    teacher, student = MLP(5, 7), MLP(5, 3)
    distiller = Distiller(
        teacher, student, [Term(KD(temperature=4.0), weight=0.9), Term(CE(), weight=0.1)]
    )
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = distiller(x, target=y)
    assert isinstance(out, DistillOutput)
    with torch.no_grad():
        z_s, z_t = student(x), teacher(x)
    kd = kd_by_hand(z_s, z_t, 4.0)
    ce = ce_by_hand(z_s, y)
    assert out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(0.9 * kd + 0.1 * ce, rel=1e-5)
    assert set(out.parts) == {"kd", "ce"}
    assert out.parts["kd"] == pytest.approx(0.9 * kd, rel=1e-5)
    assert out.parts["ce"] == pytest.approx(0.1 * ce, rel=1e-5)
    assert sum(out.parts.values()) == pytest.approx(out.loss.item(), rel=1e-6)
    assert out.raw_parts["kd"] == pytest.approx(kd, rel=1e-5)
    assert out.raw_parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert torch.equal(out.student_output.detach(), z_s)


def test_duplicate_term_names_get_suffixes_and_explicit_names_are_kept():
    teacher, student = MLP(5, 7), MLP(5, 3)
    distiller = Distiller(
        teacher,
        student,
        [
            Term(KD(temperature=4.0), weight=1.0),
            Term(KD(temperature=2.0), weight=0.5),
            Term(KD(temperature=1.0), weight=0.25),
            Term(CE(), weight=0.2, name="hard"),
        ],
    )
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    out = distiller(x, target=y)
    assert list(out.parts) == ["kd", "kd_2", "kd_3", "hard"]
    with torch.no_grad():
        z_s, z_t = student(x), teacher(x)
    assert out.raw_parts["kd"] == pytest.approx(kd_by_hand(z_s, z_t, 4.0), rel=1e-5)
    assert out.raw_parts["kd_2"] == pytest.approx(kd_by_hand(z_s, z_t, 2.0), rel=1e-5)
    assert out.parts["kd_2"] == pytest.approx(0.5 * kd_by_hand(z_s, z_t, 2.0), rel=1e-5)
    assert out.parts["kd_3"] == pytest.approx(0.25 * kd_by_hand(z_s, z_t, 1.0), rel=1e-5)
    assert out.parts["hard"] == pytest.approx(0.2 * ce_by_hand(z_s, y), rel=1e-5)
    assert sum(out.parts.values()) == pytest.approx(out.loss.item(), rel=1e-6)


def test_zero_weight_term_contributes_nothing_but_is_reported_raw():
    teacher, student = MLP(5, 7), MLP(5, 3)
    distiller = Distiller(teacher, student, [Term(KD(), weight=0.0), Term(CE(), weight=1.0)])
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    out = distiller(x, target=y)
    with torch.no_grad():
        z_s, z_t = student(x), teacher(x)
    assert out.parts["kd"] == 0.0
    assert out.raw_parts["kd"] == pytest.approx(kd_by_hand(z_s, z_t, 4.0), rel=1e-5)
    assert out.loss.item() == pytest.approx(ce_by_hand(z_s, y), rel=1e-5)


def test_a_plain_torch_loss_works_as_a_term():
    teacher, student = MLP(5, 7), MLP(5, 3)
    distiller = Distiller(teacher, student, [Term(nn.MSELoss(), weight=3.0)])
    x = torch.randn(4, 5)
    out = distiller(x)
    with torch.no_grad():
        expected = float(((student(x).double() - teacher(x).double()) ** 2).mean())
    assert list(out.parts) == ["mseloss"]
    assert out.loss.item() == pytest.approx(3.0 * expected, rel=1e-5)


def test_a_loss_error_names_the_term_and_the_shapes():
    teacher, student = MLP(5, 7, classes=4), MLP(5, 3, classes=3)
    distiller = Distiller(teacher, student, [Term(KD(), name="soft")])
    with pytest.raises(ValueError) as info:
        distiller(torch.randn(2, 5))
    message = str(info.value)
    assert "soft" in message and "(2, 3)" in message and "(2, 4)" in message


# ---------------------------------------------------------------------------------------------
# dict outputs
# ---------------------------------------------------------------------------------------------


def test_dict_outputs_term_picks_the_key():
    teacher, student = DictModel(width=6), DictModel(width=2)
    distiller = Distiller(
        teacher,
        student,
        [
            Term(LogitMSE(), weight=2.0, output="seg", name="seg_soft"),
            Term(LogitMSE(), weight=0.5, output="det", name="det_soft"),
        ],
    )
    x = torch.randn(3, 1, 5, 5)
    out = distiller(x)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    seg = float(((s["seg"].double() - t["seg"].double()) ** 2).mean())
    det = float(((s["det"].double() - t["det"].double()) ** 2).mean())
    assert out.raw_parts["seg_soft"] == pytest.approx(seg, rel=1e-5)
    assert out.raw_parts["det_soft"] == pytest.approx(det, rel=1e-5)
    assert out.loss.item() == pytest.approx(2.0 * seg + 0.5 * det, rel=1e-5)
    assert set(out.student_output) == {"seg", "det"}


def test_dict_output_without_output_key_raises_value_error_listing_keys():
    distiller = Distiller(DictModel(), DictModel(), [Term(LogitMSE())])
    with pytest.raises(ValueError, match="output") as info:
        distiller(torch.randn(2, 1, 4, 4))
    assert "seg" in str(info.value) and "det" in str(info.value)


def test_dict_output_with_unknown_key_raises_key_error_naming_available_keys():
    distiller = Distiller(DictModel(), DictModel(), [Term(LogitMSE(), output="mask")])
    with pytest.raises(KeyError) as info:
        distiller(torch.randn(2, 1, 4, 4))
    message = str(info.value)
    assert "mask" in message and "seg" in message and "det" in message


def test_output_key_on_a_tensor_output_raises():
    distiller = Distiller(MLP(5, 4), MLP(5, 3), [Term(KD(), output="seg")])
    with pytest.raises(ValueError, match="seg"):
        distiller(torch.randn(2, 5))


def test_select_output_directly():
    tensor = torch.ones(2, 3)
    assert select_output(tensor, None, "student") is tensor
    assert select_output({"a": tensor}, "a", "teacher") is tensor
    with pytest.raises(TypeError, match="student"):
        select_output([tensor], None, "student")


# ---------------------------------------------------------------------------------------------
# taps and connectors
# ---------------------------------------------------------------------------------------------


def test_fitnet_builds_conv_connector_and_loss_matches_hand_computation():
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="conv2")])
    x = torch.randn(5, 1, 6, 6)
    assert len(distiller.connectors) == 0
    distiller.build(x)
    assert list(distiller.connectors) == ["fitnet"]
    connector = distiller.connectors["fitnet"]
    assert isinstance(connector, nn.Sequential) and len(connector) == 2
    conv, bn = connector[0], connector[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 8, (1, 1))
    assert bn.num_features == 8

    seen: dict[str, Tensor] = {}
    handles = [
        record_outputs(student.conv1, seen, "s"),
        record_outputs(teacher.conv2, seen, "t"),
    ]

    # training mode: the connector's batch norm uses the batch statistics
    distiller.train()
    out = distiller(x)
    assert len(distiller.connectors) == 1  # not rebuilt
    with torch.no_grad():
        y = F.conv2d(seen["s"], conv.weight)  # 1×1 conv, no bias
        mean = y.mean(dim=(0, 2, 3), keepdim=True)
        var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased
        w, b = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
        mapped = (y - mean) / torch.sqrt(var + bn.eps) * w + b
        expected = float(((mapped.double() - seen["t"].double()) ** 2).mean())
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)

    # eval mode: the connector's batch norm uses its running statistics
    distiller.eval()
    out = distiller(x)
    with torch.no_grad():
        y = F.conv2d(seen["s"], conv.weight)
        rm, rv = bn.running_mean.view(1, -1, 1, 1), bn.running_var.view(1, -1, 1, 1)
        mapped = (y - rm) / torch.sqrt(rv + bn.eps) * w + b
        expected = float(((mapped.double() - seen["t"].double()) ** 2).mean())
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    for handle in handles:
        handle.remove()


def test_build_has_no_training_mode_side_effects_on_the_new_connector():
    """build() runs in eval mode: the new connector's batch norm must not count the batch."""
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="conv2")])
    distiller.train()
    distiller.build(torch.randn(5, 1, 6, 6) * 3 + 2)
    bn = distiller.connectors["fitnet"][1]
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(8))
    assert torch.equal(bn.running_var, torch.ones(8))
    assert bn.training  # back to the distiller's mode afterwards


def test_connector_built_during_an_eval_forward_is_in_eval_mode():
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="conv2")])
    distiller.eval()
    distiller(torch.randn(5, 1, 6, 6))
    connector = distiller.connectors["fitnet"]
    assert not connector.training
    assert all(not m.training for m in connector.modules())
    assert int(connector[1].num_batches_tracked) == 0


def test_connector_follows_the_dtype_of_the_features():
    teacher = TinyCNN(3, 4).double()
    student = TinyCNN(2, 3).double()
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="conv2")])
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    out = distiller(x)  # a float32 connector on float64 features would fail here
    assert distiller.connectors["fitnet"][0].weight.dtype == torch.float64
    assert out.loss.dtype == torch.float64


def test_connector_is_built_on_first_forward_without_build():
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="conv2")])
    distiller(torch.randn(2, 1, 6, 6))
    assert len(distiller.connectors) == 1
    assert distiller.connectors["fitnet"][0].weight.shape == (8, 4, 1, 1)


def test_equal_channels_need_no_connector():
    teacher, student = TinyCNN(6, 4), TinyCNN(4, 5)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="conv2")])
    x = torch.randn(3, 1, 6, 6)
    distiller.build(x)
    assert len(distiller.connectors) == 0
    seen: dict[str, Tensor] = {}
    record_outputs(student.conv1, seen, "s")
    record_outputs(teacher.conv2, seen, "t")
    out = distiller(x)
    expected = float(((seen["s"].double() - seen["t"].double()) ** 2).mean())
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_spatial_mismatch_pools_the_larger_map():
    # student conv1: 8×14×14; teacher conv2 (stride 2): 8×7×7; equal channels → no connector
    teacher, student = TinyCNN(3, 8, stride2=2), TinyCNN(8, 4)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="conv2")])
    x = torch.randn(2, 1, 14, 14)
    seen: dict[str, Tensor] = {}
    record_outputs(student.conv1, seen, "s")
    record_outputs(teacher.conv2, seen, "t")
    out = distiller(x)
    assert len(distiller.connectors) == 0
    assert seen["s"].shape == (2, 8, 14, 14) and seen["t"].shape == (2, 8, 7, 7)
    # 14 → 7 is exactly 2×2 average pooling; also by adaptive pooling
    pooled = F.avg_pool2d(seen["s"], 2)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(seen["s"], (7, 7)))
    # and by hand on one entry
    assert pooled[1, 3, 2, 5].item() == pytest.approx(seen["s"][1, 3, 4:6, 10:12].mean().item())
    expected = float(((pooled.double() - seen["t"].double()) ** 2).mean())
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_spatial_mismatch_with_teacher_larger_pools_the_teacher():
    # student conv2 (stride 2) 8×7×7 vs teacher conv1 8×14×14
    teacher, student = TinyCNN(8, 3), TinyCNN(3, 8, stride2=2)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv2", teacher="conv1")])
    seen: dict[str, Tensor] = {}
    record_outputs(student.conv2, seen, "s")
    record_outputs(teacher.conv1, seen, "t")
    out = distiller(torch.randn(2, 1, 14, 14))
    expected = float(((seen["s"].double() - F.avg_pool2d(seen["t"], 2).double()) ** 2).mean())
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_linear_connector_for_flat_features():
    teacher, student = MLP(5, 10), MLP(5, 6)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="fc1", teacher="fc1")])
    x = torch.randn(4, 5)
    distiller.build(x)
    connector = distiller.connectors["fitnet"]
    assert isinstance(connector, nn.Linear)
    assert (connector.in_features, connector.out_features) == (6, 10)
    seen: dict[str, Tensor] = {}
    record_outputs(student.fc1, seen, "s")
    record_outputs(teacher.fc1, seen, "t")
    out = distiller(x)
    with torch.no_grad():
        mapped = seen["s"] @ connector.weight.T + connector.bias
    expected = float(((mapped.double() - seen["t"].double()) ** 2).mean())
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_incompatible_feature_ranks_raise_naming_shapes_and_layers():
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    distiller = Distiller(teacher, student, [Term(FitNet(), student="conv1", teacher="fc")])
    with pytest.raises(ValueError) as info:
        distiller.build(torch.randn(2, 1, 6, 6))
    message = str(info.value)
    assert "conv1" in message and "'fc'" in message
    assert "(2, 4, 6, 6)" in message and "(2, 3)" in message


def test_unknown_layer_name_suggests_close_valid_name():
    with pytest.raises(LayerNotFoundError) as info:
        Distiller(TinyCNN(6, 8), TinyCNN(4, 5), [Term(FitNet(), student="conv", teacher="conv2")])
    assert "'conv'" in str(info.value)
    assert "conv1" in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(LayerNotFoundError, match="conv2"):
        Distiller(TinyCNN(6, 8), TinyCNN(4, 5), [Term(FitNet(), student="conv1", teacher="cnv2")])
    with pytest.raises(LayerNotFoundError, match="fc1"):
        find_modules(MLP(3, 4), ["fc11"])


def test_find_modules_maps_nested_names():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    found = find_modules(model, ["1.1", "0"])
    assert found["1.1"] is model[1][1]
    assert found["0"] is model[0]


def test_distiller_close_removes_every_hook():
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    distiller = Distiller(
        teacher,
        student,
        [
            Term(FitNet(), student="conv1", teacher="conv2"),
            Term(FitNet(), student="conv2", teacher="conv1"),
        ],
    )
    distiller(torch.randn(2, 1, 6, 6))
    assert all_hooks(student) == 2 and all_hooks(teacher) == 2
    distiller.close()
    assert all_hooks(student) == 0 and all_hooks(teacher) == 0
    distiller.close()  # idempotent


def test_taps_context_manager_removes_hooks_even_on_error():
    model = TinyCNN(4, 5)
    with pytest.raises(RuntimeError, match="boom"):
        with Taps(model, ["conv1", "conv2"]) as taps:
            model(torch.randn(1, 1, 4, 4))
            assert set(taps.outputs) == {"conv1", "conv2"}
            assert all_hooks(model) == 2
            raise RuntimeError("boom")
    assert all_hooks(model) == 0
    assert not taps.active


def test_taps_record_the_outputs_of_the_named_modules():
    model = TinyCNN(4, 5)
    seen: dict[str, Tensor] = {}
    record_outputs(model.conv2, seen, "conv2")
    x = torch.randn(2, 1, 4, 4)
    with Taps(model, ["conv2"]) as taps:
        model(x)
        got = taps.collect()
    assert torch.equal(got["conv2"].detach(), seen["conv2"])


def test_tapping_a_module_that_returns_a_tuple_raises_type_error():
    model = TupleModel()
    with Taps(model, ["block"]):
        with pytest.raises(TypeError) as info:
            model(torch.randn(2, 4))
    message = str(info.value)
    assert "'block'" in message and "tuple" in message


def test_tapping_a_tuple_module_through_the_distiller_raises_type_error():
    distiller = Distiller(
        TupleModel(), TupleModel(), [Term(FitNet(), student="block", teacher="fc")]
    )
    with pytest.raises(TypeError, match="block"):
        distiller(torch.randn(2, 4))


def test_module_called_twice_records_last_output_and_counts_calls():
    model = SharedBlockModel()
    x = torch.randn(3, 4)
    with torch.no_grad():
        first = model.block(x)
        second = model.block(first)
    with Taps(model, ["block"]) as taps:
        model(x)
        assert taps.calls["block"] == 2
        torch.testing.assert_close(taps.outputs["block"].detach(), second)
        assert not torch.allclose(taps.outputs["block"].detach(), first)
        taps.clear()
        assert taps.calls == {} and taps.outputs == {}


def test_tapped_module_not_called_raises_runtime_error():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = Skips()
    with Taps(model, ["unused"]) as taps:
        model(torch.randn(1, 2))
        with pytest.raises(RuntimeError, match="unused"):
            taps.collect()


# ---------------------------------------------------------------------------------------------
# non-finite losses
# ---------------------------------------------------------------------------------------------


def test_nan_student_logits_raise_non_finite_loss_error_naming_the_term():
    distiller = Distiller(MLP(4, 5), NaNStudent(), [Term(KD(), name="soft"), Term(CE())])
    with pytest.raises(NonFiniteLossError) as info:
        distiller(torch.randn(2, 4), target=torch.tensor([0, 1]))
    assert info.value.term == "soft"
    assert "soft" in str(info.value)
    assert "nan" in str(info.value).lower()


def test_infinite_loss_raises_too():
    distiller = Distiller(MLP(4, 5), HugeStudent(), [Term(LogitMSE(), name="mse")])
    with pytest.raises(NonFiniteLossError) as info:
        distiller(torch.randn(2, 4))
    assert info.value.term == "mse"


def test_check_finite_false_lets_nan_through():
    distiller = Distiller(
        MLP(4, 5), NaNStudent(), [Term(KD(), name="soft"), Term(CE())], check_finite=False
    )
    out = distiller(torch.randn(2, 4), target=torch.tensor([0, 1]))
    assert math.isnan(out.loss.item())
    assert math.isnan(out.parts["soft"])


# ---------------------------------------------------------------------------------------------
# cached teacher outputs
# ---------------------------------------------------------------------------------------------


def test_cached_teacher_output_skips_the_teacher_and_gives_the_same_loss():
    teacher, student = MLP(5, 7), MLP(5, 3)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    distiller = Distiller(teacher, student, [Term(KD(), weight=0.9), Term(CE(), weight=0.1)])
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])

    online = distiller(x, target=y)
    assert len(calls) == 1
    with torch.no_grad():
        t_logits = teacher(x)
    assert len(calls) == 2
    cached = distiller(x, target=y, teacher_output=t_logits)
    assert len(calls) == 2, "the teacher ran although its output was given"
    assert cached.loss.item() == pytest.approx(online.loss.item(), rel=1e-6)
    assert cached.parts == pytest.approx(online.parts, rel=1e-6)
    cached.loss.backward()  # a cached output is a valid input to autograd
    assert student.fc1.weight.grad is not None


def test_cached_teacher_output_and_features_skip_the_teacher():
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    distiller = Distiller(
        teacher, student, [Term(KD()), Term(FitNet(), student="conv1", teacher="conv2")]
    )
    x = torch.randn(3, 1, 6, 6)
    distiller.build(x)
    distiller.eval()  # connector batch norm on running stats: both calls see the same function
    online = distiller(x)
    seen: dict[str, Tensor] = {}
    record_outputs(teacher.conv2, seen, "conv2")
    with torch.no_grad():
        t_logits = teacher(x)
    n = len(calls)
    out = distiller(x, teacher_output=t_logits, teacher_features={"conv2": seen["conv2"]})
    assert len(calls) == n
    assert out.loss.item() == pytest.approx(online.loss.item(), rel=1e-6)
    # an output alone is not enough when a term taps a teacher layer: the teacher runs
    out = distiller(x, teacher_output=t_logits)
    assert len(calls) == n + 1
    assert out.loss.item() == pytest.approx(online.loss.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# student-only, term validation, warm-up
# ---------------------------------------------------------------------------------------------


def test_student_only_distiller_with_cross_entropy():
    student = MLP(5, 3)
    distiller = Distiller(None, student, [Term(CE())])
    x, y = torch.randn(6, 5), torch.tensor([2, 1, 0, 0, 1, 2])
    out = distiller(x, target=y)
    with torch.no_grad():
        expected = ce_by_hand(student(x), y)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.teacher_output is None
    out.loss.backward()
    assert [id(p) for p in distiller.trainable_parameters()] == [
        id(p) for p in student.parameters()
    ]
    distiller.train()  # no teacher to keep in eval mode: must not fail


def test_teacher_none_with_a_teacher_term_raises():
    with pytest.raises(ValueError, match="teacher"):
        Distiller(None, MLP(5, 3), [Term(KD()), Term(CE())])


def test_distiller_needs_terms():
    with pytest.raises(ValueError):
        Distiller(MLP(5, 3), MLP(5, 3), [])


def test_missing_target_is_reported_with_the_term():
    distiller = Distiller(None, MLP(5, 3), [Term(CE(), name="hard")])
    with pytest.raises(ValueError, match="target"):
        distiller(torch.randn(2, 5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight": -0.1},
        {"weight": float("nan")},
        {"weight": float("inf")},
        {"warmup_epochs": -1.0},
        {"warmup_epochs": float("nan")},
    ],
    ids=["negative-weight", "nan-weight", "inf-weight", "negative-warmup", "nan-warmup"],
)
def test_term_validation(kwargs):
    with pytest.raises(ValueError):
        Term(KD(), **kwargs)


def test_warmup_ramps_the_weight_linearly():
    teacher, student = MLP(5, 7), MLP(5, 3)
    distiller = Distiller(teacher, student, [Term(KD(), weight=2.0, warmup_epochs=4)])
    x = torch.randn(4, 5)
    with torch.no_grad():
        raw = kd_by_hand(student(x), teacher(x), 4.0)
    values = {}
    for progress in (0.0, 1.0, 2.0, 4.0, 10.0):
        distiller.set_progress(progress)
        values[progress] = distiller(x).loss.item()
    full = values[4.0]
    assert full == pytest.approx(2.0 * raw, rel=1e-5)
    assert values[10.0] == pytest.approx(full, rel=1e-6)  # no growth past the warm-up
    assert values[0.0] == 0.0
    # one epoch of four: the effective weight is 2.0 · 1/4 = 0.5, a quarter of the full value
    assert values[1.0] == pytest.approx(0.5 * raw, rel=1e-5)
    assert values[1.0] == pytest.approx(0.25 * full, rel=1e-5)
    assert values[2.0] == pytest.approx(0.5 * full, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


def test_gradients_reach_student_and_connector_but_not_teacher():
    teacher, student = TinyCNN(6, 8), TinyCNN(4, 5)
    distiller = Distiller(
        teacher, student, [Term(KD()), Term(FitNet(), student="conv1", teacher="conv2")]
    )
    x = torch.randn(4, 1, 6, 6)
    distiller.build(x)
    distiller.train()
    distiller(x).loss.backward()
    conv = distiller.connectors["fitnet"][0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert student.conv1.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_gradcheck_through_connector_and_student():
    """Autograd's gradients w.r.t. connector and student weights match finite differences."""
    teacher, student = TinyCNN(3, 4), TinyCNN(2, 3)
    distiller = Distiller(
        teacher,
        student,
        [Term(KD(temperature=2.0)), Term(FitNet(), student="conv1", teacher="conv2", weight=3.0)],
    )
    x = torch.randn(3, 1, 4, 4)
    distiller.build(x)  # connectors from float32 shapes, then everything in float64
    distiller.double()
    x = x.double()
    distiller.eval()  # fixed running statistics in the connector's batch norm
    names = ["connectors.fitnet.0.weight", "student.conv1.weight", "student.fc.bias"]
    params = dict(distiller.named_parameters())
    leaves = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def loss_of(*values):
        return torch.func.functional_call(distiller, dict(zip(names, values)), (x,)).loss

    assert torch.autograd.gradcheck(loss_of, leaves, eps=1e-6, atol=1e-5)
