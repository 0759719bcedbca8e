"""kdistill: knowledge distillation for PyTorch.

import kdistill as kd
from kdistill import losses as L

distiller = kd.Distiller(teacher, student, terms=[
    kd.Term(L.KD(temperature=4.0), weight=0.9),
    kd.Term(L.CE(), weight=0.1),
])
out = distiller(images, target=labels)   # out.loss, out.parts, out.student_output

Module paths changed by issue 26 (`kdistill.cache`, `kdistill.taps`, …) still import: see
`kdistill._aliases`.
"""

from kdistill import _aliases, losses
from kdistill.allocator import retain_freed_memory
from kdistill.distill.distiller import Distiller, DistillOutput, Term
from kdistill.distill.multitask import multitask_terms
from kdistill.distill.taps import Taps
from kdistill.distill.teacher.store import TeacherCache, build_teacher_cache
from kdistill.engine import TrainConfig, fit
from kdistill.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    KdistillError,
    LayerNotFoundError,
    NonFiniteLossError,
    TeacherSpeedupError,
)

_aliases.install()

__version__ = "0.1.0"

__all__ = [
    "CheckReport",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistillOutput",
    "Distiller",
    "KdistillError",
    "LayerNotFoundError",
    "NonFiniteLossError",
    "Taps",
    "TeacherCache",
    "TeacherSpeedupError",
    "Term",
    "TrainConfig",
    "build_teacher_cache",
    "check_pair",
    "fit",
    "losses",
    "multitask_terms",
    "retain_freed_memory",
]


def __getattr__(name: str):
    """`kd.check_pair` / `kd.CheckReport` (`kdistill.recipes.check`), imported on first use."""
    if name in ("check_pair", "CheckReport"):
        from kdistill.recipes import check

        return getattr(check, name)
    raise AttributeError(f"module 'kdistill' has no attribute {name!r}")
