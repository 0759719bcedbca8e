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
- **latency**: wall time of one forward pass (`torch.inference_mode`, eval mode), `repeats`
  timed runs after `warmup` runs at each batch size, with `torch.set_num_threads(threads)`;
  reported as the median with the interquartile range and the extremes. The architectures of a
  run are timed together in one interleaved pass (`CostBook.measure_latency`: round-robin, one
  forward pass of each in turn, the order rotated every round), so a change of the machine's
  load during the pass falls on all of them alike instead of on whichever was timed at that
  moment. It is the latency of this machine at that moment, not a property of the model.
- **architecture**: costs are kept per architecture (`architecture_key`: module types, their
  settings and the names, shapes and dtypes of the state dict, not the weights' values or the
  name the recipe gives the model), so every row of one architecture shows the same figures.
- **peak memory**: parameters and buffers, plus the most bytes held at once by the tensors the
  forward pass creates (tracked per storage by a `TorchDispatchMode`, freed when the last
  tensor of a storage dies), at the largest measured batch size. Scratch memory that a kernel
  allocates internally (e.g. oneDNN workspaces) is invisible to it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import statistics
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

DEFAULT_BATCH_SIZES = (1, 64)
_clock = time.perf_counter  # the latency clock (a test replaces it)


@dataclass
class ModelCost:
    """The cost of one architecture. `latency_ms` maps batch size → median milliseconds,
    `latency_iqr_ms` → (first, third quartile), `latency_range_ms` → (fastest, slowest), over
    `repeats` timed passes; `timed_with` architectures shared the interleaved pass, which
    started at `measured_at` (UTC) with the machine's 1-minute `load_average`."""

    params: int
    macs: int
    size_bytes: int
    latency_ms: dict[int, float]
    threads: int
    peak_bytes: int
    peak_batch: int
    latency_iqr_ms: dict[int, tuple[float, float]] = field(default_factory=dict)
    latency_range_ms: dict[int, tuple[float, float]] = field(default_factory=dict)
    repeats: int = 0
    architecture: str = ""
    timed_with: int = 1
    measured_at: str = ""
    load_average: float | None = None

    def as_dict(self) -> dict:
        data = asdict(self)
        for key in ("latency_ms", "latency_iqr_ms", "latency_range_ms"):
            data[key] = {str(k): v for k, v in getattr(self, key).items()}
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
    (times,) = interleaved_times([model], [example], repeats, warmup)
    return statistics.median(times[0])


