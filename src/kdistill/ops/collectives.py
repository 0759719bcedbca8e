"""Collectives across the ranks of a process group (torchrun / DDP), each a no-op in an
ordinary single process — so losses (CRD's memory banks) and the engine can share them without
the losses importing the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def collective_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of `tensor` over all ranks (a new tensor, on `tensor`'s device)."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_gather(tensor: Tensor) -> list[Tensor]:
    """Every rank's `tensor` (same shape and dtype everywhere), in rank order."""
    if not is_distributed():
        return [tensor.clone()]
    work = tensor.detach().to(collective_device(), copy=True)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work)
    return [part.to(tensor.device) for part in parts]


def all_gather_rows(tensor: Tensor) -> tuple[Tensor, list[int]]:
    """Every rank's `tensor` concatenated along dimension 0 in rank order, and each rank's row
    count; the ranks may hold different numbers of rows (the other dimensions and the dtype
    must agree). In a single process: `tensor` itself and ``[len(tensor)]``."""
    if not is_distributed():
        return tensor, [tensor.shape[0]]
    counts = [int(c) for c in all_gather(torch.tensor([tensor.shape[0]], device=tensor.device))]
    most = max(counts)
    if most == 0:  # every rank sees the same counts, so all return here together
        return tensor, counts
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = all_gather(padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]), counts


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on at least one rank (every rank gets the same answer)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()
