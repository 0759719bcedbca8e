"""The teacher-output cache: storage, validation, top-k, and offline training == online training."""

from __future__ import annotations

import json
import logging
import math
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from kdistill import losses as L
from kdistill.cli import main
from kdistill.data import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.teacher.store import (
    TeacherCache,
    build_teacher_cache,
    encode_topk,
    offline_teacher_outputs,
    rebuild_topk_logits,
)
from kdistill.engine import TrainConfig, fit
from kdistill.errors import CacheError, ConfigError, LayerNotFoundError
from kdistill.recipes import Experiment, load_recipe


class SmallNet(nn.Module):
    """conv → ReLU → pool → linear; `body` is tappable (N×width×4×4)."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def make_data(n: int = 96, classes: int = 5, seed: int = 0, name: str = "toy") -> ArrayDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 8, 8, generator=generator)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return ArrayDataset(inputs, targets, [str(c) for c in range(classes)], name)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return SmallNet(16).eval()


@pytest.fixture
def data():
    return make_data()


def reference(teacher, data, layer: str | None = None):
    """The teacher over the whole dataset in one batch, computed here without the cache."""
    seen = {}
    handle = None
    if layer is not None:
        module = dict(teacher.named_modules())[layer]
        handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("f", o))
    with torch.no_grad():
        output = teacher(data.inputs)
    if handle is not None:
        handle.remove()
    return output, seen.get("f")


# -- storage -------------------------------------------------------------------------------------
def test_float32_round_trip_is_exact_for_outputs_and_features(tmp_path, teacher, data):
    cache = build_teacher_cache(teacher, data, tmp_path, layers=["body"], batch_size=len(data))
    assert not teacher.body._forward_hooks  # the build's tap was removed
    expected_output, expected_body = reference(teacher, data, "body")
    index = torch.tensor([5, 0, 95, 5, 17])
    output, features = cache.lookup(index, data.inputs[index])
    assert output.dtype == torch.float32
    assert torch.equal(output, expected_output[index])
    assert list(features) == ["body"] and torch.equal(features["body"], expected_body[index])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["transforms"] == "none"
    assert manifest["errors"]["output"]["max_abs_error"] == 0.0
    # the arrays are plain .npy files a user can open: float32 N×5 logits
    on_disk = np.load(tmp_path / "output.npy", mmap_mode="r")
    assert on_disk.dtype == np.float32 and on_disk.shape == (96, 5)


@pytest.mark.parametrize(
    ("dtype", "unit_roundoff", "itemsize"), [("float16", 2**-11, 2), ("bfloat16", 2**-8, 2)]
)
def test_half_precision_storage_stays_within_the_rounding_bound(
    tmp_path, teacher, data, dtype, unit_roundoff, itemsize
):
    # Round-to-nearest to a format with p significand bits errs by at most 2^-p·|x| (u = 2^-11
    # for float16, 2^-8 for bfloat16) in the normal range; 2^-24 absolute covers fp16 subnormals.
    cache = build_teacher_cache(teacher, data, tmp_path, layers=["body"], dtype=dtype)
    expected_output, expected_body = reference(teacher, data, "body")
    output, features = cache.lookup(torch.arange(len(data)), data.inputs)
    for got, want in ((output, expected_output), (features["body"], expected_body)):
        error = (got - want).abs()
        assert bool((error <= unit_roundoff * want.abs() + 2**-24).all())
        assert float(error.max()) > 0  # it really was rounded
    assert np.load(tmp_path / "output.npy", mmap_mode="r").dtype.itemsize == itemsize
    recorded = cache.errors["output"]["max_abs_error"]
    assert recorded == pytest.approx(float((output - expected_output).abs().max()), rel=1e-6)


def test_float16_overflow_is_refused(tmp_path, data):
    class Huge(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3] * 1e6

    with pytest.raises(CacheError, match="overflow float16"):
        build_teacher_cache(Huge(), data, tmp_path, dtype="float16")


# -- top-k ---------------------------------------------------------------------------------------
def test_topk_rebuild_by_hand():
    # logits [3, 1, 0, -1], k = 2: keep 3 and 1; the two others share e^0 + e^-1 equally,
    # so each gets the logit m = log((e^0 + e^-1) / 2).
    values, indices, fill = encode_topk(torch.tensor([[3.0, 1.0, 0.0, -1.0]]), 2)
    m = math.log((1 + math.exp(-1)) / 2)
    rebuilt = rebuild_topk_logits(values, indices, fill, 4)
    assert rebuilt.tolist()[0] == pytest.approx([3.0, 1.0, m, m], rel=1e-6)
    # at T = 1 the top-k probabilities are exact and the whole distribution sums to 1
    full = [math.exp(z) / sum(math.exp(v) for v in (3, 1, 0, -1)) for z in (3, 1, 0, -1)]
    p = torch.softmax(rebuilt, dim=1)[0].tolist()
    assert p[:2] == pytest.approx(full[:2], rel=1e-6)
    assert p[2] + p[3] == pytest.approx(full[2] + full[3], rel=1e-6)


def test_topk_cache_matches_an_independent_numpy_rebuild(tmp_path):
    torch.manual_seed(1)
    wide = SmallNet(8, classes=40).eval()
    data = make_data(64)
    cache = build_teacher_cache(wide, data, tmp_path, topk=6)
    z = reference(wide, data)[0].double().numpy()
    # independent rebuild in numpy: keep the 6 largest, give the rest log(mean(exp(rest)))
    expected = np.empty_like(z)
    for n, row in enumerate(z):
        top = np.argsort(-row)[:6]
        rest = np.setdiff1d(np.arange(40), top)
        expected[n] = np.log(np.exp(row[rest]).mean())
        expected[n, top] = row[top]
    got = cache.lookup(torch.arange(64), data.inputs)[0].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    def mean_kl(t):
        def log_softmax(a):
            a = a / t
            return (
                a
                - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True))
                - a.max(1, keepdims=True)
            )

        lp, lq = log_softmax(z), log_softmax(expected)
        return float((np.exp(lp) * (lp - lq)).sum(1).mean())

    err = cache.errors["output"]
    assert err["mean_kl_T1"] == pytest.approx(mean_kl(1.0), rel=1e-3, abs=1e-9)
    assert err["mean_kl_T4"] == pytest.approx(mean_kl(4.0), rel=1e-3, abs=1e-9)
    assert err["mean_kl_T1"] > 0
    assert "mean KL" in cache.describe()


def test_topk_must_leave_a_tail(tmp_path, teacher, data):
    with pytest.raises(CacheError, match=r"topk must lie in \[1, 4\]"):
        build_teacher_cache(teacher, data, tmp_path, topk=5)


# -- refusing stale, mismatched and broken caches --------------------------------------------------
def test_stale_teacher_is_refused(tmp_path, teacher, data):
    build_teacher_cache(teacher, data, tmp_path)
    TeacherCache.open(tmp_path, teacher=teacher, dataset=data)  # the same: fine
    with torch.no_grad():
        teacher.head.bias[0] += 1e-3  # one weight changed
    with pytest.raises(CacheError, match="teacher weights differ.*stale"):
        TeacherCache.open(tmp_path, teacher=teacher, dataset=data)


def test_other_dataset_dtype_layers_topk_are_each_named(tmp_path, teacher, data):
    build_teacher_cache(teacher, data, tmp_path, layers=["body"], dtype="float16")
    other = make_data(seed=1, name="other")
    with pytest.raises(CacheError) as info:
        TeacherCache.open(tmp_path, dataset=other, dtype="float32", layers=["body", "head"], topk=2)
    message = str(info.value)
    assert "dataset differs (cache holds 'toy'" in message and "given 'other'" in message
    assert "dtype differs (cache stores float16, asked for float32)" in message
    assert "teacher layers ['head'] are not cached (the cache holds ['body'])" in message
    assert "top-k differs (cache: dense, asked for 2)" in message
    # a subset of the cached layers is fine
    TeacherCache.open(tmp_path, dataset=data, dtype="float16", layers=["body"], topk=None)


def test_unknown_layer_fails_before_anything_is_written(tmp_path, teacher, data):
    with pytest.raises(LayerNotFoundError, match="boddy.*body"):
        build_teacher_cache(teacher, data, tmp_path / "c", layers=["boddy"])
    assert not (tmp_path / "c" / "manifest.json").exists()


class CrashAfter(nn.Module):
    """Wraps a model; raises on the `n`-th call — a build killed half-way."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("killed")
        return self.model(x)


