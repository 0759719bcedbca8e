"""Taps: capture the outputs of modules picked by their `named_modules()` name, with forward hooks.

A tap keeps the output of the **last** call of its module in a forward pass (a module called
twice, e.g. a shared block, reports its second output); `calls[name]` counts the calls since the
last `clear()`, so a caller can detect reuse.

A tap holds a **copy** of the module's output, taken when the hook runs: code after the module
may change the output in place (`out += identity; out = relu_(out)` in a torchvision
`BasicBlock`, `nn.ReLU(inplace=True)`), and a kept reference would then hand over the changed
tensor, not the module's output. The copy is differentiable (`Tensor.clone`: the gradient flows
back into the module as through the original); an inference-mode output (a teacher under
`torch.inference_mode`) is copied into a normal tensor, which autograd may save. Cost: one
memory copy of each tapped tensor per forward (resnet20's `layer2` at batch 128, 3.2 MB: about
0.1 ms on a CPU core; `bench/bench_speed.py` reports it against a training step).

Hooks are put on by the constructor and by `attach()`, and removed by `detach()`, `close()` or on
leaving a `with` block, including when an error is raised inside it; a detached `Taps` keeps its
names and can be attached again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from kdistill.errors import LayerNotFoundError
from kdistill.losses.chunked import HeadInput
from kdistill.registry import close_matches


def find_modules(
    model: nn.Module, names: Iterable[str], model_label: str = "model"
) -> dict[str, nn.Module]:
    """Map each name to its submodule; an unknown name fails with the closest valid names."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for name in names:
        if name not in modules:
            valid = [n for n in modules if n]
            suggestions = close_matches(name, valid, n=5)
            hint = f"; closest: {', '.join(suggestions)}" if suggestions else ""
            raise LayerNotFoundError(
                f"{model_label} ({type(model).__name__}) has no module named {name!r}{hint}. "
                f"Valid names are those of model.named_modules(), e.g. {', '.join(valid[:8])}"
            )
        found[name] = modules[name]
    return found


def snapshot(output: Tensor) -> Tensor:
    """A copy of `output` that later in-place operations on `output` cannot change.

    Differentiable for a tensor in an autograd graph; a normal (not inference-mode) tensor for an
    inference-mode one, so that the copy may enter a graph as a constant.
    """
    # under torch.compile the copy is an output of the compiled graph (is_inference() cannot be
    # traced); the caller makes it a normal tensor (`teacher_speedup.FastTeacher.normal`)
    if not torch.compiler.is_compiling() and output.is_inference():
        with torch.inference_mode(False):
            return output.clone()
    return output.clone()


class Taps:
    """Forward hooks on named modules; `outputs[name]` holds a copy of each one's latest output."""

    def __init__(self, model: nn.Module, names: Iterable[str], model_label: str = "model"):
        self.model_label = model_label
        self.names = list(dict.fromkeys(names))
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self._modules = find_modules(model, self.names, model_label)
        self._handles: list = []
        self.attach()

    def _recorder(self, name: str):
        def record(module: nn.Module, inputs, output) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"{self.model_label} layer {name!r} ({type(module).__name__}) returned "
                    f"{type(output).__name__}, not a tensor; tap a module that returns a tensor "
                    f"(e.g. one of its children)"
                )
            self.outputs[name] = snapshot(output)
            self.calls[name] = self.calls.get(name, 0) + 1

        return record

    def attach(self) -> None:
        """Put the hooks on (again); nothing happens when they are on already."""
        if not self._handles:
            self._handles = [
                module.register_forward_hook(self._recorder(name))
                for name, module in self._modules.items()
            ]

    def detach(self) -> None:
        """Remove the hooks (the model then pickles and scripts as if never tapped); the
        outputs recorded so far are dropped. `attach()` puts them back."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.outputs = {}
        self.calls = {}

    def collect(self) -> dict[str, Tensor]:
        """The outputs of the last forward pass; a module that never ran is an error."""
        missing = [name for name in self.names if name not in self.outputs]
        if missing:
            raise RuntimeError(
                f"{self.model_label} layers {missing} were not called in the forward pass; "
                "tap modules that the model's forward actually uses"
            )
        return dict(self.outputs)

    def close(self) -> None:
        """Remove the hooks (the same as `detach`)."""
        self.detach()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class HeadCapture:
    """The input of a model's linear output head, captured instead of running the head.

    Inside `capturing()`, the module named `name` (e.g. ``"lm_head"``, an ``nn.Linear`` or any
    module with a ``V×D`` `weight` and an optional `bias`) does not compute its output: it
    records its input (the last hidden states ``…×D``) and returns a zero-stride placeholder
    ``hidden.new_zeros(()).expand(…, V)`` of the logits' shape, which takes no memory. Leaving
    the block restores the module's own forward, also on an error. `take(output)` then checks
    that the model's output *is* that placeholder — a model that post-processes its logits
    (softcapping, scaling, slicing) would make a loss computed from the head's input silently
    differ, so that is an error naming the head — and returns
    `kdistill.losses.chunked.HeadInput` (hidden states, weight, bias). Used by the `Distiller`
    for `ChunkedTokenLoss` terms.
    """

    def __init__(self, model: nn.Module, name: str, model_label: str = "model"):
        self.name = name
        self.model_label = model_label
        self.module = find_modules(model, [name], model_label)[name]
        weight = getattr(self.module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise TypeError(
                f"{model_label} module {name!r} ({type(self.module).__name__}) must be a linear "
                f"output head with a V×D weight (e.g. nn.Linear), got weight {got}; name the "
                "module that maps the last hidden states to the logits"
            )
        self.hidden: Tensor | None = None
        self.placeholder: Tensor | None = None
        self.calls = 0

    def clear(self) -> None:
        self.hidden = self.placeholder = None
        self.calls = 0

    def _stub(self, hidden: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or not isinstance(hidden, Tensor):
            raise TypeError(
                f"{self.model_label} head {self.name!r} was called with other arguments than "
                "one tensor of hidden states; a chunked loss needs a plain linear head"
            )
        self.calls += 1
        self.hidden = snapshot(hidden)  # as a tap: later in-place changes cannot reach it
        vocab = self.module.weight.shape[0]
        with torch.inference_mode(False):
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            self.placeholder = zero.expand(*hidden.shape[:-1], vocab)
        return self.placeholder

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Within the block, the head records its input instead of running."""
        self.clear()
        self.module.forward = self._stub  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            del self.module.forward

    def take(self, output: Tensor, where: str = "output") -> HeadInput:
        """The captured hidden states and the head's parameters; `output` (the tensor the
        model returned for the logits) must be the head's placeholder."""
        if self.calls != 1 or self.hidden is None:
            raise RuntimeError(
                f"{self.model_label} head {self.name!r} was called {self.calls} times in the "
                "forward pass; a chunked loss needs a head called exactly once on the hidden "
                "states (name the model's output head)"
            )
        if output is not self.placeholder:
            raise ValueError(
                f"the {self.model_label}'s {where} is not what its head {self.name!r} returned: "
                "the model changes the logits after the head (softcapping, scaling, slicing, a "
                "cast), so a loss computed from the head's input would be wrong; use the dense "
                "loss on the logits (e.g. ForwardKL instead of ChunkedTokenLoss), or name the "
                "module whose output is the model's logits"
            )
        return HeadInput.of(self.hidden, self.module)

    def is_placeholder(self, value: object) -> bool:
        return self.placeholder is not None and value is self.placeholder
