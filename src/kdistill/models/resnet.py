"""CIFAR-style ResNets (He et al. 2016, "Deep Residual Learning", §4.2) for small images.

Depth 6n + 2: a 3×3 stem, three stages of n BasicBlocks with widths w, 2w, 4w and strides
1, 2, 2, global average pooling and a linear classifier. Any input of at least 1×1 works
(28×28 and 8×8 included), since the pool adapts to whatever the last stage leaves.

Module names, as `named_modules()` spells them (useful for feature taps):

- `stem.conv`, `stem.bn`, `stem.relu`
- `layer1` … `layer3` (stages), `layer2.0` (a block: its output is after the final ReLU),
  `layer2.0.conv1`, `.bn1`, `.relu1`, `.conv2`, `.bn2`, `.shortcut`, `.relu2`;
  `.shortcut` is `nn.Identity` or a `Sequential` of `conv` (1×1) and `bn`
- `pool`, `flatten` (the N×4w embedding), `fc` (logits)

Convs have no bias (BatchNorm follows each) and Kaiming-normal init (fan-out, ReLU gain);
BatchNorm starts at weight 1, bias 0. ReLUs are separate and not in-place, so a hook on a
conv or BN keeps the tensor it saw.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3×3 convs.

    The shortcut is the identity when shape is kept, else a strided 1×1 conv + BN
    (the paper's option B).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def blocks_per_stage(depth: int) -> int:
    """n for a CIFAR ResNet of depth 6n + 2; raises ValueError for other depths."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, …), got {depth}"
        )
    return (depth - 2) // 6


class ResNet(nn.Module):
    """A CIFAR-style ResNet of the given depth (6n + 2) and base width w."""

    def __init__(
        self,
        *,
        depth: int = 20,
        width: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
    ):
        super().__init__()
        n = blocks_per_stage(depth)
        for value, name in (
            (width, "width"),
            (in_channels, "in_channels"),
            (num_classes, "num_classes"),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.depth = depth
        self.stem = nn.Sequential(
            OrderedDict(
                conv=_conv3x3(in_channels, width),
                bn=nn.BatchNorm2d(width),
                relu=nn.ReLU(),
            )
        )
        self.layer1 = self._stage(width, width, n, stride=1)
        self.layer2 = self._stage(width, 2 * width, n, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)
        self._init_weights()

    @staticmethod
    def _stage(in_channels: int, out_channels: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet8(*, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """CIFAR ResNet-8: one BasicBlock per stage."""
    return ResNet(depth=8, width=width, in_channels=in_channels, num_classes=num_classes)


def resnet14(*, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """CIFAR ResNet-14: two BasicBlocks per stage."""
    return ResNet(depth=14, width=width, in_channels=in_channels, num_classes=num_classes)


def resnet20(*, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """CIFAR ResNet-20: three BasicBlocks per stage."""
    return ResNet(depth=20, width=width, in_channels=in_channels, num_classes=num_classes)


def resnet32(*, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """CIFAR ResNet-32: five BasicBlocks per stage."""
    return ResNet(depth=32, width=width, in_channels=in_channels, num_classes=num_classes)
