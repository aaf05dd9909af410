"""Dual InfoNCE: ``_info_nce_rows_kernel``, ``_info_nce_cols_kernel``, ``_info_nce_grads_kernel`` and launchers.

What it computes, for ``x = z1``, ``y = z2`` and (optionally) ``z = z*``, all ``(B, D)``:
``L_cl = mean_i CE(cos(x_i, y_.) / tau, target i)`` and ``L_s = mean_i CE(cos(x_i, z_.) / tau, target i)``, plus,
because the losses are terminal, their input gradients ``dL_cl/dx, dL_cl/dy, dL_s/dx, dL_s/dz`` (fp32, row
normalisation included), which the backward only has to scale by ``grad_output`` (docs/concepts.md: The fused path, and
Liger-Kernel's "gradient in the forward pass").

The math: with ``P = softmax(S)`` row-wise, ``S_ij = cos_ij / tau`` and ``c = 1 / (tau B)``,
``dL/dx_i = c/|x_i| (u_i - y^_i - x^_i (s_i - cos_ii))`` with ``u_i = sum_j P_ij y^_j``, ``s_i = sum_j P_ij cos_ij``,
and symmetrically ``dL/dy_j = c/|y_j| (v_j - x^_j - y^_j (t_j - cos_jj))`` with ``v_j = sum_i P_ij x^_i``,
``t_j = sum_i P_ij cos_ij`` (the projection terms are the backward of ``x / |x|``; ``x^ . u`` and ``y^ . v`` come
out of the softmax loops as ``s`` and ``t``, so no extra pass over ``D`` is needed for them).

Grid and launches (three, in this order; no atomics, no host synchronisation):

1. ``_info_nce_rows_kernel``, grid ``(cdiv(B, ROWS_M), ROW_SPLITS)``: program ``(r, s)`` takes row block ``r``
   and split ``s`` of the ``T = cdiv(B, ROWS_N)`` column tiles (tiles ``[T s / S, T (s + 1) / S)``: every split
   gets one or more, and ``S`` need not divide ``T``). Per tile it computes the ``(ROWS_M, ROWS_N)`` cosine tile
   with ``tl.dot`` over ``D`` (norms in the same loop), updates an online log-sum-exp (Milakov & Gimelshein 2018)
   -- row max ``m``, sum ``l`` and weighted sum ``s`` -- and the rescaled row accumulator ``u`` (``ROWS_M x D``,
   fp32, read-modify-write in global memory: it does not fit in registers). Per split it writes ``m, l, s`` (and
   ``cos_ii``, ``1/|y_i|``, ``1/|z_i|``, which only the split holding the diagonal makes non-zero, and
   ``1/|x_i|``) to an ``(S, 11, B)`` array, and its partial ``u``: split 0 straight into the output gradient
   buffer, split ``s > 0`` into slot ``s - 1`` of an ``(S - 1, B, D)`` partial buffer.
2. ``_info_nce_cols_kernel``, grid ``(cdiv(B, COLS_N), COL_SPLITS)``: program ``(c, s)`` takes column block ``c``
   and split ``s`` of the row tiles. Per tile it merges the row statistics of the tile's rows in split order,
   ``lse_i = M_i + log(sum_s l_is exp(m_is - M_i))`` with ``M_i = max_s m_is``, recomputes the cosine tile and
   accumulates ``v`` and ``t`` from the exact ``P`` (no rescaling). Partial ``v`` goes to the output buffer
   (split 0) or an ``(S - 1, B, D)`` partial buffer, partial ``t`` to ``(S, 2, B)``. Program ``(0, 0)`` also sums
   the per-row losses ``lse_i - cos_ii / tau`` in row order (the row pass has finished: every split's statistics
   are there), so the losses exist after these two launches (:func:`info_nce_passes`).
3. ``_info_nce_grads_kernel``, one program per row ``i`` (:func:`info_nce_grads`): per ``BLOCK_D`` slice it forms
   ``u_i = sum_s exp(m_is - M_i) u_is`` and ``v_i = sum_s v_is`` (splits in the order 0, 1, ...) and the four
   gradients. Either in place over the split-0 accumulators, unscaled (the standalone op, and the fused loss when
   it makes its gradients in forward), or, scaled by the upstream gradients read from device memory, into new
   gradient tensors, reading its inputs only (the fused loss's backward, when it held the passes' results). On
   the fused path it also runs the smooth and ``normalize`` backward of ``L_s`` (``z`` is then ``z*``, and the
   gradient goes on to ``y = z2``), with the aggregation's ``@triton.jit`` helpers
   (:func:`~iscse.kernels.smooth.smooth_logit_grads`, :func:`~iscse.kernels.smooth.smooth_grad_q`) on the
   neighbour rows, held or read from the buffer (module :mod:`iscse.kernels.iscse_loss`). Both losses go through
   one code path (:func:`_merged_u`, :func:`_merged_v`, :func:`_loss_row`).
Every reduction runs in a fixed order, so results are bit-identical run to run. No ``B x B`` matrix exists at any
time. Within a program the accumulators in global memory are read back by other threads of it (load and store
layouts differ), so a ``tl.debug_barrier()`` (CTA barrier) separates each tile's stores from the next tile's loads;
in the gradients kernel's in-place mode one separates each slice's loads from its stores.

Split count (run time, :func:`info_nce_config`): about two programs per SM of the device
(``2 x multi_processor_count``) with 16-row (16-column) blocks, i.e. ``S = 2 SMs / cdiv(B, 16)`` rounded to the
nearest integer (not up: at B = 1024 that is 4 splits, not 5, and 25% less partial memory), at least 1, at most
the number of tiles, at most 16, and at most what keeps the partial accumulators of one pass within 32 MiB
(``(S - 1) B D x 4 bytes x`` one or two losses). The split tile (``ROWS_N`` / ``COLS_M``) is 32 when that still
gives ``S`` tiles, else 16. On a 132-SM H100 with both losses: B = 64, D = 768 (the paper): 4 blocks x 4 splits
(one 16-wide tile each) = 16 programs per pass (4 before the split design); B = 512, D = 1024:
32 x 8 = 256 programs per pass (16 tiles of 32, two per split); B = 1024, D = 768: 64 x 4 =
256 per pass (eight tiles of 32 per split). 256 programs of at most 168 registers (three 4-warp programs per SM)
are all resident at once.

Costs: three launches (two before the split design); on the fused IS-CSE step the third is its backward launch
or runs in its forward (:mod:`iscse.kernels.iscse_loss`). Extra memory: ``(ROW_SPLITS - 1 + COL_SPLITS - 1) B D``
fp32 per loss plus ``(11 ROW_SPLITS + 2 COL_SPLITS) B`` fp32 statistics, at most 2 x 32 MiB: 2.25 MiB at
(64, 768), 56 MiB at (512, 1024), 36 MiB at (1024, 768), 45 MiB at (256, 768); none with one split
(``bench/gpu_bench.py --memory`` counts the whole step's). Traffic: each partial is written once and read once
(``v`` of ``L_s`` twice with the smooth backward), no more than the read-modify-write of ``u`` / ``v`` per tile
that the single-program-per-block design already did. FLOPs as before: the cosine tiles are computed twice
(once per pass).

Precision: tiles are loaded in the input dtype and upcast to fp32; every ``tl.dot`` is fp32 x fp32 with
``input_precision="tf32x3"`` (three TF32 products, about fp32 accuracy: the loss and gradients stay within ~1e-5
relative of an fp32 computation; plain TF32 would cost ~1e-3 on the gradients). Exact under ``TRITON_INTERPRET=1``.

Registers (sm_90, ``bench/gpu_bench.py --compile-only``, Triton 3.6 and 3.9): left alone, ptxas holds these
kernels at 96 or 128 registers (for occupancy) and spills 8-40 bytes of stack in some specialisations, differently
per version; with 64-wide tiles the rows kernel reached 255 registers and spilled under both. So passes 1 and 2
are built with ``maxnreg=168`` (three 4-warp programs per SM) and the gradients kernel with ``maxnreg=128``
(Triton 3.6 held it at 64 and spilled), tiles are at most 32 wide, and the feature step and pipelining depth are
chosen per input dtype from a sweep (step 16 / 32, 1-3 stages, no cap / 168) as the deepest pipelining with no
spill at the benchmark shapes under both versions: fp32 inputs step 16 with three stages, 16-bit inputs step 32
with one. At the benchmark shapes no specialisation spills under Triton 3.9 (``bench/gpu_bench.py --compile-only``,
2 Dec 2026; the row statistics are merged by one helper, :func:`_row_stats`, starting from split 0). Off them, the row pass with 16-bit inputs and both losses spills 80 bytes at
(B, D) = (33, 13), as before, and with fp32 inputs 8.

Supported: x, y fp32/bf16/fp16 and z fp32, any ``B >= 1`` and ``D >= 1`` (masks everywhere), arbitrary strides
(offsets into the inputs in int64: a view such as ``h[:, 0]`` of a large ``(B, L, D)`` tensor passes ``2**31``).
Tested under the interpreter (Triton 3.9 and 3.6, tests/test_triton_interpret.py: splits > 1, split counts that do
not divide the tiles, bit-identical reruns) and compiled for sm_90 with ptxas; the GPU tests
(tests/test_triton_gpu.py) have not run on a GPU yet, so no timing of this design exists.
Degenerate rows (norm below 1e-12) use the clamped norm, like ``F.normalize``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import fp32_dot_precision, k_pad, num_sms, row_block_d
from .smooth import smooth_grad_q, smooth_logit_grads

__all__ = ["info_nce_forward", "info_nce_passes", "info_nce_grads", "info_nce_config", "partial_bytes", "Passes"]

_EPS = 1e-12
# Statistics the row pass writes per split, rows of its (S, _N_STATS, B) array: 0-2 m, l, s of L_cl; 3-5 m, l, s of
# L_s; 6-7 cos_ii of L_cl, L_s; 8-10 1/|y_i|, 1/|z_i|, 1/|x_i|.
_N_STATS = 11
_MAX_SPLITS = 16
# Partial accumulators of one pass may take at most this much memory (the split count shrinks to fit).
_PARTIAL_BYTES = 32 * 2**20
# Register cap of the gradients kernel on CUDA: left alone, Triton 3.6's ptxas holds it at 64 registers and spills
# 8 bytes with 16-bit inputs and the smooth backward (bench/gpu_bench.py --compile-only).
_GRADS_MAXNREG = 128


@triton.jit
def _dot_tiles(
    # pointers
    X, Y, Z,
    # the row and column indices of this tile, their masks, and the width
    rows, cols, r_mask, c_mask, D,
    # strides
    stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_Z: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of dot products ``x_rows . y_cols`` (and ``x_rows . z_cols``) streamed over
    ``D``, with the squared norms of the rows of ``x``, ``y`` and ``z`` it read; shared by both passes."""
    offs_d = tl.arange(0, BLOCK_D)
    # Offsets into the inputs in int64: their strides are the caller's (a column of a (B, L, D) tensor has row
    # stride L * D), so (B - 1) * stride may pass 2**31. The row part is a pointer per row, made once.
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xb
    y_rows = Y + cols.to(tl.int64)[:, None] * stride_yb
    z_rows = Z + cols.to(tl.int64)[:, None] * stride_zb
    dot1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dot2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    ssx = tl.zeros([BLOCK_M], tl.float32)
    ssy = tl.zeros([BLOCK_N], tl.float32)
    ssz = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        d64 = d.to(tl.int64)
        x = tl.load(x_rows + d64[None, :] * stride_xd,
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        y = tl.load(y_rows + d64[None, :] * stride_yd,
                    mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        dot1 = tl.dot(x, tl.trans(y), dot1, input_precision=PRECISION)
        ssx += tl.sum(x * x, axis=1)
        ssy += tl.sum(y * y, axis=1)
        if HAS_Z:
            z = tl.load(z_rows + d64[None, :] * stride_zd,
                        mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            dot2 = tl.dot(x, tl.trans(z), dot2, input_precision=PRECISION)
            ssz += tl.sum(z * z, axis=1)
    return dot1, dot2, ssx, ssy, ssz


@triton.jit
def _row_stats(
    PSTATS, rows, r_mask, N_SPLIT, stride_ps, stride_pk,
    K_M: tl.constexpr,
):
    """Merge the row pass's per-split online-softmax statistics ``(m, l, s)`` (at rows ``K_M``, ``K_M + 1``,
    ``K_M + 2`` of ``PSTATS``) of ``rows`` (a block of rows, or one row with a scalar mask), splits in order:
    ``(M, l, s)`` with ``M = max_s m_s``, ``l = sum_s l_s exp(m_s - M)``, ``s = sum_s s_s exp(m_s - M)``. Masked
    rows give ``(0, N_SPLIT, 0)``. The one place the splits' statistics are merged (column pass, losses, gradients
    kernel); split 0 starts the running values (one load fewer than starting from -inf)."""
    m0 = tl.load(PSTATS + K_M * stride_pk + rows, mask=r_mask, other=0.0)
    big = m0
    for sp in range(1, N_SPLIT):
        big = tl.maximum(big, tl.load(PSTATS + sp * stride_ps + K_M * stride_pk + rows, mask=r_mask, other=0.0))
    e0 = tl.exp(m0 - big)
    tot = tl.load(PSTATS + (K_M + 1) * stride_pk + rows, mask=r_mask, other=1.0) * e0
    wsum = tl.load(PSTATS + (K_M + 2) * stride_pk + rows, mask=r_mask, other=0.0) * e0
    for sp in range(1, N_SPLIT):
        base = PSTATS + sp * stride_ps + rows
        e = tl.exp(tl.load(base + K_M * stride_pk, mask=r_mask, other=0.0) - big)
        tot += tl.load(base + (K_M + 1) * stride_pk, mask=r_mask, other=1.0) * e
        wsum += tl.load(base + (K_M + 2) * stride_pk, mask=r_mask, other=0.0) * e
    return big, tot, wsum


@triton.jit
def _online_softmax(m, l, s, cos, c_mask, inv_tau):
    """One column tile of the row pass's online log-sum-exp (Milakov & Gimelshein 2018) over ``cos / tau`` per
    row, with the ``P``-weighted sum of ``cos`` beside the sum: from the running ``(m, l, s)`` (``(BLOCK_M,)``) and
    the tile ``cos`` (``(BLOCK_M, BLOCK_N)``, columns outside ``c_mask`` left out), returns the new ``(m, l, s)``,
    the factor ``alpha = exp(m_old - m_new)`` that rescales everything accumulated so far (``u`` too) and the
    tile's ``P`` up to that row factor, ``exp(cos / tau - m_new)``."""
    logit = tl.where(c_mask[None, :], cos * inv_tau, float("-inf"))
    new = tl.maximum(m, tl.max(logit, axis=1))
    alpha = tl.exp(m - new)
    p = tl.exp(logit - new[:, None])
    return new, l * alpha + tl.sum(p, axis=1), s * alpha + tl.sum(p * cos, axis=1), alpha, p


@triton.jit
def _split_sum(STATS, idx, mask, N_SPLIT, stride_s, stride_k, K: tl.constexpr):
    """``sum_s STATS[s, K, idx]`` over the splits, in order (fixed order: deterministic); ``idx`` a block of
    rows or one row (with a scalar mask)."""
    acc = tl.load(STATS + K * stride_k + idx, mask=mask, other=0.0)
    for sp in range(1, N_SPLIT):
        acc += tl.load(STATS + sp * stride_s + K * stride_k + idx, mask=mask, other=0.0)
    return acc


@triton.jit
def _info_nce_rows_kernel(
    # pointers
    X, Y, Z, GX1, GX2, UP1, UP2, PSTATS,
    # sizes
    B, D, N_TILES, N_SPLIT, inv_tau, eps,
    # strides
    stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd, stride_gb, stride_up, stride_ps, stride_pk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_Z: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Row pass, per (row block, split of the column tiles): online log-sum-exp statistics and the partial ``u``."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < B
    rows64 = rows.to(tl.int64)  # offsets in int64 (see _dot_tiles)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # This split's column tiles [T s / S, T (s + 1) / S): at least one each (the host keeps S <= T).
    t_lo = pid_s * N_TILES // N_SPLIT
    n_here = (pid_s + 1) * N_TILES // N_SPLIT - t_lo
    # Split 0 accumulates in the output gradient buffer (the gradients kernel finishes it), split s > 0 in
    # slot s - 1 of the partial buffer.
    acc1 = UP1 + (pid_s - 1).to(tl.int64) * stride_up
    acc2 = UP2 + (pid_s - 1).to(tl.int64) * stride_up
    if pid_s == 0:
        acc1 = GX1
        acc2 = GX2
    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    s1 = tl.zeros([BLOCK_M], tl.float32)
    diag1 = tl.zeros([BLOCK_M], tl.float32)
    ry_own = tl.zeros([BLOCK_M], tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    diag2 = tl.zeros([BLOCK_M], tl.float32)
    rz_own = tl.zeros([BLOCK_M], tl.float32)
    rx = tl.zeros([BLOCK_M], tl.float32)
    for it in range(0, n_here):  # (a tile counter: ``it > 0`` stays a plain bool in the interpreter)
        n0 = (t_lo + it) * BLOCK_N
        cols = n0 + offs_n
        c_mask = cols < B
        cols64 = cols.to(tl.int64)
        dot1, dot2, ssx, ssy, ssz = _dot_tiles(
            X, Y, Z, rows, cols, r_mask, c_mask, D, stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd,
            BLOCK_M, BLOCK_N, BLOCK_D, HAS_Z, PRECISION)
        rx = 1.0 / tl.maximum(tl.sqrt(ssx), eps)
        ry = 1.0 / tl.maximum(tl.sqrt(ssy), eps)
        eye = rows[:, None] == cols[None, :]
        cos1 = dot1 * rx[:, None] * ry[None, :]
        diag1 += tl.sum(tl.where(eye, cos1, 0.0), axis=1)
        ry_own += tl.sum(tl.where(eye, ry[None, :], 0.0), axis=1)
        m1, l1, s1, alpha1, p1 = _online_softmax(m1, l1, s1, cos1, c_mask, inv_tau)
        pw1 = p1 * ry[None, :]
        if HAS_Z:
            rz = 1.0 / tl.maximum(tl.sqrt(ssz), eps)
            cos2 = dot2 * rx[:, None] * rz[None, :]
            diag2 += tl.sum(tl.where(eye, cos2, 0.0), axis=1)
            rz_own += tl.sum(tl.where(eye, rz[None, :], 0.0), axis=1)
            m2, l2, s2, alpha2, p2 = _online_softmax(m2, l2, s2, cos2, c_mask, inv_tau)
            pw2 = p2 * rz[None, :]
        # u <- alpha u + P_tile @ y^_tile in this split's accumulator (rows only this program owns). Threads of this
        # program read elements that other threads of it stored in the previous tile (load and store layouts
        # differ), so a CTA barrier orders those global accesses.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            d64 = d.to(tl.int64)
            g_ptr = rows64[:, None] * stride_gb + d[None, :]
            g_mask = r_mask[:, None] & d_mask[None, :]
            y = tl.load(Y + cols64[:, None] * stride_yb + d64[None, :] * stride_yd,
                        mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            u1 = tl.load(acc1 + g_ptr, mask=g_mask & (it > 0), other=0.0)
            u1 = tl.dot(pw1, y, u1 * alpha1[:, None], input_precision=PRECISION)
            tl.store(acc1 + g_ptr, u1, mask=g_mask)
            if HAS_Z:
                z = tl.load(Z + cols64[:, None] * stride_zb + d64[None, :] * stride_zd,
                            mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                u2 = tl.load(acc2 + g_ptr, mask=g_mask & (it > 0), other=0.0)
                u2 = tl.dot(pw2, z, u2 * alpha2[:, None], input_precision=PRECISION)
                tl.store(acc2 + g_ptr, u2, mask=g_mask)
    st = PSTATS + pid_s * stride_ps + rows
    tl.store(st + 0 * stride_pk, m1, mask=r_mask)
    tl.store(st + 1 * stride_pk, l1, mask=r_mask)
    tl.store(st + 2 * stride_pk, s1, mask=r_mask)
    tl.store(st + 6 * stride_pk, diag1, mask=r_mask)
    tl.store(st + 8 * stride_pk, ry_own, mask=r_mask)
    tl.store(st + 10 * stride_pk, rx, mask=r_mask)
    if HAS_Z:
        tl.store(st + 3 * stride_pk, m2, mask=r_mask)
        tl.store(st + 4 * stride_pk, l2, mask=r_mask)
        tl.store(st + 5 * stride_pk, s2, mask=r_mask)
        tl.store(st + 7 * stride_pk, diag2, mask=r_mask)
        tl.store(st + 9 * stride_pk, rz_own, mask=r_mask)


@triton.jit
def _info_nce_cols_kernel(
    # pointers
    X, Y, Z, GY, GZ, VP1, VP2, PSTATS, CSTATS, LOSS_CL, LOSS_S,
    # sizes
    B, D, N_TILES, N_SPLIT, N_RSPLIT, inv_tau, inv_b, eps,
    # strides
    stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd, stride_gb, stride_vp, stride_ps, stride_pk,
    stride_cs, stride_ck,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_Z: tl.constexpr, PRECISION: tl.constexpr,
):
    """Column pass, per (column block, split of the row tiles): partial ``v`` and ``t`` from the exact ``P``;
    program (0, 0) also reduces the losses."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = cols < B
    cols64 = cols.to(tl.int64)  # offsets in int64 (see _dot_tiles)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t_lo = pid_s * N_TILES // N_SPLIT
    m_here = (pid_s + 1) * N_TILES // N_SPLIT - t_lo
    acc1 = VP1 + (pid_s - 1).to(tl.int64) * stride_vp
    acc2 = VP2 + (pid_s - 1).to(tl.int64) * stride_vp
    if pid_s == 0:
        acc1 = GY
        acc2 = GZ
    t1 = tl.zeros([BLOCK_N], tl.float32)
    t2 = tl.zeros([BLOCK_N], tl.float32)
    for it in range(0, m_here):
        rows = (t_lo + it) * BLOCK_M + offs_m
        r_mask = rows < B
        rows64 = rows.to(tl.int64)
        big1, sum1, _ = _row_stats(PSTATS, rows, r_mask, N_RSPLIT, stride_ps, stride_pk, 0)
        lse1 = big1 + tl.log(sum1)
        if HAS_Z:
            big2, sum2, _ = _row_stats(PSTATS, rows, r_mask, N_RSPLIT, stride_ps, stride_pk, 3)
            lse2 = big2 + tl.log(sum2)
        dot1, dot2, ssx, ssy, ssz = _dot_tiles(
            X, Y, Z, rows, cols, r_mask, c_mask, D, stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd,
            BLOCK_M, BLOCK_N, BLOCK_D, HAS_Z, PRECISION)
        rx = 1.0 / tl.maximum(tl.sqrt(ssx), eps)
        ry = 1.0 / tl.maximum(tl.sqrt(ssy), eps)
        valid = r_mask[:, None] & c_mask[None, :]
        cos1 = dot1 * rx[:, None] * ry[None, :]
        p1 = tl.where(valid, tl.exp(cos1 * inv_tau - lse1[:, None]), 0.0)
        t1 += tl.sum(p1 * cos1, axis=0)
        pw1 = p1 * rx[:, None]
        if HAS_Z:
            rz = 1.0 / tl.maximum(tl.sqrt(ssz), eps)
            cos2 = dot2 * rx[:, None] * rz[None, :]
            p2 = tl.where(valid, tl.exp(cos2 * inv_tau - lse2[:, None]), 0.0)
            t2 += tl.sum(p2 * cos2, axis=0)
            pw2 = p2 * rx[:, None]
        # v <- v + P_tile^T @ x^_tile in this split's accumulator (barrier: as in the row pass).
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            d64 = d.to(tl.int64)
            g_ptr = cols64[:, None] * stride_gb + d[None, :]
            g_mask = c_mask[:, None] & d_mask[None, :]
            x = tl.load(X + rows64[:, None] * stride_xb + d64[None, :] * stride_xd,
                        mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            v1 = tl.load(acc1 + g_ptr, mask=g_mask & (it > 0), other=0.0)
            v1 = tl.dot(tl.trans(pw1), x, v1, input_precision=PRECISION)
            tl.store(acc1 + g_ptr, v1, mask=g_mask)
            if HAS_Z:
                v2 = tl.load(acc2 + g_ptr, mask=g_mask & (it > 0), other=0.0)
                v2 = tl.dot(tl.trans(pw2), x, v2, input_precision=PRECISION)
                tl.store(acc2 + g_ptr, v2, mask=g_mask)
    tl.store(CSTATS + pid_s * stride_cs + cols, t1, mask=c_mask)
    if HAS_Z:
        tl.store(CSTATS + pid_s * stride_cs + stride_ck + cols, t2, mask=c_mask)
    if pid + pid_s == 0:
        # The mean losses, lse_i - cos_ii / tau summed in row order by one program (deterministic); the row pass
        # has finished, so every split's statistics are in PSTATS.
        offs_r = tl.arange(0, BLOCK_R)
        loss1 = tl.zeros([BLOCK_R], tl.float32)
        loss2 = tl.zeros([BLOCK_R], tl.float32)
        for r0 in range(0, B, BLOCK_R):
            r = r0 + offs_r
            rm = r < B
            bg, sm, _ = _row_stats(PSTATS, r, rm, N_RSPLIT, stride_ps, stride_pk, 0)
            dg = _split_sum(PSTATS, r, rm, N_RSPLIT, stride_ps, stride_pk, 6)
            loss1 += tl.where(rm, bg + tl.log(sm) - dg * inv_tau, 0.0)
            if HAS_Z:
                bg, sm, _ = _row_stats(PSTATS, r, rm, N_RSPLIT, stride_ps, stride_pk, 3)
                dg = _split_sum(PSTATS, r, rm, N_RSPLIT, stride_ps, stride_pk, 7)
                loss2 += tl.where(rm, bg + tl.log(sm) - dg * inv_tau, 0.0)
        tl.store(LOSS_CL, tl.sum(loss1, axis=0) * inv_b)
        tl.store(LOSS_S, tl.sum(loss2, axis=0) * inv_b)


@triton.jit
def _loss_row(PSTATS, CSTATS, row, N_RSPLIT, N_CSPLIT, stride_ps, stride_pk, stride_cs, stride_ck,
              K_M: tl.constexpr, K_DIAG: tl.constexpr, K_T: tl.constexpr):
    """One row's merged statistics of one loss (``K_M``: its ``m, l, s`` rows in PSTATS, ``K_DIAG`` its
    ``cos_ii``, ``K_T`` its ``t`` row in CSTATS): ``M = max_s m_s``, ``1 / l``, ``s / l - cos_ii`` and
    ``t_i - cos_ii``, the per-row factors of the gradient formulas (module docstring)."""
    big, tot, wsum = _row_stats(PSTATS, row, row >= 0, N_RSPLIT, stride_ps, stride_pk, K_M)
    diag = _split_sum(PSTATS, row, row >= 0, N_RSPLIT, stride_ps, stride_pk, K_DIAG)
    t = _split_sum(CSTATS, row, row >= 0, N_CSPLIT, stride_cs, stride_ck, K_T)
    inv_l = 1.0 / tot
    return big, inv_l, wsum * inv_l - diag, t - diag


@triton.jit
def _merged_u(GU, UP, PSTATS, row, off, d_mask, big, N_RSPLIT, stride_up, stride_ps, stride_pk, K_M: tl.constexpr):
    """One ``BLOCK_D`` slice of ``u_i = sum_s exp(m_is - M_i) u_is`` (split 0 in ``GU``, split ``s`` in slot
    ``s - 1`` of ``UP``), splits in order."""
    u = tl.load(GU + off, mask=d_mask, other=0.0) * tl.exp(tl.load(PSTATS + K_M * stride_pk + row) - big)
    part = UP  # (the pointer advances: no 32-bit overflow of sp * stride)
    for sp in range(1, N_RSPLIT):
        e = tl.exp(tl.load(PSTATS + sp * stride_ps + K_M * stride_pk + row) - big)
        u += tl.load(part + off, mask=d_mask, other=0.0) * e
        part += stride_up
    return u


@triton.jit
def _merged_v(GV, VP, off, d_mask, N_CSPLIT, stride_vp):
    """One ``BLOCK_D`` slice of ``v_j = sum_s v_js`` (split 0 in ``GV``, the others in ``VP``), in order."""
    v = tl.load(GV + off, mask=d_mask, other=0.0)
    part = VP
    for sp in range(1, N_CSPLIT):
        v += tl.load(part + off, mask=d_mask, other=0.0)
        part += stride_vp
    return v


@triton.jit
def _info_nce_grads_kernel(
    # pointers: the inputs, the passes' split-0 accumulators, other splits' partials and statistics
    X, Y, Z, GX1, GY, GX2, GZ, UP1, UP2, VP1, VP2, PSTATS, CSTATS,
    # upstream gradients of L_cl, L_s (read with SUM; None: 1)
    G_CL, G_S,
    # the smooth backward of L_s (None without): q2, the neighbour rows (saved (B, k, D), or the buffer through
    # IDX), the attention weights
    Q2, NB, IDX, W,
    # outputs (see the docstring)
    OUT1, OUT2, OUT3, OUT4,
    # sizes
    D, N_RSPLIT, N_CSPLIT, scale, inv_t, eps,
    # strides
    stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd, stride_gb, stride_up, stride_vp,
    stride_ps, stride_pk, stride_cs, stride_ck, stride_qb, stride_qd, stride_nbb, stride_nbk, stride_nbd,
    stride_ib, stride_wb, stride_ob,
    # meta-parameters
    WITH_CL: tl.constexpr, WITH_S: tl.constexpr, SUM: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, MEAN: tl.constexpr,
):
    """Per row ``i``: merge the splits' partial ``u_i``, ``v_i`` and finish the input gradients; with ``NB``, also
    the smooth and ``normalize`` backward of ``L_s`` w.r.t. ``y = z2`` (``Z`` is then ``z*``).

    ``SUM``: ``OUT1 = g_cl dL_cl/dx + g_s dL_s/dx``, ``OUT2 = g_cl dL_cl/dy + g_s dL_s/dz2`` (the losses without
    ``WITH_CL`` / ``WITH_S`` left out). Otherwise (factors 1): ``OUT1, OUT2 = dL_cl/dx, dL_cl/dy`` and
    ``OUT3, OUT4 = dL_s/dx, dL_s/dz2`` (``dL_s/dz`` without ``NB``), written in place over ``GX1, GY, GX2, GZ``:
    every load of a slice comes before a CTA barrier and every store after it, so no thread overwrites an element
    that another thread of the program has yet to read."""
    row = tl.program_id(0).to(tl.int64)  # offsets in int64 (see _dot_tiles)
    offs_d = tl.arange(0, BLOCK_D)
    rx = tl.load(PSTATS + 10 * stride_pk + row)  # the same in every split
    f_cl = 1.0
    f_s = 1.0
    if WITH_CL:
        ry = _split_sum(PSTATS, row, row >= 0, N_RSPLIT, stride_ps, stride_pk, 8)
        big1, inv_l1, c1, e1 = _loss_row(PSTATS, CSTATS, row, N_RSPLIT, N_CSPLIT, stride_ps, stride_pk, stride_cs,
                                         stride_ck, 0, 6, 0)
        if SUM:
            f_cl = tl.load(G_CL).to(tl.float32)
    if WITH_S:
        rz = _split_sum(PSTATS, row, row >= 0, N_RSPLIT, stride_ps, stride_pk, 9)
        big2, inv_l2, c2, e2 = _loss_row(PSTATS, CSTATS, row, N_RSPLIT, N_CSPLIT, stride_ps, stride_pk, stride_cs,
                                         stride_ck, 3, 7, 1)
        if SUM:
            f_s = tl.load(G_S).to(tl.float32)
    if NB is not None:
        # First pass over D: the dot products the smooth and normalize backward need, from g = f_s dL_s/dz*.
        kk = tl.arange(0, K_PAD)
        k_mask = kk < K
        if IDX is None:
            nb_off = row * stride_nbb + kk[:, None] * stride_nbk
        else:
            slots = tl.load(IDX + row * stride_ib + kk, mask=k_mask, other=0).to(tl.int64)
            nb_off = slots[:, None] * stride_nbk
        w0 = tl.load(W + row * stride_wb).to(tl.float32)
        w = tl.load(W + row * stride_wb + 1 + kk, mask=k_mask, other=0.0).to(tl.float32)
        gw = tl.zeros([K_PAD], tl.float32)
        gq_acc = tl.zeros([BLOCK_D], tl.float32)
        zn = tl.zeros([K_PAD], tl.float32)
        zz_acc = tl.zeros([BLOCK_D], tl.float32)
        zg_acc = tl.zeros([BLOCK_D], tl.float32)
        zq_acc = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            d64 = d.to(tl.int64)
            xh = tl.load(X + row * stride_xb + d64 * stride_xd, mask=d_mask, other=0.0).to(tl.float32) * rx
            y = tl.load(Y + row * stride_yb + d64 * stride_yd, mask=d_mask, other=0.0).to(tl.float32)
            zs = tl.load(Z + row * stride_zb + d64 * stride_zd, mask=d_mask, other=0.0).to(tl.float32)
            v2 = _merged_v(GZ, VP2, row * stride_gb + d, d_mask, N_CSPLIT, stride_vp)
            g = (f_s * scale * rz) * (v2 - xh - zs * (rz * e2))
            q = tl.load(Q2 + row * stride_qb + d64 * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
            nb = tl.load(NB + nb_off + d64[None, :] * stride_nbd, mask=k_mask[:, None] & d_mask[None, :],
                         other=0.0).to(tl.float32)
            gw += tl.sum(nb * g[None, :], axis=1)
            gq_acc += g * q
            zz_acc += y * y
            zg_acc += y * g
            zq_acc += y * q
            zn += tl.sum(nb * y[None, :], axis=1)
        gl0, gl = smooth_logit_grads(w0, w, tl.sum(gq_acc, axis=0), gw, inv_t, MEAN)
        # q2 = z2 / max(|z2|, eps): grad z2 = (gq - z2 (z2.gq) / |z2|^2) / |z2| (or gq / eps below the clamp), with
        # z2.gq assembled from the dot products of the first pass instead of another pass over D.
        r = tl.sqrt(tl.sum(zz_acc, axis=0))
        inv_r = 1.0 / tl.maximum(r, eps)
        z_gq = w0 * tl.sum(zg_acc, axis=0) + 2.0 * gl0 * tl.sum(zq_acc, axis=0) + tl.sum(gl * zn, axis=0)
        proj = tl.where(r > eps, z_gq * inv_r * inv_r * inv_r, 0.0)
        if not SUM:
            tl.debug_barrier()  # every read of GZ above before the in-place stores below
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        d64 = d.to(tl.int64)
        off = row * stride_gb + d
        xh = tl.load(X + row * stride_xb + d64 * stride_xd, mask=d_mask, other=0.0).to(tl.float32) * rx
        y = tl.load(Y + row * stride_yb + d64 * stride_yd, mask=d_mask, other=0.0).to(tl.float32)
        if WITH_CL:
            u1 = _merged_u(GX1, UP1, PSTATS, row, off, d_mask, big1, N_RSPLIT, stride_up, stride_ps, stride_pk, 0)
            v1 = _merged_v(GY, VP1, off, d_mask, N_CSPLIT, stride_vp)
            g1 = (scale * rx) * (u1 * inv_l1 - y * ry - xh * c1)
            h1 = (scale * ry) * (v1 - xh - y * (ry * e1))
        if WITH_S:
            zs = tl.load(Z + row * stride_zb + d64 * stride_zd, mask=d_mask, other=0.0).to(tl.float32)
            u2 = _merged_u(GX2, UP2, PSTATS, row, off, d_mask, big2, N_RSPLIT, stride_up, stride_ps, stride_pk, 3)
            v2 = _merged_v(GZ, VP2, off, d_mask, N_CSPLIT, stride_vp)
            g2 = (scale * rx) * (u2 * inv_l2 - zs * rz - xh * c2)
            h2 = (f_s * scale * rz) * (v2 - xh - zs * (rz * e2))
            if NB is not None:
                q = tl.load(Q2 + row * stride_qb + d64 * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
                nb = tl.load(NB + nb_off + d64[None, :] * stride_nbd, mask=k_mask[:, None] & d_mask[None, :],
                             other=0.0).to(tl.float32)
                h2 = smooth_grad_q(h2, q, nb, w0, gl0, gl) * inv_r - y * proj
        if SUM:
            out1 = tl.zeros([BLOCK_D], tl.float32)
            out2 = tl.zeros([BLOCK_D], tl.float32)
            if WITH_CL:
                out1 += f_cl * g1
                out2 += f_cl * h1
            if WITH_S:
                out1 += f_s * g2
                out2 += h2
            tl.store(OUT1 + row * stride_ob + d, out1, mask=d_mask)
            tl.store(OUT2 + row * stride_ob + d, out2, mask=d_mask)
        else:
            tl.debug_barrier()  # this slice's reads (by every thread) before its in-place stores
            if WITH_CL:
                tl.store(OUT1 + row * stride_ob + d, g1, mask=d_mask)
                tl.store(OUT2 + row * stride_ob + d, h1, mask=d_mask)
            if WITH_S:
                tl.store(OUT3 + row * stride_ob + d, g2, mask=d_mask)
                tl.store(OUT4 + row * stride_ob + d, h2, mask=d_mask)


def _per_block(target: int, blocks: int) -> int:
    """Splits per block for about ``target`` programs: ``target / blocks`` rounded to the nearest integer, at least 1
    (rounded up, 2 SMs x 132 over 64 blocks would be 5 splits, 320 programs, and 25% more partial memory than 4)."""
    return max(1, (2 * target + blocks) // (2 * blocks))


def _split_tile(batch: int, want: int, tiles=(64, 32, 16)) -> int:
    """The widest tile that still cuts ``batch`` into at least ``want`` tiles (the narrowest if none does)."""
    for tile in tiles:
        if triton.cdiv(batch, tile) >= want:
            return tile
    return tiles[-1]


def info_nce_config(batch: int, dim: int, device: torch.device, *, has_z: bool = True,
                    dtype: torch.dtype = torch.float32, **overrides) -> dict:
    """Tile sizes and split counts for the two passes (a dict; keys may be overridden by keyword, and
    ``PRECISION`` may be added to change the fp32 dots' ``input_precision``, e.g. for benchmarks).

    Keys: ``ROWS_M``/``ROWS_N`` (row pass: row block, column tile), ``COLS_M``/``COLS_N`` (column pass: row tile,
    column block), ``ROW_SPLITS``/``COL_SPLITS`` (programs per row / column block), ``BLOCK_D`` (feature step of
    both passes), ``num_warps``, ``num_stages`` and ``maxnreg``. On CUDA the blocks are 16 rows (columns) and the
    split counts come from ``batch``, ``dim``, ``has_z`` and the device's SM count (module docstring); ``dtype``
    (of ``x`` and ``y``) picks the feature step and the pipelining depth. On CPU tensors (the interpreter) the
    blocks cover up to 64 rows and two splits are used wherever there are two tiles, so the interpreter runs few
    programs but still the split/merge path. Split counts are clamped to ``[1, number of tiles]``. Without
    overrides the result is cached per shape (it is asked for twice per fused step: launch overhead matters at the
    paper's small sizes); a copy is returned. The cache key holds everything the result depends on (the device's
    SM count and the module's limits included, not the device object), so changing a limit or the current device
    never returns a stale entry.
    """
    sms = num_sms(device) if device.type != "cpu" else 0
    limits = (_MAX_SPLITS, _PARTIAL_BYTES)
    if not any(v is not None for v in overrides.values()):
        return dict(_info_nce_config_cached(batch, dim, device.type, sms, has_z, dtype, limits))
    return _info_nce_config(batch, dim, device.type, sms, has_z, dtype, limits, overrides)


@functools.lru_cache(maxsize=256)
def _info_nce_config_cached(batch, dim, device_type, sms, has_z, dtype, limits):
    return _info_nce_config(batch, dim, device_type, sms, has_z, dtype, limits, {})


def _info_nce_config(batch: int, dim: int, device_type: str, sms: int, has_z: bool, dtype: torch.dtype,
                     limits: tuple, overrides: dict) -> dict:
    max_splits, partial_max = limits
    n_acc = 2 if has_z else 1
    if device_type == "cpu":
        full = max(16, min(64, triton.next_power_of_2(batch)))
        tile = _split_tile(batch, 2)
        cfg = dict(ROWS_M=full, ROWS_N=tile, COLS_M=tile, COLS_N=full,
                   BLOCK_D=max(16, min(128, triton.next_power_of_2(dim))), num_warps=4,
                   num_stages=1, ROW_SPLITS=None, COL_SPLITS=None)
        target = 2 * triton.cdiv(batch, full)
        cap = 2
    else:
        target = 2 * sms
        cap = max(1, min(max_splits, 1 + partial_max // max(1, batch * dim * 4 * n_acc)))
        want = min(cap, _per_block(target, triton.cdiv(batch, 16)))
        tile = _split_tile(batch, want, (32, 16))
        # Registers (module docstring): at most 168 per thread (three 4-warp programs per SM), which without spills
        # needs 16-wide feature steps for fp32 inputs and no pipelining for 16-bit ones.
        fp32 = dtype == torch.float32
        cfg = dict(ROWS_M=16, ROWS_N=tile, COLS_M=tile, COLS_N=16, BLOCK_D=16 if fp32 else 32, num_warps=4,
                   num_stages=3 if fp32 else 1, maxnreg=168,
                   ROW_SPLITS=None, COL_SPLITS=None)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    for splits, block, tile_key in (("ROW_SPLITS", "ROWS_M", "ROWS_N"), ("COL_SPLITS", "COLS_N", "COLS_M")):
        tiles = triton.cdiv(batch, cfg[tile_key])
        if cfg[splits] is None:
            cfg[splits] = min(cap, _per_block(target, triton.cdiv(batch, cfg[block])))
        cfg[splits] = max(1, min(int(cfg[splits]), tiles))
    return cfg


class Passes(NamedTuple):
    """What the row and column passes (:func:`info_nce_passes`) leave for :func:`info_nce_grads`: the inputs, the
    losses, the split-0 accumulators (``gx1``, ``gy``, ``gx2``, ``gz``: fp32 ``(B, D)``, the last two None without
    ``z``), the other splits' partials (``rpart``, ``cpart``, or None with one split), the per-split statistics, the
    split counts and the loss scale ``1 / (tau B)``."""

    x: torch.Tensor
    y: torch.Tensor
    z: Optional[torch.Tensor]
    loss_cl: torch.Tensor
    loss_s: torch.Tensor
    gx1: torch.Tensor
    gy: torch.Tensor
    gx2: Optional[torch.Tensor]
    gz: Optional[torch.Tensor]
    rpart: Optional[torch.Tensor]
    cpart: Optional[torch.Tensor]
    pstats: torch.Tensor
    cstats: torch.Tensor
    n_r: int
    n_c: int
    scale: float


def partial_bytes(batch: int, dim: int, device: torch.device, *, has_z: bool = True,
                  dtype: torch.dtype = torch.float32) -> int:
    """Bytes that :func:`info_nce_passes` allocates beyond its four ``(B, D)`` accumulators: the other splits'
    partial accumulators and the statistics (what a caller holds if it keeps the passes' results)."""
    cfg = info_nce_config(batch, dim, device, has_z=has_z, dtype=dtype)
    n_acc = 2 if has_z else 1
    return 4 * batch * (n_acc * (cfg["ROW_SPLITS"] - 1 + cfg["COL_SPLITS"] - 1) * dim
                        + _N_STATS * cfg["ROW_SPLITS"] + 2 * cfg["COL_SPLITS"])


def info_nce_passes(x: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor], temperature: float,
                    **overrides) -> Passes:
    """Launch the row pass and the column pass (two launches; the column pass also writes the losses) for ``L_cl``
    (and ``L_s`` when ``z`` is given); ``overrides`` go to :func:`info_nce_config`. ``x``, ``y``: ``(B, D)``
    fp32/bf16/fp16; ``z``: ``(B, D)`` (fp32) or None. The gradients come from :func:`info_nce_grads`."""
    batch, dim = x.shape
    dev = x.device
    has_z = z is not None
    cfg = info_nce_config(batch, dim, dev, has_z=has_z, dtype=x.dtype, **overrides)
    n_r, n_c = cfg["ROW_SPLITS"], cfg["COL_SPLITS"]
    f32 = dict(device=dev, dtype=torch.float32)
    n_acc = 2 if has_z else 1
    # Split 0's accumulators, which the gradients kernel finishes (in place, or into new gradient tensors).
    gx1, gy = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
    gx2, gz = (torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)) if has_z else (gx1, gy)
    # Partial accumulators of splits 1, 2, ...: (loss, split - 1, B, D); none with one split (then never read).
    rpart = torch.empty(n_acc, n_r - 1, batch, dim, **f32) if n_r > 1 else None
    cpart = torch.empty(n_acc, n_c - 1, batch, dim, **f32) if n_c > 1 else None
    up1, up2 = (rpart[0], rpart[n_acc - 1]) if n_r > 1 else (gx1, gx2)
    vp1, vp2 = (cpart[0], cpart[n_acc - 1]) if n_c > 1 else (gy, gz)
    pstats = torch.empty(n_r, _N_STATS, batch, **f32)
    cstats = torch.empty(n_c, 2, batch, **f32)
    loss_cl, loss_s = torch.empty((), **f32), torch.empty((), **f32)
    zz = z if has_z else y
    inv_tau = 1.0 / temperature
    prec = cfg.get("PRECISION", fp32_dot_precision())
    xyz_strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1), zz.stride(0), zz.stride(1))
    stride_gb = gx1.stride(0)
    common = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        common["maxnreg"] = cfg["maxnreg"]
    row_tiles = triton.cdiv(batch, cfg["ROWS_N"])
    _info_nce_rows_kernel[(triton.cdiv(batch, cfg["ROWS_M"]), n_r)](
        x, y, zz, gx1, gx2, up1, up2, pstats,
        batch, dim, row_tiles, n_r, inv_tau, _EPS,
        *xyz_strides, stride_gb, up1.stride(0), pstats.stride(0), pstats.stride(1),
        BLOCK_M=cfg["ROWS_M"], BLOCK_N=cfg["ROWS_N"], BLOCK_D=cfg["BLOCK_D"], HAS_Z=has_z, PRECISION=prec,
        **common,
    )
    col_tiles = triton.cdiv(batch, cfg["COLS_M"])
    _info_nce_cols_kernel[(triton.cdiv(batch, cfg["COLS_N"]), n_c)](
        x, y, zz, gy, gz, vp1, vp2, pstats, cstats, loss_cl, loss_s,
        batch, dim, col_tiles, n_c, n_r, inv_tau, 1.0 / batch, _EPS,
        *xyz_strides, stride_gb, vp1.stride(0), pstats.stride(0), pstats.stride(1), cstats.stride(0),
        cstats.stride(1),
        BLOCK_M=cfg["COLS_M"], BLOCK_N=cfg["COLS_N"], BLOCK_D=cfg["BLOCK_D"],
        BLOCK_R=max(16, min(128, triton.next_power_of_2(batch))), HAS_Z=has_z, PRECISION=prec, **common,
    )
    return Passes(x, y, z, loss_cl, loss_s, gx1, gy, (gx2 if has_z else None), (gz if has_z else None), rpart,
                  cpart, pstats, cstats, n_r, n_c, 1.0 / (temperature * batch))


def info_nce_grads(p: Passes, *, g_cl: Optional[torch.Tensor] = None, g_s: Optional[torch.Tensor] = None,
                   out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, with_cl: bool = True,
                   with_s: bool = True, smooth=None, attn_temperature: float = 1.0, mean: bool = False):
    """Launch ``_info_nce_grads_kernel`` (one program per row) on the passes' results ``p``.

    ``out=None`` (in place, factors 1): returns ``(dL_cl/dx, dL_cl/dy, dL_s/dx, dL_s/dz)`` written over ``p``'s
    accumulators (the last two None without ``z``). ``out=(o1, o2)``: writes ``o1 = g_cl dL_cl/dx + g_s dL_s/dx``
    and ``o2 = g_cl dL_cl/dy + g_s dL_s/dz2`` (``g_cl``, ``g_s`` 0-dim fp32 device tensors; ``with_cl`` /
    ``with_s`` False leave that loss out) and returns them; ``p`` is only read, so this may run again.
    ``smooth = (q2, rows, idx, w)``: the gradient of ``L_s`` goes on through the aggregation and ``normalize`` to
    ``y = z2`` (``z`` is ``z*``): ``rows`` the saved ``(B, k, D)`` neighbour rows with ``idx`` None, or the buffer
    with ``idx`` the ``(B, k)`` slots; ``w`` the ``(B, k + 1)`` weights. Returns the outputs."""
    batch, dim = p.x.shape
    with_s = with_s and p.z is not None
    if out is None:
        outs = (p.gx1, p.gy, p.gx2, p.gz)
    else:
        outs = (out[0], out[1], None, None)
    n_acc = 2 if p.z is not None else 1
    up1, up2 = (p.rpart[0], p.rpart[n_acc - 1]) if p.rpart is not None else (p.gx1, p.gx2)
    vp1, vp2 = (p.cpart[0], p.cpart[n_acc - 1]) if p.cpart is not None else (p.gy, p.gz)
    zz = p.z if p.z is not None else p.y
    if smooth is not None and with_s:
        q2, rows, idx, w = smooth
        k = w.shape[1] - 1
        if idx is None:
            nb_strides = (rows.stride(0), rows.stride(1), rows.stride(2), 0)
        else:
            nb_strides = (0, rows.stride(0), rows.stride(1), idx.stride(0))
        sm_strides = (q2.stride(0), q2.stride(1), *nb_strides, w.stride(0))
    else:
        q2 = rows = idx = w = None
        k = 1
        sm_strides = (0,) * 7
    _info_nce_grads_kernel[(batch,)](
        p.x, p.y, zz, p.gx1, p.gy, p.gx2, p.gz, up1, up2, vp1, vp2, p.pstats, p.cstats,
        g_cl if out is not None and with_cl else None, g_s if out is not None and with_s else None,
        q2, rows, idx, w, *outs,
        dim, p.n_r, p.n_c, p.scale, 1.0 / attn_temperature, _EPS,
        p.x.stride(0), p.x.stride(1), p.y.stride(0), p.y.stride(1), zz.stride(0), zz.stride(1), p.gx1.stride(0),
        up1.stride(0), vp1.stride(0), p.pstats.stride(0), p.pstats.stride(1), p.cstats.stride(0),
        p.cstats.stride(1), *sm_strides, outs[0].stride(0),
        WITH_CL=with_cl, WITH_S=with_s, SUM=out is not None, K=k, K_PAD=k_pad(k),
        BLOCK_D=row_block_d(dim, p.x.device, k), MEAN=bool(mean) and smooth is not None, num_warps=4,
        **({} if p.x.device.type == "cpu" else {"maxnreg": _GRADS_MAXNREG}),
    )
    return outs if out is None else out


def info_nce_forward(x: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor], temperature: float,
                     **overrides):
    """The two passes and the gradients kernel (three launches) for ``L_cl`` (and ``L_s`` when ``z`` is given);
    ``overrides`` go to :func:`info_nce_config`.

    ``x``, ``y``: ``(B, D)`` fp32/bf16/fp16; ``z``: ``(B, D)`` (fp32) or None. Returns
    ``(loss_cl, loss_s, gx1, gy, gx2, gz)``: 0-dim fp32 losses (``loss_s`` is 0 without ``z``) and fp32 ``(B, D)``
    gradients of ``L_cl`` w.r.t. ``x``, ``y`` and of ``L_s`` w.r.t. ``x``, ``z`` (the last two None without ``z``).
    Deterministic: the same inputs give bit-identical outputs.
    """
    p = info_nce_passes(x, y, z, temperature, **overrides)
    gx1, gy, gx2, gz = info_nce_grads(p)
    return p.loss_cl, p.loss_s, gx1, gy, gx2, gz
