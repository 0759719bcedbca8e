"""Several processes, one training run: `torchrun` set-up, rank queries and reductions.

`torchrun --nproc_per_node=N -m kdistill run <recipe>` starts N processes and gives each the
environment variables RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT).
`init_distributed` joins them into one process group — gloo for CPU training, nccl for CUDA —
and every helper here is a no-op in an ordinary single process, so the same code runs both ways.

Conventions the engine follows (see `kdistill.engine.loop.fit`):

- ``batch_size`` is the **global** batch: each of the W ranks takes ``batch_size / W`` samples
  of every step (rank r the samples r, r+W, … of the epoch's seeded order), so W ranks see the
  same batches as one process and average the same gradient;
- the student, its connectors and loss-owned parameters are wrapped in
  `DistributedDataParallel`; the teacher is replicated on every rank and kept out of it;
- evaluation counts are summed over ranks before a metric is computed;
- only rank 0 writes files (metrics, checkpoints, reports) and prints.
"""

from __future__ import annotations

import dataclasses
import gc
import os

import torch
import torch.distributed as dist
from torch import Tensor

from kdistill.errors import ConfigError, NonFiniteLossError
from kdistill.ops.collectives import (  # noqa: F401  (re-exported: the engine's rank helpers)
    DistInfo,
    all_gather,
    all_gather_rows,
    all_reduce_sum,
    any_rank,
    barrier,
    collective_device,
    info,
    is_distributed,
    is_main_process,
)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True when the torchrun variables say this is one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: str) -> str:
    """nccl for CUDA devices, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun described (once); a single process stays alone.

    `device` picks the backend (``"cuda"`` → nccl, else gloo); for CUDA each process is pinned
    to GPU ``LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return info()
    missing = [name for name in (*ENV_VARS, "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the environment lacks {missing}; "
            "start several processes with torchrun --nproc_per_node=N -m kdistill run <recipe>"
        )
    backend = backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but CUDA is not available")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not is_distributed():
        dist.init_process_group(backend=backend)
    return info()


def resolve_device(device: str) -> torch.device:
    """The device of this process: under torchrun, ``"cuda"`` means GPU ``LOCAL_RANK``.

    Raises ConfigError (naming `train.device` and the fix) for a name torch does not know, and
    for a CUDA device this machine does not have — before any model or tensor is moved.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"train.device: {device!r} is not a device name torch knows "
            f"({str(error).splitlines()[0]}); use 'cpu', 'cuda' or 'cuda:<index>'"
        ) from error
    if resolved.type == "cuda" and resolved.index is None and is_distributed():
        resolved = torch.device("cuda", info().local_rank)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device is {device!r}, but torch finds no CUDA device on this machine "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                "set train.device: cpu (on the command line: --set train.device=cpu)"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"train.device is {device!r}, but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}; pick one of them"
            )
    return resolved


