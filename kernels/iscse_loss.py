"""The fused IS-CSE loss ``(L_cl, L_s)``: the launchers ``iscse_loss_forward`` / ``iscse_loss_backward`` and
``_iscse_loss_scale_kernel``.

What it computes, for one step (docs/concepts.md: The computation; The fused path): ``L_cl = InfoNCE(z1, z2)`` and, with smoothing on,
``L_s = InfoNCE(z1, z*)`` where ``z*`` aggregates ``q2 = normalize(z2)`` with its ``k`` nearest buffer rows; and
in backward ``grad z1``, ``grad z2`` for upstream gradients ``g_cl``, ``g_s`` of the two losses.

Forward (:func:`iscse_loss_forward`): the kNN chunk kernel (:func:`iscse.kernels.knn_topk.knn_topk_candidates`,
skipped when the neighbour slots come from another backend), the aggregation kernel
(:func:`iscse.kernels.smooth.smooth_forward`, which also merges the kNN's per-chunk candidates) and the dual
InfoNCE's row and column passes (:func:`iscse.kernels.info_nce.info_nce_passes`), which leave the losses, the
split-0 accumulators, the other splits' partials and statistics. Four launches. Without smoothing only the two
passes run (``L_s = 0``).

The gradients come from one more launch, the InfoNCE's gradients kernel
(:func:`iscse.kernels.info_nce.info_nce_grads`), which merges the partials into the four InfoNCE gradients and
runs the smooth and ``normalize`` backward of ``L_s`` on the neighbour rows. Where it runs depends on what it
needs at backward time (:func:`hold_for_backward`): the ``B x k x D`` gathered rows (the buffer may no longer hold
them: a push in between, as with two losses before one backward) and the InfoNCE partials.

- Held (at most :data:`HOLD_MAX_BYTES`, 32 MiB, of rows and partials; the paper's 64 x 16 x 768 fp32: 3 MiB of
  rows, 2.3 MiB of partials): the aggregation kernel saves a copy of the rows, the forward keeps the passes' results,
  and the backward is the gradients kernel itself, reading ``g_cl`` and ``g_s`` from device memory and writing
  ``grad z1 = g_cl dL_cl/dz1 + g_s dL_s/dz1``, ``grad z2 = g_cl dL_cl/dz2 + g_s dL_s/dz2`` in the inputs' dtypes
  (it only reads what was held: a second backward gives the same). Five launches per step, three without
  smoothing.
- Made in forward (larger): the rows would be the largest allocation of the step (48 MiB at B = 1024, D = 768,
  k = 16, fp32, ``bench/gpu_bench.py --memory``), and the partials 36 MiB more, so nothing is held: the forward
  runs the gradients kernel with both factors 1, in place over the accumulators, on the rows read from the buffer
  through the slots (no later push has happened yet), and keeps the four fp32 ``(B, D)`` gradients; the backward
  (``_iscse_loss_scale_kernel``) scales and adds them. Six launches (four without smoothing), a ``B x k x D``
  write and read fewer. The forward skips the gradients kernel when no input needs a gradient.

Every term is linear in its upstream gradient, so both ways compute the same function. No atomics and no host
synchronisation: a step can be captured in a CUDA graph. ``mean``: the aggregation's mean ablation (``MEAN`` in
the smooth kernels and the gradients kernel).

Supported: ``z1``/``z2`` fp32/bf16/fp16 with arbitrary strides (int64 offsets), buffer fp32/bf16/fp16, ``1 <= k <= 256``
and at most the rows that can be neighbours when the Triton kNN runs (:func:`iscse.kernels.knn_topk.check_k`), any
``B``, ``D``. The launchers launch on the current CUDA device and stream, as Triton does: the caller makes the tensors'
device current (:mod:`iscse.backends.triton_fused` does). Tested under the interpreter (tests/test_triton_interpret.py,
tests/test_ablations.py; both ways) and compiled for sm_90 with ptxas (``bench/gpu_bench.py --compile-only``);
tests/test_triton_gpu.py holds the GPU tests.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import row_block_d
from .info_nce import Passes, info_nce_grads, info_nce_passes, partial_bytes
from .knn_topk import knn_topk_candidates
from .smooth import smooth_forward

__all__ = ["iscse_loss_forward", "iscse_loss_backward", "hold_for_backward", "HOLD_MAX_BYTES", "Held", "Done",
           "pack", "unpack"]


#: Most bytes the fused forward holds for its backward beyond the ``(B, D)`` tensors (:func:`hold_for_backward`):
#: the ``B x k x D`` neighbour rows plus the dual InfoNCE's split partials. 32 MiB holds them (one launch fewer)
#: up to B = 181 at k = 16, D = 768 fp32 (the paper's B = 64: 3 MiB of rows, 2.3 MiB of partials; B = 128:
#: 6 + 10.6 MiB), and not at (512, 16, 1024) or (1024, 16, 768), where they would be 60-90 MiB.
HOLD_MAX_BYTES = 32 * 2**20


@triton.jit
def _iscse_loss_scale_kernel(
    # pointers (None where absent)
    G_CL, G_S, GX1, GY, GX2, GZ2, GRAD_Z1, GRAD_Z2,
    # sizes and strides
    D, stride_gb, stride_o1b, stride_o2b,
    # meta-parameters
    BLOCK_D: tl.constexpr,
):
    """Per row, when the forward made the four gradients: ``grad z1 = g_cl GX1 + g_s GX2``,
    ``grad z2 = g_cl GY + g_s GZ2`` (a loss whose factor is None is left out)."""
    row = tl.program_id(0).to(tl.int64)  # row * stride in int64: B * D may pass 2**31
    offs_d = tl.arange(0, BLOCK_D)
    g_cl = 0.0
    if G_CL is not None:
        g_cl = tl.load(G_CL).to(tl.float32)
    g_s = 0.0
    if G_S is not None:
        g_s = tl.load(G_S).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        out = tl.zeros([BLOCK_D], tl.float32)
        gx = tl.zeros([BLOCK_D], tl.float32)
        if G_CL is not None:
            out += g_cl * tl.load(GY + row * stride_gb + d, mask=d_mask, other=0.0)
            gx += g_cl * tl.load(GX1 + row * stride_gb + d, mask=d_mask, other=0.0)
        if G_S is not None:
            out += g_s * tl.load(GZ2 + row * stride_gb + d, mask=d_mask, other=0.0)
            gx += g_s * tl.load(GX2 + row * stride_gb + d, mask=d_mask, other=0.0)
        tl.store(GRAD_Z2 + row * stride_o2b + d, out, mask=d_mask)
        tl.store(GRAD_Z1 + row * stride_o1b + d, gx, mask=d_mask)


def hold_for_backward(batch: int, k: int, dim: int, device: torch.device, *, smooth: bool = True,
                      buffer_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the fused forward leaves the gradients to the backward, holding the neighbour rows (``B k D`` of
    ``buffer_dtype``, with smoothing) and the dual InfoNCE's split partials till then: when those take at most
    :data:`HOLD_MAX_BYTES` (see the module docstring)."""
    rows = batch * k * dim * buffer_dtype.itemsize if smooth else 0
    return rows + partial_bytes(batch, dim, device, has_z=smooth, dtype=dtype) <= HOLD_MAX_BYTES


