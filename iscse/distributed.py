"""Data-parallel helpers for the trainer: process-group set-up from ``torchrun``'s environment and the
all-gather that keeps the local slice differentiable.

Under ``torchrun --nproc-per-node N -m iscse.train ...`` every process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from its environment; :func:`init_distributed` joins the process group (NCCL for CUDA, gloo on CPU).
Without those variables everything here degrades to a single process (rank 0 of 1) and every collective is a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "gather_with_grad", "barrier", "broadcast_object", "any_flag",
           "cleanup"]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node), its ``device``, and
    whether a process group is active (``enabled``). ``is_main`` is rank 0, the one that writes files."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: Optional[str] = None, timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else describe a single process.

    ``device``: ``None`` or ``"auto"`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; an explicit
    ``"cpu"`` forces gloo on CPU even on a GPU machine; ``"cuda"`` requires CUDA. ``timeout_minutes`` bounds how long
    a collective waits (rank 0 evaluates and saves while the others wait at a barrier).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device in (None, "", "auto"):
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available here; pass --device cpu")
    if kind == "cuda":
        index = torch.device(device).index if device not in (None, "", "auto") else None
        dev = torch.device("cuda", local_rank if world_size > 1 or index is None else index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev, False)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)


def gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-gather ``x`` (``(B, D)`` on every rank, same ``B``) into ``(world_size * B, D)`` in rank order.

    ``dist.all_gather`` returns constants; as SimCSE's and IS-CSE's reference code does, this rank's slice is then
    replaced by ``x`` itself so gradients flow back into the local encoder. Every rank computes the same global
    loss; a backward pass gives each rank the gradient through its own slice, and DDP then averages over ranks.
    """
    if not ctx.enabled:
        return x
    x = x.contiguous()
    parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x)
    parts[ctx.rank] = x
    return torch.cat(parts, dim=0)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; no-op for a single process)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


def any_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is True on any rank (a MAX all-reduce; a host sync)."""
    if not ctx.enabled:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
