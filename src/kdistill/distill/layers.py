"""Layer discovery: what each named module of a model outputs, and which stages to match.

`describe_layers(model, input_shape, dtype=…)` runs one forward pass on zeros (float images, or
`torch.long` token ids for language models) with a hook on every module and returns, in the
order the modules finished, each module's `named_modules()` name,
type, output shape and parameter count (its own and its children's). A module called more than
once reports its last call, as a tap would (`kdistill.taps`).

`propose_pairs(teacher_layers, student_layers)` suggests which layers feature distillation
should match, by spatial size and depth:

1. **stages**: every module with an `N×C×H×W` output (at any depth, `H×W` ≠ 1×1) is grouped by
   its size `H×W`; the last module to finish in each group ends that stage — an enclosing
   block finishes after its children, so a block that ends at that size is chosen over its
   inner layers. Every `H×W` the teacher and the student share gives one pair, deepest first
   (feature losses such as FitNet and AT compare maps of one resolution; a connector handles
   the channel counts).
2. **embedding**: the last `N×D` output (dropout aside) before the final layer on each side,
   among the model's *frontier* (its direct children, or those of its single container child),
   e.g. after global pooling and flattening: the usual input of relation losses (RKD, SP, PKT,
   CC, CRD).

The proposal is a starting point that names real modules, not a verdict: a stage whose sizes
differ between the two models is left out rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.models import count_parameters


@dataclass(frozen=True)
class LayerInfo:
    """One named module and what its last call returned."""

    name: str
    kind: str  # the module's class name
    output_shape: tuple[int, ...] | None  # None: the output is not a tensor
    params: int  # its own and its children's parameters
    depth: int  # dots in the name: 0 for a direct child of the model
    order: int  # position in the order the modules finished their forward
    structure: str = (
        ""  # for a non-tensor output: what it holds, e.g. "(16×8, 4)" or "{logits: 10}"
    )


@dataclass(frozen=True)
class LayerPair:
    """A proposed (student layer, teacher layer) match and why."""

    student: str
    teacher: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]
    reason: str


def describe_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 2,
    dtype: torch.dtype = torch.float32,
) -> list[LayerInfo]:
    """Every named module's output shape (batch dimension included) and parameter count,
    from one forward pass in eval mode on a batch of zeros of shape `(batch_size, *input_shape)`
    and `dtype` (`torch.long` for token ids: zeros are valid ids).

    Raises ConfigError naming the input when the model's forward rejects it."""
    finished: dict[str, tuple[int, nn.Module, object]] = {}
    counter = iter(range(10**9))

    def recorder(name: str):
        def record(module: nn.Module, inputs, output) -> None:
            finished.pop(name, None)  # a second call moves the module to its latest position
            finished[name] = (next(counter), module, output)

        return record

    handles = [
        module.register_forward_hook(recorder(name))
        for name, module in model.named_modules()
        if name
    ]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        inputs = torch.zeros(batch_size, *input_shape, dtype=dtype, device=device)
        with torch.inference_mode():
            try:
                model(inputs)
            except Exception as error:  # noqa: BLE001 - any failure of the user's forward
                raise ConfigError(
                    f"{type(model).__name__} cannot run on zeros of shape {tuple(inputs.shape)} "
                    f"and dtype {dtype} ({type(error).__name__}: {error}); give the input it "
                    "takes with --input (one sample, no batch dimension) and --dtype"
                ) from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers = []
    for name, (order, module, output) in sorted(finished.items(), key=lambda kv: kv[1][0]):
        shape = tuple(output.shape) if isinstance(output, Tensor) else None
        layers.append(
            LayerInfo(
                name,
                type(module).__name__,
                shape,
                count_parameters(module),
                name.count("."),
                order,
                "" if shape is not None else _structure(output),
            )
        )
    return layers


