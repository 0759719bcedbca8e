"""What a model costs to keep and to run: parameters, MACs, serialized size, latency, memory.

Conventions (stated once here and in every table that shows them):

- **params**: scalar weights, shared tensors once, buffers (BatchNorm statistics) not counted.
  Quantized modules keep their weights packed, outside `parameters()`; their int8 weights and
  float biases are counted element by element, so an int8 model has the same count as its float
  original.
- **MACs**: multiply-accumulates of one sample (batch 1), = FLOPs / 2 as counted by PyTorch's
  `torch.utils.flop_counter.FlopCounterMode`, which counts matrix multiplies and convolutions
  (2 FLOPs per multiply-add) and nothing else (no bias adds, activations, pooling, BatchNorm).
  Int8 kernels are invisible to the counter: for a quantized model pass `reference=` the float
  model it came from (same arithmetic, int8 instead of fp32).
- **size**: bytes of the state dict serialized as safetensors (header included). Quantized
  tensors are stored as their int8 values plus their scales and zero points.
- **latency**: median wall time of one forward pass (`torch.inference_mode`, eval mode) over
  `repeats` runs after `warmup` runs, at each batch size, with `torch.set_num_threads(threads)`.
- **peak memory**: parameters and buffers, plus the most bytes held at once by the tensors the
  forward pass creates (tracked per storage by a `TorchDispatchMode`, freed when the last
  tensor of a storage dies), at the largest measured batch size. Scratch memory that a kernel
  allocates internally (e.g. oneDNN workspaces) is invisible to it.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

DEFAULT_BATCH_SIZES = (1, 64)


@dataclass
class ModelCost:
    """The cost of one model; `latency_ms` maps batch size → median milliseconds."""

    params: int
    macs: int
    size_bytes: int
    latency_ms: dict[int, float]
    threads: int
    peak_bytes: int
    peak_batch: int

    def as_dict(self) -> dict:
        data = asdict(self)
        data["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        return data


def _quantized_weights(module: nn.Module) -> list[Tensor]:
    """Weights (and bias) a quantized module keeps packed; [] for an ordinary module."""
    weight = getattr(module, "weight", None)
    if not callable(weight):  # an ordinary module's weight is a Parameter, not a method
        return []
    tensors = [weight()]
    bias = getattr(module, "bias", None)
    if callable(bias) and bias() is not None:
        tensors.append(bias())
    return tensors


def count_weights(model: nn.Module) -> int:
    """Parameters, plus the packed weights of quantized modules (see the module docstring)."""
    tensors: list[Tensor] = []  # kept alive so that ids are not reused while counting
    for module in model.modules():
        tensors += list(module.parameters(recurse=False)) + _quantized_weights(module)
    return sum({id(tensor): tensor.numel() for tensor in tensors}.values())


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example` (FLOPs / 2, PyTorch's counter)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _plain_tensors(prefix: str, value, out: dict[str, Tensor]) -> None:
    """Flatten a state-dict value into plain tensors safetensors can store."""
    if isinstance(value, Tensor):
        if value.is_quantized:
            out[prefix] = value.int_repr()
            if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                out[prefix + ".scale"] = torch.tensor([value.q_scale()], dtype=torch.float64)
                out[prefix + ".zero_point"] = torch.tensor([value.q_zero_point()])
            else:
                out[prefix + ".scales"] = value.q_per_channel_scales()
                out[prefix + ".zero_points"] = value.q_per_channel_zero_points()
        else:
            out[prefix] = value.detach()
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _plain_tensors(f"{prefix}.{index}", item, out)
    # other entries (dtypes, ints of packed params) are implied by the architecture


def serialized_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict as plain, contiguous CPU tensors (quantized → int8 + scales)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        _plain_tensors(key, value, out)
    return {k: v.cpu().contiguous() for k, v in out.items()}


def serialized_size(model: nn.Module) -> int:
    """Bytes of `serialized_state(model)` written as safetensors (header included)."""
    state = serialized_state(model)
    # safetensors refuses tensors sharing memory; clone those that alias an earlier one
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        span = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        if value.numel() and span in seen:
            state[key] = value.clone()
        seen.add(span)
    return len(safetensors_save(state))


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by the ops it sees, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage key → [tracked tensors alive, nbytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                self._track(value)
        return out

    def _track(self, tensor: Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. quantized tensors without storage
            key, nbytes = id(tensor), tensor.numel() * tensor.element_size()
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]


def state_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers as held in memory (packed weights included)."""
    total = 0
    for tensor in serialized_state(model).values():
        total += tensor.numel() * tensor.element_size()
    return total


def peak_memory(model: nn.Module, example: Tensor) -> int:
    """Weights in memory plus the peak bytes of tensors created by one forward pass."""
    was_training = model.training
    model.eval()
    tracker = _LiveTensorBytes()
    try:
        with torch.inference_mode(), tracker:
            output = model(example)
        del output
    finally:
        model.train(was_training)
    return state_bytes(model) + tracker.peak


def median_latency_ms(model: nn.Module, example: Tensor, repeats: int, warmup: int) -> float:
    """Median milliseconds of `model(example)` over `repeats` timed runs after `warmup` runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        for _ in range(repeats):
            started = time.perf_counter()
            model(example)
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def model_cost(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    threads: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    reference: nn.Module | None = None,
    seed: int = 0,
) -> ModelCost:
    """Measure `model` on random inputs of shape `(batch, *input_shape)` (CPU).

    `reference`: the float model a quantized `model` was made from; parameters and MACs are
    counted on it (the int8 kernels are invisible to the flop counter). The thread count in
    effect before the call is restored afterwards.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not batch_sizes:
        raise ValueError("batch_sizes is empty")
    generator = torch.Generator().manual_seed(seed)
    examples = {b: torch.randn(b, *input_shape, generator=generator) for b in batch_sizes}
    counted = reference if reference is not None else model
    was_training = model.training
    previous_threads = torch.get_num_threads()
    model.eval()
    try:
        torch.set_num_threads(threads)
        latency = {b: median_latency_ms(model, examples[b], repeats, warmup) for b in batch_sizes}
        peak_batch = max(batch_sizes)
        peak = peak_memory(model, examples[peak_batch])
        macs = count_macs(counted, examples[1] if 1 in examples else examples[peak_batch][:1])
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return ModelCost(
        params=count_weights(counted),
        macs=macs,
        size_bytes=serialized_size(model),
        latency_ms=latency,
        threads=threads,
        peak_bytes=peak,
        peak_batch=peak_batch,
    )


def format_count(value: float) -> str:
    """3,210 → "3.2 k", 6.5e6 → "6.5 M" (SI prefixes)."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g} {suffix}"
    return f"{value:.0f}"


def format_bytes(value: float) -> str:
    """Bytes in KiB/MiB (binary prefixes)."""
    for limit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= limit:
            return f"{value / limit:.3g} {suffix}"
    return f"{value:.0f} B"


COST_NOTE = (
    "Cost: params = weights (buffers not counted); MACs per sample = FLOPs / 2 of PyTorch's "
    "flop counter (matmuls and convolutions only); size = safetensors file of the state dict "
    "(int8 tensors as int8 + scales); latency = median of repeated CPU forward passes after "
    "warm-up, at the stated thread count; peak mem = weights + the most bytes held at once by "
    "the tensors a forward pass creates."
)
