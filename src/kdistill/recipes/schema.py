"""The recipe file: a validated description of one experiment (pydantic 2).

A recipe names the data, the teacher, the students, one training budget shared by every student
(alone or distilled: same epochs, optimiser, data order, seeds) and the distillation methods.
The distilled objective of a method is

    loss = (1 − α) · hard_loss(z_s, y)  +  α · Σ_i w_i · soft_i

and `tune.grid` lists the values of α and of loss parameters (e.g. `temperature`) to try on the
validation split held out from the training set — never on the test set.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdistill.data.augment import Augmentation
from kdistill.data.sources import ARRAYS, IMAGE_FOLDER, dataset_kind
from kdistill.engine.config import TrainConfig
from kdistill.errors import ConfigError
from kdistill.importpath import import_callable
from kdistill.losses import LOSSES, create_loss
from kdistill.models.specs import (
    ModelSpecError,
    callable_source,
    check_model_spec,
    resolve_model,
)
from kdistill.registry import unknown_name_message
from kdistill.tasks import get_task


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SCENES_DATASET = "fashion_mnist_scenes"


class ScenesSpec(Strict):
    """`fashion_mnist_scenes`: Fashion-MNIST items pasted into scenes (`data/scenes.py`)."""

    train_count: int = Field(4000, ge=2, description="scenes drawn from the training images")
    test_count: int = Field(1000, ge=1, description="scenes drawn from the test images")
    size: int = Field(
        64, ge=40, description="scene side in pixels: a multiple of 8, ≥ the largest item (39)"
    )
    max_items: int = Field(4, ge=1, le=8, description="items per scene: 1 to max_items")

    @field_validator("size")
    @classmethod
    def multiple_of_eight(cls, size: int) -> int:
        if size % 8:
            raise ValueError(
                f"the detectors' grid has stride 8: size must be a multiple of 8, got {size}"
            )
        return size


class NormalizeSpec(Strict):
    """Explicit per-channel statistics: inputs become `(x − mean[c]) / std[c]`."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def one_std_per_mean(self) -> NormalizeSpec:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"normalize: {len(self.mean)} mean value(s) but {len(self.std)} std value(s); "
                "give one of each per channel"
            )
        if any(value <= 0 for value in self.std):
            raise ValueError(f"normalize.std: every value must be > 0, got {self.std}")
        return self


class AugmentSpec(Strict):
    """Keyed augmentation of the students' training batches (`kdistill.data.augment`): each
    view is a fixed function of (seed, epoch, sample index), the same for the teacher and the
    student, so the teacher's outputs on the views are computed once (`distill.teacher_cache`)
    and replayed. Students alone and distilled see the same views; the teacher trains on the
    plain images; validation and test images are never augmented."""

    pad: int = Field(2, ge=0, description="padded random crop: pixels of padding per side")
    flip: bool = Field(True, description="random horizontal flips")
    mixup: float = Field(
        0.0, ge=0, le=10, description="mixup Beta(α, α) (0: off); the dominant image's label"
    )
    padding: Literal["edge", "zeros", "reflect"] = "edge"
    seed: int | None = Field(
        None,
        description="the views' seed (default: the recipe's seed, the same for every "
        "student seed, so one set of teacher outputs serves them all)",
    )

    def augmentation(self) -> Augmentation:
        return Augmentation(pad=self.pad, flip=self.flip, mixup=self.mixup, padding=self.padding)