def _structure(output: object) -> str:
    """What a non-tensor output holds, shapes without the batch dimension: a tuple / list by
    position (a term picks one with `output=<position>`), a dict / ModelOutput by key."""

    def one(value: object) -> str:
        if isinstance(value, Tensor):
            return "×".join(str(size) for size in value.shape[1:]) or "scalar"
        return type(value).__name__

    if isinstance(output, Mapping):
        return "{" + ", ".join(f"{key}: {one(value)}" for key, value in output.items()) + "}"
    if isinstance(output, tuple | list):
        return "(" + ", ".join(one(value) for value in output) + ")"
    return ""


def _frontier(layers: list[LayerInfo]) -> list[LayerInfo]:
    """The top-level modules; if there is only one, its children (repeatedly)."""
    prefix = ""
    while True:
        depth = prefix.count(".") + (1 if prefix else 0)
        level = [
            layer for layer in layers if layer.depth == depth and layer.name.startswith(prefix)
        ]
        if len(level) != 1:
            return level
        prefix = level[0].name + "."


def stage_ends(layers: list[LayerInfo]) -> dict[tuple[int, int], LayerInfo]:
    """{(H, W): the last module, at any depth, with a 4-D output of that size}, ordered by when
    each stage ended."""
    ends: dict[tuple[int, int], LayerInfo] = {}
    for layer in layers:
        shape = layer.output_shape
        if shape is not None and len(shape) == 4 and shape[2:] != (1, 1):
            ends.pop(shape[2:], None)
            ends[shape[2:]] = layer
    return ends


def embedding_layer(layers: list[LayerInfo]) -> LayerInfo | None:
    """The last frontier module with an `N×D` output before the model's final module."""
    frontier = _frontier(layers)
    candidates = [  # dropout is skipped: in training it would hand over a masked copy
        layer
        for layer in frontier[:-1]
        if layer.output_shape is not None
        and len(layer.output_shape) == 2
        and not layer.kind.startswith("Dropout")
    ]
    return candidates[-1] if candidates else None


def propose_pairs(teacher: list[LayerInfo], student: list[LayerInfo]) -> list[LayerPair]:
    """Stage pairs matched by spatial size (deepest first), then the embedding pair."""
    teacher_ends, student_ends = stage_ends(teacher), stage_ends(student)
    pairs = []
    for size in reversed(list(teacher_ends)):
        if size in student_ends:
            s, t = student_ends[size], teacher_ends[size]
            channels = "same channels" if s.output_shape[1] == t.output_shape[1] else "connector"
            pairs.append(
                LayerPair(
                    s.name,
                    t.name,
                    s.output_shape,
                    t.output_shape,
                    f"stage end at {size[0]}×{size[1]} ({channels})",
                )
            )
    s_embed, t_embed = embedding_layer(student), embedding_layer(teacher)
    if s_embed is not None and t_embed is not None:
        pairs.append(
            LayerPair(
                s_embed.name,
                t_embed.name,
                s_embed.output_shape,
                t_embed.output_shape,
                "embedding before the classifier (relation losses)",
            )
        )
    return pairs


def _shape_text(shape: tuple[int, ...] | None, structure: str = "") -> str:
    if shape:
        return "×".join(str(size) for size in shape[1:])
    return structure or "(not a tensor)"


def layers_table(layers: list[LayerInfo], title: str) -> str:
    """A Markdown table of the layers, indented by depth; shapes without the batch dimension."""
    lines = [
        f"{title}",
        "",
        "| layer | type | output (per sample) | params |",
        "|---|---|---|---:|",
    ]
    for layer in layers:
        indent = "· " * layer.depth
        shape = _shape_text(layer.output_shape, layer.structure)
        lines.append(f"| {indent}`{layer.name}` | {layer.kind} | {shape} | {layer.params:,} |")
    return "\n".join(lines)


def pairs_table(pairs: list[LayerPair]) -> str:
    if not pairs:
        return "No stage of the student has a teacher stage of the same spatial size."
    lines = [
        "| student layer | teacher layer | student output | teacher output | why |",
        "|---|---|---|---|---|",
    ]
    for pair in pairs:
        lines.append(
            f"| `{pair.student}` | `{pair.teacher}` | {_shape_text(pair.student_shape)} | "
            f"{_shape_text(pair.teacher_shape)} | {pair.reason} |"
        )
    return "\n".join(lines)
