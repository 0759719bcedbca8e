"""The one place a method's objective is assembled from a recipe.

For every output k of the task (a single-output task has one, keyed None):

    loss = Σ_k r_k · ((1 − α_k) · hard_k(z_s[k], y[k])  +  α_k · Σ_i w_i · soft_i)

- the student alone is the same formula with α_k = 0 (hard terms only);
- a single-output task has r = 1, α = `distill.alpha`, hard = `distill.hard_loss` (default: the
  task's own hard loss, e.g. CE for classification, the YOLO loss for detection); its soft terms
  may read outputs or tapped layers;
- a composite task (multitask) takes α_k, r_k and hard_k from `distill.multitask`
  (`alpha_seg`, `ratio_seg`, `seg_hard_loss`, …) and each soft term names its output;
- grid settings apply where they fit: `alpha` sets every α_k, any other key the losses that take
  it (a key scoped to a method, `cwd.tau`, arrives here already unscoped);
- a task whose models return several outputs says which one it scores (`model_output`, e.g.
  ``"logits"`` of a Hugging Face causal LM): the hard term and every soft term that reads the
  model output (no tap) and names no output of its own read that one;
- a term of weight 0 is left out (its loss is never computed);
- a loss that takes `num_samples` (CRD's memory bank) and is not given one gets the training
  split's size.

Term weights are computed as ``r·(1 − α)`` and ``(r·α)·w`` in this order (the numbers of earlier
releases, bit for bit).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from kdistill.distill.distiller import Term
from kdistill.distill.multitask import mix_terms
from kdistill.losses import LOSSES, create_loss
from kdistill.recipes.schema import (  # noqa: F401  (check_methods: re-exported)
    DistillSpec,
    Recipe,
    TermSpec,
    check_methods,
    loss_parameters,
    term_parameters,
)
from kdistill.tasks import Task


@dataclass(frozen=True)
class OutputMix:
    """How one output's hard and soft terms are mixed."""

    key: str | None
    alpha: float
    ratio: float
    hard_loss: str


def output_mixes(task: Task, distill: DistillSpec) -> list[OutputMix]:
    """One `OutputMix` per output of `task`, in the task's output order."""
    mixes = []
    for key, part in task.outputs.items():
        if key is None:
            hard = distill.hard_loss or part.default_hard_loss
            mixes.append(OutputMix(None, distill.alpha, 1.0, hard))
            continue
        mix = distill.multitask
        mixes.append(
            OutputMix(
                key,
                getattr(mix, f"alpha_{key}", distill.alpha),
                getattr(mix, f"ratio_{key}", 1.0),
                getattr(mix, f"{key}_hard_loss", None) or part.default_hard_loss,
            )
        )
    return mixes


def task_options(distill: DistillSpec) -> dict:
    """Options the recipe gives its task: the masks' void label (`distill.ignore_index`)."""
    return {"ignore_index": distill.ignore_index} if distill.ignore_index is not None else {}


def with_void_label(name: str, params: dict, distill: DistillSpec) -> dict:
    """`params` plus ``ignore_index: distill.ignore_index`` for a loss that takes it (CE,
    PixelKD, CWD) when the recipe sets one and the term does not."""
    if distill.ignore_index is None or "ignore_index" in params:
        return params
    if "ignore_index" not in loss_parameters(name):
        return params
    return {**params, "ignore_index": distill.ignore_index}


def hard_loss(name: str, distill: DistillSpec) -> nn.Module:
    return create_loss(name, **with_void_label(name, {}, distill))


def soft_loss(
    spec: TermSpec,
    settings: dict,
    num_samples: int | None = None,
    distill: DistillSpec | None = None,
) -> nn.Module:
    """The loss of a recipe term, with the grid settings it takes applied (and the recipe's void
    label, when `distill` is given)."""
    accepted = term_parameters(spec.loss, spec.params)
    params = {**spec.params, **{k: v for k, v in settings.items() if k in accepted}}
    if distill is not None:
        params = with_void_label(spec.loss, params, distill)
    if "num_samples" in accepted and "num_samples" not in params:
        if num_samples is None:
            raise ValueError(f"loss {spec.loss!r} needs num_samples (the dataset size)")
        params["num_samples"] = num_samples
    return create_loss(spec.loss, **params)


