"""Top-k lookup over the memory buffer: ``_knn_chunk_kernel`` (+ ``_knn_merge_kernel``) and their host launchers.

What it computes: for each query row ``q_i`` (``(B, D)``), the ``k`` buffer slots (``(M, D)``) with the largest
dot product ``q_i . m_s``, the query's own slot ``self_slots[i]`` excluded, sorted by descending value.

How (docs/concepts.md: The fused path): B is often 64, so parallelism comes from M. The grid is ``(row blocks, chunks of M)``; each
program streams its chunk of buffer rows in ``BLOCK_N`` tiles, computes the ``(BLOCK_B, BLOCK_N)`` similarity tile
with ``tl.dot`` (looping over ``D`` in ``BLOCK_D`` steps), masks its self slots and out-of-range rows, and keeps a
running top-``K_PAD`` per query in a ``(BLOCK_B, K_PAD)`` register tile. Per tile, only the entries above the row's
current k-th best value are candidates, and only as many max-extraction rounds run as the busiest row needs (after
the first few tiles that is usually 0-3, not k), so the top-k upkeep stays small next to the ``tl.dot``. Each
program writes its chunk's ``K_PAD`` best ``(value, slot)`` pairs (unsorted) to ``(B, n_chunks, K_PAD)`` candidate
arrays; a second small pass (:func:`~iscse.kernels._common.merge_topk`, inside ``_knn_merge_kernel`` here and
inside the aggregation kernel of :mod:`iscse.kernels.smooth` on the fused path) extracts the global top-k from the
``n_chunks * K_PAD`` candidates of its row. The ``B x M`` similarity matrix is never written to memory.

Why repeated max extraction and not ``tl.sort``/``tl.topk``: it needs only ``tl.max(..., return_indices=True)``,
``tl.min`` and ``tl.where``, which behave the same in Triton 3.0-3.9 and in the interpreter, and with the threshold
filter it does far less work per tile than a sort of ``BLOCK_N + K_PAD`` keys.

Precision: the dot runs in the buffer's dtype (the query is cast to it, as the torch backend does). For an fp32
buffer the dot uses ``input_precision="tf32x3"`` (three TF32 tensor-core products, error about 1e-6 on a unit-norm
dot product), so neighbours whose similarities differ by more than 1e-4 are never swapped, which plain TF32 (error
up to ~1e-3) could do; "ieee" would be exact but several times slower on the CUDA cores. bf16/fp16 buffers use their
native tensor-core dot with fp32 accumulation. Returned values are recomputed exactly in fp32 from the chosen rows
(``_knn_merge_kernel``), so they do not depend on the dot precision. Under ``TRITON_INTERPRET=1`` (CPU tensors) the
dots are numpy fp32 products, and two interpreter defects of Triton 3.6-3.9 are worked around without changing the
math: its ``tl.dot`` misreads bf16 operands, so 16-bit tiles are upcast first (``UPCAST``; 16-bit products are exact
in fp32), and its fp32 -> bf16 cast truncates instead of rounding to nearest even, so a query of another dtype than
the buffer is rounded on the host there.

Supported: queries fp32/bf16/fp16, buffer fp32/bf16/fp16 (float64 is rejected by the backend), ``1 <= k <= 256``
(``K_PAD = next_power_of_2(k)``, at least 2; ``BLOCK_B`` shrinks for large k to keep the ``BLOCK_B x K_PAD`` tile
small), and at most the rows that can be neighbours (``M``, or ``M - 1`` with ``self_slots``: asked for more, the merge
would return some slot twice, so :func:`check_k` refuses it), any ``B``, ``D``, ``M`` (no divisibility requirements;
slot indices are int32, so ``M < 2**31``), ``self_slots`` int64 ``(B,)`` or None, arbitrary strides (offsets are
computed in int64, so views whose element offsets pass ``2**31`` are read correctly). Tested: under the interpreter on
small odd shapes up to k = 64 (Triton 3.9 and 3.6, tests/test_triton_interpret.py); every specialisation compiles for
sm_90 with ptxas (Triton 3.6 and 3.9, ``bench/gpu_bench.py --compile-only``); tests/test_triton_gpu.py holds the GPU
tests at real sizes, which have not run on a GPU yet. Ties between equal similarities are broken by position,
not necessarily as ``torch.topk`` breaks them. NaN inputs give unspecified neighbours.
"""
from __future__ import annotations

import functools
import numbers

import torch
import triton
import triton.language as tl

from ._common import fp32_dot_precision, k_pad, merge_block, merge_topk, num_sms, row_block_d

__all__ = ["knn_topk", "knn_topk_candidates", "knn_config", "check_k", "MAX_K"]

