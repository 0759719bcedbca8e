"""`kdistill compress`: prune → distill → int8, with accuracy and cost after every stage.

The stages, top to bottom (every accuracy on the test set, every model costed the same way):

1. **teacher**: trained, or loaded (`teacher.checkpoint`, or the teacher a previous run of the
   same recipe saved in the run folder), as in `kdistill run`;
2. **students alone / distilled**: the recipe's hand-designed students trained with the hard
   loss alone and with the distillation method (the recipe's settings; no grid search), for
   reference;
3. **pruned**: a copy of the teacher with `compress.channels` of the output channels of every
   prunable layer removed (lowest L1 norm; a smaller dense model) and, when
   `compress.magnitude` > 0, that fraction of its remaining conv/linear weights zeroed
   (smallest |w|, global); evaluated as it is, without retraining;
4. **pruned + fine-tuned** (the control) and **pruned + distilled**: the pruned teacher,
   initialised with its surviving weights, retrained with the hard loss alone, and distilled
   from the full teacher — the same seed, data order and `compress.finetune` budget (default
   `train`), so the difference between the two rows is what distillation bought after pruning;
   magnitude-pruned weights stay zero throughout (the masks are re-applied every step);
5. **int8**: the pruned + distilled student quantized after training — dynamic int8 for the
   Linear layers, then static int8 for the convolutions as well (calibrated on
   `compress.calibration_batches` training batches) with dynamic Linear layers;
6. **export**: the pruned + distilled student as TorchScript and ONNX, and the int8 model as
   TorchScript, each loaded back and compared with the PyTorch model.

Why prune the teacher rather than a student: a 75 % channel cut of the classic teacher keeps its
shape (two convs and two linear layers) at about 1/16 of its parameters, and starts from weights
that already solve the task; distillation then recovers what the cut lost.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdistill.compress.prune import (
    PRUNABLE,
    UnsupportedModelError,
    apply_masks,
    magnitude_masks,
    make_permanent,
    prune_channels,
    sparsity,
)
from kdistill.compress.quantize import quantize_dynamic_linear, quantize_static
from kdistill.errors import ConfigError
from kdistill.export import ExportResult, export_student, onnx_available
from kdistill.io import atomic_write_text
from kdistill.models import count_parameters
from kdistill.recipes.run_store import save_model
from kdistill.recipes.runner import Experiment, build_model
from kdistill.recipes.schema import CompressSpec, Recipe
from kdistill.tasks import metric_label, percent_metrics


@dataclass
class Stage:
    """One model of the compression table."""

    name: str
    description: str
    test_score: float  # the task's ranking metric (accuracy, mIoU, mAP@0.5, …) on the test set
    params: int
    nonzero: int
    cost: dict | None = None
    seconds: float = 0.0


@dataclass
class CompressSummary:
    out_dir: Path
    stages: list[Stage]
    exports: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    metric: str = "accuracy"  # the task's ranking metric, `Stage.test_score`
    metric_label: str = "accuracy"  # how reports name it ("mIoU")
    percent: bool = True  # a fraction, shown in %


def nonzero_weights(model: nn.Module) -> int:
    """Parameters that are not exactly zero (what a sparse format would have to store)."""
    return sum(int((p != 0).sum()) for p in model.parameters())


def _percent(value: float) -> str:
    return f"{100 * value:g} %"


class CompressionRun:
    """Runs the stages of the module docstring for one recipe into `out_dir`."""

    def __init__(self, recipe: Recipe, out_dir: Path, progress: bool = True):
        if recipe.compress is None:
            raise ConfigError(
                f"recipe {recipe.name!r} has no compress: section; add one, e.g. "
                "compress: {channels: 0.75}"
            )
        self.recipe = recipe
        self.spec: CompressSpec = recipe.compress
        self.experiment = Experiment(recipe, out_dir, resume=False, progress=progress)
        self.out_dir = self.experiment.out_dir
        self.method = self.spec.method or next(iter(recipe.distill.methods))
        self.stages: list[Stage] = []
        self.preflight()

    def preflight(self) -> None:
        """Refuse, before anything trains, a teacher that a compression step cannot handle:
        channel pruning (and magnitude pruning) and int8 quantization are rehearsed on an
        untrained copy of the teacher and one small training batch; ConfigError naming the
        step and the layer. The global RNG is left as it was."""
        recipe, experiment = self.recipe, self.experiment
        with torch.random.fork_rng():
            teacher = build_model(
                recipe.teacher, experiment.splits.train, recipe.seed, experiment.task
            )
        teacher.eval()
        where = f"compress: the teacher {recipe.teacher.model} ({type(teacher).__name__})"
        layers = [name for name, m in teacher.named_modules() if isinstance(m, PRUNABLE)]
        try:
            pruned = prune_channels(
                copy.deepcopy(teacher), self.spec.channels, only=self.spec.layers
            )
            if self.spec.magnitude > 0:
                apply_masks(pruned, magnitude_masks(pruned, self.spec.magnitude), permanent=True)
        except (UnsupportedModelError, ValueError, KeyError, AttributeError) as error:
            named = self.spec.layers
            step = f"step 'pruned', compress.channels = {self.spec.channels}" + (
                f", compress.layers = {named}" if named else ""
            )
            if "does not know how the layers" in str(error) and layers:
                reason = (
                    f"its layer {layers[0]!r} (first of {len(layers)} conv/linear layers) is in "
                    "no channel group kdistill knows (it knows classic_teacher, middle_student "
                    "and the CIFAR ResNets)"
                )
            else:
                reason = " ".join(str(error).split())
            raise ConfigError(
                f"{where} cannot be channel-pruned ({step}): {reason}. Compress a teacher it "
                "knows, or prune in Python: kdistill.compress.prune_channels(model, amount, "
                "groups=[ChannelGroup(producer, consumers, norms, flatten), …])"
            ) from None
        loader = experiment.loader(experiment.splits.train, recipe.seed, 2, shuffle=False)
        inputs = next(iter(loader)).inputs
        try:
            quantize_dynamic_linear(pruned)
            quantize_static(pruned, [inputs], inputs[:1])
        except Exception as error:  # noqa: BLE001 - any failure here would come after training
            raise ConfigError(
                f"{where}, channel-pruned, cannot be quantized to int8 (steps 'int8 dynamic' / "
                f"'int8'): {type(error).__name__}: {' '.join(str(error).split())[:300]}"
            ) from None

    def say(self, message: str) -> None:
        self.experiment.say(message)

    @property
    def label(self) -> str:
        return metric_label(self.experiment.task, self.experiment.metric)

    def evaluate(self, model: nn.Module) -> float:
        return self.experiment.evaluator(self.experiment.splits.test)(model)[self.experiment.metric]

    def add(
        self,
        name: str,
        description: str,
        model: nn.Module,
        accuracy: float,
        started: float,
        reference: nn.Module | None = None,
    ) -> Stage:
        counted = reference if reference is not None else model
        kwargs = {"reference": reference} if reference is not None else {}
        stage = Stage(
            name,
            description,
            accuracy,
            count_parameters(counted),
            nonzero_weights(counted),
            self.experiment.cost_of(name, model, **kwargs),
            time.perf_counter() - started,
        )
        self.stages.append(stage)
        self.say(f"{name}: test {self.label} {accuracy:.4f}")
        return stage

    # -- the stages ---------------------------------------------------------------------------
    def teacher(self) -> nn.Module:
        started = time.perf_counter()
        teacher, record = self.experiment.prepare_teacher()
        self.add("teacher", self.recipe.teacher.model, teacher, record.test_score, started)
        return teacher

    def reference_students(self) -> None:
        recipe, seed = self.recipe, self.recipe.seed
        for spec in recipe.students:
            plans = [
                ("alone", self.experiment.objective(None)),
                (self.method, self.experiment.objective(self.method)),
            ]
            for method, terms in plans:
                started = time.perf_counter()
                label = f"{spec.name}/{method}/seed{seed}"
                student, metrics, _ = self.experiment.train_student(
                    label,
                    spec,
                    seed,
                    terms,
                    method,
                    self.experiment.splits.test,
                    keep_checkpoint=False,
                )
                what = "trained alone" if method == "alone" else f"distilled ({self.method})"
                self.add(
                    f"{spec.name} {method}",
                    f"{spec.model}, {what}",
                    student,
                    metrics[self.experiment.metric],
                    started,
                )

    def prune(self, teacher: nn.Module) -> tuple[nn.Module, dict | None]:
        started = time.perf_counter()
        pruned = prune_channels(copy.deepcopy(teacher), self.spec.channels, only=self.spec.layers)
        description = f"teacher, {_percent(self.spec.channels)} of channels removed"
        masks = None
        if self.spec.magnitude > 0:
            masks = magnitude_masks(pruned, self.spec.magnitude, scope="global")
            apply_masks(pruned, masks, permanent=True)
            description += f", {_percent(self.spec.magnitude)} of weights zeroed"
        self.add("pruned", description + " (no retraining)", pruned, self.evaluate(pruned), started)
        return pruned, masks

    def retrain_pruned(self, pruned: nn.Module, masks: dict | None, method: str) -> nn.Module:
        """The pruned teacher retrained from its surviving weights: `method` "alone" (hard
        loss only, the control) or the recipe's distillation method."""
        started = time.perf_counter()
        student = copy.deepcopy(pruned)
        if masks is not None:
            apply_masks(student, masks, permanent=False)
        if method == "alone":
            terms = self.experiment.objective(None)
            name, description = "pruned + fine-tuned", "the pruned teacher retrained (hard loss)"
        else:
            terms = self.experiment.objective(method)
            name = "pruned + distilled"
            description = f"the pruned teacher distilled ({method}) from the teacher"
        seed = self.recipe.seed
        student, _, _ = self.experiment.train_student(
            f"pruned/{method}/seed{seed}",
            self.recipe.teacher,
            seed,
            terms,
            method,
            self.experiment.splits.test,
            keep_checkpoint=False,
            student=student,
            train=self.spec.finetune,
        )
        make_permanent(student)
        if masks is not None:
            self.say(f"{name}: sparsity {sparsity(student):.3f}")
        student.eval()
        self.add(name, description, student, self.evaluate(student), started)
        return student

    def distill_pruned(self, pruned: nn.Module, masks: dict | None) -> nn.Module:
        student = self.retrain_pruned(pruned, masks, self.method)
        # the pruned architecture is not what create_model builds, so the weights alone cannot
        # rebuild it: also the whole model (load_whole_model(path, trust=True) / --trust-checkpoint)
        save_model(
            self.out_dir,
            "pruned_distilled",
            student,
            {"shapes": {k: list(v.shape) for k, v in student.state_dict().items()}},
            whole=True,
        )
        return student

    def quantize(self, student: nn.Module) -> nn.Module:
        started = time.perf_counter()
        dynamic = quantize_dynamic_linear(student)
        self.add(
            "int8 dynamic",
            "pruned + distilled, Linear weights int8 (dynamic activations)",
            dynamic,
            self.evaluate(dynamic),
            started,
            reference=student,
        )
        started = time.perf_counter()
        splits = self.experiment.splits
        loader = self.experiment.loader(splits.train, self.recipe.seed, 128, shuffle=True)
        calibration = []
        for batch in loader:
            calibration.append(batch.inputs)
            if len(calibration) == self.spec.calibration_batches:
                break
        static = quantize_static(student, calibration, calibration[0][:1])
        self.add(
            "int8",
            "pruned + distilled, convolutions static int8 "
            f"({len(calibration)} calibration batches), Linear dynamic int8",
            static,
            self.evaluate(static),
            started,
            reference=student,
        )
        return static

    def export(self, student: nn.Module, int8: nn.Module) -> tuple[list[ExportResult], list[str]]:
        notes = []
        formats = list(self.spec.export)
        if "onnx" in formats and not onnx_available():
            formats.remove("onnx")
            notes.append("ONNX export skipped: pip install 'kdistill[export]' (onnx, onnxruntime)")
        example = self.experiment.splits.test.inputs[:4].float()
        folder = self.out_dir / "export"
        results = export_student(student, folder / "student", example, formats) if formats else []
        if "torchscript" in formats:
            results += export_student(int8, folder / "student_int8", example, ["torchscript"])
        for result in results:
            self.say(f"export: {result.path} (max |Δ| {result.max_abs_diff:.2e})")
        return results, notes

    def run(self) -> CompressSummary:
        started = time.perf_counter()
        atomic_write_text(
            self.out_dir / "recipe.yaml",
            self.recipe.as_yaml(),
        )
        teacher = self.teacher()
        self.reference_students()
        pruned, masks = self.prune(teacher)
        self.retrain_pruned(pruned, masks, "alone")
        student = self.distill_pruned(pruned, masks)
        int8 = self.quantize(student)
        exports, notes = self.export(student, int8)
        self.experiment.measure_latency()  # every stage's architecture, in one pass
        summary = CompressSummary(
            self.out_dir,
            self.stages,
            [{**asdict(e), "path": str(e.path)} for e in exports],
            notes,
            time.perf_counter() - started,
            self.experiment.metric,
            self.label,
            self.experiment.metric in percent_metrics(self.experiment.task),
        )
        atomic_write_text(
            self.out_dir / "results.json",
            json.dumps(
                {
                    "recipe": self.recipe.name,
                    "metric": summary.metric,
                    "seconds": round(summary.seconds, 1),
                    "stages": [asdict(stage) for stage in self.stages],
                    "exports": summary.exports,
                    "notes": notes,
                },
                indent=1,
            ),
        )
        return summary


def run_compress(recipe: Recipe, out_dir: Path, progress: bool = True) -> CompressSummary:
    """Run every stage of `kdistill compress` for `recipe` into `out_dir`."""
    torch.backends.quantized.engine = "x86"
    return CompressionRun(recipe, out_dir, progress).run()
