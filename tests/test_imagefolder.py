"""Your own data: image folders, .npz arrays, dataset factories, and explicit normalisation."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.data import ArrayDataset, channel_stats, load_image_folder, standardize
from kdistill.data.factory import load_factory_pair
from kdistill.data.normalize import ChannelStats
from kdistill.data.npz import load_npz_pair
from kdistill.errors import ConfigError, DataError
from kdistill.recipes import load_recipe
from kdistill.recipes.runner import load_splits


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def gray_folder(root, classes=("b_cat", "a_dog"), per_class=2, size=4):
    """Image i of class folder c holds the constant value 10·(rank of c) + i."""
    for split in ("train", "test"):
        for rank, name in enumerate(sorted(classes)):
            for i in range(per_class):
                save(root / split / name / f"{i}.png", np.full((size, size), 10 * rank + i))
    return root


# -- image folders ---------------------------------------------------------------------------------
def test_image_folder_pixels_labels_and_sorted_classes(tmp_path):
    train, test = load_image_folder(gray_folder(tmp_path))
    assert train.classes == ["a_dog", "b_cat"] and test.classes == train.classes
    assert train.inputs.shape == (4, 1, 4, 4) and train.inputs.dtype == torch.float32
    assert train.targets.tolist() == [0, 0, 1, 1]
    # the values written, x / 255: a_dog gets 0 and 1, b_cat 10 and 11
    assert train.inputs[:, 0, 0, 0].tolist() == pytest.approx(
        [0 / 255, 1 / 255, 10 / 255, 11 / 255]
    )


def test_image_folder_mixing_gray_and_rgb_gives_three_channels(tmp_path):
    gray_folder(tmp_path)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 51
    save(tmp_path / "test" / "a_dog" / "9.png", rgb)
    train, test = load_image_folder(tmp_path)
    assert train.inputs.shape[1] == 3 and test.inputs.shape[1] == 3
    # a gray image is repeated to all three channels; the RGB one keeps its channels
    assert train.inputs[2, :, 0, 0].tolist() == pytest.approx([10 / 255] * 3)
    colour = test.inputs[2]  # sorted file names: 0.png, 1.png, 9.png
    assert colour[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (
            lambda r: (r / "test" / "a_dog" / "0.png").write_bytes(b"not a png"),
            "0.png: cannot be decoded",
        ),
        (lambda r: [p.unlink() for p in (r / "train" / "b_cat").iterdir()], "b_cat: no images"),
        (lambda r: (r / "test" / "c_eel").mkdir(), "only in train/: [], only in test/: ['c_eel']"),
        (lambda r: save(r / "train" / "a_dog" / "5.png", np.zeros((5, 4))), "5.png: image is 5×4"),
        (lambda r: [p.unlink() for p in (r / "test").rglob("*.png")] and None, "no images"),
    ],
)
def test_image_folder_errors_name_the_file_or_folder(tmp_path, damage, fragment):
    gray_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path)
    assert fragment in str(info.value)


def test_image_folder_without_test_split(tmp_path):
    gray_folder(tmp_path)
    for path in sorted((tmp_path / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(DataError, match=r"test: no such folder; an image folder root holds train/"):
        load_image_folder(tmp_path)


def test_non_image_files_are_skipped(tmp_path):
    gray_folder(tmp_path)
    (tmp_path / "train" / "a_dog" / "notes.txt").write_text("hello")
    (tmp_path / "train" / "a_dog" / ".DS_Store").write_bytes(b"\0")
    train, _ = load_image_folder(tmp_path)
    assert len(train) == 4


# -- npz arrays ------------------------------------------------------------------------------------
def test_npz_uint8_without_channel_dimension(tmp_path):
    x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 2]))
    np.savez(tmp_path / "test.npz", x=x[:1], y=np.array([1]))
    train, test = load_npz_pair(tmp_path / "train.npz", tmp_path / "test.npz")
    assert train.inputs.shape == (2, 1, 3, 3) and train.classes == ["0", "1", "2"]
    assert torch.equal(train.inputs[:, 0], torch.from_numpy(x).float() / 255)
    assert test.targets.tolist() == [1]


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"images": np.zeros((2, 3, 3)), "y": np.zeros(2, int)}, "no array 'x'; the file holds"),
        ({"x": np.zeros((2, 8, 8, 3)), "y": np.zeros(2, int)}, "looks channels-last"),
        ({"x": np.zeros((2, 3, 3)), "y": np.zeros(2)}, "y must be a 1-D array of integer"),
        ({"x": np.zeros((2, 3, 3)), "y": np.zeros(3, int)}, "2 samples but y holds 3"),
        ({"x": np.zeros((2, 3)), "y": np.zeros(2, int)}, "x must be N×H×W or N×C×H×W"),
    ],
)
def test_npz_errors_name_the_file_and_the_problem(tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    np.savez(tmp_path / "good.npz", x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2, int))
    with pytest.raises(DataError) as info:
        load_npz_pair(tmp_path / "bad.npz", tmp_path / "good.npz")
    assert "bad.npz" in str(info.value) and fragment in str(info.value)


# -- factories -------------------------------------------------------------------------------------
FACTORY = """
import torch
from torch.utils.data import TensorDataset