def test_interrupted_build_is_detected_even_over_a_previous_good_cache(tmp_path, teacher, data):
    build_teacher_cache(teacher, data, tmp_path, batch_size=16)  # a complete cache …
    with pytest.raises(RuntimeError, match="killed"):  # … rebuilt, and the rebuild crashes
        build_teacher_cache(CrashAfter(teacher, 3), data, tmp_path, batch_size=16)
    with pytest.raises(CacheError, match="incomplete teacher cache"):
        TeacherCache.open(tmp_path)


def test_missing_manifest_truncated_and_altered_files_are_refused(tmp_path, teacher, data):
    with pytest.raises(CacheError, match="no such folder"):
        TeacherCache.open(tmp_path / "nowhere")
    build_teacher_cache(teacher, data, tmp_path)
    path = tmp_path / "output.npy"
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    TeacherCache.open(tmp_path)  # size and header still fine …
    with pytest.raises(CacheError, match="checksum mismatch"):  # … but verify re-hashes
        TeacherCache.open(tmp_path, verify=True)
    path.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(CacheError, match="output.npy: truncated or corrupt"):
        TeacherCache.open(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="no manifest.json"):
        TeacherCache.open(tmp_path)


def test_lookup_rejects_indices_outside_the_dataset(tmp_path, teacher, data):
    cache = build_teacher_cache(teacher, data, tmp_path)
    with pytest.raises(IndexError, match=r"\[0, 96\).*\[3, 96\]"):
        cache.lookup(torch.tensor([3, 96]), data.inputs[:2])


