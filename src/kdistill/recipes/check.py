r"""`kdistill check`: a self-check of a user's own teacher / student pair and token divergences.

Every pitfall below was found in some distillation tool after its release; this check makes them
findable on your pair, your batch and your losses before a run. For every token divergence term
(those a recipe configures, and the standard ones: forward KL, reverse KL, JSD β, skew α, TVD)
it runs, on one or two real batches:

| check | figure (what is measured) | passes when |
|---|---|---|
| `identity_loss` | the loss with the student a copy of the teacher | ≤ 1e-5 |
| `identity_gradient` | max \|∂loss/∂θ\| over the copy's parameters | ≤ 1e-5 |
| `chunked_dense` | chunked vs dense loss, relative (value, gradients) | ≤ 1e-4 |
| `padding_side` | right- vs left-padded batch (first token's label −100), relative | ≤ 1e-4 |
| `left_pad_pitfall` | left padding with the first token's label counted raises | raised |
| `micro_batches` | one batch vs two micro-batches divided by the global count | ≤ 1e-5 |
| `jsd_beta_0` | JSD_β / β as β → 0 vs forward KL (float64), relative | ≤ 1e-4 |
| `jsd_beta_1` | JSD_β / (1 − β) as β → 1 vs reverse KL, relative | ≤ 1e-4 |
| `skew_alpha_0` | skew KLs at α = 0 vs the plain KLs, relative | ≤ 1e-6 |
| `endpoints_refused` | β ∈ {0, 1} and α = 1 refused (ValueError), of 4 | 4 |
| `teacher_eval` | the teacher's modules in training mode | 0 |
| `teacher_deterministic` | max \|Δ logit\| between two teacher forwards (eval mode) | ≤ 1e-5 |
| `labels_in_vocab` | counted labels outside [0, V′) | 0 |
| `vocab_sizes` | student V vs teacher V (and `vocab_size`) | comparable |
| `tokenizers` | tokens whose id differs + special tokens (pad, eos, bos, unk) that differ | 0 |

The tokenizer check needs both tokenizers: a model spec ``hf:<folder>`` whose folder holds one
(``tokenizer.json`` / ``tokenizer_config.json``); a model of a recipe uses the data's tokenizer.
When either is unknown it is skipped, saying which. Two tokenizers of the same size whose ids
differ pass every other check (they see ids, not strings) and distil one token's logit into
another's.

The micro-batch check splits a batch whose sequences have different lengths, so that the two
halves count different numbers of tokens (`Distiller.count_tokens`, as the engine's gradient
accumulation passes them): a per-micro-batch mean would differ there.
The limits as β → 0 / 1 are extrapolated from β = 1e-6 and 2e-6 (Richardson: 2·f(ε) − f(2ε),
error O(ε²)), relative to max(|a|, |b|, 1e-3 nats); they are reached at β = ε only where
p_t / p_s stays far below 1/ε, so for pairs whose log-probabilities differ by more than log 1000
somewhere they are taken at a temperature raised until they do not (the identity holds at any
temperature; the detail says which). Relative difference: |a − b| / max(|a|, |b|,
1e-12), for gradients with the L2 norms of the
student's flattened parameter gradients. The losses run as training runs them, through a
`Distiller` (teacher in eval mode, without gradients; the batch's attention mask passed to the
loss); the student runs in eval mode during the check (dropout would make two forwards differ)
and its mode is restored. A check that raises is a FAIL with the error as its detail.

`check_pair(teacher, student, batch, terms=…)` is the Python API; `check_recipe(recipe)` builds
teacher, students, data and terms as `kdistill run` would (the teacher's checkpoint, or the one
a run of the same recipe left in the run folder, else the untrained teacher with a note).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.distill.distiller import Distiller, Term, select_output
from kdistill.losses.chunked import ChunkedTokenLoss
from kdistill.losses.token import (
    TVD,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TokenDivergence,
)
from kdistill.models.lm import embedding_rows

__all__ = [
    "CHECKS",
    "CheckReport",
    "CheckResult",
    "check_models",
    "check_pair",
    "check_recipe",
    "standard_divergences",
]

CHECKS = (
    "identity",
    "chunked",
    "padding",
    "micro_batches",
    "endpoints",
    "teacher",
    "tokenizers",
)

TOL_IDENTITY = 1e-5  # nats per token (× T²), and max |gradient|
TOL_CHUNKED = 1e-4  # relative
TOL_PADDING = 1e-4  # relative: attention over a masked row sums in another order
TOL_MICRO = 1e-5  # relative
TOL_LIMIT = 1e-4  # relative (floor 1e-3 nats), JSD_β / β extrapolated from β = ε, 2ε (float64)
TOL_SKEW = 1e-6  # relative
TOL_DETERMINISTIC = 1e-5  # max |Δ logit|
EPSILON = 1e-6  # β of the endpoint limits
MAX_LOG_RATIO = math.log(1e3)  # the endpoint limits at β = ε need p_t / p_s ≪ 1 / ε
LIMIT_FLOOR = 1e-3  # nats: below it the endpoint figures are absolute (float64 rounding / ε)
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class CheckResult:
    """One line of the report: `figure` measured against `tolerance` (None for a yes / no)."""

    check: str
    term: str
    figure: float | None
    tolerance: float | None
    status: str  # PASS, FAIL or SKIP
    detail: str = ""
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass
class CheckReport:
    """Every `CheckResult` of one pair; `passed` when none failed (skipped ones do not count)."""

    results: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(result.failed for result in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if result.failed]

    def result(self, check: str, term: str | None = None) -> CheckResult:
        """The first result of `check` (for `term` when given); KeyError if there is none."""
        for result in self.results:
            if result.check == check and (term is None or result.term == term):
                return result
        raise KeyError(f"no result for check {check!r}" + (f", term {term!r}" if term else ""))

    def add(self, other: CheckReport) -> None:
        self.results += other.results
        self.notes += [note for note in other.notes if note not in self.notes]

    def table(self) -> str:
        """A Markdown table: check, term, figure, tolerance, status, and the fix when failing."""
        lines = [
            "| check | term | figure | tolerance | status | detail / fix |",
            "|---|---|---:|---:|---|---|",
        ]
        for r in self.results:
            text = r.fix if r.failed and r.fix else r.detail
            if r.failed and r.fix and r.detail:
                text = f"{r.detail} — fix: {r.fix}"
            text = text.replace("|", "\\|")
            lines.append(
                f"| {r.check} | {r.term} | {_number(r.figure)} | {_number(r.tolerance)} "
                f"| {r.status} | {text} |"
            )
        failed = len(self.failures)
        summary = (
            f"{len(self.results)} checks: {failed} failed, "
            f"{sum(r.status == SKIP for r in self.results)} skipped"
        )
        return "\n".join([*lines, "", *(f"note: {n}" for n in self.notes), summary])

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "results": [asdict(result) for result in self.results],
            "notes": list(self.notes),
        }


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0 or (1e-3 <= abs(value) < 1e5 and float(value).is_integer()):
        return f"{value:g}"
    return f"{value:.3g}"


def _relative(a: float | Tensor, b: float | Tensor, floor: float = 1e-12) -> float:
    """|a − b| / max(|a|, |b|, floor); for tensors the L2 norms."""
    if isinstance(a, Tensor):
        a64, b64 = a.detach().double(), b.detach().double()
        return float((a64 - b64).norm() / max(float(a64.norm()), float(b64.norm()), floor))
    return abs(a - b) / max(abs(a), abs(b), floor)


def _verdict(figure: float, tolerance: float) -> str:
    return PASS if math.isfinite(figure) and figure <= tolerance else FAIL


def standard_divergences(
    temperature: float = 1.0, vocab_size: int | None = None
) -> list[TokenDivergence]:
    """Forward KL, reverse KL, JSD (β = 0.5), skew forward / reverse KL (α = 0.1) and TVD."""
    common = {"temperature": temperature, "vocab_size": vocab_size}
    return [
        ForwardKL(**common),
        ReverseKL(**common),
        GeneralizedJSD(beta=0.5, **common),
        SkewForwardKL(alpha=0.1, **common),
        SkewReverseKL(alpha=0.1, **common),
        TVD(**common),
    ]


def _label(loss: nn.Module) -> str:
    name = getattr(loss, "name", None) or type(loss).__name__
    parts = []
    for key in ("beta", "alpha", "temperature", "vocab_size"):
        value = getattr(loss, key, None)
        if value is not None and not (key == "temperature" and value == 1.0):
            parts.append(f"{'T' if key == 'temperature' else key}={value:g}")
    return f"{name}({', '.join(parts)})" if parts else str(name)


def _divergence_terms(terms: Sequence[Term | nn.Module], output: Any) -> list[Term]:
    """The token divergences of `terms` (Terms or losses), one Term of weight 1 each; a chunked
    term (`ChunkedTokenLoss`) gives the divergence it wraps, run on the logits (the chunked
    check compares the two)."""
    found = []
    for term in terms:
        loss = term.loss if isinstance(term, Term) else term
        if isinstance(loss, ChunkedTokenLoss):
            loss = loss.inner
        if isinstance(loss, TokenDivergence) or (
            callable(getattr(loss, "divergence", None)) and getattr(loss, "counts_tokens", False)
        ):
            where = term.output if isinstance(term, Term) and term.output is not None else output
            found.append(Term(loss, output=where, name="divergence"))
    return found


def _dedupe(terms: list[Term]) -> list[Term]:
    seen, kept = set(), []
    for term in terms:
        key = (type(term.loss), term.loss.extra_repr(), term.output)
        if key not in seen:
            seen.add(key)
            kept.append(term)
    return kept


# -- batches ------------------------------------------------------------------------------------


def _split_batch(batch: Any) -> tuple[dict[str, Tensor], Tensor]:
    """(inputs, labels) from ``(inputs, labels)``, a kdistill ``Batch`` or a dict holding
    ``labels``; inputs must be a dict with ``input_ids``."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
        labels = batch.get("labels")
    elif hasattr(batch, "inputs") and hasattr(batch, "target"):
        inputs, labels = batch.inputs, batch.target
    else:
        inputs, labels = batch
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise ValueError(
            "check: the batch's inputs must be a dict with input_ids (and attention_mask), as a "
            f"causal LM takes them; got {type(inputs).__name__}"
        )
    if not isinstance(labels, Tensor) or labels.shape != inputs["input_ids"].shape:
        raise ValueError(
            "check: the batch needs N×L labels shaped as input_ids "
            f"{tuple(inputs['input_ids'].shape)}, got "
            f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    inputs = dict(inputs)
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    return inputs, labels


def _takes(model: nn.Module, keyword: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def padded_batches(
    inputs: Mapping[str, Tensor],
    labels: Tensor,
    pad_id: int = 0,
    ignore_index: int = -100,
    position_ids: bool = True,
) -> tuple[tuple[dict, Tensor], tuple[dict, Tensor], tuple[dict, Tensor]]:
    """The batch's sequences (its real positions, with their labels) cut to different lengths
    (row i loses about i/(N+1) of its tokens, at least 2 kept), as (right-padded, left-padded
    with each first token's label `ignore_index`, left-padded with the first token's label
    counted: the pitfall). `position_ids` (the real
    position of each token, 0 on padding) are added when asked, so that positions do not
    depend on the padding side."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n, length = ids.shape
    rows = []  # (tokens, their labels): the real positions, the user's -100s kept (prompts)
    for i in range(n):
        real = mask[i] != 0
        keep = max(2, int(real.sum()) - (i * int(real.sum())) // (n + 1))
        rows.append((ids[i][real][:keep], labels[i][real][:keep]))
    right, left = ids.new_full((n, length), pad_id), ids.new_full((n, length), pad_id)
    right_mask, left_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    right_labels = torch.full_like(labels, ignore_index)
    pitfall_labels = torch.full_like(labels, ignore_index)
    for i, (tokens, token_labels) in enumerate(rows):
        size = len(tokens)
        right[i, :size], right_mask[i, :size], right_labels[i, :size] = tokens, 1, token_labels
        start = length - size
        left[i, start:], left_mask[i, start:], pitfall_labels[i, start:] = tokens, 1, token_labels
    left_labels = pitfall_labels.clone()
    for i, (tokens, _) in enumerate(rows):
        left_labels[i, length - len(tokens)] = ignore_index
        pitfall_labels[i, length - len(tokens)] = tokens[0]  # counted, even after a prompt
    made = []
    for tokens, real in ((right, right_mask), (left, left_mask)):
        batch = {"input_ids": tokens, "attention_mask": real}
        if position_ids:
            batch["position_ids"] = (real.cumsum(-1) - 1).clamp(min=0)
        made.append(batch)
    return (made[0], right_labels), (made[1], left_labels), (made[1], pitfall_labels)


# -- running a term as training does ------------------------------------------------------------


@dataclass
class _Run:
    loss: float
    grad: Tensor


def _gradients(model: nn.Module) -> Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
            for p in model.parameters()
            if p.requires_grad
        ]
    )


def _run_term(
    teacher: nn.Module,
    student: nn.Module,
    term: Term,
    parts: Sequence[tuple[Mapping[str, Tensor], Tensor]],
    device: torch.device,
) -> _Run:
    """Loss and student gradient of `term` over `parts` (micro-batches of one step: several
    parts are normalised by their global count, as the engine's accumulation does)."""
    for parameter in student.parameters():
        parameter.grad = None
    distiller = Distiller(teacher, student, [term])
    total = 0.0
    try:
        counts = None
        if len(parts) > 1:
            counts = {}
            for inputs, labels in parts:
                for name, count in distiller.count_tokens(labels, inputs).items():
                    counts[name] = counts.get(name, 0) + count
        for inputs, labels in parts:
            out = distiller(
                _to(inputs, device),
                target=labels.to(device),
                micro_batches=len(parts),
                token_counts=counts,
            )
            out.loss.backward()
            total += float(out.loss.detach())
    finally:
        distiller.close()
    return _Run(total, _gradients(student))


def _to(inputs: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


def _halves(inputs: Mapping[str, Tensor], labels: Tensor) -> list[tuple[dict, Tensor]]:
    cut = labels.shape[0] // 2
    return [
        ({k: v[part] for k, v in inputs.items()}, labels[part])
        for part in (slice(0, cut), slice(cut, None))
    ]


# -- the checks ---------------------------------------------------------------------------------


class _Checker:
    def __init__(self, teacher, student, inputs, labels, output, device, report):
        self.teacher, self.student = teacher, student
        self.inputs, self.labels = inputs, labels
        self.output, self.device, self.report = output, device, report

    def add(self, check, term, figure, tolerance, status=None, detail="", fix=""):
        if status is None:
            status = _verdict(figure, tolerance)
        self.report.results.append(
            CheckResult(
                check, term, figure, tolerance, status, detail, fix if status == FAIL else ""
            )
        )

    def guarded(self, check: str, term: str, function: Callable[[], None]) -> None:
        try:
            function()
        except Exception as error:  # noqa: BLE001 - a check that raises is reported as failing
            message = " ".join(f"{type(error).__name__}: {error}".split())
            self.add(check, term, None, None, FAIL, message[:400], "see the error")

    # 1. student = teacher
    def identity(self, term: Term) -> None:
        twin = copy.deepcopy(self.teacher).eval().requires_grad_(True)
        run = _run_term(self.teacher, twin, term, [(self.inputs, self.labels)], self.device)
        label = _label(term.loss)
        same = (
            "check that both sides use log_softmax at the same temperature, the same positions "
            "and the same vocabulary"
        )
        fix = "the loss is not 0 for identical distributions: " + same
        self.add("identity_loss", label, abs(run.loss), TOL_IDENTITY, detail="loss", fix=fix)
        grad = float(run.grad.abs().max()) if run.grad.numel() else 0.0
        self.add(
            "identity_gradient",
            label,
            grad,
            TOL_IDENTITY,
            detail="max |gradient|",
            fix="the gradient must vanish where the student equals the teacher: " + same,
        )

    # 2. chunked = dense
    def chunked(self, term: Term) -> None:
        label = _label(term.loss)
        entry = _chunked_entry()
        assert entry is not None  # check_pair skips this check without it
        figure, detail = _chunked_difference(
            entry,
            term.loss,
            self.teacher,
            self.student,
            self.inputs,
            self.labels,
            self.output,
            self.device,
        )
        self.add(
            "chunked_dense",
            label,
            figure,
            TOL_CHUNKED,
            detail=detail,
            fix="the chunked loss differs from the dense one: report it with this table",
        )

    # 3. padding side
    def padding(self, term: Term) -> None:
        label = _label(term.loss)
        if not getattr(term.loss, "shift", True):
            self.add("padding_side", label, None, None, SKIP, "shift=False: labels are aligned")
            return
        positions = _takes(self.teacher, "position_ids") and _takes(self.student, "position_ids")
        right, left, pitfall = padded_batches(
            self.inputs, self.labels, ignore_index=term.loss.ignore_index, position_ids=positions
        )
        a = _run_term(self.teacher, self.student, term, [right], self.device)
        b = _run_term(self.teacher, self.student, term, [left], self.device)
        figure = max(_relative(a.loss, b.loss), _relative(a.grad, b.grad))
        hint = "" if positions else " (the models take no position_ids: left padding moves them)"
        self.add(
            "padding_side",
            label,
            figure,
            TOL_PADDING,
            detail=f"right {a.loss:.6g} vs left {b.loss:.6g} (value, gradient){hint}",
            fix="the models' outputs or the counted positions depend on the padding side: pass "
            "the attention_mask (and position_ids) to both models, label padding -100",
        )
        try:
            _run_term(self.teacher, self.student, term, [pitfall], self.device)
        except (ValueError, RuntimeError) as error:
            if "padding" not in str(error):
                raise
            self.add("left_pad_pitfall", label, 1, 1, PASS, "refused: " + str(error)[:80] + "…")
        else:
            self.add(
                "left_pad_pitfall",
                label,
                0,
                1,
                FAIL,
                "left padding with each first token's label counted was accepted",
                "refuse counted positions whose attention_mask is 0 (check_real_positions)",
            )

    # 4. micro-batch split
    def micro_batches(self, term: Term) -> None:
        label = _label(term.loss)
        if self.labels.shape[0] < 2:
            self.add("micro_batches", label, None, None, SKIP, "a batch of one sample")
            return
        positions = _takes(self.teacher, "position_ids") and _takes(self.student, "position_ids")
        (inputs, labels), _, _ = padded_batches(
            self.inputs, self.labels, ignore_index=term.loss.ignore_index, position_ids=positions
        )
        one = _run_term(self.teacher, self.student, term, [(inputs, labels)], self.device)
        two = _run_term(self.teacher, self.student, term, _halves(inputs, labels), self.device)
        figure = max(_relative(one.loss, two.loss), _relative(one.grad, two.grad))
        self.add(
            "micro_batches",
            label,
            figure,
            TOL_MICRO,
            detail=f"one batch {one.loss:.6g} vs two micro-batches {two.loss:.6g} (value, "
            "gradient; halves of unequal token counts)",
            fix="divide each micro-batch's sum by the window's count of tokens (num_counted "
            "from Distiller.count_tokens), not by its own",
        )

    # 5. β / α endpoints
    def endpoints(self, jsd: type, skew_forward: type, skew_reverse: type, base: nn.Module):
        temperature = getattr(base, "temperature", 1.0)
        common = {
            "temperature": temperature,
            "shift": getattr(base, "shift", True),
            "ignore_index": getattr(base, "ignore_index", -100),
            "vocab_size": getattr(base, "vocab_size", None),
        }
        suffix = f"(T={temperature:g})" if temperature != 1.0 else ""
        with torch.no_grad():
            teacher_logits, student_logits = self.logits()
        s, t = student_logits.double(), teacher_logits.double()
        mask = self.inputs["attention_mask"].to(self.device)

        def value(loss: nn.Module) -> float:
            return float(loss(s, t, self.labels.to(self.device), attention_mask=mask))

        forward, reverse = value(ForwardKL(**common)), value(ReverseKL(**common))
        # JSD_β / β = KL + O(β·p_t/p_s): the limit is reached at β = ε only where the ratio of
        # the two distributions stays well below 1/ε; for very far-apart pairs the limits are
        # taken at a higher temperature (the identity holds at any temperature)
        limit = {**common, "temperature": temperature * self.limit_scale(s, t, common)}
        lim_forward, lim_reverse = value(ForwardKL(**limit)), value(ReverseKL(**limit))
        # Richardson's 2·f(ε) − f(2ε) leaves O(ε²)
        near_0 = 2 * value(jsd(beta=EPSILON, **limit)) / EPSILON - value(
            jsd(beta=2 * EPSILON, **limit)
        ) / (2 * EPSILON)
        near_1 = 2 * value(jsd(beta=1 - EPSILON, **limit)) / EPSILON - value(
            jsd(beta=1 - 2 * EPSILON, **limit)
        ) / (2 * EPSILON)
        at = "" if limit["temperature"] == temperature else f" at T={limit['temperature']:.3g}"
        fix_jsd = (
            "JSD_beta must weight KL(p_t‖M) by beta and KL(p_s‖M) by 1 − beta with "
            "M = beta·p_t + (1 − beta)·p_s (GKD); the mixture weights look swapped"
        )
        self.add(
            "jsd_beta_0",
            f"{jsd.__name__}{suffix}",
            _relative(near_0, lim_forward, LIMIT_FLOOR),
            TOL_LIMIT,
            detail=f"JSD/β as β→0 {near_0:.6g} vs forward KL {lim_forward:.6g}{at}",
            fix=fix_jsd,
        )
        self.add(
            "jsd_beta_1",
            f"{jsd.__name__}{suffix}",
            _relative(near_1, lim_reverse, LIMIT_FLOOR),
            TOL_LIMIT,
            detail=f"JSD/(1−β) as β→1 {near_1:.6g} vs reverse KL {lim_reverse:.6g}{at}",
            fix=fix_jsd,
        )
        skew = max(
            _relative(value(skew_forward(alpha=0.0, **common)), forward),
            _relative(value(skew_reverse(alpha=0.0, **common)), reverse),
        )
        self.add(
            "skew_alpha_0",
            f"{skew_forward.__name__}/{skew_reverse.__name__}{suffix}",
            skew,
            TOL_SKEW,
            detail="skew KLs at α=0 vs forward / reverse KL",
            fix="at alpha = 0 the skew KLs must be the plain KLs (DistiLLM)",
        )
        refused = 0
        for cls, key, bad in ((jsd, "beta", 0.0), (jsd, "beta", 1.0)) + (
            (skew_forward, "alpha", 1.0),
            (skew_reverse, "alpha", 1.0),
        ):
            try:
                cls(**{key: bad}, **common)
            except ValueError:
                refused += 1
        self.add(
            "endpoints_refused",
            f"{jsd.__name__}/{skew_forward.__name__}/{skew_reverse.__name__}",
            refused,
            4,
            PASS if refused == 4 else FAIL,
            "β=0, β=1 and α=1 (the loss is 0 whatever the student) raise ValueError",
            "refuse the endpoints instead of training on a loss that is always 0",
        )

    def limit_scale(self, s: Tensor, t: Tensor, common: dict) -> float:
        """≥ 1: how much to raise the temperature so that the largest |log p_t − log p_s| over
        the batch's real positions is at most `MAX_LOG_RATIO`."""
        vocab = common["vocab_size"] or s.shape[-1]
        real = self.inputs["attention_mask"].to(s.device) != 0
        log_s = torch.log_softmax(s[real][:, :vocab] / common["temperature"], dim=-1)
        log_t = torch.log_softmax(t[real][:, :vocab] / common["temperature"], dim=-1)
        ratio = (log_t - log_s).abs()
        ratio = ratio[torch.isfinite(ratio)]
        largest = float(ratio.max()) if ratio.numel() else 0.0
        return max(1.0, largest / MAX_LOG_RATIO)

    def logits(self) -> tuple[Tensor, Tensor]:
        """Teacher and student logits on the batch (eval mode, no gradients)."""
        inputs = _to(self.inputs, self.device)
        teacher = select_output(self.teacher(**inputs), self.output, "teacher")
        student = select_output(self.student(**inputs), self.output, "student")
        return teacher, student

    # 6. the teacher, the labels, the vocabularies
    def teacher_checks(self, training_modules: int, vocab_size: int | None, ignore_index: int):
        self.add(
            "teacher_eval",
            "teacher",
            training_modules,
            0,
            PASS if training_modules == 0 else FAIL,
            f"{training_modules} modules in training mode",
            "call teacher.eval() before distilling (kd.Distiller does it on every forward; a "
            "loop of your own must too): in training mode dropout makes the targets random",
        )

        def deterministic():
            inputs = _to(self.inputs, self.device)
            with torch.inference_mode():
                first = select_output(self.teacher(**inputs), self.output, "teacher").clone()
                second = select_output(self.teacher(**inputs), self.output, "teacher")
            figure = float((first.double() - second.double()).abs().max())
            self.add(
                "teacher_deterministic",
                "teacher",
                figure,
                TOL_DETERMINISTIC,
                detail="max |Δ logit| between two forwards in eval mode",
                fix="the teacher gives different outputs for the same batch: remove the "
                "randomness from its forward (sampling, noise, non-deterministic kernels)",
            )

        self.guarded("teacher_deterministic", "teacher", deterministic)
        with torch.no_grad():
            teacher_logits, student_logits = self.logits()
        v_t, v_s = int(teacher_logits.shape[-1]), int(student_logits.shape[-1])
        compared = vocab_size if vocab_size is not None else min(v_t, v_s)
        labels = self.labels[self.labels != ignore_index]
        outside = int(((labels < 0) | (labels >= compared)).sum())
        span = f"[{int(labels.min())}, {int(labels.max())}]" if labels.numel() else "none"
        self.add(
            "labels_in_vocab",
            "batch",
            outside,
            0,
            PASS if outside == 0 else FAIL,
            f"counted labels span {span}, vocabulary [0, {compared})",
            f"every counted label must be a token id below {compared} or {ignore_index}: check "
            "the tokenizer the data was made with against the models' vocabulary",
        )
        detail = f"student V={v_s}, teacher V={v_t}" + (
            f", vocab_size={vocab_size}" if vocab_size is not None else ""
        )
        if vocab_size is not None:
            ok = vocab_size <= min(v_s, v_t)
            fix = f"vocab_size={vocab_size} exceeds a head: set it to the tokenizer's size"
        else:
            ok = v_s == v_t
            fix = (
                f"if the extra rows are padding of the head set vocab_size={min(v_s, v_t)} (the "
                "tokenizer's size) on the divergence terms; different vocabularies cannot be "
                "compared token by token"
            )
        self.add("vocab_sizes", "models", None, None, PASS if ok else FAIL, detail, fix)


# -- the chunked loss (kdistill.losses.chunked, when installed) --------------------------------


CHUNK_SIZE = 7  # counted positions per chunk of the chunked check: several uneven chunks


def _chunked_entry() -> Callable | None:
    """``entry(loss, hidden, weight, bias, teacher_logits, labels, attention_mask) -> Tensor``:
    the chunked loss (`kdistill.losses.chunked.chunked_token_loss` on a `HeadInput`, in chunks
    of `CHUNK_SIZE` positions), or None when that module is not installed."""
    try:
        module = importlib.import_module("kdistill.losses.chunked")
    except ImportError:
        return None
    chunked, head_input = (getattr(module, n, None) for n in ("chunked_token_loss", "HeadInput"))
    if not callable(chunked) or head_input is None:
        return None

    def entry(loss, hidden, weight, bias, teacher_logits, labels, attention_mask):
        return chunked(
            loss,
            head_input(hidden, weight, bias),
            labels,
            teacher_logits,
            chunk_size=CHUNK_SIZE,
            attention_mask=attention_mask,
        )

    return entry


def _chunked_difference(entry, loss, teacher, student, inputs, labels, output, device):
    """max relative difference (value, ∂/∂hidden, ∂/∂weight, ∂/∂bias) of the chunked against
    the dense loss, on the student's last hidden states and output head."""
    head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(
            "the chunked check needs a student whose get_output_embeddings() is a linear head "
            "(weight V×D), as Hugging Face causal LMs have"
        )
    inputs = _to(inputs, device)
    labels = labels.to(device)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        teacher_logits = select_output(teacher(**inputs), output, "teacher")
        hidden = student(**inputs, output_hidden_states=True).hidden_states[-1]
    results = []
    for chunked in (False, True):
        leaves = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
        leaves = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
        h, w, b = leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None
        if chunked:
            value = entry(loss, h, w, b, teacher_logits, labels, mask)
        else:
            logits = h @ w.T + (b if b is not None else 0)
            value = loss(logits, teacher_logits, labels, attention_mask=mask)
        value.backward()
        results.append((float(value.detach()), [leaf.grad for leaf in leaves]))
    (dense, dense_grads), (chunk, chunk_grads) = results
    figure = max(
        [_relative(dense, chunk)] + [_relative(a, b) for a, b in zip(dense_grads, chunk_grads)]
    )
    return figure, (
        f"dense {dense:.6g} vs chunked {chunk:.6g} in chunks of {CHUNK_SIZE} positions "
        "(value, gradients of hidden states and head)"
    )


# -- tokenizers ---------------------------------------------------------------------------------
SPECIAL_TOKENS = ("pad", "eos", "bos", "unk")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def spec_tokenizer(spec: str | None) -> Any:
    """The tokenizer saved with a ``hf:<folder>`` model spec, or None (another spec, or a folder
    without one)."""
    if not spec or not spec.startswith("hf:"):
        return None
    folder = Path(spec[3:])
    if not folder.is_dir() or not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _token_map(tokenizer: Any) -> tuple[dict[str, int], dict[str, int | None]]:
    """(token string → id, special name → id) of a transformers or `tokenizers` tokenizer."""
    vocab = dict(tokenizer.get_vocab())
    if hasattr(tokenizer, "pad_token_id"):  # transformers
        specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_TOKENS}
    else:  # a `tokenizers.Tokenizer`, e.g. kdistill's text data: <pad>, <bos>, <eos> by name
        specials = {name: vocab.get(f"<{name}>") for name in SPECIAL_TOKENS}
    return vocab, specials


def _tokenizer_row(teacher_spec, student_spec, data_tokenizer) -> CheckResult:
    """The `tokenizers` row for two specs (None: the data's tokenizer); a tokenizer that does
    not load is a FAIL naming it."""
    try:
        teacher = spec_tokenizer(teacher_spec) if teacher_spec is not None else data_tokenizer
        student = spec_tokenizer(student_spec) if student_spec is not None else data_tokenizer
        return compare_tokenizers(teacher, student)
    except Exception as error:  # noqa: BLE001 - a check that raises is reported as failing
        message = " ".join(f"{type(error).__name__}: {error}".split())[:400]
        return CheckResult("tokenizers", "teacher/student", None, 0, FAIL, message, "see the error")


def compare_tokenizers(teacher: Any, student: Any, where: str = "teacher/student") -> CheckResult:
    """`tokenizers` row: the tokens of the smaller vocabulary whose id differs (or that the other
    lacks) plus the special tokens whose ids differ; PASS at 0, SKIP when one is None."""
    if teacher is None or student is None:
        unknown = [n for n, t in (("teacher", teacher), ("student", student)) if t is None]
        return CheckResult(
            "tokenizers", where, None, 0, SKIP,
            f"the {' and '.join(unknown)}'s tokenizer is not known (give hf:<folder> specs "
            "whose folders hold one) — nothing to compare",
        )  # fmt: skip
    t_vocab, t_special = _token_map(teacher)
    s_vocab, s_special = _token_map(student)
    small, large = (t_vocab, s_vocab) if len(t_vocab) <= len(s_vocab) else (s_vocab, t_vocab)
    moved = sorted((token for token, i in small.items() if large.get(token) != i), key=small.get)
    specials = [name for name in SPECIAL_TOKENS if t_special[name] != s_special[name]]
    figure = len(moved) + len(specials)
    parts = [f"sizes {len(t_vocab)} (teacher) and {len(s_vocab)} (student)"]
    if moved:
        shown = ", ".join(
            f"{token!r} {t_vocab.get(token)}→{s_vocab.get(token)}" for token in moved[:6]
        )
        parts.append(f"{len(moved)} tokens with other ids (teacher→student): {shown}")
    if specials:
        parts.append(
            "special tokens with other ids: "
            + ", ".join(f"{name} {t_special[name]}→{s_special[name]}" for name in specials)
        )
    same_size = len(t_vocab) == len(s_vocab)
    return CheckResult(
        "tokenizers", where, float(figure), 0, PASS if figure == 0 else FAIL,
        "; ".join(parts) + ("" if figure else ": the same ids for every token"),
        (
            "the models index different tokens"
            + (" (the sizes agree, so nothing else notices)" if same_size else "")
            + ": distil between models that share a tokenizer, or map the vocabularies first"
        )
        if figure
        else "",
    )  # fmt: skip


# -- the API ------------------------------------------------------------------------------------


def check_pair(
    teacher: nn.Module,
    student: nn.Module,
    batch: Any,
    terms: Sequence[Term | nn.Module] = (),
    *,
    vocab_size: int | None = None,
    standard: bool = True,
    checks: Sequence[str] = CHECKS,
    output: str | int | None = "logits",
    device: str | torch.device = "cpu",
) -> CheckReport:
    """Run the self-checks of the module doc on a teacher / student pair and one batch.

    `batch`: ``(inputs, labels)`` (inputs a dict with ``input_ids`` ``N×L`` and optionally
    ``attention_mask``; labels ``N×L``, unshifted, −100 not counted, as Hugging Face passes them),
    a kdistill ``Batch``, or a dict holding ``labels``. `terms`: the Terms (or losses) you train
    with; their token divergences are checked, plus the standard ones (`standard_divergences`
    at `vocab_size`) when `standard`. `checks`: a subset of `CHECKS`. `output`: the key of the
    logits in the models' outputs (None: the output is the logits tensor).

    The teacher's mode is read first (`teacher_eval`); both models then run in eval mode (the
    teacher as `Distiller` runs it; the student so that dropout does not make two forwards
    differ) and get their modes, `requires_grad` flags and gradients back.
    Returns a `CheckReport`; raises ValueError only for a batch of the wrong form or an
    unknown check name (a check that raises is reported as a FAIL).
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"checks: unknown {unknown}; choose among {list(CHECKS)}")
    device = torch.device(device)
    inputs, labels = _split_batch(batch)
    report = CheckReport()
    training_modules = sum(module.training for module in teacher.modules())
    teacher_mode = {module: module.training for module in teacher.modules()}
    teacher_grad = [p.requires_grad for p in teacher.parameters()]
    student_mode = {module: module.training for module in student.modules()}
    student_grad = [p.grad for p in student.parameters()]
    teacher.to(device).eval()
    student.to(device).eval()
    divergences = _divergence_terms(terms, output)
    if standard:
        divergences += _divergence_terms(standard_divergences(vocab_size=vocab_size), output)
    divergences = _dedupe(divergences)
    if not divergences:
        report.notes.append("no token divergence among the terms: only the teacher was checked")
    checker = _Checker(teacher, student, inputs, labels, output, device, report)
    try:
        if "teacher" in checks:
            ignore = getattr(divergences[0].loss, "ignore_index", -100) if divergences else -100
            checker.guarded(
                "teacher", "teacher",
                lambda: checker.teacher_checks(training_modules, vocab_size, ignore),
            )  # fmt: skip
        if "chunked" in checks and _chunked_entry() is None:
            checks = [name for name in checks if name != "chunked"]
            checker.add(
                "chunked_dense",
                "all",
                None,
                TOL_CHUNKED,
                SKIP,
                "kdistill.losses.chunked (chunked_token_loss) is not available in this install",
            )
        for name, method in (
            ("identity", checker.identity),
            ("chunked", checker.chunked),
            ("padding", checker.padding),
            ("micro_batches", checker.micro_batches),
        ):
            if name in checks:
                for term in divergences:
                    checker.guarded(name, _label(term.loss), lambda m=method, t=term: m(t))
        if "endpoints" in checks:
            for family in _endpoint_families(divergences):
                checker.guarded(
                    "endpoints", _label(family[3]), lambda f=family: checker.endpoints(*f)
                )
    finally:
        for parameter, flag in zip(teacher.parameters(), teacher_grad):
            parameter.requires_grad_(flag)
        for module, mode in (*teacher_mode.items(), *student_mode.items()):
            module.training = mode
        for parameter, grad in zip(student.parameters(), student_grad):
            parameter.grad = grad
    if training_modules:
        report.notes.append(
            f"the teacher came with {training_modules} modules in training mode; the other "
            "checks ran it in eval mode, as kd.Distiller does"
        )
    return report


def _endpoint_families(terms: Sequence[Term]) -> list[tuple[type, type, type, nn.Module]]:
    """(JSD class, skew forward class, skew reverse class, a loss giving temperature, shift and
    vocabulary) for each temperature / vocabulary of `terms`: a configured subclass (your own
    loss) replaces the library's class of its family."""
    families: dict[tuple, list] = {}
    for term in terms:
        loss = term.loss
        if not isinstance(loss, TokenDivergence):
            continue
        slot = (loss.temperature, loss.vocab_size, loss.shift, loss.ignore_index)
        family = families.setdefault(slot, [GeneralizedJSD, SkewForwardKL, SkewReverseKL, loss])
        for position, base in enumerate((GeneralizedJSD, SkewForwardKL, SkewReverseKL)):
            if isinstance(loss, base) and family[position] is base:
                family[position] = type(loss)
    return [tuple(family) for family in families.values()]


# -- from a recipe ------------------------------------------------------------------------------


def check_recipe(
    recipe: Any,
    run_dir: Path | None = None,
    *,
    teacher_spec: str | None = None,
    student_spec: str | None = None,
    batches: int = 1,
    samples: int = 4,
    length: int = 64,
    checks: Sequence[str] = CHECKS,
    standard: bool = True,
    device: str | torch.device | None = None,
) -> CheckReport:
    """`check_pair` for the teacher, each student and every method's token divergences (every
    grid point) of a recipe, built as `kdistill run` builds them, on `batches` batches of
    `samples` training blocks cut to `length` tokens.

    The teacher: `teacher.checkpoint` (`load_teacher_checkpoint`), else the one a run of the same
    recipe saved in `run_dir` (default ``runs/<name>``), else untrained (noted). The data's
    tokenizer is the run folder's when it has one (read, never written). `teacher_spec` /
    `student_spec` (e.g. ``hf:<folder>``) replace the recipe's models; `device` the recipe's
    ``train.device``."""
    from kdistill.data import BatchLoader
    from kdistill.engine.checkpoint import checkpoint_path, load_checkpoint, load_weights
    from kdistill.models import model_from_spec
    from kdistill.recipes.objective import build_objective, grid_settings
    from kdistill.recipes.plan import make_plan, recipe_task
    from kdistill.recipes.run_store import saved_teacher_matches
    from kdistill.recipes.splits import build_model, load_splits, load_teacher_checkpoint

    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / recipe.name
    task = recipe_task(recipe)
    out_dir = run_dir if (run_dir / "tokenizer").exists() else None
    splits = load_splits(recipe, task, out_dir)
    train = splits.train
    notes = []
    if teacher_spec is not None:
        teacher = model_from_spec(teacher_spec, {})
        notes.append(f"teacher {teacher_spec}")
    else:
        teacher = build_model(recipe.teacher, train, recipe.seed, task)
        models_dir = run_dir / "models"
        identity = make_plan(recipe).teacher.identity
        if recipe.teacher.checkpoint is not None:
            load_teacher_checkpoint(recipe.teacher, teacher)
            notes.append(f"teacher loaded from {recipe.teacher.checkpoint}")
        elif saved_teacher_matches(models_dir, identity):
            tensors, _ = load_checkpoint(models_dir, "teacher")
            load_weights(teacher, tensors, "teacher", str(checkpoint_path(models_dir, "teacher")))
            notes.append(f"teacher loaded from {checkpoint_path(models_dir, 'teacher')}")
        else:
            notes.append(
                "teacher untrained (no teacher.checkpoint and no teacher saved by this recipe in "
                f"{models_dir}): the checks hold for any weights, but the figures are those of a "
                "random teacher"
            )
        teacher.eval()  # as the runner leaves it
    terms: list[Term] = []
    for method in recipe.distill.methods:
        for settings in grid_settings(recipe, method):
            terms += build_objective(task, recipe.distill, method, settings, len(train))
    vocab_sizes = {getattr(t.loss, "vocab_size", None) for t in terms} - {None}
    vocab_size = next(iter(vocab_sizes)) if len(vocab_sizes) == 1 else None
    students = (
        [(student_spec, model_from_spec(student_spec, {}))]
        if student_spec is not None
        else [(spec.name, build_model(spec, train, recipe.seed, task)) for spec in recipe.students]
    )
    loader = BatchLoader(train, batch_size=samples, shuffle=True, seed=recipe.seed)
    report = CheckReport(notes=notes)
    tokenizer_size = getattr(train, "vocab_size", None)
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        inputs = {k: v[:, :length] for k, v in batch.inputs.items()}
        labels = batch.target[:, :length]
        for name, student in students:
            found = check_pair(
                teacher,
                student,
                (inputs, labels),
                terms,
                vocab_size=vocab_size,
                standard=standard,
                checks=checks,
                output=task.model_output,
                device=device if device is not None else _device(recipe),
            )
            for result in found.results:
                prefix = f"{name}, batch {index + 1}" if batches > 1 else name
                result.term = (
                    f"{prefix}: {result.term}"
                    if len(students) > 1 or batches > 1
                    else (result.term)
                )
            report.add(found)
    data_tokenizer = getattr(splits, "tokenizer", None)
    known = data_tokenizer is not None or teacher_spec is not None or student_spec is not None
    if "tokenizers" in checks and known:
        report.results.append(_tokenizer_row(teacher_spec, student_spec, data_tokenizer))
    if tokenizer_size is not None:
        heads = {embedding_rows(teacher)} | {embedding_rows(s) for _, s in students}
        if any(rows is not None and rows > tokenizer_size for rows in heads) and vocab_size is None:
            report.notes.append(
                f"the heads have more rows than the tokenizer's {tokenizer_size} tokens: set "
                f"vocab_size: {tokenizer_size} in the divergence terms' params to compare the "
                "real vocabulary only"
            )
    return report


def _device(recipe: Any) -> torch.device:
    from kdistill.engine.distributed import resolve_device

    return resolve_device(recipe.train.device)


def check_models(
    teacher_spec: str,
    student_spec: str,
    *,
    vocab_size: int | None = None,
    samples: int = 4,
    length: int = 64,
    checks: Sequence[str] = CHECKS,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CheckReport:
    """`check_pair` for two model specs (``hf:<folder>``, a registry name, an import path) on a
    batch of random token ids (seeded by `seed`) below `vocab_size` (default: the teacher's
    embedding rows), with the standard divergences: without a recipe there is no data and no
    configured term. Give a recipe for real text and your own terms."""
    from kdistill.models import model_from_spec

    teacher = model_from_spec(teacher_spec, {})
    student = model_from_spec(student_spec, {})
    tokens = vocab_size or embedding_rows(teacher)
    if tokens is None:
        raise ValueError(
            f"check: {teacher_spec} does not say its vocabulary (no get_input_embeddings); "
            "give vocab_size (--vocab-size)"
        )
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tokens, (samples, length), generator=generator)
    report = check_pair(
        teacher,
        student,
        ({"input_ids": ids}, ids),
        vocab_size=vocab_size,
        checks=checks,
        device=device,
    )
    report.notes.insert(
        0,
        f"batch: {samples} × {length} random token ids below {tokens} (no recipe: give one to "
        "check on real text with your own terms)",
    )
    if "tokenizers" in checks:
        report.results.append(_tokenizer_row(teacher_spec, student_spec, None))
    return report
