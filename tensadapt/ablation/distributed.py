"""The process group a run trains in: one process, or several under ``torchrun`` (gloo, CPU).

Under ``torchrun --nproc_per_node N`` every process takes a 1/N shard of each global batch
and of the test set; gradients are averaged by DDP and test counts summed, so a run has the
same metric semantics (same global batch, same accuracy) as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_from_env", "current"]


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) ``values`` over all processes."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0, on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current() -> DistContext:
    """The context of the initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return DistContext(dist.get_rank(), world, local)
    return DistContext()


def init_from_env() -> DistContext:
    """Join the process group ``torchrun`` describes (gloo backend) if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
    return current()
