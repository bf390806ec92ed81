"""Data parallelism for `safesteer train` over processes, through ``torch.distributed``.

Launch the ordinary command under ``torchrun`` (``accelerate launch`` sets the same
environment variables; use ``--run-dir``, because torchrun reads ``--run`` as its own
``--run-path``)::

    torchrun --standalone --nproc-per-node 2 $(which safesteer) train --run-dir runs/demo

:func:`current_world` sees ``WORLD_SIZE`` and joins the process group (NCCL on CUDA, gloo on
CPU). Then each rank, every optimizer step:

* samples its contiguous share of the step's prompts. Rollouts are seeded per row
  (:mod:`safesteer_lens.rollouts`), so they are the ones a single process would sample, up to
  floating point;
* scores and backpropagates its rows, weighting each micro-batch by its share of the *global*
  rows, so summed gradients are the single-process gradients;
* sums the gradients over ranks once (:meth:`World.all_reduce_gradients`), after which every
  rank applies the same AdamW update and the weights stay identical without a broadcast.

Only rank 0 writes metrics, checkpoints and the exported student. Every rank here holds whole
models; for models that do not fit one card, ``--shard`` splits them with FSDP2
(:mod:`safesteer_lens.sharding`), which then reduces the gradients itself.

Why not ``DistributedDataParallel``: the student's forward runs through the TransformerLens
bridge twice per micro-batch (the prompt once, then the completions on its repeated KV cache),
while DDP's reducer expects one forward through its wrapper per backward. Summing gradients
once after accumulation is what DDP does under ``no_sync`` accumulation anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from safesteer_lens.errors import SafeSteerError


@dataclass(frozen=True)
class World:
    """Where this process sits among the training processes (one process: the defaults).

    Attributes:
        rank: This process's index.
        size: Number of processes.
        local_rank: Index on this machine (which GPU to use).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes files and prints."""
        return self.rank == 0

    def shard(self, n: int, what: str = "items") -> tuple[int, int]:
        """This rank's contiguous ``[start, stop)`` of ``n`` items, which must split evenly."""
        if n % self.size:
            raise SafeSteerError(
                f"{n} {what} per step cannot be split evenly over {self.size} processes; "
                f"use a multiple of {self.size}"
            )
        per_rank = n // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def all_reduce_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks, in one flat buffer."""
        if self.size == 1:
            return
        grads = []
        for p in params:
            if p.grad is None:  # every rank must send buffers of the same layout
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sum a few numbers (metrics, flags) over the ranks."""
        return self._reduce(values, "SUM")

    def max(self, values: Sequence[float]) -> list[float]:
        """The largest of a few numbers (widths, counts) over the ranks."""
        return self._reduce(values, "MAX")

    def _reduce(self, values: Sequence[float], op: str) -> list[float]:
        if self.size == 1:
            return list(values)
        out = torch.tensor(list(values), dtype=torch.float64)  # gloo carries CPU tensors
        dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
        return out.tolist()

    def main_says(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (for decisions that only rank 0 can make)."""
        if self.size == 1:
            return flag
        return self.sum([float(flag) if self.is_main else 0.0])[0] > 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if self.size > 1:
            dist.barrier()


def current_world() -> World:
    """This process's :class:`World`, joining the process group when launched by torchrun.

    A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets ``World()`` and never touches
    ``torch.distributed``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_available():
        raise SafeSteerError("this torch build has no torch.distributed; run in a single process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        # gloo for CPU tensors (metrics, or a CPU run on a GPU machine), NCCL for CUDA ones;
        # a long timeout, because ranks wait while rank 0 alone runs a whole pipeline stage
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def rank_device(device: str | None, world: World) -> str | None:
    """The device a rank trains on: as given, or its own GPU when several ranks share a machine.

    An explicit ``cuda:N`` is taken as given, so every rank would use that one card.
    """
    if device is None and world.size > 1 and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return device


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
