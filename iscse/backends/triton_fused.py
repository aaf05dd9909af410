"""``backend="triton"``: the fused Triton kernels (:mod:`iscse.kernels`) behind autograd Functions (docs/concepts.md: The fused path).

One name per op through every layer, one kernel file (``kernels/``, installed as ``iscse.kernels``) per op, the
shared helpers in ``iscse.kernels._common``:

- ``iscse.kernels.knn_topk`` (``_knn_chunk_kernel``, ``_knn_merge_kernel``) -> :func:`knn_topk` (not
  differentiable: no autograd Function) -> :meth:`TritonBackend.knn_topk` -> :func:`iscse.knn_topk`;
- ``iscse.kernels.smooth`` (``_smooth_fwd_kernel``, ``_smooth_bwd_kernel``; ``smooth_forward`` /
  ``smooth_backward``) -> :class:`SmoothFunction` -> :func:`smooth` -> :func:`iscse.smooth`;
- ``iscse.kernels.info_nce`` (``_info_nce_rows_kernel``, ``_info_nce_cols_kernel``, ``_info_nce_grads_kernel``;
  ``info_nce_forward``) -> :class:`InfoNCEFunction` -> :func:`info_nce` -> :func:`iscse.info_nce`;
- ``iscse.kernels.iscse_loss`` (``_iscse_loss_scale_kernel``; ``iscse_loss_forward``, which runs the ops'
  forward launchers, and ``iscse_loss_backward``) -> :class:`ISCSELossFunction` -> :meth:`TritonBackend.iscse_loss`
  (the name the backend interface gives it) -> :func:`iscse.iscse_loss` -> :class:`iscse.ISCSELoss`.

The fused step (:meth:`TritonBackend.iscse_loss`) launches, in forward: the kNN chunk kernel, the aggregation kernel
(which also merges the kNN's per-chunk candidates) and the dual InfoNCE's row and column passes (the column pass
also writes the losses). The gradients come from the InfoNCE's gradients kernel, which merges the split partials
and runs the smooth and ``normalize`` backward: at small sizes (the paper's) it is the backward launch, reading
the neighbour rows and partials the forward held (five launches per step); where those are large
(:func:`iscse.kernels.iscse_loss.hold_for_backward`: over 32 MiB) it runs in forward, on rows read from the
buffer, and the backward launch only scales and adds (six). No host synchronisation (no ``.item()``, no Python
branch on device values: ``grad_output`` is read by the kernels from device memory), so a step can be captured in
a CUDA graph.

Contract at the boundary: CUDA tensors (or CPU tensors when Triton runs in its interpreter, ``TRITON_INTERPRET=1`` set
before ``triton`` is first imported: that is how CI tests the kernels); embeddings fp32/bf16/fp16 and buffers
fp32/bf16/fp16 (float64 raises ``TypeError``: use ``backend="torch"``); ``1 <= k <= 256``, and for the kNN at most the
rows that can be neighbours (``ValueError`` otherwise). Every launch happens with the inputs' CUDA device current
(Triton launches on the current device and stream). Inputs are read through their strides (int64 offsets); nothing is
copied except a non-contiguous ``idx`` or ``grad z*`` (and, in the interpreter only, a query of another dtype than the
buffer). Losses are fp32 scalars, ``z*`` fp32, gradients in the inputs' dtypes. The forward keeps the gathered neighbour
rows (``B x k x D``, buffer dtype) for backward, as the torch backend does, or, where they are large, makes in forward
everything that reads them; either way the buffer may be pushed to again before the backward. ``aggregation="mean"``
(the paper's ablation) is a ``MEAN`` constexpr of the smooth kernels (uniform weights ``1 / (k + 1)``);
``grouping="pddp"`` has no Triton version (:func:`iscse.iscse_loss` routes it to :mod:`iscse.pddp`). First-order
gradients only: a backward with ``create_graph=True`` (double backward) raises ``RuntimeError`` instead of returning
gradients without a graph; use ``backend="torch"`` there.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

try:
    import triton  # noqa: F401  (the import that fails when Triton is missing)
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    raise ImportError("backend='triton' needs the 'triton' package, which is not installed; install it with: "
                      "pip install 'iscse[triton]'") from exc

from ..kernels import info_nce as _nce
from ..kernels import iscse_loss as _loss
from ..kernels import knn_topk as _knn
from ..kernels import smooth as _smooth
from .base import Backend

__all__ = ["TritonBackend", "knn_topk", "smooth", "info_nce", "SmoothFunction", "InfoNCEFunction",
           "ISCSELossFunction", "INTERPRETED", "MAX_K"]

#: True when the kernels were built by Triton's interpreter (``TRITON_INTERPRET=1`` when triton was imported): they
#: then run on CPU tensors, slowly, for testing.
INTERPRETED = not isinstance(_knn._knn_chunk_kernel, JITFunction)

#: Largest supported k (the running top-k lives in registers, ``BLOCK_B x next_power_of_2(k)``).
MAX_K = _knn.MAX_K

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(**tensors: torch.Tensor) -> None:
    """dtype and device checks for the Triton kernels (the functional API has checked shapes already)."""
    for name, t in tensors.items():
        if t.dtype == torch.float64:
            raise TypeError(f"backend='triton' does not support float64 ({name} is float64); use backend='torch' "
                            f"(or 'reference') for float64, or pass float32/bfloat16/float16 tensors")
        if t.dtype not in _DTYPES:
            raise TypeError(f"backend='triton' supports float32, bfloat16 and float16; {name} is {t.dtype}")
        if t.device.type != "cuda" and not INTERPRETED:
            raise ValueError(f"backend='triton' needs CUDA tensors ({name} is on {t.device}); use backend='torch' "
                             f"on CPU (or set TRITON_INTERPRET=1 before importing triton to run the kernels in "
                             f"Triton's interpreter, for testing)")


def _check_k(k: int) -> None:
    if k > MAX_K:
        raise ValueError(f"backend='triton' supports k <= {MAX_K}, got k={k}; use backend='torch' for larger k")


def _on_device(t: torch.Tensor):
    """The context to launch kernels in for tensors like ``t``: its CUDA device made current
    (``torch.cuda.device``), since Triton launches on the current device and stream whatever the pointers are
    (tensors on ``cuda:1`` while ``cuda:0`` is current would be read through another device's context); a no-op
    context for CPU tensors (the interpreter) and ``meta`` ones."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _first_order(backward):
    """Decorator for the Functions' ``backward``: ``once_differentiable``, and an immediate ``RuntimeError`` under
    ``create_graph=True`` (grad mode is on in a backward exactly then). The kernels' gradients carry no graph, so a
    second derivative through them would be silently wrong (zero); ``once_differentiable`` alone raises only when
    the incoming gradients require grad, not for the usual ``torch.autograd.grad(loss, z, create_graph=True)``
    whose incoming gradient is a constant."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "backend='triton' has no double backward: its gradients are computed by kernels and carry no graph, "
                "so a backward with create_graph=True (second derivatives, gradient penalties, Hessian-vector "
                "products) would be silently wrong; use backend='torch' for that")
        return inner(ctx, *grads)

    return wrapper


def knn_topk(q: torch.Tensor, storage: torch.Tensor, k: int, self_slots: Optional[torch.Tensor] = None):
    """Top-``k`` slots of ``storage`` ``(M, D)`` by dot product with each row of ``q`` ``(B, D)``, the query's own
    slot (``self_slots``, int64 ``(B,)``) excluded. Returns fp32 ``vals`` (exact fp32 dot products) and int64
    ``idx``, each ``(B, k)``, sorted by descending value. Not differentiable. ``ValueError`` when ``k`` exceeds the
    rows that can be neighbours (``M``, or ``M - 1`` with ``self_slots``), where the result would repeat a slot."""
    _check(q=q, storage=storage)
    _check_k(k)
    _knn.check_k(k, storage.shape[0], self_slots is not None)
    if self_slots is not None:
        self_slots = self_slots.contiguous()
    with _on_device(q):
        return _knn.knn_topk(q.detach(), storage, k, self_slots)


class SmoothFunction(torch.autograd.Function):
    """``z* = softmax([|q|^2, vals] / t) @ [q; storage[idx]]``: the Triton version of
    ``iscse.backends.pytorch.SmoothFunction`` (same forward and backward math). Inputs ``q`` ``(B, D)``, ``storage``
    ``(M, D)``, ``idx`` int ``(B, k)``, ``vals`` ``(B, k)``; output fp32 ``(B, D)``; differentiable in ``q``.
    ``mean=True``: uniform weights (mean aggregation)."""

    @staticmethod
    def forward(ctx, q, storage, idx, vals, attn_temperature: float, mean: bool = False):
        with _on_device(q):
            z_star, w, _, _, nb = _smooth.smooth_forward(q.detach(), storage, idx.shape[1], attn_temperature,
                                                         idx=idx, vals=vals.detach(), mean=mean)
        ctx.save_for_backward(q, nb, w)
        ctx.attn_temperature = attn_temperature
        ctx.mean = mean
        return z_star

    @staticmethod
    @_first_order
    def backward(ctx, grad_z):
        q, nb, w = ctx.saved_tensors
        with _on_device(q):
            grad_q = _smooth.smooth_backward(grad_z, q.detach(), nb, w, ctx.attn_temperature, ctx.mean)
        return grad_q, None, None, None, None, None


def smooth(q: torch.Tensor, storage: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
           attn_temperature: float = 2.0, aggregation: str = "attention") -> torch.Tensor:
    """Smoothed positives ``z*`` fp32 ``(B, D)`` from neighbour slots ``idx`` and their logits' dot products
    ``vals`` (``(B, k)``); differentiable in ``q`` (gradient in ``q``'s dtype). ``aggregation="mean"``: the mean
    of ``[q; storage[idx]]``."""
    _check(q=q, storage=storage)
    _check_k(idx.shape[1])
    return SmoothFunction.apply(q, storage, idx, vals, attn_temperature, aggregation == "mean")


class InfoNCEFunction(torch.autograd.Function):
    """``mean_i CE(cos(a_i, b_.) / temperature, target i)``; its gradients are computed in forward (three launches)
    and scaled by ``grad_output`` in backward. Inputs ``(B, D)`` fp32/bf16/fp16; output a 0-dim fp32 tensor."""

    @staticmethod
    def forward(ctx, a, b, temperature: float):
        with _on_device(a):
            loss, _, ga, gb, _, _ = _nce.info_nce_forward(a.detach(), b.detach(), None, temperature)
        ctx.save_for_backward(ga, gb)
        ctx.dtypes = (a.dtype, b.dtype)
        return loss

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        ga, gb = ctx.saved_tensors
        return (ga * grad_out).to(ctx.dtypes[0]), (gb * grad_out).to(ctx.dtypes[1]), None


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE of ``a`` against ``b`` (``(B, D)``), in-batch negatives, fp32 scalar, differentiable in both."""
    _check(a=a, b=b)
    return InfoNCEFunction.apply(a, b, temperature)


class ISCSELossFunction(torch.autograd.Function):
    """``(L_cl, L_s)`` of one IS-CSE step, fused: forward :func:`iscse.kernels.iscse_loss.iscse_loss_forward`,
    backward :func:`iscse.kernels.iscse_loss.iscse_loss_backward` (one launch).

    ``forward(z1, z2, q2, storage, self_slots, idx, k, temperature, attn_temperature, smooth, mean)``: ``z1``, ``z2``
    ``(B, D)``; ``q2 = normalize(z2)`` (a value only: its gradient is folded into ``z2``'s inside the kernel);
    ``storage`` ``(M, D)``; ``self_slots`` int64 ``(B,)``; ``idx``: neighbour slots from another backend, or None to
    run the Triton kNN; ``mean``: mean aggregation instead of attention. Returns two 0-dim fp32 tensors (``L_s``
    is 0 when ``smooth`` is False); backward gets a gradient for each and scales each component by its own.
    Saved for backward: where they are small (:func:`iscse.kernels.iscse_loss.hold_for_backward`), the dual
    InfoNCE's accumulators and partials and the ``B x k x D`` neighbour rows, from which the backward makes the
    gradients; otherwise the four ``(B, D)`` fp32 gradients made in forward.
    """

    @staticmethod
    def forward(ctx, z1, z2, q2, storage, self_slots, idx, k: int, temperature: float, attn_temperature: float,
                smooth: bool, mean: bool = False):
        ctx.set_materialize_grads(False)
        z1, z2, q2 = z1.detach(), z2.detach(), q2.detach()
        with _on_device(z1):
            loss_cl, loss_s, state = _loss.iscse_loss_forward(
                z1, z2, q2, storage, self_slots, k, temperature, attn_temperature, idx=idx, smooth=smooth,
                mean=mean, grads=any(ctx.needs_input_grad[:2]))
        ctx.smooth = smooth
        ctx.attn_temperature = attn_temperature
        ctx.mean = mean
        ctx.dtypes = (z1.dtype, z2.dtype)
        ctx.meta = None
        if state is not None:
            tensors, ctx.meta = _loss.pack(state)
            ctx.save_for_backward(*tensors)
        return loss_cl, loss_s

    @staticmethod
    @_first_order
    def backward(ctx, g_cl, g_s):
        none = (None,) * 9
        if not ctx.smooth:
            g_s = None
        if (g_cl is None and g_s is None) or ctx.meta is None:
            return (None, None) + none
        state = _loss.unpack(ctx.saved_tensors, ctx.meta)
        g_cl = g_cl.float() if g_cl is not None else None
        g_s = g_s.float() if g_s is not None else None
        with _on_device(state.passes.x if isinstance(state, _loss.Held) else state.grads[0]):
            grad_z1, grad_z2 = _loss.iscse_loss_backward(g_cl, g_s, state, ctx.attn_temperature, ctx.mean,
                                                         dtypes=ctx.dtypes)
        return (grad_z1 if ctx.needs_input_grad[0] else None, grad_z2 if ctx.needs_input_grad[1] else None) + none


class TritonBackend(Backend):
    """The fused Triton path (docs/concepts.md: The fused path): kNN + aggregation + dual InfoNCE, forward and backward."""

    name = "triton"

    def check_inputs(self, z1, z2, storage, k):
        """float64, a non-CUDA tensor (outside the interpreter) or ``k > 256`` raise here, before a push."""
        _check(z1=z1, z2=z2, storage=storage)
        if k is not None:
            _check_k(k)

    def knn_topk(self, q, storage, k, self_slots, ptr=0):
        """See :func:`knn_topk` (``ptr`` is unused: slots are storage indices)."""
        return knn_topk(q, storage, k, self_slots)

    def smooth(self, q, storage, idx, vals, attn_temperature, aggregation="attention"):
        """See :func:`smooth`."""
        return smooth(q, storage, idx, vals, attn_temperature, aggregation)

    def info_nce(self, a, b, temperature):
        """See :func:`info_nce`."""
        return info_nce(a, b, temperature)

    def iscse_loss(self, z1, z2, q2, storage, self_slots, ptr, *, k, temperature, attn_temperature, smooth,
                   knn: Optional[Backend] = None, aggregation: str = "attention"):
        """``(L_cl, L_s)`` fused (:class:`ISCSELossFunction`); ``L_s`` is 0 when ``smooth`` is False.

        ``smooth`` is a Python bool that selects the kernels (:func:`iscse.iscse_loss` passes True and masks
        ``L_s`` with the buffer's device "full" flag, so this never branches on a device value); ``self_slots`` may
        be None (nothing excluded: an evaluation call); ``ptr`` is only handed on to a non-Triton ``knn``.

        ``q2`` must be ``F.normalize(z2, dim=-1)`` (as :func:`iscse.iscse_loss` passes it): its value feeds the kNN
        and the aggregation, and the gradient through it is added to ``z2``'s inside the backward kernel (``q2``'s
        own graph is not used). ``knn``: another backend to find the neighbours (e.g. FAISS); the Triton kNN runs
        when it is None or a Triton backend. ``aggregation="mean"``: the kernels' ``MEAN`` specialisation.
        """
        _check(z1=z1, z2=z2, storage=storage)
        _check_k(k)
        idx = None
        if smooth:
            if self_slots is not None:
                self_slots = self_slots.contiguous()
            if knn is not None and not isinstance(knn, TritonBackend):
                _, idx = knn.knn_topk(q2.detach(), storage, k, self_slots, ptr)
        return ISCSELossFunction.apply(z1, z2, q2, storage, self_slots, idx, k, temperature, attn_temperature,
                                       bool(smooth), aggregation == "mean")