class Held(NamedTuple):
    """Forward state when the backward makes the gradients: the passes' results and the smooth part's inputs
    ``(q2, rows, None, w)`` (None without smoothing)."""

    passes: Passes
    smooth: Optional[tuple]


class Done(NamedTuple):
    """Forward state when the forward made the gradients: ``dL_cl/dz1``, ``dL_cl/dz2``, ``dL_s/dz1``, ``dL_s/dz2``
    (fp32 ``(B, D)``; the last two None without smoothing)."""

    grads: tuple


def iscse_loss_forward(z1: torch.Tensor, z2: torch.Tensor, q2: torch.Tensor, storage: torch.Tensor,
                       self_slots: Optional[torch.Tensor], k: int, temperature: float, attn_temperature: float, *,
                       idx: Optional[torch.Tensor] = None, smooth: bool = True, mean: bool = False,
                       hold: Optional[bool] = None, grads: bool = True):
    """Forward of the fused IS-CSE loss: ``(loss_cl, loss_s, state)``.

    ``z1``, ``z2`` ``(B, D)``; ``q2 = normalize(z2)``; ``storage`` ``(M, D)``; ``self_slots`` int64 ``(B,)`` (slots
    excluded from the kNN) or None; ``idx`` int ``(B, k)``: neighbour slots found elsewhere (the Triton kNN is then
    skipped), or None. ``smooth=False``: no kNN and no aggregation, ``loss_s`` is 0. ``hold``: leave the gradients
    to the backward (None: :func:`hold_for_backward` decides); ``grads=False``: no gradient will be wanted (when
    not holding, the gradients kernel is skipped). Returns the two 0-dim fp32 losses and a :class:`Held`, a
    :class:`Done` or None (``grads=False``, not holding): what :func:`iscse_loss_backward` takes.
    """
    batch, dim = z2.shape
    if hold is None:
        hold = hold_for_backward(batch, k, dim, z2.device, smooth=smooth, buffer_dtype=storage.dtype,
                                 dtype=z1.dtype)
    z_star = sm = None
    if smooth:
        if idx is None:
            cands = knn_topk_candidates(q2, storage, k, self_slots)
            z_star, w, slots, _, nb = smooth_forward(q2, storage, k, attn_temperature, candidates=cands, mean=mean,
                                                     save_rows=hold)
            del cands  # not held through the dual InfoNCE's partial buffers
        else:
            z_star, w, slots, _, nb = smooth_forward(q2, storage, k, attn_temperature, idx=idx, mean=mean,
                                                     save_rows=hold)
        # The rows: the saved copy, or (read in this forward, before any later push) the buffer through the slots.
        sm = (q2, nb, None, w) if hold else (q2, storage, slots, w)
    p = info_nce_passes(z1, z2, z_star, temperature)
    if hold:
        return p.loss_cl, p.loss_s, Held(p, sm)
    if not grads:
        return p.loss_cl, p.loss_s, None
    g = info_nce_grads(p, smooth=sm, attn_temperature=attn_temperature, mean=mean)
    return p.loss_cl, p.loss_s, Done(g)


