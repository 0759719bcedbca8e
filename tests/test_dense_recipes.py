"""Dense tasks through recipes: schema checks, the multitask terms the runner builds, the
dense evaluation (against hand-built perfect predictions) and short real-data runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_cli import needs_fashion_mnist
from test_scenes import synthetic_items
from torch import nn

from kdistill.data import BatchLoader
from kdistill.data.scenes import make_scenes
from kdistill.engine import predict
from kdistill.errors import ConfigError
from kdistill.models.dense import DEFAULT_ANCHORS, encode_targets
from kdistill.recipes import load_recipe
from kdistill.recipes.runner import Experiment, alone_terms, method_terms
from kdistill.report import write_report
from kdistill.tasks import evaluate, get_task

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

SCENES = """
name: dense
task: {task}
data: {{dataset: fashion_mnist_scenes, val_size: 20,
        scenes: {{train_count: 80, test_count: 30, size: 40}}}}
teacher: {{model: {teacher}, train: {{epochs: 1, batch_size: 16}}}}
students:
  - {{name: s, model: {student}}}
train: {{epochs: 1, batch_size: 16, lr: 0.003}}
cost: {{enabled: false}}
tune: {{enabled: false}}
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def scenes(count: int = 12, size: int = 40, seed: int = 0):
    images, labels = synthetic_items(40, seed=seed)
    return make_scenes(images, labels, count, size=size, seed=seed, max_items=3)


# -- schema ---------------------------------------------------------------------------------
def test_builtin_dense_recipes_validate():
    seg = load_recipe(RECIPES / "scenes_segmentation.yaml")
    multi = load_recipe(RECIPES / "scenes_multitask.yaml")
    assert seg.task == "segmentation" and set(seg.distill.methods) == {"pixel_kd", "cwd"}
    assert multi.task == "multitask" and set(multi.distill.methods) == {"pixel_kd", "cwd"}
    det = load_recipe(RECIPES / "scenes_detection.yaml")
    assert det.task == "detection" and det.distill.hard_loss == "yolo"


@pytest.mark.parametrize(
    "override, message",
    [
        ("task=classification", "task: fashion_mnist_scenes holds masks and boxes"),
        ("data.dataset=fashion_mnist", "task: segmentation needs data.dataset"),
        ("data.scenes.size=60", "data.scenes.size: the detectors' grid has stride 8"),
        ("data.scenes.train_count=1", "data.scenes.train_count"),
    ],
)
def test_dense_recipe_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as error:
        load_recipe(RECIPES / "scenes_segmentation.yaml", [override])
    assert message in str(error.value)


def test_multitask_methods_need_one_term_per_output(tmp_path):
    recipe = SCENES.format(
        task="multitask", teacher="multitask_teacher", student="multitask_student"
    )
    bad = recipe + "distill: {methods: {kd: [{loss: pixel_kd}]}}\n"
    with pytest.raises(ConfigError, match="output: seg or output: det"):
        load_recipe(write(tmp_path, bad))
    twice = (
        recipe + "distill: {methods: {kd: [{loss: pixel_kd, output: seg}, "
        "{loss: cwd, output: seg}]}}\n"
    )
    with pytest.raises(ConfigError, match="at most one term per"):
        load_recipe(write(tmp_path, twice))


# -- terms ----------------------------------------------------------------------------------
def test_multitask_terms_of_a_recipe_follow_the_per_task_mix():
    recipe = load_recipe(
        RECIPES / "scenes_multitask.yaml",
        [
            "distill.multitask.alpha_seg=0.25",
            "distill.multitask.alpha_det=0.75",
            "distill.multitask.ratio_seg=2",
            "distill.multitask.ratio_det=0.5",
            "distill.methods.cwd.0.weight=3",
        ],
    )
    terms = method_terms(recipe.distill, "cwd", {}, task="multitask")
    got = {t.name: (t.weight, t.output, type(t.loss).__name__) for t in terms}
    assert got == {
        "seg_hard": (2 * 0.75, "seg", "CE"),
        "seg_soft": (2 * 0.25 * 3, "seg", "CWD"),
        "det_hard": (0.5 * 0.25, "det", "YOLOLoss"),
        "det_soft": (0.5 * 0.75, "det", "DetLogitMSE"),
    }
    alone = {t.name: t.weight for t in alone_terms(recipe)}
    assert alone == {"seg_hard": 2.0, "det_hard": 0.5}
    tuned = method_terms(recipe.distill, "pixel_kd", {"alpha": 0.1}, task="multitask")
    assert {t.name: t.weight for t in tuned} == pytest.approx(
        {"seg_hard": 1.8, "seg_soft": 0.2, "det_hard": 0.45, "det_soft": 0.05}
    )


