"""Post-training int8 quantization (CPU), with PyTorch's eager and FX-graph-mode tools.

- `quantize_dynamic_linear`: Linear layers get int8 weights; their activations are quantized on
  the fly per batch (`torch.ao.quantization.quantize_dynamic`). No calibration.
- `quantize_static`: convolutions (with their fused BatchNorm/ReLU), pools and residual adds run
  in int8 with activation ranges fixed by calibration (FX graph mode: `prepare_fx` inserts
  observers, calibration batches run through them, `convert_fx` swaps in int8 kernels; the x86
  (fbgemm) qconfig: per-channel symmetric weights, per-tensor affine uint8 activations with a
  histogram observer), and Linear layers are then quantized dynamically as above.

Both return new modules and leave the float model untouched. torch 2.13 still ships these
`torch.ao.quantization` APIs (the FX path warns that it is deprecated in favour of
`torch.ao.quantization.pt2e`); the int8 kernels run on CPU only.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

ENGINE = "x86"


def _use_engine(engine: str = ENGINE) -> None:
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"quantized engine {engine!r} is not available in this torch build "
            f"(supported: {torch.backends.quantized.supported_engines})"
        )
    torch.backends.quantized.engine = engine


def _linear_types() -> set[type[nn.Module]]:
    import torch.ao.nn.intrinsic as nni

    return {nn.Linear, nni.LinearReLU}


def quantize_dynamic_linear(model: nn.Module) -> nn.Module:
    """A copy of `model` whose Linear layers hold int8 weights (dynamic activation scales)."""
    from torch.ao.quantization import quantize_dynamic

    _use_engine()
    float_model = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():  # the quantized-tensor APIs warn that they are deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(float_model, _linear_types(), dtype=torch.qint8)


def quantize_static(
    model: nn.Module, calibration: Iterable[Tensor], example_input: Tensor
) -> nn.Module:
    """Static int8 for convolutions (calibrated on `calibration` batches), dynamic for Linear.

    `calibration`: input batches (e.g. a few training batches); `example_input` fixes the graph
    trace. The model must be traceable by `torch.fx` (the registry's models are).
    """
    import torch.ao.nn.intrinsic as nni
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _use_engine()
    float_model = copy.deepcopy(model).cpu().eval()
    # Linear layers stay float here (their fused LinearReLU too) and go dynamic afterwards.
    mapping = (
        get_default_qconfig_mapping(ENGINE)
        .set_object_type(nn.Linear, None)
        .set_object_type(nni.LinearReLU, None)
    )
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        prepared = prepare_fx(float_model, mapping, (example_input.cpu(),))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch.cpu())
                seen += 1
        if seen == 0:
            raise ValueError("static quantization needs at least one calibration batch")
        converted = convert_fx(prepared)
        return quantize_dynamic(converted, _linear_types(), dtype=torch.qint8)