class Named(TensorDataset):
    classes = ["zero", "one", "two"]

def make(n=4):
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 2, 2)
    y = torch.arange(n) % 3
    return Named(x, y), TensorDataset(x[:2], y[:2])

def broken():
    return [(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 3, 3), 1)], [(torch.zeros(1, 2, 2), 0)]

def single():
    return TensorDataset(torch.zeros(2, 1))
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "h4_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "h4_factory", raising=False)
    yield "h4_factory"
    sys.modules.pop("h4_factory", None)


def test_factory_datasets_become_arrays_with_their_class_names(factory_module):
    train, test = load_factory_pair(f"{factory_module}:make", {"n": 5})
    assert train.inputs.shape == (5, 1, 2, 2) and len(test) == 2
    assert train.classes == ["zero", "one", "two"]
    assert torch.equal(train.inputs[3, 0], torch.tensor([[12.0, 13.0], [14.0, 15.0]]))
    assert train.targets.tolist() == [0, 1, 2, 0, 1]


def test_factory_errors(factory_module):
    with pytest.raises(DataError, match="sample 1 has shape \\(1, 3, 3\\) but sample 0 has"):
        load_factory_pair(f"{factory_module}:broken")
    with pytest.raises(DataError, match="returns \\(train, test\\), got TensorDataset"):
        load_factory_pair(f"{factory_module}:single")


# -- normalisation ---------------------------------------------------------------------------------
def test_channel_stats_match_numpy_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 2, 3, 3)).astype(np.float32) * [[[[2.0]], [[0.5]]]] + 3
    data = ArrayDataset(torch.from_numpy(x), torch.zeros(5, dtype=torch.int64), ["a"])
    stats = channel_stats(data)
    per_channel = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1)
    assert stats.mean == pytest.approx(per_channel.mean(axis=1).tolist(), rel=1e-12)
    assert stats.std == pytest.approx(per_channel.std(axis=1).tolist(), rel=1e-12)
    out = standardize(data, stats).inputs.double().transpose(0, 1).reshape(2, -1)
    assert out.mean(dim=1).tolist() == pytest.approx([0, 0], abs=1e-6)
    assert out.std(dim=1, correction=0).tolist() == pytest.approx([1, 1], abs=1e-6)


