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

The neighbour rows (:func:`keep_rows`): the smooth backward needs the ``B x k x D`` gathered rows, which the buffer
may no longer hold at backward time (a push in between: two losses before one backward). Where they take at most
:data:`KEEP_ROWS_MAX_BYTES` (8 MiB; the paper's 64 x 16 x 768 fp32 is 3 MiB) the aggregation kernel saves a copy
and the backward reads it. Above that, the copy would be the largest allocation of the step (48 MiB of 102.5 at
B = 1024, D = 768, k = 16, fp32, ``bench/gpu_bench.py --memory``), so nothing is saved: since the InfoNCE has made
``dL_s/dz*`` in forward already, and the rest of ``L_s``'s backward is linear in its upstream gradient, one more
forward launch of ``_iscse_loss_bwd_kernel`` runs the smooth and ``normalize`` backward with ``g_s = 1`` on the
rows read from the buffer through the slots (no later push has happened yet) and leaves ``dL_s/dz2``; the backward
launch then only scales and adds. One more launch (seven in all), one ``B x k x D`` write and read fewer. Skipped
when ``z2`` needs no gradient.

Backward (:func:`iscse_loss_backward`, one launch of ``_iscse_loss_bwd_kernel``, one program per row): it reads
``g_cl`` and ``g_s`` from device memory (no host sync) and scales the InfoNCE gradients by them; with the rows
kept it also runs the smooth backward on ``g_s dL_s/dz*`` (the softmax backward and ``grad q`` row are the smooth
op's own ``@triton.jit`` helpers, :func:`~iscse.kernels.smooth.smooth_logit_grads` and
:func:`~iscse.kernels.smooth.smooth_grad_q`) and folds in the backward of ``q2 = z2 / max(|z2|, 1e-12)``
(``F.normalize``); it writes ``grad z1 = g_cl dL_cl/dz1 + g_s dL_s/dz1`` and
``grad z2 = g_cl dL_cl/dz2 + g_s dL_s/dz2`` in the inputs' dtypes. Absent inputs are passed as ``None`` (Triton
specialises them away as constexprs): ``G_CL`` when ``L_cl`` gets no gradient (its terms are dropped), ``G_S``
when the factor is 1 (the forward launch above), the smooth inputs (``GX2``, ``GZ``, ``Z2``, ``Q2``, ``NB``,
``W``) when smoothing was off or ``L_s`` gets no gradient, ``NB`` alone when the forward did the smooth part,
``IDX`` unless the rows are read from the buffer, ``GRAD_Z1`` in the forward launch.

So a step is six launches (seven with the rows dropped, four without smoothing), with no atomics and no host
synchronisation: it can be captured in a CUDA graph. ``mean``: the aggregation's mean ablation (``MEAN`` in the
smooth kernels and here).

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

__all__ = ["iscse_loss_forward", "iscse_loss_backward", "keep_rows", "KEEP_ROWS_MAX_BYTES"]

_EPS = 1e-12  # F.normalize's clamp on |z2|

#: Largest ``B x k x D`` block of neighbour rows (bytes, in the buffer's dtype) that the fused forward keeps for
#: its backward (:func:`keep_rows`): 8 MiB keeps them at the paper's shape (64 x 16 x 768 fp32: 3 MiB) and drops
#: them from (512, 16, 1024) up (16 MiB bf16, 32 MiB fp32; 48 MiB fp32 at B = 1024, D = 768).
KEEP_ROWS_MAX_BYTES = 8 * 2**20


