"""The classic MNIST distillation pair (a wide two-conv teacher, tiny students).

Every layer is its own named submodule (ReLUs, pools and the flatten included, none of them
in-place), so `named_modules()` lists each point a tap can hook:

- `ClassicTeacher`: `conv1 relu1 pool1 conv2 relu2 pool2 flatten fc1 relu3 dropout fc2`
- `MiniStudent`:    `conv flatten fc` (no nonlinearity: the whole model is affine)
- `MiddleStudent`:  `conv1 relu1 pool1 conv2 relu2 pool2 flatten fc`

ReLUs are not in-place so that a hook on `conv1` keeps the pre-activation tensor it saw.
The models need `image_size` (square inputs) to size their first linear layer; a batch of any
other size is rejected with a message that names the expected shape.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Keep the input check a single opaque call under torch.fx tracing (feature extractors).
torch.fx.wrap("check_image_batch")


def check_image_batch(x: Tensor, in_channels: int, image_size: int, model: str) -> Tensor:
    """Return `x` unchanged if it is `N×in_channels×image_size×image_size`, else raise."""
    expected = (in_channels, image_size, image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{model} expects a batch of shape N×{in_channels}×{image_size}×{image_size}, "
            f"got {tuple(x.shape)}; pass image_size/in_channels to the constructor to change it"
        )
    return x


def _check_size(value: int, name: str, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class ClassicTeacher(nn.Module):
    """A two-conv CNN teacher (6.5 M parameters at 28×28, almost all of them in `fc1`).

    conv1 (3×3, in→64, pad 1) → ReLU → max-pool 2 → conv2 (3×3, 64→128, pad 1) → ReLU →
    max-pool 2 → flatten → fc1 (128·(s/4)² → 1024) → ReLU → Dropout(0.5) → fc2 (1024 → K).
    Pools floor odd sizes, so the flattened length is 128·⌊⌊s/2⌋/2⌋².
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        hidden: int = 1024,
        dropout: float = 0.5,
    ):
        super().__init__()
        _check_size(in_channels, "in_channels")
        _check_size(num_classes, "num_classes")
        _check_size(image_size, "image_size", minimum=4)
        self.in_channels = in_channels
        self.image_size = image_size
        pooled = image_size // 2 // 2
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(128 * pooled * pooled, hidden)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = check_image_batch(x, self.in_channels, self.image_size, type(self).__name__)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(self.dropout(x))


class MiniStudent(nn.Module):
    """The smallest student: one 7×7 stride-7 conv to a single channel, then a linear layer.

    conv (7×7, in→1, stride 7, no padding) → flatten ((s/7)² features) → fc (→ K).
    There is deliberately no nonlinearity, as in the tutorial: the model is affine in its
    input, so whatever it learns from a teacher is a linear read-out of (s/7)² patch sums.
    220 parameters at 28×28 with 10 classes.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        _check_size(in_channels, "in_channels")
        _check_size(num_classes, "num_classes")
        _check_size(image_size, "image_size", minimum=7)
        if image_size % 7 != 0:
            raise ValueError(
                f"MiniStudent needs image_size divisible by 7 (its conv has kernel and stride 7), "
                f"got {image_size}"
            )
        self.in_channels = in_channels
        self.image_size = image_size
        cells = image_size // 7
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=7, stride=7)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cells * cells, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = check_image_batch(x, self.in_channels, self.image_size, type(self).__name__)
        return self.fc(self.flatten(self.conv(x)))


class MiddleStudent(nn.Module):
    """A small two-conv student (a few thousand parameters) between the mini student and teacher.

    conv1 (3×3, in→c1, pad 1) → ReLU → max-pool 2 → conv2 (3×3, c1→c2, pad 1) → ReLU →
    max-pool 2 → flatten → fc (c2·(s/4)² → K). Defaults `channels=(4, 8)`: 4,266 parameters
    at 28×28 with 10 classes. Pools floor odd sizes as in `ClassicTeacher`.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: tuple[int, int] = (4, 8),
    ):
        super().__init__()
        _check_size(in_channels, "in_channels")
        _check_size(num_classes, "num_classes")
        _check_size(image_size, "image_size", minimum=4)
        if len(channels) != 2:
            raise ValueError(f"channels must be a pair (c1, c2), got {channels!r}")
        c1, c2 = channels
        _check_size(c1, "channels[0]")
        _check_size(c2, "channels[1]")
        self.in_channels = in_channels
        self.image_size = image_size
        pooled = image_size // 2 // 2
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * pooled * pooled, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = check_image_batch(x, self.in_channels, self.image_size, type(self).__name__)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(self.flatten(x))