def test_constant_channel_and_wrong_channel_count_fail():
    data = ArrayDataset(torch.ones(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(DataError, match="channel\\(s\\) \\[0\\] have the same value everywhere"):
        channel_stats(data)
    with pytest.raises(DataError, match="normalize.mean: 3 value\\(s\\) for inputs with 1 channel"):
        standardize(data, ChannelStats((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


RECIPE = """
name: own_data
data:
  dataset: {dataset}
  val_size: 2
{extra}
teacher: {{model: mini_student}}
students: [{{name: s, model: mini_student}}]
"""


def recipe(tmp_path, dataset, extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(dataset=dataset, extra=extra)))
    return load_recipe(path)


def test_image_folder_recipe_normalises_with_the_training_split(tmp_path):
    gray_folder(tmp_path / "images", per_class=4)
    splits = load_splits(recipe(tmp_path, "imagefolder", f"  root: {tmp_path / 'images'}"))
    assert len(splits.train) == 6 and len(splits.val) == 2 and len(splits.test) == 8
    record = splits.normalization
    assert record["mode"] == "train" and "6 samples" in record["computed_on"]
    train = splits.train.inputs.double()
    assert train.mean().item() == pytest.approx(0, abs=1e-6)
    assert train.std(correction=0).item() == pytest.approx(1, abs=1e-6)
    # the test split uses the training split's statistics: x' = (x − mean) / std
    raw_test = load_image_folder(tmp_path / "images")[1].inputs.double()
    expected = (raw_test - record["mean"][0]) / record["std"][0]
    assert torch.allclose(splits.test.inputs.double(), expected, atol=1e-6)


def test_arrays_recipe_with_explicit_statistics(tmp_path):
    x = np.full((6, 1, 2, 2), 51, dtype=np.uint8)  # 51 / 255 = 0.2
    np.savez(tmp_path / "tr.npz", x=x, y=np.array([0, 1, 0, 1, 0, 1]))
    np.savez(tmp_path / "te.npz", x=x[:2], y=np.array([0, 1]))
    extra = f"  train: {tmp_path / 'tr.npz'}\n  test: {tmp_path / 'te.npz'}\n"
    extra += "  normalize: {mean: [0.1], std: [0.5]}"
    splits = load_splits(recipe(tmp_path, "arrays", extra))
    assert torch.allclose(splits.test.inputs, torch.full((2, 1, 2, 2), (0.2 - 0.1) / 0.5))
    assert splits.normalization == {"mode": "given", "mean": [0.1], "std": [0.5]}


@pytest.mark.parametrize(
    ("dataset", "extra", "fragment"),
    [
        ("imagefolder", "", "dataset imagefolder needs root"),
        ("arrays", "  train: a.npz", "dataset arrays needs test"),
        ("digits", "  train: a.npz", "train: .npz files are read only by dataset: arrays"),
        ("digits", "  kwargs: {n: 3}", "kwargs are passed to a dataset factory"),
        ("h4_nowhere:make", "", "cannot import 'h4_nowhere'"),
        ("imagefoldr", "", "did you mean 'imagefolder'"),
        ("digits", "  normalize: {mean: [0.1], std: [0.5, 1]}", "1 mean value(s) but 2 std"),
    ],
)
def test_data_fields_are_checked_when_the_recipe_is_read(tmp_path, dataset, extra, fragment):
    with pytest.raises(ConfigError) as info:
        recipe(tmp_path, dataset, extra)
    assert fragment in str(info.value) and "data" in str(info.value)


def test_factory_kwargs_are_checked_when_the_recipe_is_read(tmp_path, factory_module):
    with pytest.raises(ConfigError, match=r"data.kwargs: make\(\) got an unexpected keyword 'm'"):
        recipe(tmp_path, f"{factory_module}:make", "  kwargs: {m: 3}")


def test_builtin_dataset_keeps_its_own_normalisation(tmp_path):
    pytest.importorskip("sklearn")
    from kdistill.data import load_dataset, split_train_val

    splits = load_splits(recipe(tmp_path, "digits"))
    full = load_dataset("digits", "train")  # what the runner used before: unchanged numbers
    train, val = split_train_val(full, 2, seed=0)
    assert torch.equal(splits.train.inputs, train.inputs)
    assert torch.equal(splits.val.inputs, val.inputs)
    assert splits.normalization["mode"] == "auto"
