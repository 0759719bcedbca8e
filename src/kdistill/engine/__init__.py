"""The engine: runs epochs of training, evaluation and checkpointing for any Distiller."""

from kdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from kdistill.engine.config import TrainConfig
from kdistill.engine.loop import FitResult, MetricsLog, fit, trained_state
from kdistill.engine.metrics import Accuracy, evaluate_classifier, predict

__all__ = [
    "Accuracy",
    "FitResult",
    "MetricsLog",
    "TrainConfig",
    "evaluate_classifier",
    "fit",
    "load_checkpoint",
    "predict",
    "save_checkpoint",
    "trained_state",
]
