"""TensorBoard and MLflow trackers (they live in `kdistill.engine.trackers`, which `kd.fit`
calls; this is where integrations are looked for)."""

from kdistill.engine.trackers import (
    MLflowTracker,
    TensorBoardTracker,
    Tracker,
    flat_scalars,
    open_trackers,
)

__all__ = ["MLflowTracker", "TensorBoardTracker", "Tracker", "flat_scalars", "open_trackers"]
