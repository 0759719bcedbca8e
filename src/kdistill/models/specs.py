"""Model specs: one string (plus keyword arguments) that names a model from anywhere.

| spec                          | builds                                                         |
|-------------------------------|----------------------------------------------------------------|
| `resnet20`                    | kdistill's registry (`kdistill.models.list_models()`)          |
| `package.module:callable`     | your own class or factory, imported (`Outer.inner` allowed)    |
| `torchvision:<name>`          | `torchvision.models.get_model_builder(name)(**kwargs)`         |
| `timm:<name>`                 | `timm.create_model(name, pretrained=False, **kwargs)`          |
| `hf:<model_type>`             | Hugging Face `transformers`: a config of that type built from  |
|                               | `kwargs`, random init (`AutoModel` unless `hf_class` says)     |
| `hf:<folder>`                 | `from_pretrained(folder, local_files_only=True)`; the class is |
|                               | the folder's `config.architectures[0]` unless `hf_class` says  |

What each model is given:

- a **registry** model also receives the sizes that follow from the data (`data_sizes`:
  `in_channels`, `num_classes`, `image_size`; `vocab_size` for text), but only those its
  constructor names as parameters (`in_channels` / `num_classes` also through `**kwargs`);
  the spec's kwargs win;
- every **other** model receives exactly the spec's kwargs, nothing added.

`check_model_spec(spec, kwargs)` checks, without building anything, that the spec resolves and
that the kwargs fit the callable's signature (unknown names, missing required arguments), so a
recipe fails when it is read, not after the teacher has trained. For `hf:` the kwargs are checked
against the config class (whose constructor would otherwise accept any name silently); the
reserved key `hf_class` names the `transformers` class to build (`AutoModelForCausalLM`,
`GPT2LMHeadModel`, …). Every failure is a `ModelSpecError` (a `ConfigError`, so a `ValueError`)
whose one-line message names the spec and the fix.

The optional packages are imported only when a spec needs them; a missing one is named with the
pip command that installs it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.errors import ConfigError
from kdistill.importpath import import_callable as _import_callable
from kdistill.registry import close_matches, unknown_name_message

__all__ = [
    "DATA_SIZES",
    "HF_CLASS_KEY",
    "ModelSource",
    "ModelSpecError",
    "callable_source",
    "check_model_spec",
    "import_callable",
    "model_from_spec",
    "pretrained_folder",
    "resolve_model",
]

DATA_SIZES = ("in_channels", "num_classes", "image_size", "vocab_size")
"""Constructor arguments a registry model may receive from the data (see the module doc)."""

_SIZES_THROUGH_VAR_KEYWORD = ("in_channels", "num_classes")
HF_CLASS_KEY = "hf_class"
SPEC_FORMS = (
    "a registry name (kdistill layers --list), package.module:callable, torchvision:<name>, "
    "timm:<name>, hf:<model_type> or hf:<folder>"
)


class ModelSpecError(ConfigError):
    """A model spec that does not resolve, or kwargs that do not fit it."""


@dataclass
class ModelSource:
    """A resolved spec: how to build the model and what its constructor accepts.

    `parameters` is None when the accepted names are unknown (a `**kwargs` catch-all)."""

    spec: str
    kind: str  # "registry", "import", "torchvision", "timm", "hf"
    label: str  # how messages name the callable: "MyStudent()"
    build: Callable[[dict[str, Any]], Any]
    parameters: list[str] | None
    required: list[str] = field(default_factory=list)
    signature_of: Callable[..., Any] | None = None  # the callable sizes are matched against

    def injected_sizes(self, data_sizes: Mapping[str, Any] | None) -> dict[str, Any]:
        """The data sizes this model receives: registry models only, accepted names only."""
        if self.kind != "registry" or not data_sizes or self.signature_of is None:
            return {}
        explicit, var_keyword = _signature_names(self.signature_of)
        return {
            name: value
            for name, value in data_sizes.items()
            if name in explicit or (var_keyword and name in _SIZES_THROUGH_VAR_KEYWORD)
        }

    def check_kwargs(self, kwargs: Mapping[str, Any], provided: Iterable[str] = ()) -> None:
        """Raise ModelSpecError for a keyword the callable does not take, or a required
        argument that neither `kwargs` nor `provided` (the injected sizes) gives."""
        if self.parameters is not None:
            unknown = sorted(set(kwargs) - set(self.parameters))
            if unknown:
                name = unknown[0]
                hint = close_matches(name, self.parameters, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ModelSpecError(
                    f"{self.label} got an unexpected keyword {name!r}{did_you_mean}; it accepts "
                    f"{', '.join(self.parameters) or 'no keyword arguments'}"
                )
        given = set(kwargs) | set(provided)
        missing = [name for name in self.required if name not in given]
        if missing:
            raise ModelSpecError(
                f"{self.label} needs the argument(s) {', '.join(missing)}; give them under kwargs"
                + (
                    " (a model that is not in kdistill's registry gets only the kwargs you give)"
                    if self.kind != "registry"
                    else ""
                )
            )


def _signature_names(function: Callable[..., Any]) -> tuple[list[str], bool]:
    """(names that can be passed by keyword, whether a **kwargs catch-all exists)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins without a signature: accept anything
        return [], True
    names, var_keyword = [], False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            names.append(parameter.name)
    return names, var_keyword


