"""The run's data and models, as a plan's steps build them: the train / validation / test splits
with the recipe's normalisation (and the validation split read the other way, for the check of a
loaded teacher), the teacher's checkpoint, and seeded models with the output they are scored on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data import (
    ArrayDataset,
    ChannelStats,
    SceneDataset,
    channel_stats,
    dataset_kind,
    fashion_mnist_scenes,
    load_train_test,
    split_train_val,
    standardize,
    take,
)
from kdistill.data.completions import (
    KJV_COMPLETIONS_DATASET,
    PromptCompletions,
    kjv_completion_splits,
)
from kdistill.data.kinds import read_data
from kdistill.data.text import BOS_ID, EOS_ID, TokenBlocks, kjv_splits
from kdistill.data.tokenizer import load_tokenizer
from kdistill.distill.model_output import pick_output
from kdistill.engine.checkpoint import (
    load_state_dict_file,
    load_weights,
)
from kdistill.models import model_from_spec
from kdistill.recipes.plan import recipe_task
from kdistill.recipes.schema import (
    SCENES_DATASET,
    TEXT_DATASETS,
    ModelSpec,
    NormalizeSpec,
    Recipe,
    TeacherSpec,
)
from kdistill.tasks import (
    Task,
    get_task,
)

EVAL_BATCH = 1000  # a task may ask for fewer (`eval_batch_size`: N×L×V logits)


Data = ArrayDataset | SceneDataset | TokenBlocks | PromptCompletions


@dataclass
class Splits:
    train: Data
    val: Data
    test: Data
    normalization: dict = field(default_factory=dict)  # how inputs were standardised (data.json)
    tokenizer: Any = None  # text: the tokenizer of the token ids (decodes samples for reports)
    text: dict | None = None  # text: books, tokens and bytes per split, tokenizer (data.json)
    # the validation split read the other way (("none", raw) when the recipe normalises,
    # ("train", standardised) when it does not): a loaded teacher is scored on both
    other_val: tuple[str, Data] | None = None


def load_splits(recipe: Recipe, task: Task | None = None, out_dir: Path | None = None) -> Splits:
    """Train / validation / test data carrying the targets of the recipe's task.

    `out_dir`: the run folder, where text data keeps its tokenizer (``<out_dir>/tokenizer``
    unless ``data.text.tokenizer_dir`` says; None and no folder given: not saved)."""
    task = task or recipe_task(recipe)
    spec = recipe.data
    if spec.kind is not None:
        return kind_splits(recipe, task, out_dir)
    if spec.dataset in TEXT_DATASETS:
        return text_splits(recipe, task, out_dir)
    builtin = dataset_kind(spec.dataset) == "registry"
    if spec.dataset == SCENES_DATASET:
        scenes = spec.scenes
        full_train, test = fashion_mnist_scenes(
            spec.root,
            train_count=scenes.train_count,
            test_count=scenes.test_count,
            size=scenes.size,
            seed=recipe.seed,
            max_items=scenes.max_items,
        )
    else:
        full_train, test = load_train_test(
            spec.dataset,
            root=spec.root,
            train=spec.train,
            test=spec.test,
            kwargs=spec.kwargs,
            builtin_normalize=spec.normalize == "auto",
        )
    full_train, test = task.prepare(full_train), task.prepare(test)
    stratify = isinstance(full_train, ArrayDataset)  # class labels (a scene holds several)
    full_train = take(full_train, spec.train_limit, seed=recipe.seed, stratify=stratify)
    test = take(test, spec.test_limit, seed=recipe.seed, stratify=stratify)
    train, val = split_train_val(full_train, spec.val_size, seed=recipe.seed, stratify=stratify)
    if spec.normalize == "auto" and (builtin or spec.dataset == SCENES_DATASET):
        return Splits(train, val, test, {"mode": "auto", "applied": "the dataset's own"})
    return _normalized(train, val, test, spec.normalize)  # "auto": the training split's


def _standardizable(data: Data) -> bool:
    """Float N×C×… images whose channels vary (what `channel_stats` takes)."""
    inputs = getattr(data, "inputs", None)
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 3:
        return False
    flat = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
    return bool((flat.std(dim=1) > 0).all())


def text_splits(recipe: Recipe, task: Task, out_dir: Path | None) -> Splits:
    """`data.dataset: kjv`: token blocks split by book (`kdistill.data.text.kjv_splits`);
    `kjv_completions`: its verses as prompt → completion sequences, split by the same books
    (`kdistill.data.completions.kjv_completion_splits`)."""
    spec, text = recipe.data, recipe.data.text
    folder = text.tokenizer_dir or (Path(out_dir) / "tokenizer" if out_dir is not None else None)
    common = {  # the corpus, its book split and the tokenizer: the same for both layouts
        "vocab_size": text.vocab_size,
        "val_books": text.val_books,
        "test_books": text.test_books,
        "tokenizer_dir": folder,
        "min_frequency": text.min_frequency,
        "program": text.program,
        "text_file": text.text_file,
        "train_limit": spec.train_limit,
        "test_limit": spec.test_limit,
        "seed": recipe.seed,
    }
    if spec.dataset == KJV_COMPLETIONS_DATASET:
        found = kjv_completion_splits(
            max_length=text.max_length,
            start_id=BOS_ID if text.start_token == "bos" else EOS_ID,
            end_token=text.end_token,
            **common,
        )
    else:
        found = kjv_splits(block_size=text.block_size, **common)
    train, val, test = (task.prepare(data) for data in (found.train, found.val, found.test))
    return Splits(train, val, test, {"mode": "none"}, found.tokenizer, found.info)


def load_teacher_checkpoint(spec: TeacherSpec, teacher: nn.Module) -> None:
    """Load `spec.checkpoint` into `teacher` (its key, prefix and trust settings applied);
    errors name the `teacher.` fields."""
    weights = load_state_dict_file(
        spec.checkpoint,
        trust=spec.trust_checkpoint,
        key=spec.checkpoint_key,
        strip_prefix=spec.strip_prefix,
        field="teacher.",
    )
    load_weights(teacher, weights, "teacher", spec.checkpoint, field="teacher.")


def build_model(spec: ModelSpec, data: Data, seed: int, task: Task | None = None) -> nn.Module:
    """Seeded construction: the same seed gives the same initial weights.

    A registry model also gets the data's sizes its constructor accepts (`in_channels`,
    `num_classes`, `image_size`; `Task.model_kwargs`); any other model (import path,
    torchvision:, hf:, …) gets exactly the recipe's kwargs (`kdistill.models.specs`)."""
    task = task or get_task("classification")
    sizes = {**task.model_kwargs(data), "image_size": data.input_shape[-1]}
    torch.manual_seed(seed)
    model = model_from_spec(spec.model, spec.kwargs, data_sizes=sizes)
    return pick_output(model, spec.output, model_label(spec))


