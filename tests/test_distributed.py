"""Scale-out: `torchrun -m kdistill run` with 2 CPU processes (gloo) against 1 process.

With `train.batch_size` the global batch, rank r of W takes samples r, r+W, … of each global
batch, so 2 ranks average the same gradient as 1 process over the whole batch. The results agree
up to float rounding: the 2-rank gradient is (g₀ + g₁)/2 summed by gloo, the 1-process one is one
sum over all samples, so the last bits differ and Adam carries the difference along.
Tolerance: 1e-5 absolute + 1e-4 relative on every weight after the teacher's 12 and each
student's 24 steps (measured: at most 5.6e-7 absolute). Without the gradient average — each rank
training on its half alone — weights differ by up to 9e-2, far outside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.engine import distributed
from kdistill.engine.distributed import DistInfo, shard_loader
from kdistill.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

RECIPE = """
name: ddp
seed: 0
data: {dataset: digits, val_size: 148}
teacher:
  model: middle_student
  kwargs: {channels: [8, 16]}
  train: {epochs: 1, batch_size: 100, progress: false}
students:
  - {name: small, model: middle_student, kwargs: {channels: [2, 4]}}
train: {epochs: 2, batch_size: 100, lr: 0.01, progress: false}
tune: {enabled: false}
cost: {enabled: false}
"""


def dataset(n: int) -> ArrayDataset:
    return ArrayDataset(torch.randn(n, 1, 2, 2), torch.arange(n) % 2, ["a", "b"], "toy")


# -- pieces that need no process group -------------------------------------------------------


@pytest.mark.parametrize("n", [40, 37])
def test_two_shards_of_a_global_batch_are_the_single_process_batch(n):
    whole = BatchLoader(dataset(n), batch_size=8, shuffle=True, seed=3)
    shards = [shard_loader(whole, DistInfo(rank=r, world_size=2)) for r in range(2)]
    assert all(s.batch_size == 4 and s.world_size == 2 for s in shards)
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for epoch in range(2):
        for loader in (whole, *shards):
            loader.set_epoch(epoch)
        for single, part0, part1 in zip(whole, *shards, strict=True):
            together = torch.cat([part0.index, part1.index]).sort().values
            if n % 2 == 0:  # an odd dataset is padded by wrapping around (one repeated sample)
                assert torch.equal(together, single.index.sort().values)
            else:
                assert set(single.index.tolist()) <= set(together.tolist())


def test_the_global_batch_must_divide_by_the_number_of_processes():
    whole = BatchLoader(dataset(40), batch_size=10)
    with pytest.raises(ConfigError, match=r"train.batch_size=10 .* number of processes \(3\)"):
        shard_loader(whole, DistInfo(rank=0, world_size=3))


def test_single_process_helpers_are_no_ops():
    assert not distributed.is_distributed()
    assert distributed.is_main_process()
    assert distributed.info() == DistInfo(0, 1, 0)
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum(x), x)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    whole = BatchLoader(dataset(8), batch_size=4)
    assert shard_loader(whole, DistInfo()) is whole
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:1") == "nccl"


# -- two processes ------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_two_cpu_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(RECIPE)
    # separate parents: each run trains its teacher (beside each other they would share it)
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    args = ["-m", "kdistill", "run", str(recipe), "--quiet"]
    run([sys.executable, *args, "--out", str(one)])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = run([*launcher, "--nproc_per_node=2", *args, "--out", str(two)])
    assert done.stdout.count("report.md, report.html, results.json") == 1  # only rank 0 prints

    names = sorted(p.name for p in (one / "models").glob("*.safetensors"))
    assert names == sorted(p.name for p in (two / "models").glob("*.safetensors"))
    assert len(names) == 3
    for name in names:
        a, b = load_file(one / "models" / name), load_file(two / "models" / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=f"{name} {key}")

    # rank 0 alone wrote the metrics: one line per model and epoch, as with one process
    lines = {p: (p / "metrics.jsonl").read_text().splitlines() for p in (one, two)}
    assert len(lines[two]) == len(lines[one]) == 1 + 2 + 2
    for line_one, line_two in zip(lines[one], lines[two], strict=True):
        r1, r2 = json.loads(line_one), json.loads(line_two)
        assert (r1["model"], r1["epoch"]) == (r2["model"], r2["epoch"])
        # training loss: the mean over ranks and steps of the per-rank batch means
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)
        # validation counts summed over ranks: the same images, so (nearly) the same accuracy
        assert r2["val_accuracy"] == pytest.approx(r1["val_accuracy"], abs=1 / 148 + 1e-9)


WORKER = """
import json, sys
import torch
from torch import nn
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, evaluate_classifier, fit
from kdistill.engine.distributed import all_gather, cleanup, info, init_distributed
from kdistill.losses import CE, KD, FitNet
from kdistill.losses.base import INDEX, STUDENT, DistillLoss


