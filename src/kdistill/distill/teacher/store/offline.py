"""Whether stored teacher outputs can serve a training (`offline_teacher_outputs`), or the
live teacher must run: random augmentation, missing tapped layers, views of other data."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kdistill.distill.teacher.base import TeacherSource
from kdistill.distill.teacher.store.manifest import _view_key, is_randomly_augmented, loader_views
from kdistill.errors import CacheError

log = logging.getLogger("kdistill")


def offline_teacher_outputs(
    source: TeacherSource | None,
    loader: Any,
    label: str = "training",
    layers: Iterable[str] = (),
) -> TeacherSource | None:
    """`source` (stored teacher outputs for `fit`), or None — the live teacher — when it cannot
    serve this training: the loader is randomly augmented, or the terms tap teacher `layers`
    that `source` does not hold.

    Stored outputs are only exact when the student sees the very inputs the teacher saw; with
    random augmentation they are not, so distillation falls back to running the teacher online.
    A loader with keyed augmentation (`loader_views`) is served by stored *views* of the same
    augmentation and seed (`build_view_cache`); stored outputs of the plain samples fall back to
    online with a warning, and views of another augmentation or seed — or views for a loader
    that does not augment — raise CacheError.
    """
    if source is not None and not set(layers) <= set(source.layers):
        return None  # e.g. logits kept in memory, but a term taps a teacher layer
    if source is None:
        return None
    if is_randomly_augmented(loader):
        log.warning(
            "%s: the loader applies random augmentation, so cached teacher outputs would not "
            "match the augmented inputs; distilling online (the teacher runs every step)",
            label,
        )
        return None
    wanted = _view_key(loader_views(loader))
    held = _view_key(getattr(source, "views", None))
    if wanted is not None and held is None:
        log.warning(
            "%s: the loader augments its batches (%s) but the stored teacher outputs are of the "
            "plain samples; distilling online (build the teacher's outputs of the views with "
            "build_view_cache or MemoryTeacherOutputs.predict(teacher, loader, epochs=…))",
            label,
            wanted,
        )
        return None
    if wanted != held:
        raise CacheError(
            f"{label}: the stored teacher outputs are views of {held}, but the training loader "
            + (f"makes views of {wanted}" if wanted is not None else "does not augment")
            + "; build them with the loader training uses (same augmentation and augment_seed)"
        )
    return source
