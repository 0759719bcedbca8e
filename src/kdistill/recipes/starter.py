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

import torch
import yaml
from pydantic import ValidationError

from kdistill.data.sources import ARRAYS, IMAGE_FOLDER, dataset_kind
from kdistill.errors import ConfigError, KdistillError
from kdistill.models.specs import (
    ModelSpecError,
    check_model_spec,
    pretrained_folder,
    resolve_model,
)
from kdistill.recipes.schema import SCENES_DATASET, Recipe, _format_validation_error
from kdistill.tasks import get_task

__all__ = ["DataGuess", "guess_data", "starter_recipe"]

CLASS_ARGUMENTS = ("num_classes", "classes", "n_classes", "nb_classes", "num_labels")
CHANNEL_ARGUMENTS = ("in_channels", "channels", "in_chans", "num_channels", "input_channels")

# a first method per built-in task: the soft terms that fit its outputs
TASK_METHODS: dict[str, tuple[str, str, list[dict]]] = {  # by what a task's batches carry
    "class": (
        "kd",
        "Hinton et al. 2015",
        [{"loss": "kd", "params": {"temperature": 4.0}}],
    ),
    "mask": (
        "pixel_kd",
        "per-pixel KD of the class maps",
        [{"loss": "pixel_kd", "params": {"temperature": 1.0}}],
    ),
    "boxes": ("det_logit_mse", "matches the raw detection head", [{"loss": "det_logit_mse"}]),
    "mask+boxes": (
        "kd_both",
        "PixelKD on seg, head matching on det",
        [{"loss": "pixel_kd", "output": "seg"}, {"loss": "det_logit_mse", "output": "det"}],
    ),
    "tokens": (
        "kd",
        "token-level KD: forward KL per position",
        [{"loss": "forward_kl"}],
    ),
    "completions": (
        "kd",
        "token-level KD on the completions",
        [{"loss": "forward_kl"}],
    ),
}

# channel-wise distillation (Shu et al. 2021), a second method of the dense tasks: on the class
# maps for segmentation; for detection on the raw head maps (taps found on one batch)
CWD_TERM = {"loss": "cwd", "weight": 3, "params": {"tau": 4.0}}


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
    tokens: int | None = None  # token kinds: the vocabulary the models need
    sample_inputs: Any = None  # dense kinds: two training inputs (one dry batch)

    def sizes(self) -> dict[str, int]:
        """The data sizes a registry model receives (`kdistill.models.specs`)."""
        found = {"num_classes": self.classes, "in_channels": self.channels}
        found["vocab_size"] = self.tokens
        if self.sample_inputs is not None:
            found["image_size"] = self.sample_inputs.shape[-1]
        return {key: value for key, value in found.items() if value is not None}

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


def guess_kind(text: str, task: Any, tokenizer: str | None = None) -> DataGuess:
    """The `data:` block `text` names for a task that reads data kinds (every task but
    classification): a folder (`root:`), one file (`file:`, text), two files `train,test`
    (`.npz`, `.jsonl`), a factory `package.module:function` or a built-in set — the first of
    the task's kinds (`kdistill.data.kinds`) whose check passes. The data are read once, to
    learn the models' sizes; ConfigError names the kinds the task takes when none fits."""
    from kdistill.data.kinds import kinds_for, read_data
    from kdistill.data.tokenizer import load_tokenizer

    path = Path(text).expanduser()
    parts = [part.strip() for part in text.split(",")]
    if path.is_dir():
        base = {"root": str(path.resolve())}
    elif path.is_file():
        base = {"file": str(path.resolve())}
    elif len(parts) == 2 and all(Path(part).expanduser().is_file() for part in parts):
        train, test = (str(Path(part).expanduser().resolve()) for part in parts)
        base = {"train": train, "test": test}
    elif ":" in text:
        base = {"factory": text}
    else:
        base = {}
    tried = []
    for name, kind in kinds_for(task.target).items():
        if base and not set(base) <= set(kind.options):
            continue
        if not base and name != text:
            continue
        spec = {"kind": name, **base}
        raw = load_tokenizer(tokenizer) if tokenizer is not None else None
        try:
            kind.check(spec)
            found = read_data(task.target, spec, tokenizer=raw)
        except KdistillError as error:  # not this kind: the next one
            tried.append(f"{name}: {_first_message(error)}")
            continue
        return _read_guess(spec, found, task)
    menu = "; ".join(f"{name}: {kind.layout}" for name, kind in kinds_for(task.target).items())
    raise ConfigError(
        f"--data {text!r}: no data kind of task {task.name} reads it"
        + (f" ({'; '.join(tried)})" if tried else "")
        + f". Task {task.name} reads: {menu}"
    )


