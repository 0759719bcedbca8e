"""Model specs: registry names, import paths, torchvision: / timm: / hf:, kwargs checked early."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap

import pytest
import torch
from torch import nn

from kdistill.errors import ConfigError
from kdistill.models import MODELS, ModelSpecError, check_model_spec, model_from_spec
from kdistill.recipes import load_recipe
from kdistill.recipes.runner import build_model

FOREIGN = '''
from torch import nn

class MyStudent(nn.Module):
    """Takes neither in_channels nor num_classes."""
    def __init__(self, width, depth=2):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

class Recorder(nn.Module):
    """Remembers exactly the keyword arguments it was built with."""
    def __init__(self, **kwargs):
        super().__init__()
        self.received = dict(kwargs)
        self.linear = nn.Linear(2, 2)

class Outer:
    class Inner(nn.Module):
        def __init__(self, size: int = 3):
            super().__init__()
            self.linear = nn.Linear(size, size)

def not_a_model(width=1):
    return "a string"

def make_student(width: int = 4):
    return MyStudent(width=width)

THING = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `h4_user_models` importable from a temporary folder."""
    (tmp_path / "h4_user_models.py").write_text(FOREIGN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "h4_user_models", raising=False)
    yield "h4_user_models"
    sys.modules.pop("h4_user_models", None)


# -- registry models: built exactly as before ---------------------------------------------------
def old_build(name: str, sizes: dict, kwargs: dict, seed: int) -> nn.Module:
    """The runner's construction before model specs (an independent reimplementation):
    in_channels and num_classes always, image_size when the constructor names it."""
    constructor = MODELS.get(name)
    given = {"in_channels": sizes["in_channels"], "num_classes": sizes["num_classes"]}
    if "image_size" in inspect.signature(constructor).parameters:
        given["image_size"] = sizes["image_size"]
    given.update(kwargs)
    torch.manual_seed(seed)
    return constructor(**given)


# models of images (language models, which take vocab_size, came later: test_lm_models)
IMAGE_MODELS = [
    n for n in MODELS.names() if "vocab_size" not in inspect.signature(MODELS.get(n)).parameters
]


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_registry_models_get_the_same_sizes_and_weights_as_before(name):
    sizes = {"in_channels": 1, "num_classes": 10, "image_size": 28}
    if name.startswith("seg_"):
        sizes["num_classes"] = 11
    expected = old_build(name, sizes, {}, seed=5)
    torch.manual_seed(5)
    got = model_from_spec(name, {}, data_sizes=sizes)
    assert type(got) is type(expected)
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    assert all(torch.equal(got_state[k], expected_state[k]) for k in got_state)


def test_registry_kwargs_win_over_data_sizes():
    torch.manual_seed(0)
    model = model_from_spec("resnet8", {"num_classes": 3}, data_sizes={"num_classes": 10})
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_registry_typo_in_kwargs_is_named_with_the_accepted_names():
    with pytest.raises(ModelSpecError) as info:
        check_model_spec("resnet8", {"widht": 4})
    message = str(info.value)
    assert "got an unexpected keyword 'widht' (did you mean 'width'?)" in message
    assert "in_channels" in message and "width" in message


def test_unknown_registry_name_lists_the_spec_forms():
    with pytest.raises(ModelSpecError, match="did you mean 'resnet8'.*package.module:callable"):
        check_model_spec("resnet9")


# -- import paths ---------------------------------------------------------------------------------
def test_import_path_model_gets_exactly_the_recipe_kwargs(user_module):
    model = model_from_spec(
        f"{user_module}:Recorder",
        {"width": 7},
        data_sizes={"in_channels": 1, "num_classes": 10, "image_size": 28},
    )
    assert model.received == {"width": 7}  # no in_channels / num_classes added


def test_import_path_class_factory_and_nested_attribute(user_module):
    assert len(model_from_spec(f"{user_module}:MyStudent", {"width": 3, "depth": 4}).layers) == 4
    assert model_from_spec(f"{user_module}:make_student", {"width": 5}).layers[0].in_features == 5
    assert model_from_spec(f"{user_module}:Outer.Inner", {}).linear.in_features == 3


def test_import_path_same_seed_same_weights(user_module):
    torch.manual_seed(1)
    first = model_from_spec(f"{user_module}:MyStudent", {"width": 3})
    torch.manual_seed(1)
    second = model_from_spec(f"{user_module}:MyStudent", {"width": 3})
    assert torch.equal(first.layers[0].weight, second.layers[0].weight)


