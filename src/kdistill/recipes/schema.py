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
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

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
from kdistill.data.completions import KJV_COMPLETIONS_DATASET
from kdistill.data.sources import ARRAYS, IMAGE_FOLDER, dataset_kind
from kdistill.data.text import (
    DEFAULT_TEST_BOOKS,
    DEFAULT_VAL_BOOKS,
    KJV_DATASET,
    SPECIAL_TOKENS,
    resolve_book,
)
from kdistill.distill.teacher.speedup import parse_speedup
from kdistill.distill.transforms import OnPolicyConfig
from kdistill.engine.config import TrainConfig
from kdistill.errors import ConfigError, KdistillError
from kdistill.importpath import import_callable
from kdistill.losses import LOSSES, create_loss
from kdistill.models.specs import (
    ModelSpecError,
    callable_source,
    check_model_spec,
    resolve_model,
)
from kdistill.registry import close_matches, unknown_name_message
from kdistill.tasks import Task, get_task


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SCENES_DATASET = "fashion_mnist_scenes"
TEXT_DATASETS = (KJV_DATASET, KJV_COMPLETIONS_DATASET)  # data.text settings apply
BUILT_ELSEWHERE = (SCENES_DATASET, *TEXT_DATASETS)  # built by the runner, not DATASETS


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


class TextSpec(Strict):
    """`kjv`: the King James Bible as token blocks for causal LMs (`kdistill.data.text`), split
    by book, with a byte-level BPE trained on the training books; `kjv_completions`: its verses
    as prompt → completion sequences, the same books and tokenizer
    (`kdistill.data.completions`)."""

    vocab_size: int = Field(
        2048,
        ge=256 + len(SPECIAL_TOKENS),
        description="tokens of the byte-level BPE: 256 bytes, <pad> 0, <bos> 1, <eos> 2, merges",
    )
    block_size: int = Field(128, ge=2, description="kjv: tokens per block (the models' context)")
    max_length: int = Field(
        128,
        ge=4,
        description="kjv_completions: longest sequence (start token, prompt, completion, <eos>); "
        "longer verses are left out (counted in data.json)",
    )
    end_token: Literal["eos", "newline"] = Field(
        "eos",
        description="kjv_completions: the token that ends each completion (newline: how an LM "
        "trained on kjv chapters ends a verse; generation stops there)",
    )
    start_token: Literal["bos", "eos"] = Field(
        "bos",
        description="kjv_completions: the token before each prompt (eos: what an LM trained on "
        "kjv chapters saw before a chapter's first verse)",
    )
    val_books: list[str] = Field(
        default_factory=lambda: list(DEFAULT_VAL_BOOKS),
        min_length=1,
        description="books held out for validation (settings are chosen on them)",
    )
    test_books: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEST_BOOKS),
        min_length=1,
        description="books held out for the test metrics",
    )
    tokenizer_dir: str | None = Field(
        None,
        description="folder of tokenizer.json (default: <run dir>/tokenizer); reused while it "
        "was trained on the same books with the same settings, retrained otherwise",
    )
    min_frequency: int = Field(2, ge=1, description="BPE: merge only pairs seen this often")
    program: str = Field(
        "bible", description="the `bible` program of Debian's bible-kjv (a name or a path)"
    )
    text_file: str | None = Field(
        None, description="read the text from this file (the `bible -f` format) instead"
    )

    @field_validator("val_books", "test_books")
    @classmethod
    def known_books(cls, books: list[str]) -> list[str]:
        return [resolve_book(book) for book in books]

    @model_validator(mode="after")
    def disjoint_books(self) -> TextSpec:
        both = sorted(set(self.val_books) & set(self.test_books))
        if both:
            raise ValueError(f"book(s) {both} are in both val_books and test_books")
        for name in ("val_books", "test_books"):
            books = getattr(self, name)
            if len(set(books)) != len(books):
                raise ValueError(f"{name} names a book twice: {books}")
        return self


class NormalizeSpec(Strict):
    """Explicit per-channel statistics: inputs become `(x − mean[c]) / std[c]`."""

    mean: list[float] = Field(min_length=1, description="one value per input channel")
    std: list[float] = Field(min_length=1, description="one value (> 0) per input channel")

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
    """Keyed augmentation of training batches (`kdistill.data.augment`): each view is a fixed
    function of (seed, epoch, sample index). Under `data.augment` the students' batches — alone
    and distilled alike — and the teacher's outputs on them are the same views, so those
    outputs are computed once (`distill.teacher_cache`) and replayed; under `teacher.augment`
    the teacher's own training batches. Validation and test images are never augmented. In a
    recipe the defaults are pad 2 and flip on (Python's `Augmentation()` has both off)."""

    pad: int = Field(2, ge=0, description="padded random crop: pixels of padding per side")
    flip: bool = Field(True, description="random horizontal flips")
    mixup: float = Field(
        0.0, ge=0, le=10, description="mixup Beta(α, α) (0: off); the dominant image's label"
    )
    padding: Literal["edge", "zeros", "reflect"] = Field(
        "edge", description="padded random crop: how the border is filled"
    )
    seed: int | None = Field(
        None,
        description="the views' seed (default: the recipe's seed; under data.augment the same "
        "for every student seed, so one set of teacher outputs serves them all)",
    )

    def augmentation(self) -> Augmentation:
        return Augmentation(pad=self.pad, flip=self.flip, mixup=self.mixup, padding=self.padding)