def _required_names(function: Callable[..., Any]) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
    ]


def callable_source(spec: str, function: Callable[..., Any]) -> ModelSource:
    """A ModelSource for any callable (e.g. a dataset factory), to check kwargs against it."""
    return _callable_source(spec, "import", function)


def _callable_source(spec: str, kind: str, function: Callable[..., Any]) -> ModelSource:
    names, var_keyword = _signature_names(function)
    label = f"{getattr(function, '__qualname__', repr(function))}()"
    return ModelSource(
        spec=spec,
        kind=kind,
        label=label,
        build=lambda kwargs: function(**kwargs),
        parameters=None if var_keyword else names,
        required=_required_names(function),
        signature_of=function,
    )


# -- import paths ---------------------------------------------------------------------------------
def import_callable(path: str, what: str = "model") -> Callable[..., Any]:
    """`kdistill.importpath.import_callable`, failing with a ModelSpecError."""
    try:
        return _import_callable(path, what)
    except ConfigError as error:
        raise ModelSpecError(str(error)) from None


# -- optional packages ----------------------------------------------------------------------------
def _import_optional(package: str, spec: str, install: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ModelSpecError(
            f"{spec!r} needs {package}, which is not installed ({error}); install it with {install}"
        ) from None
    except Exception as error:  # noqa: BLE001 - e.g. torchvision built for another torch
        import torch

        raise ModelSpecError(
            f"{spec!r} needs {package}, which is installed but fails to import "
            f"({type(error).__name__}: {error}); it probably does not match torch "
            f"{torch.__version__}: install the {package} release built for this torch"
        ) from None


def _torchvision_source(spec: str, name: str) -> ModelSource:
    torchvision = _import_optional(
        "torchvision", spec, "pip install 'kdistill[vision]' (the torchvision matching your torch)"
    )
    models = importlib.import_module("torchvision.models")
    known = list(models.list_models())
    if name not in known:
        raise ModelSpecError(f"{spec!r}: " + unknown_name_message("torchvision model", name, known))
    del torchvision
    source = _callable_source(spec, "torchvision", models.get_model_builder(name))
    source.label = f"torchvision.models.{name}()"
    return source


def _timm_source(spec: str, name: str) -> ModelSource:
    timm = _import_optional("timm", spec, "pip install timm (it needs torchvision)")
    if not timm.is_model(name):
        known = timm.list_models()
        raise ModelSpecError(f"{spec!r}: " + unknown_name_message("timm model", name, known))
    return ModelSource(
        spec=spec,
        kind="timm",
        label=f"timm.create_model({name!r})",
        build=lambda kwargs: timm.create_model(name, **{"pretrained": False, **kwargs}),
        parameters=None,  # timm passes **kwargs to the architecture
    )


# -- Hugging Face transformers ------------------------------------------------------------------
def _is_folder_spec(target: str) -> bool:
    return "/" in target or target.startswith((".", "~")) or Path(target).is_dir()


def pretrained_folder(spec: str) -> Path | None:
    """The folder of an `hf:<folder>` spec (a model saved with `save_pretrained`: trained
    weights, and often its tokenizer), else None (`hf:<model_type>` is built untrained)."""
    prefix, colon, target = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if prefix != "hf" or not colon or not _is_folder_spec(target):
        return None
    return Path(target).expanduser()


def _hf_source(spec: str, target: str) -> ModelSource:
    transformers = _import_optional(
        "transformers", spec, "pip install 'kdistill[lm]' (or pip install transformers)"
    )
    if _is_folder_spec(target):
        folder = Path(target).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelSpecError(
                f"{spec!r}: {folder} is not a Hugging Face model folder (no config.json); save "
                "one with model.save_pretrained(folder)"
            )
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        config_class = type(config)
        default_class = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    else:
        mapping = transformers.CONFIG_MAPPING
        if target not in mapping:
            raise ModelSpecError(
                f"{spec!r}: "
                + unknown_name_message("transformers model_type", target, list(mapping.keys()))
            )
        config_class = mapping[target]
        default_class = "AutoModel"
        folder = None
    accepted = sorted(_hf_config_keys(config_class) | {HF_CLASS_KEY})

    def build(kwargs: dict[str, Any]) -> nn.Module:
        kwargs = dict(kwargs)
        model_class = _hf_class(transformers, kwargs.pop(HF_CLASS_KEY, default_class), spec)
        if folder is None:
            config = transformers.AutoConfig.for_model(target, **kwargs)
            if hasattr(model_class, "from_config"):
                return model_class.from_config(config)
            return model_class(config)
        model, info = model_class.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, **kwargs
        )
        missing = list(info.get("missing_keys", [])) + [
            str(item[0]) if isinstance(item, tuple) else str(item)
            for item in info.get("mismatched_keys", [])
        ]
        if missing:
            raise ModelSpecError(
                f"{spec!r}: the folder has no (or wrongly shaped) weights for {missing[:5]}, which "
                f"would be left randomly initialised; set kwargs.{HF_CLASS_KEY} to the class it "
                f"was saved from (config.architectures: {config.architectures})"
            )
        return model

    return ModelSource(
        spec=spec,
        kind="hf",
        label=f"{config_class.__name__}()",
        build=build,
        parameters=accepted,
    )


