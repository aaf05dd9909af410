"""Instance smoothing (attention aggregation): ``_smooth_fwd_kernel``, ``_smooth_bwd_kernel`` and host launchers.

Forward, one program per query row ``i`` (docs/concepts.md: The computation; The fused path):
1. the neighbour slots: either merged here from the kNN's per-chunk candidates
   (:func:`~iscse.kernels._common.merge_topk`, so the fused path needs no separate merge launch) or given
   (``idx``, e.g. from FAISS);
2. the attention logits ``[q_i . q_i, q_i . N_i1, ..., q_i . N_ik] / t_attn`` in fp32: the neighbour logits are
   the exact fp32 dot products of the gathered rows (or, for the standalone op, the given ``vals``, as the torch
   backend does), the self logit ``|q_i|^2`` is computed, not assumed to be 1;
3. ``w_i = softmax(logits)`` and ``z*_i = w_i0 q_i + sum_j w_ij N_ij``, written in fp32 with ``w`` (``(B, k+1)``),
   the slots, the logits' dot products and the neighbour rows (for backward).

Backward (``_smooth_bwd_kernel``), one program per row, the same math as
``iscse.backends.pytorch.SmoothFunction.backward``: ``gw = [g.q, g.N_j]``, ``glogit = w (gw - w.gw) / t``,
``grad_q = w_0 g + 2 glogit_0 q + sum_j glogit_j N_j``. The forward writes the gathered neighbour rows ``N``
(``(B, k, D)`` in the buffer's dtype, as the torch backend saves them) while it reads them for ``z*``, so the
backward needs nothing from the buffer: pushing to the buffer between a loss and its backward (two losses before one
backward, gradient accumulation) is fine, as with the torch backend. The extra write is ``B k D`` elements, small
next to the kNN's ``M D``; the fused loss skips it where it is large (``save_rows=False``, ``NB`` None: see
:mod:`iscse.kernels.iscse_loss`). The softmax backward and the ``grad q`` row are ``@triton.jit`` helpers
(:func:`smooth_logit_grads`, :func:`smooth_grad_q`) that the fused IS-CSE loss's gradients kernel
(:func:`iscse.kernels.info_nce.info_nce_grads`) calls too, so the math exists once.

Mean aggregation (the paper's ablation, ``MEAN=True`` in both kernels): ``w = 1 / (k + 1)`` for every row of
``[q_i; N_i]``, so ``z*_i`` is the group's mean and ``grad_q = g / (k + 1)`` (the weights do not depend on ``q``:
``glogit = 0``); the logits' dot products are still computed and written.

Supported: ``q`` fp32/bf16/fp16, buffer fp32/bf16/fp16, ``1 <= k <= 256``, any ``B``, ``D``, arbitrary strides for ``q``
and the buffer (int64 offsets; ``grad z*`` is made row-contiguous). The feature step narrows as k grows
(:func:`~iscse.kernels._common.row_block_d`), so the ``K_PAD x BLOCK_D`` neighbour tile stays in registers. All
arithmetic is fp32 (no ``tl.dot``: each row is a ``K_PAD x BLOCK_D`` tile). Tested under the interpreter up to k = 64
(Triton 3.9 and 3.6, tests/test_triton_interpret.py) and compiled for sm_90 with ptxas; the GPU tests
(tests/test_triton_gpu.py) have not run on a GPU yet.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import k_pad, merge_block, merge_topk, row_block_d

__all__ = ["smooth_forward", "smooth_backward", "smooth_logit_grads", "smooth_grad_q"]


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
    """Per query row: (merge candidates,) gather the k rows, softmax weights, ``z*``; saves the rows to ``NB``
    unless it is None."""
    row = tl.program_id(0).to(tl.int64)  # offsets in int64: the caller's strides may be large (knn_topk.py)
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
        d64 = d.to(tl.int64)
        q = tl.load(Q + row * stride_qb + d64 * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
        qq_acc += q * q
        if not USE_VALS:
            nb = tl.load(BUF + nb_off + d64[None, :] * stride_md, mask=k_mask[:, None] & d_mask[None, :],
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
        d64 = d.to(tl.int64)
        q = tl.load(Q + row * stride_qb + d64 * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
        nb_mask = k_mask[:, None] & d_mask[None, :]
        nb = tl.load(BUF + nb_off + d64[None, :] * stride_md, mask=nb_mask, other=0.0)
        if NB is not None:
            tl.store(NB + row * stride_nbb + kk[:, None] * stride_nbk + d[None, :], nb, mask=nb_mask)
        z = w0 * q + tl.sum(w[:, None] * nb.to(tl.float32), axis=0)
        tl.store(ZSTAR + row * stride_zb + d, z, mask=d_mask)


@triton.jit
def smooth_logit_grads(w0, w, gw0, gw, inv_t, MEAN: tl.constexpr):
    """Device helper, softmax backward of the aggregation: ``(dL/dlogit_0, dL/dlogit_j)`` from the weights ``w0``
    (scalar), ``w`` (``(K_PAD,)``, 0 past k) and ``gw0 = g.q``, ``gw_j = g.N_j``; the logits are divided by ``t``
    (``inv_t = 1/t``). ``MEAN``: constant weights, so no gradient through the logits (zeros)."""
    if MEAN:
        gl0 = tl.zeros_like(gw0)
        gl = tl.zeros_like(gw)
    else:
        # dL/dlogit_j = w_j (gw_j - sum_l w_l gw_l) / t
        gbar = w0 * gw0 + tl.sum(w * gw, axis=0)
        gl0 = w0 * (gw0 - gbar) * inv_t
        gl = w * (gw - gbar) * inv_t
    return gl0, gl


@triton.jit
def smooth_grad_q(g, q, nb, w0, gl0, gl):
    """Device helper: one ``BLOCK_D`` slice of ``grad q = w_0 g + 2 glogit_0 q + sum_j glogit_j N_j`` (fp32), from
    the slices ``g``, ``q`` (``(BLOCK_D,)``) and ``nb`` (``(K_PAD, BLOCK_D)``); ``2 q`` is the self logit's
    ``d|q|^2/dq``."""
    return w0 * g + 2.0 * gl0 * q + tl.sum(gl[:, None] * nb, axis=0)


@triton.jit
def _smooth_bwd_kernel(
    # pointers
    GZ, Q, NB, W, OUT_Q,
    # sizes
    D, inv_t,
    # strides
    stride_gzb, stride_qb, stride_qd, stride_nbb, stride_nbk, stride_wb, stride_oqb,
    # meta-parameters
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr, MEAN: tl.constexpr,
):
    """Per row: ``grad q`` of the smooth op from ``grad z*``, the saved neighbour rows and the weights."""
    row = tl.program_id(0).to(tl.int64)  # offsets in int64 (see _smooth_fwd_kernel)
    offs_d = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, K_PAD)
    k_mask = kk < K
    nb_off = row * stride_nbb + kk[:, None] * stride_nbk
    w0 = tl.load(W + row * stride_wb).to(tl.float32)
    w = tl.load(W + row * stride_wb + 1 + kk, mask=k_mask, other=0.0).to(tl.float32)
    gw = tl.zeros([K_PAD], tl.float32)
    gq_acc = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        g = tl.load(GZ + row * stride_gzb + d, mask=d_mask, other=0.0).to(tl.float32)
        q = tl.load(Q + row * stride_qb + d.to(tl.int64) * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
        nb = tl.load(NB + nb_off + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        gw += tl.sum(nb * g[None, :], axis=1)
        gq_acc += g * q
    gl0, gl = smooth_logit_grads(w0, w, tl.sum(gq_acc, axis=0), gw, inv_t, MEAN)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        g = tl.load(GZ + row * stride_gzb + d, mask=d_mask, other=0.0).to(tl.float32)
        q = tl.load(Q + row * stride_qb + d.to(tl.int64) * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
        nb = tl.load(NB + nb_off + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        tl.store(OUT_Q + row * stride_oqb + d, smooth_grad_q(g, q, nb, w0, gl0, gl), mask=d_mask)


def smooth_forward(q: torch.Tensor, storage: torch.Tensor, k: int, attn_temperature: float, *,
                   candidates: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   idx: Optional[torch.Tensor] = None, vals: Optional[torch.Tensor] = None, mean: bool = False,
                   save_rows: bool = True):
    """Launch ``_smooth_fwd_kernel`` (one program per row).

    ``q`` ``(B, D)`` (fp32/bf16/fp16), ``storage`` ``(M, D)``; neighbours from exactly one of ``candidates`` (the
    ``(cand_v, cand_i)`` of :func:`iscse.kernels.knn_topk.knn_topk_candidates`, merged here) or ``idx`` (int
    ``(B, k)`` slots). ``vals`` (``(B, k)``, with ``idx``): use these as the neighbour logits instead of the exact dot
    products. ``mean``: uniform weights ``1 / (k + 1)`` (mean aggregation). Returns ``(z_star, w, idx, dots, nb)``:
    fp32 ``(B, D)``, fp32 ``(B, k + 1)`` (column 0 the self weight), int64 ``(B, k)``, fp32 ``(B, k)`` (the logits'
    dot products used) and the neighbour rows ``(B, k, D)`` in the buffer's dtype (for backward), or None with
    ``save_rows=False`` (the fused loss's low-memory path, which needs no rows after its forward).
    """
    batch, dim = q.shape
    kp = k_pad(k)
    dev = q.device
    z_star = torch.empty(batch, dim, device=dev, dtype=torch.float32)
    w = torch.empty(batch, k + 1, device=dev, dtype=torch.float32)
    idx_out = torch.empty(batch, k, device=dev, dtype=torch.int64)
    dots = torch.empty(batch, k, device=dev, dtype=torch.float32)
    nb = torch.empty(batch, k, dim, device=dev, dtype=storage.dtype) if save_rows else None
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
        z_star.stride(0), w.stride(0), idx_out.stride(0), dots.stride(0), *(nb.stride()[:2] if save_rows else (0, 0)),
        K=k, K_PAD=kp, BLOCK_C=block_c, BLOCK_D=row_block_d(dim, dev, k), MERGE=merge, SINGLE=n_cand <= block_c,
        USE_VALS=use_vals, MEAN=bool(mean), num_warps=4,
    )
    return z_star, w, idx_out, dots, nb


def smooth_backward(grad_z: torch.Tensor, q: torch.Tensor, nb: torch.Tensor, w: torch.Tensor,
                    attn_temperature: float, mean: bool = False) -> torch.Tensor:
    """Launch ``_smooth_bwd_kernel`` (one program per row): ``grad q`` ``(B, D)`` in ``q``'s dtype for the
    standalone smooth op, from ``grad z*`` and the forward's neighbour rows ``nb`` ``(B, k, D)`` and weights ``w``
    ``(B, k + 1)``; ``mean`` as in :func:`smooth_forward`."""
    batch, dim = q.shape
    k = nb.shape[1]
    grad_z = grad_z.contiguous() if grad_z.stride(1) != 1 else grad_z
    grad_q = torch.empty(batch, dim, device=q.device, dtype=q.dtype)
    _smooth_bwd_kernel[(batch,)](
        grad_z, q, nb, w, grad_q,
        dim, 1.0 / attn_temperature,
        grad_z.stride(0), q.stride(0), q.stride(1), nb.stride(0), nb.stride(1), w.stride(0), grad_q.stride(0),
        K=k, K_PAD=k_pad(k), BLOCK_D=row_block_d(dim, q.device, k), MEAN=bool(mean), num_warps=4,
    )
    return grad_q
