"""Property tests (hypothesis) for every registered loss: `LOSSES.names()` is iterated, so a loss
added to the registry is covered without touching this file.

For random finite inputs each loss must give a finite 0-dim value with finite gradients, be
non-negative (every kdistill loss is a divergence, a squared error, a cross-entropy or 1 − a
correlation), and be zero when the student side equals the teacher side.

Inputs are built from each loss's `needs`: student / teacher tensors of the first layout the loss
accepts (N×K logits, then N×C×H×W maps, then N×D×L), the labels in [0, K), dataset indices
0…N−1, an attention mask of ones. A loss whose classes are the last dimension (`class_dim = -1`,
token losses on N×L×V) gets labels N×L in [0, V). A loss that accepts none of these layouts
fails `test_every_loss_has_a_known_input_layout` until it gets an entry in LAYOUTS. A loss that
reads an output head (the chunked losses: `reads_head`) gets each side as
`HeadInput(tensor, identity V×V)`, whose logits are the tensor itself. A loss whose
target is not class indices (`target_is_class_index = False`, e.g. "yolo") gets padded
ground-truth boxes instead (`random_boxes`, `boxes`).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kdistill.losses import LOSSES, create_loss
from kdistill.losses.base import INDEX, MASK, STUDENT, TARGET, TEACHER
from kdistill.losses.chunked import HeadInput

# Shapes tried in order for the student/teacher tensors: (N, K), (N, C, H, W), (N, D, L).
DEFAULT_LAYOUTS = [(6, 5), (3, 4, 3, 3), (4, 3, 5)]
# A loss whose inputs take another layout, or whose constructor needs arguments, goes here.
LAYOUTS: dict[str, list[tuple[int, ...]]] = {
    # YOLO-style head outputs N×A×(5+K): [x, y, w, h, obj, K class scores], here K = 2
    "det_logit_mse": [(3, 4, 7)],
    # YOLO head output N×A×S×S×(5+K): 3 anchors (the default ones), an 8×8 grid, K = 10
    "yolo": [(2, 3, 8, 8, 15)],
}
CONSTRUCTOR_ARGS: dict[str, dict] = {"crd": {"num_samples": 6, "num_negatives": 8}}
# Losses that are not bounded below by zero (none yet; e.g. a contrastive bound could be).
MAY_BE_NEGATIVE: set[str] = set()
# Losses that are not zero when student equals teacher: a contrastive loss still separates a
# sample from its negatives (CRD's zero is at perfect separation, not at equality).
# Hard-label distillation is a cross-entropy with the teacher's argmax: at equality it is the
# entropy-like −log max softmax(z), zero only for a one-hot softmax.
NOT_ZERO_AT_EQUALITY = {"crd", "hard_kd"}
# Losses comparing each position's last-dim vector by cosine: a zero vector has cosine 0 with
# anything (itself included), so equality draws need every such vector non-zero.
PER_VECTOR_COSINE = {"hidden_cosine"}

# Box targets (losses with target_is_class_index False): N×BOXES_PER_IMAGE×5 float32 rows
# [class, x1, y1, x2, y2] in pixels of a BOX_IMAGE_SIZE² image (YOLOLoss's default
# image_size); padding rows have class −1 and zero coordinates. The class count K is the
# layout's last dimension minus the 5 box/objectness values.
BOX_IMAGE_SIZE = 64
BOXES_PER_IMAGE = 4

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def targets_are_class_indices(name: str) -> bool:
    return getattr(LOSSES.get(name), "target_is_class_index", True)


def box_row(label: int, x1: float, y1: float, w: float, h: float) -> list[float]:
    """One [class, x1, y1, x2, y2] row, clipped to the image; class < 0 gives a padding row.
    With x1, y1 <= BOX_IMAGE_SIZE − 4 and w, h >= 1 the box keeps a positive width and height."""
    if label < 0:
        return [-1.0, 0.0, 0.0, 0.0, 0.0]
    return [
        float(label),
        x1,
        y1,
        min(x1 + w, float(BOX_IMAGE_SIZE)),
        min(y1 + h, float(BOX_IMAGE_SIZE)),
    ]


def random_boxes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Padded N×M×5 boxes for a detection head of `shape`: every image has at least one box."""
    num_classes = shape[-1] - 5
    rows = []
    for _ in range(shape[0]):
        for slot in range(BOXES_PER_IMAGE):
            low = 0 if slot == 0 else -1
            label = int(torch.randint(low, num_classes, (), generator=generator))
            x1, y1 = (torch.rand(2, generator=generator) * (BOX_IMAGE_SIZE - 4)).tolist()
            w, h = (1 + torch.rand(2, generator=generator) * (BOX_IMAGE_SIZE - 1)).tolist()
            rows.append(box_row(label, x1, y1, w, h))
    return torch.tensor(rows, dtype=torch.float32).reshape(shape[0], BOXES_PER_IMAGE, 5)


