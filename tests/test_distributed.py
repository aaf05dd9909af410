"""Data parallel: ``torchrun --nproc-per-node 2 -m iscse.train`` on CPU (gloo) against one process with the same
global batch.

The two dropout views of a sentence come from the RNG of whichever rank encodes it, so with dropout a 2-process run
and a 1-process run draw different masks and cannot agree step by step. These tests therefore use the tiny model
with dropout 0: the views are then identical (``L_cl`` and ``L_s`` are still proper, non-trivial InfoNCE losses over
the global batch), and what is compared is exactly what data parallelism must preserve: the global batch seen by
the loss (all-gather with the local slice differentiable), the memory buffer (the same on every rank: the trainer
checks a checksum across ranks before each checkpoint and refuses to save otherwise), the gradients, and the
optimizer trajectory. The process group, DDP wrapping and per-rank RNG files are ``transformers.Trainer``'s (through
``accelerate``); the data slicing and the all-gather are this package's.

- ``--ddp_gradient sum``: DDP's averaged gradient times the world size is the single-process gradient of the global
  batch; ``--ddp_gradient mean`` (the default, the reference code's behaviour): it is half of it. The optimizer is
  plain SGD, whose step scales with the gradient (AdamW's would hide a factor of 2 but for its epsilon), and clipping
  is off (a threshold of 1e9: it would rescale both runs to one norm). So the 2-process run matches the 1-process
  run at the same learning rate under "sum", and at half the learning rate under "mean" (the same steps, since
  ``lr * g / 2 = (lr / 2) * g``): per-step losses within 1e-5 relative, and the logged gradient norms are the single
  process's times 1 or 1/2 at every step (within 1e-3), which is what tells the two modes apart.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from test_train import assert_losses_close, make_tiny_setup, one_thread, read_metrics, tiny_args  # noqa: F401

from iscse import train as T
from iscse.training.trainer import LOSS_STATE

REPO = Path(__file__).resolve().parents[1]


def _torchrun(argv, nproc: int = 2, timeout: float = 300.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "iscse.train", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_nodropout(tmp_path_factory):
    """The tiny model with dropout 0 (see the module docstring)."""
    return make_tiny_setup(tmp_path_factory.mktemp("tiny_nodrop"), dropout=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("mode, grad_factor", [("sum", 1.0), ("mean", 0.5)])
def test_two_processes_match_one_with_the_global_batch(tiny_nodropout, tmp_path, mode, grad_factor):
    steps, rtol, lr = 10, 1e-5, 0.05  # batch 4 x 2 ranks = 8; buffer 32 fills at step 4, so 7 steps carry L_s
    common = dict(max_steps=steps, save_steps=steps, ddp_gradient=mode, optim="sgd", max_grad_norm=1e9,
                  weight_decay=0.0, logging_steps=1)
    single = tmp_path / "single"
    # One process with the global batch, at the learning rate that makes its steps those of the 2-process run.
    assert T.main(tiny_args(tiny_nodropout, single, per_device_train_batch_size=8, learning_rate=lr * grad_factor,
                            **common)) == 0
    ddp = tmp_path / "ddp"
    _torchrun(tiny_args(tiny_nodropout, ddp, per_device_train_batch_size=4, learning_rate=lr, **common))

    one, two = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in two] == list(range(1, steps + 1))
    assert all(r["L_s"] > 0 for r in two[3:])
    assert_losses_close(two, one, rtol=rtol)
    # The gradient itself: DDP's averaged gradient is the global-batch gradient ("sum") or half of it ("mean"). The
    # fp32 sums of two ranks and of one process differ in their last bits, and ten SGD steps carry that into the
    # gradient (5e-5 relative by step 9 here); the modes differ by a factor of 2.
    for a, b in zip(two, one):
        assert a["grad_norm"] == pytest.approx(grad_factor * b["grad_norm"], rel=1e-3), (
            f"step {a['step']}: grad_norm {a['grad_norm']!r} with 2 processes vs {b['grad_norm']!r} with one "
            f"(expected x{grad_factor} under --ddp_gradient {mode})")

    # The buffer rank 0 saved (after the checksum check across ranks) is the single process's buffer.
    ckpt = {name: d / f"checkpoint-{steps}" for name, d in (("one", single), ("two", ddp))}
    state = {name: torch.load(folder / LOSS_STATE, weights_only=True) for name, folder in ckpt.items()}
    b1, b2 = (state[n]["_extra_state"]["buffer"] for n in ("one", "two"))
    assert int(b1["written"]) == int(b2["written"]) == steps * 8
    assert int(b1["ptr"]) == int(b2["ptr"]) == steps * 8 % 32
    torch.testing.assert_close(b2["storage"], b1["storage"], rtol=10 * rtol, atol=10 * rtol)
    assert (ckpt["two"] / "rng_state_1.pth").is_file() and (ckpt["two"] / "rng_state_0.pth").is_file()