def _read_guess(spec: dict[str, Any], found: Any, task: Any) -> DataGuess:
    train = task.prepare(found.train)
    sizes = task.model_kwargs(train)
    described = f"{spec['kind']} data " + ", ".join(
        str(spec[key]) for key in ("root", "file", "train", "test", "factory") if key in spec
    )
    counts = f"{len(found.train)} training"
    if task.reads_text:
        return DataGuess(spec, f"{described} ({counts} sequences)", tokens=train.vocab_size)
    normalize = "auto" if found.info.get("normalized") else "train"
    fields = {**spec, "normalize": normalize}
    shape = "×".join(str(n) for n in train.input_shape)
    return DataGuess(
        fields,
        f"{described} ({counts} images {shape}, {sizes.get('num_classes')} classes)",
        sizes.get("num_classes"),
        sizes.get("in_channels"),
        sample_inputs=train.get_batch(torch.arange(min(2, len(train))))[0],
    )


def _last_weighted_layer(model: Any, inputs: Any) -> tuple[str, Any] | None:
    """(name, output) of the last module with weights `model` calls on `inputs` (no children)."""
    names = {module: name for name, module in model.named_modules()}
    called: list[tuple[str, Any]] = []

    def record(module: Any, args: Any, output: Any) -> None:
        called.append((names[module], output))

    hooks = [
        module.register_forward_hook(record)
        for module in names
        if not list(module.children()) and any(True for _ in module.parameters())
    ]
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return called[-1] if called else None


