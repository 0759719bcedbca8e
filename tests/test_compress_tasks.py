"""`kdistill compress` on every task (issue 27, item 4).

A teacher that a compression step cannot handle is refused when the recipe is read — before the
teacher and the reference students train (a segmentation recipe trained all three, then died
with a raw `UnsupportedModelError` traceback) — naming the step and the layer. The report ranks
and labels the stages by the task's metric (it was fixed to "test accuracy %").
"""

from __future__ import annotations

import textwrap

import pytest
from test_cli import needs_fashion_mnist

from kdistill.cli import main
from kdistill.compress.pipeline import Stage
from kdistill.compress.report import compression_table

SCENES = """
name: dense_compress
task: {task}
data: {{dataset: fashion_mnist_scenes, val_size: 20,
        scenes: {{train_count: 80, test_count: 30, size: 40}}}}
teacher: {{model: {teacher}, train: {{epochs: 1, batch_size: 16}}}}
students:
  - {{name: s, model: {student}}}
train: {{epochs: 1, batch_size: 16, lr: 0.003}}
cost: {{enabled: false}}
tune: {{enabled: false}}
compress: {{channels: 0.5, export: [torchscript]}}
{extra}"""

METHODS = {  # as the built-in scenes recipes have them
    "segmentation": "distill: {methods: {pixel_kd: [{loss: pixel_kd}]}}\n",
    "detection": "distill: {hard_loss: yolo, methods: {det: [{loss: det_logit_mse}]}}\n",
    "multitask": "distill: {methods: {pixel_kd: [{loss: pixel_kd, output: seg}, "
    "{loss: det_logit_mse, output: det}]}}\n",
}

DENSE = {
    "segmentation": ("seg_teacher", "seg_student", "SegNet"),
    "detection": ("det_teacher", "det_student", "Detector"),
    "multitask": ("multitask_teacher", "multitask_student", "MultiTaskNet"),
}


@needs_fashion_mnist
@pytest.mark.parametrize("task", list(DENSE))
def test_a_teacher_channel_pruning_does_not_know_is_refused_before_training(task, tmp_path, capsys):
    teacher, student, kind = DENSE[task]
    path = tmp_path / "recipe.yaml"
    text = SCENES.format(task=task, teacher=teacher, student=student, extra=METHODS[task])
    path.write_text(textwrap.dedent(text))
    out = tmp_path / "run"
    assert main(["compress", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("kdistill: error: compress:")
    assert "step 'pruned'" in err and kind in err  # the step, the model …
    assert "its layer '" in err  # … and the layer
    assert not (out / "metrics.jsonl").exists()  # nothing trained
    assert not list(tmp_path.glob("**/*.safetensors"))


def stages(teacher: float, pruned: float) -> list[Stage]:
    return [
        Stage("teacher", "t", teacher, 1000, 1000),
        Stage("pruned + distilled", "p", pruned, 100, 100),
    ]


def test_the_report_is_labelled_and_scored_by_the_tasks_metric():
    table = compression_table(stages(0.625, 0.5), "mIoU", percent=True)
    head, _, teacher, pruned = table.splitlines()
    assert "test mIoU %" in head and "accuracy" not in head
    assert "| 62.50 |" in teacher and "| 50.00 | -12.50 |" in pruned
    table = compression_table(stages(2.5, 3.0), "NLL", percent=False)  # not a fraction
    head, _, teacher, pruned = table.splitlines()
    assert "test NLL |" in head and "%" not in head and "pts" not in head
    assert "| 3.00 | +0.50 |" in pruned
