"""Data-parallel helpers for the trainer: the all-gather that keeps the local slice differentiable, and a few
collectives that degrade to no-ops in a single process.

The process group itself is set up by ``transformers.Trainer`` (through ``accelerate``) when the trainer is launched
by ``torchrun``: NCCL on GPUs, gloo on CPU. Everything here reads ``torch.distributed``'s state and does nothing when
no process group is active (one process, rank 0 of 1).
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "gather_with_grad", "any_flag"]


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (``(B, D)`` on every rank, same ``B``) into ``(world_size * B, D)`` in rank order.

    ``dist.all_gather`` returns constants; as SimCSE's and IS-CSE's reference code does, this rank's slice is then
    replaced by ``x`` itself so gradients flow back into the local encoder. Every rank computes the same global
    loss; a backward pass gives each rank the gradient through its own slice, and DDP then averages over ranks.
    Returns ``x`` unchanged in a single process.
    """
    if not is_distributed():
        return x
    x = x.contiguous()
    parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (a MAX all-reduce, so a host sync); ``flag`` itself in a
    single process. ``device``: where the collective's tensor lives (the CUDA device under NCCL)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