def _dense_taps(task: Any, specs: dict[str, tuple[str, dict]], guess: DataGuess) -> dict | None:
    """For detection: the last layer with weights each model calls (its head), tapped by CWD on
    its raw maps when teacher and student give `N×C×H×W` maps there; None when they do not."""
    if task.target != "boxes" or guess.sample_inputs is None:
        return None
    from kdistill.models import model_from_spec

    found = {}
    for role, (spec, kwargs) in specs.items():
        model = model_from_spec(spec, dict(kwargs), data_sizes=guess.sizes())
        last = _last_weighted_layer(model, guess.sample_inputs)
        if last is None or not isinstance(last[1], torch.Tensor) or last[1].dim() != 4:
            return None
        found[role] = last[0]
    return {**CWD_TERM, "student": found["student"], "teacher": found["teacher"]}


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
    if source.kind != "registry" and source.parameters is not None and not pretrained_folder(spec):
        for name in source.parameters:  # in the constructor's order
            value = data.classes if name in CLASS_ARGUMENTS else None
            value = data.channels if name in CHANNEL_ARGUMENTS else value
            value = data.tokens if name == "vocab_size" else value
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
    try:
        task_object = get_task(task)
    except (ValueError, KdistillError) as error:
        raise ConfigError(f"--task {task!r}: {_first_message(error)}") from None
    target = task_object.target
    tokenizer = _teacher_tokenizer(teacher) if task_object.reads_text else None
    if target == "class":
        guess = guess_data(data)
    else:
        guess = guess_kind(data, task_object, tokenizer)
    models = {}
    for role, spec, given in (
        ("teacher", teacher, teacher_kwargs),
        ("student", student, student_kwargs),
    ):
        models[role] = _model_kwargs(spec, given or {}, guess, role)
    outputs = {
        role: _scored_output(spec, models[role][0], guess, role) if target == "class" else None
        for role, spec in (("teacher", teacher), ("student", student))
    }
    if teacher_checkpoint is not None and not task_object.reads_text:
        guess.fields["normalize"] = "none"
        guess.notes["normalize"] = (
            "the teacher was trained elsewhere: inputs as read (x/255 for 8-bit images); the "
            "run refuses it when it scores markedly better read another way — give "
            "{mean: [...], std: [...]} if it was trained on standardised inputs"
        )
    if tokenizer is not None:
        guess.fields["tokenizer"] = tokenizer
        guess.notes["tokenizer"] = "the teacher's own tokenizer: the data are its token ids"
    context = _teacher_context(teacher) if task_object.reads_text else None
    if context is not None and context < 128 and target == "tokens":
        guess.fields["block_size"] = context
        guess.notes["block_size"] = "tokens per block: the teacher's context (its config)"
    methods = _methods(
        task_object,
        {
            role: (spec, models[role][0])
            for role, spec in (("teacher", teacher), ("student", student))
        },
        guess,
    )
    grid = {"alpha": [0.5, 0.9], "temperature": [2.0, 4.0]} if target == "class" else {}
    if task_object.dense and task_object.outputs.keys() == {None}:
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
        _line("task", task, "decides targets, hard loss, metrics and the data kinds read"),
        _line("seed", 0),
        _line("seeds", 3, "each student is trained once per seed, alone and distilled"),
        "data:",
    ]
    for key, value in guess.fields.items():
        lines.append(_line(key, value, guess.notes.get(key, NOTES.get((key, value), "")), indent=2))
    if target != "tokens" and target != "completions" or "val" not in guess.fields:
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
        if role != "teacher":
            continue
        if teacher_checkpoint is not None:
            lines += [
                _line("checkpoint", teacher_checkpoint, "trained weights: not trained again", 2),
                "  train: {epochs: 10, optimizer: adam, lr: 0.001, schedule: cosine, "
                "batch_size: 64}  # only with fine_tune: true",
            ]
        elif pretrained_folder(spec) is not None:
            lines.append(
                "  train: {epochs: 1, optimizer: adamw, lr: 0.0005, batch_size: 16}  # only "
                "with fine_tune: true (the folder's weights are used as saved)"
            )
        else:
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
        "  batch_size: 64" if not task_object.reads_text else "  batch_size: 16",
        "distill:",
        _line("alpha", 0.9, "loss = (1 − α)·hard loss + α·soft terms", indent=2),
    ]
    if task_object.reads_text:
        lines.append(
            _line("teacher_cache", "off", "N×L×V logits per block: the teacher runs online", 2)
        )
    lines += [
        "  methods:",
    ]
    for method, (source, terms) in methods.items():
        lines.append(f"    {method}:{' ' * max(1, 27 - len(method))}# {source}")
        lines += [f"      - {_flow(term)}" for term in terms]
    if task_object.reads_text:
        lines.append("cost: {enabled: false}          # costs are measured on image inputs")
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


def _teacher_tokenizer(teacher: str) -> str | None:
    """`hf:<folder>` of a teacher folder that holds its tokenizer (`data.tokenizer`), or None."""
    folder = pretrained_folder(teacher)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    return f"hf:{folder.resolve()}"


def _teacher_context(teacher: str) -> int | None:
    """The positions an `hf:<folder>` teacher takes (`n_positions` / `max_position_embeddings`
    of its config.json), or None."""
    folder = pretrained_folder(teacher)
    if folder is None or not (folder / "config.json").is_file():
        return None
    import json

    config = json.loads((folder / "config.json").read_text())
    value = config.get("n_positions", config.get("max_position_embeddings"))
    return int(value) if isinstance(value, int) else None


def _methods(
    task: Any, specs: dict[str, tuple[str, dict]], guess: DataGuess
) -> dict[str, tuple[str, list[dict]]]:
    """The methods the starter recipe writes: the task's first (`TASK_METHODS`, by what its
    batches carry) and, for segmentation and detection, channel-wise distillation."""
    method, source, terms = TASK_METHODS[task.target]
    methods = {method: (source, terms)}
    if task.target == "mask":
        methods["cwd"] = ("channel-wise distillation of the class maps", [CWD_TERM])
    taps = _dense_taps(task, specs, guess)
    if taps is not None:
        methods["cwd"] = ("channel-wise distillation of the detection heads' maps", [taps])
    return methods