@triton.jit
def _iscse_loss_bwd_kernel(
    # pointers (None where absent, see the module docstring)
    G_CL, G_S, GX1, GY, GX2, GZ, Z2, Q2, NB, IDX, W, GRAD_Z1, GRAD_Z2,
    # sizes
    D, inv_t, eps,
    # strides
    stride_gb, stride_gzb, stride_z2b, stride_z2d, stride_qb, stride_qd, stride_nbb, stride_nbk, stride_nbd,
    stride_ib, stride_wb, stride_o1b, stride_o2b,
    # meta-parameters
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr, MEAN: tl.constexpr,
):
    """Per row: the backward of the fused IS-CSE loss, or its smooth part alone (see the module docstring)."""
    row = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    g_cl = 0.0
    if G_CL is not None:
        g_cl = tl.load(G_CL).to(tl.float32)
    g_s = 1.0
    if G_S is not None:
        g_s = tl.load(G_S).to(tl.float32)
    if NB is not None:  # the smooth backward: rows saved (B, k, D), or gathered from the buffer through IDX
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
            g = tl.load(GZ + row * stride_gzb + d, mask=d_mask, other=0.0).to(tl.float32) * g_s
            q = tl.load(Q2 + row * stride_qb + d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
            nb = tl.load(NB + nb_off + d[None, :] * stride_nbd, mask=k_mask[:, None] & d_mask[None, :],
                         other=0.0).to(tl.float32)
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
            nb = tl.load(NB + nb_off + d[None, :] * stride_nbd, mask=k_mask[:, None] & d_mask[None, :],
                         other=0.0).to(tl.float32)
            gq = smooth_grad_q(g, q, nb, w0, gl0, gl)
            z = tl.load(Z2 + row * stride_z2b + d * stride_z2d, mask=d_mask, other=0.0).to(tl.float32)
            out = gq * inv_r - z * proj
            if G_CL is not None:
                out += g_cl * tl.load(GY + row * stride_gb + d, mask=d_mask, other=0.0)
            tl.store(GRAD_Z2 + row * stride_o2b + d, out, mask=d_mask)
            if GRAD_Z1 is not None:
                gx = g_s * tl.load(GX2 + row * stride_gb + d, mask=d_mask, other=0.0)
                if G_CL is not None:
                    gx += g_cl * tl.load(GX1 + row * stride_gb + d, mask=d_mask, other=0.0)
                tl.store(GRAD_Z1 + row * stride_o1b + d, gx, mask=d_mask)
    else:
        # No rows: grad z1 = g_cl dL_cl/dz1 + g_s dL_s/dz1, grad z2 = g_cl dL_cl/dz2 + g_s dL_s/dz2, the terms
        # whose inputs are present (GZ holds dL_s/dz2 itself here, made in forward).
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            out = tl.zeros([BLOCK_D], tl.float32)
            gx = tl.zeros([BLOCK_D], tl.float32)
            if G_CL is not None:
                out += g_cl * tl.load(GY + row * stride_gb + d, mask=d_mask, other=0.0)
                gx += g_cl * tl.load(GX1 + row * stride_gb + d, mask=d_mask, other=0.0)
            if GZ is not None:
                out += g_s * tl.load(GZ + row * stride_gzb + d, mask=d_mask, other=0.0)
            if GX2 is not None:
                gx += g_s * tl.load(GX2 + row * stride_gb + d, mask=d_mask, other=0.0)
            tl.store(GRAD_Z2 + row * stride_o2b + d, out, mask=d_mask)
            tl.store(GRAD_Z1 + row * stride_o1b + d, gx, mask=d_mask)


def keep_rows(batch: int, k: int, dim: int, dtype: torch.dtype) -> bool:
    """Whether the fused forward keeps the gathered neighbour rows for its backward (``B k D`` elements of the
    buffer's dtype up to :data:`KEEP_ROWS_MAX_BYTES`), rather than finishing the smooth part of the backward
    in forward (one more launch, no rows kept): see the module docstring."""
    return batch * k * dim * dtype.itemsize <= KEEP_ROWS_MAX_BYTES


def iscse_loss_forward(z1: torch.Tensor, z2: torch.Tensor, q2: torch.Tensor, storage: torch.Tensor,
                       self_slots: Optional[torch.Tensor], k: int, temperature: float, attn_temperature: float, *,
                       idx: Optional[torch.Tensor] = None, smooth: bool = True, mean: bool = False,
                       keep: Optional[bool] = None, grad_z2: bool = True):
    """Forward of the fused IS-CSE loss: ``(loss_cl, loss_s, grads, smooth_state)``.

    ``z1``, ``z2`` ``(B, D)``; ``q2 = normalize(z2)``; ``storage`` ``(M, D)``; ``self_slots`` int64 ``(B,)`` (slots
    excluded from the kNN) or None; ``idx`` int ``(B, k)``: neighbour slots found elsewhere (the Triton kNN is then
    skipped), or None. ``smooth=False``: no kNN and no aggregation, ``loss_s`` is 0. ``keep``: keep the neighbour
    rows for the backward (None: :func:`keep_rows` decides); ``grad_z2``: whether ``z2``'s gradient will be wanted
    (when False and the rows are not kept, the smooth part of its backward is skipped).

    Returns the two 0-dim fp32 losses, ``grads = (gx1, gy, gx2, gz)`` (fp32 ``(B, D)``, unscaled: ``dL_cl/dz1``,
    ``dL_cl/dz2``, ``dL_s/dz1``, and ``dL_s/dz*`` when the rows are kept, ``dL_s/dz2`` when they are not (None
    with ``grad_z2=False``); ``gx2``, ``gz`` None without smoothing) and ``smooth_state = (z2, q2, nb, w)`` when the
    rows are kept, else None: what :func:`iscse_loss_backward` takes.
    """
    z_star = state = None
    batch, dim = z2.shape
    if smooth:
        if keep is None:
            keep = keep_rows(batch, k, dim, storage.dtype)
        if idx is None:
            cands = knn_topk_candidates(q2, storage, k, self_slots)
            z_star, w, slots, _, nb = smooth_forward(q2, storage, k, attn_temperature, candidates=cands, mean=mean,
                                                     save_rows=keep)
            del cands  # not held through the dual InfoNCE's partial buffers
        else:
            z_star, w, slots, _, nb = smooth_forward(q2, storage, k, attn_temperature, idx=idx, mean=mean,
                                                     save_rows=keep)
    loss_cl, loss_s, gx1, gy, gx2, gz = info_nce_forward(z1, z2, z_star, temperature)
    if smooth:
        if keep:
            state = (z2, q2, nb, w)
        else:
            del z_star
            gz = _smooth_part_of_grad_z2(gz, z2, q2, storage, slots, w, attn_temperature, mean) if grad_z2 else None
    return loss_cl, loss_s, (gx1, gy, gx2, gz), state


def _smooth_part_of_grad_z2(gz: torch.Tensor, z2: torch.Tensor, q2: torch.Tensor, storage: torch.Tensor,
                            slots: torch.Tensor, w: torch.Tensor, attn_temperature: float, mean: bool):
    """``dL_s/dz2`` (fp32 ``(B, D)``) from ``gz = dL_s/dz*`` in one launch of ``_iscse_loss_bwd_kernel`` that reads
    the neighbour rows from ``storage`` through ``slots`` (the forward's, before any later push)."""
    batch, dim = z2.shape
    k = slots.shape[1]
    out = torch.empty(batch, dim, device=z2.device, dtype=torch.float32)
    _iscse_loss_bwd_kernel[(batch,)](
        None, None, None, None, None, gz, z2, q2, storage, slots, w, None, out,
        dim, 1.0 / attn_temperature, _EPS,
        0, gz.stride(0), z2.stride(0), z2.stride(1), q2.stride(0), q2.stride(1), 0, storage.stride(0),
        storage.stride(1), slots.stride(0), w.stride(0), 0, out.stride(0),
        K=k, K_PAD=k_pad(k), BLOCK_D=row_block_d(dim, z2.device), MEAN=bool(mean), num_warps=4,
    )
    return out


def iscse_loss_backward(g_cl: Optional[torch.Tensor], g_s: Optional[torch.Tensor],
                        grads: Tuple[Optional[torch.Tensor], ...], smooth_state, attn_temperature: float,
                        mean: bool = False, *, dtypes: Tuple[torch.dtype, torch.dtype]):
    """The backward of the fused IS-CSE loss in one launch of ``_iscse_loss_bwd_kernel``; returns
    ``(grad_z1, grad_z2)`` in ``dtypes`` (``z1``'s and ``z2``'s).

    ``g_cl`` / ``g_s``: 0-dim fp32 grads of ``L_cl`` / ``L_s`` (None: zero). ``grads``: ``(gx1, gy, gx2, gz)`` and
    ``smooth_state``: ``(z2, q2, nb, w)`` or None, as :func:`iscse_loss_forward` returned them (``gx2``, ``gz`` None:
    no smoothing, or no gradient of ``L_s`` w.r.t. that input). ``mean``: the forward used mean aggregation.
    """
    gx1, gy, gx2, gz = grads
    batch, dim = gx1.shape
    device = gx1.device
    if g_s is None:  # no gradient reaches L_s: its inputs are dropped, not multiplied by 0
        gx2 = gz = smooth_state = None
    if gx2 is None and gz is None:
        g_s = None
    if g_cl is None:
        gx1 = gy = None
    grad_z1 = torch.empty(batch, dim, device=device, dtype=dtypes[0])
    grad_z2 = torch.empty(batch, dim, device=device, dtype=dtypes[1])
    if smooth_state is not None:
        z2, q2, nb, w = smooth_state
        k = nb.shape[1]
        strides = (gz.stride(0), z2.stride(0), z2.stride(1), q2.stride(0), q2.stride(1), nb.stride(0),
                   nb.stride(1), nb.stride(2), 0, w.stride(0))
    else:
        z2 = q2 = nb = w = None
        k = 1
        strides = ((gz.stride(0) if gz is not None else 0),) + (0,) * 9
    _iscse_loss_bwd_kernel[(batch,)](
        g_cl, g_s, gx1, gy, gx2, gz, z2, q2, nb, None, w, grad_z1, grad_z2,
        dim, 1.0 / attn_temperature, _EPS,
        grads[0].stride(0), *strides, grad_z1.stride(0), grad_z2.stride(0),
        K=k, K_PAD=k_pad(k), BLOCK_D=row_block_d(dim, device), MEAN=bool(mean) and smooth_state is not None,
        num_warps=4,
    )
    return grad_z1, grad_z2
