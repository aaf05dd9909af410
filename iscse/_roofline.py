"""The roofline floor of one IS-CSE step on a GPU, shared by ``python -m iscse.check`` and bench/gpu_bench.py.

A floor is ``max(bytes / copy bandwidth, FLOPs / matmul rate)``, with both rates measured on the card at hand
(:func:`measure_rates`); a measured time divided by it says how far from the hardware limit a step is. The bf16
matmul rate is used for every dtype, so the floor is a lower bound. Nothing here imports Triton or the benchmarks.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["measure_rates", "floors_ms"]


def measure_rates(time_ms: Callable[[Callable[[], object]], float], device="cuda") -> Dict[str, float]:
    """``{"copy_bytes_per_s", "bf16_flops_per_s"}`` on ``device``: the copy bandwidth of a 1 GiB fp32 tensor (read +
    write counted) and the rate of an 8192 x 8192 x 8192 bf16 matmul. ``time_ms(fn)`` returns the median time of
    ``fn()`` in milliseconds (e.g. ``triton.testing.do_bench``)."""
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() * 4 / (time_ms(lambda: y.copy_(x)) * 1e-3)
    del x, y
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rate = 2 * n ** 3 / (time_ms(lambda: a @ b) * 1e-3)
    del a, b
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bandwidth, "bf16_flops_per_s": rate}


def floors_ms(B: int, M: int, D: int, k: int, elem: int, rates: Dict[str, float]) -> Dict[str, float]:
    """Roofline floor (ms) of one step (batch ``B``, buffer ``M x D``, ``k`` neighbours, ``elem`` bytes per element)
    in each mode: ``{"forward", "backward", "fwd+bwd"}``.

    Forward reads the buffer once (the kNN's ``2 B M D`` FLOPs) and the ``k`` neighbours of each row, and forms the
    two ``B x B`` logit matrices; backward forms the InfoNCE gradients (four ``B x B x D`` products) and the
    aggregation's (``B k D``). Small terms (``B x D`` reads and writes) are counted as bytes."""
    bw, rate = rates["copy_bytes_per_s"], rates["bf16_flops_per_s"]
    fwd = max((M * D + B * k * D + 4 * B * D) * elem / bw, (2 * B * M * D + 4 * B * B * D) / rate)
    bwd = max((B * k * D + 6 * B * D) * elem / bw, (8 * B * B * D + 4 * B * k * D) / rate)
    return {"forward": fwd * 1e3, "backward": bwd * 1e3, "fwd+bwd": (fwd + bwd) * 1e3}
