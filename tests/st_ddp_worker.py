"""One rank of the ``gather_across_devices`` test (``tests/test_integrations_st.py``), and the problem it trains on.

Run as ``python tests/st_ddp_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
set: joins a gloo group, trains a DDP-wrapped linear encoder with the sentence-transformers ``ISCSELoss``
(``gather_across_devices=True``) on this rank's rows of every global batch (the ranks' shares differ at some steps,
as a short last batch does), leaves the group, and saves the per-step losses, the loss state, the final weights and
the native threads still alive after the teardown to ``OUT_DIR/rank<R>.pt``. :func:`train` with ``world_size=1`` is
the single-process run on the global batch that the test compares with.
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import List, Optional

import torch
# torch.distributed.nn.functional writes ``group=group.WORLD`` into its functions' default arguments when it is first
# imported. DDP's constructor imports it (through torch._dynamo and torch.distributed._shard); after
# init_process_group those ten defaults would hold the live process group, so destroy_process_group() could not free
# it and its native threads (two gloo workers, gloo's TCP loop, rank 0's TCPStore server) would run on into the
# interpreter's teardown. Imported here, before any group exists, the defaults are None (the default group at call
# time) and the teardown below ends every one of those threads.
import torch.distributed.nn  # noqa: F401
import torch.distributed as dist
import torch.nn as nn

from iscse.integrations.sentence_transformers import ISCSELoss

STEPS, D_IN, DIM, BUFFER, K = 6, 12, 10, 16, 3
# Rows of rank 0 and rank 1 at each step: equal, then unequal (a short last batch under dataloader_drop_last=False
# leaves the ranks different shares; SentenceTransformerTrainer does not even them out). The buffer is full from
# step 2 on.
SPLITS = [(4, 4), (4, 4), (5, 3), (4, 4), (2, 6), (3, 2)]
GLOBAL_BATCH = max(sum(s) for s in SPLITS)
# Native threads of a live gloo process group (names as Linux shows them).
GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")


def problem():
    """The global batches ``(STEPS, GLOBAL_BATCH, D_IN)`` and two noise draws that make the two views (there is no
    dropout in a linear encoder), float64, the same on every rank; step ``s`` uses the first ``sum(SPLITS[s])``
    rows."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS, GLOBAL_BATCH, D_IN, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(2, STEPS, GLOBAL_BATCH, D_IN, generator=g, dtype=torch.float64)
    return x, noise


def rows_of(step: int, rank: int, world_size: int) -> slice:
    """The rows of the global batch of ``step`` that ``rank`` holds (all of them in a single process)."""
    if world_size == 1:
        return slice(0, sum(SPLITS[step]))
    start = sum(SPLITS[step][:rank])
    return slice(start, start + SPLITS[step][rank])


def train(rank: int, world_size: int):
    """Train for ``STEPS`` steps on this rank's rows; returns (losses, loss state_dict, weight, bias)."""
    torch.manual_seed(0)
    encoder = nn.Linear(D_IN, DIM, dtype=torch.float64)
    model = nn.parallel.DistributedDataParallel(encoder) if world_size > 1 else encoder
    loss_fn = ISCSELoss(model, buffer_size=BUFFER, k=K, scale=20.0, alpha=0.1, gather_across_devices=world_size > 1,
                        dim=DIM, buffer_dtype=torch.float64, return_components=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, noise = problem()
    losses = []
    for step in range(STEPS):
        mine = rows_of(step, rank, world_size)
        rows = mine.stop - mine.start
        views = torch.cat([x[step, mine] + noise[0, step, mine], x[step, mine] + noise[1, step, mine]])
        z = model(views)  # one forward for both views, as sentence-transformers 6 merges columns
        z1, z2 = z[:rows], z[rows:]
        loss = loss_fn.compute_loss_from_embeddings([z1, z2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), loss_fn.criterion.state_dict(), encoder.weight.detach(), encoder.bias.detach()


def native_threads() -> Optional[List[str]]:
    """The names of this process's threads (None where ``/proc`` does not list them)."""
    root = "/proc/self/task"
    if not os.path.isdir(root):
        return None
    names = []
    for tid in sorted(os.listdir(root)):
        try:
            with open(os.path.join(root, tid, "comm"), encoding="utf-8") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while listing
            pass
    return names


def main(out_dir: str) -> None:
    # A bounded timeout: a collective that one rank never joins fails the test in a minute instead of hanging it.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        losses, state, weight, bias = train(rank, world_size)
    finally:
        dist.destroy_process_group()
    torch.save({"losses": losses, "state": state, "weight": weight, "bias": bias, "threads": native_threads()},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
