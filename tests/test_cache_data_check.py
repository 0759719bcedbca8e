"""Stored teacher outputs are checked at training time against the inputs of every batch.

A cache (or in-memory outputs) built on some data and used with a subset of it, the same data
in another order, another dataset of the same size, or other transforms must raise CacheError —
never hand the student teacher outputs of other samples. The expected counts of differing
samples are computed here by comparing the tensors themselves.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdistill import losses as L
from kdistill.data import ArrayDataset, BatchLoader, split_train_val
from kdistill.distill.distiller import Distiller, Term
from kdistill.distill.teacher.store import TeacherCache, build_teacher_cache
from kdistill.engine import TrainConfig, fit
from kdistill.errors import CacheError, ConfigError


class SmallNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def make_data(n: int = 64, seed: int = 0, name: str = "toy") -> ArrayDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 8, 8, generator=generator)
    targets = torch.randint(0, 4, (n,), generator=generator)
    return ArrayDataset(inputs, targets, [str(c) for c in range(4)], name)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return SmallNet(16).eval()


@pytest.fixture
def data():
    return make_data()


def distil(teacher, data, stored, batch_size: int = 16, shuffle: bool = False):
    torch.manual_seed(1)
    distiller = Distiller(teacher, SmallNet(4), [Term(L.KD(), weight=0.9), Term(L.CE())])
    config = TrainConfig(epochs=1, lr=0.01, progress=False)
    loader = BatchLoader(data, batch_size=batch_size, shuffle=shuffle, seed=3)
    try:
        return fit(distiller, loader, config, teacher_outputs=stored)
    finally:
        distiller.close()


def differing(built_on: ArrayDataset, used: ArrayDataset, index: torch.Tensor) -> list[int]:
    """Positions of `index` whose sample in `used` is not the sample the cache holds there."""
    return [int(i) for i in index if not torch.equal(built_on.inputs[i], used.inputs[i])]


def assert_refused(error: CacheError, where: str, count: int, of: int, first: int) -> None:
    message = str(error)
    assert message.startswith(f"{where}: {count} of {of} samples of this batch are not the inputs")
    assert f"(first: dataset index {first}," in message
    for cause in ("split_train_val", "another order", "same size", "transforms", "kdistill cache"):
        assert cause in message, cause


# -- a disk cache used with other data -------------------------------------------------------
def test_cache_of_the_full_set_used_with_a_split_train_val_part_is_refused(tmp_path, teacher, data):
    cache = build_teacher_cache(teacher, data, tmp_path)
    train, _ = split_train_val(data, 0.25, seed=0)  # 48 samples, re-indexed 0..47
    assert len(train) < len(cache)  # every index is in range: only the data check can see it
    wrong = differing(data, train, torch.arange(16))
    assert wrong  # computed here: the first batch holds other samples than the cache's 0..15
    with pytest.raises(CacheError) as info:
        distil(teacher, train, cache)
    assert_refused(info.value, f"teacher cache {tmp_path}", len(wrong), 16, wrong[0])


def test_cache_used_with_the_same_data_in_another_order_is_refused(tmp_path, teacher, data):
    cache = build_teacher_cache(teacher, data, tmp_path)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(5))
    reordered = data.subset(order, name="toy")
    wrong = differing(data, reordered, torch.arange(16))
    assert len(wrong) == int((order[:16] != torch.arange(16)).sum())
    with pytest.raises(CacheError) as info:
        distil(teacher, reordered, cache)
    assert_refused(info.value, f"teacher cache {tmp_path}", len(wrong), 16, wrong[0])


def test_cache_used_with_another_dataset_of_the_same_size_is_refused(tmp_path, teacher, data):
    cache = build_teacher_cache(teacher, data, tmp_path)
    other = make_data(seed=1)  # same size, same name, same shapes
    with pytest.raises(CacheError) as info:
        distil(teacher, other, cache)
    assert_refused(info.value, f"teacher cache {tmp_path}", 16, 16, 0)


@pytest.mark.parametrize(
    "transform",
    [
        lambda x: (x - 0.5) / 0.25,  # another normalisation
        lambda x: x.flip(-1),  # a deterministic flip
        lambda x: x + 1e-3,  # a small shift of every pixel
    ],
    ids=["normalisation", "flip", "shift"],
)
def test_cache_used_with_other_transforms_is_refused(tmp_path, teacher, data, transform):
    cache = build_teacher_cache(teacher, data, tmp_path)
    transformed = ArrayDataset(transform(data.inputs), data.targets, data.classes, "toy")
    with pytest.raises(CacheError) as info:
        distil(teacher, transformed, cache)
    assert_refused(info.value, f"teacher cache {tmp_path}", 16, 16, 0)


def test_the_check_holds_at_every_step_not_only_on_the_first_batch(tmp_path, teacher, data):
    cache = build_teacher_cache(teacher, data, tmp_path)
    inputs = data.inputs.clone()
    inputs[53] += 0.5  # one sample of the fourth batch (48..63) changed
    changed = ArrayDataset(inputs, data.targets, data.classes, "toy")
    seen = []
    original = cache.lookup

    def recording(index, batch_inputs=None):
        seen.append(int(index[0]))
        return original(index, batch_inputs)

    cache.lookup = recording
    with pytest.raises(CacheError) as info:
        distil(teacher, changed, cache)
    assert_refused(info.value, f"teacher cache {tmp_path}", 1, 16, 53)
    assert seen[-3:] == [16, 32, 48]  # steps 1 and 2 passed; step 3 (samples 48..63) refused


def test_the_same_samples_in_other_batches_pass_and_match_the_teacher(tmp_path, teacher, data):
    # built in one batch of 64, read in shuffled batches of 7: float64 sums over other batch
    # shapes must still agree within the tolerance
    cache = build_teacher_cache(teacher, data, tmp_path, batch_size=64)
    result = distil(teacher, data, cache, batch_size=7, shuffle=True)
    assert result.final["epoch"] == 1
    index = torch.tensor([63, 0, 17, 17])
    with torch.no_grad():
        expected = teacher(data.inputs)[index]
    output, _ = cache.lookup(index, data.inputs[index].clone())
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)


def test_lookup_without_inputs_is_refused(tmp_path, teacher, data):
    cache = build_teacher_cache(teacher, data, tmp_path)
    with pytest.raises(CacheError, match=r"a lookup needs the batch's inputs, lookup\(index, in"):
        cache.lookup(torch.arange(4))
    with pytest.raises(CacheError, match=r"4 samples of shape \(1, 8, 8\) for 3 indices"):
        cache.lookup(torch.arange(3), data.inputs[:4])
    with pytest.raises(CacheError, match=r"shape \(64,\) for 2 indices.*shape \(1, 8, 8\)"):
        cache.lookup(torch.arange(2), data.inputs[:2].reshape(2, 64))


def test_a_cache_without_input_signatures_is_refused(tmp_path, teacher, data):
    build_teacher_cache(teacher, data, tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = 1  # an old cache: built before input signatures
    del manifest["inputs"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="format 1 caches hold no input signatures.*rebuild it"):
        TeacherCache.open(tmp_path)


def test_signature_file_is_verified_like_the_arrays(tmp_path, teacher, data):
    build_teacher_cache(teacher, data, tmp_path)
    path = tmp_path / "inputs.signature.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="inputs.signature.npy: checksum mismatch"):
        TeacherCache.open(tmp_path, verify=True)


# -- in-memory teacher outputs ----------------------------------------------------------------
def test_memory_outputs_used_with_other_data_are_refused(teacher, data):
    from kdistill.distill.teacher.store import MemoryTeacherOutputs

    stored = MemoryTeacherOutputs.predict(teacher, BatchLoader(data, batch_size=10))
    with torch.no_grad():
        assert torch.equal(stored.outputs, teacher(data.inputs))  # row i is sample i's output
    train, _ = split_train_val(data, 0.25, seed=0)
    wrong = differing(data, train, torch.arange(16))
    with pytest.raises(CacheError) as info:
        distil(teacher, train, stored)
    assert_refused(info.value, "in-memory teacher outputs", len(wrong), 16, wrong[0])
    # outputs computed elsewhere, declared with the dataset they were computed on
    declared = MemoryTeacherOutputs.of(stored.outputs, data)
    with pytest.raises(CacheError) as info:
        distil(teacher, make_data(seed=1), declared)
    assert_refused(info.value, "in-memory teacher outputs", 16, 16, 0)
    distil(teacher, data, declared, shuffle=True)  # the data they belong to: fine


def test_memory_dict_outputs_are_checked_too(data):
    from kdistill.distill.teacher.store import MemoryTeacherOutputs

    outputs = {"a": torch.randn(64, 3), "b": torch.randn(64, 2, 2)}
    stored = MemoryTeacherOutputs.of(outputs, data)
    index = torch.tensor([5, 1])
    got, features = stored.lookup(index, data.inputs[index])
    assert features is None
    assert torch.equal(got["a"], outputs["a"][index]) and torch.equal(got["b"], outputs["b"][index])
    with pytest.raises(CacheError, match="1 of 2 samples of this batch"):
        stored.lookup(index, data.inputs[torch.tensor([5, 2])])
    with pytest.raises(CacheError, match=r"outputs\['b'\] has 63 rows for 64 input samples"):
        MemoryTeacherOutputs.of({"a": outputs["a"], "b": outputs["b"][:63]}, data)


def test_bare_tensor_teacher_outputs_are_refused(teacher, data):
    with torch.no_grad():
        bare = teacher(data.inputs)
    with pytest.raises(ConfigError, match="teacher_outputs is a bare Tensor.*MemoryTeacherOutputs"):
        distil(teacher, data, bare)
    with pytest.raises(ConfigError, match="teacher_outputs is a bare dict"):
        distil(teacher, data, {"logits": bare})

    class OldStyle:  # a lookup that cannot be given the inputs to check
        def lookup(self, index):
            return bare[index], None

    with pytest.raises(ConfigError, match=r"needs a method lookup\(index, inputs\)"):
        distil(teacher, data, OldStyle())


def test_recipe_memory_cache_is_checked(tmp_path):
    import textwrap

    from kdistill.distill.teacher.store import MemoryTeacherOutputs
    from kdistill.recipes import Experiment, load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: mem
            data: {dataset: digits, val_size: 100, train_limit: 300, test_limit: 50}
            teacher: {model: middle_student, train: {epochs: 1, progress: false}}
            students:
              - {name: small, model: middle_student, kwargs: {channels: [2, 2]}}
            train: {epochs: 1, progress: false}
            distill:
              teacher_cache: memory
              methods: {kd: [{loss: kd}]}
            tune: {enabled: false}
            """
        )
    )
    experiment = Experiment(load_recipe(path), tmp_path / "run", progress=False)
    experiment.prepare_teacher()
    stored = experiment.teacher_train_outputs
    assert isinstance(stored, MemoryTeacherOutputs) and len(stored) == 200
    train, val = experiment.splits.train, experiment.splits.val
    index = torch.arange(8)
    with torch.no_grad():
        expected = experiment.teacher.eval()(train.inputs[index])
    torch.testing.assert_close(stored.lookup(index, train.inputs[index])[0], expected)
    with pytest.raises(CacheError, match="in-memory teacher outputs: 8 of 8 samples"):
        stored.lookup(index, val.inputs[index])


