"""The fused IS-CSE loss ``(L_cl, L_s)``: ``_iscse_loss_bwd_kernel`` and the launchers ``iscse_loss_forward`` /
``iscse_loss_backward``.

What it computes, for one step (DESIGN.md §1, §3): ``L_cl = InfoNCE(z1, z2)`` and, with smoothing on,
``L_s = InfoNCE(z1, z*)`` where ``z*`` aggregates ``q2 = normalize(z2)`` with its ``k`` nearest buffer rows; and
in backward ``grad z1``, ``grad z2`` for upstream gradients ``g_cl``, ``g_s`` of the two losses.

Forward (:func:`iscse_loss_forward`), three ops' launchers in a row, five launches, nothing fused-loss specific in
them: the kNN chunk kernel (:func:`iscse.kernels.knn_topk.knn_topk_candidates`, skipped when the neighbour slots
come from another backend), the aggregation kernel (:func:`iscse.kernels.smooth.smooth_forward`, which also merges
the kNN's per-chunk candidates) and the three kernels of the dual InfoNCE
(:func:`iscse.kernels.info_nce.info_nce_forward`), which also write every input gradient of both losses (fp32,
unscaled). Without smoothing only the dual InfoNCE runs (``L_s = 0``).

Backward (:func:`iscse_loss_backward`, one launch of ``_iscse_loss_bwd_kernel``, one program per row): it reads
``g_cl`` and ``g_s`` from device memory (no host sync), scales the InfoNCE gradients by them, runs the smooth
backward on ``g_s dL_s/dz*`` (the softmax backward and ``grad q`` row are the smooth op's own ``@triton.jit``
helpers, :func:`~iscse.kernels.smooth.smooth_logit_grads` and :func:`~iscse.kernels.smooth.smooth_grad_q`), folds
in the backward of ``q2 = z2 / max(|z2|, 1e-12)`` (``F.normalize``), and writes
``grad z1 = g_cl dL_cl/dz1 + g_s dL_s/dz1`` and ``grad z2 = g_cl dL_cl/dz2 + normalize'(grad q2)`` in the inputs'
dtypes. Absent inputs are passed as ``None`` (Triton specialises them away as constexprs): ``G_CL`` / ``G_S`` when
that loss gets no gradient (it then counts as 0), and everything of the smooth part (``GX2``, ``GZ``, ``Z2``,
``Q2``, ``NB``, ``W``) when smoothing was off; then ``grad z1 = g_cl dL_cl/dz1``, ``grad z2 = g_cl dL_cl/dz2``.

So a step is six launches (four without smoothing), with no atomics and no host synchronisation: it can be captured
in a CUDA graph. ``mean``: the aggregation's mean ablation (``MEAN`` in the smooth kernels and here).

Supported: ``z1``/``z2`` fp32/bf16/fp16 with arbitrary strides, buffer fp32/bf16/fp16, ``1 <= k <= 256``, any
``B``, ``D``. Tested under the interpreter (tests/test_triton_interpret.py, tests/test_ablations.py) and compiled for
sm_90 with ptxas (``bench/gpu_bench.py --compile-only``); tests/test_triton_gpu.py holds the GPU tests.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import k_pad, row_block_d
from .info_nce import info_nce_forward
from .knn_topk import knn_topk_candidates
from .smooth import smooth_forward, smooth_grad_q, smooth_logit_grads

__all__ = ["iscse_loss_forward", "iscse_loss_backward"]

_EPS = 1e-12  # F.normalize's clamp on |z2|


@triton.jit
def _iscse_loss_bwd_kernel(
    # pointers (None where absent, see the module docstring)
    G_CL, G_S, GX1, GY, GX2, GZ, Z2, Q2, NB, W, GRAD_Z1, GRAD_Z2,
    # sizes
    D, inv_t, eps,
    # strides
    stride_gb, stride_gzb, stride_z2b, stride_z2d, stride_qb, stride_qd, stride_nbb, stride_nbk, stride_wb,
    stride_o1b, stride_o2b,
    # meta-parameters
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr, MEAN: tl.constexpr,
):
    """Per row: the whole backward of the fused IS-CSE loss (see the module docstring)."""
    row = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    g_cl = 0.0
    if G_CL is not None:
        g_cl = tl.load(G_CL).to(tl.float32)
    g_s = 0.0
    if G_S is not None:
        g_s = tl.load(G_S).to(tl.float32)
    if NB is not None:  # smoothing on
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
            q = tl.load(Q2 + row * stride_qb + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
            nb = tl.load(NB + nb_off + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            gw += tl.sum(nb * g[None, :], axis=1)
            gq_acc += g * q
            z = tl.load(Z2 + row * stride_z2b + d * stride_z2d, mask=d_mask, other=0.0).to(tl.float32)
            zz_acc += z * z
            zg_acc += z * g
            zq_acc += z * q
            zn += tl.sum(nb * z[None, :], axis=1)
        gl0, gl = smooth_logit_grads(w0, w, tl.sum(gq_acc, axis=0), gw, inv_t, MEAN)
        # q2 = z2 / max(|z2|, eps): grad z2 = (gq - z2 (z2.gq) / |z2|^2) / |z2| (or gq / eps below the clamp), with
        # z2.gq assembled from the dot products of the first loop instead of a third pass over D.
        r = tl.sqrt(tl.sum(zz_acc, axis=0))
        inv_r = 1.0 / tl.maximum(r, eps)
        z_gq = w0 * tl.sum(zg_acc, axis=0) + 2.0 * gl0 * tl.sum(zq_acc, axis=0) + tl.sum(gl * zn, axis=0)
        proj = tl.where(r > eps, z_gq * inv_r * inv_r * inv_r, 0.0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            g = tl.load(GZ + row * stride_gzb + d, mask=d_mask, other=0.0).to(tl.float32) * g_s
            q = tl.load(Q2 + row * stride_qb + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
            nb = tl.load(NB + nb_off + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            gq = smooth_grad_q(g, q, nb, w0, gl0, gl)
            z = tl.load(Z2 + row * stride_z2b + d * stride_z2d, mask=d_mask, other=0.0).to(tl.float32)
            out = gq * inv_r - z * proj
            if G_CL is not None:
                out += g_cl * tl.load(GY + row * stride_gb + d, mask=d_mask, other=0.0)
            gx = g_s * tl.load(GX2 + row * stride_gb + d, mask=d_mask, other=0.0)
            if G_CL is not None:
                gx += g_cl * tl.load(GX1 + row * stride_gb + d, mask=d_mask, other=0.0)
            tl.store(GRAD_Z2 + row * stride_o2b + d, out, mask=d_mask)
            tl.store(GRAD_Z1 + row * stride_o1b + d, gx, mask=d_mask)
    else:
        # Smoothing off: grad z1 = g_cl dL_cl/dz1, grad z2 = g_cl dL_cl/dz2.
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            gy = tl.load(GY + row * stride_gb + d, mask=d_mask, other=0.0)
            gx = tl.load(GX1 + row * stride_gb + d, mask=d_mask, other=0.0)
            tl.store(GRAD_Z2 + row * stride_o2b + d, g_cl * gy, mask=d_mask)
            tl.store(GRAD_Z1 + row * stride_o1b + d, g_cl * gx, mask=d_mask)


def iscse_loss_forward(z1: torch.Tensor, z2: torch.Tensor, q2: torch.Tensor, storage: torch.Tensor,
                       self_slots: Optional[torch.Tensor], k: int, temperature: float, attn_temperature: float, *,
                       idx: Optional[torch.Tensor] = None, smooth: bool = True, mean: bool = False):
    """Forward of the fused IS-CSE loss: ``(loss_cl, loss_s, grads, smooth_state)``.

    ``z1``, ``z2`` ``(B, D)``; ``q2 = normalize(z2)``; ``storage`` ``(M, D)``; ``self_slots`` int64 ``(B,)`` (slots
    excluded from the kNN) or None; ``idx`` int ``(B, k)``: neighbour slots found elsewhere (the Triton kNN is then
    skipped), or None. ``smooth=False``: no kNN and no aggregation, ``loss_s`` is 0. Returns the two 0-dim fp32
    losses, ``grads = (gx1, gy, gx2, gz)`` (fp32 ``(B, D)`` unscaled input gradients of the dual InfoNCE; ``gx2``,
    ``gz`` None without smoothing) and ``smooth_state = (q2, nb, w)`` (None without smoothing): what
    :func:`iscse_loss_backward` takes.
    """
    z_star = state = None
    if smooth:
        if idx is None:
            cands = knn_topk_candidates(q2, storage, k, self_slots)
            z_star, w, _, _, nb = smooth_forward(q2, storage, k, attn_temperature, candidates=cands, mean=mean)
        else:
            z_star, w, _, _, nb = smooth_forward(q2, storage, k, attn_temperature, idx=idx, mean=mean)
        state = (q2, nb, w)
    loss_cl, loss_s, gx1, gy, gx2, gz = info_nce_forward(z1, z2, z_star, temperature)
    return loss_cl, loss_s, (gx1, gy, gx2, gz), state


def iscse_loss_backward(g_cl: Optional[torch.Tensor], g_s: Optional[torch.Tensor], z1: torch.Tensor,
                        z2: torch.Tensor, grads: Tuple[torch.Tensor, ...], smooth_state, attn_temperature: float,
                        mean: bool = False):
    """The whole backward of the fused IS-CSE loss in one launch of ``_iscse_loss_bwd_kernel``; returns
    ``(grad_z1, grad_z2)`` in ``z1``'s / ``z2``'s dtype.

    ``g_cl`` / ``g_s``: 0-dim fp32 grads of ``L_cl`` / ``L_s`` (None: zero). ``grads``: ``(gx1, gy, gx2, gz)`` and
    ``smooth_state``: ``(q2, nb, w)`` or None, as :func:`iscse_loss_forward` returned them (``g_s`` is ignored
    without smoothing). ``mean``: the forward used mean aggregation.
    """
    batch, dim = z1.shape
    gx1, gy, gx2, gz = grads
    grad_z1 = torch.empty(batch, dim, device=z1.device, dtype=z1.dtype)
    grad_z2 = torch.empty(batch, dim, device=z2.device, dtype=z2.dtype)
    if smooth_state is not None:
        q2, nb, w = smooth_state
        k = nb.shape[1]
        z2_ = z2
        strides = (gz.stride(0), z2.stride(0), z2.stride(1), q2.stride(0), q2.stride(1), nb.stride(0),
                   nb.stride(1), w.stride(0))
    else:
        g_s = gx2 = gz = z2_ = q2 = nb = w = None
        k = 1
        strides = (0,) * 8
    _iscse_loss_bwd_kernel[(batch,)](
        g_cl, g_s, gx1, gy, gx2, gz, z2_, q2, nb, w, grad_z1, grad_z2,
        dim, 1.0 / attn_temperature, _EPS,
        gy.stride(0), *strides, grad_z1.stride(0), grad_z2.stride(0),
        K=k, K_PAD=k_pad(k), BLOCK_D=row_block_d(dim, z1.device), MEAN=bool(mean) and smooth_state is not None,
        num_warps=4,
    )
    return grad_z1, grad_z2