def _hf_config_keys(config_class: type) -> set[str]:
    """Names a config really uses: its constructor's parameters, the attributes a default
    instance holds, and the aliases of its attribute_map (`hidden_size` → `n_embd`)."""
    keys = set(_signature_names(config_class.__init__)[0]) - {"self"}
    try:
        keys |= set(vars(config_class()))
    except Exception:  # noqa: BLE001,S110 - a config without defaults: its signature only
        pass
    keys |= set(getattr(config_class, "attribute_map", {}) or {})
    return {key for key in keys if not key.startswith("_")}


def _hf_class(transformers: Any, name: str, spec: str) -> Any:
    if not isinstance(name, str) or not hasattr(transformers, name):
        raise ModelSpecError(
            f"{spec!r}: kwargs.{HF_CLASS_KEY}: transformers has no class {name!r} (e.g. "
            "AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2LMHeadModel)"
        )
    return getattr(transformers, name)


# -- the entry points -----------------------------------------------------------------------------
def resolve_model(spec: str) -> ModelSource:
    """The `ModelSource` a spec names (see the module table); raises ModelSpecError."""
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"a model spec is a non-empty string: {SPEC_FORMS}; got {spec!r}")
    prefix, colon, rest = spec.partition(":")
    if colon and prefix == "torchvision":
        return _torchvision_source(spec, rest)
    if colon and prefix == "timm":
        return _timm_source(spec, rest)
    if colon and prefix == "hf":
        return _hf_source(spec, rest)
    if colon:
        return _callable_source(spec, "import", import_callable(spec))
    from kdistill.models import MODELS

    if spec not in MODELS:
        raise ModelSpecError(
            unknown_name_message("model", spec, MODELS.names()) + f"; a model spec is {SPEC_FORMS}"
        )
    return _callable_source(spec, "registry", MODELS.get(spec))


def check_model_spec(spec: str, kwargs: Mapping[str, Any] | None = None) -> ModelSource:
    """Resolve `spec` and check `kwargs` against it (registry models: the data sizes count as
    given); returns the source. Builds nothing."""
    source = resolve_model(spec)
    kwargs = dict(kwargs or {})
    provided = source.injected_sizes(dict.fromkeys(DATA_SIZES, 0))
    source.check_kwargs(kwargs, provided)
    return source


def model_from_spec(
    spec: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    data_sizes: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the model `spec` names with `kwargs` (and, for a registry model, the `data_sizes`
    its constructor accepts; `kwargs` win). Seed torch first for reproducible weights.

    Raises ModelSpecError when the spec does not resolve, the kwargs do not fit, or the callable
    returns something other than an `nn.Module`."""
    source = resolve_model(spec)
    kwargs = dict(kwargs or {})
    sizes = source.injected_sizes(data_sizes)
    source.check_kwargs(kwargs, sizes)
    model = source.build({**sizes, **kwargs})
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{spec!r}: {source.label} returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model
