"""Keyed augmentation: every augmented view is a fixed function of (seed, epoch, sample index).

Function matching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent", CVPR) distils on aggressively augmented images that teacher and student see
*identically*. When the random draws behind a view come from a counter-based hash of
``(seed, epoch, index)`` instead of a stateful generator, the view of sample i in epoch e is the
same whatever the batch it lands in, the shuffling, the number of processes or a resume — so the
teacher's outputs for E epochs of views can be computed once and replayed
(`kdistill.cache.build_view_cache`), and a training run that reads them is the online run.

An `Augmentation` makes, per sample (all parameters drawn independently per sample):

- **padded random crop** (`pad` = p > 0): the image is padded by p pixels on each side (edge
  pixels repeated by default; ``padding="zeros"`` or ``"reflect"``) and the original H×W window
  is cut at offset (dy, dx), each uniform on {0, …, 2p};
- **horizontal flip** (`flip`): with probability ½;
- **mixup** (`mixup` = α > 0; Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"):
  ``λ·A(x_i) + (1 − λ)·A'(x_j)`` with a partner j uniform over the dataset, A' its own crop and
  flip, and λ = max(B, 1 − B), B ~ Beta(α, α) — folded so that sample i always weighs at least
  ½: its label stays the batch's target (the hard loss reads the label of the dominant image;
  distillation terms read the teacher's output on the mixed view itself).

The draws use splitmix64 (integer arithmetic on uint64), so they are the same on every machine
and numpy version. Beta(α, α) is drawn by Jöhnk's rejection method (1964) from the same hash,
round r of the rejection using its own stream, so it too depends only on the key.

Augmentation applies to inputs only: a `BatchLoader` with `augmentation=` refuses targets that
are not one label per sample (a mask or boxes would no longer match the pixels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import DataError

__all__ = ["Augmentation", "uniforms"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_PADDING = {"edge": "replicate", "zeros": "constant", "reflect": "reflect"}
# independent streams of draws per sample
_DY, _DX, _FLIP, _PARTNER, _DY2, _DX2, _FLIP2 = range(7)
_BETA_STREAM = 100  # rounds of the Beta rejection use streams 100, 101, …
_BETA_MAX_ROUNDS = 10_000


def _mix_int(z: int) -> int:
    """The splitmix64 finaliser on a Python int (one 64-bit word)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def uniforms(seed: int, epoch: int, index: Tensor | np.ndarray, stream: int) -> np.ndarray:
    """float64 draws in [0, 1), one per entry of `index`, fixed by (seed, epoch, index, stream).

    ``key = mix(mix(mix(seed) + epoch) + stream)``; draw = ``mix(key + (index+1)·γ) >> 11`` · 2⁻⁵³
    (mix = the splitmix64 finaliser, γ = 0x9E3779B97F4A7C15). Independent of the batch a sample
    is in and of the machine.
    """
    key = _mix_int(_mix_int(_mix_int(seed) + epoch) + stream)
    rows = np.asarray(index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (rows + np.uint64(1)) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _beta_symmetric(alpha: float, seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """B ~ Beta(α, α) per sample by Jöhnk's method: X = U^(1/α), Y = V^(1/α), accept when
    X + Y ≤ 1 (and > 0), B = X / (X + Y); round r draws U, V from streams 100 + 2r, 101 + 2r."""
    result = np.full(len(index), np.nan)
    pending = np.arange(len(index))
    for round_ in range(_BETA_MAX_ROUNDS):
        if not len(pending):
            return result
        rows = index[pending]
        u = uniforms(seed, epoch, rows, _BETA_STREAM + 2 * round_)
        v = uniforms(seed, epoch, rows, _BETA_STREAM + 2 * round_ + 1)
        x, y = u ** (1.0 / alpha), v ** (1.0 / alpha)
        total = x + y
        accept = (total <= 1.0) & (total > 0.0)
        result[pending[accept]] = x[accept] / total[accept]
        pending = pending[~accept]
    raise DataError(f"mixup: Beta({alpha:g}, {alpha:g}) draw did not converge; use mixup <= 10")


@dataclass(frozen=True)
class Augmentation:
    """Padded random crop, horizontal flip and (optionally) mixup, keyed by (seed, epoch, index).

    `pad`: pixels of padding per side for the random crop (0: no crop); `flip`: random horizontal
    flips; `mixup`: α of Beta(α, α) (0: off; see the module docstring for λ and the label);
    `padding`: how the crop's border is filled — ``"edge"`` (repeat the edge pixels, the
    background of centred objects on a plain background), ``"zeros"`` (0 in the normalised
    input, i.e. the mean) or ``"reflect"`` (needs pad < H and W).
    """

    pad: int = 0
    flip: bool = False
    mixup: float = 0.0
    padding: Literal["edge", "zeros", "reflect"] = "edge"

    def __post_init__(self) -> None:
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"augmentation pad must be an integer >= 0, got {self.pad!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"augmentation flip must be true or false, got {self.flip!r}")
        if not (isinstance(self.mixup, int | float) and 0.0 <= self.mixup <= 10.0):
            raise ValueError(f"augmentation mixup (Beta α) must lie in [0, 10], got {self.mixup!r}")
        if self.padding not in _PADDING:
            raise ValueError(
                f"augmentation padding must be one of {sorted(_PADDING)}, got {self.padding!r}"
            )

    @property
    def active(self) -> bool:
        """False when it changes nothing (no crop, no flip, no mixup)."""
        return bool(self.pad or self.flip or self.mixup)

    def describe(self) -> dict:
        """Its settings as a JSON-able dict (a cache manifest records it)."""
        return asdict(self)

    def _crop_flip(
        self, inputs: Tensor, index: np.ndarray, epoch: int, seed: int, streams: tuple
    ) -> Tensor:
        dy_stream, dx_stream, flip_stream = streams
        n, _, height, width = inputs.shape
        out = inputs
        if self.pad:
            p = self.pad
            if self.padding == "reflect" and p >= min(height, width):
                raise DataError(
                    f"augmentation: reflect padding of {p} pixels needs images larger than "
                    f"{p}, got {height}×{width}; use padding edge or zeros"
                )
            padded = F.pad(inputs, (p, p, p, p), mode=_PADDING[self.padding])
            span = 2 * p + 1
            dy = torch.from_numpy((uniforms(seed, epoch, index, dy_stream) * span).astype(np.int64))
            dx = torch.from_numpy((uniforms(seed, epoch, index, dx_stream) * span).astype(np.int64))
            rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
            samples = torch.arange(n)[:, None, None, None]
            channels = torch.arange(inputs.shape[1])[None, :, None, None]
            out = padded[samples, channels, rows, cols]
        if self.flip:
            flips = torch.from_numpy(uniforms(seed, epoch, index, flip_stream) < 0.5)
            out = torch.where(flips[:, None, None, None], out.flip(-1), out)
        return out

    def apply(
        self,
        inputs: Tensor,
        index: Tensor,
        epoch: int,
        seed: int,
        partners: Callable[[Tensor], Tensor] | None = None,
        size: int | None = None,
    ) -> Tensor:
        """The views of `inputs` (N×C×H×W, the samples at dataset positions `index`) in `epoch`.

        `partners(indices)` returns the inputs of other dataset samples and `size` the dataset's
        length (both needed for mixup only). Returns a new tensor (never `inputs` modified).
        """
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise DataError(
                f"augmentation crops and flips images: inputs must be an N×C×H×W tensor, got "
                f"{shape}"
            )
        if not inputs.is_floating_point():
            raise DataError(f"augmentation needs floating-point inputs, got {inputs.dtype}")
        rows = index.detach().cpu().numpy().astype(np.int64)
        views = self._crop_flip(inputs, rows, epoch, seed, (_DY, _DX, _FLIP))
        if not self.mixup:
            return views if views is not inputs else inputs.clone()
        if partners is None or size is None:
            raise DataError("mixup needs the dataset to draw partner samples from")
        partner = (uniforms(seed, epoch, rows, _PARTNER) * size).astype(np.int64)
        others = partners(torch.from_numpy(partner))
        others = self._crop_flip(others, rows, epoch, seed, (_DY2, _DX2, _FLIP2))
        beta = _beta_symmetric(float(self.mixup), seed, epoch, rows)
        lam = torch.from_numpy(np.maximum(beta, 1.0 - beta)).to(inputs.dtype)[:, None, None, None]
        return views * lam + others * (1.0 - lam)