#: Largest k: the running top-k is a ``BLOCK_B x next_power_of_2(k)`` register tile.
MAX_K = 256
# At most this many chunks of M: bounds the candidates each merge program reads (B x chunks x K_PAD in all).
_MAX_CHUNKS = 512


@triton.jit
def _knn_chunk_kernel(
    # pointers
    Q, BUF, SELF, CAND_V, CAND_I,
    # sizes
    B, M, D, CHUNK,
    # strides
    stride_qb, stride_qd, stride_mb, stride_md, stride_cb, stride_cc,
    # meta-parameters
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    HAS_SELF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per (row block, chunk of M): the chunk's ``K_PAD`` best (value, slot) pairs per query row, unsorted."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    # Offsets into the inputs in int64 (rows, features and slots alike): their strides are the caller's, and a view
    # (a column of a (B, L, D) tensor, a transposed buffer) can put (size - 1) * stride past 2**31.
    q_rows = Q + rows.to(tl.int64)[:, None] * stride_qb
    if HAS_SELF:
        self_slot = tl.load(SELF + rows, mask=row_mask, other=-1)
    kcol = tl.arange(0, K_PAD)
    ncol = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    top_v = tl.full([BLOCK_B, K_PAD], float("-inf"), tl.float32)
    top_i = tl.zeros([BLOCK_B, K_PAD], tl.int32)
    start = pid_c * CHUNK
    end = tl.minimum(start + CHUNK, M)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + ncol
        col_mask = cols < end
        col_off = cols.to(tl.int64) * stride_mb
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            d64 = d.to(tl.int64)
            q = tl.load(q_rows + d64[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            m = tl.load(BUF + col_off[:, None] + d64[None, :] * stride_md,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            q = q.to(m.dtype)  # the query in the buffer's dtype, as the torch backend searches
            if UPCAST:  # the interpreter's tl.dot misreads 16-bit operands; fp32 gives the same exact products
                q = q.to(tl.float32)
                m = m.to(tl.float32)
            acc = tl.dot(q, tl.trans(m), acc, input_precision=PRECISION)
        sim = tl.where(col_mask[None, :], acc, float("-inf"))
        if HAS_SELF:
            sim = tl.where(cols[None, :] == self_slot[:, None], float("-inf"), sim)
        # Only entries above the row's current K_PAD-th best can enter; run as many extraction rounds as the
        # busiest row of the block needs (a uniform scalar branch, no divergence).
        thr = tl.min(top_v, axis=1)
        cand = tl.where(sim > thr[:, None], sim, float("-inf"))
        n_new = tl.max(tl.sum((cand > float("-inf")).to(tl.int32), axis=1), axis=0)
        for it in range(K_PAD):
            if it < n_new:
                best, arg = tl.max(cand, axis=1, return_indices=True)
                worst, slot = tl.min(top_v, axis=1, return_indices=True)
                take = kcol[None, :] == tl.where(best > worst, slot, -1)[:, None]
                top_v = tl.where(take, best[:, None], top_v)
                top_i = tl.where(take, (n0 + arg)[:, None], top_i)
                cand = tl.where(ncol[None, :] == arg[:, None], float("-inf"), cand)
    out = rows.to(tl.int64)[:, None] * stride_cb + pid_c * stride_cc + kcol[None, :]
    tl.store(CAND_V + out, top_v, mask=row_mask[:, None])
    tl.store(CAND_I + out, top_i, mask=row_mask[:, None])


@triton.jit
def _knn_merge_kernel(
    # pointers
    Q, BUF, CAND_V, CAND_I, VALS, IDX,
    # sizes
    D, N_CAND,
    # strides
    stride_qb, stride_qd, stride_mb, stride_md, stride_cb, stride_vb, stride_ib,
    # meta-parameters
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
):
    """One program per query: merge its candidates, write sorted slots and their exact fp32 dot products."""
    row = tl.program_id(0).to(tl.int64)  # offsets in int64, as in the chunk kernel
    _, idx = merge_topk(CAND_V, CAND_I, row * stride_cb, N_CAND, K, K_PAD, BLOCK_C, SINGLE)
    kk = tl.arange(0, K_PAD)
    k_mask = kk < K
    offs_d = tl.arange(0, BLOCK_D)
    dots = tl.zeros([K_PAD], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        d64 = d.to(tl.int64)
        q = tl.load(Q + row * stride_qb + d64 * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
        nb = tl.load(BUF + idx[:, None] * stride_mb + d64[None, :] * stride_md,
                     mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        dots += tl.sum(nb * q[None, :], axis=1)
    tl.store(VALS + row * stride_vb + kk, dots, mask=k_mask)
    tl.store(IDX + row * stride_ib + kk, idx, mask=k_mask)


def knn_config(batch: int, size: int, dim: int, k: int, device: torch.device, *,
               dtype: torch.dtype = torch.float32, **overrides) -> dict:
    """Tile sizes and chunking for ``_knn_chunk_kernel`` (a dict; keys may be overridden by keyword, and
    ``PRECISION`` may be added to change the fp32 dot's ``input_precision``, e.g. for benchmarks).

    On CUDA: enough ``(row block, chunk)`` programs to fill the GPU about four times over, chunks a multiple of
    ``BLOCK_N``; ``dtype`` (the buffer's) picks the feature step. On CPU tensors (the interpreter) the tiles are
    large, so few Python-level iterations run. Without overrides the result is cached per shape (launch overhead
    matters at the paper's small sizes); a copy is returned. The cache key holds everything the result depends on
    (the device's SM count and the module's limits included, not the device object), so changing a limit or the
    current device never returns a stale entry.
    """
    overrides = {k_: v for k_, v in overrides.items() if v is not None}
    sms = num_sms(device) if device.type != "cpu" else 0
    if not overrides:
        return dict(_knn_config_cached(batch, size, dim, k, device.type, sms, dtype, _MAX_CHUNKS))
    return _knn_config(batch, size, dim, k, device.type, sms, dtype, _MAX_CHUNKS, overrides)


@functools.lru_cache(maxsize=256)
def _knn_config_cached(batch, size, dim, k, device_type, sms, dtype, max_chunks):
    return _knn_config(batch, size, dim, k, device_type, sms, dtype, max_chunks, {})


def _knn_config(batch: int, size: int, dim: int, k: int, device_type: str, sms: int, dtype: torch.dtype,
                max_chunks: int, overrides: dict) -> dict:
    if device_type == "cpu":
        cfg = dict(BLOCK_B=max(16, min(64, triton.next_power_of_2(batch))), BLOCK_N=64,
                   BLOCK_D=max(16, min(128, triton.next_power_of_2(dim))), num_warps=4, num_stages=1, chunk=None)
    else:
        # wgmma tiles on Hopper need 64 rows; tiny batches use 16-row mma.sync tiles. Small buffers use narrower
        # tiles so that more (row block, chunk) programs exist (latency), large ones wider tiles (throughput).
        # Register use checked with ptxas for sm_90 (bench/gpu_bench.py --compile-only, Triton 3.6 and 3.9): an fp32
        # buffer steps D by 32, not 64, because tf32x3 keeps each fp32 operand as two TF32 halves: with 64, Triton
        # 3.6 spilled at the paper's shape (64 x 1024 x 768, 8-24 bytes) and at 512 x 65536 x 1024 (216-240 bytes,
        # 8 warps); with 32 neither version spills there (192-252 registers). 16-bit buffers keep 64 (123-152
        # registers at the benchmark shapes, no spills). Off them, k >= 64 spills 8 bytes in some specialisations.
        block_b = 16 if batch <= 16 else 64
        wide = size > 16384 and block_b == 64
        cfg = dict(BLOCK_B=block_b, BLOCK_N=128 if wide else 64, BLOCK_D=32 if dtype == torch.float32 else 64,
                   num_warps=8 if wide else 4, num_stages=3, chunk=None)
    # The running top-k tile (BLOCK_B x K_PAD, values and slots) lives in registers: keep it at most 2048 entries
    # (with 4096, ptxas for sm_90 spilled 160-184 bytes at k = 64 with an fp32 buffer and 8-16 bytes at k = 128;
    # bench/gpu_bench.py --compile-only).
    while cfg["BLOCK_B"] * k_pad(k) > 2048 and cfg["BLOCK_B"] > 16:
        cfg["BLOCK_B"] //= 2
    cfg.update(overrides)
    if cfg["chunk"] is None:
        row_blocks = triton.cdiv(batch, cfg["BLOCK_B"])
        tiles = triton.cdiv(size, cfg["BLOCK_N"])
        if device_type == "cpu":
            target = 2  # exercise the merge, keep the interpreter's program count small
        else:
            target = max(1, 4 * sms // row_blocks)
        chunks = max(1, min(target, tiles, max_chunks))
        cfg["chunk"] = triton.cdiv(tiles, chunks) * cfg["BLOCK_N"]
    else:
        cfg["chunk"] = triton.cdiv(cfg["chunk"], cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return cfg


def check_k(k: int, size: int, has_self: bool) -> None:
    """``ValueError`` unless ``1 <= k <= MAX_K`` and ``k`` is at most the rows that can be neighbours: ``size``, less
    one when each query's own slot is excluded. (Asked for more, the merge would fill the missing places with
    ``-inf`` candidates, whose slot is 0, and return a slot twice.)"""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    candidates = size - 1 if has_self else size
    if k > candidates:
        own = ", each query's own slot excluded" if has_self else ""
        raise ValueError(f"k={k} is larger than the {candidates} buffer rows that can be neighbours (M={size}{own}); "
                         f"use k <= {candidates} or a larger buffer")


def knn_topk_candidates(q: torch.Tensor, storage: torch.Tensor, k: int, self_slots, **overrides):
    """Launch ``_knn_chunk_kernel``: per-chunk top-``K_PAD`` candidates for each query.

    ``q`` ``(B, D)`` and ``storage`` ``(M, D)`` on one device (fp32/bf16/fp16), ``self_slots`` int64 ``(B,)`` or
    None; ``k`` as :func:`check_k` allows (``ValueError`` otherwise). Returns ``(cand_v, cand_i)``: fp32 and int32
    ``(B, n_chunks, K_PAD)``, unsorted within a chunk, ``-inf`` where a chunk has fewer than ``K_PAD`` eligible
    rows. ``overrides``: tile sizes (see :func:`knn_config`).
    """
    batch, dim = q.shape
    size = storage.shape[0]
    check_k(k, size, self_slots is not None)
    kp = k_pad(k)
    cfg = knn_config(batch, size, dim, k, q.device, dtype=storage.dtype, **overrides)
    if q.device.type == "cpu" and q.dtype != storage.dtype:
        # The interpreter truncates fp32 -> bf16 casts (compiled Triton rounds to nearest even, like torch), so
        # round the query on the host there; on CUDA the kernel casts each tile itself.
        q = q.to(storage.dtype)
    n_chunks = triton.cdiv(size, cfg["chunk"])
    cand_v = torch.empty(batch, n_chunks, kp, device=q.device, dtype=torch.float32)
    cand_i = torch.empty(batch, n_chunks, kp, device=q.device, dtype=torch.int32)
    has_self = self_slots is not None
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]), n_chunks)
    _knn_chunk_kernel[grid](
        q, storage, self_slots if has_self else q, cand_v, cand_i,
        batch, size, dim, cfg["chunk"],
        q.stride(0), q.stride(1), storage.stride(0), storage.stride(1), cand_v.stride(0), cand_v.stride(1),
        BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], K_PAD=kp, HAS_SELF=has_self,
        PRECISION=cfg.get("PRECISION", fp32_dot_precision()), UPCAST=q.device.type == "cpu", num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return cand_v, cand_i


def knn_topk(q: torch.Tensor, storage: torch.Tensor, k: int, self_slots=None, **overrides):
    """Top-``k`` buffer slots by dot product for each query (two launches: chunk kernel, merge kernel).

    ``q`` ``(B, D)``, ``storage`` ``(M, D)`` (fp32/bf16/fp16, one device), ``self_slots`` int64 ``(B,)`` slots to
    exclude or None, ``1 <= k <= 256`` and at most the rows that can be neighbours (``M``, or ``M - 1`` with
    ``self_slots``; :func:`check_k` raises ``ValueError`` otherwise). Returns ``(vals, idx)``: fp32 exact dot products
    (``q`` and the rows upcast to fp32) and int64 slots, each ``(B, k)``, sorted by descending similarity. Nothing is
    differentiable. ``overrides``: tile sizes of the chunk kernel (:func:`knn_config`) and ``BLOCK_C`` of the merge.
    """
    batch, dim = q.shape
    block_c = overrides.pop("BLOCK_C", None)
    cand_v, cand_i = knn_topk_candidates(q, storage, k, self_slots, **overrides)
    kp = cand_v.shape[2]
    n_cand = cand_v.shape[1] * kp
    vals = torch.empty(batch, k, device=q.device, dtype=torch.float32)
    idx = torch.empty(batch, k, device=q.device, dtype=torch.int64)
    block_c = block_c or merge_block(n_cand, q.device)
    _knn_merge_kernel[(batch,)](
        q, storage, cand_v, cand_i, vals, idx,
        dim, n_cand,
        q.stride(0), q.stride(1), storage.stride(0), storage.stride(1), cand_v.stride(0), vals.stride(0),
        idx.stride(0),
        K=k, K_PAD=kp, BLOCK_C=block_c, BLOCK_D=row_block_d(dim, q.device, k), SINGLE=n_cand <= block_c,
        num_warps=4,
    )
    return vals, idx
