"""kd.fit with any loader (torch DataLoader, dict batches), tuple / ModelOutput outputs, and
connectors for N×L×D hidden states (issue 13, items 1 and 6).

Expected values come from independent computations: a training run over kdistill's own
BatchLoader built to yield the very same batches, losses recomputed by calling the models and
the loss formulas directly, and hand-built connector maps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

import kdistill as kd
from kdistill.data.arrays import ArrayDataset, Batch, BatchLoader
from kdistill.data.batches import as_batch
from kdistill.distill.connectors import align_spatial, build_connector
from kdistill.distill.distiller import select_output
from kdistill.distill.teacher.store import MemoryTeacherOutputs
from kdistill.engine import evaluate_classifier, trained_state
from kdistill.engine.checkpoint import load_latest_checkpoint
from kdistill.engine.distributed import DistInfo, shard_loader
from kdistill.errors import ConfigError, DataError
from kdistill.losses import CE, CRD, KD, FitNet

N, FEATURES, CLASSES = 48, 6, 3


def separable(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator)
    y = (x[:, 0] > 0.3).long() + (x[:, 1] > 0.0).long()
    return x, y


def mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def kd_distiller(teacher: nn.Module | None = None, student: nn.Module | None = None):
    teacher = teacher if teacher is not None else mlp(16, seed=1)
    student = student if student is not None else mlp(8, seed=2)
    return kd.Distiller(teacher, student, [kd.Term(KD(2.0), 0.7), kd.Term(CE(), 0.3)])


def quick(**overrides) -> kd.TrainConfig:
    return kd.TrainConfig(**{"epochs": 2, "lr": 1e-2, "progress": False, **overrides})


def weights(distiller) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trained_state(distiller).items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


class EpochOrder(Sampler):
    """A torch sampler that yields a kdistill BatchLoader's seeded order of the current epoch;
    its order changes only through set_epoch, as a DistributedSampler's does."""

    def __init__(self, loader: BatchLoader):
        self.loader, self.epoch, self.epochs_set = loader, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __iter__(self):
        return iter(self.loader.epoch_order(self.epoch).tolist())

    def __len__(self) -> int:
        return len(self.loader.dataset)


# ---------------------------------------------------------------------------------------------
# a torch DataLoader trains like kdistill's own loader
# ---------------------------------------------------------------------------------------------


def test_dataloader_gives_the_same_weights_as_batchloader_over_the_same_batches():
    x, y = separable()
    ours = BatchLoader(ArrayDataset(x, y, ["a", "b", "c"]), batch_size=16, shuffle=True, seed=4)
    sampler = EpochOrder(ours)
    theirs = DataLoader(TensorDataset(x, y), batch_size=16, sampler=sampler)
    # independent check that the two loaders yield identical batches, epoch by epoch
    for epoch in range(2):
        ours.set_epoch(epoch)
        sampler.set_epoch(epoch)
        pairs = list(zip(ours, theirs, strict=True))
        for batch, (inputs, target) in pairs:
            assert torch.equal(batch.inputs, inputs) and torch.equal(batch.target, target)
    assert not torch.equal(ours.epoch_order(0), ours.epoch_order(1))  # set_epoch matters
    sampler.epochs_set.clear()

    reference = kd_distiller()
    before = weights(reference)
    kd.fit(reference, ours, quick())
    distiller = kd_distiller()
    result = kd.fit(distiller, theirs, quick())
    assert_same(weights(distiller), weights(reference))
    assert not torch.equal(before["student.0.weight"], weights(reference)["student.0.weight"])
    assert sampler.epochs_set == [0, 1]  # fit told the sampler each epoch
    assert len(result.history) == 2


def test_plain_dataloader_of_tensor_pairs_learns():
    x, y = separable(96)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    distiller = kd.Distiller(None, mlp(16, seed=3), [kd.Term(CE())])
    before = evaluate_classifier(distiller.student, DataLoader(TensorDataset(x, y), batch_size=32))
    result = kd.fit(distiller, loader, quick(epochs=6, lr=3e-2))
    after = evaluate_classifier(distiller.student, DataLoader(TensorDataset(x, y), batch_size=32))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert after["accuracy"] > before["accuracy"]


