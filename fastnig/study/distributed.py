"""Running one study over several processes launched by ``torchrun``.

Owns: this process's rank and world (:class:`Ranks`, :func:`init_ranks`) and
the three collectives the stages use (barrier, gather of Python objects, sum
of a tensor).  Without torchrun everything is rank 0 of 1 and no process
group is made.

Must not: decide how work is split (the stages do) or touch files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, tensor):
        """In-place sum over ranks (exact when every element has one non-zero contributor)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def init_ranks() -> Ranks:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), local)