def iscse_loss_backward(g_cl: Optional[torch.Tensor], g_s: Optional[torch.Tensor], state, attn_temperature: float,
                        mean: bool = False, *, dtypes: Tuple[torch.dtype, torch.dtype]):
    """The backward of the fused IS-CSE loss, one launch: ``(grad_z1, grad_z2)`` in ``dtypes`` (``z1``'s, ``z2``'s).

    ``g_cl`` / ``g_s``: 0-dim fp32 grads of ``L_cl`` / ``L_s`` (None: that loss gets no gradient; ``g_s`` is
    ignored without smoothing). ``state``: what :func:`iscse_loss_forward` returned (not None). A :class:`Held`
    state runs the gradients kernel (:func:`iscse.kernels.info_nce.info_nce_grads`) with the factors, reading the
    held tensors only; a :class:`Done` state runs ``_iscse_loss_scale_kernel``. ``mean``: the forward used mean
    aggregation.
    """
    if isinstance(state, Held):
        p = state.passes
        batch, dim = p.x.shape
        out = (torch.empty(batch, dim, device=p.x.device, dtype=dtypes[0]),
               torch.empty(batch, dim, device=p.x.device, dtype=dtypes[1]))
        return info_nce_grads(p, g_cl=g_cl, g_s=g_s, out=out, with_cl=g_cl is not None, with_s=g_s is not None,
                              smooth=state.smooth, attn_temperature=attn_temperature, mean=mean)
    gx1, gy, gx2, gz2 = state.grads
    batch, dim = gx1.shape
    if gx2 is None:
        g_s = None
    grad_z1 = torch.empty(batch, dim, device=gx1.device, dtype=dtypes[0])
    grad_z2 = torch.empty(batch, dim, device=gx1.device, dtype=dtypes[1])
    cl_terms = (gx1, gy) if g_cl is not None else (None, None)
    s_terms = (gx2, gz2) if g_s is not None else (None, None)
    _iscse_loss_scale_kernel[(batch,)](
        g_cl, g_s, *cl_terms, *s_terms, grad_z1, grad_z2, dim, gx1.stride(0), grad_z1.stride(0), grad_z2.stride(0),
        BLOCK_D=row_block_d(dim, gx1.device), num_warps=4,
    )
    return grad_z1, grad_z2


def pack(state) -> Tuple[tuple, tuple]:
    """``(tensors, meta)`` of a forward state, for ``ctx.save_for_backward(*tensors)``; :func:`unpack` inverts."""
    if isinstance(state, Held):
        p = state.passes
        tensors = (p.x, p.y, p.z, p.gx1, p.gy, p.gx2, p.gz, p.rpart, p.cpart, p.pstats, p.cstats)
        return tensors + tuple(state.smooth or (None,) * 4), ("held", p.n_r, p.n_c, p.scale, state.smooth is not None)
    return tuple(state.grads), ("done",)


def unpack(tensors: tuple, meta: tuple):
    """The forward state that :func:`pack` took apart."""
    if meta[0] == "held":
        x, y, z, gx1, gy, gx2, gz, rpart, cpart, pstats, cstats = tensors[:11]
        p = Passes(x, y, z, None, None, gx1, gy, gx2, gz, rpart, cpart, pstats, cstats, *meta[1:4])
        return Held(p, tuple(tensors[11:]) if meta[4] else None)
    return Done(tuple(tensors))
