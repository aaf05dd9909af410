"""One rank of the hard-negative data-parallel test (``tests/test_hard_negatives.py``).

Run as ``python tests/hn_ddp_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
set: joins a gloo group and, for every step of :func:`problem`, takes this rank's slice of the global ``z1, z2, z3``
(float64 leaves), all-gathers them with the trainer's :func:`iscse.training.distributed.gather_with_grad` and
computes both hard-negative objectives (SimCSE's :func:`hard_negative_info_nce`, and IS-CSE's
:func:`hard_negative_step` on an ``ISCSELoss`` with a float64 buffer). Saves the losses and the gradients of the
local slices to ``OUT_DIR/rank<R>.pt``.
"""
from __future__ import annotations

import os
import sys

import torch
# Before any process group exists, as in tests/st_ddp_worker.py (which says why): then destroy_process_group() ends
# the group's native threads, and the interpreter's exit finds none running.
import torch.distributed.nn  # noqa: F401
import torch.distributed as dist

from iscse import ISCSELoss
from iscse.hard_negatives import hard_negative_info_nce, hard_negative_step
from iscse.training.distributed import gather_with_grad
from st_ddp_worker import native_threads

STEPS, GLOBAL_BATCH, DIM, BUFFER, K, TEMP, ALPHA, WEIGHT = 5, 8, 7, 16, 3, 0.05, 0.1, 0.6  # full from step 2


def problem() -> torch.Tensor:
    """``(STEPS, 3, GLOBAL_BATCH, DIM)`` float64: each step's global ``z1, z2, z3``, the same on every rank."""
    g = torch.Generator().manual_seed(4321)
    return torch.randn(STEPS, 3, GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64)


def run(rank: int, world_size: int) -> dict:
    """Losses ``(STEPS,)`` of both objectives and the gradients ``(STEPS, 3, rows, DIM)`` of the local slices."""
    data = problem()
    rows = GLOBAL_BATCH // world_size
    mine = slice(rank * rows, (rank + 1) * rows)
    criterion = ISCSELoss(DIM, buffer_size=BUFFER, k=K, temperature=TEMP, alpha=ALPHA, backend="torch",
                          buffer_dtype=torch.float64)
    out = {"simcse": [], "iscse": [], "simcse_grad": [], "iscse_grad": []}
    for step in range(STEPS):
        for name in ("simcse", "iscse"):
            local = [data[step, j, mine].clone().requires_grad_(True) for j in range(3)]
            z1, z2, z3 = (gather_with_grad(z) for z in local)
            if name == "simcse":
                loss = hard_negative_info_nce(z1, z2, z3, TEMP, WEIGHT)
            else:
                loss = hard_negative_step(criterion, z1, z2, z3, hard_negative_weight=WEIGHT, update=True)
            loss.backward()
            out[name].append(loss.detach())
            out[f"{name}_grad"].append(torch.stack([z.grad for z in local]))
    return {key: torch.stack(value) for key, value in out.items()}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        result = run(rank, world_size)
    finally:
        dist.destroy_process_group()
    result["threads"] = native_threads()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