# the data fields only the data kinds read (`data.kind`)
KIND_FIELDS = (
    "val",
    "file",
    "fractions",
    "documents",
    "factory",
    "classes",
    "void",
    "annotations",
    "seg_classes",
    "block_size",
    "vocab_size",
    "min_frequency",
    "tokenizer_dir",
    "field",
    "max_length",
    "eos_id",
    "image_size",
)


class DataSpec(Strict):
    """The data: a registry dataset (`fashion_mnist`, `digits`), `fashion_mnist_scenes`,
    `kjv` (text for causal LMs, settings under `text`; `kdistill.data.text`),
    `imagefolder` (`root` holding train/ and test/, one folder per class), `arrays` (`.npz`
    files `train` and `test` holding `x` and `y`) or `package.module:factory` (called with
    `kwargs`, returning `(train, test)` torch Datasets); see `kdistill.data.sources`."""

    kind: str | None = Field(
        None,
        description="the data kind of your files (kdistill.data.kinds, docs/data-kinds.md), for "
        "the recipe's task: imagefolder | npz | factory (classification), masks | npz | factory "
        "(segmentation), coco | yolo | factory (detection, multitask), text | jsonl | factory "
        "(language_modeling), jsonl | factory (completion); its files are named by the fields "
        "below (root, train, test, val, file, factory, …) and checked when the recipe is read",
    )
    dataset: str = Field(
        "fashion_mnist",
        description="fashion_mnist | digits | fashion_mnist_scenes | kjv | imagefolder | arrays | "
        "package.module:factory",
    )
    scenes: ScenesSpec = Field(
        default_factory=ScenesSpec, description="how fashion_mnist_scenes draws its scenes"
    )
    text: TextSpec = Field(
        default_factory=TextSpec, description="dataset kjv: tokenizer, blocks, held-out books"
    )
    root: str | None = Field(None, description="folder with the dataset files (default: search)")
    train: str | None = Field(None, description="dataset arrays: the training .npz (x, y)")
    test: str | None = Field(None, description="dataset arrays: the test .npz (x, y)")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="dataset package.module:factory: its keyword arguments"
    )
    val: str | None = Field(None, description="kinds npz, jsonl: the validation file")
    file: str | None = Field(None, description="kind text: one file split by documents")
    fractions: dict[str, float] | None = Field(
        None, description="kind text with file: {val: f, test: f}, the documents held out"
    )
    documents: Literal["paragraph", "line", "file"] | None = Field(
        None, description="kind text: what one document is"
    )
    factory: str | None = Field(None, description="kind factory: package.module:function")
    classes: list[str] | int | None = Field(
        None, description="kinds masks, npz (masks), yolo, factory: class names (or a count)"
    )
    void: int | None = Field(None, description="mask kinds: the void pixel value (default 255)")
    annotations: str | None = Field(
        None, description="kind coco: the JSON file in each split folder (annotations.json)"
    )
    seg_classes: list[str] | int | None = Field(
        None, description="multitask coco / yolo: the mask classes"
    )
    block_size: int | None = Field(None, ge=2, description="token kinds: tokens per block")
    vocab_size: int | None = Field(
        None, ge=2, description="token kinds without data.tokenizer: the BPE trained on the text"
    )
    min_frequency: int | None = Field(None, ge=1, description="token kinds: BPE merge frequency")
    tokenizer_dir: str | None = Field(
        None, description="token kinds: where the trained BPE is kept (default <run>/tokenizer)"
    )
    field: str | None = Field(None, description="kind jsonl (text): the field holding the text")
    max_length: int | None = Field(None, ge=4, description="completion kinds: longest sequence")
    eos_id: int | None = Field(None, ge=0, description="token factory without a tokenizer")
    image_size: int | list[int] | None = Field(
        None, description="image kinds: resize every image (and mask, boxes) to this size"
    )
    normalize: Literal["auto", "train", "none"] | NormalizeSpec = Field(
        "auto",
        description="auto: a built-in dataset's own normalisation, otherwise `train`; train: "
        "per-channel mean/std of the training split (stored in the run's data.json); none: "
        "inputs as read (x/255 for 8-bit images); or {mean: [...], std: [...]}",
    )
    val_size: int | float = Field(
        5000, gt=0, description="held out of the training split (kjv: whole books, text.val_books)"
    )
    train_limit: int | None = Field(
        None, ge=1, description="use a random subset (quick runs; kjv: of the token blocks)"
    )
    test_limit: int | None = Field(None, ge=1, description="use a random test subset (quick runs)")
    tokenizer: str | None = Field(
        None,
        description="text: the teacher's tokenizer, `hf:<folder>` (its tokenizer.json) or a "
        "tokenizer.json; none: a byte-level BPE trained on the training text (models built "
        "from configs). A teacher folder holding a tokenizer must be named here",
    )
    augment: AugmentSpec | None = Field(
        None,
        description="keyed augmentation of the students' training batches (none: off); the "
        "teacher's own training follows teacher.augment",
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
        elif kind == "registry" and name not in DATASETS and name not in BUILT_ELSEWHERE:
            known = [*DATASETS.names(), *BUILT_ELSEWHERE, IMAGE_FOLDER, ARRAYS]
            raise ValueError(
                unknown_name_message("dataset", name, known)
                + "; or package.module:factory returning (train, test) datasets"
            )
        return name

    @field_validator("kwargs")
    @classmethod
    def factory_kwargs_fit(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("dataset")
        if info.data.get("kind") is not None:
            return kwargs  # the kind checks them (task.check)
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

    def kind_spec(self) -> dict[str, Any]:
        """The data section as a data kind reads it (`kdistill.data.kinds.resolve`): the fields
        the recipe sets, without the students' augmentation."""
        spec = self.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        spec.pop("augment", None)
        return spec

    @model_validator(mode="after")
    def kind_or_dataset(self) -> DataSpec:
        kind_only = [name for name in KIND_FIELDS if name in self.model_fields_set]
        if self.kind is None and kind_only:
            raise ValueError(
                f"{', '.join(kind_only)}: read by the data kinds; set data.kind (e.g. kind: coco, "
                "masks, text, jsonl; docs/data-kinds.md)"
            )
        if self.kind is not None and "dataset" in self.model_fields_set:
            raise ValueError(
                f"data.dataset and data.kind: give one; kind: {self.kind} names the files' format "
                "(a built-in set is a kind too: kind: fashion_mnist)"
            )
        return self

    @model_validator(mode="after")
    def fields_fit_the_dataset(self) -> DataSpec:
        if self.kind is not None:
            return self  # the task's kinds check the fields (Recipe.task_fits_data)
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
        if self.dataset in TEXT_DATASETS:
            given = sorted({"root", "val_size"} & self.model_fields_set)
            if self.normalize != "auto":
                given.append("normalize")
            if given:
                raise ValueError(
                    f"{', '.join(given)}: not read by dataset kjv (token ids are not normalised; "
                    "validation is whole books: data.text.val_books)"
                )
            other = (
                {"max_length", "start_token", "end_token"}
                if self.dataset == KJV_DATASET
                else {"block_size"}
            )
            unread = sorted(other & self.text.model_fields_set)
            if unread:
                raise ValueError(
                    f"data.text.{', '.join(unread)}: not read by dataset {self.dataset} "
                    f"(block_size is kjv's; max_length, start_token, end_token "
                    f"{KJV_COMPLETIONS_DATASET}'s)"
                )
        elif "text" in self.model_fields_set:
            raise ValueError(
                f"text: settings of dataset {' or '.join(TEXT_DATASETS)}; dataset is "
                f"{self.dataset!r}"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that decide the data, for matching a saved teacher: fields added after
        the first recipes are left out while at their defaults (older runs stay recognised)."""
        data = self.model_dump(mode="json")
        del data["augment"]  # the students' views: the teacher trains on the plain images
        for name, default in (("train", None), ("test", None), ("kwargs", {}), ("tokenizer", None)):
            if data[name] == default:
                del data[name]
        if data["normalize"] == "auto":
            del data["normalize"]
        for name in ("kind", *KIND_FIELDS):  # added with the data kinds: left out while unset
            if data[name] is None:
                del data[name]
        if self.kind is not None:  # the kind and its fields say what is read
            for name in ("dataset", "scenes", "text"):
                if name not in self.model_fields_set:
                    del data[name]
            data.pop("tokenizer_dir", None)  # where it is kept; its content follows from the text
        elif self.dataset in TEXT_DATASETS:
            del data["text"]["tokenizer_dir"]  # where it is kept; its content follows from text
        else:
            del data["text"]
        return data


class ModelSpec(Strict):
    """A model from anywhere (`kdistill.models.specs`): a registry name, `package.module:callable`,
    `torchvision:<name>`, `timm:<name>`, `hf:<model_type>` or `hf:<folder>`. `kwargs` go to the
    constructor; a registry model also gets the data's sizes it accepts, any other model exactly
    `kwargs`. Both are checked when the recipe is read."""

    model: str = Field(description="registry name, package.module:callable, torchvision:…, hf:…")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the model's constructor, checked against its signature",
    )
    output: str | int | None = Field(
        None,
        description="for a model returning several outputs (a tuple or a dict): the position or "
        "key of the one it is scored on; the hard loss, the evaluation and every soft term read "
        "it (`kdistill init` finds it on one batch)",
    )

    @field_validator("output", mode="before")
    @classmethod
    def output_is_key_or_position(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"output: a key (str) or a position (int), got {value!r}")
        return value

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
    """The teacher: a model spec (as for a student), trained with its own budget unless a
    `checkpoint` is given or the run folder holds one trained by the same recipe on the same
    data."""

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
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2),
        description="the teacher's own budget (when it is trained, not loaded)",
    )
    fine_tune: bool = Field(
        False,
        description="a teacher that comes trained (checkpoint, hf:<folder>) is used as it is; "
        "true: trained further with teacher.train first",
    )
    augment: AugmentSpec | None = Field(
        None,
        description="keyed augmentation of the teacher's own training batches (none: the plain "
        "images), e.g. a stronger teacher trained longer on crops and flips; part of the "
        "teacher's identity, so a teacher trained without it is not reused",
    )

    @model_validator(mode="after")
    def checkpoint_options_need_a_checkpoint(self) -> TeacherSpec:
        for name in ("checkpoint_key", "strip_prefix"):
            if getattr(self, name) is not None and self.checkpoint is None:
                raise ValueError(f"{name} applies to teacher.checkpoint, which is not set")
        return self


class StudentSpec(ModelSpec):
    """A student: a model spec, trained alone and with every method from the same initial
    weights (one set per seed)."""

    name: str = Field(description="how tables, checkpoints and --methods name this student")
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
    """One soft term of a method: a loss on the models' outputs or on tapped layers (a
    connector adapts the student's layer to the teacher's when their shapes differ)."""

    loss: str = Field(description="a loss name: kd, dkd, dist, fitnet, at, rkd, crd, cwd, …")
    weight: float = Field(1.0, ge=0, description="w_i: its weight among the soft terms")
    params: dict[str, Any] = Field(
        default_factory=dict, description="the loss's own parameters, e.g. {temperature: 4}"
    )
    student: str | None = Field(
        None, description="a student layer to tap (named_modules() name); none: the output"
    )
    teacher: str | None = Field(
        None, description="the teacher layer it is compared with; none: the output"
    )
    output: str | int | None = Field(
        None, description="which model output a term reads: a dict key, or a tuple position"
    )
    warmup_epochs: float = Field(
        0.0, ge=0, description="the weight ramps linearly from 0 over this many epochs (DKD)"
    )

    @model_validator(mode="after")
    def known_loss_and_params(self) -> TermSpec:
        if self.loss not in LOSSES:
            raise ValueError(unknown_name_message("loss", self.loss, LOSSES.names()))
        accepted = loss_parameters(self.loss)
        unknown = sorted(set(self.params) - set(accepted))
        if unknown and not passes_on_parameters(self.loss):
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
    return [
        p.name
        for p in signature.parameters.values()
        if p.name != "self" and p.kind != inspect.Parameter.VAR_KEYWORD
    ]


def term_parameters(name: str, params: dict[str, Any]) -> list[str]:
    """The parameters a recipe term's loss takes: its own, and for a loss that wraps another
    (``chunked`` with ``params.loss``) the wrapped loss's too — so ``tune.grid`` reaches them."""
    accepted = loss_parameters(name)
    inner = params.get("loss")
    if passes_on_parameters(name) and isinstance(inner, str) and inner in LOSSES:
        accepted += [p for p in loss_parameters(inner) if p not in accepted]
    return accepted


def passes_on_parameters(name: str) -> bool:
    """True when the loss takes ``**params`` for a loss it wraps (``chunked``): its parameters
    are then checked by building it (`check_loss_params`), not by name."""
    signature = inspect.signature(LOSSES.get(name).__init__)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


class MultiTaskSpec(Strict):
    """Per-task mixing of a multitask recipe (`kdistill.multitask.multitask_terms`):

    loss = r_seg·((1−α_seg)·seg_hard + α_seg·seg_soft)
         + r_det·((1−α_det)·det_hard + α_det·det_soft)
    """

    alpha_seg: float = Field(0.5, ge=0, le=1, description="α of the segmentation output")
    alpha_det: float = Field(0.5, ge=0, le=1, description="α of the detection output")
    ratio_seg: float = Field(1.0, ge=0, description="r of the segmentation output")
    ratio_det: float = Field(1.0, ge=0, description="r of the detection output")
    seg_hard_loss: str = Field("ce", description="hard loss of the segmentation output")
    det_hard_loss: str = Field("yolo", description="hard loss of the detection output")

    @model_validator(mode="after")
    def known_losses(self) -> MultiTaskSpec:
        for field_name in ("seg_hard_loss", "det_hard_loss"):
            name = getattr(self, field_name)
            if name not in LOSSES:
                raise ValueError(
                    f"{field_name}: " + unknown_name_message("loss", name, LOSSES.names())
                )
        return self


class TokenCacheSpec(Strict):
    """Stored top-k teacher distributions per token (`kdistill.cache.tokens`), for task
    language_modeling: the teacher's k most likely next tokens per position, their
    log-probabilities at `temperature` and the rest's mass, in <run>/teacher_cache; the token
    divergences then compare (k + 1)-bucket distributions (`kdistill.losses.topk`)."""

    topk: int = Field(ge=1, description="tokens kept per position (the vocabulary size: exact)")
    temperature: float = Field(
        1.0, gt=0, description="the temperature stored; the divergences must use the same"
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage dtype of the log-probabilities"
    )
    measure_positions: int = Field(
        4096, ge=0, description="positions the storage error (KL to the full) is measured on"
    )


class SequenceLevelSpec(Strict):
    """Sequence-level KD (Kim & Rush 2016; `kdistill.onpolicy.teacher_sequences`): the
    teacher's completions of the training prompts, made once and stored in <run>/
    teacher_sequences, are the method's training data."""

    decoding: Literal["greedy"] = Field(
        "greedy", description="how the teacher decodes (greedy: beam size 1)"
    )
    max_new_tokens: int = Field(
        64, ge=1, description="longest teacher completion (tokens, its end token included)"
    )


class DistillSpec(Strict):
    """The distillation methods and how their terms are mixed with the hard loss:
    loss = (1 − α)·hard + α·Σ_i w_i·soft_i."""

    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft terms; 1 − α on hard")
    hard_loss: str | None = Field(
        None, description="the hard loss (default: the task's own: ce, or yolo for detection)"
    )
    multitask: MultiTaskSpec = Field(
        default_factory=MultiTaskSpec, description="per-task α and ratios (task: multitask)"
    )
    methods: dict[str, list[TermSpec]] = Field(
        default_factory=lambda: {"kd": [TermSpec(loss="kd", params={"temperature": 4.0})]},
        description="method name → its soft terms; each method is trained and reported beside "
        "the student alone",
    )
    teacher_cache: Literal["memory", "disk", "off"] | TokenCacheSpec = Field(
        "memory",
        description="teacher outputs over the training set, computed once: 'memory' (logits in "
        "RAM; methods tapping teacher layers run it online), 'disk' (kdistill.cache in "
        "<run>/teacher_cache, taps included), 'off' (the teacher runs every step), or for "
        "language_modeling {topk: k, temperature: T, dtype: float16}: the teacher's top-k "
        "next-token distributions on disk (kdistill.cache.tokens)",
    )
    teacher_cache_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="storage dtype of a disk cache (float32 is exact)"
    )
    teacher_cache_topk: int | None = Field(
        None, ge=1, description="a disk cache keeps only the k largest logits (approximate)"
    )
    teacher_speedup: str | list[str] = Field(
        "off",
        description="run the frozen teacher faster, with the same outputs: 'off', 'auto' "
        "(fold + channels_last, + bf16 on AMX CPUs / tensor-core GPUs) or a list of fold, "
        "channels_last, bf16, compile; checked against the eager teacher on the first batch "
        "(kdistill.teacher_speedup)",
    )
    on_policy: dict[str, OnPolicyConfig] = Field(
        default_factory=dict,
        description="method name → GKD's mixed data for that method (Agarwal et al. 2024): "
        "with probability lmbda per batch the completions are the student's samples "
        "(train.on_policy of its runs); prompt → completion data only",
    )
    sequence_level: dict[str, SequenceLevelSpec] = Field(
        default_factory=dict,
        description="method name → sequence-level KD for that method (Kim & Rush 2016): it "
        "trains on the teacher's greedy completions of the training prompts (its terms: "
        "token_ce alone, or with a token divergence)",
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
        if isinstance(data, dict) and data.get("teacher_speedup") is False:
            data = {**data, "teacher_speedup": "off"}
        return data

    @field_validator("teacher_speedup")
    @classmethod
    def known_speedup(cls, value: str | list[str]) -> str | list[str]:
        parse_speedup(value, "distill.teacher_speedup")  # ConfigError is a ValueError
        return value

    @model_validator(mode="after")
    def non_empty_methods(self) -> DistillSpec:
        if not self.methods:
            raise ValueError("distill.methods must name at least one method")
        for name, terms in self.methods.items():
            if not terms:
                raise ValueError(f"method {name!r} has no terms")
        if self.hard_loss is not None and self.hard_loss not in LOSSES:
            raise ValueError(unknown_name_message("loss", self.hard_loss, LOSSES.names()))
        for field_name in ("on_policy", "sequence_level"):
            unknown = sorted(set(getattr(self, field_name)) - set(self.methods))
            if unknown:
                raise ValueError(
                    f"distill.{field_name}: {unknown} are not methods of distill.methods "
                    f"({sorted(self.methods)})"
                )
        both = sorted(set(self.on_policy) & set(self.sequence_level))
        if both:
            raise ValueError(
                f"methods {both} are in both distill.on_policy and distill.sequence_level; a "
                "method trains on the student's samples or on the teacher's, not both"
            )
        return self


class TuneSpec(Strict):
    """The choice of settings on the validation split held out of the training set: every
    grid point trains the student once (seed `seed`); the best validation score wins."""

    enabled: bool = Field(True, description="false: use the recipe's settings (CLI: --no-tune)")
    grid: dict[str, list[float]] = Field(
        default_factory=dict,
        description="values to try on the validation split: `alpha`, a loss parameter of every "
        "method (`temperature`), or one scoped to a method (`cwd.tau`)",
    )
    epochs: int | None = Field(None, ge=1, description="budget per trial (default: train.epochs)")
    seed: int = Field(0, description="the seed of every trial")


class CostSpec(Strict):
    """How model cost is measured for the report (see `kdistill.models.cost`)."""

    enabled: bool = Field(True, description="measure MACs, size, latency and memory per model")
    threads: int = Field(1, ge=1, description="torch.set_num_threads during the latency runs")
    repeats: int = Field(
        20,
        ge=1,
        description="timed forward passes per architecture and batch size, interleaved with "
        "the other architectures'; the median and quartiles are reported",
    )
    warmup: int = Field(2, ge=0, description="untimed forward passes before the timed ones")
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 64], min_length=1, description="latency batch sizes"
    )


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


