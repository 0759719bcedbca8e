"""Item 8 of issue 13 on real data: your own classes by import path, trained on an image folder
of real Fashion-MNIST test images (PNG), ending in the teacher / alone / distilled table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kdistill.cli import main
from kdistill.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdistill.errors import DataError


def fashion_mnist_available() -> bool:
    try:
        load_fashion_mnist("test", normalize=False)
    except DataError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST files not installed (make data)"
)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    from kdistill.examples.fashion_mnist_pngs import write_fashion_mnist_pngs

    root = tmp_path_factory.mktemp("fashion_png")
    assert write_fashion_mnist_pngs(root, per_class=8) == {"train": 80, "test": 80}
    return root


def test_pngs_hold_the_real_test_images(png_folder):
    # independently of the writer: the first image of class 0 (T-shirt/top) in the t10k file
    # order is the first training PNG of its folder, pixel for pixel
    data = load_fashion_mnist("test", normalize=False)
    first = int(np.flatnonzero(data.targets.numpy() == 0)[0])
    expected = (data.inputs[first, 0].numpy() * 255).round().astype(np.uint8)
    folder = png_folder / "train" / FASHION_MNIST_CLASSES[0].replace("/", "-")
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 8 and pngs[0].name == f"{first:05d}.png"
    assert np.array_equal(np.asarray(Image.open(pngs[0])), expected)


def test_own_models_recipe_runs_to_the_table(png_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "run",
        "own_models_imagefolder",
        "--data-root",
        str(png_folder),
        "--out",
        str(out),
        "--seeds",
        "1",
        "--no-tune",
        "--quiet",
        "--set",
        "data.val_size=10",
        "--set",
        "teacher.train.epochs=1",
        "--set",
        "teacher.kwargs.width=8",
        "--set",
        "train.epochs=1",
        "--set",
        "cost.enabled=false",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() + "/" + row.split("|")[2].strip() for row in rows[1:]] == [
        "teacher/teacher",
        "tiny/alone",
        "tiny/kd",
    ]
    data = json.loads((out / "data.json").read_text())
    assert data["dataset"] == "imagefolder" and data["input_shape"] == [1, 28, 28]
    assert data["sizes"] == {"train": 70, "val": 10, "test": 80}
    assert data["normalization"]["mode"] == "train" and len(data["normalization"]["mean"]) == 1
    assert sorted(data["classes"]) == sorted(c.replace("/", "-") for c in FASHION_MNIST_CLASSES)