def build_objective(
    task: Task,
    distill: DistillSpec,
    method: str | None,
    settings: dict | None = None,
    num_samples: int | None = None,
) -> list[Term]:
    """The terms of `method` (None: the student alone) for `task` — see the module formula."""
    settings = settings or {}
    specs: Sequence[TermSpec] = distill.methods[method] if method is not None else ()
    terms: list[Term] = []
    scored = task.model_output  # e.g. "logits" of a causal LM's output
    for mix in output_mixes(task, distill):
        soft = [spec for spec in specs if mix.key is None or spec.output == mix.key]
        prefix = "" if mix.key is None else f"{mix.key}_"
        default_output = mix.key if mix.key is not None else scored
        terms += mix_terms(
            hard_loss(mix.hard_loss, distill),
            [
                Term(
                    soft_loss(spec, settings, num_samples, distill),
                    weight=spec.weight,
                    student=spec.student,
                    teacher=spec.teacher,
                    output=(
                        spec.output
                        if spec.output is not None or spec.student or spec.teacher
                        else default_output
                    ),
                    warmup_epochs=spec.warmup_epochs,
                )
                for spec in soft
            ],
            alpha=settings.get("alpha", mix.alpha) if soft else 0.0,
            ratio=mix.ratio,
            output=default_output,
            hard_name=f"{prefix}hard",
            soft_name=f"{prefix}soft" if prefix else None,
        )
    if not terms:
        raise ValueError(
            f"every term of method {method!r} has weight 0 (α, ratios and term weights); "
            "nothing would be trained"
        )
    return terms


@dataclass(frozen=True)
class Setting:
    """One value a method trains with, and whether the validation grid chose it."""

    name: str
    value: float
    chosen: bool  # True: this grid point won on validation; False: the recipe's value or default


_NOT_SETTINGS = ("num_samples", "ignore_index")  # sizes and labels, not hyper-parameters


def settings_used(
    task: Task, distill: DistillSpec, method: str | None, settings: dict | None = None
) -> list[Setting]:
    """Every setting `method` (None: the student alone, which has none) trains with under the
    grid point `settings`: α of each output it distils (`alpha`, or `alpha_seg` / `alpha_det`)
    and each soft loss's numeric parameters (those the recipe gives, else the loss's defaults),
    as `build_objective` applies them. A setting is `chosen` when it comes from `settings`.
    Parameters are named plainly (`temperature`) when the method has one soft term, else by
    their loss (`kd.temperature`); a loss parameter called `alpha` is always `<loss>.alpha`."""
    if method is None:
        return []
    settings = settings or {}
    specs = distill.methods[method]
    used: dict[str, Setting] = {}
    for mix in output_mixes(task, distill):
        if any(mix.key is None or spec.output == mix.key for spec in specs):
            name = "alpha" if mix.key is None else f"alpha_{mix.key}"
            used[name] = Setting(name, settings.get("alpha", mix.alpha), "alpha" in settings)
    for spec in specs:
        signature = inspect.signature(LOSSES.get(spec.loss).__init__)
        for parameter in signature.parameters.values():
            key = parameter.name
            if key == "self" or key in _NOT_SETTINGS:
                continue
            if key in settings:
                value, chosen = settings[key], True
            elif key in spec.params:
                value, chosen = spec.params[key], False
            else:
                value, chosen = parameter.default, False
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = key if len(specs) == 1 and key != "alpha" else f"{spec.loss}.{key}"
            used.setdefault(name, Setting(name, float(value), chosen))
    return list(used.values())


def grid_settings(recipe: Recipe, method: str | None = None) -> list[dict]:
    """Every point of `tune.grid` for `method`: the plain keys (`alpha`, `temperature`, …) and
    the keys scoped to it (`cwd.tau` → `tau`); keys scoped to other methods are left out."""
    grid = recipe.tune.grid if recipe.tune.enabled else {}
    scoped = {}
    for key, values in grid.items():
        owner, dot, parameter = key.rpartition(".")
        if not dot:
            scoped[key] = values
        elif owner == method:
            scoped[parameter] = values
    if not scoped:
        return [{}]
    keys = sorted(scoped)
    return [dict(zip(keys, values)) for values in itertools.product(*(scoped[k] for k in keys))]


def settings_label(settings: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sorted(settings.items())) or "default"