class NanOnSample(DistillLoss):
    needs = (STUDENT, INDEX)

    def forward(self, logits, index):
        value = logits.pow(2).mean() * 0.01
        return value * float("nan") if bool((index == 5).any()) else value


init_distributed("cpu")
world = info()
generator = torch.Generator().manual_seed(0)
data = ArrayDataset(torch.randn(64, 1, 2, 2, generator=generator), torch.arange(64) % 3,
                    ["a", "b", "c"], "toy")
torch.manual_seed(0)
teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
student = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
if world.rank == 1:  # DDP must start every rank from rank 0's student
    with torch.no_grad():
        student[1].weight.add_(1.0)
teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
distiller = Distiller(
    teacher,
    student,
    [
        Term(KD(2.0)),
        Term(CE()),
        Term(FitNet(), 0.1, student="1", teacher="1"),  # taps and a 2 → 5 linear connector
        Term(NanOnSample(), name="probe"),
    ],
)
config = TrainConfig(epochs=2, batch_size=16, lr=0.05, on_nonfinite="skip", progress=False)
# unshuffled: sample 5 is in global batch 0, and in rank 1's share of it (odd positions)
result = fit(distiller, BatchLoader(data, batch_size=16), config)
weights = torch.cat([p.detach().reshape(-1) for p in distiller.trainable_parameters()])
everyone = all_gather(weights)
record = {
    "world": world.world_size,
    "skipped": result.skipped_batches,
    "same_on_every_rank": all(torch.equal(w, everyone[0]) for w in everyone),
    "connectors": sorted(distiller.connectors),
    "teacher_untouched": all(
        torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items()
    ),
    "evaluation": evaluate_classifier(student, BatchLoader(data, batch_size=10)),
    "weights": weights.tolist(),
    "train_loss": result.final["train_loss"],
}
with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as handle:
    json.dump(record, handle)
cleanup()
"""


def test_ranks_skip_a_non_finite_batch_together_and_reduce_evaluation(tmp_path):
    """A NaN in one rank's share only: every rank skips that step (none hangs in backward),
    the ranks end with identical students and connectors (a FitNet term taps both models), the
    teacher is untouched, and the evaluation counts summed over ranks give the single-process
    figures."""
    alone, ranks = run_worker_both_ways(tmp_path, WORKER)
    assert alone["world"] == 1 and alone["skipped"] == 2  # batch 0 of both epochs
    for record in ranks:
        assert record["world"] == 2
        assert record["skipped"] == 2  # rank 0 saw no NaN but skipped with rank 1
        assert record["same_on_every_rank"] and record["teacher_untouched"]
        assert record["connectors"] == alone["connectors"] == ["fitnet"]
        torch.testing.assert_close(
            torch.tensor(record["weights"]), torch.tensor(alone["weights"]), atol=1e-5, rtol=1e-4
        )
        assert record["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)
        assert record["evaluation"]["accuracy"] == alone["evaluation"]["accuracy"]
        assert record["evaluation"]["loss"] == pytest.approx(alone["evaluation"]["loss"], rel=1e-5)


UNUSED_WORKER = """
import json, sys
import torch
from torch import nn
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.engine.distributed import all_gather, cleanup, info, init_distributed
from kdistill.losses import CE, KD, FitNet
from kdistill.losses.base import INDEX, STUDENT, DistillLoss

CHOSEN = (3, 20, 21, 53)  # unshuffled batches of 16: rank 1 only, both, none, rank 1 only


