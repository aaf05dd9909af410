"""Shared fixtures and helpers: a fresh seed per test, a relative-error assertion that shows where it fails."""
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Sequence

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this once, when it is
# first imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    """Fresh random inputs every test, reproducible from the test's name."""
    s = sum(map(ord, request.node.nodeid)) % (2**31)
    torch.manual_seed(s)
    return s


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "tensor") -> None:
    """Fail with the first mismatching indices and values when the relative error exceeds ``rtol``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if err <= rtol:
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().clamp_min(1e-300)
    bad = ((a - e).abs() / scale > rtol).nonzero()[:5]
    rows = ", ".join(f"{tuple(i.tolist())}: {a[tuple(i)].item():.12g} vs {e[tuple(i)].item():.12g}" for i in bad)
    raise AssertionError(f"{name}: relative error {err:.3g} > {rtol:g}; first mismatches {rows}")


def shared_data_dir() -> Path:
    """SentEval/corpus data: $ISCSE_DATA_ROOT, else ../shared/data beside the repo."""
    return Path(os.environ.get("ISCSE_DATA_ROOT", REPO.parent / "shared" / "data"))


def assert_triton_ops_equal(wide, dense, k: int) -> None:
    """The Triton kNN, smooth op, dual InfoNCE and fused step (forward and backward) give bit-identical results on
    ``wide = (z1, z2, storage)`` (views with large strides) and ``dense`` (the same values, contiguous): only the
    addresses the kernels read differ. Imports the backend lazily (the interpreter must be chosen first)."""
    import torch.nn.functional as F

    from iscse.backends import triton_fused as T
    from iscse.kernels.info_nce import info_nce_forward
    from iscse.kernels.knn_topk import knn_topk

    (w1, w2, wbuf), (z1, z2, rows) = wide, dense
    for got, want in ((knn_topk(w1, wbuf, k), knn_topk(z1, rows, k)),
                      (info_nce_forward(w1, w2, None, 0.05)[:4], info_nce_forward(z1, z2, None, 0.05)[:4])):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    vals, idx = knn_topk(z2, rows, k)
    assert torch.equal(T.smooth(w2, wbuf, idx, vals), T.smooth(z2, rows, idx, vals))
    results = []
    for a, b, storage in (wide, dense):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        l_cl, l_s = T.TritonBackend().iscse_loss(
            a, b, F.normalize(b, dim=1), storage, torch.arange(a.shape[0], device=a.device), 0, k=k,
            temperature=0.05, attn_temperature=2.0, smooth=True)
        (l_cl + 0.5 * l_s).backward()
        results.append((l_cl, l_s, a.grad, b.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, argv: Callable[[int, int], Sequence[str]], world: int = 2,
              timeout: float = 240.0) -> List[str]:
    """Run ``python WORKER *argv(rank, port)`` once per rank, side by side, with torch.distributed's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; one thread each); wait for all and
    fail with the tail of a failing rank's output. Returns each rank's output."""
    port = free_port()
    base = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(worker), *map(str, argv(rank, port))], cwd=REPO,
                              env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    outputs = []
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rank {rank} failed ({proc.returncode}):\n{out[-4000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs
