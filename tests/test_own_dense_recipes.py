"""Issue 25 on the user's own masks and boxes: `kdistill init --task segmentation` on a mask
folder (VOC convention: class index per pixel, 255 void) and `--task detection` on COCO JSON,
each written with channel-wise distillation (CWD), then `--dry-run`, then a run on a tiny budget.
The teacher's reported score is recomputed here from its saved weights and the files as written
(masks read back by hand, COCO boxes converted by hand)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kdistill.cli import main
from kdistill.engine.checkpoint import load_checkpoint
from kdistill.models import create_model

TINY = ["--seeds", "1", "--no-tune", "--quiet", "--set", "cost.enabled=false"]
TINY += ["--set", "train.epochs=1", "--set", "teacher.train.epochs=1"]
TINY += ["--set", "train.batch_size=16", "--set", "teacher.train.batch_size=16"]


def square_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[int, ...]]:
    image = rng.integers(10, 50, (size, size)).astype(np.uint8)
    side = int(rng.integers(size // 4, size // 2))
    x, y = (int(v) for v in rng.integers(1, size - side - 1, 2))
    image[y : y + side, x : x + side] = rng.integers(180, 250, (side, side))
    return image, (x, y, side)


@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory):
    """root/{train,test}/images/*.png + masks/*.png: a bright square is class 1, the rest 0,
    its 1-pixel outline 255 (void)."""
    root = tmp_path_factory.mktemp("masks")
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("test", 16)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for index in range(count):
            image, (x, y, side) = square_scene(rng, 32)
            mask = np.zeros((32, 32), np.uint8)
            mask[y - 1 : y + side + 1, x - 1 : x + side + 1] = 255
            mask[y : y + side, x : x + side] = 1
            Image.fromarray(image).save(root / split / "images" / f"{index:03d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{index:03d}.png")
    return root


def test_segmentation_on_a_mask_folder_with_cwd(mask_folder, tmp_path):
    recipe_file = tmp_path / "seg.yaml"
    argv = ["init", "--task", "segmentation", "--teacher", "seg_teacher"]
    argv += ["--student", "seg_student", "--data", str(mask_folder), "--out", str(recipe_file)]
    assert main(argv) == 0
    recipe = yaml.safe_load(recipe_file.read_text())
    assert recipe["data"]["kind"] == "masks" and recipe["data"]["root"] == str(mask_folder)
    assert set(recipe["distill"]["methods"]) == {"pixel_kd", "cwd"}
    assert recipe["distill"]["methods"]["cwd"][0]["loss"] == "cwd"
    assert main(["run", str(recipe_file), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    out = tmp_path / "run"
    assert main(["run", str(recipe_file), "--out", str(out), *TINY]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["method"] for r in records} == {"teacher", "alone", "pixel_kd", "cwd"}
    reported = next(r for r in records if r["method"] == "teacher")["test_metrics"]
    # recomputed: the saved teacher on the test PNGs, standardised as data.json says, scored by
    # a confusion matrix over the pixels whose mask is not 255
    stats = json.loads((out / "data.json").read_text())["normalization"]
    assert stats["mode"] == "train"
    teacher = create_model("seg_teacher", in_channels=1, num_classes=2)
    tensors, _ = load_checkpoint(out / "models", "teacher")
    teacher.load_state_dict(tensors)
    files = sorted((mask_folder / "test" / "images").glob("*.png"))
    x = torch.tensor(np.stack([np.asarray(Image.open(f)) for f in files]) / 255.0)[:, None]
    x = ((x - stats["mean"][0]) / stats["std"][0]).float()
    masks = np.stack(
        [np.asarray(Image.open(mask_folder / "test" / "masks" / f.name)) for f in files]
    )
    with torch.no_grad():
        predicted = teacher.eval()(x).argmax(1).numpy()
    kept = masks != 255
    ious = []
    for c in (0, 1):
        truth, guess = (masks == c) & kept, (predicted == c) & kept
        union = (truth | guess).sum()
        if union:
            ious.append((truth & guess).sum() / union)
    assert reported["miou"] == pytest.approx(float(np.mean(ious)), abs=1e-6)
    assert reported["pixel_accuracy"] == pytest.approx(
        float((predicted == masks)[kept].mean()), abs=1e-6
    )


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory):
    """root/{train,test}/annotations.json + images/: squares are category 3 ("square"), wide
    bars category 7 ("bar") — ids that are not 0, 1, so the map to indices is exercised."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(1)
    truth = {}
    for split, count in (("train", 48), ("test", 16)):
        (root / split / "images").mkdir(parents=True)
        images, annotations = [], []
        for index in range(count):
            image = rng.integers(10, 50, (64, 64)).astype(np.uint8)
            objects = []
            for _ in range(int(rng.integers(1, 3))):
                bar = bool(rng.integers(0, 2))
                w, h = (int(rng.integers(24, 32)), int(rng.integers(8, 12))) if bar else (16, 16)
                x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 64 - h))
                image[y : y + h, x : x + w] = 220
                objects.append((7 if bar else 3, [x, y, w, h]))
            name = f"{index:03d}.png"
            Image.fromarray(image).save(root / split / "images" / name)
            images.append({"id": index + 1, "file_name": name, "width": 64, "height": 64})
            for category, bbox in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": category,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": 0,
                    }
                )
            truth[(split, name)] = objects
        categories = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]
        document = {"images": images, "annotations": annotations, "categories": categories}
        (root / split / "annotations.json").write_text(json.dumps(document))
    return root, truth


def test_detection_on_coco_json_with_cwd(coco_folder, tmp_path):
    root, truth = coco_folder
    recipe_file = tmp_path / "det.yaml"
    argv = ["init", "--task", "detection", "--teacher", "det_teacher"]
    argv += ["--student", "det_student", "--data", str(root), "--out", str(recipe_file)]
    assert main(argv) == 0
    recipe = yaml.safe_load(recipe_file.read_text())
    assert recipe["data"]["kind"] == "coco"
    cwd = recipe["distill"]["methods"]["cwd"][0]
    assert (cwd["loss"], cwd["student"], cwd["teacher"]) == ("cwd", "head", "head")
    assert main(["run", str(recipe_file), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    out = tmp_path / "run"
    longer = ["--set", "teacher.train.epochs=30", "--set", "teacher.train.lr=0.003"]
    assert main(["run", str(recipe_file), "--out", str(out), *TINY, *longer]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["method"] for r in records} == {"teacher", "alone", "det_logit_mse", "cwd"}
    reported = next(r for r in records if r["method"] == "teacher")["test_metrics"]
    # recomputed: the test images with boxes converted here (COCO [x, y, w, h] → x1 y1 x2 y2,
    # category 3 → 0, 7 → 1), as a torchvision-style loader, scored by tasks.evaluate
    from kdistill.tasks import evaluate

    stats = json.loads((out / "data.json").read_text())["normalization"]
    teacher = create_model("det_teacher", in_channels=1, num_classes=2)
    tensors, _ = load_checkpoint(out / "models", "teacher")
    teacher.load_state_dict(tensors)
    items = []
    for (split, name), objects in sorted(truth.items()):
        if split != "test":
            continue
        pixels = np.asarray(Image.open(root / "test" / "images" / name)) / 255.0
        image = ((torch.tensor(pixels)[None] - stats["mean"][0]) / stats["std"][0]).float()
        boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects]).float()
        labels = torch.tensor([{3: 0, 7: 1}[c] for c, _ in objects])
        items.append((image, {"boxes": boxes, "labels": labels}))
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=8,
        collate_fn=lambda batch: (torch.stack([i for i, _ in batch]), [t for _, t in batch]),
    )
    expected = evaluate(teacher, loader, "detection")
    assert expected["map50"] > 0.05  # a teacher that finds boxes: the comparison can fail
    for key, value in expected.items():
        if key in reported and not np.isnan(value):
            assert reported[key] == pytest.approx(value, abs=1e-6), key
    assert "map50" in reported or "map" in reported
