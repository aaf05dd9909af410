"""One rank of the ``gather_across_devices`` test (``tests/test_integrations_st.py``), and the problem it trains on.

Run as ``python tests/st_ddp_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
set: joins a gloo group, trains a DDP-wrapped linear encoder with the sentence-transformers ``ISCSELoss``
(``gather_across_devices=True``) on this rank's slice of every global batch, and saves the per-step losses, the
loss state and the final weights to ``OUT_DIR/rank<R>.pt``. :func:`train` with ``world_size=1`` is the
single-process run on the global batch that the test compares with.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from iscse.integrations.sentence_transformers import ISCSELoss

STEPS, GLOBAL_BATCH, D_IN, DIM, BUFFER, K = 6, 8, 12, 10, 16, 3  # the buffer is full from step 2 on


def problem():
    """The global batches ``(STEPS, GLOBAL_BATCH, D_IN)`` and two noise draws that make the two views (there is no
    dropout in a linear encoder), float64, the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS, GLOBAL_BATCH, D_IN, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(2, STEPS, GLOBAL_BATCH, D_IN, generator=g, dtype=torch.float64)
    return x, noise


def train(rank: int, world_size: int):
    """Train for ``STEPS`` steps on this rank's rows; returns (losses, loss state_dict, weight, bias)."""
    torch.manual_seed(0)
    encoder = nn.Linear(D_IN, DIM, dtype=torch.float64)
    model = nn.parallel.DistributedDataParallel(encoder) if world_size > 1 else encoder
    loss_fn = ISCSELoss(model, buffer_size=BUFFER, k=K, scale=20.0, alpha=0.1, gather_across_devices=world_size > 1,
                        dim=DIM, buffer_dtype=torch.float64, return_components=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, noise = problem()
    rows = GLOBAL_BATCH // world_size
    mine = slice(rank * rows, (rank + 1) * rows)
    losses = []
    for step in range(STEPS):
        views = torch.cat([x[step, mine] + noise[0, step, mine], x[step, mine] + noise[1, step, mine]])
        z = model(views)  # one forward for both views, as sentence-transformers 6 merges columns
        z1, z2 = z[:rows], z[rows:]
        loss = loss_fn.compute_loss_from_embeddings([z1, z2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), loss_fn.criterion.state_dict(), encoder.weight.detach(), encoder.bias.detach()


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        losses, state, weight, bias = train(rank, world_size)
        torch.save({"losses": losses, "state": state, "weight": weight, "bias": bias},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Results are saved and the group destroyed. Skip the interpreter's teardown: in the full test suite a rank
    # sometimes aborted with "terminate called without an active exception" (SIGABRT), most likely a native
    # thread's destructor at exit. An error above still exits 1, and a rank that dies before saving still fails
    # the test on its missing result file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