@pytest.mark.parametrize(
    ("spec", "kwargs", "fragment"),
    [
        (
            ":MyStudent",
            {"widht": 3},
            "MyStudent() got an unexpected keyword 'widht' (did you mean 'width'?); it accepts "
            "width, depth",
        ),
        (":MyStudent", {}, "MyStudent() needs the argument(s) width; give them under kwargs"),
        (":MyStudnet", {}, "has no attribute 'MyStudnet'; did you mean 'MyStudent'"),
        (":THING", {}, "THING is a int, not a class or function"),
    ],
)
def test_import_path_errors_name_the_fix(user_module, spec, kwargs, fragment):
    with pytest.raises(ModelSpecError) as info:
        check_model_spec(user_module + spec, kwargs)
    assert fragment in str(info.value)


def test_import_path_returning_a_non_module_fails(user_module):
    with pytest.raises(ModelSpecError, match="returned a str, not a torch nn.Module"):
        model_from_spec(f"{user_module}:not_a_model", {})


def test_missing_module_says_how_to_make_it_importable():
    with pytest.raises(ModelSpecError) as info:
        check_model_spec("h4_no_such_package.models:Net")
    message = str(info.value)
    assert "cannot import 'h4_no_such_package.models'" in message and "PYTHONPATH" in message


def test_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    (tmp_path / "h4_cwd_models.py").write_text("from torch import nn\nNet = nn.Identity\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "h4_cwd_models", raising=False)
    assert isinstance(model_from_spec("h4_cwd_models:Net"), nn.Identity)


def test_module_that_raises_on_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "h4_broken_models.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ModelSpecError, match="importing 'h4_broken_models' raised RuntimeError: boom"
    ):
        check_model_spec("h4_broken_models:Net")


# -- recipes: the kwargs are checked when the recipe is read --------------------------------------
RECIPE = """
name: specs
teacher: {{model: middle_student}}
students:
  - name: mine
    model: {module}:MyStudent
    kwargs: {kwargs}
"""


def test_bad_student_kwarg_fails_when_the_recipe_is_read(tmp_path, user_module):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(module=user_module, kwargs="{widht: 3}")))
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert (
        "students.0.kwargs: MyStudent() got an unexpected keyword 'widht' (did you mean "
        "'width'?); it accepts width, depth" in str(info.value)
    )


def test_good_import_path_recipe_builds_through_the_runner(tmp_path, user_module):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(module=user_module, kwargs="{width: 3}")))
    recipe = load_recipe(path)

    class Data:  # what build_model reads from a dataset
        input_shape = (1, 28, 28)
        num_classes = 10

    model = build_model(recipe.students[0], Data(), seed=0)
    assert model.layers[0].in_features == 3


def test_unknown_model_in_recipe_names_the_field(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "name: x\nteacher: {model: middle_student}\nstudents: [{name: a, model: 'nopkg_h4:Net'}]\n"
    )
    with pytest.raises(ConfigError, match=r"students\.0\.model: 'nopkg_h4:Net': cannot import"):
        load_recipe(path)


# -- optional packages ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "package", "install"),
    [
        ("torchvision:resnet18", "torchvision", "pip install 'kdistill[vision]'"),
        ("timm:resnet18", "timm", "pip install timm"),
        ("hf:gpt2", "transformers", "pip install 'kdistill[lm]'"),
    ],
)
def test_missing_optional_package_names_the_pip_command(monkeypatch, spec, package, install):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    with pytest.raises(ModelSpecError) as info:
        check_model_spec(spec)
    message = str(info.value)
    assert f"{spec!r} needs {package}, which is not installed" in message and install in message


def test_torchvision_built_for_another_torch_is_explained(tmp_path, monkeypatch):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    try:
        with pytest.raises(ModelSpecError) as info:
            check_model_spec("torchvision:resnet18")
    finally:
        sys.modules.pop("torchvision", None)
    message = str(info.value)
    assert "installed but fails to import" in message and "torchvision::nms" in message
    assert f"torch {torch.__version__}" in message


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
TINY_GPT2 = {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 40, "n_positions": 16}


@pytest.mark.slow  # importing transformers and building a model: ~10 s on 2 busy cores
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_hf_config_model_random_init_and_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    model = model_from_spec("hf:gpt2", {**TINY_GPT2, "hf_class": "AutoModelForCausalLM"})
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == 16
    tokens = torch.randint(0, 40, (2, 5))
    assert model(tokens).logits.shape == (2, 5, 40)

    model.save_pretrained(tmp_path / "tiny")
    loaded = model_from_spec(f"hf:{tmp_path / 'tiny'}")  # the class saved in config.json
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    model.eval(), loaded.eval()
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_hf_config_typo_is_caught_before_building(tmp_path):
    with pytest.raises(ModelSpecError, match=r"GPT2Config\(\) got an unexpected keyword 'n_embdd'"):
        check_model_spec("hf:gpt2", {"n_embdd": 16})
    with pytest.raises(ModelSpecError, match="unknown transformers model_type 'gtp2'"):
        check_model_spec("hf:gtp2")
    with pytest.raises(ModelSpecError, match="not a Hugging Face model folder"):
        check_model_spec(f"hf:{tmp_path}")
