"""The teacher-source protocol (`kdistill.distill.teacher`) and the per-batch transforms the engine
calls (`kdistill.distill.transforms`): each source gives the teacher's outputs for a batch and
refuses a batch its outputs do not belong to; the engine sees only the protocol."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdistill as kd
from kdistill.data import ArrayDataset, BatchLoader
from kdistill.data.arrays import Batch
from kdistill.data.completions import PromptCompletions, sequences_from_parts
from kdistill.data.text import EOS_ID, IGNORE_INDEX
from kdistill.distill.teacher.base import LiveTeacher, LookupSource, TeacherOutputs, as_source
from kdistill.distill.teacher.sequences import TeacherSequences
from kdistill.distill.teacher.store import MemoryTeacherOutputs
from kdistill.engine import TrainConfig, fit
from kdistill.errors import CacheError, ConfigError
from kdistill.losses import CE, KD
from kdistill.losses.topk import topk_distribution

X = IGNORE_INDEX


def image_data(n: int = 12, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 4, 4, generator=g)
    return ArrayDataset(inputs, torch.arange(n) % 3, ["a", "b", "c"], name="tiny")


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


# -- as_source: what fit(teacher_outputs=...) may be ---------------------------------------------
def test_none_is_the_live_teacher_whose_outputs_the_forward_computes():
    source = as_source(None)
    assert isinstance(source, LiveTeacher) and source.live
    got = source.for_batch(Batch(torch.zeros(2, 1, 4, 4)))
    assert got.output is None and got.features is None


@pytest.mark.parametrize("bare", [torch.zeros(4, 3), {"logits": torch.zeros(4, 3)}])
def test_a_bare_tensor_or_dict_is_refused(bare):
    with pytest.raises(ConfigError, match="cannot check which inputs"):
        as_source(bare)


def test_an_object_with_neither_method_is_refused():
    with pytest.raises(ConfigError, match="lookup\\(index, inputs\\)"):
        as_source(object())


def test_a_lookup_object_is_adapted_and_its_checks_still_run():
    calls = []

    class Stored:
        layers = ["fc"]

        def lookup(self, index, inputs):
            calls.append((index.tolist(), tuple(inputs.shape)))
            return torch.ones(len(index), 3), {"fc": torch.zeros(len(index), 2)}

    source = as_source(Stored())
    assert isinstance(source, LookupSource) and not source.live and source.layers == ["fc"]
    got = source.for_batch(Batch(torch.zeros(2, 5), None, torch.tensor([4, 1])))
    assert calls == [([4, 1], (2, 5))]
    assert got.output.shape == (2, 3) and set(got.features) == {"fc"}


def test_stored_outputs_are_checked_against_the_batch():
    data = image_data()
    memory = MemoryTeacherOutputs.predict(tiny_net(1), BatchLoader(data, batch_size=5))
    assert as_source(memory) is memory  # a store is a source as it is
    index = torch.tensor([3, 7])
    inputs, _ = data.get_batch(index)
    got = memory.for_batch(Batch(inputs, None, index))
    torch.testing.assert_close(got.output, memory.outputs[index])
    with pytest.raises(CacheError, match="not the inputs the teacher outputs were computed on"):
        memory.for_batch(Batch(inputs.flip(0), None, index))  # another order


def test_teacher_outputs_move_tensors_dicts_and_stored_distributions():
    dist = topk_distribution(torch.randn(2, 3, 6), k=2)
    got = TeacherOutputs({"logits": dist, "aux": torch.zeros(2)}, {"h": torch.ones(2, 4)}).to(
        "meta"
    )
    assert got.output["logits"].log_probs.device.type == "meta"
    assert got.output["aux"].device.type == "meta" and got.features["h"].device.type == "meta"
    assert TeacherOutputs.live().to("meta").output is None


# -- per-batch transforms, as the engine calls them ----------------------------------------------
class Recorder:
    """A transform that changes nothing but every second batch it sees, keyed by position."""

    name = "recorder"

    def __init__(self):
        self.keys: list[int] = []
        self.checked = []

    def check(self, source, label):
        self.checked.append((type(source).__name__, label))

    def apply(self, student, batch, key, rank):
        self.keys.append(key)
        return batch, key % 2 == 1


def test_fit_calls_each_transform_per_batch_with_its_key_and_reports_the_share():
    data = image_data(12)
    recorder = Recorder()
    distiller = kd.Distiller(tiny_net(1), tiny_net(2), [kd.Term(KD()), kd.Term(CE())])
    config = TrainConfig(epochs=2, batch_size=4, progress=False)
    loader = BatchLoader(data, batch_size=4, shuffle=True, seed=0)
    result = fit(distiller, loader, config, batch_transforms=[recorder], label="s")
    # 3 batches per epoch: keys epoch · 3 + batch; keys 1, 3, 5 "changed" their batch
    assert recorder.keys == [0, 1, 2, 3, 4, 5]
    assert recorder.checked == [("LiveTeacher", "s")]
    assert [r["recorder_share"] for r in result.history] == [pytest.approx(1 / 3)] * 1 + [
        pytest.approx(2 / 3)
    ]


# -- generated sequences (sequence-level KD) -----------------------------------------------------
PROMPTS = [torch.tensor([1, 3]), torch.tensor([1, 4, 5]), torch.tensor([1, 6])]
DATA_COMPLETIONS = [torch.tensor([3, 3, EOS_ID]), torch.tensor([7, EOS_ID]), torch.tensor([EOS_ID])]
TEACHER_COMPLETIONS = [torch.tensor([4, EOS_ID]), torch.tensor([6, 7, EOS_ID]), torch.tensor([7])]


def completions(prompts, answers, name) -> PromptCompletions:
    input_ids, attention_mask, labels = sequences_from_parts(prompts, answers)
    lengths = torch.tensor([len(p) for p in prompts])
    return PromptCompletions(input_ids, attention_mask, labels, lengths, torch.ones(8).long(), name)


def test_teacher_sequences_substitute_the_teachers_completions_for_the_batch_rows():
    data = completions(PROMPTS, DATA_COMPLETIONS, "data")
    sequences = TeacherSequences(data.with_sequences(TEACHER_COMPLETIONS, "teacher"))
    index = torch.tensor([2, 0])
    inputs, labels = data.get_batch(index)
    got, changed = sequences.apply(None, Batch(inputs, labels, index), key=0, rank=0)
    assert changed and got.index.tolist() == [2, 0]
    # written out by hand: row 0 = prompt [1, 6] + [7] (no <eos>), row 1 = [1, 3] + [4, <eos>]
    assert got.inputs["input_ids"].tolist() == [[1, 6, 7, 0], [1, 3, 4, EOS_ID]]
    assert got.target.tolist() == [[X, X, 7, X], [X, X, 4, EOS_ID]]
    assert got.inputs["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_teacher_sequences_refuse_a_batch_of_other_prompts():
    data = completions(PROMPTS, DATA_COMPLETIONS, "data")
    sequences = TeacherSequences(data.with_sequences(TEACHER_COMPLETIONS, "teacher"))
    inputs, labels = data.get_batch(torch.tensor([1, 0]))
    with pytest.raises(CacheError, match="sample 0 \\(row 0 of this batch\\)"):
        sequences.apply(None, Batch(inputs, labels, torch.tensor([0, 1])), key=0, rank=0)
    with pytest.raises(CacheError, match="outside the 3 prompts"):
        sequences.apply(None, Batch(inputs, labels, torch.tensor([1, 5])), key=0, rank=0)
    with pytest.raises(ConfigError, match="no dataset index"):
        sequences.apply(None, Batch(inputs, labels), key=0, rank=0)


def test_teacher_sequences_need_the_live_teacher():
    data = completions(PROMPTS, DATA_COMPLETIONS, "data")
    sequences = TeacherSequences(data.with_sequences(TEACHER_COMPLETIONS, "teacher"))
    sequences.check(LiveTeacher(), "s")
    with pytest.raises(ConfigError, match="teacher_cache: off"):
        sequences.check(LookupSource(object()), "s")
