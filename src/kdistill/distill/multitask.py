"""Mixing hard and soft terms per output — `mix_terms`, the one place the weights of

    r · ((1 − α) · L_hard + α · Σ_i w_i · L_soft_i)

are computed (the recipes' objective builder and `multitask_terms` both call it) — and
multi-task distillation (segmentation + detection) as plain weighted terms.

With a per-task soft weight α and a per-task ratio r (DESIGN.md):

    loss = r_det·((1−α_det)·L_det_hard + α_det·L_det_soft)
         + r_seg·((1−α_seg)·L_seg_hard + α_seg·L_seg_soft)

which is four `Term`s with weights r·(1−α) and r·α, each reading one key of the models' dict
outputs (and of a dict target, for the hard terms).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from numbers import Real

from torch import nn

from kdistill.distill.distiller import Term


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_alpha(value: object, name: str) -> float:
    alpha = _check_number(value, name)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return alpha


def _check_ratio(value: object, name: str) -> float:
    ratio = _check_number(value, name)
    if ratio < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return ratio


def mix_terms(
    hard: nn.Module | None,
    soft: Sequence[Term],
    *,
    alpha: float,
    ratio: float = 1.0,
    output: str | None = None,
    hard_name: str = "hard",
    soft_name: str | None = None,
) -> list[Term]:
    """``r·((1 − α)·hard + α·Σ w_i·soft_i)`` as `Term`s: the hard term (reading `output`, named
    `hard_name`) gets weight ``r·(1 − α)``; each soft term keeps its taps and output, its weight
    w_i becomes ``(r·α)·w_i`` (and its name `soft_name`, when given). A term whose weight is 0
    is left out, so its loss may be None (a None hard loss of non-zero weight is an error)."""
    alpha = _check_alpha(alpha, "alpha")
    ratio = _check_ratio(ratio, "ratio")
    terms = []
    hard_weight = ratio * (1.0 - alpha)
    if hard_weight != 0:
        if hard is None:
            raise ValueError(
                f"{hard_name} has weight {hard_weight:g} (alpha={alpha}, ratio={ratio}) but its "
                "loss is None"
            )
        terms.append(Term(hard, weight=hard_weight, output=output, name=hard_name))
    for term in soft:
        weight = (ratio * alpha) * term.weight
        if weight != 0:
            terms.append(dataclasses.replace(term, weight=weight, name=soft_name or term.name))
    return terms


def multitask_terms(
    seg_hard: nn.Module | None,
    seg_soft: nn.Module | None,
    det_hard: nn.Module | None,
    det_soft: nn.Module | None,
    *,
    alpha_seg: float,
    alpha_det: float,
    ratio_seg: float = 1.0,
    ratio_det: float = 1.0,
    seg_key: str = "seg",
    det_key: str = "det",
) -> list[Term]:
    """The four `Term`s of the multi-task loss

        loss = r_det·((1−α_det)·L_det_hard + α_det·L_det_soft)
             + r_seg·((1−α_seg)·L_seg_hard + α_seg·L_seg_soft)

    Term weights: ``seg_hard`` r_seg·(1−α_seg), ``seg_soft`` r_seg·α_seg, ``det_hard``
    r_det·(1−α_det), ``det_soft`` r_det·α_det; each term reads ``output=seg_key`` or
    ``output=det_key`` from the models' dict outputs (and the hard terms from a dict target such
    as ``{"seg": masks, "det": boxes}``). Terms are named "seg_hard", "seg_soft", "det_hard",
    "det_soft". A term whose weight is 0 is left out; its loss may then be None (a loss given as
    None for a term of non-zero weight is an error). α must lie in [0, 1], r must be >= 0.
    """
    alpha_seg = _check_alpha(alpha_seg, "alpha_seg")
    alpha_det = _check_alpha(alpha_det, "alpha_det")
    ratio_seg = _check_ratio(ratio_seg, "ratio_seg")
    ratio_det = _check_ratio(ratio_det, "ratio_det")
    for key, name in ((seg_key, "seg_key"), (det_key, "det_key")):
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} must be a non-empty string, got {key!r}")
    terms = []
    for task, hard, soft, alpha, ratio, key in (
        ("seg", seg_hard, seg_soft, alpha_seg, ratio_seg, seg_key),
        ("det", det_hard, det_soft, alpha_det, ratio_det, det_key),
    ):
        if soft is None and ratio * alpha != 0:
            raise ValueError(
                f"{task}_soft has weight {ratio * alpha:g} (alpha_seg={alpha_seg}, "
                f"alpha_det={alpha_det}, ratio_seg={ratio_seg}, ratio_det={ratio_det}) but its "
                "loss is None"
            )
        terms += mix_terms(
            hard,
            [Term(soft, output=key)] if soft is not None else [],
            alpha=alpha,
            ratio=ratio,
            output=key,
            hard_name=f"{task}_hard",
            soft_name=f"{task}_soft",
        )
    if not terms:
        raise ValueError(
            f"every multi-task term has weight 0 (ratio_seg={ratio_seg}, ratio_det={ratio_det})"
        )
    return terms
