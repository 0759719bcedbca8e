"""`kdistill init`: a commented starter recipe for your own teacher, student and data.

    kdistill init --teacher mypkg.models:Big --student mypkg.models:Small --data data/images

The data is named the way a recipe names it, guessed from its form:

| `--data`                        | recipe                                               |
|---------------------------------|------------------------------------------------------|
| a folder holding train/, test/  | `dataset: imagefolder`, `root:` the folder           |
| `train.npz,test.npz`            | `dataset: arrays`, `train:` and `test:`              |
| `package.module:factory`        | `dataset:` that factory (returning (train, test))    |
| a built-in name                 | `dataset: fashion_mnist`, `digits`, …                |

A model outside kdistill's registry gets exactly the kwargs of the recipe; its constructor
arguments that name the number of classes or of input channels (`num_classes`, `classes`,
`in_channels`, `channels`, …) and that `--teacher-kwargs` / `--student-kwargs` leave out are
filled from the data (classification data only), and commented as such. Any other required
argument must be given. The recipe is validated before it is returned, so what is written is a
recipe that `kdistill run` accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdistill.data.sources import ARRAYS, IMAGE_FOLDER, dataset_kind
from kdistill.errors import ConfigError, KdistillError
from kdistill.models.specs import ModelSpecError, check_model_spec, resolve_model
from kdistill.recipes.schema import SCENES_DATASET, Recipe, _format_validation_error

__all__ = ["DataGuess", "guess_data", "starter_recipe"]

CLASS_ARGUMENTS = ("num_classes", "classes", "n_classes", "nb_classes", "num_labels")
CHANNEL_ARGUMENTS = ("in_channels", "channels", "in_chans", "num_channels", "input_channels")

# a first method per built-in task: the soft terms that fit its outputs
TASK_METHODS: dict[str, tuple[str, str, list[dict]]] = {
    "classification": (
        "kd",
        "Hinton et al. 2015",
        [{"loss": "kd", "params": {"temperature": 4.0}}],
    ),
    "segmentation": (
        "pixel_kd",
        "per-pixel KD of the class maps",
        [{"loss": "pixel_kd", "params": {"temperature": 1.0}}],
    ),
    "detection": ("det_logit_mse", "matches the raw detection head", [{"loss": "det_logit_mse"}]),
    "multitask": (
        "kd_both",
        "PixelKD on seg, head matching on det",
        [{"loss": "pixel_kd", "output": "seg"}, {"loss": "det_logit_mse", "output": "det"}],
    ),
}


NOTES = {
    ("normalize", "train"): "per-channel mean/std of the training split",
    ("normalize", "auto"): "the dataset's own normalisation",
}


@dataclass
class DataGuess:
    """What `--data` stands for: the recipe's `data:` fields and what was learnt of the data."""

    fields: dict[str, Any]
    described: str
    classes: int | None = None
    channels: int | None = None
    notes: dict[str, str] = field(default_factory=dict)  # field → end-of-line comment

    def sample(self, count: int = 2) -> Any:
        """The first `count` training inputs as one batch (`N×C×H×W`), or None for data not
        read here (a built-in set of masks and boxes)."""
        if "dataset" not in self.fields or self.classes is None:
            return None
        from kdistill.data.sources import load_train_test

        fields = self.fields
        train, _ = load_train_test(
            fields["dataset"],
            root=fields.get("root"),
            train=fields.get("train"),
            test=fields.get("test"),
            builtin_normalize=fields.get("normalize") == "auto",
        )
        return train.inputs[:count].float()


def guess_data(text: str) -> DataGuess:
    """The `data:` block `text` names (see the module table); ConfigError when it names none."""
    path = Path(text).expanduser()
    if path.is_dir():
        from kdistill.data.imagefolder import peek_image_folder

        classes, channels, (height, width) = peek_image_folder(path)
        return DataGuess(
            {"dataset": IMAGE_FOLDER, "root": str(path.resolve()), "normalize": "train"},
            f"image folder {path} ({len(classes)} classes, {channels} channel(s), "
            f"{height}×{width})",
            len(classes),
            channels,
            {"root": "train/<class>/<image> and test/<class>/<image>"},
        )
    parts = [part.strip() for part in text.split(",")]
    if len(parts) == 2 and all(part.endswith(".npz") for part in parts):
        from kdistill.data.npz import load_npz_pair

        train, test = (str(Path(part).expanduser().resolve()) for part in parts)
        train_set, _ = load_npz_pair(train, test)
        return DataGuess(
            {"dataset": ARRAYS, "train": train, "test": test, "normalize": "train"},
            f"arrays {parts[0]}, {parts[1]} ({train_set.num_classes} classes, input "
            f"{'×'.join(map(str, train_set.input_shape))})",
            train_set.num_classes,
            train_set.input_shape[0],
        )
    if text == SCENES_DATASET:
        return DataGuess({"dataset": text}, f"dataset {text} (masks and boxes)")
    try:
        from kdistill.recipes.schema import DataSpec

        DataSpec(dataset=text)  # a known name or an importable factory
    except (ValidationError, KdistillError) as error:
        raise ConfigError(
            f"--data {text!r}: not a folder holding train/ and test/, nor two files "
            f"'train.npz,test.npz', nor a dataset ({_first_message(error)})"
        ) from None
    from kdistill.data.sources import load_train_test

    train_set, _ = load_train_test(text)
    kind = "factory" if dataset_kind(text) == "factory" else "dataset"
    return DataGuess(
        {"dataset": text, "normalize": "auto" if kind == "dataset" else "train"},
        f"{kind} {text} ({train_set.num_classes} classes, input "
        f"{'×'.join(map(str, train_set.input_shape))})",
        train_set.num_classes,
        train_set.input_shape[0],
    )