def check_methods(task: Task, distill: DistillSpec) -> None:
    """Refuse methods that do not fit the task's outputs (called when the recipe is read).

    For a task with named outputs, every soft term names one of them (at most one term per
    output) and reads that output, not a tapped layer."""
    keys = [key for key in task.outputs if key is not None]
    if not keys:
        return
    for method, specs in distill.methods.items():
        outputs = [spec.output for spec in specs]
        if len(set(outputs)) != len(outputs) or not set(outputs) <= set(keys):
            raise ValueError(
                f"distill.methods.{method}: a {task.name} method has at most one term per "
                f"output, each with output: {' or output: '.join(keys)}, got outputs {outputs}"
            )
        if any(spec.student or spec.teacher for spec in specs):
            raise ValueError(
                f"distill.methods.{method}: {task.name} methods distil the outputs; "
                "layer taps (student/teacher) are not supported there"
            )


class Recipe(Strict):
    """One experiment: the data, a teacher, students trained alone and distilled by each
    method with one shared budget, and the settings grid chosen on validation."""

    name: str = Field(description="names the run folder: runs/<name>")
    task: str = Field(
        "classification",
        description="decides the targets, model sizes, hard loss and test metrics: "
        "classification | segmentation | detection | multitask, or `package.module:attr` "
        "naming your own Task (kdistill.tasks)",
    )
    metric: str | None = Field(
        None,
        description="the test metric that ranks models: tuning on validation, gap closed and "
        "the report's first column; one of the task's metrics (detection: ap = COCO "
        "AP@[.5:.95], map50, ap50, ap75); default: the task's first (detection: ap)",
    )
    seed: int = Field(0, description="first seed: data split, teacher and students")
    seeds: int = Field(1, ge=1, description="students are trained once per seed: seed, seed+1, …")
    data: DataSpec = Field(default_factory=DataSpec, description="where the data comes from")
    teacher: TeacherSpec = Field(description="the teacher: trained, or loaded from a checkpoint")
    students: list[StudentSpec] = Field(
        min_length=1, description="each student is trained alone and with every method"
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="the students' budget, the same for every method"
    )
    distill: DistillSpec = Field(default_factory=DistillSpec, description="the methods and α")
    tune: TuneSpec = Field(
        default_factory=TuneSpec, description="settings chosen on the validation split"
    )
    cost: CostSpec = Field(default_factory=CostSpec, description="how model cost is measured")
    compress: CompressSpec | None = Field(
        None, description="kdistill compress: prune, distill, quantize (only that command)"
    )

    @field_validator("task")
    @classmethod
    def known_task(cls, name: str) -> str:
        get_task(name)  # a ValueError names the task and the known ones
        return name

    @model_validator(mode="after")
    def metric_of_the_task(self) -> Recipe:
        if self.metric is not None:
            known = tuple(get_task(self.task).metrics)
            if self.metric not in known:
                coco = ""
                if self.metric in ("ap", "ap50", "ap75") and "map50" in known:
                    coco = "; the COCO metrics need pycocotools: pip install 'kdistill[coco]'"
                raise ValueError(
                    f"metric: {self.metric!r} is not a metric of task {self.task!r} "
                    f"(it has {list(known)}){coco}"
                )
        return self

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
        task = get_task(self.task)
        if self.data.kind is not None:
            return self._kind_fits(task)
        text = self.data.dataset in TEXT_DATASETS
        wanted = task.default_data
        if text != task.reads_text and ":" not in self.data.dataset:
            blocks = self.data.dataset == KJV_DATASET
            raise ValueError(
                f"task: dataset {self.data.dataset} holds "
                + (
                    "token blocks for causal language models; choose task language_modeling"
                    if blocks
                    else "prompt → completion sequences for causal LMs; choose task completion"
                )
                if text
                else f"task: {self.task} needs text: data.dataset: {wanted} (or a factory "
                f"returning its kind of data), got {self.data.dataset!r}"
            )
        if text and self.data.dataset != wanted:
            raise ValueError(
                f"task: {self.task} reads data.dataset {wanted}, got {self.data.dataset} (task "
                f"language_modeling reads {KJV_DATASET}, completion {KJV_COMPLETIONS_DATASET})"
            )
        generated = sorted({*self.distill.on_policy, *self.distill.sequence_level})
        if generated and not (
            self.data.dataset == KJV_COMPLETIONS_DATASET or ":" in self.data.dataset
        ):
            raise ValueError(
                f"distill.on_policy / sequence_level (methods {generated}) generate completions "
                f"of prompts: they need prompt → completion data ({KJV_COMPLETIONS_DATASET} with "
                f"task completion), got data.dataset {self.data.dataset!r}"
            )
        dense = task.dense  # masks / boxes targets
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
        for field, spec in (
            ("data.augment", self.data.augment),
            ("teacher.augment", self.teacher.augment),
        ):
            if dense and spec is not None:
                raise ValueError(
                    f"{field} crops and flips the inputs only; task {self.task}'s masks / boxes "
                    "would no longer match them (augmentation is for classification)"
                )
        scarce = [s.name for s in self.students if s.labelled is not None]
        if dense and scarce:
            raise ValueError(
                f"students {scarce}: labelled (label-scarce transfer) hides class labels; task "
                f"{self.task} has masks / boxes (use it with task classification)"
            )
        return self

    def as_yaml(self) -> str:
        """The recipe as YAML that reads back to this same recipe (`load_recipe`): the fields
        that differ from their defaults. (A dump of every field does not read back: the settings
        of data formats the recipe does not use, e.g. `data.text` beside an image folder, are
        refused when present.)"""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    @model_validator(mode="after")
    def cost_reads_images(self) -> Recipe:
        """Costs are measured on image inputs: off by default for a task reading token ids,
        refused when the recipe asks for them there."""
        if not self.cost.enabled or not get_task(self.task).reads_text:
            return self
        if "enabled" not in self.cost.model_fields_set:  # the default, not the user's request
            self.cost = self.cost.model_copy(update={"enabled": False})
            return self
        if self.cost.enabled:
            raise ValueError(
                f"cost.enabled: model costs (MACs, latency) are measured on image inputs; task "
                f"{self.task} reads token ids: set cost: {{enabled: false}}"
            )
        return self

    @model_validator(mode="after")
    def tokenizer_is_the_teachers(self) -> Recipe:
        """`data.tokenizer` (`recipes.vocabulary.check_vocabularies`)."""
        from kdistill.recipes.vocabulary import check_vocabularies

        check_vocabularies(self)
        return self

    def _kind_fits(self, task: Task) -> Recipe:
        """`data.kind`: the task validates the data section itself (`Task.check`: the kinds it
        reads, the files, the fields); then what the methods and options need of the data."""
        try:
            task.check(self.data.kind_spec())
        except KdistillError as error:
            raise ValueError(str(error)) from None
        generated = sorted({*self.distill.on_policy, *self.distill.sequence_level})
        if generated and task.target != "completions":
            raise ValueError(
                f"distill.on_policy / sequence_level (methods {generated}) generate completions "
                f"of prompts: they need task completion (prompt → completion data)"
            )
        check_methods(task, self.distill)
        for field_name, spec in (
            ("data.augment", self.data.augment),
            ("teacher.augment", self.teacher.augment),
        ):
            if task.dense and spec is not None:
                raise ValueError(
                    f"{field_name} crops and flips the inputs only; task {self.task}'s masks / "
                    "boxes would no longer match them (augmentation is for classification)"
                )
        scarce = [s.name for s in self.students if s.labelled is not None]
        if task.dense and scarce:
            raise ValueError(
                f"students {scarce}: labelled (label-scarce transfer) hides class labels; task "
                f"{self.task} has masks / boxes (use it with task classification)"
            )
        if "mask" in task.target and self.distill.ignore_index is None:
            # the kinds keep void pixels (255 unless data.void says) and declare them: the hard
            # loss, the dense terms and mIoU must leave them out
            self.distill.ignore_index = 255 if self.data.void is None else self.data.void
        return self

    @model_validator(mode="after")
    def token_cache_fits(self) -> Recipe:
        """Stored top-k distributions: token sequences only, and every token divergence at the
        stored temperature (a top-k distribution cannot be re-tempered unless k = V)."""
        spec = self.distill.teacher_cache
        if not isinstance(spec, TokenCacheSpec):
            return self
        task = get_task(self.task)
        if not task.reads_text:
            raise ValueError(
                f"distill.teacher_cache: stored top-k token distributions need token sequences "
                f"(task language_modeling); task {self.task} stores outputs with memory or disk"
            )
        vocab = self.data.text.vocab_size if self.data.dataset == KJV_DATASET else None
        if vocab is not None and spec.topk >= vocab:
            return self  # every token kept: any temperature is exact
        from kdistill.losses.token import TokenDivergence

        for method, terms in self.distill.methods.items():
            for term in terms:
                if not issubclass(type(create_loss(term.loss, **term.params)), TokenDivergence):
                    continue
                temperature = float(term.params.get("temperature", 1.0))
                tuned = [
                    key for key in self.tune.grid if key in ("temperature", f"{method}.temperature")
                ]
                if temperature != spec.temperature or (tuned and self.tune.enabled):
                    what = (
                        f"tune.grid.{tuned[0]} varies it"
                        if tuned and self.tune.enabled
                        else f"it uses temperature {temperature:g}"
                    )
                    raise ValueError(
                        f"distill.methods.{method}: {term.loss} reads the stored top-"
                        f"{spec.topk} teacher distributions at temperature "
                        f"{spec.temperature:g}, but {what}; a top-k distribution cannot be "
                        f"re-tempered: set distill.teacher_cache.temperature to the loss's, or "
                        f"topk to the vocabulary size"
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
                takers = [
                    term for term in terms if parameter in term_parameters(term.loss, term.params)
                ]
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


def _members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (`X | None` → (X, NoneType)), else (annotation,)."""
    if get_origin(annotation) in (Union, UnionType):
        return get_args(annotation)
    return (annotation,)


def _step(node: Any, part: str | int) -> tuple[Any, bool]:
    """Walk one part of an error location from `node` (a schema class or an annotation):
    (the annotation found there or None, whether `part` is a union tag such as
    'function-after[…, NormalizeSpec]' that pydantic inserts and a reader never wrote)."""
    members = [m for m in _members(node) if m is not type(None)]
    if len(members) > 1 and isinstance(part, str):  # a union: pydantic names the member tried
        for member in members:
            if isinstance(member, type) and issubclass(member, BaseModel):
                if part == member.__name__ or part.endswith(f" {member.__name__}]"):
                    return member, True
        return None, True
    node = members[0] if members else None
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(str(part))
        return (field.annotation if field is not None else None), False
    origin, args = get_origin(node), get_args(node)
    if origin is list and isinstance(part, int) and args:
        return args[0], False
    if origin is dict and isinstance(part, str) and len(args) == 2:
        return args[1], False
    return None, False


def _readable_location(location: tuple) -> tuple[list[str | int], type[BaseModel] | None]:
    """(the location without union tags, the schema class holding its last part or None)."""
    node: Any = Recipe
    shown: list[str | int] = []
    owner: type[BaseModel] | None = None
    for part in location:
        members = [m for m in _members(node) if m is not type(None)]
        owner = members[0] if len(members) == 1 and isinstance(members[0], type) else None
        node, is_tag = _step(node, part)
        if not is_tag:
            shown.append(part)
    model = owner if owner is not None and issubclass(owner, BaseModel) else None
    return shown, model


def unknown_field_message(name: str, model: type[BaseModel] | None) -> str:
    """`unknown field 'epoch'; did you mean 'epochs'? (valid here: epochs, batch_size, …)`"""
    if model is None:
        return f"unknown field {name!r}"
    valid = list(model.model_fields)
    prefixes = [field for field in valid if name.startswith(field) or field.startswith(name)]
    hint = close_matches(name, valid, n=1) or prefixes[:1]  # lr_rate → lr
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown field {name!r}{did_you_mean} (valid here: {', '.join(valid)})"


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        location, model = _readable_location(tuple(item["loc"]))
        path = ".".join(str(part) for part in location) or "(top level)"
        if item["type"] == "extra_forbidden" and location:
            message = unknown_field_message(str(location[-1]), model)
        else:
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
