"""kdistill losses: pure tensor functions, each also reachable by name (`create_loss("kd")`)."""

from kdistill.losses.base import LOSSES, DistillLoss, create_loss, register_loss
from kdistill.losses.feature import FitNet
from kdistill.losses.logit import CE, DIST, DKD, KD, LogitMSE

__all__ = [
    "LOSSES",
    "CE",
    "DIST",
    "DKD",
    "KD",
    "DistillLoss",
    "FitNet",
    "LogitMSE",
    "create_loss",
    "register_loss",
]
