"""Instance smoothing (attention aggregation): ``_smooth_fwd_kernel``, ``_smooth_bwd_kernel`` and host launchers.

Forward, one program per query row ``i`` (DESIGN.md §1 step 4, §3):
1. the neighbour slots: either merged here from the kNN's per-chunk candidates (:func:`merge_topk`, so the fused
   path needs no separate merge launch) or given (``idx``, e.g. from FAISS);
2. the attention logits ``[q_i . q_i, q_i . N_i1, ..., q_i . N_ik] / t_attn`` in fp32: the neighbour logits are
   the exact fp32 dot products of the gathered rows (or, for the standalone op, the given ``vals``, as the torch
   backend does), the self logit ``|q_i|^2`` is computed, not assumed to be 1;
3. ``w_i = softmax(logits)`` and ``z*_i = w_i0 q_i + sum_j w_ij N_ij``, written in fp32 with ``w`` (``(B, k+1)``),
   the slots, the logits' dot products and the neighbour rows (for backward).

Backward, one program per row, the same math as ``iscse.backends.pytorch.SmoothFunction.backward``:
``gw = [g.q, g.N_j]``, ``glogit = w (gw - w.gw) / t``, ``grad_q = w_0 g + 2 glogit_0 q + sum_j glogit_j N_j``.
The forward writes the gathered neighbour rows ``N`` (``(B, k, D)`` in the buffer's dtype, as the torch backend
saves them) while it reads them for ``z*``, so the backward needs nothing from the buffer: pushing to the buffer
between a loss and its backward (two losses before one backward, gradient accumulation) is fine, as with the torch
backend. The extra write is ``B k D`` elements, small next to the kNN's ``M D``.
In the fused IS-CSE loss (``FUSED=True``) the same kernel is the whole backward: it scales the gradients that the
dual-InfoNCE kernel produced in forward by ``grad_output`` (read from device memory, no host sync), runs the smooth
backward on ``g_s * dL_s/dz*``, folds in the backward of ``q2 = z2 / max(|z2|, 1e-12)`` (``F.normalize``), and
writes ``grad z1 = g_cl dL_cl/dz1 + g_s dL_s/dz1`` and ``grad z2 = g_cl dL_cl/dz2 + normalize'(grad q2)`` in the
inputs' dtype: one launch for the whole backward.

Mean aggregation (the paper's ablation, ``MEAN=True`` in both kernels): ``w = 1 / (k + 1)`` for every row of
``[q_i; N_i]``, so ``z*_i`` is the group's mean and ``grad_q = g / (k + 1)`` (the weights do not depend on ``q``:
``glogit = 0``); the logits' dot products are still computed and written.

Supported: ``q``/``z2`` fp32/bf16/fp16, buffer fp32/bf16/fp16, ``1 <= k <= 256``, any ``B``, ``D``, arbitrary
strides for ``q``, ``z2`` and the buffer (``grad z*`` is made row-contiguous). All arithmetic is fp32 (no
``tl.dot``: each row is a ``K_PAD x BLOCK_D`` tile). Tested under the interpreter up to k = 64 (Triton 3.9 and 3.6,
tests/test_triton_interpret.py) and compiled for sm_90 with ptxas; the GPU tests (tests/test_triton_gpu.py) were
not yet run on a GPU when this was written.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .knn_topk import k_pad, merge_block, merge_topk

__all__ = ["smooth_forward", "smooth_backward", "smooth_backward_fused"]

_EPS = 1e-12  # F.normalize's clamp on |z2|


@triton.jit
def _smooth_fwd_kernel(
    # pointers
    Q, BUF, CAND_V, CAND_I, VALS_IN, ZSTAR, W, IDX, VALS, NB,
    # sizes
    D, N_CAND, inv_t,
    # strides
    stride_qb, stride_qd, stride_mb, stride_md, stride_cb, stride_vib, stride_zb, stride_wb, stride_ib, stride_vb,
    stride_nbb, stride_nbk,
    # meta-parameters
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    MERGE: tl.constexpr, SINGLE: tl.constexpr, USE_VALS: tl.constexpr, MEAN: tl.constexpr,
):
    """Per query row: (merge candidates,) gather the k rows, softmax weights, ``z*``; saves the rows to ``NB``."""
    row = tl.program_id(0)
    kk = tl.arange(0, K_PAD)
    k_mask = kk < K
    if MERGE:
        _, idx = merge_topk(CAND_V, CAND_I, row * stride_cb, N_CAND, K, K_PAD, BLOCK_C, SINGLE)
    else:
        idx = tl.load(CAND_I + row * stride_cb + kk, mask=k_mask, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    nb_off = idx[:, None] * stride_mb
    dots = tl.zeros([K_PAD], tl.float32)
    qq_acc = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        q = tl.load(Q + row * stride_qb + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
        qq_acc += q * q
        if not USE_VALS:
            nb = tl.load(BUF + nb_off + d[None, :] * stride_md, mask=k_mask[:, None] & d_mask[None, :],
                         other=0.0).to(tl.float32)
            dots += tl.sum(nb * q[None, :], axis=1)
    if USE_VALS:
        dots = tl.load(VALS_IN + row * stride_vib + kk, mask=k_mask, other=0.0).to(tl.float32)
    self_logit = tl.sum(qq_acc, axis=0) * inv_t
    logits = tl.where(k_mask, dots * inv_t, float("-inf"))
    top = tl.maximum(tl.max(logits, axis=0), self_logit)
    e = tl.exp(logits - top)
    e0 = tl.exp(self_logit - top)
    denom = e0 + tl.sum(e, axis=0)
    w = e / denom
    w0 = e0 / denom
    if MEAN:  # uniform weights over [q; the k neighbours]
        w = tl.where(k_mask, 1.0 / (K + 1), 0.0)
        w0 = 1.0 / (K + 1)
    tl.store(W + row * stride_wb, w0)
    tl.store(W + row * stride_wb + 1 + kk, w, mask=k_mask)
    tl.store(IDX + row * stride_ib + kk, idx, mask=k_mask)
    tl.store(VALS + row * stride_vb + kk, dots, mask=k_mask)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        q = tl.load(Q + row * stride_qb + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
        nb_mask = k_mask[:, None] & d_mask[None, :]
        nb = tl.load(BUF + nb_off + d[None, :] * stride_md, mask=nb_mask, other=0.0)
        tl.store(NB + row * stride_nbb + kk[:, None] * stride_nbk + d[None, :], nb, mask=nb_mask)
        z = w0 * q + tl.sum(w[:, None] * nb.to(tl.float32), axis=0)
        tl.store(ZSTAR + row * stride_zb + d, z, mask=d_mask)


@triton.jit
def _smooth_bwd_kernel(
    # pointers
    GZ, Q, NB, W, Z2, GY, GX1, GX2, G_CL, G_S, OUT_Q, OUT_X,
    # sizes
    D, inv_t, eps,
    # strides
    stride_gzb, stride_qb, stride_qd, stride_nbb, stride_nbk, stride_wb, stride_z2b, stride_z2d,
    stride_gb, stride_oqb, stride_oxb,
    # meta-parameters
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, FUSED: tl.constexpr, HAS_G_CL: tl.constexpr, HAS_G_S: tl.constexpr,
    MEAN: tl.constexpr,
):
    """Per row: smooth backward (``grad q``); with ``FUSED`` the whole IS-CSE loss backward (see the module doc)."""
    row = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    g_cl = 0.0
    g_s = 1.0
    if FUSED:
        if HAS_G_CL:
            g_cl = tl.load(G_CL).to(tl.float32)
        if HAS_G_S:
            g_s = tl.load(G_S).to(tl.float32)
        else:
            g_s = 0.0
    if HAS_SMOOTH:
        kk = tl.arange(0, K_PAD)
        k_mask = kk < K
        nb_off = row * stride_nbb + kk[:, None] * stride_nbk
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
            g = tl.load(GZ + row * stride_gzb + d, mask=d_mask, other=0.0).to(tl.float32) * g_s
            q = tl.load(Q + row * stride_qb + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
            nb = tl.load(NB + nb_off + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            gw += tl.sum(nb * g[None, :], axis=1)
            gq_acc += g * q
            if FUSED:
                z = tl.load(Z2 + row * stride_z2b + d * stride_z2d, mask=d_mask, other=0.0).to(tl.float32)
                zz_acc += z * z
                zg_acc += z * g
                zq_acc += z * q
                zn += tl.sum(nb * z[None, :], axis=1)
        gw0 = tl.sum(gq_acc, axis=0)
        # softmax backward: dL/dlogit_j = w_j (gw_j - sum_l w_l gw_l); the logits are divided by t.
        if MEAN:  # constant weights: no gradient through the logits
            gl0 = 0.0
            gl = tl.zeros([K_PAD], tl.float32)
        else:
            gbar = w0 * gw0 + tl.sum(w * gw, axis=0)
            gl0 = w0 * (gw0 - gbar) * inv_t
            gl = w * (gw - gbar) * inv_t
        if FUSED:
            # q2 = z2 / max(|z2|, eps): grad z2 = (gq - z2 (z2.gq) / |z2|^2) / |z2| (or gq / eps below the clamp),
            # with z2.gq assembled from the dot products of loop 1 instead of a third pass over D.
            r = tl.sqrt(tl.sum(zz_acc, axis=0))
            inv_r = 1.0 / tl.maximum(r, eps)
            z_gq = w0 * tl.sum(zg_acc, axis=0) + 2.0 * gl0 * tl.sum(zq_acc, axis=0) + tl.sum(gl * zn, axis=0)
            proj = tl.where(r > eps, z_gq * inv_r * inv_r * inv_r, 0.0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            g = tl.load(GZ + row * stride_gzb + d, mask=d_mask, other=0.0).to(tl.float32) * g_s
            q = tl.load(Q + row * stride_qb + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
            nb = tl.load(NB + nb_off + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            gq = w0 * g + 2.0 * gl0 * q + tl.sum(gl[:, None] * nb, axis=0)
            if FUSED:
                z = tl.load(Z2 + row * stride_z2b + d * stride_z2d, mask=d_mask, other=0.0).to(tl.float32)
                out = gq * inv_r - z * proj
                if HAS_G_CL:
                    out += g_cl * tl.load(GY + row * stride_gb + d, mask=d_mask, other=0.0)
                gx = g_s * tl.load(GX2 + row * stride_gb + d, mask=d_mask, other=0.0)
                if HAS_G_CL:
                    gx += g_cl * tl.load(GX1 + row * stride_gb + d, mask=d_mask, other=0.0)
                tl.store(OUT_Q + row * stride_oqb + d, out, mask=d_mask)
                tl.store(OUT_X + row * stride_oxb + d, gx, mask=d_mask)
            else:
                tl.store(OUT_Q + row * stride_oqb + d, gq, mask=d_mask)
    else:
        # Smoothing off (buffer not full): grad z1 = g_cl dL_cl/dz1, grad z2 = g_cl dL_cl/dz2.
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            gy = tl.load(GY + row * stride_gb + d, mask=d_mask, other=0.0)
            gx = tl.load(GX1 + row * stride_gb + d, mask=d_mask, other=0.0)
            tl.store(OUT_Q + row * stride_oqb + d, g_cl * gy, mask=d_mask)
            tl.store(OUT_X + row * stride_oxb + d, g_cl * gx, mask=d_mask)


def _block_d(dim: int, device: torch.device) -> int:
    return max(16, min(128 if device.type == "cpu" else 64, triton.next_power_of_2(dim)))


def smooth_forward(q: torch.Tensor, storage: torch.Tensor, k: int, attn_temperature: float, *,
                   candidates: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   idx: Optional[torch.Tensor] = None, vals: Optional[torch.Tensor] = None, mean: bool = False):
    """Launch ``_smooth_fwd_kernel`` (one program per row).

    ``q`` ``(B, D)`` (fp32/bf16/fp16), ``storage`` ``(M, D)``; neighbours from exactly one of ``candidates`` (the
    ``(cand_v, cand_i)`` of :func:`iscse.kernels.knn_topk.knn_topk_candidates`, merged here) or ``idx`` (int
    ``(B, k)`` slots). ``vals`` (``(B, k)``, with ``idx``): use these as the neighbour logits instead of the exact dot
    products. ``mean``: uniform weights ``1 / (k + 1)`` (mean aggregation). Returns ``(z_star, w, idx, dots, nb)``:
    fp32 ``(B, D)``, fp32 ``(B, k + 1)`` (column 0 the self weight), int64 ``(B, k)``, fp32 ``(B, k)`` (the logits'
    dot products used) and the neighbour rows ``(B, k, D)`` in the buffer's dtype (for backward).
    """
    batch, dim = q.shape
    kp = k_pad(k)
    dev = q.device
    z_star = torch.empty(batch, dim, device=dev, dtype=torch.float32)
    w = torch.empty(batch, k + 1, device=dev, dtype=torch.float32)
    idx_out = torch.empty(batch, k, device=dev, dtype=torch.int64)
    dots = torch.empty(batch, k, device=dev, dtype=torch.float32)
    nb = torch.empty(batch, k, dim, device=dev, dtype=storage.dtype)
    merge = candidates is not None
    if merge:
        cand_v, cand_i = candidates
        n_cand = cand_v.shape[1] * cand_v.shape[2]
        stride_c = cand_v.stride(0)
    else:
        if idx is None:
            raise ValueError("smooth_forward needs candidates or idx")
        cand_v, cand_i = z_star, idx.contiguous()
        n_cand = k
        stride_c = cand_i.stride(0)
    use_vals = vals is not None
    block_c = merge_block(n_cand, dev)
    vals_in = vals.contiguous() if use_vals else dots
    _smooth_fwd_kernel[(batch,)](
        q, storage, cand_v, cand_i, vals_in, z_star, w, idx_out, dots, nb,
        dim, n_cand, 1.0 / attn_temperature,
        q.stride(0), q.stride(1), storage.stride(0), storage.stride(1), stride_c, vals_in.stride(0),
        z_star.stride(0), w.stride(0), idx_out.stride(0), dots.stride(0), nb.stride(0), nb.stride(1),
        K=k, K_PAD=kp, BLOCK_C=block_c, BLOCK_D=_block_d(dim, dev), MERGE=merge, SINGLE=n_cand <= block_c,
        USE_VALS=use_vals, MEAN=bool(mean), num_warps=4,
    )
    return z_star, w, idx_out, dots, nb


def smooth_backward(grad_z: torch.Tensor, q: torch.Tensor, nb: torch.Tensor, w: torch.Tensor,
                    attn_temperature: float, mean: bool = False) -> torch.Tensor:
    """``grad q`` ``(B, D)`` in ``q``'s dtype for the standalone smooth op, from ``grad z*`` and the forward's
    neighbour rows ``nb`` ``(B, k, D)`` and weights ``w`` ``(B, k + 1)``; ``mean`` as in :func:`smooth_forward`."""
    batch, dim = q.shape
    k = nb.shape[1]
    grad_z = grad_z.contiguous() if grad_z.stride(1) != 1 else grad_z
    grad_q = torch.empty(batch, dim, device=q.device, dtype=q.dtype)
    _smooth_bwd_kernel[(batch,)](
        grad_z, q, nb, w, q, grad_z, grad_z, grad_z, grad_z, grad_z, grad_q, grad_q,
        dim, 1.0 / attn_temperature, _EPS,
        grad_z.stride(0), q.stride(0), q.stride(1), nb.stride(0), nb.stride(1), w.stride(0), q.stride(0),
        q.stride(1), 0, grad_q.stride(0), grad_q.stride(0),
        K=k, K_PAD=k_pad(k), BLOCK_D=_block_d(dim, q.device), HAS_SMOOTH=True, FUSED=False, HAS_G_CL=False,
        HAS_G_S=False, MEAN=bool(mean), num_warps=4,
    )
    return grad_q


def smooth_backward_fused(g_cl: Optional[torch.Tensor], g_s: Optional[torch.Tensor], z1: torch.Tensor,
                          z2: torch.Tensor, grads: Tuple[torch.Tensor, ...], smooth_state, attn_temperature: float,
                          mean: bool = False):
    """The whole backward of the fused IS-CSE losses in one launch; returns ``(grad_z1, grad_z2)``.

    ``g_cl`` / ``g_s``: 0-dim grads of ``L_cl`` / ``L_s`` (None: zero). ``grads``: ``(gx1, gy, gx2, gz)`` from
    :func:`iscse.kernels.info_nce.info_nce_forward` (fp32 ``(B, D)``, ``gx2``/``gz`` None without smoothing).
    ``smooth_state``: ``(q2, nb, w)`` of the forward (:func:`smooth_forward`), or None without smoothing.
    ``mean``: the forward used mean aggregation.
    """
    batch, dim = z1.shape
    gx1, gy, gx2, gz = grads
    grad_z1 = torch.empty(batch, dim, device=z1.device, dtype=z1.dtype)
    grad_z2 = torch.empty(batch, dim, device=z2.device, dtype=z2.dtype)
    has_smooth = smooth_state is not None
    if has_smooth:
        q2, nb, w = smooth_state
        k = nb.shape[1]
        nb_strides = (nb.stride(0), nb.stride(1))
    else:
        q2, nb, w, gx2, gz, k, nb_strides = z2, gy, gy, gy, gy, 1, (0, 0)
    has_g_cl, has_g_s = g_cl is not None, g_s is not None
    _smooth_bwd_kernel[(batch,)](
        gz, q2, nb, w, z2, gy, gx1, gx2, g_cl if has_g_cl else gy, g_s if has_g_s else gy,
        grad_z2, grad_z1,
        dim, 1.0 / attn_temperature, _EPS,
        gz.stride(0), q2.stride(0), q2.stride(1), *nb_strides, w.stride(0),
        z2.stride(0), z2.stride(1), gy.stride(0), grad_z2.stride(0), grad_z1.stride(0),
        K=k, K_PAD=k_pad(k), BLOCK_D=_block_d(dim, z1.device), HAS_SMOOTH=has_smooth, FUSED=True,
        HAS_G_CL=has_g_cl, HAS_G_S=has_g_s, MEAN=bool(mean) and has_smooth, num_warps=4,
    )
    return grad_z1, grad_z2
