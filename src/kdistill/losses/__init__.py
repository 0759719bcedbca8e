"""kdistill losses: pure tensor functions, each also reachable by name (`create_loss("kd")`)."""

from kdistill.losses.base import LOSSES, DistillLoss, create_loss, register_loss
from kdistill.losses.chunked import (
    ChunkedTokenCE,
    ChunkedTokenLoss,
    HeadInput,
    chunked_token_loss,
)
from kdistill.losses.dense import CWD, DetLogitMSE, PixelKD
from kdistill.losses.detection import YOLOLoss, encode_targets
from kdistill.losses.feature import AT, FeatureCosine, FeatureL1, FitNet
from kdistill.losses.logit import CE, DIST, DKD, KD, HardKD, LogitMSE
from kdistill.losses.relation import CC, CRD, PKT, RKD, SP
from kdistill.losses.token import (
    TVD,
    ForwardKL,
    GeneralizedJSD,
    HiddenCosine,
    HiddenMSE,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TokenCE,
)

__all__ = [
    "LOSSES",
    "AT",
    "CC",
    "CE",
    "CRD",
    "CWD",
    "ChunkedTokenCE",
    "ChunkedTokenLoss",
    "DIST",
    "DKD",
    "KD",
    "PKT",
    "RKD",
    "SP",
    "TVD",
    "DetLogitMSE",
    "DistillLoss",
    "FeatureCosine",
    "FeatureL1",
    "FitNet",
    "ForwardKL",
    "GeneralizedJSD",
    "HiddenCosine",
    "HiddenMSE",
    "HardKD",
    "HeadInput",
    "LogitMSE",
    "PixelKD",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "TokenCE",
    "YOLOLoss",
    "chunked_token_loss",
    "create_loss",
    "encode_targets",
    "register_loss",
]
