"""The Distiller: a frozen teacher, a student, and a list of weighted loss terms.

    loss = Σ_i  w_i · ramp_i · loss_i(student side, teacher side[, target][, index])

A term reads each side from the model output (a tensor, one key of a dict output such as a Hugging
Face ``ModelOutput``, or one item of a tuple output) or from a layer tapped by name (a copy of the
layer's own output, see `kdistill.taps`). The inputs are a tensor (``model(inputs)``) or a dict of
keyword arguments (``model(**inputs)``). The teacher is kept
frozen: parameters without gradients, forward under `torch.inference_mode`, and eval mode on
every forward — whatever `.train()` was called on it or on any of its submodules since, the
teacher and all its submodules are put back in eval mode before it runs (BatchNorm statistics
never drift, dropout never randomises its outputs). Floating-point inputs whose dtype differs
from the teacher's parameters (a bf16 or float64 teacher, float32 data) are cast to the
teacher's dtype for its forward — the cast a user would write; float32 → float64 is exact.

Parameters that appear on the first forward (connectors, loss-owned heads such as CRD's) are made
by `build(example_inputs)`, which must run before an optimiser reads the parameter list. Once
`parameters()`, `named_parameters()` or `trainable_parameters()` has been read, a parameter that
a forward would create is an error (`LateParameterError`, naming the term, the layers and the
fix), never a parameter the optimiser silently does not train.

A chunked vocabulary term (`kdistill.losses.chunked.ChunkedTokenLoss`) reads the input of a
model's output head instead of its logits (`kdistill.taps.HeadCapture`): during that model's
forward the head records its input and returns a zero-stride placeholder, so the ``N×L×V``
logits are never built — `DistillOutput.student_output` (and `teacher_output`) then hold that
placeholder of zeros. A term reading the placeholder as logits, or a model whose output is not
the head's own (post-processed logits), is an error naming the head and the fix.

The taps' hooks stay on the models while the distiller works; `detach()` (or `close()`) removes
them, and the next forward puts them back. `kd.fit` detaches on return, so a trained student
pickles and scripts as if it was never tapped.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.data.batches import call_model
from kdistill.distill.connectors import align_spatial, build_connector, widths_match
from kdistill.distill.taps import HeadCapture, Taps
from kdistill.distill.teacher.speedup import FastTeacher, SpeedupReport, parse_speedup
from kdistill.errors import LateParameterError, NonFiniteLossError
from kdistill.losses.base import INDEX, MASK, STUDENT, TARGET, TEACHER
from kdistill.losses.topk import TopKDistribution

ModelOutput = Tensor | Mapping[str, Tensor] | Sequence[Tensor]
Inputs = Tensor | Mapping[str, Any]


@dataclass
class Term:
    """One weighted loss term.

    `student` / `teacher`: a `named_modules()` name to tap, or None for the model output.
    `output`: what to pick when a model returns several outputs: a key of a dict or of a
    Hugging Face ``ModelOutput`` (e.g. ``"seg"``, ``"logits"``), or a position in a tuple or list
    (e.g. ``0``). It also picks ``target[output]`` when the target is a dict (multi-task).
    `warmup_epochs`: the weight ramps linearly from 0 to `weight` over this many epochs
    (DKD's warm-up); the engine reports progress with `Distiller.set_progress`.
    """

    loss: nn.Module
    weight: float = 1.0
    student: str | None = None
    teacher: str | None = None
    output: str | int | None = None
    name: str | None = None
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise ValueError(f"term weight must be a finite number, got {self.weight!r}")
        if self.weight < 0:
            raise ValueError(f"term weight must be >= 0, got {self.weight}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.output is not None and (
            isinstance(self.output, bool) or not isinstance(self.output, str | int)
        ):
            raise ValueError(
                f"Term(output=...) must be a key (str) or a tuple position (int), got "
                f"{self.output!r}"
            )

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(getattr(self.loss, "needs", (STUDENT, TEACHER)))

    @property
    def uses_teacher(self) -> bool:
        return TEACHER in self.needs

    def ramp(self, progress_epochs: float) -> float:
        if self.warmup_epochs <= 0:
            return 1.0
        return min(1.0, progress_epochs / self.warmup_epochs)


@dataclass
class DistillOutput:
    """`loss`: the weighted sum (0-dim, differentiable); `parts`: each term's weighted share."""

    loss: Tensor
    parts: dict[str, float]
    student_output: ModelOutput
    teacher_output: ModelOutput | None = None
    raw_parts: dict[str, float] = field(default_factory=dict)


def select_output(output: Any, key: str | int | None, side: str) -> Tensor:
    """The tensor a term reads from a model output.

    A tensor is used as it is (`key` must be None); a dict or Hugging Face ``ModelOutput`` (any
    mapping) gives ``output[key]`` for a str `key`; a tuple or list gives ``output[key]`` for an
    int `key`; a plain tensor is the model's only output, so position 0 picks it too. A model
    with several outputs and no `key` is an error naming the fix.
    """
    if isinstance(output, Mapping):
        kind = "a dict" if type(output) is dict else f"a {type(output).__name__} (dict-like)"
        keys = list(output)
        if key is None:
            raise ValueError(
                f"the {side} returns {kind} with keys {keys}; say which one a term uses "
                "with Term(..., output=<key>)"
            )
        if key not in output:
            hint = (
                " (pick a dict-like output by key, not by position)" if isinstance(key, int) else ""
            )
            raise KeyError(f"the {side} output has no key {key!r}{hint}; it has keys {keys}")
        value = output[key]
    elif isinstance(output, list | tuple):
        kind = f"a {type(output).__name__} of {len(output)}"
        if key is None:  # TypeError, as before tuples could be picked from
            raise TypeError(
                f"the {side} returns {kind} outputs; say which one a term uses with "
                "Term(..., output=<position>), e.g. output=0"
            )
        if isinstance(key, str):
            raise ValueError(
                f"Term(output={key!r}) picks a key, but the {side} returns {kind} outputs; "
                "pick one by position, e.g. output=0"
            )
        if not -len(output) <= key < len(output):
            raise IndexError(
                f"Term(output={key}) is out of range: the {side} returns {kind} outputs"
            )
        value = output[key]
    else:
        # a plain tensor is a model's only output: position 0 (so output=0 fits a tuple student
        # and a plain-tensor teacher alike); any other key is an error
        if key is not None and not (isinstance(key, int) and key in (0, -1)):
            raise ValueError(
                f"Term(output={key!r}) was given but the {side} returns a plain "
                f"{type(output).__name__} (its only output, position 0); use output=None or 0"
            )
        value = output
    if not isinstance(value, Tensor | TopKDistribution):  # or a stored top-k teacher
        where = "" if key is None else f" at output={key!r}"
        raise TypeError(
            f"the {side} gives {type(value).__name__}{where}; a term needs a tensor (a model "
            "may return a tensor, a dict / ModelOutput of tensors, or a tuple of tensors)"
        )
    return value


def select_target(target: Any, key: str | int | None) -> Tensor:
    """The labels a term reads: the target itself, or `target[key]` for a multi-task target
    (a dict with one entry per task, keyed like the model's outputs)."""
    if isinstance(target, Mapping):
        if key is None or key not in target:
            raise KeyError(
                f"the target is a dict with keys {sorted(target)}; a term reading it needs "
                f"Term(..., output=<one of them>), got output={key!r}"
            )
        return target[key]
    return target


def _clone_tree(output: Any, keep: Sequence[Tensor] = ()) -> Any:
    """Normal tensors from inference-mode ones, so autograd may save them; the tensors in `keep`
    (a head's zero-stride placeholder logits, already normal: cloning would build them) stay."""
    if isinstance(output, Tensor):
        return output if any(output is kept for kept in keep) else output.clone()
    if isinstance(output, Mapping):
        return {key: _clone_tree(value, keep) for key, value in output.items()}
    if isinstance(output, list | tuple):
        values = [_clone_tree(value, keep) for value in output]
        return type(output)(*values) if hasattr(output, "_fields") else type(output)(values)
    return output


def _float32(value: Any) -> Any:
    """Half-precision (fp16/bf16) tensors cast up to float32; anything else unchanged.

    Under autocast the models produce half-precision outputs; softmax, log and sums of a loss are
    far more accurate in float32, so every loss sees float32 inputs and runs outside autocast.
    """
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _fix(missing: list[str]) -> str:
    """How to supply what a term missed (the labels, the dataset index)."""
    hints = []
    if TARGET in missing:
        hints.append(
            "labels come from the batch: (inputs, target) tuples or a dict batch's 'labels'"
        )
    if INDEX in missing:
        hints.append(
            "the index (each sample's dataset position) comes from kdistill's BatchLoader, "
            "(inputs, target, index) tuples or a dict batch's 'index'"
        )
    return "; " + "; ".join(hints) if hints else ""


def _parameter_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _count_parameters(module: nn.Module) -> int:
    return sum(1 for _ in module.parameters())


def _dtype_error(model: nn.Module, side: str, inputs: Any, error: Exception) -> TypeError | None:
    """A one-line explanation of a failed forward when the inputs' floating dtype differs from
    the model's parameters (PyTorch's own message names neither the model nor the fix)."""
    dtype = _parameter_dtype(model)
    if not (
        isinstance(inputs, Tensor)
        and inputs.is_floating_point()
        and dtype is not None
        and inputs.dtype != dtype
        and "type" in str(error).lower()
    ):
        return None
    return TypeError(
        f"the {side} ({type(model).__name__}) has {dtype} parameters but the inputs are "
        f"{inputs.dtype}: cast one to the other ({side}.to({inputs.dtype}), or pass "
        f"inputs.to({dtype}))"
    )


def attention_mask(inputs: Any, shape: tuple[int, ...], device: Any = None) -> Tensor:
    """The attention mask a term reads: ``inputs["attention_mask"]`` for dict inputs that have
    one, else all ones of `shape` (``N×L``: every position is real) on `device`."""
    if _has_mask(inputs):
        return inputs["attention_mask"]
    return torch.ones(shape, dtype=torch.long, device=device)


def _has_mask(inputs: Any) -> bool:
    return isinstance(inputs, Mapping) and inputs.get("attention_mask") is not None


def token_shape(inputs: Any) -> tuple[int, ...] | None:
    """``N×L`` of token inputs: an integer ``N×L`` tensor of token ids, or a dict's
    ``input_ids``; None for other inputs."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return tuple(ids.shape)
    return None


def _head_name(loss: nn.Module, side: str) -> str | None:
    """The head module a chunked loss reads on `side` (``"student_head"`` / ``"teacher_head"``),
    or None: only a loss that says ``reads_head = True`` has one (CRD's `student_head` is a
    projection it owns, not a model's head)."""
    if not getattr(loss, "reads_head", False):
        return None
    return getattr(loss, side, None)


@contextlib.contextmanager
def _capturing(captures):
    """Every capture in `captures` active (its head records its input instead of running)."""
    with contextlib.ExitStack() as stack:
        for capture in captures:
            stack.enter_context(capture.capturing())
        yield


def _unique_names(terms: Sequence[Term]) -> list[str]:
    names: list[str] = []
    for term in terms:
        base = term.name or getattr(term.loss, "name", "") or type(term.loss).__name__.lower()
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


class Distiller(nn.Module):
    """Teacher (frozen) + student + terms; call it like a model: ``distiller(x, target=y)``."""

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        terms: Sequence[Term],
        check_finite: bool = True,
        teacher_speedup: str | Sequence[str] | None = None,
    ):
        """`teacher_speedup`: run the frozen teacher faster, computing the same outputs —
        ``"auto"``, ``"off"`` (default) or a list of ``fold``, ``channels_last``, ``bf16``,
        ``compile`` (`kdistill.teacher_speedup`). Applied to a copy of the teacher on its first
        forward, checked there against the eager teacher (outputs and taps; a step that
        drifts beyond its tolerance raises `TeacherSpeedupError`), never to the student."""
        super().__init__()
        if not terms:
            raise ValueError("a Distiller needs at least one Term")
        self.terms = list(terms)
        self.term_names = _unique_names(self.terms)
        self.needs_teacher = any(term.uses_teacher for term in self.terms)
        if self.needs_teacher and teacher is None:
            users = [n for n, t in zip(self.term_names, self.terms) if t.uses_teacher]
            raise ValueError(f"terms {users} need a teacher, but teacher is None")
        self.student = student
        self.teacher = teacher
        self.teacher_speedup = parse_speedup(teacher_speedup)
        self._fast_teacher: FastTeacher | None = None  # made on the teacher's first forward
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.losses = nn.ModuleList(term.loss for term in self.terms)
        self.connectors = nn.ModuleDict()
        self.check_finite = check_finite
        self.progress_epochs = 0.0
        self._parameters_read = False  # by an optimiser, perhaps: see LateParameterError
        self._building = False
        student_layers = [t.student for t in self.terms if t.student is not None]
        teacher_layers = [t.teacher for t in self.terms if t.teacher is not None and t.uses_teacher]
        self.student_taps = Taps(student, student_layers, "student") if student_layers else None
        self.teacher_taps = None
        self._teacher_layers = list(dict.fromkeys(teacher_layers))
        if teacher_layers:
            assert teacher is not None
            self.teacher_taps = Taps(teacher, teacher_layers, "teacher")
        # chunked vocabulary losses: the output heads whose input is captured instead of run
        self.student_heads: dict[str, HeadCapture] = {}
        self.teacher_heads: dict[str, HeadCapture] = {}
        for term in self.terms:
            head = _head_name(term.loss, "student_head")
            if head is not None and head not in self.student_heads:
                self.student_heads[head] = HeadCapture(student, head, "student")
            head = _head_name(term.loss, "teacher_head")
            if head is not None and term.uses_teacher and head not in self.teacher_heads:
                assert teacher is not None
                self.teacher_heads[head] = HeadCapture(teacher, head, "teacher")
        for name, term in zip(self.term_names, self.terms):
            chunked = _head_name(term.loss, "student_head") is not None
            if chunked and (term.student is not None or term.teacher is not None):
                raise ValueError(
                    f"term {name!r}: a chunked loss reads the input of the output head "
                    f"(ChunkedTokenLoss(student_head=..., teacher_head=...)), not a tapped layer; "
                    f"drop Term(student={term.student!r}, teacher={term.teacher!r})"
                )
            for side, layer, heads in (
                ("student", term.student, self.student_heads),
                ("teacher", term.teacher, self.teacher_heads),
            ):
                if layer is not None and layer in heads:
                    raise ValueError(
                        f"term {name!r} taps the {side}'s {layer!r}, whose output a chunked "
                        "loss never builds (the head records its input instead); tap another "
                        "layer, or make that term chunked too"
                    )

    # -- modes and parameters -------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def named_parameters(self, *args, **kwargs):
        """As `nn.Module.named_parameters` (and `parameters`, which calls it); from now on a
        forward that would create a parameter raises `LateParameterError`."""
        self._parameters_read = True
        return super().named_parameters(*args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, connector and loss-owned parameters (e.g. embedding heads); not the teacher.

        Call `build(example_inputs)` first when connectors or loss heads are sized from the data:
        after this call, a forward that would create a parameter raises `LateParameterError`.
        """
        self._parameters_read = True
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.connectors.parameters() if p.requires_grad]
        params += [p for p in self.losses.parameters() if p.requires_grad]
        return params

    def set_progress(self, epochs: float) -> None:
        """Training progress in epochs (fractional), for the terms' warm-up ramps."""
        self.progress_epochs = float(epochs)

    def detach(self) -> None:
        """Remove every forward hook this distiller put on the models (they then pickle and
        script as if never tapped); the next forward of the distiller puts them back."""
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.detach()
        if self._fast_teacher is not None:
            self._fast_teacher.detach()

    @property
    def teacher_speedup_report(self) -> SpeedupReport | None:
        """What `teacher_speedup` applied and how far it moved the teacher's outputs on the
        first batch (None before the teacher's first forward, or without a speed-up)."""
        return self._fast_teacher.report if self._fast_teacher is not None else None

    def close(self) -> None:
        """Remove every forward hook this distiller put on the models (as `detach`)."""
        self.detach()

    # -- forward ----------------------------------------------------------------------------
    def _freeze_teacher(self) -> None:
        """Eval mode for the teacher and every submodule, whatever was called on them since."""
        assert self.teacher is not None
        if any(module.training for module in self.teacher.modules()):
            self.teacher.eval()

    def run_teacher(self, inputs: Inputs) -> tuple[ModelOutput, dict[str, Tensor]]:
        """Teacher output and tapped features, computed without autograd, in eval mode.

        Floating-point `inputs` of another dtype than the teacher's parameters are cast to it.
        """
        assert self.teacher is not None
        self._freeze_teacher()
        dtype = _parameter_dtype(self.teacher)
        if (
            isinstance(inputs, Tensor)
            and inputs.is_floating_point()
            and dtype is not None
            and inputs.dtype != dtype
        ):
            inputs = inputs.to(dtype)
        if self.teacher_speedup:
            fast = self._fast_teacher
            if fast is None or fast.stale():  # the first forward, or the weights changed
                for capture in self.teacher_heads.values():
                    capture.clear()  # the fast teacher runs its head: dense teacher logits
                if self.teacher_taps is not None:
                    self.teacher_taps.detach()
                if fast is not None:
                    fast.detach()
                fast, output, features = FastTeacher.prepare(
                    self.teacher, self.teacher_speedup, self._teacher_layers, inputs
                )
                self._fast_teacher = fast
                return _clone_tree(output), features  # the eager teacher's, on this batch
            if fast.runner is not None:
                for capture in self.teacher_heads.values():
                    capture.clear()
                with torch.inference_mode():
                    output, features = fast(inputs)
                return _clone_tree(output), FastTeacher.normal(features)
        if self.teacher_taps is not None:
            self.teacher_taps.attach()
            self.teacher_taps.clear()
        with torch.inference_mode(), _capturing(self.teacher_heads.values()):
            output = call_model(self.teacher, inputs)
            # the taps hand over copies that are already normal (not inference-mode) tensors
            features = self.teacher_taps.collect() if self.teacher_taps is not None else {}
        keep = [c.placeholder for c in self.teacher_heads.values() if c.placeholder is not None]
        return _clone_tree(output, keep), features

    @torch.no_grad()
    def build(self, inputs: Inputs, *, optimiser_follows: bool = False) -> None:
        """Create the connectors, and the parameters of losses that size them from the data
        (a `build(student_value, teacher_value)` method, e.g. CRD's embedding heads), from one
        batch's shapes (no training-mode side effects). Call it before making the optimiser.

        When the parameter list was read before this call and it creates parameters, a warning
        says that an optimiser made from that list does not train them, unless the caller says
        `optimiser_follows=True` (it makes its optimiser afterwards, as `kd.fit` does).
        """

        def sized_on_data(loss) -> bool:
            return getattr(loss, "uses_connector", False) or callable(getattr(loss, "build", None))

        if not any(sized_on_data(term.loss) for term in self.terms):
            return
        was_training = self.training
        before = _count_parameters(self.connectors) + _count_parameters(self.losses)
        self.eval()
        self._building = True
        try:
            sides = self._run_models(inputs, None, None)
            for name, term in zip(self.term_names, self.terms):
                student_value, teacher_value = self._term_sides(name, term, *sides)
                if callable(getattr(term.loss, "build", None)):
                    term.loss.build(_float32(student_value), _float32(teacher_value))
        finally:
            self._building = False
            self.train(was_training)
        created = _count_parameters(self.connectors) + _count_parameters(self.losses) - before
        if created and self._parameters_read and not optimiser_follows:
            warnings.warn(
                f"Distiller.build created {created} parameter tensors (connectors / loss heads) "
                "after the distiller's parameters were read; an optimiser made before this call "
                "does not train them: make the optimiser after build()",
                stacklevel=2,
            )

    def forward(
        self,
        inputs: Inputs,
        target: Tensor | None = None,
        index: Tensor | None = None,
        teacher_output: ModelOutput | None = None,
        teacher_features: Mapping[str, Tensor] | None = None,
        micro_batches: int = 1,
        token_counts: Mapping[str, float] | None = None,
    ) -> DistillOutput:
        """`inputs`: a tensor, or a dict of keyword arguments (the models run ``model(**inputs)``).
        `index`: each sample's position in the dataset, for terms that need it (CRD).
        `teacher_output` / `teacher_features` may come from a cache (the teacher then skips).

        One-big-batch normalisation (gradient accumulation, DDP): this batch is one of
        `micro_batches` whose losses are summed before an optimiser step. A term whose loss
        counts tokens (``counts_tokens``, e.g. `ForwardKL`, `TokenCE`, `HiddenMSE`) and has an
        entry in `token_counts` (keyed by term name, see `count_tokens`) is divided by that count
        (``num_counted``) instead of its own; every other term's value is divided by
        `micro_batches`. Summed over the micro-batches, the values (and `parts`) are those of
        the window as one batch. Defaults: a batch on its own.

        A term needing the attention mask (``"attention_mask"``: hidden-state losses) gets
        ``inputs["attention_mask"]`` for dict inputs that have one, else all ones ``N×L`` (every
        position of the student's tensor counts). A token loss counting labelled positions gets
        the batch's ``attention_mask`` (when there is one) as a keyword, to refuse a counted
        position that is padding (left padding, see `kdistill.losses.token`)."""
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int):
            raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        counts = dict(token_counts or {})
        unknown = sorted(set(counts) - set(self.term_names))
        if unknown:
            raise ValueError(
                f"token_counts names {unknown}, which are not terms of this distiller "
                f"({self.term_names})"
            )
        sides = self._run_models(inputs, teacher_output, teacher_features)
        extras = {TARGET: target, INDEX: index}
        total: Tensor | None = None
        parts: dict[str, float] = {}
        raw_parts: dict[str, float] = {}
        for name, term in zip(self.term_names, self.terms):
            student_value, teacher_value = self._term_sides(name, term, *sides)
            values = {STUDENT: student_value, TEACHER: teacher_value, **extras}
            if TARGET in term.needs and target is not None:
                values[TARGET] = select_target(target, term.output)
            if MASK in term.needs:
                shape = token_shape(inputs) or tuple(student_value.shape[:2])
                values[MASK] = attention_mask(inputs, shape, student_value.device)
            counted = name in counts and getattr(term.loss, "counts_tokens", False)
            if name in counts and not counted:
                raise ValueError(
                    f"token_counts gives a count for term {name!r}, but its loss "
                    f"{type(term.loss).__name__} does not count tokens"
                )
            keywords = {"num_counted": counts[name]} if counted else {}
            if (
                getattr(term.loss, "counts_tokens", False)
                and getattr(term.loss, "count_from", TARGET) == TARGET
                and _has_mask(inputs)
            ):
                keywords["attention_mask"] = inputs["attention_mask"]
            missing = [need for need in term.needs if values.get(need) is None]
            if missing:
                raise ValueError(
                    f"term {name!r} needs {missing}, which were not given{_fix(missing)}"
                )
            guard = self._parameters_read and not self._building
            before = _count_parameters(term.loss) if guard else 0
            try:
                # losses run in float32 even under autocast (mixed precision): see _float32
                with torch.autocast(student_value.device.type, enabled=False):
                    value = term.loss(*(_float32(values[need]) for need in term.needs), **keywords)
                if not counted and micro_batches > 1:
                    value = value / micro_batches
            except (ValueError, RuntimeError) as error:
                raise type(error)(f"term {self._describe(name, term)}: {error}") from error
            if guard and _count_parameters(term.loss) != before:
                shapes = [tuple(p.shape) for p in term.loss.parameters()]
                raise LateParameterError(
                    f"term {self._describe(name, term)}: the loss "
                    f"{type(term.loss).__name__} created parameters {shapes} on this forward, "
                    "after the distiller's parameters were read (by an optimiser?), which then "
                    "does not train them; call distiller.build(example_inputs) before creating "
                    "the optimiser"
                )
            weight = term.weight * term.ramp(self.progress_epochs)
            raw = float(value.detach())
            if self.check_finite and not math.isfinite(raw):
                raise NonFiniteLossError(
                    f"loss term {self._describe(name, term)} is {raw} "
                    f"(weight {weight:g}); stopping before it corrupts the weights",
                    term=name,
                )
            raw_parts[name] = raw
            parts[name] = weight * raw
            total = value * weight if total is None else total + value * weight
        assert total is not None
        return DistillOutput(total, parts, sides[0], sides[2], raw_parts)

    @torch.no_grad()
    def count_tokens(self, target: Any, inputs: Inputs) -> dict[str, int]:
        """The counted positions of one batch for each term whose loss counts tokens, keyed by
        term name: ``loss.count(labels)`` (the term's labels) or ``loss.count(mask)`` (the
        attention mask, for hidden-state losses; all ones ``N×L`` of the inputs' first two
        dimensions when the batch has none). No model runs. Summed over the micro-batches of an
        accumulation window (and over ranks), these are the `token_counts` of `forward`."""
        counts: dict[str, int] = {}
        for name, term in zip(self.term_names, self.terms):
            if not getattr(term.loss, "counts_tokens", False):
                continue
            source = getattr(term.loss, "count_from", TARGET)
            if source == MASK:
                shape = token_shape(inputs)
                if shape is None and not _has_mask(inputs):
                    raise ValueError(
                        f"term {name!r} counts the real positions of its sequences, but the "
                        "batch has neither an attention_mask nor N×L integer input_ids to take "
                        "them from; put attention_mask in the batch"
                    )
                counted = term.loss.count(attention_mask(inputs, shape or ()))
            else:
                if target is None:
                    raise ValueError(
                        f"term {name!r} counts labelled tokens, but the batch has no labels"
                        f"{_fix([TARGET])}"
                    )
                counted = term.loss.count(select_target(target, term.output))
            counts[name] = int(counted)
        return counts

    def _run_models(self, inputs, teacher_output, teacher_features):
        """(student output, student features, teacher output, teacher features).

        The teacher runs first: its activations are freed before the student's forward builds
        the autograd graph, so the two never sit in memory (and in the CPU caches) together.
        """
        if self.needs_teacher:
            have_features = teacher_features is not None or self.teacher_taps is None
            if teacher_output is None or not have_features:
                teacher_output, teacher_features = self.run_teacher(inputs)
            else:  # outputs from a cache: the teacher's heads did not run on this batch
                for capture in self.teacher_heads.values():
                    capture.clear()
        if self.student_taps is not None:
            self.student_taps.attach()
            self.student_taps.clear()
        try:
            with _capturing(self.student_heads.values()):
                student_output = call_model(self.student, inputs)
        except RuntimeError as error:
            explained = _dtype_error(self.student, "student", inputs, error)
            if explained is None:
                raise
            raise explained from error
        student_features = self.student_taps.collect() if self.student_taps is not None else {}
        return student_output, student_features, teacher_output, teacher_features or {}

    def _describe(self, name: str, term: Term) -> str:
        sides = []
        if term.student is not None:
            sides.append(f"student layer {term.student!r}")
        if term.teacher is not None and term.uses_teacher:
            sides.append(f"teacher layer {term.teacher!r}")
        return f"{name!r}" + (f" ({' → '.join(sides)})" if sides else "")

    def _term_sides(
        self, name, term, student_output, student_features, teacher_output, teacher_features
    ) -> tuple[Tensor, Tensor | None]:
        """The student and teacher tensors a term compares (connected and aligned if needed)."""
        student_value = (
            student_features[term.student]
            if term.student is not None
            else select_output(student_output, term.output, "student")
        )
        head = _head_name(term.loss, "student_head")
        if head is not None:  # a chunked loss: the head's input instead of the logits
            where = "output" if term.output is None else f"output {term.output!r}"
            student_value = self.student_heads[head].take(student_value, where)
        else:
            self._refuse_placeholder(name, term, student_value, self.student_heads, "student")
        if not term.uses_teacher:
            return student_value, None
        teacher_value = (
            teacher_features[term.teacher]
            if term.teacher is not None
            else select_output(teacher_output, term.output, "teacher")
        )
        head = _head_name(term.loss, "teacher_head")
        if head is not None and self.teacher_heads[head].placeholder is not None:
            where = "output" if term.output is None else f"output {term.output!r}"
            teacher_value = self.teacher_heads[head].take(teacher_value, where)
        else:
            self._refuse_placeholder(name, term, teacher_value, self.teacher_heads, "teacher")
        if getattr(term.loss, "uses_connector", False):
            student_value = self._connect(name, term, student_value, teacher_value)
            student_value, teacher_value = align_spatial(student_value, teacher_value)
        return student_value, teacher_value

    @staticmethod
    def _refuse_placeholder(name, term, value, heads: Mapping[str, HeadCapture], side) -> None:
        """A term that reads logits a chunked term never built (the zero placeholder) would
        silently train on zeros: an error naming both and the fix."""
        for head, capture in heads.items():
            if capture.is_placeholder(value):
                raise ValueError(
                    f"term {name!r} ({type(term.loss).__name__}) reads the {side}'s logits, but "
                    f"a chunked term captures the input of its head {head!r}, so the logits are "
                    "never built; make this term chunked too (e.g. ChunkedTokenLoss('token_ce') "
                    "or ChunkedTokenCE(), hard_loss: chunked_token_ce in a recipe)"
                )

    def _connect(
        self, name: str, term: Term, student_value: Tensor, teacher_value: Tensor
    ) -> Tensor:
        if name not in self.connectors:
            if widths_match(tuple(student_value.shape), tuple(teacher_value.shape)):
                return student_value
            connector = build_connector(
                tuple(student_value.shape),
                tuple(teacher_value.shape),
                term.student or "output",
                term.teacher or "output",
            )
            if self._parameters_read and not self._building and _count_parameters(connector):
                shapes = ", ".join(str(tuple(p.shape)) for p in connector.parameters())
                raise LateParameterError(
                    f"term {self._describe(name, term)} needs a connector from the student's "
                    f"{tuple(student_value.shape)} to the teacher's {tuple(teacher_value.shape)} "
                    f"(parameters {shapes}), made on this first forward, after the distiller's "
                    "parameters were read (by an optimiser?), which would never train it; call "
                    "distiller.build(example_inputs) before creating the optimiser"
                )
            connector = connector.to(device=student_value.device, dtype=student_value.dtype)
            self.connectors[name] = connector.train(self.training)
        return self.connectors[name](student_value)