class Sometimes(DistillLoss):
    \"\"\"Its own parameter enters the loss only through the samples in CHOSEN: a per-sample sum
    divided by the batch size, so 2 ranks' mean gradient is the single-process one.\"\"\"

    needs = (STUDENT, INDEX)

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, logits, index):
        value = logits.pow(2).mean() * 0.01
        chosen = torch.isin(index, torch.tensor(CHOSEN))
        if chosen.any():
            value = value + (self.scale * logits[chosen]).pow(2).sum() / len(index)
        return value


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
        self.head = nn.Linear(3, 3)
        self.aux = nn.Linear(3, 2)  # in the output dict, read by no term

    def forward(self, x):
        features = self.body(x)
        return {"logits": self.head(features), "aux": self.aux(features)}


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


init_distributed("cpu")
world = info()
generator = torch.Generator().manual_seed(0)
data = ArrayDataset(torch.randn(64, 1, 2, 2, generator=generator), torch.arange(64) % 3,
                    ["a", "b", "c"], "toy")
config = TrainConfig(epochs=2, batch_size=16, lr=0.05, optimizer="adamw", weight_decay=0.1,
                     progress=False)
record = {"world": world.world_size}

# FitNets stage 1: only the hint term; the student's classifier (layer 3) is outside the loss
torch.manual_seed(0)
teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
student = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
classifier_before = flat(student[3].parameters())
hint_before = flat(student[1].parameters())
distiller = Distiller(teacher, student, [Term(FitNet(), student="1", teacher="1")])
fit(distiller, BatchLoader(data, batch_size=16), config)
weights = flat(distiller.trainable_parameters())
record["hint"] = {
    "weights": weights.tolist(),
    "same_on_every_rank": all(torch.equal(w, weights) for w in all_gather(weights)),
    "classifier_untouched": torch.equal(flat(student[3].parameters()), classifier_before),
    "hint_layer_trained": not torch.equal(flat(student[1].parameters()), hint_before),
    "connectors": sorted(distiller.connectors),
}

# a dict output with an unread head, and a loss parameter used on some steps only
torch.manual_seed(1)
teacher = TwoHeads()
student = TwoHeads()
sometimes = Sometimes()
distiller = Distiller(
    teacher,
    student,
    [Term(KD(2.0), output="logits"), Term(CE(), output="logits"),
     Term(sometimes, output="logits", name="sometimes")],
)
aux_before = flat(student.aux.parameters())
fit(distiller, BatchLoader(data, batch_size=16), config)
weights = flat(distiller.trainable_parameters())
record["sometimes"] = {
    "weights": weights.tolist(),
    "same_on_every_rank": all(torch.equal(w, weights) for w in all_gather(weights)),
    "aux_untouched": torch.equal(flat(student.aux.parameters()), aux_before),
    "scale": float(sometimes.scale),
}
with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as handle:
    json.dump(record, handle)
cleanup()
"""


def run_worker_both_ways(tmp_path: Path, source: str) -> tuple[dict, list[dict]]:
    """Run the worker `source` in one process and in 2 gloo ranks: (single record, rank records)."""
    script = tmp_path / "worker.py"
    script.write_text(source)
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    run([sys.executable, str(script), str(single)])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run([*launcher, "--nproc_per_node=2", str(script), str(double)])
    alone = json.loads((single / "rank0.json").read_text())
    ranks = [json.loads((double / f"rank{r}.json").read_text()) for r in range(2)]
    assert alone["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    return alone, ranks


def test_two_ranks_train_objectives_that_leave_parameters_without_gradient(tmp_path):
    """FitNets hint training (the classifier is outside the loss), a dict output whose second
    head no term reads, and a loss parameter that some steps use on one rank, both or none:
    2 ranks train (no "Expected to have finished reduction" error) and end with the weights of
    one process with the same global batch. Parameters no rank used are untouched on every rank
    even under AdamW's weight decay (grad None, skipped, as in one process)."""
    alone, ranks = run_worker_both_ways(tmp_path, UNUSED_WORKER)
    for scenario in ("hint", "sometimes"):
        for record in ranks:
            got = record[scenario]
            assert got["same_on_every_rank"], scenario
            torch.testing.assert_close(
                torch.tensor(got["weights"]),
                torch.tensor(alone[scenario]["weights"]),
                atol=1e-5,
                rtol=1e-4,
                msg=scenario,
            )
    for record in (alone, *ranks):
        assert record["hint"]["classifier_untouched"] and record["hint"]["hint_layer_trained"]
        assert record["hint"]["connectors"] == ["fitnet"]  # 2 → 5 channels
        assert record["sometimes"]["aux_untouched"]
        assert record["sometimes"]["scale"] != 1.0  # trained on the steps that used it


