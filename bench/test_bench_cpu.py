"""Reference, torch, FAISS-kNN and "auto" on the CPU (pytest-benchmark): one IS-CSE step, forward and
forward+backward. "auto" runs its one-time kNN probe in the untimed warm-up round.

Run: ``pytest bench/test_bench_cpu.py --benchmark-only``. Each row records the peak extra memory of one step
(``extra_info['peak_extra_mib']``, measured in a fresh process: see benchlib.py) and the machine it ran on.
"""
import pytest
import torch

from benchlib import environment, step_fn, step_peak_mib

SHAPES = [(64, 1024, 768, 16), (64, 65536, 768, 16)]  # (B, M, D, k)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["reference", "torch", "faiss", "auto"])
@pytest.mark.parametrize("B,M,D,k", SHAPES, ids=[f"B{b}-M{m}-D{d}-k{k}" for b, m, d, k in SHAPES])
def test_step(benchmark, impl, mode, B, M, D, k):
    if impl == "faiss":
        pytest.importorskip("faiss")
    torch.manual_seed(0)
    step = step_fn(impl, B, M, D, k, backward=mode != "forward")
    peak = step_peak_mib(impl, B, M, D, k, mode)  # in a fresh process: see benchlib.py
    benchmark.group = f"B={B} M={M} D={D} k={k} {mode}"
    benchmark.extra_info.update({
        "impl": impl, "mode": mode, "B": B, "M": M, "D": D, "k": k,
        "peak_extra_mib": peak, **environment(()),
    })
    benchmark.pedantic(step, rounds=7 if M > 10000 else 30, warmup_rounds=1, iterations=1)