def test_evaluate_classifier_on_a_dataloader_counts_by_hand():
    x, y = separable(40)
    model = mlp(8, seed=5)
    with torch.no_grad():
        logits = model(x)
    expected = (logits.argmax(1) == y).double().mean().item()
    expected_loss = F.cross_entropy(logits, y).item()
    got = evaluate_classifier(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert got["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# TrainConfig.batch_size is never silently ignored
# ---------------------------------------------------------------------------------------------


def test_an_explicit_batch_size_that_differs_from_the_loader_is_an_error():
    x, y = separable()
    for loader in (
        DataLoader(TensorDataset(x, y), batch_size=16),
        BatchLoader(ArrayDataset(x, y, ["a", "b", "c"]), batch_size=16),
    ):
        with pytest.raises(ConfigError, match=r"TrainConfig\(batch_size=32\).*batches of 16"):
            kd.fit(kd_distiller(), loader, quick(batch_size=32))


def test_an_unset_batch_size_takes_the_loader_s_and_says_so(caplog):
    x, y = separable()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with caplog.at_level(logging.INFO, logger="kdistill"):
        kd.fit(kd_distiller(), loader, quick(epochs=1))
        kd.fit(kd_distiller(), loader, quick(epochs=1, batch_size=16))  # agrees: fine
    assert sum("batch size 16, from the training loader" in r.message for r in caplog.records) == 1


def test_a_list_of_batches_is_compared_through_its_first_batch(caplog):
    x, y = separable()
    batches = [(x[i : i + 12], y[i : i + 12]) for i in range(0, N, 12)]
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        kd.fit(kd_distiller(), batches, quick(epochs=1, batch_size=16))
    assert any("first batch holds 12 samples" in r.message for r in caplog.records)


def test_one_shot_iterators_and_loaders_without_length_are_refused():
    x, y = separable()
    generator = ((x[i : i + 8], y[i : i + 8]) for i in range(0, N, 8))
    with pytest.raises(ConfigError, match="one-shot iterator"):
        kd.fit(kd_distiller(), generator, quick())

    class NoLength:
        def __iter__(self):
            return iter([(x[:8], y[:8])])

    with pytest.raises(ConfigError, match=r"no len\(\)"):
        kd.fit(kd_distiller(), NoLength(), quick())


# ---------------------------------------------------------------------------------------------
# dict batches (Hugging Face style) and token models with N×L×D hidden states
# ---------------------------------------------------------------------------------------------


class FakeModelOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


class TinyTokenModel(nn.Module):
    """input_ids N×L → embedding → linear encoder (hidden states N×L×D) → masked mean pool →
    logits N×K; it records the keyword arguments it was called with."""

    def __init__(self, vocab: int, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.Linear(width, width)
        self.head = nn.Linear(width, CLASSES)
        self.calls: list[set[str]] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> FakeModelOutput:
        self.calls.append({"input_ids", "attention_mask"})
        hidden = torch.tanh(self.encoder(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return FakeModelOutput(logits=self.head(pooled), hidden_states=hidden)


class TokenData(Dataset):
    """Sequences of length 7 with a padded tail; the label is the most frequent token class."""

    def __init__(self, n: int = 24, vocab: int = 11, length: int = 7):
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(1, vocab, (n, length), generator=generator)
        lengths = torch.randint(3, length + 1, (n,), generator=generator)
        self.mask = (torch.arange(length) < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = (self.ids % CLASSES).mode(dim=1).values

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def token_distiller():
    teacher, student = TinyTokenModel(11, 12, seed=1), TinyTokenModel(11, 8, seed=2)
    terms = [
        kd.Term(KD(2.0), 0.5, output="logits", name="kd"),
        kd.Term(CE(), 0.5, output="logits", name="ce"),
        kd.Term(FitNet(), 0.1, output="hidden_states", name="hint"),
    ]
    return kd.Distiller(teacher, student, terms)


def test_dict_batches_feed_a_token_model_by_keyword_and_labels_go_to_the_target():
    data = TokenData()
    loader = DataLoader(data, batch_size=8)
    distiller = token_distiller()
    result = kd.fit(distiller, loader, quick(epochs=1))
    assert len(result.history) == 1
    # the models got exactly the input keys, never the labels
    assert distiller.student.calls and all(
        c == {"input_ids", "attention_mask"} for c in distiller.student.calls
    )
    connector = distiller.connectors["hint"]
    assert isinstance(connector, nn.Linear) and connector.in_features == 8
    assert connector.out_features == 12

    # the loss of one batch, recomputed by calling the models and the formulas directly
    batch = next(iter(loader))
    distiller.eval()
    out = distiller(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        target=batch["labels"],
    )
    with torch.no_grad():
        s = distiller.student(batch["input_ids"], attention_mask=batch["attention_mask"])
        t = distiller.teacher(batch["input_ids"], attention_mask=batch["attention_mask"])
        p_t = F.softmax(t.logits / 2, dim=1)
        kd_value = 4 * (p_t * (p_t.log() - F.log_softmax(s.logits / 2, dim=1))).sum(1).mean()
        ce_value = F.cross_entropy(s.logits, batch["labels"])
        mapped = s.hidden_states @ connector.weight.T + connector.bias  # linear on the last dim
        hint_value = ((mapped - t.hidden_states) ** 2).mean()
    expected = 0.5 * kd_value + 0.5 * ce_value + 0.1 * hint_value
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.raw_parts["hint"] == pytest.approx(hint_value.item(), rel=1e-5)


def test_evaluate_classifier_picks_logits_from_a_model_output_by_key():
    data = TokenData()
    model = TinyTokenModel(11, 8, seed=3)
    with torch.no_grad():
        logits = model(data.ids, attention_mask=data.mask).logits
    expected = (logits.argmax(1) == data.labels).double().mean().item()
    got = evaluate_classifier(model, DataLoader(data, batch_size=5), output="logits")
    assert got["accuracy"] == pytest.approx(expected, abs=1e-12)


def test_as_batch_reads_tuples_dicts_and_batches():
    x, y, i = torch.zeros(4, 2), torch.arange(4), torch.tensor([7, 3, 1, 0])
    assert as_batch((x, y)).index is None and as_batch((x, y)).target is y
    assert torch.equal(as_batch([x, y, i]).index, i)
    assert as_batch(x).target is None and len(as_batch(x)) == 4
    batch = as_batch({"input_ids": x, "labels": y, "index": i})
    assert set(batch.inputs) == {"input_ids"} and batch.target is y
    assert torch.equal(batch.index, i)
    own = Batch(x, y, i)
    assert as_batch(own) is own
    with pytest.raises(DataError, match="got 4 items"):
        as_batch((x, y, i, i))
    with pytest.raises(DataError, match="index has 3 entries"):
        as_batch((x, y, i[:3]))
    with pytest.raises(DataError, match="both 'labels' and 'label'"):
        as_batch({"input_ids": x, "labels": y, "label": y})


# ---------------------------------------------------------------------------------------------
# outputs picked by position (tuples) and by key (ModelOutput)
# ---------------------------------------------------------------------------------------------


class TupleModel(nn.Module):
    """Returns (logits N×K, features N×D), as many research models do."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(FEATURES, hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.relu(self.body(x))
        return self.head(features), features


def test_tuple_outputs_are_picked_by_position():
    x, y = separable(16)
    teacher, student = TupleModel(10, seed=1), TupleModel(6, seed=2)
    distiller = kd.Distiller(
        teacher,
        student,
        [kd.Term(KD(4.0), 1.0, output=0), kd.Term(CE(), 0.5, output=0)],
    )
    out = distiller(x, target=y)
    out.loss.backward()  # the teacher's tuple (inference tensors) is usable by autograd
    with torch.no_grad():
        s, t = student(x)[0], teacher(x)[0]
        p_t = F.softmax(t / 4, dim=1)
        kd_value = 16 * (p_t * (p_t.log() - F.log_softmax(s / 4, dim=1))).sum(1).mean()
        expected = kd_value + 0.5 * F.cross_entropy(s, y)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # and through fit, with a torch DataLoader
    result = kd.fit(distiller, DataLoader(TensorDataset(x, y), batch_size=8), quick(epochs=1))
    assert len(result.history) == 1


def test_a_tuple_output_without_a_position_names_the_fix():
    x, y = separable(8)
    distiller = kd.Distiller(TupleModel(10, 1), TupleModel(6, 2), [kd.Term(KD())])
    with pytest.raises(TypeError, match=r"returns a tuple of 2 outputs.*output=0"):
        distiller(x, target=y)
    with pytest.raises(ValueError, match="pick one by position"):
        select_output((x, x), "logits", "student")
    with pytest.raises(IndexError, match="out of range"):
        select_output((x, x), 2, "student")
    output = FakeModelOutput(logits=x)
    assert select_output(output, "logits", "student") is x
    with pytest.raises(KeyError, match="by key, not by position"):
        select_output(output, 0, "student")


# ---------------------------------------------------------------------------------------------
# connectors: the layout rule
# ---------------------------------------------------------------------------------------------


def test_connector_layout_rule():
    assert isinstance(build_connector((2, 7, 8), (2, 7, 12), "s", "t"), nn.Linear)
    linear = build_connector((2, 7, 8), (2, 7, 12), "s", "t")
    assert (linear.in_features, linear.out_features) == (8, 12)  # the last dim, not L
    assert isinstance(build_connector((2, 7, 8), (2, 7, 8), "s", "t"), nn.Identity)
    conv = build_connector((2, 4, 5, 5), (2, 6, 3, 3), "s", "t")
    assert isinstance(conv[0], nn.Conv2d) and conv[0].in_channels == 4
    assert isinstance(build_connector((2, 4), (2, 6), "s", "t"), nn.Linear)


def test_sequence_lengths_that_differ_are_an_error_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 7, 8\).*\(2, 5, 12\).*sequence lengths differ"):
        build_connector((2, 7, 8), (2, 5, 12), "enc", "enc")
    with pytest.raises(ValueError, match=r"\(2, 7, 8\).*\(2, 5, 8\)"):
        align_spatial(torch.zeros(2, 7, 8), torch.zeros(2, 5, 8))


def test_equal_width_hidden_states_need_no_connector_and_model_outputs_go_by_key():
    data = TokenData(8)
    batch = next(iter(DataLoader(data, batch_size=8)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    same = kd.Distiller(
        TinyTokenModel(11, 8, 1), TinyTokenModel(11, 8, 2), [kd.Term(FitNet(), output=1)]
    )
    # a dict-like output picked by position is refused; by key it works
    with pytest.raises(KeyError, match="by key"):
        same(inputs)
    same = kd.Distiller(
        TinyTokenModel(11, 8, 1),
        TinyTokenModel(11, 8, 2),
        [kd.Term(FitNet(), output="hidden_states", name="hint")],
    )
    same.build(inputs)
    assert "hint" not in same.connectors


# ---------------------------------------------------------------------------------------------
# the dataset index, resume and torchrun with foreign loaders
# ---------------------------------------------------------------------------------------------


class WithIndex(Dataset):
    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def test_terms_and_caches_that_need_an_index_say_so_and_work_when_it_is_given():
    x, y = separable()
    crd = CRD(feature_dim=4, num_samples=N, num_negatives=8)
    distiller = kd.Distiller(mlp(16, 1), mlp(8, 2), [kd.Term(crd), kd.Term(CE())])
    with pytest.raises(ConfigError, match=r"terms \['crd'\] need each sample's dataset index"):
        kd.fit(distiller, DataLoader(TensorDataset(x, y), batch_size=16), quick(epochs=1))
    stored = torch.randn(N, CLASSES)
    with pytest.raises(ConfigError, match=r"stored teacher outputs .* need each sample's"):
        kd.fit(
            kd_distiller(),
            DataLoader(TensorDataset(x, y), batch_size=16),
            quick(epochs=1),
            teacher_outputs=MemoryTeacherOutputs.of(stored, TensorDataset(x, y)),
        )
    result = kd.fit(distiller, DataLoader(WithIndex(x, y), batch_size=16), quick(epochs=1))
    assert set(result.final["train_parts"]) == {"crd", "ce"}


class Interrupting(TensorDataset):
    """Raises KeyboardInterrupt (a Ctrl-C) at the `stop`-th item read, when armed."""

    def __init__(self, *tensors, stop: int | None = None):
        super().__init__(*tensors)
        self.stop, self.reads = stop, 0

    def __getitem__(self, i):
        self.reads += 1
        if self.stop is not None and self.reads == self.stop:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_a_dataloader_resumes_at_the_epoch_boundary_with_one_warning(tmp_path, caplog):
    x, y = separable()
    config = quick(epochs=3, checkpoint_every_steps=1)

    def loader(stop=None):
        return DataLoader(Interrupting(x, y, stop=stop), batch_size=16, shuffle=True)

    torch.manual_seed(0)
    reference = kd_distiller()
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        kd.fit(reference, loader(), config, checkpoint_dir=tmp_path / "full")
    warnings = [r for r in caplog.records if "cannot restart mid-epoch" in r.message]
    assert len(warnings) == 1

    # interrupted in the middle of epoch 2: 16 reads of the first-batch check, 48 of epoch 1
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        kd.fit(kd_distiller(), loader(stop=16 + 48 + 20), config, checkpoint_dir=tmp_path / "cut")
    _, state, _ = load_latest_checkpoint(tmp_path / "cut", "last")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 0)  # no mid-epoch save

    caplog.clear()
    torch.manual_seed(123)  # the checkpoint's RNG state must win
    resumed = kd_distiller()
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        result = kd.fit(resumed, loader(), config, checkpoint_dir=tmp_path / "cut", resume=True)
    assert sum("cannot restart mid-epoch" in r.message for r in caplog.records) == 1
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert_same(weights(resumed), weights(reference))


def test_a_mid_epoch_checkpoint_cannot_be_resumed_by_a_loader_without_iter_from(tmp_path):
    x, y = separable()
    ours = BatchLoader(ArrayDataset(x, y, ["a", "b", "c"]), batch_size=16)

    class StopAfterTwo(BatchLoader):
        def iter_from(self, step):
            for number, batch in enumerate(super().iter_from(step), start=step):
                if number == 2:
                    raise KeyboardInterrupt
                yield batch

    stopping = StopAfterTwo(ours.dataset, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        kd.fit(kd_distiller(), stopping, quick(checkpoint_every_steps=1), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot restart mid-epoch"):
        kd.fit(
            kd_distiller(),
            DataLoader(TensorDataset(x, y), batch_size=16),
            quick(),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_under_torchrun_a_dataloader_must_bring_a_distributed_sampler():
    x, y = separable()
    data = TensorDataset(x, y)
    with pytest.raises(ConfigError, match="DistributedSampler"):
        shard_loader(DataLoader(data, batch_size=8), DistInfo(rank=0, world_size=2))
    sharded = DataLoader(
        data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=1)
    )
    assert shard_loader(sharded, DistInfo(rank=1, world_size=2)) is sharded
    with pytest.raises(ConfigError, match="num_replicas=2, rank=1"):
        shard_loader(sharded, DistInfo(rank=0, world_size=2))


def test_set_epoch_reaches_a_distributed_sampler():
    x, y = separable()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = DataLoader(data, batch_size=16, sampler=sampler)
    kd.fit(kd_distiller(), loader, quick(epochs=3))
    assert sampler.epoch == 2


def test_evaluation_refuses_a_loader_sharded_by_rank_under_torchrun():
    from kdistill.engine.metrics import _check_unsharded

    x, y = separable()
    data = TensorDataset(x, y)
    sharded = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, 2, 0))
    with pytest.raises(ConfigError, match="must not be sharded"):
        _check_unsharded(sharded, DistInfo(rank=0, world_size=2))
    _check_unsharded(DataLoader(data, batch_size=8), DistInfo(rank=0, world_size=2))