class DataSpec(Strict):
    """The data: a registry dataset (`fashion_mnist`, `digits`), `fashion_mnist_scenes`,
    `imagefolder` (`root` holding train/ and test/, one folder per class), `arrays` (`.npz`
    files `train` and `test` holding `x` and `y`) or `package.module:factory` (called with
    `kwargs`, returning `(train, test)` torch Datasets); see `kdistill.data.sources`."""

    dataset: str = "fashion_mnist"
    scenes: ScenesSpec = Field(default_factory=ScenesSpec)
    root: str | None = Field(None, description="folder with the dataset files (default: search)")
    train: str | None = Field(None, description="dataset arrays: the training .npz (x, y)")
    test: str | None = Field(None, description="dataset arrays: the test .npz (x, y)")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="dataset package.module:factory: its keyword arguments"
    )
    normalize: Literal["auto", "train", "none"] | NormalizeSpec = Field(
        "auto",
        description="auto: a built-in dataset's own normalisation, otherwise `train`; train: "
        "per-channel mean/std of the training split (stored in the run's data.json); none: "
        "inputs as read (x/255 for 8-bit images); or {mean: [...], std: [...]}",
    )
    val_size: int | float = Field(5000, gt=0, description="held out of the training split")
    train_limit: int | None = Field(None, ge=1, description="use a random subset (quick runs)")
    test_limit: int | None = Field(None, ge=1)
    augment: AugmentSpec | None = Field(
        None, description="keyed augmentation of the students' training batches (none: off)"
    )

    @field_validator("dataset")
    @classmethod
    def known_dataset(cls, name: str) -> str:
        from kdistill.data import DATASETS

        kind = dataset_kind(name)
        if kind == "factory":
            try:
                import_callable(name, what="datasets")
            except ConfigError as error:
                raise ValueError(str(error)) from None
        elif kind == "registry" and name not in DATASETS and name != SCENES_DATASET:
            known = [*DATASETS.names(), SCENES_DATASET, IMAGE_FOLDER, ARRAYS]
            raise ValueError(
                unknown_name_message("dataset", name, known)
                + "; or package.module:factory returning (train, test) datasets"
            )
        return name

    @field_validator("kwargs")
    @classmethod
    def factory_kwargs_fit(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("dataset")
        if name is None:
            return kwargs
        if ":" not in name:
            if kwargs:
                raise ValueError(
                    f"kwargs are passed to a dataset factory (package.module:factory); dataset "
                    f"{name!r} takes none"
                )
            return kwargs
        try:
            callable_source(name, import_callable(name, what="datasets")).check_kwargs(kwargs)
        except ModelSpecError as error:
            raise ValueError(str(error)) from None
        return kwargs

    @model_validator(mode="after")
    def fields_fit_the_dataset(self) -> DataSpec:
        kind = "scenes" if self.dataset == SCENES_DATASET else dataset_kind(self.dataset)
        if kind == ARRAYS:
            missing = [name for name in ("train", "test") if getattr(self, name) is None]
            if missing:
                raise ValueError(
                    f"dataset arrays needs {' and '.join(missing)}: .npz file(s) holding x and y"
                )
        else:
            given = [name for name in ("train", "test") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{' and '.join(given)}: .npz files are read only by dataset: arrays "
                    f"(dataset is {self.dataset!r})"
                )
        if kind == IMAGE_FOLDER and self.root is None:
            raise ValueError(
                "dataset imagefolder needs root: a folder holding train/ and test/, each with one "
                "sub-folder of images per class"
            )
        if kind == "scenes" and self.normalize != "auto":
            raise ValueError(f"normalize: {SCENES_DATASET} has its own normalisation; use auto")
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that decide the data, for matching a saved teacher: fields added after
        the first recipes are left out while at their defaults (older runs stay recognised)."""
        data = self.model_dump(mode="json")
        del data["augment"]  # the students' views: the teacher trains on the plain images
        for name, default in (("train", None), ("test", None), ("kwargs", {})):
            if data[name] == default:
                del data[name]
        if data["normalize"] == "auto":
            del data["normalize"]
        return data


class ModelSpec(Strict):
    """A model from anywhere (`kdistill.models.specs`): a registry name, `package.module:callable`,
    `torchvision:<name>`, `timm:<name>`, `hf:<model_type>` or `hf:<folder>`. `kwargs` go to the
    constructor; a registry model also gets the data's sizes it accepts, any other model exactly
    `kwargs`. Both are checked when the recipe is read."""

    model: str = Field(description="registry name, package.module:callable, torchvision:…, hf:…")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def known_model(cls, name: str) -> str:
        try:
            resolve_model(name)
        except ModelSpecError as error:
            raise ValueError(str(error)) from None
        return name

    @field_validator("kwargs")
    @classmethod
    def kwargs_fit_the_model(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("model")
        if name is None:  # the model itself failed; its error is reported
            return kwargs
        try:
            check_model_spec(name, kwargs)
        except ModelSpecError as error:
            raise ValueError(str(error)) from None
        return kwargs


class TeacherSpec(ModelSpec):
    checkpoint: str | None = Field(
        None,
        description="weights to load instead of training the teacher: safetensors, a state dict "
        "(.pt/.pth), or a dict holding one (checkpoint_key)",
    )
    checkpoint_key: str | None = Field(
        None,
        description="the key of the state dict inside a checkpoint dict, e.g. `model` for "
        '{"model": state_dict, "optimizer": …}',
    )
    strip_prefix: str | None = Field(
        None,
        min_length=1,
        description='remove this prefix from every weight name, e.g. "module." (DataParallel / '
        'DDP) or "_orig_mod." (torch.compile)',
    )
    trust_checkpoint: bool = Field(
        False,
        description="allow a pickled checkpoint (torch.save(model)) to be unpickled; only for "
        "files you trust (CLI: --trust-checkpoint)",
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=2))

    @model_validator(mode="after")
    def checkpoint_options_need_a_checkpoint(self) -> TeacherSpec:
        for name in ("checkpoint_key", "strip_prefix"):
            if getattr(self, name) is not None and self.checkpoint is None:
                raise ValueError(f"{name} applies to teacher.checkpoint, which is not set")
        return self


class StudentSpec(ModelSpec):
    name: str
    whole_model: str | None = Field(
        None,
        description="start from this whole model (torch.save(model), e.g. a channel-pruned "
        "student whose shapes `model` does not build); a pickle, so it loads only with "
        "trust_checkpoint (CLI: --trust-checkpoint)",
    )
    trust_checkpoint: bool = Field(False, description="allow whole_model to be unpickled")
    labelled: int | None = Field(
        None,
        ge=1,
        description="label-scarce transfer: only this many training images keep their label "
        "(stratified, drawn per seed); alone trains on them (repeated to the same steps per "
        "epoch), distilled methods on every training image, the hard loss on the labelled ones "
        "only (the others' target is −100, which CE ignores)",
    )


class TermSpec(Strict):
    loss: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    student: str | None = None
    teacher: str | None = None
    output: str | int | None = Field(
        None, description="which model output a term reads: a dict key, or a tuple position"
    )
    warmup_epochs: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def known_loss_and_params(self) -> TermSpec:
        if self.loss not in LOSSES:
            raise ValueError(unknown_name_message("loss", self.loss, LOSSES.names()))
        accepted = loss_parameters(self.loss)
        unknown = sorted(set(self.params) - set(accepted))
        if unknown:
            raise ValueError(
                f"loss {self.loss!r} has no parameter(s) {unknown}; it takes {sorted(accepted)}"
            )
        check_loss_params(self.loss, self.params)
        return self


def check_loss_params(name: str, params: dict[str, Any]) -> None:
    """Build the loss once so that bad values (T ≤ 0, …) fail when the recipe is read."""
    if "num_samples" in loss_parameters(name) and "num_samples" not in params:
        params = {**params, "num_samples": 1}  # the runner gives the training split's size
    try:
        create_loss(name, **params)
    except (ValueError, TypeError) as error:
        raise ValueError(f"loss {name!r}: {error}") from None


def loss_parameters(name: str) -> list[str]:
    signature = inspect.signature(LOSSES.get(name).__init__)
    return [p for p in signature.parameters if p != "self"]


class MultiTaskSpec(Strict):
    """Per-task mixing of a multitask recipe (`kdistill.multitask.multitask_terms`):

    loss = r_seg·((1−α_seg)·seg_hard + α_seg·seg_soft)
         + r_det·((1−α_det)·det_hard + α_det·det_soft)
    """

    alpha_seg: float = Field(0.5, ge=0, le=1)
    alpha_det: float = Field(0.5, ge=0, le=1)
    ratio_seg: float = Field(1.0, ge=0)
    ratio_det: float = Field(1.0, ge=0)
    seg_hard_loss: str = "ce"
    det_hard_loss: str = "yolo"

    @model_validator(mode="after")
    def known_losses(self) -> MultiTaskSpec:
        for field_name in ("seg_hard_loss", "det_hard_loss"):
            name = getattr(self, field_name)
            if name not in LOSSES:
                raise ValueError(
                    f"{field_name}: " + unknown_name_message("loss", name, LOSSES.names())
                )
        return self


class DistillSpec(Strict):
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft terms; 1 − α on hard")
    hard_loss: str | None = Field(
        None, description="the hard loss (default: the task's own: ce, or yolo for detection)"
    )
    multitask: MultiTaskSpec = Field(
        default_factory=MultiTaskSpec, description="per-task α and ratios (task: multitask)"
    )
    methods: dict[str, list[TermSpec]] = Field(
        default_factory=lambda: {"kd": [TermSpec(loss="kd", params={"temperature": 4.0})]}
    )
    teacher_cache: Literal["memory", "disk", "off"] = Field(
        "memory",
        description="teacher outputs over the training set, computed once: 'memory' (logits in "
        "RAM; methods tapping teacher layers run it online), 'disk' (kdistill.cache in "
        "<run>/teacher_cache, taps included), 'off' (the teacher runs every step)",
    )
    teacher_cache_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="storage dtype of a disk cache (float32 is exact)"
    )
    teacher_cache_topk: int | None = Field(
        None, ge=1, description="a disk cache keeps only the k largest logits (approximate)"
    )
    ignore_index: int | None = Field(
        None,
        description="label of void pixels in the masks (255 for VOC / Cityscapes): left out of "
        "the hard loss, of the soft terms that take it (pixel_kd, cwd) and of mIoU / pixel "
        "accuracy (task segmentation or multitask)",
    )

    @model_validator(mode="before")
    @classmethod
    def renamed_cache_field(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cache_teacher_outputs" in data:
            raise ValueError(
                "cache_teacher_outputs was replaced by teacher_cache: memory | disk | off "
                "(true → memory, false → off)"
            )
        if isinstance(data, dict) and data.get("teacher_cache") is False:
            data = {**data, "teacher_cache": "off"}  # YAML 1.1 reads a bare `off` as false
        return data

    @model_validator(mode="after")
    def non_empty_methods(self) -> DistillSpec:
        if not self.methods:
            raise ValueError("distill.methods must name at least one method")
        for name, terms in self.methods.items():
            if not terms:
                raise ValueError(f"method {name!r} has no terms")
        if self.hard_loss is not None and self.hard_loss not in LOSSES:
            raise ValueError(unknown_name_message("loss", self.hard_loss, LOSSES.names()))
        return self


class TuneSpec(Strict):
    enabled: bool = True
    grid: dict[str, list[float]] = Field(
        default_factory=dict,
        description="values to try on the validation split: `alpha`, a loss parameter of every "
        "method (`temperature`), or one scoped to a method (`cwd.tau`)",
    )
    epochs: int | None = Field(None, ge=1, description="budget per trial (default: train.epochs)")
    seed: int = 0


class CostSpec(Strict):
    """How model cost is measured for the report (see `kdistill.models.cost`)."""

    enabled: bool = True
    threads: int = Field(1, ge=1, description="torch.set_num_threads during the latency runs")
    repeats: int = Field(5, ge=1, description="timed forward passes; the median is reported")
    warmup: int = Field(2, ge=0)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64], min_length=1)


class CompressSpec(Strict):
    """`kdistill compress`: channel-prune the teacher, distill it, quantize it to int8."""

    channels: float = Field(
        0.75, ge=0, lt=1, description="fraction of output channels removed in each prunable layer"
    )
    layers: list[str] | None = Field(
        None, description="producer layers to channel-prune (default: every known group)"
    )
    magnitude: float = Field(
        0.0, ge=0, lt=1, description="then zero this fraction of the smallest weights (global)"
    )
    method: str | None = Field(None, description="distillation method (default: the first)")
    finetune: TrainConfig | None = Field(
        None, description="budget of the pruned student's distillation (default: train)"
    )
    calibration_batches: int = Field(10, ge=1, description="training batches for static int8")
    export: list[Literal["torchscript", "onnx"]] = Field(
        default_factory=lambda: ["torchscript", "onnx"],
        description="formats of the final student (ONNX skipped when onnx is not installed)",
    )


class Recipe(Strict):
    name: str
    task: str = Field(
        "classification",
        description="decides the targets, model sizes, hard loss and test metrics: "
        "classification | segmentation | detection | multitask, or `package.module:attr` "
        "naming your own Task (kdistill.tasks)",
    )
    seed: int = 0
    seeds: int = Field(1, ge=1, description="students are trained once per seed: seed, seed+1, …")
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec
    students: list[StudentSpec] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    compress: CompressSpec | None = None

    @field_validator("task")
    @classmethod
    def known_task(cls, name: str) -> str:
        get_task(name)  # a ValueError names the task and the known ones
        return name

    @model_validator(mode="after")
    def compress_method_exists(self) -> Recipe:
        method = self.compress.method if self.compress is not None else None
        if method is not None and method not in self.distill.methods:
            raise ValueError(
                f"compress.method: {method!r} is not a method of distill.methods "
                f"({sorted(self.distill.methods)})"
            )
        return self

    @model_validator(mode="after")
    def task_fits_data(self) -> Recipe:
        from kdistill.recipes.objective import check_methods

        task = get_task(self.task)
        dense = getattr(task, "target_kind", None) is not None  # masks / boxes targets
        scenes = self.data.dataset == SCENES_DATASET
        if scenes and not dense:
            raise ValueError(
                f"task: {SCENES_DATASET} holds masks and boxes, not class labels; choose task "
                "segmentation, detection or multitask"
            )
        if dense and not scenes and ":" not in self.data.dataset:
            raise ValueError(
                f"task: {self.task} needs data.dataset: {SCENES_DATASET} (masks and boxes) or a "
                f"dataset factory `package.module:function`, got {self.data.dataset!r}"
            )
        check_methods(task, self.distill)
        if dense and self.data.augment is not None:
            raise ValueError(
                f"data.augment crops and flips the inputs only; task {self.task}'s masks / boxes "
                "would no longer match them (augmentation is for classification)"
            )
        scarce = [s.name for s in self.students if s.labelled is not None]
        if dense and scarce:
            raise ValueError(
                f"students {scarce}: labelled (label-scarce transfer) hides class labels; task "
                f"{self.task} has masks / boxes (use it with task classification)"
            )
        return self

    @model_validator(mode="after")
    def ignore_index_needs_masks(self) -> Recipe:
        if self.distill.ignore_index is None:
            return self
        try:
            get_task(self.task, ignore_index=self.distill.ignore_index)
        except ValueError:
            raise ValueError(
                f"distill.ignore_index marks void pixels of segmentation masks; task {self.task} "
                "has none (use task segmentation or multitask, or leave it out)"
            ) from None
        return self

    @model_validator(mode="after")
    def grid_keys_exist(self) -> Recipe:
        for key, values in self.tune.grid.items():
            if not values:
                raise ValueError(f"tune.grid.{key} is empty")
            if key == "alpha":
                if not all(0 <= value <= 1 for value in values):
                    raise ValueError(f"tune.grid.alpha: values must lie in [0, 1], got {values}")
                continue
            owner, dot, parameter = key.rpartition(".")
            if dot and owner not in self.distill.methods:
                raise ValueError(
                    f"tune.grid.{key}: {owner!r} is not a method of distill.methods "
                    f"({sorted(self.distill.methods)})"
                )
            methods = {owner: self.distill.methods[owner]} if dot else self.distill.methods
            for method, terms in methods.items():
                takers = [term for term in terms if parameter in loss_parameters(term.loss)]
                if not takers:
                    raise ValueError(
                        f"tune.grid.{key}: no loss of method {method!r} has a parameter "
                        f"{parameter!r}"
                    )
                for term in takers:
                    for value in values:
                        try:
                            check_loss_params(term.loss, {**term.params, parameter: value})
                        except ValueError as error:
                            raise ValueError(f"tune.grid.{key}: {error}") from None
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique, got {names}")
        return self


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """`set_dotted(d, "train.epochs", 3)`; list items by index: `students.0.model`."""
    keys = dotted.split(".")
    node: Any = data
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or not isinstance(node[key], (dict, list)):
            node[key] = {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.epochs=3", "tune.enabled=false"]` → pairs, values parsed as YAML scalars."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw)))
    return pairs


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, apply `--set` overrides, and validate; errors name the file and the bad field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of fields, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        try:
            set_dotted(data, key, value)
        except (IndexError, ValueError, TypeError):
            raise ConfigError(f"--set {key}: no such place in the recipe") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, str(path))) from None