# -- evaluation -----------------------------------------------------------------------------
def perfect_raw(boxes: torch.Tensor, size: int, num_classes: int) -> torch.Tensor:
    """Raw YOLO outputs that decode exactly to `boxes` (inverse of the decode formulas)."""
    target = encode_targets(boxes, DEFAULT_ANCHORS, size // 8, size)
    positive = target[..., 4] > 0
    offsets = target[..., :2].clamp(1e-4, 1 - 1e-4)
    raw = torch.zeros(*target.shape[:-1], 5 + num_classes)
    raw[..., :2] = torch.log(offsets / (1 - offsets))
    raw[..., 2:4] = target[..., 2:4]
    raw[..., 4] = torch.where(positive, 20.0, -20.0)
    classes = target[..., 5].clamp(min=0).long()
    raw[..., 5:] = 20 * F.one_hot(classes, num_classes).float()
    return raw


class Oracle(nn.Module):
    """Answers every batch with the perfect outputs of the scenes it was given."""

    def __init__(self, data, kind: str, wrong_seg: bool = False):
        super().__init__()
        self.data, self.kind, self.wrong_seg = data, kind, wrong_seg
        self.register_buffer("anchors", torch.tensor(DEFAULT_ANCHORS), persistent=False)

    def forward(self, inputs):
        index = torch.stack(
            [(self.data.inputs == x).flatten(1).all(1).nonzero()[0, 0] for x in inputs]
        )
        masks = self.data.masks[index]
        if self.wrong_seg:
            masks = torch.zeros_like(masks)  # background everywhere
        seg = 10 * F.one_hot(masks, self.data.num_seg_classes).permute(0, 3, 1, 2).float()
        det = perfect_raw(self.data.boxes[index], self.data.input_shape[-1], self.data.num_classes)
        outputs = {"seg": seg, "det": det}
        return outputs if self.kind == "both" else outputs[self.kind]


def test_dense_evaluation_of_perfect_predictions():
    data = scenes(10)
    loader = BatchLoader(data, batch_size=4, shuffle=False)
    got = evaluate(Oracle(data, "both"), loader, get_task("multitask"))
    assert got["miou"] == 1.0 and got["pixel_accuracy"] == 1.0
    assert got["map50"] > 0.99  # a box is dropped only if 4 share one cell
    seg_only = BatchLoader(data.with_target("seg"), batch_size=4, shuffle=False)
    assert evaluate(Oracle(data, "seg"), seg_only, get_task("segmentation"))["miou"] == 1.0
    det_only = BatchLoader(data.with_target("det"), batch_size=4, shuffle=False)
    det = evaluate(Oracle(data, "det"), det_only, get_task("detection"))
    # mAP@0.5 and pycocotools' COCO AP (Fashion-MNIST items are < 32² pixels: APs only)
    assert set(det) == {"map50", "ap", "ap50", "ap75", "ap_small"}
    assert det["ap50"] > 0.99 and det["ap"] > 0.5


def test_dense_evaluation_of_an_all_background_prediction():
    """Predicting background everywhere: IoU_bg = bg / all pixels, IoU 0 for each present item
    class, pixel accuracy = background share (a hand count from the masks)."""
    data = scenes(6)
    loader = BatchLoader(data.with_target("seg"), batch_size=6, shuffle=False)
    got = evaluate(Oracle(data, "seg", wrong_seg=True), loader, get_task("segmentation"))
    background = (data.masks == 0).double().mean().item()
    present = len(torch.unique(data.masks))
    assert got["pixel_accuracy"] == pytest.approx(background)
    assert got["miou"] == pytest.approx(background / present)


# -- teacher outputs of a multi-task teacher ------------------------------------------------
def test_predict_stacks_dict_outputs_in_dataset_order():
    data = scenes(9)
    torch.manual_seed(0)
    from kdistill.models.dense import multitask_student

    model = multitask_student(num_classes=data.num_classes)
    stored = predict(model, BatchLoader(data, batch_size=4, shuffle=False))
    model.eval()
    direct = model(data.inputs)
    assert set(stored) == {"seg", "det"}
    for key in stored:
        torch.testing.assert_close(stored[key], direct[key], atol=1e-5, rtol=1e-4)


# -- short real-data runs ---------------------------------------------------------------------
@needs_fashion_mnist
@pytest.mark.parametrize(
    "task, teacher, student, method",
    [
        ("segmentation", "seg_student", "seg_student", "{cwd: [{loss: cwd}]}"),
        ("detection", "det_student", "det_student", "{mse: [{loss: det_logit_mse}]}"),
        (
            "multitask",
            "multitask_student",
            "multitask_student",
            "{kd: [{loss: pixel_kd, output: seg}, {loss: det_logit_mse, output: det}]}",
        ),
    ],
)
def test_dense_recipe_runs_end_to_end_on_real_scenes(tmp_path, task, teacher, student, method):
    text = SCENES.format(task=task, teacher=teacher, student=student)
    hard = "yolo" if task == "detection" else "ce"
    text += f"distill: {{alpha: 0.5, hard_loss: {hard}, methods: {method}}}\n"
    recipe = load_recipe(write(tmp_path, text))
    summary = Experiment(recipe, tmp_path / "run", progress=False).run()
    table = write_report(summary, recipe, "pytest")
    coco = {"ap", "ap50", "ap75"}  # pycocotools' (+ APs/m/l where the data has such boxes)
    sizes = {"ap_small", "ap_medium", "ap_large"}
    expected = {
        "segmentation": {"miou", "pixel_accuracy"},
        "detection": {"map50", *coco},
        "multitask": {"miou", "pixel_accuracy", "map50", *coco},
    }[task]
    assert [r.method for r in summary.records] == [
        "teacher",
        "alone",
        next(iter(recipe.distill.methods)),
    ]
    for record in summary.records:
        assert expected <= set(record.test_metrics) <= expected | sizes
        assert all(0 <= v <= 1 and math.isfinite(v) for v in record.test_metrics.values())
    label = {"segmentation": "mIoU", "detection": "mAP@0.5", "multitask": "mAP@0.5"}[task]
    assert f"test {label} %" in table
    if task == "detection":  # COCO AP@[.5:.95] ranks: the first column, and gap closed's
        assert table.index("AP@[.5:.95]") < table.index("mAP@0.5")
        assert all(r.test_score == r.test_metrics["ap"] for r in summary.records)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert expected <= set(results["records"][0]["test_metrics"]) <= expected | sizes
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    key = "val_miou" if task != "detection" else "val_map50"
    assert all(key in line for line in lines)


# -- checkpoints as the multi-task article uses them -------------------------------------------
@needs_fashion_mnist
def test_teacher_from_a_state_dict_and_a_whole_model_student(tmp_path):
    """The teacher loads from a plain `torch.save(state_dict)` file without trust; the student
    starts from a whole model of non-default widths (as a pruned one would be), which loads
    only with --trust-checkpoint."""
    from kdistill.engine.checkpoint import save_whole_model
    from kdistill.models.dense import multitask_student, multitask_teacher

    torch.manual_seed(1)
    teacher = multitask_teacher()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    narrow = multitask_student(widths=(4, 6, 10, 20), ppm_channels=20, decoder_widths=(10, 6, 4))
    save_whole_model(narrow, tmp_path / "pruned.pt")
    text = SCENES.format(task="multitask", teacher="multitask_teacher", student="multitask_student")
    text = text.replace(
        "teacher: {model: multitask_teacher,",
        f"teacher: {{model: multitask_teacher, checkpoint: {tmp_path / 'teacher.pt'},",
    ).replace(
        "{name: s, model: multitask_student}",
        f"{{name: s, model: multitask_student, whole_model: {tmp_path / 'pruned.pt'}}}",
    )
    text += "distill: {methods: {kd: [{loss: pixel_kd, output: seg}]}}\n"
    path = write(tmp_path, text)

    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdistill",
            "run",
            str(path),
            "--out",
            str(tmp_path / "a"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "pickled whole model" in refused.stderr and "--trust-checkpoint" in refused.stderr
    assert not (tmp_path / "a" / "models").exists()  # refused before the teacher was touched

    recipe = load_recipe(path, ["students.0.trust_checkpoint=true"])
    experiment = Experiment(recipe, tmp_path / "b", progress=False)
    loaded_teacher, record = experiment.prepare_teacher()
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(loaded_teacher.state_dict()[name], value)
    start = experiment.initial_student(recipe.students[0], seed=0)
    assert sum(p.numel() for p in start.parameters()) == sum(p.numel() for p in narrow.parameters())
    summary = experiment.run()
    narrow_params = sum(p.numel() for p in narrow.parameters())
    assert [r.params for r in summary.records[1:]] == [narrow_params, narrow_params]


def test_grid_keys_scoped_to_one_method():
    recipe = load_recipe(
        RECIPES / "scenes_segmentation.yaml", ["tune.enabled=true", "tune.grid={cwd.tau: [1, 4]}"]
    )
    from kdistill.recipes.runner import grid_settings

    assert grid_settings(recipe, "cwd") == [{"tau": 1}, {"tau": 4}]
    assert grid_settings(recipe, "pixel_kd") == [{}]
    terms = method_terms(recipe.distill, "cwd", {"tau": 1}, task="segmentation")
    assert [t.loss.tau for t in terms if t.name != "hard"] == [1.0]
    with pytest.raises(ConfigError, match="tune.grid.pkd.tau: 'pkd' is not a method"):
        load_recipe(RECIPES / "scenes_segmentation.yaml", ["tune.grid={pkd.tau: [1]}"])
    with pytest.raises(ConfigError, match="no loss of method 'pixel_kd' has a parameter 'tau'"):
        load_recipe(RECIPES / "scenes_segmentation.yaml", ["tune.grid={pixel_kd.tau: [1]}"])


def test_the_recipe_names_the_ranking_metric(tmp_path):
    text = SCENES.format(task="detection", teacher="det_student", student="det_student")
    text += "distill: {alpha: 0.5, hard_loss: yolo, methods: {mse: [{loss: det_logit_mse}]}}\n"
    default = load_recipe(write(tmp_path, text))
    assert default.metric is None  # the task's first: COCO AP@[.5:.95]
    chosen = load_recipe(write(tmp_path, text + "metric: map50\n"))
    assert chosen.metric == "map50"
    with pytest.raises(Exception, match=r"metric: 'miou' is not a metric of task 'detection'"):
        load_recipe(write(tmp_path, text + "metric: miou\n"))
