"""Mixed precision: `TrainConfig.precision` → an autocast context and a gradient scaler.

- ``fp32``: no autocast (the default; bit-exact resume holds here).
- ``bf16``: `torch.autocast(device, torch.bfloat16)` around the forward, on CPU or CUDA. bf16 has
  fp32's exponent range, so no loss scaling is needed.
- ``fp16``: `torch.autocast("cuda", torch.float16)` and a `GradScaler` (dynamic loss scaling:
  the loss is multiplied by S before backward, the gradients divided by S before the step, steps
  with inf/NaN gradients are skipped and S halved). CUDA only: the CPU has no fast fp16 kernels.

Autocast covers the models and connectors; the Distiller computes every loss term in float32
(half-precision inputs are cast up, autocast is switched off inside the loss), and evaluation runs
in float32.
"""

from __future__ import annotations

import contextlib

import torch

from kdistill.errors import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise ConfigError for a precision the device cannot train in."""
    device = torch.device(device)
    if precision not in DTYPES:
        raise ConfigError(f"train.precision: {precision!r} is not one of {sorted(DTYPES)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs a CUDA device (train.device is {str(device)!r}); "
            "use bf16 on the CPU"
        )


def autocast(precision: str, device: torch.device):
    """The context the forward runs in: autocast to the precision's dtype, or nothing for fp32."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (otherwise every method passes through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
