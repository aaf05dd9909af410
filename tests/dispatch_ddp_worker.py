"""A worker of tests/test_backends.py::test_two_processes_share_rank_0s_decision: one rank of a gloo group (or one
process alone, with rank 0's saved decisions) runs a few "auto" IS-CSE steps on the global batch and saves its
losses, gradients and decisions.

``python dispatch_ddp_worker.py RANK WORLD PORT STATE OUT``: ``STATE`` is the criterion's starting state (a full
buffer of 4096 rows, so FAISS is an "auto" candidate on CPU; for the lone process, with rank 0's decisions). The
policy times on a fake clock biased per rank: on rank 0 FAISS's kNN looks faster than torch's, on rank 1 slower, so
the two would decide differently if each decided for itself.
"""
import sys

import torch
import torch.distributed as dist

import iscse
from iscse import backends
from iscse.training.distributed import gather_with_grad

B_LOCAL, D, STEPS = 4, 32, 3


class Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def main(rank: int, world: int, port: int, state_path: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clock = Clock()
    backends.time = clock
    torch_be, faiss_be = backends.get_backend("torch"), backends.get_backend("faiss")
    inner = torch_be.iscse_loss
    faiss_faster = rank == 0

    def timed(*args, knn=None, **kwargs):
        uses_faiss = knn is faiss_be
        clock.now += 0.01 if uses_faiss == faiss_faster else 0.03
        return inner(*args, knn=knn, **kwargs)
    torch_be.iscse_loss = timed

    crit = iscse.ISCSELoss(D, buffer_size=4096, k=8)
    crit.load_state_dict(torch.load(state_path, weights_only=True))
    losses, grads = [], []
    for step in range(STEPS):
        parts = []
        for r in range(2):  # both ranks' local batches, from seeds: a lone process takes both
            gen = torch.Generator().manual_seed(1000 * step + r)
            parts.append((torch.randn(B_LOCAL, D, generator=gen), torch.randn(B_LOCAL, D, generator=gen)))
        if world > 1:
            z1, z2 = (p.clone().requires_grad_(True) for p in parts[rank])
            g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        else:
            z1 = torch.cat([p[0] for p in parts]).requires_grad_(True)
            z2 = torch.cat([p[1] for p in parts]).requires_grad_(True)
            g1, g2 = z1, z2
        loss = crit(g1, g2)
        loss.backward()
        losses.append(loss.detach())
        grads.append((z1.grad, z2.grad))
    torch.save({"losses": losses, "grads": grads, "decisions": backends.auto_decisions(),
                "state": crit.state_dict()}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
