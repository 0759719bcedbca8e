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

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from kdistill.errors import ConfigError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def info() -> DistInfo:
    if not is_distributed():
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return info().is_main


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


def _collective_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of `tensor` over all ranks (a new tensor, on `tensor`'s device)."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_gather(tensor: Tensor) -> list[Tensor]:
    """Every rank's `tensor` (same shape and dtype everywhere), in rank order."""
    if not is_distributed():
        return [tensor.clone()]
    work = tensor.detach().to(_collective_device(), copy=True)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work)
    return [part.to(tensor.device) for part in parts]


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on at least one rank (every rank gets the same answer)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
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
    )


def wrap_ddp(distiller: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`distiller` in DistributedDataParallel with its teacher left out (replicated, frozen).

    DDP then broadcasts rank 0's student, connectors and loss parameters at construction and
    averages their gradients in every backward; the teacher's parameters and buffers are neither
    broadcast nor reduced. Connectors must exist (`Distiller.build`) before wrapping. In a single
    process the distiller itself is returned.
    """
    if not is_distributed():
        return distiller
    from torch.nn.parallel import DistributedDataParallel

    teacher = getattr(distiller, "teacher", None)
    if teacher is not None:
        ignored = [f"teacher.{name}" for name, _ in teacher.named_parameters()]
        ignored += [f"teacher.{name}" for name, _ in teacher.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(distiller, device_ids=device_ids)
