"""Data-parallel training across processes started by ``torchrun``.

Each process reads its share of every optimiser step's batches, gradients are averaged by
``DistributedDataParallel``, and only rank 0 validates, logs and writes checkpoints. Decisions
that must agree (stop now, skip a non-finite step) are taken on rank 0 and broadcast, so no rank
can leave the loop while the others wait in an all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_name: str = "auto", timeout_minutes: float = 120.0) -> World:
    """Joins the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT); a plain run is a world of one. NCCL when every rank has a GPU,
    gloo on CPUs. ``timeout_minutes`` bounds every collective wait: the other ranks wait while rank
    0 trains the tokenizer, tokenizes a corpus or validates, which can outlast NCCL's default
    10 minutes on a large corpus."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return World(rank, size, local_rank)


def gather(world: World, value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_step(world: World, loss_sum: torch.Tensor, bad: bool) -> tuple[torch.Tensor, bool]:
    """The step's loss summed over ranks, and whether any rank saw a non-finite value, in one
    all-reduce: every rank then skips (or takes) the same steps."""
    if not world.distributed:
        return loss_sum, bad
    both = torch.stack([loss_sum.detach().float(), torch.tensor(float(bad), device=loss_sum.device)])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    return both[0], bool(both[1].item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def leave(finished: bool = True) -> None:
    """Leaves the process group, if this process is in one. After a run that ``finished``, first
    waits until every rank is done with it: a rank that tears its connections down while another
    still reads from them can abort that process. After a failure it leaves at once (the others
    may never reach a barrier). Call it once nothing holds the group any more (drop the
    DistributedDataParallel module first): a group that outlives this call is torn down at
    interpreter exit, where gloo can abort the process."""
    if not dist.is_initialized():
        return
    try:
        if finished:
            dist.barrier()
    finally:
        dist.destroy_process_group()
