"""A trained teacher is kept beside the run folders (`<parent>/teachers/<digest>`) and reused by
any recipe whose teacher has the same identity (model, training, data, seed); anything else
trains its own."""

import textwrap

import torch

from kdistill.recipes.runner import Experiment
from kdistill.recipes.schema import load_recipe

RECIPE = """
name: {name}
seed: {seed}
data: {{dataset: digits, val_size: 200, train_limit: 400, test_limit: 100}}
teacher: {{model: middle_student, train: {{epochs: 1, progress: false}}}}
students:
  - {{name: small, model: middle_student, kwargs: {{channels: [2, 2]}}}}
train: {{epochs: 1, progress: false}}
distill:
  teacher_cache: "off"
  methods:
    kd: [{{loss: kd}}]
tune: {{enabled: false}}
"""


def experiment(tmp_path, name, seed=0):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(name=name, seed=seed)))
    return Experiment(load_recipe(path), tmp_path / "runs" / name, progress=False)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_another_recipe_reuses_the_stored_teacher(tmp_path, monkeypatch):
    first = experiment(tmp_path, "first")
    teacher, _ = first.prepare_teacher()
    store = first.teacher_store()
    assert store.parent == tmp_path / "runs" / "teachers"
    assert (store / "teacher.safetensors").exists()

    second = experiment(tmp_path, "second")  # another name and students, the same teacher
    assert second.teacher_store() == store
    trained = []
    monkeypatch.setattr("kdistill.recipes.teacher_stage.fit", lambda *a, **k: trained.append(a))
    reused, _ = second.prepare_teacher()
    assert trained == []  # loaded, not trained
    assert torch.equal(weights(reused), weights(teacher))
    assert (tmp_path / "runs/second/models/teacher.safetensors").exists()  # complete run folder


def test_a_teacher_with_another_identity_is_trained(tmp_path, monkeypatch):
    first = experiment(tmp_path, "first")
    first.prepare_teacher()
    other = experiment(tmp_path, "other", seed=1)  # another seed: another teacher
    assert other.teacher_store() != first.teacher_store()
    trained = []
    monkeypatch.setattr("kdistill.recipes.teacher_stage.fit", lambda *a, **k: trained.append(a))
    other.prepare_teacher()
    assert len(trained) == 1


def test_the_identity_leaves_out_fields_at_their_defaults(tmp_path):
    """Fields added to the training budget after teachers were saved (precision, on-policy data)
    are left out while at their defaults, so those teachers are still recognised."""
    train = experiment(tmp_path, "first").teacher_identity()["model"]["train"]
    assert "on_policy" not in train and "precision" not in train
    assert "progress" not in train and "device" not in train


AUGMENTED = """
name: augmented
seed: 0
data: {dataset: digits, val_size: 200, train_limit: 400, test_limit: 100}
teacher:
  model: middle_student
  augment: {pad: 1, flip: false}
  train: {epochs: 1, progress: false}
students:
  - {name: small, model: middle_student, kwargs: {channels: [2, 2]}}
train: {epochs: 1, progress: false}
distill: {teacher_cache: "off", methods: {kd: [{loss: kd}]}}
tune: {enabled: false}
"""


def test_teacher_augment_trains_on_views_and_is_part_of_the_identity(tmp_path, monkeypatch):
    """`teacher.augment`: the teacher's own batches are keyed views; a teacher trained on plain
    images has another identity (and another store), so neither is mistaken for the other."""
    path = tmp_path / "augmented.yaml"
    path.write_text(AUGMENTED)
    augmented = Experiment(load_recipe(path), tmp_path / "runs" / "augmented", progress=False)
    plain = experiment(tmp_path, "plain")
    assert "augment" not in plain.teacher_identity()["model"]  # earlier teachers still match
    assert augmented.teacher_identity()["model"]["augment"]["pad"] == 1
    assert augmented.teacher_store() != plain.teacher_store()

    loaders = []
    monkeypatch.setattr(
        "kdistill.recipes.teacher_stage.fit", lambda d, loader, *a, **k: loaders.append(loader)
    )
    augmented.prepare_teacher()
    plain.prepare_teacher()
    views = [loader.view_spec() for loader in loaders]
    assert views[0] == {"augmentation": views[0]["augmentation"], "seed": 0}
    assert views[0]["augmentation"]["pad"] == 1 and views[0]["augmentation"]["flip"] is False
    assert views[1] is None  # the plain teacher's batches are not augmented


def test_teacher_augment_is_refused_for_masks_and_boxes(tmp_path):
    import pytest

    path = tmp_path / "seg.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: seg
            task: segmentation
            data: {dataset: fashion_mnist_scenes}
            teacher: {model: seg_teacher, augment: {pad: 2}}
            students: [{name: s, model: seg_student}]
            """
        )
    )
    with pytest.raises(ValueError, match="teacher.augment crops and flips the inputs only"):
        load_recipe(path)
