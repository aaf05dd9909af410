"""Dual InfoNCE: ``_info_nce_rows_kernel`` + ``_info_nce_cols_kernel`` and the host launcher.

What it computes, for ``x = z1``, ``y = z2`` and (optionally) ``z = z*``, all ``(B, D)``:
``L_cl = mean_i CE(cos(x_i, y_.) / tau, target i)`` and ``L_s = mean_i CE(cos(x_i, z_.) / tau, target i)``, plus,
because the losses are terminal, their input gradients ``dL_cl/dx, dL_cl/dy, dL_s/dx, dL_s/dz`` (fp32, row
normalisation included), which the backward only has to scale by ``grad_output`` (DESIGN.md §3; Liger-Kernel's
"gradient in the forward pass").

How: with ``P = softmax(S)`` row-wise, ``S_ij = cos_ij / tau`` and ``c = 1 / (tau B)``,
``dL/dx_i = c/|x_i| (u_i - y^_i - x^_i (s_i - cos_ii))`` with ``u_i = sum_j P_ij y^_j``, ``s_i = sum_j P_ij cos_ij``,
and symmetrically ``dL/dy_j = c/|y_j| (v_j - x^_j - y^_j (t_j - cos_jj))`` with ``v_j = sum_i P_ij x^_i``,
``t_j = sum_i P_ij cos_ij`` (the projection terms are the backward of ``x / |x|``; ``x^ . u`` and ``y^ . v`` come
out of the softmax loop as ``s`` and ``t``, so no extra pass over ``D`` is needed for them).
1. ``_info_nce_rows_kernel``, one program per block of ``BLOCK_M`` rows: streams the column tiles once, both
   losses at a time; per tile the ``(BLOCK_M, BLOCK_N)`` cosine tile comes from ``tl.dot`` over ``D`` (the norms
   are accumulated in the same loop), an online log-sum-exp (Milakov & Gimelshein 2018) updates the row max and sum,
   and the rescaled row accumulator ``u`` (``BLOCK_M x D``, fp32) is updated in the output gradient buffer (read-
   modify-write of rows only this program owns). Writes the per-row ``lse``, loss and ``cos_ii`` and ``dL/dx``.
   No ``B x B`` matrix exists at any time.
2. ``_info_nce_cols_kernel``, one program per block of ``BLOCK_N`` columns: recomputes its cosine tiles against
   every row tile, forms ``P`` from the stored ``lse`` and accumulates ``v`` and ``t`` the same way; writes
   ``dL/dy`` (and ``dL/dz``). Program 0 also sums the per-row losses into the two scalars.
Column gradients therefore come from a second pass over row tiles rather than from atomics: deterministic
(bit-identical results run to run), at the price of recomputing the cosine tiles once. The accumulators live in
global memory and are read back by other threads of the same program (the load and store layouts differ), so a
``tl.debug_barrier()`` (CTA barrier) separates each tile's stores from the next tile's loads.

Precision: tiles are loaded in the input dtype and upcast to fp32; every ``tl.dot`` is fp32 x fp32 with
``input_precision="tf32x3"`` (three TF32 products, about fp32 accuracy: the loss and gradients stay within ~1e-5
relative of an fp32 computation; plain TF32 would cost ~1e-3 on the gradients). Exact under ``TRITON_INTERPRET=1``.

Supported: x, y fp32/bf16/fp16 and z fp32, any ``B >= 1`` and ``D >= 1`` (masks everywhere), arbitrary strides.
Tested under the interpreter (Triton 3.9 and 3.6, tests/test_triton_interpret.py) and compiled for sm_90 with
ptxas; the GPU tests (tests/test_triton_gpu.py) were not yet run on a GPU when this was written. Degenerate rows
(norm below 1e-12) use the clamped norm, like ``F.normalize``. Cost: the cosine tiles are computed twice and every
row block streams all of ``y``/``z``; with 16-row blocks, B = 512 gives only 32 programs per pass, the first thing
to tune if the GPU profile shows these kernels (bench/gpu_bench.py prints per-kernel device time).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .knn_topk import fp32_dot_precision

__all__ = ["info_nce_forward", "info_nce_config"]

_EPS = 1e-12


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
    dot1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dot2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    ssx = tl.zeros([BLOCK_M], tl.float32)
    ssy = tl.zeros([BLOCK_N], tl.float32)
    ssz = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        x = tl.load(X + rows[:, None] * stride_xb + d[None, :] * stride_xd,
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        y = tl.load(Y + cols[:, None] * stride_yb + d[None, :] * stride_yd,
                    mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        dot1 = tl.dot(x, tl.trans(y), dot1, input_precision=PRECISION)
        ssx += tl.sum(x * x, axis=1)
        ssy += tl.sum(y * y, axis=1)
        if HAS_Z:
            z = tl.load(Z + cols[:, None] * stride_zb + d[None, :] * stride_zd,
                        mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            dot2 = tl.dot(x, tl.trans(z), dot2, input_precision=PRECISION)
            ssz += tl.sum(z * z, axis=1)
    return dot1, dot2, ssx, ssy, ssz


@triton.jit
def _info_nce_rows_kernel(
    # pointers
    X, Y, Z, GX1, GX2, STATS,
    # sizes
    B, D, inv_tau, scale, eps,
    # strides
    stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd, stride_gb, stride_s,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_Z: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Row pass: online log-sum-exp, per-row loss, ``cos_ii`` and the row-side gradients ``dL/dx``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < B
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
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
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + offs_n
        c_mask = cols < B
        dot1, dot2, ssx, ssy, ssz = _dot_tiles(
            X, Y, Z, rows, cols, r_mask, c_mask, D, stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd,
            BLOCK_M, BLOCK_N, BLOCK_D, HAS_Z, PRECISION)
        rx = 1.0 / tl.maximum(tl.sqrt(ssx), eps)
        ry = 1.0 / tl.maximum(tl.sqrt(ssy), eps)
        eye = rows[:, None] == cols[None, :]
        cos1 = dot1 * rx[:, None] * ry[None, :]
        diag1 += tl.sum(tl.where(eye, cos1, 0.0), axis=1)
        ry_own += tl.sum(tl.where(eye, ry[None, :], 0.0), axis=1)
        logit1 = tl.where(c_mask[None, :], cos1 * inv_tau, float("-inf"))
        new1 = tl.maximum(m1, tl.max(logit1, axis=1))
        alpha1 = tl.exp(m1 - new1)
        p1 = tl.exp(logit1 - new1[:, None])
        l1 = l1 * alpha1 + tl.sum(p1, axis=1)
        s1 = s1 * alpha1 + tl.sum(p1 * cos1, axis=1)
        m1 = new1
        pw1 = p1 * ry[None, :]
        if HAS_Z:
            rz = 1.0 / tl.maximum(tl.sqrt(ssz), eps)
            cos2 = dot2 * rx[:, None] * rz[None, :]
            diag2 += tl.sum(tl.where(eye, cos2, 0.0), axis=1)
            rz_own += tl.sum(tl.where(eye, rz[None, :], 0.0), axis=1)
            logit2 = tl.where(c_mask[None, :], cos2 * inv_tau, float("-inf"))
            new2 = tl.maximum(m2, tl.max(logit2, axis=1))
            alpha2 = tl.exp(m2 - new2)
            p2 = tl.exp(logit2 - new2[:, None])
            l2 = l2 * alpha2 + tl.sum(p2, axis=1)
            s2 = s2 * alpha2 + tl.sum(p2 * cos2, axis=1)
            m2 = new2
            pw2 = p2 * rz[None, :]
        # u <- alpha u + P_tile @ y^_tile, kept in the (fp32) gradient buffer: this program owns these rows. Threads
        # of this program read elements that other threads of it stored in the previous tile (load and store layouts
        # differ), so a CTA barrier orders those global accesses.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            g_ptr = rows[:, None] * stride_gb + d[None, :]
            g_mask = r_mask[:, None] & d_mask[None, :]
            y = tl.load(Y + cols[:, None] * stride_yb + d[None, :] * stride_yd,
                        mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            u1 = tl.load(GX1 + g_ptr, mask=g_mask & (n0 > 0), other=0.0)
            u1 = tl.dot(pw1, y, u1 * alpha1[:, None], input_precision=PRECISION)
            tl.store(GX1 + g_ptr, u1, mask=g_mask)
            if HAS_Z:
                z = tl.load(Z + cols[:, None] * stride_zb + d[None, :] * stride_zd,
                            mask=c_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                u2 = tl.load(GX2 + g_ptr, mask=g_mask & (n0 > 0), other=0.0)
                u2 = tl.dot(pw2, z, u2 * alpha2[:, None], input_precision=PRECISION)
                tl.store(GX2 + g_ptr, u2, mask=g_mask)
    # Per-row statistics for the column pass and the loss: lse, loss_i = lse_i - cos_ii / tau, cos_ii.
    lse1 = m1 + tl.log(l1)
    tl.store(STATS + rows, lse1, mask=r_mask)
    tl.store(STATS + stride_s + rows, lse1 - diag1 * inv_tau, mask=r_mask)
    tl.store(STATS + 2 * stride_s + rows, diag1, mask=r_mask)
    c1 = s1 / l1 - diag1
    inv_l1 = 1.0 / l1
    if HAS_Z:
        lse2 = m2 + tl.log(l2)
        tl.store(STATS + 3 * stride_s + rows, lse2, mask=r_mask)
        tl.store(STATS + 4 * stride_s + rows, lse2 - diag2 * inv_tau, mask=r_mask)
        tl.store(STATS + 5 * stride_s + rows, diag2, mask=r_mask)
        c2 = s2 / l2 - diag2
        inv_l2 = 1.0 / l2
    # dL/dx_i = c/|x_i| (u_i / l_i - y^_i - x^_i (s_i / l_i - cos_ii))
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        g_ptr = rows[:, None] * stride_gb + d[None, :]
        g_mask = r_mask[:, None] & d_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xb + d[None, :] * stride_xd, mask=g_mask, other=0.0).to(tl.float32)
        xh = x * rx[:, None]
        y = tl.load(Y + rows[:, None] * stride_yb + d[None, :] * stride_yd, mask=g_mask, other=0.0).to(tl.float32)
        u1 = tl.load(GX1 + g_ptr, mask=g_mask, other=0.0)
        g1 = (scale * rx)[:, None] * (u1 * inv_l1[:, None] - y * ry_own[:, None] - xh * c1[:, None])
        tl.store(GX1 + g_ptr, g1, mask=g_mask)
        if HAS_Z:
            z = tl.load(Z + rows[:, None] * stride_zb + d[None, :] * stride_zd, mask=g_mask,
                        other=0.0).to(tl.float32)
            u2 = tl.load(GX2 + g_ptr, mask=g_mask, other=0.0)
            g2 = (scale * rx)[:, None] * (u2 * inv_l2[:, None] - z * rz_own[:, None] - xh * c2[:, None])
            tl.store(GX2 + g_ptr, g2, mask=g_mask)


@triton.jit
def _info_nce_cols_kernel(
    # pointers
    X, Y, Z, GY, GZ, STATS, LOSS_CL, LOSS_S,
    # sizes
    B, D, inv_tau, scale, inv_b, eps,
    # strides
    stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd, stride_gb, stride_s,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_Z: tl.constexpr, PRECISION: tl.constexpr,
):
    """Column pass: ``dL/dy`` (and ``dL/dz``) from ``P = exp(S - lse)``; program 0 also reduces the losses."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = cols < B
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t1 = tl.zeros([BLOCK_N], tl.float32)
    t2 = tl.zeros([BLOCK_N], tl.float32)
    rx_own = tl.zeros([BLOCK_N], tl.float32)
    ry = tl.zeros([BLOCK_N], tl.float32)
    rz = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + offs_m
        r_mask = rows < B
        dot1, dot2, ssx, ssy, ssz = _dot_tiles(
            X, Y, Z, rows, cols, r_mask, c_mask, D, stride_xb, stride_xd, stride_yb, stride_yd, stride_zb, stride_zd,
            BLOCK_M, BLOCK_N, BLOCK_D, HAS_Z, PRECISION)
        rx = 1.0 / tl.maximum(tl.sqrt(ssx), eps)
        ry = 1.0 / tl.maximum(tl.sqrt(ssy), eps)
        eye = rows[:, None] == cols[None, :]
        rx_own += tl.sum(tl.where(eye, rx[:, None], 0.0), axis=0)
        valid = r_mask[:, None] & c_mask[None, :]
        cos1 = dot1 * rx[:, None] * ry[None, :]
        lse1 = tl.load(STATS + rows, mask=r_mask, other=0.0)
        p1 = tl.where(valid, tl.exp(cos1 * inv_tau - lse1[:, None]), 0.0)
        t1 += tl.sum(p1 * cos1, axis=0)
        pw1 = p1 * rx[:, None]
        if HAS_Z:
            rz = 1.0 / tl.maximum(tl.sqrt(ssz), eps)
            cos2 = dot2 * rx[:, None] * rz[None, :]
            lse2 = tl.load(STATS + 3 * stride_s + rows, mask=r_mask, other=0.0)
            p2 = tl.where(valid, tl.exp(cos2 * inv_tau - lse2[:, None]), 0.0)
            t2 += tl.sum(p2 * cos2, axis=0)
            pw2 = p2 * rx[:, None]
        # v <- v + P_tile^T @ x^_tile in the (fp32) gradient buffer: this program owns these columns (barrier: as in
        # the row pass).
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            g_ptr = cols[:, None] * stride_gb + d[None, :]
            g_mask = c_mask[:, None] & d_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_xb + d[None, :] * stride_xd,
                        mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            v1 = tl.load(GY + g_ptr, mask=g_mask & (m0 > 0), other=0.0)
            v1 = tl.dot(tl.trans(pw1), x, v1, input_precision=PRECISION)
            tl.store(GY + g_ptr, v1, mask=g_mask)
            if HAS_Z:
                v2 = tl.load(GZ + g_ptr, mask=g_mask & (m0 > 0), other=0.0)
                v2 = tl.dot(tl.trans(pw2), x, v2, input_precision=PRECISION)
                tl.store(GZ + g_ptr, v2, mask=g_mask)
    # dL/dy_j = c/|y_j| (v_j - x^_j - y^_j (t_j - cos_jj))
    tl.debug_barrier()
    diag1 = tl.load(STATS + 2 * stride_s + cols, mask=c_mask, other=0.0)
    c1 = t1 - diag1
    if HAS_Z:
        diag2 = tl.load(STATS + 5 * stride_s + cols, mask=c_mask, other=0.0)
        c2 = t2 - diag2
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        g_ptr = cols[:, None] * stride_gb + d[None, :]
        g_mask = c_mask[:, None] & d_mask[None, :]
        xh = tl.load(X + cols[:, None] * stride_xb + d[None, :] * stride_xd, mask=g_mask,
                     other=0.0).to(tl.float32) * rx_own[:, None]
        y = tl.load(Y + cols[:, None] * stride_yb + d[None, :] * stride_yd, mask=g_mask, other=0.0).to(tl.float32)
        v1 = tl.load(GY + g_ptr, mask=g_mask, other=0.0)
        g1 = (scale * ry)[:, None] * (v1 - xh - y * (ry * c1)[:, None])
        tl.store(GY + g_ptr, g1, mask=g_mask)
        if HAS_Z:
            z = tl.load(Z + cols[:, None] * stride_zb + d[None, :] * stride_zd, mask=g_mask,
                        other=0.0).to(tl.float32)
            v2 = tl.load(GZ + g_ptr, mask=g_mask, other=0.0)
            g2 = (scale * rz)[:, None] * (v2 - xh - z * (rz * c2)[:, None])
            tl.store(GZ + g_ptr, g2, mask=g_mask)
    if pid == 0:
        # The mean losses, summed in a fixed order by one program (deterministic).
        offs_r = tl.arange(0, BLOCK_R)
        acc1 = tl.zeros([BLOCK_R], tl.float32)
        acc2 = tl.zeros([BLOCK_R], tl.float32)
        for r0 in range(0, B, BLOCK_R):
            r = r0 + offs_r
            acc1 += tl.load(STATS + stride_s + r, mask=r < B, other=0.0)
            if HAS_Z:
                acc2 += tl.load(STATS + 4 * stride_s + r, mask=r < B, other=0.0)
        tl.store(LOSS_CL, tl.sum(acc1, axis=0) * inv_b)
        tl.store(LOSS_S, tl.sum(acc2, axis=0) * inv_b)


