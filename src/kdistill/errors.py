"""The exceptions kdistill raises on bad input. Each message says what was wrong and where."""

from __future__ import annotations


class KdistillError(Exception):
    """Base class for kdistill's own errors."""


class DataError(KdistillError, ValueError):
    """A data file is missing, truncated, corrupt or inconsistent; the message names the file."""


class ConfigError(KdistillError, ValueError):
    """A recipe or option is invalid; the message gives the path to the bad field."""


class CheckpointError(KdistillError, ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


class LayerNotFoundError(KdistillError, KeyError):
    """A tap names a module that the model does not have; the message suggests close names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteLossError(KdistillError, FloatingPointError):
    """A loss term became NaN or infinite; the message names the term (and the step when known)."""

    def __init__(self, message: str, term: str | None = None):
        super().__init__(message)
        self.term = term


class CacheError(KdistillError, ValueError):
    """A teacher-output cache is stale, mismatched, incomplete or corrupt; the message says what
    differs (teacher weights, dataset, dtype, layers, top-k) or which file is bad."""


class LateParameterError(KdistillError, RuntimeError):
    """A forward would create a parameter (a connector, a loss's head) after the parameter list
    was read, by an optimiser perhaps, which would then never train it; the message names the
    term, its layers and the fix (`Distiller.build(example_inputs)` before the optimiser)."""


class TeacherSpeedupError(KdistillError, ValueError):
    """A teacher speed-up (`kdistill.teacher_speedup`) changed the teacher's outputs or a tapped
    layer beyond its tolerance on the first batch; the message names the step, the tensor, the
    measured drift and the fix (leave the step out)."""