def classes_last(name: str) -> bool:
    """The loss's classes are the last dimension (token logits N×L×V), not dimension 1."""
    return getattr(LOSSES.get(name), "class_dim", 1) == -1


def label_shape(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(shape of the labels, number of classes) for a layout `shape`."""
    if classes_last(name):
        return shape[:-1], shape[-1]
    return (shape[0], *shape[2:]), shape[1]


def random_target(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Class indices in [0, K) of shape N×(spatial…) (N×L in [0, V) for token logits), or padded
    boxes for a box-target loss."""
    if not targets_are_class_indices(name):
        return random_boxes(shape, generator)
    size, classes = label_shape(name, shape)
    return torch.randint(0, classes, size, generator=generator)


def make_inputs(loss, shape: tuple[int, ...], student, teacher, target) -> list:
    values = {
        STUDENT: student,
        TEACHER: teacher,
        TARGET: target,
        INDEX: torch.arange(shape[0]),
        MASK: torch.ones(shape[:2], dtype=torch.long),
    }
    if getattr(loss, "reads_head", False):  # logits = tensor · Iᵀ: the tensor
        eye = torch.eye(shape[-1], dtype=student.dtype)
        values[STUDENT], values[TEACHER] = HeadInput(student, eye), HeadInput(teacher, eye)
    return [values[need] for need in loss.needs]


def accepted_layout(name: str) -> tuple[int, ...] | None:
    """The first layout in which the loss computes a value from random inputs."""
    loss = create_loss(name, **CONSTRUCTOR_ARGS.get(name, {}))
    generator = torch.Generator().manual_seed(0)
    for shape in LAYOUTS.get(name, DEFAULT_LAYOUTS):
        student = torch.randn(shape, generator=generator)
        teacher = torch.randn(shape, generator=generator)
        target = random_target(name, shape, generator)
        try:
            value = loss(*make_inputs(loss, shape, student, teacher, target))
        except (ValueError, RuntimeError, TypeError):
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return shape
    return None


NAMES = LOSSES.names()
# `needs` is a class attribute: read it without building the loss (some may need arguments)
TEACHER_LOSSES = [n for n in NAMES if TEACHER in getattr(LOSSES.get(n), "needs", (TEACHER,))]


def test_the_registry_is_not_empty():
    assert {"kd", "ce", "dkd", "dist", "logit_mse", "fitnet"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_has_a_known_input_layout(name):
    assert accepted_layout(name) is not None, (
        f"loss {name!r} accepts none of the layouts {DEFAULT_LAYOUTS}; add its layout to LAYOUTS "
        "(and constructor arguments to CONSTRUCTOR_ARGS) in tests/test_loss_properties.py"
    )


# Above this many entries hypothesis cannot draw a tensor entry by entry (its per-example data
# budget runs out: HealthCheck.data_too_large), e.g. the 5,760 of a YOLO head output.
MAX_DRAWN_ENTRIES = 1024


def seeded_tensor(shape: tuple[int, ...], seed: int, scale: float, overrides: dict) -> torch.Tensor:
    """Uniform in [-scale, scale] from `seed`, then the flat positions in `overrides` set."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=generator) * 2 - 1) * scale
    flat = x.view(-1)
    for position, value in overrides.items():
        flat[position] = value
    return x


def tensors(shape: tuple[int, ...], bound: float):
    """A float32 tensor of `shape` with finite entries in [-bound, bound].

    Up to MAX_DRAWN_ENTRIES entries every entry is drawn; a larger tensor is a seeded uniform
    one of a drawn scale (0 … bound) with up to 32 drawn entries placed at drawn positions, so
    hypothesis still reaches the extremes (±bound, 0, tiny values) entry by entry.
    """
    count = math.prod(shape)
    entry = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32)
    if count > MAX_DRAWN_ENTRIES:
        return st.builds(
            seeded_tensor,
            st.just(shape),
            st.integers(0, 2**32 - 1),
            st.floats(0, bound, allow_nan=False, width=32),
            st.dictionaries(st.integers(0, count - 1), entry, max_size=32),
        )
    values = st.lists(entry, min_size=count, max_size=count)
    return values.map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(shape))


def labels(name: str, shape: tuple[int, ...]):
    size, classes = label_shape(name, shape)
    count = math.prod(size)
    return st.lists(st.integers(0, classes - 1), min_size=count, max_size=count).map(
        lambda v: torch.tensor(v, dtype=torch.int64).reshape(size)
    )


def boxes(shape: tuple[int, ...]):
    """Padded N×M×5 float32 boxes (see `box_row`) for a detection head of `shape`."""
    coordinate = st.floats(0, BOX_IMAGE_SIZE - 4, allow_nan=False, width=32)
    side = st.floats(1, BOX_IMAGE_SIZE, allow_nan=False, width=32)
    row = st.builds(box_row, st.integers(-1, shape[-1] - 6), coordinate, coordinate, side, side)
    count = shape[0] * BOXES_PER_IMAGE
    return st.lists(row, min_size=count, max_size=count).map(
        lambda v: torch.tensor(v, dtype=torch.float32).reshape(shape[0], BOXES_PER_IMAGE, 5)
    )


def targets(name: str, shape: tuple[int, ...]):
    """The target strategy for loss `name`: `labels`, or `boxes` for a box-target loss."""
    return labels(name, shape) if targets_are_class_indices(name) else boxes(shape)


def layout_or_skip(name: str) -> tuple[int, ...]:
    shape = accepted_layout(name)
    if shape is None:
        pytest.skip(f"{name}: no known input layout (see the layout test)")
    return shape


def value_and_grads(loss, inputs: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    def leaf(x):
        if isinstance(x, HeadInput):
            return HeadInput(x.hidden.clone().requires_grad_(True), x.weight, x.bias)
        return x.clone().requires_grad_(True) if x.is_floating_point() else x

    leaves = [leaf(x) for x in inputs]
    value = loss(*leaves)
    tensors = [x.hidden if isinstance(x, HeadInput) else x for x in leaves]
    differentiable = [x for x in tensors if x.requires_grad]
    grads = (
        torch.autograd.grad(value, differentiable, allow_unused=True) if value.requires_grad else []
    )
    return value, [g for g in grads if g is not None]


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_non_negative_with_finite_gradients(name):
    shape = layout_or_skip(name)
    loss = create_loss(name, **CONSTRUCTOR_ARGS.get(name, {}))

    @PROPERTY_SETTINGS
    @given(student=tensors(shape, 30.0), teacher=tensors(shape, 30.0), target=targets(name, shape))
    def check(student, teacher, target):
        value, grads = value_and_grads(loss, make_inputs(loss, shape, student, teacher, target))
        assert value.dim() == 0
        assert torch.isfinite(value), f"{name} gave {value.item()}"
        assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
        if name not in MAY_BE_NEGATIVE:
            # exact maths says >= 0; allow float32 rounding of a sum of O(1) terms
            assert value.item() >= -1e-5 * max(1.0, abs(value.item())), f"{name}: {value.item()}"

    check()


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_for_large_inputs(name):
    """Logits of ±1e4 (far past exp's float32 range) must not overflow into inf or NaN."""
    shape = layout_or_skip(name)
    loss = create_loss(name, **CONSTRUCTOR_ARGS.get(name, {}))
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(shape, generator=generator) * 1e4
    teacher = torch.randn(shape, generator=generator) * 1e4
    target = random_target(name, shape, generator)
    value, grads = value_and_grads(loss, make_inputs(loss, shape, student, teacher, target))
    assert torch.isfinite(value), f"{name} gave {value.item()}"
    assert all(torch.isfinite(g).all() for g in grads)


def spread_everywhere(x: torch.Tensor) -> bool:
    """Every row varies across classes and every class varies across the batch.

    Correlation-based losses (DIST) define ρ of a constant vector as 0, so for such degenerate
    inputs 'student = teacher' does not give a zero loss; those draws are not the property's.
    """
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    rows = flat.amax(dim=1) - flat.amin(dim=1)
    columns = flat.amax(dim=0) - flat.amin(dim=0)
    return bool((rows > 0.05).all() and (columns > 0.05).all())


@pytest.mark.parametrize("name", [n for n in TEACHER_LOSSES if n not in NOT_ZERO_AT_EQUALITY])
def test_loss_is_zero_when_student_equals_teacher(name):
    shape = layout_or_skip(name)
    loss = create_loss(name, **CONSTRUCTOR_ARGS.get(name, {}))

    @PROPERTY_SETTINGS
    @given(same=tensors(shape, 8.0), target=targets(name, shape))
    def check(same, target):
        assume(spread_everywhere(same))
        if name in PER_VECTOR_COSINE:
            assume(bool((same.abs().amax(dim=-1) > 0.05).all()))
        value = loss(*make_inputs(loss, shape, same, same.clone(), target))
        assert abs(value.item()) <= 1e-4, f"{name}(x, x) = {value.item()}"

    check()


@pytest.mark.parametrize("name", TEACHER_LOSSES)
def test_loss_is_positive_when_student_differs_from_teacher(name):
    """The zero test above cannot pass by a loss that is always zero."""
    shape = layout_or_skip(name)
    loss = create_loss(name, **CONSTRUCTOR_ARGS.get(name, {}))
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(shape, generator=generator) * 3
    teacher = torch.randn(shape, generator=generator) * 3
    target = random_target(name, shape, generator)
    assert loss(*make_inputs(loss, shape, student, teacher, target)).item() > 1e-3