def _first_message(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return error.errors()[0]["msg"].removeprefix("Value error, ")
    return str(error)


def _model_kwargs(
    spec: str, given: Mapping[str, Any], data: DataGuess, option: str
) -> tuple[dict[str, Any], list[str]]:
    """The kwargs the recipe gives `spec`: `given`, plus class / channel counts taken from the
    data for the constructor arguments so named; (kwargs, names filled from the data)."""
    try:
        source = resolve_model(spec)
    except ModelSpecError as error:
        raise ConfigError(f"--{option} {spec!r}: {error}") from None
    kwargs = dict(given)
    filled = []
    if source.kind != "registry" and source.parameters is not None:
        for name in source.parameters:  # in the constructor's order
            value = data.classes if name in CLASS_ARGUMENTS else None
            value = data.channels if name in CHANNEL_ARGUMENTS else value
            if value is not None and name not in kwargs:
                kwargs[name] = value
                filled.append(name)
    try:
        check_model_spec(spec, kwargs)
    except ModelSpecError as error:
        raise ConfigError(
            f"--{option} {spec!r}: {error}; pass them with --{option}-kwargs '{{name: value}}'"
        ) from None
    return kwargs, filled


def _scored_output(
    spec: str, kwargs: Mapping[str, Any], data: DataGuess, role: str
) -> tuple[str | int, str] | None:
    """Which output of the model a classification recipe scores, found on one batch of the
    data: None when the model returns one tensor; for a tuple or a dict, the position or key of
    the `N×classes` output (a dict's `logits` first), with a comment saying what was seen."""
    sample = data.sample()
    if sample is None:
        return None
    import torch

    from kdistill.models import model_from_spec

    sizes = {"image_size": sample.shape[-1]}
    if data.classes is not None:
        sizes["num_classes"] = data.classes
    if data.channels is not None:
        sizes["in_channels"] = data.channels
    try:
        model = model_from_spec(spec, dict(kwargs), data_sizes=sizes).eval()
        with torch.no_grad():
            output = model(sample)
    except Exception as error:  # noqa: BLE001 - any failure of the user's model, named
        raise ConfigError(
            f"--{role} {spec!r}: one batch of the data (shape {tuple(sample.shape)}) through "
            f"the model failed: {type(error).__name__}: {error}"
        ) from None
    if isinstance(output, torch.Tensor):
        return None
    if isinstance(output, Mapping):
        items = list(output.items())
        kind = f"a dict with keys {[key for key, _ in items]}"
    elif isinstance(output, list | tuple):
        items = list(enumerate(output))
        kind = f"a {type(output).__name__} of {len(items)}"
    else:
        raise ConfigError(
            f"--{role} {spec!r}: the model returns {type(output).__name__}; a classifier returns "
            "a tensor of class scores, or a tuple / dict holding one"
        )

    def scores(value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.dim() == 2
            and value.shape[0] == sample.shape[0]
            and (data.classes is None or value.shape[1] == data.classes)
        )

    named = [key for key, value in items if key == "logits" and scores(value)]
    fitting = named or [key for key, value in items if scores(value)]
    if not fitting:
        shapes = {key: tuple(getattr(value, "shape", ())) for key, value in items}
        raise ConfigError(
            f"--{role} {spec!r}: the model returns {kind} and none is N×classes "
            f"({data.classes}) class scores: shapes {shapes}"
        )
    key = fitting[0]
    shape = "×".join(str(n) for n in dict(items)[key].shape)
    return key, f"it returns {kind}: this one ({shape}) is scored"


def _flow(value: Any) -> str:
    """A YAML value on one line (`{channels: 1, classes: 10}`, a quoted path when needed)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _line(key: str, value: Any, comment: str = "", indent: int = 0, width: int = 30) -> str:
    text = " " * indent + f"{key}: {_flow(value)}"
    return f"{text.ljust(width)}  # {comment}" if comment else text


def starter_recipe(
    teacher: str,
    student: str,
    data: str,
    *,
    task: str = "classification",
    teacher_kwargs: Mapping[str, Any] | None = None,
    student_kwargs: Mapping[str, Any] | None = None,
    teacher_checkpoint: str | None = None,
    name: str = "recipe",
    command: str = "kdistill init",
    file_name: str = "recipe.yaml",
) -> str:
    """The starter recipe's YAML text (validated: it loads with `load_recipe` as written)."""
    guess = guess_data(data)
    if task not in TASK_METHODS and ":" not in task:
        raise ConfigError(f"--task {task!r}: one of {', '.join(TASK_METHODS)}, or pkg.module:Task")
    classification = task == "classification"
    known = guess if classification else DataGuess({}, "", None, None)
    models = {}
    for role, spec, given in (
        ("teacher", teacher, teacher_kwargs),
        ("student", student, student_kwargs),
    ):
        models[role] = _model_kwargs(spec, given or {}, known, role)
    outputs = {
        role: _scored_output(spec, models[role][0], guess, role) if classification else None
        for role, spec in (("teacher", teacher), ("student", student))
    }
    if teacher_checkpoint is not None:
        guess.fields["normalize"] = "none"
        guess.notes["normalize"] = (
            "the teacher was trained elsewhere: inputs as read (x/255 for 8-bit images); the "
            "run refuses it when it scores markedly better read another way — give "
            "{mean: [...], std: [...]} if it was trained on standardised inputs"
        )
    method, source, terms = TASK_METHODS.get(task, TASK_METHODS["classification"])
    grid = {"alpha": [0.5, 0.9], "temperature": [2.0, 4.0]} if method == "kd" else {}
    if task in ("segmentation", "detection"):
        grid = {"alpha": [0.5, 0.9]}
    lines = [
        f"# A starter recipe: distil {teacher} into {student} on {guess.described}.",
        f"# Written by: {command}",
        "# Check it without training (every model built, one batch through every method, the",
        "# plan and a time estimate), then run it:",
        f"#   kdistill run {file_name} --dry-run",
        f"#   kdistill run {file_name}",
        "# Every field with its type, default and meaning: docs/recipe-reference.md",
        "# (`kdistill reference`). Any field can be overridden: --set train.epochs=3",
        _line("name", name, "the run folder is runs/<name>"),
        _line("task", task, "classification | segmentation | detection | multitask"),
        _line("seed", 0),
        _line("seeds", 3, "each student is trained once per seed, alone and distilled"),
        "data:",
    ]
    for key, value in guess.fields.items():
        lines.append(_line(key, value, guess.notes.get(key, NOTES.get((key, value), "")), indent=2))
    lines.append(
        _line("val_size", 0.1, "held out of the training split to choose settings", indent=2)
    )
    for role, spec in (("teacher", teacher), ("student", student)):
        kwargs, filled = models[role]
        if role == "teacher":
            lines.append("teacher:")
            pad = 2
        else:
            lines += ["students:", f"  - name: {_flow('student')}"]
            pad = 4
        lines.append(_line("model", spec, indent=pad))
        if kwargs:
            note = f"{', '.join(filled)}: from the data" if filled else ""
            lines.append(_line("kwargs", kwargs, note, indent=pad))
        if outputs[role] is not None:
            key, note = outputs[role]
            lines.append(_line("output", key, note, indent=pad))
        if role == "teacher" and teacher_checkpoint is not None:
            lines += [
                _line("checkpoint", teacher_checkpoint, "trained weights: not trained again", 2),
                "  train: {epochs: 10, optimizer: adam, lr: 0.001, schedule: cosine, "
                "batch_size: 64}  # only with fine_tune: true",
            ]
        elif role == "teacher":
            lines += [
                "  # checkpoint: teacher.pt  # trained weights: the teacher is then not trained",
                "  train: {epochs: 10, optimizer: adam, lr: 0.001, schedule: cosine, "
                "batch_size: 64}",
            ]
    lines += [
        "train:                          # the students' budget: the same alone and distilled",
        "  epochs: 10",
        "  optimizer: adam",
        "  lr: 0.001",
        "  schedule: cosine",
        "  batch_size: 64",
        "distill:",
        _line("alpha", 0.9, "loss = (1 − α)·hard loss + α·soft terms", indent=2),
        "  methods:",
        f"    {method}:{' ' * max(1, 27 - len(method))}# {source}",
    ]
    lines += [f"      - {_flow(term)}" for term in terms]
    if grid:
        lines += [
            "tune:                           # tried on the validation split; the best is used",
            "  grid:",
        ]
        lines += [_line(key, values, indent=4) for key, values in grid.items()]
    else:
        lines += ["tune:", "  enabled: false"]
    text = "\n".join(lines) + "\n"
    try:
        Recipe.model_validate(yaml.safe_load(text))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, "the starter recipe")) from None
    return text