# -- training from the cache ----------------------------------------------------------------------
def train(teacher, data, terms_factory, cache=None, calls=None):
    """One epoch, unshuffled batches of 16 (the cache is built with the same batches)."""
    torch.manual_seed(7)
    student = SmallNet(4)
    distiller = Distiller(teacher, student, terms_factory())
    config = TrainConfig(epochs=2, lr=0.01, progress=False)
    fit(distiller, BatchLoader(data, batch_size=16), config, teacher_outputs=cache)
    distiller.close()
    return {k: v.clone() for k, v in distiller.state_dict().items() if not k.startswith("teacher")}


def count_calls(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_cached_training_is_bit_identical_to_online_training(tmp_path, teacher, data):
    # The cache is built with the same batches training uses (unshuffled, 16 a batch), so the
    # teacher computes each logit from the very same batch in both paths: identical floats.
    # (With shuffled batches, CPU kernels may sum in another order for other batch
    # compositions, so equality would hold only to rounding.)
    def terms():
        return [Term(L.KD(temperature=4.0), weight=0.9), Term(L.CE(), weight=0.1)]

    online = train(teacher, data, terms)
    cache = build_teacher_cache(teacher, data, tmp_path, batch_size=16)
    calls = count_calls(teacher)
    offline = train(teacher, data, terms, cache)
    assert calls == []  # the teacher never ran
    assert online.keys() == offline.keys()
    for key in online:
        assert torch.equal(online[key], offline[key]), key
    # and the cache is not trivially the same as no teacher at all
    alone = train(teacher, data, lambda: [Term(L.CE())])
    assert not torch.equal(alone["student.head.weight"], online["student.head.weight"])


def test_cached_taps_feed_a_fitnet_term_exactly(tmp_path, teacher, data):
    def terms():
        return [
            Term(L.CE(), weight=0.5),
            Term(L.FitNet(), weight=1.0, student="body", teacher="body"),  # 4 → 16 channels
        ]

    online = train(teacher, data, terms)
    cache = build_teacher_cache(teacher, data, tmp_path, layers=["body"], batch_size=16)
    calls = count_calls(teacher)
    offline = train(teacher, data, terms, cache)
    assert len(calls) == 1  # once, by Distiller.build to size the connector; never in training
    assert any(key.startswith("connectors.") for key in offline)
    for key in online:
        assert torch.equal(online[key], offline[key]), key


class Augmented(ArrayDataset):
    augment = True


def test_random_augmentation_is_never_cached(tmp_path, teacher, data, caplog):
    augmented = Augmented(data.inputs, data.targets, data.classes, "aug")
    with pytest.raises(CacheError, match="random augmentation"):
        build_teacher_cache(teacher, augmented, tmp_path)
    cache = build_teacher_cache(teacher, data, tmp_path)
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        assert offline_teacher_outputs(cache, BatchLoader(augmented, 16), "s") is None
    assert "distilling online" in caplog.text
    assert offline_teacher_outputs(cache, BatchLoader(data, 16)) is cache


# -- the recipe switch and the CLI ---------------------------------------------------------------
RECIPE = """
name: cached
data: {dataset: digits, val_size: 200, train_limit: 600, test_limit: 100}
teacher: {model: middle_student, train: {epochs: 1, progress: false}}
students:
  - {name: small, model: middle_student, kwargs: {channels: [2, 2]}}
train: {epochs: 1, progress: false}
distill:
  teacher_cache: disk
  methods:
    kd: [{loss: kd}]
    hint: [{loss: fitnet, student: conv2, teacher: conv2}]
tune: {enabled: false}
"""


def test_recipe_disk_cache_is_built_once_then_reused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    recipe = load_recipe(path)
    experiment = Experiment(recipe, tmp_path / "run", progress=False)
    experiment.prepare_teacher()
    cache = experiment.teacher_train_outputs
    assert isinstance(cache, TeacherCache) and cache.layers == ["conv2"]
    assert len(cache) == len(experiment.splits.train) == 400
    built = (tmp_path / "run/teacher_cache/manifest.json").stat().st_mtime_ns
    again = Experiment(recipe, tmp_path / "run", progress=False)
    again.prepare_teacher()  # loads the saved teacher; the cache still matches it: reused
    assert (tmp_path / "run/teacher_cache/manifest.json").stat().st_mtime_ns == built
    calls = count_calls(again.teacher)
    for method in ("kd", "hint"):
        terms = [Term(L.CE(), weight=0.1)] + [
            Term(L.create_loss(s.loss), student=s.student, teacher=s.teacher)
            for s in recipe.distill.methods[method]
        ]
        again.train_student(method, recipe.students[0], 0, terms, method, again.splits.val)
    assert len(calls) == 1  # only to size the hint's connector: both methods read the cache


def test_cache_command_builds_the_recipe_cache(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    out = tmp_path / "c"
    code = main(
        [
            "cache",
            str(path),
            "--run-dir",
            str(tmp_path / "run"),
            "--out",
            str(out),
            "--dtype",
            "bfloat16",
            "--topk",
            "3",
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bfloat16, top-3" in printed and "feature.conv2" in printed and "at T=4" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["layers"] == ["conv2"] and manifest["topk"] == 3
    assert (
        main(
            [
                "cache",
                str(path),
                "--run-dir",
                str(tmp_path / "run"),
                "--out",
                str(out),
                "--layers",
                "conv3",
                "--quiet",
            ]
        )
        == 2
    )
    assert "no module named 'conv3'" in capsys.readouterr().err


def test_stand_in_teacher_trains_like_the_real_one_without_its_weights(tmp_path, teacher, data):
    def terms():
        return [Term(L.KD(temperature=2.0), weight=0.9), Term(L.CE(), weight=0.1)]

    online = train(teacher, data, terms)
    cache = build_teacher_cache(teacher, data, tmp_path, layers=["body.0"], batch_size=16)
    stand_in = cache.stand_in()
    assert list(stand_in.parameters()) == [] and "body.0" in dict(stand_in.named_modules())
    offline = train(stand_in, data, terms, cache)
    for key in online:
        assert torch.equal(online[key], offline[key]), key
    with pytest.raises(CacheError, match="CachedTeacher stand-in and cannot run"):
        stand_in(data.inputs[:2])


def test_recipe_cache_switch_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE).replace("teacher_cache: disk", "teacher_cache: off"))
    assert load_recipe(path).distill.teacher_cache == "off"  # YAML's bare `off` is false
    path.write_text(
        textwrap.dedent(RECIPE).replace("teacher_cache: disk", "cache_teacher_outputs: true")
    )
    with pytest.raises(ConfigError, match="distill: cache_teacher_outputs was replaced by"):
        load_recipe(path)


def test_a_foreign_non_empty_folder_is_never_written_into(tmp_path, teacher, data):
    (tmp_path / "mine.npy").write_bytes(b"user data")
    with pytest.raises(CacheError, match="not empty and not a teacher cache"):
        build_teacher_cache(teacher, data, tmp_path)
    assert (tmp_path / "mine.npy").read_bytes() == b"user data"
    assert not teacher._forward_hooks  # nothing left on the teacher