def model_label(spec: ModelSpec) -> str:
    """How messages name the recipe field of `spec`: `teacher` or `students.<name>`."""
    name = getattr(spec, "name", None)
    return "teacher" if name is None else f"students.{name}"


def kind_splits(recipe: Recipe, task: Task, out_dir: Path | None) -> Splits:
    """`data.kind`: the splits the kind reads (`kdistill.data.kinds.read_data`) with the task's
    targets; the limits, the validation split (held out of the training split unless the files
    have one) and the normalisation as for every dataset. Token kinds are tokenised with
    `data.tokenizer` (the teacher's), else with a BPE trained on the training text and kept in
    ``<run>/tokenizer``."""
    spec, seed = recipe.data, recipe.seed
    options = spec.kind_spec()
    tokenizer = load_tokenizer(spec.tokenizer) if spec.tokenizer is not None else None
    if task.reads_text and tokenizer is None and out_dir is not None:
        options.setdefault("tokenizer_dir", str(Path(out_dir) / "tokenizer"))
    found = read_data(task.target, options, tokenizer=tokenizer, seed=seed)
    train, test = task.prepare(found.train), task.prepare(found.test)
    stratify = isinstance(train, ArrayDataset)  # class labels (a scene holds several)
    train = take(train, spec.train_limit, seed=seed, stratify=stratify)
    test = take(test, spec.test_limit, seed=seed, stratify=stratify)
    if found.val is not None:
        val = task.prepare(found.val)
    else:
        train, val = split_train_val(train, spec.val_size, seed=seed, stratify=stratify)
    info = {**found.info, "fingerprint": found.fingerprint}
    if task.reads_text:
        text = {**info, "tokenizer": spec.tokenizer or options.get("tokenizer_dir")}
        return Splits(train, val, test, {"mode": "none"}, found.tokenizer, text)
    if spec.normalize == "auto" and found.info.get("normalized"):
        return Splits(train, val, test, {"mode": "auto", "applied": found.info["normalized"]})
    return _normalized(train, val, test, spec.normalize)


def _normalized(train: Data, val: Data, test: Data, normalize: Any) -> Splits:
    """The splits with `data.normalize` applied to the inputs (targets untouched): none, the
    training split's per-channel statistics (train, or auto for data without its own), or the
    given ones; with the validation split read the other way for a loaded teacher's check."""
    if normalize == "none":
        other = (
            ("train", _standardized(val, channel_stats(train))) if _standardizable(train) else None
        )
        return Splits(train, val, test, {"mode": "none"}, other_val=other)
    if isinstance(normalize, NormalizeSpec):
        stats, mode = ChannelStats(tuple(normalize.mean), tuple(normalize.std)), "given"
    else:
        stats, mode = channel_stats(train), "train"
    record = {"mode": mode, **stats.as_dict()}
    if mode == "train":
        record["computed_on"] = f"the training split ({len(train)} samples)"
    parts = (_standardized(data, stats) for data in (train, val, test))
    return Splits(*parts, record, other_val=("none", val))


def _standardized(data: Data, stats: ChannelStats) -> Data:
    """`data` with standardised inputs: `standardize` for class arrays; a dataset of masks or
    boxes (a dataclass with `inputs`) keeps its targets and gets the standardised inputs."""
    if isinstance(data, ArrayDataset):
        return standardize(data, stats)
    plain = ArrayDataset(data.inputs, torch.zeros(len(data), dtype=torch.long), ["0"])
    return dataclasses.replace(data, inputs=standardize(plain, stats).inputs)