CRD_WORKER = """
import json, sys
import torch
from torch import nn
from kdistill.data.arrays import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.engine.distributed import all_gather, cleanup, info, init_distributed
from kdistill.losses import CE, CRD
from kdistill.losses.base import INDEX, STUDENT, DistillLoss

init_distributed("cpu")
world = info()
generator = torch.Generator().manual_seed(0)
data = ArrayDataset(torch.randn(64, 1, 2, 2, generator=generator), torch.arange(64) % 3,
                    ["a", "b", "c"], "toy")
torch.manual_seed(0)  # the same global RNG on every rank: the same negatives draw
teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
crd = CRD(3, 6, feature_dim=4, num_samples=64, num_negatives=8, nce_temperature=0.5)
if world.rank == 1:  # the banks must start from rank 0's
    crd.memory_student.mul_(-1.0)
distiller = Distiller(teacher, student, [Term(CE()), Term(crd, 0.5, student="2", teacher="2")])
config = TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False)
banks_before = torch.cat([crd.memory_student, crd.memory_teacher]).clone()
fit(distiller, BatchLoader(data, batch_size=16, shuffle=True, seed=5), config)
weights = torch.cat([p.detach().reshape(-1) for p in distiller.trainable_parameters()])
banks = torch.cat([crd.memory_student, crd.memory_teacher])
state = torch.cat([weights, banks.flatten(), crd.log_z])
record = {
    "world": world.world_size,
    "same_on_every_rank": all(torch.equal(s, state) for s in all_gather(state)),
    "weights": weights.tolist(),
    "banks": banks.tolist(),
    "log_z": crd.log_z.tolist(),
    "rows_written": int((banks != banks_before).any(dim=1).sum()),
}


class NanOnSample(DistillLoss):
    needs = (STUDENT, INDEX)

    def forward(self, logits, index):
        value = logits.pow(2).mean() * 0.01
        return value * float("nan") if bool((index == 5).any()) else value


# a NaN before CRD on rank 1 only (sample 5, unshuffled: rank 1's share of batch 0): rank 0
# runs CRD's gather, rank 1 must take part in it (skip_step) or both wait forever
torch.manual_seed(0)
crd = CRD(3, 6, feature_dim=4, num_samples=64, num_negatives=8, nce_temperature=0.5)
distiller = Distiller(
    teacher, student, [Term(NanOnSample(), name="nan"), Term(crd, 0.5, student="2", teacher="2")]
)
result = fit(
    distiller,
    BatchLoader(data, batch_size=16),
    TrainConfig(epochs=1, batch_size=16, lr=0.05, progress=False, on_nonfinite="skip"),
)
state = torch.cat([crd.memory_student, crd.memory_teacher, crd.log_z.unsqueeze(0).T.repeat(1, 4)])
record["skipped"] = result.skipped_batches
record["skip_same_on_every_rank"] = all(torch.equal(s, state) for s in all_gather(state))
with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as handle:
    json.dump(record, handle)
cleanup()
"""


def test_crd_banks_under_two_ranks_hold_every_ranks_updates(tmp_path):
    """CRD under DDP: every rank writes every rank's embeddings into the memory banks, so after
    2 shuffled epochs the banks, Z and the weights of 2 ranks equal one process's with the same
    global batch (the negatives are drawn for the global batch, row r for the r-th smallest
    dataset index), and are identical, bit for bit, on the two ranks. A NaN term before CRD on
    one rank only makes both ranks skip the step without hanging in CRD's gather."""
    alone, ranks = run_worker_both_ways(tmp_path, CRD_WORKER)
    assert alone["rows_written"] == 2 * 64  # every sample of both banks was written
    assert alone["skipped"] == 1
    for record in ranks:
        # a NaN term before CRD on one rank: both skip the step, none hangs, banks stay equal
        assert record["skipped"] == 1 and record["skip_same_on_every_rank"]
        assert record["same_on_every_rank"]
        for key in ("banks", "log_z", "weights"):
            torch.testing.assert_close(
                torch.tensor(record[key]), torch.tensor(alone[key]), atol=1e-5, rtol=1e-4, msg=key
            )