def cleanup() -> None:
    """Leave the process group (no-op when none was joined), the ranks together: a barrier
    first, so that no rank tears its gloo connections down while a slower peer still uses them
    (that aborted a rank at exit under load: "terminate called without an active exception").
    A barrier that fails (a peer already gone) does not hide the error being raised."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers left in reference cycles go now, not at interpreter exit
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - leaving anyway; the caller's own error matters more
            pass
        dist.destroy_process_group()


def shard_loader(loader, world: DistInfo):
    """This rank's share of a single-process loader: the same seeded order, batch / world size.

    - kdistill's `BatchLoader`: `loader.batch_size` is the global batch; it must divide by the
      number of processes, and the loader is rebuilt for this rank;
    - a loader built with `world_size > 1` is taken as already sharded and returned as it is;
    - a torch ``DataLoader`` whose sampler is a ``DistributedSampler`` (for this world size) is
      already sharded and returned as it is; its `batch_size` is the per-rank batch, and `fit`
      calls the sampler's `set_epoch` every epoch;
    - any other loader is refused with a ConfigError saying how to shard it: kdistill does not
      rebuild a foreign loader (its collate function, workers and sampler are the user's).
    """
    from kdistill.data.arrays import BatchLoader
    from kdistill.data.batches import distributed_sampler

    if world.world_size == 1 or getattr(loader, "world_size", 1) > 1:
        return loader
    sampler = distributed_sampler(loader)
    if sampler is not None:
        if sampler.num_replicas != world.world_size or sampler.rank != world.rank:
            raise ConfigError(
                f"the training loader's DistributedSampler has num_replicas={sampler.num_replicas}"
                f", rank={sampler.rank}, but this is rank {world.rank} of {world.world_size}; "
                "build it with DistributedSampler(dataset) inside the torchrun process"
            )
        return loader
    if not isinstance(loader, BatchLoader):
        raise ConfigError(
            f"under torchrun the training loader must be sharded by rank; got a "
            f"{type(loader).__name__} without a DistributedSampler. Build it as "
            "DataLoader(dataset, batch_size=<global batch / number of processes>, "
            "sampler=DistributedSampler(dataset, shuffle=...)) (fit calls set_epoch), or use "
            "kdistill's BatchLoader, which fit shards itself"
        )
    if loader.batch_size % world.world_size:
        raise ConfigError(
            f"train.batch_size={loader.batch_size} is the global batch and must divide by the "
            f"number of processes ({world.world_size})"
        )
    return BatchLoader(
        loader.dataset,
        batch_size=loader.batch_size // world.world_size,
        shuffle=loader.shuffle,
        seed=loader.seed,
        drop_last=loader.drop_last,
        rank=world.rank,
        world_size=world.world_size,
        augmentation=loader.augmentation,  # the same views on every rank: keyed by sample
        augment_seed=loader.augment_seed,
    )


class _LossOnlyOutput(torch.nn.Module):
    """What DDP wraps: the distiller, its output's model outputs detached from the graph.

    DDP with ``find_unused_parameters`` walks the autograd graph from every tensor the forward
    returns to learn which parameters will get a gradient. The model outputs reach parameters
    that the loss may not (the head of a dict output that no term reads), and DDP would then wait
    for gradients that never come; only `loss` keeps its graph (the loop reads `loss` and
    `parts`, nothing else).
    """

    def __init__(self, distiller: torch.nn.Module):
        super().__init__()
        self.distiller = distiller

    def forward(self, *args, **kwargs):
        try:
            out = self.distiller(*args, **kwargs)
        except NonFiniteLossError as error:
            # the terms after the failed one did not run here but do on the other ranks
            _skip_terms_after(self.distiller, error.term)
            raise
        if dataclasses.is_dataclass(out) and hasattr(out, "student_output"):
            out = dataclasses.replace(
                out,
                student_output=_detached(out.student_output),
                teacher_output=_detached(out.teacher_output),
            )
        return out


def _skip_terms_after(distiller: torch.nn.Module, failed: str | None) -> None:
    """Call `skip_step()` on the losses (those with collectives inside, e.g. CRD) of the terms
    after `failed`, which did not run on this rank, so that every rank makes the same
    collective calls in this step (see `CRD.skip_step`)."""
    names = list(getattr(distiller, "term_names", []))
    terms = list(getattr(distiller, "terms", []))
    start = names.index(failed) + 1 if failed in names else 0
    for term in terms[start:]:
        skip = getattr(term.loss, "skip_step", None)
        if callable(skip):
            skip()


def _detached(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(item) for item in value)
    return value


def _buffers_synced_by_losses(distiller: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """(name, buffer) of the loss modules that keep their buffers equal on every rank themselves
    (class attribute ``syncs_buffers_across_ranks``, e.g. CRD's memory banks)."""
    losses = getattr(distiller, "losses", None)
    if losses is None:
        return []
    found = []
    for prefix, module in losses.named_modules(prefix="losses"):
        if getattr(module, "syncs_buffers_across_ranks", False):
            found += [(f"{prefix}.{name}", b) for name, b in module.named_buffers()]
    return found


def wrap_ddp(distiller: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`distiller` in DistributedDataParallel with its teacher left out (replicated, frozen).

    DDP then broadcasts rank 0's student, connectors and loss parameters at construction and
    averages their gradients in every backward; the teacher's parameters and buffers are neither
    broadcast nor reduced. Connectors must exist (`Distiller.build`) before wrapping. In a single
    process the distiller itself is returned.

    Parameters without a gradient: an objective may leave student, connector or loss parameters
    out of the loss, always (FitNets hint training: the classifier) or on some steps only (a
    term that needs a sample the rank's share may lack). DDP runs with
    ``find_unused_parameters=True``: each backward it marks the parameters the loss does not
    reach and reduces the others, so a parameter no rank used keeps ``grad = None`` (the
    optimiser skips it, as in one process) and one used on some ranks only gets the average with
    zeros from the others — the single-process gradient of a per-sample mean. The price is one
    walk of the autograd graph per step (see the README's DDP section for the measured cost).

    Buffers of losses with ``syncs_buffers_across_ranks`` (CRD's memory banks, which every rank
    updates with every rank's embeddings) are broadcast from rank 0 once here, then left out of
    DDP's per-step buffer broadcast (which would copy the whole bank every step). When a term
    raises NonFiniteLossError on one rank, the losses of the later terms that have a
    `skip_step()` method (collectives inside the loss) take part in the step's collectives
    without samples, so that no rank waits forever on another.
    """
    if not is_distributed():
        return distiller
    from torch.nn.parallel import DistributedDataParallel

    ignored = []
    teacher = getattr(distiller, "teacher", None)
    if teacher is not None:
        ignored += [f"teacher.{name}" for name, _ in teacher.named_parameters()]
        ignored += [f"teacher.{name}" for name, _ in teacher.named_buffers()]
    for name, buffer in _buffers_synced_by_losses(distiller):
        work = buffer.detach().to(collective_device(), copy=True)
        dist.broadcast(work, src=0)
        with torch.no_grad():
            buffer.copy_(work.to(buffer.device))
        ignored.append(name)
    wrapped = _LossOnlyOutput(distiller)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        wrapped, [f"distiller.{name}" for name in ignored]
    )
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(wrapped, device_ids=device_ids, find_unused_parameters=True)
