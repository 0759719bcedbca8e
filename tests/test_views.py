"""Keyed augmentation (`kdistill.data.augment`) and the teacher's outputs on E epochs of views
(`build_view_cache`, `MemoryTeacherOutputs.predict(…, epochs=E)`): a cached augmented run is
the online augmented run, bit for bit, and every lookup checks the view it is used with."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdistill import losses as L
from kdistill.data import ArrayDataset, Augmentation, BatchLoader
from kdistill.data.augment import _beta_symmetric, uniforms
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.teacher.store import (
    MemoryTeacherOutputs,
    TeacherCache,
    build_teacher_cache,
    build_view_cache,
    offline_teacher_outputs,
)
from kdistill.engine import TrainConfig, fit
from kdistill.engine.distributed import shard_loader
from kdistill.errors import CacheError, DataError
from kdistill.ops.collectives import DistInfo

AUGMENT = Augmentation(pad=2, flip=True)


class SmallNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def make_data(n: int = 80, classes: int = 5, seed: int = 0) -> ArrayDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 8, 8, generator=generator)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return ArrayDataset(inputs, targets, [str(c) for c in range(classes)], "toy")


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return SmallNet(16).eval()


@pytest.fixture
def data():
    return make_data()


def loader_of(data, augmentation=AUGMENT, seed=3, augment_seed=None, batch_size=16):
    return BatchLoader(
        data,
        batch_size,
        shuffle=True,
        seed=seed,
        augmentation=augmentation,
        augment_seed=augment_seed,
    )


def all_views(loader, epoch: int) -> dict[int, torch.Tensor]:
    loader.set_epoch(epoch)
    return {int(i): x for batch in loader for i, x in zip(batch.index, batch.inputs)}


# -- the views ----------------------------------------------------------------------------------
def test_a_view_depends_on_seed_epoch_and_index_only(data):
    # the same sample in other batches (another shuffle, another batch size) gets the same view
    a = all_views(loader_of(data, seed=3, batch_size=16), epoch=1)
    b = all_views(loader_of(data, seed=9, batch_size=7, augment_seed=3), epoch=1)
    assert a.keys() == b.keys() == set(range(len(data)))
    assert all(torch.equal(a[i], b[i]) for i in a)
    # another epoch or augment seed: other views (for most samples)
    c = all_views(loader_of(data, seed=3), epoch=2)
    d = all_views(loader_of(data, seed=3, augment_seed=4), epoch=1)
    assert sum(torch.equal(a[i], c[i]) for i in a) < len(data) // 4
    assert sum(torch.equal(a[i], d[i]) for i in a) < len(data) // 4
    # and the dataset itself is left as it was
    assert torch.equal(data.inputs, make_data().inputs)


def window_matches(view, image, pad: int):
    """Independently of the code under test: the (dy, dx, flipped) placements of the padded
    (edge-replicated) image whose window equals `view`, found by trying all of them."""
    padded = np.pad(image.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    height, width = image.shape[-2:]
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy : dy + height, dx : dx + width]
            for flipped in (False, True):
                candidate = window[:, :, ::-1] if flipped else window
                if np.array_equal(candidate, view.numpy()):
                    found.append((dy, dx, flipped))
    return found


def test_views_are_padded_crops_and_flips_spread_over_every_offset(data):
    views = all_views(loader_of(data, seed=0), epoch=0)
    placements = []
    for index, view in views.items():
        found = window_matches(view, data.inputs[index], pad=2)
        assert found, f"sample {index}: the view is no crop of the padded image"
        placements.append(found[0])
    many = make_data(n=2000)
    draws = all_views(loader_of(many, seed=0, batch_size=500), epoch=0)
    offsets = [window_matches(draws[i], many.inputs[i], 2)[0] for i in range(400)]
    dys = np.bincount([o[0] for o in offsets], minlength=5)
    flips = sum(o[2] for o in offsets)
    assert len(dys) == 5 and dys.min() > 40  # 400 draws over 5 offsets: about 80 each
    assert 150 < flips < 250  # about half flipped


def test_uniforms_are_uniform_and_independent_across_streams():
    index = np.arange(20000)
    u = uniforms(7, 3, index, 0)
    v = uniforms(7, 3, index, 1)
    assert 0 <= u.min() and u.max() < 1
    # mean 1/2 and variance 1/12 within 4 standard errors; streams uncorrelated
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / len(u))
    assert abs(u.var() - 1 / 12) < 0.003
    assert abs(np.corrcoef(u, v)[0, 1]) < 4 / math.sqrt(len(u))
    assert not np.array_equal(u, uniforms(7, 4, index, 0))


def splitmix_finaliser(z: int) -> int:
    z &= (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return z ^ (z >> 31)


def test_uniforms_follow_the_documented_formula_in_plain_integers():
    # key = mix(mix(mix(seed) + epoch) + stream); draw = mix(key + (i + 1)·γ) >> 11, · 2^-53 —
    # recomputed with Python's unbounded ints, independently of the numpy uint64 code
    seed, epoch, stream, index = 12345, 6, 3, [0, 1, 99, 2**40]
    key = splitmix_finaliser(splitmix_finaliser(splitmix_finaliser(seed) + epoch) + stream)
    expected = [
        (splitmix_finaliser(key + (i + 1) * 0x9E3779B97F4A7C15) >> 11) * 2.0**-53 for i in index
    ]
    assert uniforms(seed, epoch, np.array(index), stream).tolist() == expected


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_mixup_weights_follow_beta_alpha_alpha(alpha):
    # Beta(α, α): mean 1/2, variance 1 / (4·(2α + 1)) (the textbook moments)
    draws = _beta_symmetric(alpha, seed=1, epoch=0, index=np.arange(20000))
    assert np.all((draws >= 0) & (draws <= 1))
    variance = 1 / (4 * (2 * alpha + 1))
    assert abs(draws.mean() - 0.5) < 4 * math.sqrt(variance / len(draws))
    assert abs(draws.var() - variance) < 0.1 * variance


def test_mixup_mixes_each_sample_with_a_partner_and_keeps_it_dominant():
    # two constant images, 0 and 1, no crop or flip: sample 0's view is 0 (its partner is
    # itself) or 1 − λ ∈ [0, ½] (partner 1); sample 1's view is 1 or λ ∈ [½, 1]
    data = ArrayDataset(
        torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)]), torch.tensor([0, 1]), ["a", "b"]
    )
    loader = BatchLoader(data, 2, augmentation=Augmentation(mixup=1.0))
    zeros, ones, mixed = [], [], 0
    for epoch in range(400):
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        for view in batch.inputs:
            assert torch.all(view == view.flatten()[0])  # one weight for the whole image
        zeros.append(float(batch.inputs[0, 0, 0, 0]))
        ones.append(float(batch.inputs[1, 0, 0, 0]))
        mixed += zeros[-1] != 0
    assert all(0 <= z <= 0.5 for z in zeros) and all(0.5 <= o <= 1 for o in ones)
    assert 150 < mixed < 250  # the partner is the other sample about half of the time
    # λ = max(B, 1 − B) with B ~ Beta(1, 1): uniform on [½, 1], mean ¾
    weights = [1 - z for z in zeros if z != 0]
    assert abs(np.mean(weights) - 0.75) < 0.03


def test_augmentation_refuses_masks_and_bad_settings():
    masks = ArrayDataset(torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64), ["a"])
    masks.get_batch = lambda index: (masks.inputs[index], torch.zeros(len(index), 4, 4))
    with pytest.raises(DataError, match="one label per sample.*shape \\(4, 4, 4\\)"):
        next(iter(BatchLoader(masks, 4, augmentation=AUGMENT)))
    with pytest.raises(ValueError, match="pad must be an integer >= 0"):
        Augmentation(pad=-1)
    with pytest.raises(ValueError, match="padding must be one of"):
        Augmentation(padding="wrap")
    assert BatchLoader(masks, 4, augmentation=Augmentation()).view_spec() is None  # no-op


def test_sharding_keeps_the_augmentation():
    data = make_data()
    sharded = shard_loader(loader_of(data), DistInfo(rank=1, world_size=2, local_rank=1))
    assert sharded.view_spec() == loader_of(data).view_spec()
    views = all_views(loader_of(data), epoch=0)
    sharded.set_epoch(0)
    for batch in sharded:
        for i, x in zip(batch.index, batch.inputs):
            assert torch.equal(views[int(i)], x)


# -- the teacher's outputs on the views ----------------------------------------------------------
def train(teacher, loader, cache=None, epochs=2, checkpoint_dir=None, resume=False, every=0):
    torch.manual_seed(7)
    distiller = Distiller(
        teacher, SmallNet(4), [Term(L.KD(temperature=4.0), weight=0.9), Term(L.CE(), weight=0.1)]
    )
    config = TrainConfig(epochs=epochs, lr=0.01, progress=False, checkpoint_every_steps=every)
    fit(
        distiller,
        loader,
        config,
        teacher_outputs=cache,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    return {k: v.clone() for k, v in distiller.state_dict().items() if not k.startswith("teacher")}


def count_calls(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "augmentation", [AUGMENT, Augmentation(pad=1, flip=True, mixup=0.4)], ids=["crop", "mixup"]
)
def test_cached_augmented_run_is_bit_identical_to_the_online_one(
    tmp_path, teacher, data, caplog, augmentation
):
    loader = loader_of(data, augmentation)
    online = train(teacher, loader)
    cache = build_view_cache(teacher, loader, tmp_path / "views", epochs=2)
    assert loader.epoch == 1  # where training left it: the build restored it
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        served = offline_teacher_outputs(cache, loader, "student")
    assert served is cache and "augmentation" not in caplog.text  # no fallback warning
    calls = count_calls(teacher)
    offline = train(teacher, loader_of(data, augmentation), cache)
    assert calls == []  # the teacher never ran
    assert_same(online, offline)
    # and the augmentation did something: plain batches train another student
    plain = train(teacher, BatchLoader(data, 16, shuffle=True, seed=3))
    assert not torch.equal(plain["student.head.weight"], online["student.head.weight"])


def test_in_memory_views_replay_the_online_run_too(teacher, data):
    online = train(teacher, loader_of(data))
    stored = MemoryTeacherOutputs.predict(teacher, loader_of(data), epochs=2)
    assert stored.epochs == 2 and len(stored) == len(data)
    assert_same(online, train(teacher, loader_of(data), stored))


class Interrupting(BatchLoader):
    """Raises KeyboardInterrupt before batch `step` of epoch `epoch` (a Ctrl-C mid-run)."""

    def __init__(self, *args, stop_at: tuple[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at

    def iter_from(self, step: int):
        for number, batch in enumerate(super().iter_from(step), start=step):
            if (self.epoch, number) == self.stop_at:
                raise KeyboardInterrupt
            yield batch


def test_a_resumed_run_reads_the_views_of_the_epoch_it_resumes(tmp_path, teacher, data):
    cache = build_view_cache(teacher, loader_of(data), tmp_path / "views", epochs=3)
    whole = train(teacher, loader_of(data), cache, epochs=3)
    stopping = Interrupting(data, 16, shuffle=True, seed=3, augmentation=AUGMENT, stop_at=(1, 3))
    with pytest.raises(KeyboardInterrupt):  # mid-epoch 2, after a checkpoint at its step 2
        train(teacher, stopping, cache, epochs=3, checkpoint_dir=tmp_path / "ck", every=2)
    cache.set_epoch(0)  # wherever the source was left, fit puts it on the resumed epoch
    resumed = train(
        teacher, loader_of(data), cache, epochs=3, checkpoint_dir=tmp_path / "ck", resume=True
    )
    assert_same(whole, resumed)


def test_view_rows_hold_the_teacher_output_on_each_epochs_view(tmp_path, teacher, data):
    loader = loader_of(data)
    cache = build_view_cache(teacher, loader, tmp_path / "views", epochs=3)
    outputs = cache.outputs()
    assert outputs.shape == (3 * len(data), 5)
    for epoch in range(3):
        views = all_views(loader_of(data, batch_size=len(data)), epoch)
        inputs = torch.stack([views[i] for i in range(len(data))])
        with torch.no_grad():
            expected = teacher(inputs)
        # other batch compositions may round a logit in its last bits on some CPU kernels
        torch.testing.assert_close(outputs[epoch * len(data) : (epoch + 1) * len(data)], expected)
    manifest = json.loads((tmp_path / "views/manifest.json").read_text())
    assert manifest["views"]["epochs"] == 3 and manifest["views"]["seed"] == 3
    assert manifest["views"]["augmentation"] == {
        "pad": 2,
        "flip": True,
        "mixup": 0.0,
        "padding": "edge",
    }


def test_lookups_check_the_view_actually_fed(tmp_path, teacher, data):
    loader = loader_of(data)
    cache = build_view_cache(teacher, loader, tmp_path / "views", epochs=2)
    loader.set_epoch(1)
    batch = next(iter(loader))
    cache.set_epoch(1)
    cache.lookup(batch.index, batch.inputs)  # the right epoch's views pass
    cache.set_epoch(0)
    with pytest.raises(CacheError, match="in epoch 1.*another epoch than the stored views"):
        cache.lookup(batch.index, batch.inputs)
    with pytest.raises(CacheError, match="not the inputs"):  # the plain samples are not views
        cache.lookup(batch.index, data.inputs[batch.index])
    other = loader_of(data, augment_seed=11)
    other.set_epoch(0)
    batch = next(iter(other))
    with pytest.raises(CacheError, match="not the inputs"):
        cache.lookup(batch.index, batch.inputs)
    with pytest.raises(CacheError, match="views of 2 epoch\\(s\\).*reached epoch 3"):
        cache.set_epoch(2)
    with pytest.raises(CacheError, match="views of \\{.*'seed': 3.*views of \\{.*'seed': 11"):
        offline_teacher_outputs(cache, other, "student")
    with pytest.raises(CacheError, match="does not augment"):
        offline_teacher_outputs(cache, BatchLoader(data, 16), "student")


def test_plain_outputs_with_an_augmenting_loader_fall_back_to_online(
    tmp_path, teacher, data, caplog
):
    plain = build_teacher_cache(teacher, data, tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        assert offline_teacher_outputs(plain, loader_of(data), "student") is None
    assert "stored teacher outputs are of the plain samples; distilling online" in caplog.text


def test_view_cache_storage_options_and_reopening(tmp_path, teacher, data):
    dense = build_view_cache(teacher, loader_of(data), tmp_path / "f32", epochs=2)
    half = build_view_cache(teacher, loader_of(data), tmp_path / "f16", epochs=2, dtype="float16")
    topk = build_view_cache(teacher, loader_of(data), tmp_path / "k2", epochs=2, topk=2)
    logits = 2 * len(data) * 5
    assert half.nbytes() - dense.nbytes() == -2 * logits  # 2 bytes a logit instead of 4
    assert 0 < half.errors["output"]["max_abs_error"] < 1e-2
    assert topk.errors["output"]["mean_kl_T1"] >= 0 and topk.topk == 2
    views = {"epochs": 2, **loader_of(data).view_spec()}
    TeacherCache.open(tmp_path / "f32", teacher, data, views=views)
    TeacherCache.open(tmp_path / "f32", teacher, data, views={**views, "epochs": 1})
    with pytest.raises(CacheError, match="holds views of 2 epoch\\(s\\), 3 asked for"):
        TeacherCache.open(tmp_path / "f32", teacher, data, views={**views, "epochs": 3})
    with pytest.raises(CacheError, match="views differ"):
        TeacherCache.open(tmp_path / "f32", teacher, data, views=None)
    assert "views of 2 epoch(s)" in dense.describe() and "160×5" in dense.describe()


def test_view_builds_refuse_loaders_that_miss_or_repeat_samples(tmp_path, teacher, data):
    with pytest.raises(CacheError, match="keyed augmentation"):
        build_view_cache(teacher, BatchLoader(data, 16), tmp_path / "a", epochs=1)
    dropping = BatchLoader(data, 32, shuffle=True, drop_last=True, augmentation=AUGMENT)
    with pytest.raises(CacheError, match="without drop_last"):
        build_view_cache(teacher, dropping, tmp_path / "b", epochs=1)
    with pytest.raises(CacheError, match="epochs must be a positive integer"):
        build_view_cache(teacher, loader_of(data), tmp_path / "c", epochs=0)
    with pytest.raises(CacheError, match="say for how many epochs"):
        MemoryTeacherOutputs.predict(teacher, loader_of(data))
    with pytest.raises(CacheError, match="needs a loader with keyed augmentation"):
        MemoryTeacherOutputs.predict(teacher, BatchLoader(data, 16), epochs=2)


# -- the recipe: data.augment ----------------------------------------------------------------------
RECIPE = """
name: views
seed: 5
data: {dataset: digits, val_size: 100, train_limit: 400, test_limit: 50, augment: {pad: 1}}
teacher: {model: middle_student, train: {epochs: 1, progress: false}}
students: [{name: s, model: middle_student, kwargs: {channels: [2, 2]}}]
train: {epochs: 2, progress: false}
distill: {teacher_cache: disk, methods: {kd: [{loss: kd}]}}
tune: {enabled: false}
cost: {enabled: false}
"""


def test_recipe_views_are_built_once_and_replay_the_online_student(tmp_path):
    from kdistill.recipes import Experiment, load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)

    def student_weights(teacher_cache: str, run: str):
        recipe = load_recipe(path, [f"distill.teacher_cache={teacher_cache}"])
        experiment = Experiment(recipe, tmp_path / run, progress=False)
        experiment.prepare_teacher()
        calls = count_calls(experiment.teacher)
        student, _, _ = experiment.train_student(
            "s",
            recipe.students[0],
            recipe.seed,
            experiment.objective("kd"),
            "kd",
            experiment.splits.val,
        )
        return experiment, student.state_dict(), calls

    online, online_weights, _ = student_weights("off", "a")
    disk, disk_weights, calls = student_weights("disk", "a")  # the same run folder: same teacher
    cache = disk.teacher_train_outputs
    assert isinstance(cache, TeacherCache) and cache.epochs == 2
    assert cache.views["seed"] == 5 and cache.views["augmentation"]["pad"] == 1
    assert calls == []  # the student trained from the stored views
    assert_same(online_weights, disk_weights)
    built = (tmp_path / "a/teacher_cache/manifest.json").stat().st_mtime_ns
    memory, memory_weights, calls = student_weights("memory", "a")
    assert memory.teacher_train_outputs.epochs == 2 and calls == []
    assert_same(online_weights, memory_weights)
    student_weights("disk", "a")
    assert (tmp_path / "a/teacher_cache/manifest.json").stat().st_mtime_ns == built  # reused


def test_cache_command_builds_the_views_an_augmented_recipe_trains_on(tmp_path, capsys):
    """`kdistill cache` on a recipe with data.augment stores the teacher's outputs on every
    view of every epoch (it stored the plain samples, which the run could not use), and the
    run then reuses them instead of building its own."""
    from kdistill.cli import main
    from kdistill.recipes import Experiment, load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    run = tmp_path / "run"
    assert main(["cache", str(path), "--run-dir", str(run), "--quiet"]) == 0
    manifest = json.loads((run / "teacher_cache/manifest.json").read_text())
    assert manifest["views"]["epochs"] == 2 and manifest["views"]["seed"] == 5
    built = (run / "teacher_cache/manifest.json").stat().st_mtime_ns
    assert main(["cache", str(path), "--run-dir", str(run), "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out
    experiment = Experiment(load_recipe(path), run, progress=False)
    experiment.prepare_teacher()
    assert isinstance(experiment.teacher_train_outputs, TeacherCache)
    assert experiment.teacher_train_outputs.epochs == 2
    assert (run / "teacher_cache/manifest.json").stat().st_mtime_ns == built  # reused