def info_nce_config(batch: int, dim: int, device: torch.device, **overrides) -> dict:
    """Tile sizes for the two kernels (a dict; keys may be overridden by keyword, and ``PRECISION`` may be added to
    change the fp32 dots' ``input_precision``, e.g. for benchmarks).

    On CUDA the row/column blocks are small (16) so that even B = 64 gives several programs; on CPU tensors (the
    interpreter) the tiles cover as much as possible, so few Python-level iterations run.
    """
    if device.type == "cpu":
        full = max(16, min(64, triton.next_power_of_2(batch)))
        cfg = dict(ROWS_M=full, ROWS_N=full, COLS_M=full, COLS_N=full,
                   BLOCK_D=max(16, min(128, triton.next_power_of_2(dim))), num_warps=4, num_stages=1)
    else:
        # 16-row (16-column) blocks give B/16 programs per pass; BLOCK_D=32 keeps the fp32 tiles of both losses
        # within the register file (checked with ptxas for sm_90: bench/gpu_bench.py --compile-only).
        cfg = dict(ROWS_M=16, ROWS_N=64, COLS_M=64, COLS_N=16, BLOCK_D=32, num_warps=4, num_stages=2)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def info_nce_forward(x: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor], temperature: float,
                     **overrides):
    """Launch the row and column passes (two launches) for ``L_cl`` (and ``L_s`` when ``z`` is given).

    ``x``, ``y``: ``(B, D)`` fp32/bf16/fp16; ``z``: ``(B, D)`` (fp32) or None. Returns
    ``(loss_cl, loss_s, gx1, gy, gx2, gz)``: 0-dim fp32 losses (``loss_s`` is 0 without ``z``) and fp32 ``(B, D)``
    gradients of ``L_cl`` w.r.t. ``x``, ``y`` and of ``L_s`` w.r.t. ``x``, ``z`` (the last two None without ``z``).
    """
    batch, dim = x.shape
    dev = x.device
    cfg = info_nce_config(batch, dim, dev, **overrides)
    has_z = z is not None
    f32 = dict(device=dev, dtype=torch.float32)
    gx1, gy = torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)
    gx2, gz = (torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32)) if has_z else (gx1, gy)
    stats = torch.empty(6, batch, **f32)  # lse, loss, cos_ii for L_cl, then for L_s
    loss_cl, loss_s = torch.empty((), **f32), torch.empty((), **f32)
    zz = z if has_z else y
    inv_tau = 1.0 / temperature
    scale = 1.0 / (temperature * batch)
    common = (batch, dim)
    strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1), zz.stride(0), zz.stride(1), gx1.stride(0),
               stats.stride(0))
    prec = cfg.get("PRECISION", fp32_dot_precision())
    _info_nce_rows_kernel[(triton.cdiv(batch, cfg["ROWS_M"]),)](
        x, y, zz, gx1, gx2, stats,
        *common, inv_tau, scale, _EPS,
        *strides,
        BLOCK_M=cfg["ROWS_M"], BLOCK_N=cfg["ROWS_N"], BLOCK_D=cfg["BLOCK_D"], HAS_Z=has_z, PRECISION=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _info_nce_cols_kernel[(triton.cdiv(batch, cfg["COLS_N"]),)](
        x, y, zz, gy, gz, stats, loss_cl, loss_s,
        *common, inv_tau, scale, 1.0 / batch, _EPS,
        *strides,
        BLOCK_M=cfg["COLS_M"], BLOCK_N=cfg["COLS_N"], BLOCK_D=cfg["BLOCK_D"],
        BLOCK_R=max(16, min(1024, triton.next_power_of_2(batch))), HAS_Z=has_z, PRECISION=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return loss_cl, loss_s, gx1, gy, (gx2 if has_z else None), (gz if has_z else None)
