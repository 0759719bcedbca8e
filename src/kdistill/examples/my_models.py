"""Two models as a user's project would define them: plain `nn.Module`s with their own
constructor arguments (`channels`, `classes`, `width`), unknown to kdistill's registry.

A recipe names them by import path and gives exactly their arguments::

    teacher:
      model: kdistill.examples.my_models:WideCNN
      kwargs: {channels: 1, classes: 10, width: 32}

`resnet18_gray` adapts torchvision's ResNet-18 (random init) to one input channel; it needs
torchvision, which must match the installed torch.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TinyCNN", "WideCNN", "resnet18_gray"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class WideCNN(nn.Module):
    """Teacher: three conv blocks (width, 2·width, 4·width channels), global pooling, a linear
    classifier. Input `N×channels×H×W` (H, W ≥ 8) → logits `N×classes`."""

    def __init__(self, channels: int, classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _block(channels, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class TinyCNN(nn.Module):
    """Student: two narrow conv blocks and a linear classifier; `N×channels×H×W` →
    `N×classes`."""

    def __init__(self, channels: int, classes: int, width: int = 4):
        super().__init__()
        self.features = nn.Sequential(_block(channels, width), _block(width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def resnet18_gray(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18, randomly initialised, with a one-channel 3×3 stem (for 28×28
    grayscale images the 7×7 stride-2 stem and max-pool would shrink them to 7×7 at once)."""
    try:
        from torchvision.models import resnet18
    except Exception as error:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        raise ImportError(
            "resnet18_gray needs torchvision matching your torch (pip install 'kdistill[vision]'): "
            f"{type(error).__name__}: {error}"
        ) from None
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
