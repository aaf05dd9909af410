"""Reference vs torch backend on the CPU (pytest-benchmark): one IS-CSE step, forward and forward+backward.

Run: ``pytest bench/test_bench_cpu.py --benchmark-only``. Each row records the peak extra memory of one step
(``extra_info['peak_extra_mib']``, measured in a fresh process: see cpu_memory.py) and the machine it ran on.
"""
import datetime
import os
import platform

import pytest
import torch
import torch.nn.functional as F

import iscse
from iscse import reference as R

from cpu_memory import step_peak_mib

SHAPES = [(64, 1024, 768, 16), (64, 65536, 768, 16)]  # (B, M, D, k)


def _full_rows(M, D):
    return F.normalize(torch.randn(M, D), dim=1)


def step_fn(impl, B, M, D, k, backward):
    z1 = torch.randn(B, D, requires_grad=True)
    z2 = torch.randn(B, D, requires_grad=True)
    if impl == "reference":
        lbuf = _full_rows(M, D)

        def loss():
            return R.iscse_step(z1, z2, lbuf, k=k).loss
    else:
        buf = iscse.MemoryBuffer(M, D)
        buf.storage.copy_(_full_rows(M, D))
        buf.written = M

        def loss():
            return iscse.iscse_loss(z1, z2, buf, k=k, backend=impl)

    if not backward:
        def step():
            with torch.enable_grad():
                return loss()
        return step

    def step():
        return torch.autograd.grad(loss(), (z1, z2))
    return step


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("B,M,D,k", SHAPES, ids=[f"B{b}-M{m}-D{d}-k{k}" for b, m, d, k in SHAPES])
def test_step(benchmark, impl, mode, B, M, D, k):
    torch.manual_seed(0)
    step = step_fn(impl, B, M, D, k, backward=mode != "forward")
    peak = step_peak_mib(impl, B, M, D, k, mode)  # in a fresh process: see cpu_memory.py
    benchmark.group = f"B={B} M={M} D={D} k={k} {mode}"
    benchmark.extra_info.update({
        "impl": impl, "mode": mode, "B": B, "M": M, "D": D, "k": k,
        "peak_extra_mib": peak,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "cores": os.cpu_count(),
    })
    benchmark.pedantic(step, rounds=7 if M > 10000 else 30, warmup_rounds=1, iterations=1)