# -- the signature itself ---------------------------------------------------------------------
def splitmix64(state: int) -> int:
    """Reference splitmix64 output for counter `state`, in Python integers."""
    mask = (1 << 64) - 1
    z = (state + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_the_signature_is_a_fixed_dot_product_computed_independently():
    from kdistill.distill.teacher.store import _SPLITMIX_SEED, _projection, input_signatures

    # the reference generator against splitmix64's published first outputs for seed 0
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    r = [(splitmix64(_SPLITMIX_SEED + i) >> 11) * 2.0**-52 - 1.0 for i in range(4)]
    assert all(-1.0 <= v < 1.0 for v in r) and len(set(r)) == 4
    # a stored cache must stay checkable on every machine and numpy version: bit-exact r
    assert _projection(4).tolist() == r
    x = torch.tensor([[[1.0, 2.0], [0.5, -1.0]], [[-3.0, 0.0], [0.25, 3.0]]])  # 2 × (2×2)
    expected = [
        [sum(a * b for a, b in zip(row, r)), sum(abs(a * b) for a, b in zip(row, r))]
        for row in x.reshape(2, 4).tolist()
    ]
    got = input_signatures(x)
    assert got.dtype.name == "float64" and got.shape == (2, 2)
    for got_row, expected_row in zip(got.tolist(), expected):
        assert got_row == pytest.approx(expected_row, rel=1e-15)
    assert abs(got[0, 0]) < got[0, 1]  # signs mixed: the two columns differ
