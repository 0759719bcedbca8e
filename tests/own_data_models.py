"""Models "of the user's own", by import path, for the own-data recipe tests."""

from __future__ import annotations

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """8×8 digits → 10 classes: flatten, one hidden layer."""

    def __init__(self, hidden: int = 64, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * 64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TupleDigits(DigitsMLP):
    """Returns (features, logits): the class scores are the second output."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body[2](self.body[1](self.body[0](x)))
        return features, self.body[3](features)


class DictDigits(DigitsMLP):
    """Returns {"features": …, "logits": …}."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body[2](self.body[1](self.body[0](x)))
        return {"features": features, "logits": self.body[3](features)}
