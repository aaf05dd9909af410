"""Helpers shared by the op modules of :mod:`iscse.kernels` (no kernel of an op lives here).

Host side: :func:`k_pad` (width of a top-k register tile), :func:`fp32_dot_precision` (``input_precision`` of the
fp32 ``tl.dot``), :func:`merge_block` (``BLOCK_C`` of :func:`merge_topk`), :func:`row_block_d` (the feature step of
the one-program-per-row kernels) and :func:`num_sms` (the device's SM count, for grid sizing). Device side:
:func:`merge_topk`, the global top-k of one row's per-chunk kNN candidates, used by the kNN's merge kernel
(:mod:`iscse.kernels.knn_topk`) and inside the aggregation kernel (:mod:`iscse.kernels.smooth`) on the fused path.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["k_pad", "fp32_dot_precision", "merge_block", "row_block_d", "num_sms", "merge_topk"]


def k_pad(k: int) -> int:
    """Padded width of a top-k register tile: the next power of two >= ``k``, at least 2."""
    return max(2, triton.next_power_of_2(k))


def fp32_dot_precision() -> str:
    """``input_precision`` used for fp32 x fp32 ``tl.dot`` in these kernels (three TF32 products; see
    :mod:`iscse.kernels.knn_topk` for why)."""
    return "tf32x3"


def merge_block(n_cand: int, device: torch.device) -> int:
    """``BLOCK_C`` for :func:`merge_topk`: candidates read per step (power of two, at most 1024 on CUDA)."""
    return max(16, min(1024 if device.type != "cpu" else 4096, triton.next_power_of_2(n_cand)))


#: Most elements of the ``K_PAD x BLOCK_D`` neighbour tile of the one-program-per-row kernels on CUDA (32 fp32
#: registers per thread at 4 warps): at k = 128 and 256 a 64-wide step made the gradients kernel spill 216-256 and
#: 1,040-1,056 bytes per thread under its 128-register cap, and the smooth forward spill at k = 256
#: (``bench/gpu_bench.py --compile-only``).
ROW_TILE = 4096


def row_block_d(dim: int, device: torch.device, k: int = 1) -> int:
    """Feature step ``BLOCK_D`` of the kernels that run one program per row (kNN merge, smooth, fused-loss
    backward), whose neighbour rows are a ``k_pad(k) x BLOCK_D`` tile: a power of two in ``[16, 64]`` on CUDA,
    narrower as ``k`` grows (at most :data:`ROW_TILE` elements: 64 up to k = 64, 32 at k = 128, 16 at k = 256),
    up to 128 on CPU tensors (fewer interpreter iterations)."""
    if device.type == "cpu":
        return max(16, min(128, triton.next_power_of_2(dim)))
    return max(16, min(64, ROW_TILE // k_pad(k), triton.next_power_of_2(dim)))


#: SM count assumed for a non-CUDA device (``meta`` tensors in the compile and memory checks): an H100 SXM's.
ASSUMED_SMS = 132


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (:data:`ASSUMED_SMS` for a non-CUDA device, e.g. ``meta``)."""
    if device.type != "cuda":
        return ASSUMED_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def merge_topk(CAND_V, CAND_I, base, N_CAND, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
               SINGLE: tl.constexpr):
    """Device helper: the ``K`` largest of one row's ``N_CAND`` candidates, sorted descending.

    ``CAND_V`` (fp32) / ``CAND_I`` (int) hold the row's candidates contiguously from offset ``base``. When they fit
    in one ``BLOCK_C`` block (``SINGLE``, decided by the host: ``N_CAND <= BLOCK_C``), ``K`` max-extraction rounds
    over that block sort them directly; otherwise the blocks are first folded into a running top-``K_PAD`` (the
    kNN chunk kernel's threshold + extraction scheme), which the ``K`` rounds then sort. Returns ``(vals, slots)``,
    fp32 / int64 ``(K_PAD,)``; entries ``>= K`` are ``-inf`` / 0.
    """
    kk = tl.arange(0, K_PAD)
    offs = tl.arange(0, BLOCK_C)
    if SINGLE:
        c_mask = offs < N_CAND
        run_v = tl.load(CAND_V + base + offs, mask=c_mask, other=float("-inf"))
        run_i = tl.load(CAND_I + base + offs, mask=c_mask, other=0).to(tl.int64)
        pos = offs
    else:
        run_v = tl.full([K_PAD], float("-inf"), tl.float32)
        run_i = tl.zeros([K_PAD], tl.int64)
        pos = kk
        for c0 in range(0, N_CAND, BLOCK_C):
            c_mask = c0 + offs < N_CAND
            cv = tl.load(CAND_V + base + c0 + offs, mask=c_mask, other=float("-inf"))
            ci = tl.load(CAND_I + base + c0 + offs, mask=c_mask, other=0).to(tl.int64)
            cv = tl.where(cv > tl.min(run_v, axis=0), cv, float("-inf"))
            n_new = tl.sum((cv > float("-inf")).to(tl.int32), axis=0)
            for it in range(K_PAD):
                if it < n_new:
                    best, arg = tl.max(cv, axis=0, return_indices=True)
                    worst, slot = tl.min(run_v, axis=0, return_indices=True)
                    take = kk == tl.where(best > worst, slot, -1)
                    sel = offs == arg
                    run_v = tl.where(take, best, run_v)
                    run_i = tl.where(take, tl.sum(tl.where(sel, ci, 0), axis=0), run_i)
                    cv = tl.where(sel, float("-inf"), cv)
    out_v = tl.full([K_PAD], float("-inf"), tl.float32)
    out_i = tl.zeros([K_PAD], tl.int64)
    for j in range(K):
        best, arg = tl.max(run_v, axis=0, return_indices=True)
        sel = pos == arg
        out_v = tl.where(kk == j, best, out_v)
        out_i = tl.where(kk == j, tl.sum(tl.where(sel, run_i, 0), axis=0), out_i)
        run_v = tl.where(sel, float("-inf"), run_v)
    return out_v, out_i