def interleaved_times(
    models: Sequence[nn.Module], examples: Sequence[Tensor], repeats: int, warmup: int
) -> list[list[list[float]]]:
    """Milliseconds of each forward pass: ``[model][example][repeat]``, timed round-robin.

    Every model and example is run `warmup` times first; then each of the `repeats` rounds runs
    every example once through every model, one pass at a time, the models' order rotated by
    one each round (none is always first after another). A change of load during the pass is
    shared by all models instead of landing on the one being timed."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = [[[] for _ in examples] for _ in models]
    count = len(models)
    with torch.inference_mode():
        for model in models:
            for example in examples:
                for _ in range(warmup):
                    model(example)
        for round_ in range(repeats):
            for position in range(count):
                index = (round_ + position) % count
                model = models[index]
                for slot, example in enumerate(examples):
                    started = _clock()
                    model(example)
                    times[index][slot].append(1000 * (_clock() - started))
    return times


def latency_summary(
    times: Sequence[float],
) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """(median, (first quartile, third quartile), (min, max)) of `times` (inclusive quartiles,
    the median's interpolation; one time gives a zero-width spread)."""
    median = statistics.median(times)
    if len(times) < 2:
        return median, (median, median), (median, median)
    first, _, third = statistics.quantiles(times, n=4, method="inclusive")
    return median, (first, third), (min(times), max(times))


_WEIGHT_DERIVED = re.compile(r",?\s*(scale|zero_point)=[^,]*")


def architecture_key(
    model: nn.Module, input_shape: Sequence[int] = (), reference: nn.Module | None = None
) -> str:
    """A digest of what a model's cost depends on: each submodule's name, class and settings
    (`extra_repr`, a quantized module's scale and zero point left out), the names, shapes and
    dtypes of its state dict, the input shape, and `reference`'s key (params and MACs are
    counted on it). Not the values of the weights, nor the name a recipe gives the model: two
    students of one architecture share the key; one more channel changes it."""
    modules = [
        [
            name,
            f"{type(m).__module__}.{type(m).__qualname__}",
            _WEIGHT_DERIVED.sub("", m.extra_repr()),
        ]
        for name, m in model.named_modules()
    ]
    state: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():  # no copy: only shapes and dtypes are read
        _plain_tensors(name, value, state)
    tensors = [[k, list(v.shape), str(v.dtype)] for k, v in state.items()]
    described = {"modules": modules, "tensors": tensors, "input": list(input_shape)}
    if reference is not None:
        described["reference"] = architecture_key(reference, input_shape)
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


@dataclass
class _Entry:
    model: nn.Module
    reference: nn.Module | None
    cost: dict  # ModelCost.as_dict(), shared by every row of the architecture
    names: list[str]


class CostBook:
    """The costs of a run's architectures, each measured once (`architecture_key`).

    `add` counts parameters and MACs and measures size and peak memory when an architecture is
    first seen and returns its cost dict (`ModelCost.as_dict()`); every later model of that
    architecture gets the same dict object. `measure_latency` then times every architecture
    added so far in one interleaved pass (`interleaved_times`) and fills in their latencies;
    until then a cost's `latency_ms` is empty (the table shows "—", never a stale figure)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        threads: int = 1,
        repeats: int = 20,
        warmup: int = 2,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        seed: int = 0,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not batch_sizes:
            raise ValueError("batch_sizes is empty")
        self.input_shape = tuple(input_shape)
        self.threads = threads
        self.repeats = repeats
        self.warmup = warmup
        self.batch_sizes = tuple(batch_sizes)
        generator = torch.Generator().manual_seed(seed)
        self.examples = {
            b: torch.randn(b, *self.input_shape, generator=generator) for b in self.batch_sizes
        }
        self.entries: dict[str, _Entry] = {}

    def add(self, model: nn.Module, reference: nn.Module | None = None, name: str = "") -> dict:
        """The cost dict of `model`'s architecture (shared); latency is left to
        `measure_latency`. `reference`: the float model a quantized `model` was made from."""
        key = architecture_key(model, self.input_shape, reference)
        entry = self.entries.get(key)
        if entry is None:
            static = self._static(model, reference, key)
            entry = self.entries[key] = _Entry(model, reference, static, [])
        if name and name not in entry.names:
            entry.names.append(name)
        return entry.cost

    def _static(self, model: nn.Module, reference: nn.Module | None, key: str) -> dict:
        counted = reference if reference is not None else model
        examples = self.examples
        peak_batch = max(self.batch_sizes)
        was_training = model.training
        previous_threads = torch.get_num_threads()
        model.eval()
        try:
            torch.set_num_threads(self.threads)
            peak = peak_memory(model, examples[peak_batch])
            macs = count_macs(counted, examples[1] if 1 in examples else examples[peak_batch][:1])
        finally:
            torch.set_num_threads(previous_threads)
            model.train(was_training)
        cost = ModelCost(
            params=count_weights(counted),
            macs=macs,
            size_bytes=serialized_size(model),
            latency_ms={},
            threads=self.threads,
            peak_bytes=peak,
            peak_batch=peak_batch,
            architecture=key,
        )
        return cost.as_dict()

    def measure_latency(self) -> None:
        """Time every architecture added so far in one interleaved pass and write the median,
        quartiles, extremes, repeats and the moment into each shared cost dict."""
        if not self.entries:
            return
        for key, entry in self.entries.items():
            if architecture_key(entry.model, self.input_shape, entry.reference) != key:
                raise RuntimeError(
                    f"the model of architecture {key} ({', '.join(entry.names) or 'unnamed'}) "
                    "was changed in place after its cost was taken: its latency would be "
                    "another architecture's"
                )
        entries = list(self.entries.values())
        models = [entry.model for entry in entries]
        training = [model.training for model in models]
        previous_threads = torch.get_num_threads()
        measured_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        load = _load_average()
        try:
            torch.set_num_threads(self.threads)
            for model in models:
                model.eval()
            batches = list(self.batch_sizes)
            times = interleaved_times(
                models, [self.examples[b] for b in batches], self.repeats, self.warmup
            )
        finally:
            torch.set_num_threads(previous_threads)
            for model, was_training in zip(models, training):
                model.train(was_training)
        for entry, per_batch in zip(entries, times):
            summaries = [latency_summary(t) for t in per_batch]
            entry.cost.update(
                latency_ms={str(b): s[0] for b, s in zip(batches, summaries)},
                latency_iqr_ms={str(b): s[1] for b, s in zip(batches, summaries)},
                latency_range_ms={str(b): s[2] for b, s in zip(batches, summaries)},
                repeats=self.repeats,
                timed_with=len(entries),
                measured_at=measured_at,
                load_average=load,
            )


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
    """Measure `model` alone on random inputs of shape `(batch, *input_shape)` (CPU); a run's
    models are measured together by a `CostBook`.

    `reference`: the float model a quantized `model` was made from; parameters and MACs are
    counted on it (the int8 kernels are invisible to the flop counter). The thread count in
    effect before the call is restored afterwards.
    """
    book = CostBook(
        input_shape,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        batch_sizes=batch_sizes,
        seed=seed,
    )
    cost = book.add(model, reference)
    book.measure_latency()
    pairs = ("latency_ms", "latency_iqr_ms", "latency_range_ms")
    fields = {k: v for k, v in cost.items() if k not in pairs}
    return ModelCost(
        **fields,
        **{key: {int(b): v for b, v in cost[key].items()} for key in pairs},
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
    "Cost, measured once per architecture (rows of one architecture share it): params = "
    "weights (buffers not counted); MACs per sample = FLOPs / 2 of PyTorch's flop counter "
    "(matmuls and convolutions only); size = safetensors file of the state dict (int8 tensors "
    "as int8 + scales); latency = median [interquartile range] of repeated CPU forward passes "
    "after warm-up, at the stated thread count, every architecture timed in one interleaved "
    "round-robin pass; peak mem = weights + the most bytes held at once by the tensors a "
    "forward pass creates."
)


def latency_note(costs: Sequence[dict]) -> str | None:
    """What the latencies are: the machine's at the moment of the pass (None when unmeasured)."""
    timed = [cost for cost in costs if cost.get("latency_ms")]
    if not timed:
        return None
    first = timed[0]
    if "measured_at" not in first:  # a results file written before the interleaved pass
        return (
            "Latency was measured model by model, each at the end of its own training (a results "
            "file written before kdistill timed all architectures in one interleaved pass): rows "
            "were timed at different moments, so their latencies also differ by the machine's "
            "load then; compare them with care."
        )
    load = first.get("load_average")
    return (
        f"Latency is this machine's at the moment it was measured ({first['measured_at']}"
        + (f", 1-minute load average {load:g}" if load is not None else "")
        + f"), not a property of the model alone: {first['timed_with']} architecture(s) timed "
        f"together, round-robin, {first['repeats']} passes each per batch size, "
        f"{first['threads']} thread(s). Another moment or machine gives other figures; compare "
        "latencies within one table only."
    )
