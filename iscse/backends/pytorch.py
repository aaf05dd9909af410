"""``backend="torch"``: IS-CSE in plain, efficient PyTorch (the default on CPU).

Versus the reference: ``topk`` instead of a full ``argsort``; similarities computed in chunks of buffer rows, so the
extra memory is O(B * chunk) rather than O(B * M); the self slot masked by index instead of assuming it ranks first;
the attention logits of the neighbours are the top-k values themselves (no second pass over the gathered rows in
forward), plus the self logit ``|q|^2``. Low-precision inputs (bf16, fp16) are computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend

__all__ = ["TorchBackend", "knn_topk", "smooth", "info_nce", "SmoothFunction"]

# Elements of one similarity chunk (B x chunk): 2**21 fp32 values = 8 MiB, whatever B is.
_CHUNK_ELEMENTS = 1 << 21


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def knn_topk(q: torch.Tensor, storage: torch.Tensor, k: int, self_slots=None, chunk_size: int | None = None):
    """Top-``k`` slots of ``storage`` (``(M, D)``) by dot product with each row of ``q`` (``(B, D)``).

    The buffer is streamed in chunks of ``chunk_size`` rows (default: about 2M similarities per chunk) and a
    running top-k is merged across chunks, so no ``(B, M)`` matrix exists. ``self_slots`` (int64 ``(B,)`` or None)
    are excluded. Returns ``vals`` (fp32, or fp64 for fp64 inputs) and int64 ``idx``, each ``(B, k)``, sorted by
    descending value. With a low-precision buffer the returned values are recomputed in fp32 from the chosen rows.
    """
    batch, size = q.shape[0], storage.shape[0]
    if chunk_size is None:
        chunk_size = max(1024, _CHUNK_ELEMENTS // max(batch, 1))
    low_precision = storage.dtype in (torch.bfloat16, torch.float16)
    qs = q.detach().to(storage.dtype)
    best_v = best_i = None
    for start in range(0, size, chunk_size):
        block = storage[start:start + chunk_size]  # (C, D)
        sim = qs @ block.t()  # (B, C)
        if self_slots is not None:
            cols = torch.arange(start, start + block.shape[0], device=q.device)
            sim.masked_fill_(cols.unsqueeze(0) == self_slots.unsqueeze(1), float("-inf"))
        v, i = sim.topk(min(k, block.shape[0]), dim=1)
        i += start
        if best_v is None:
            best_v, best_i = v, i
        else:
            v, i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
            best_v, pos = v.topk(min(k, v.shape[1]), dim=1)
            best_i = i.gather(1, pos)
    out_dtype = _compute_dtype(q.dtype, storage.dtype)
    if low_precision or q.dtype != storage.dtype:
        # Exact values for the chosen rows, in the compute precision (B * k * D work), sorted again: rounding in the
        # storage dtype may have ordered near ties differently (the neighbour set is the one ranked in that dtype).
        neighbours = storage[best_i].to(out_dtype)  # (B, k, D)
        best_v = torch.einsum("bd,bkd->bk", q.detach().to(out_dtype), neighbours)
        best_v, pos = best_v.sort(dim=1, descending=True)
        best_i = best_i.gather(1, pos)
    return best_v.to(out_dtype), best_i


class SmoothFunction(torch.autograd.Function):
    """``z* = softmax([|q|^2, vals] / t) @ [q; N]`` with ``N`` the gathered neighbour rows (constants).

    Forward takes the neighbour logits from ``vals`` (the kNN's top-k values) instead of recomputing ``q . N``;
    backward uses ``d(q . N_j)/dq = N_j``. Inputs: ``q`` ``(B, D)``, ``neighbours`` ``(B, k, D)``, ``vals``
    ``(B, k)``, all in the compute dtype.
    """

    @staticmethod
    def forward(ctx, q, neighbours, vals, attn_temperature: float):
        self_logit = (q * q).sum(dim=1, keepdim=True)  # (B, 1)
        logits = torch.cat([self_logit, vals], dim=1) / attn_temperature  # (B, k + 1)
        w = torch.softmax(logits, dim=1)
        z_star = w[:, :1] * q + torch.einsum("bk,bkd->bd", w[:, 1:], neighbours)  # (B, D)
        ctx.save_for_backward(q, neighbours, w)
        ctx.attn_temperature = attn_temperature
        return z_star

    @staticmethod
    def backward(ctx, grad_z):
        q, neighbours, w = ctx.saved_tensors
        t = ctx.attn_temperature
        # dL/dw_j = g . G_j, with G_0 = q and G_j = N_j.
        gw = torch.cat([(grad_z * q).sum(dim=1, keepdim=True),
                        torch.einsum("bd,bkd->bk", grad_z, neighbours)], dim=1)  # (B, k + 1)
        # softmax backward: dL/dlogit = w * (gw - sum_j w_j gw_j)
        glogit = w * (gw - (w * gw).sum(dim=1, keepdim=True)) / t
        grad_q = w[:, :1] * grad_z + 2.0 * glogit[:, :1] * q + torch.einsum("bk,bkd->bd", glogit[:, 1:], neighbours)
        return grad_q, None, None, None


def smooth(q: torch.Tensor, storage: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
           attn_temperature: float = 2.0, aggregation: str = "attention") -> torch.Tensor:
    """Smoothed positives ``z*`` ``(B, D)`` from the neighbour slots ``idx`` and their values ``vals`` ``(B, k)``.

    Computed in fp32 (fp64 for fp64 inputs) and returned in that dtype; differentiable in ``q``.
    ``aggregation="mean"``: ``z* = (q + sum_j N_j) / (k + 1)`` (``vals`` unused; plain autograd).
    """
    dtype = _compute_dtype(q.dtype, storage.dtype)
    neighbours = storage[idx].to(dtype)  # (B, k, D)
    if aggregation == "mean":
        return (q.to(dtype) + neighbours.sum(dim=1)) / (idx.shape[1] + 1)
    return SmoothFunction.apply(q.to(dtype), neighbours, vals.detach().to(dtype), attn_temperature)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """``CrossEntropy(cos(a_i, b_j) / temperature, target i)``, mean over rows, computed in fp32 (fp64 for fp64)."""
    dtype = _compute_dtype(a.dtype, b.dtype)
    an = F.normalize(a.to(dtype), dim=1)
    bn = F.normalize(b.to(dtype), dim=1)
    logits = an @ bn.t() / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


class TorchBackend(Backend):
    """The efficient PyTorch implementation (see the module docstring)."""

    name = "torch"

    def knn_topk(self, q, storage, k, self_slots, ptr=0):
        return knn_topk(q, storage, k, self_slots)

    def smooth(self, q, storage, idx, vals, attn_temperature, aggregation="attention"):
        return smooth(q, storage, idx, vals, attn_temperature, aggregation)

    def info_nce(self, a, b, temperature):
        return info_nce(a, b, temperature)
