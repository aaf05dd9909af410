"""PDDP grouping, the IS-CSE paper's clustering ablation (``grouping="pddp"``): torch only.

The released code's ``find_neighbors_and_aggregation(mode='pddp')`` (transcribed in
:func:`iscse.reference.pddp_aggregate`) groups the set ``X = [q2; the M - B buffer rows before the batch]`` (``M``
rows, the first ``B`` the batch's normalised second views, which carry gradient) by Principal Direction Divisive
Partitioning (Boley, "Principal Direction Divisive Partitioning", Data Mining and Knowledge Discovery 1998):

1. centre the rows once (``X - mean(X)``); never re-centred below;
2. ``M // k - 1`` times: take the first group of the list (the largest), split it on the sign of the first
   right-singular vector of its centred rows (``torch.linalg.svd``; ``v <= 0`` left, ``v > 0`` right), put the
   non-empty sides ``[left, right]`` in front of the remaining groups and sort the list by size, largest first, with
   Python's stable sort. A split that puts every row on one side leaves the list as it was, so every later split
   repeats it: the tree stops growing there (this module stops at that point instead of repeating the SVD);
3. each query ``q2_i`` (row ``i`` of ``X``) is smoothed over its own group ``G(i)``: ``aggregation="attention"``:
   ``z*_i = sum_{j in G(i)} softmax_j(q2_i . x_j / attn_temperature) x_j``; ``aggregation="mean"``:
   ``z*_i = mean_{j in G(i)} x_j``. The gradient flows through ``q2_i`` and through every in-batch row of ``G(i)``
   (rows ``0..B-1`` of ``X`` are ``q2`` itself, not detached copies), as in the released code.

Equal to the transcription (tests/test_ablations.py, float64), with these differences, none of which changes a value:
the released code masks other groups by adding ``-10000`` to the logits, this module by ``-inf`` (the logits are
``|q2_i . x_j| / t <= 1 / t`` and the query's own logit is in its group, so ``exp(-10000 + ...)`` is exactly 0 in
fp32 and fp64 alike); the released code builds a dense ``M x M`` mask, this module compares group ids
(``B x M``); the tree is built on detached values (the SVD only chooses signs, no gradient flows through it); the
loop stops once a split fails instead of repeating it. The SVD call and the centring are the released ones, on the
same rows in the same order, so the sign of each singular vector, hence which side is "left" and how equal-sized
groups are ordered, is the same.

``aggregation="mean"`` with PDDP is not in the released code (``aggr='mean'`` reads ``nearest_neighbors``, which only
the kNN branch sets: a ``NameError``); here it is the mean of the query's group, as above.

Costs and host reads: up to ``M // k - 1`` SVDs of ``D x n`` matrices per step (``full_matrices=True``, as released)
and Python loops over data-dependent group sizes, so a step reads the device on the host (a synchronisation on
CUDA), cannot be captured in a CUDA graph and breaks a ``torch.compile`` graph. There is no Triton or FAISS version:
:func:`iscse.iscse_loss` routes ``grouping="pddp"`` here whatever ``backend`` it is given (``backend="reference"``:
to the transcription).
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Tuple

import torch

from . import reference

__all__ = ["pddp_groups", "pddp_smooth", "pddp_losses", "check_pddp"]


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


@torch.no_grad()
def pddp_groups(rows: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Group id of each row of ``rows`` (``(N, D)``) after up to ``n_groups - 1`` released-style PDDP splits.

    See the module docstring for the rules (centred once, largest group first, ``<= 0`` left, ``[left, right]``
    prepended, stable sort by size, stop at the first split that puts every row on one side). Returns int64
    ``(N,)`` ids ``0..G-1`` in the final list order (``G <= n_groups``). Reads group sizes on the host.
    """
    n = rows.shape[0]
    device = rows.device
    # Centring exactly as released (same ops, same rounding), on the transposed (D, N) matrix.
    x = rows.transpose(0, 1) - rows.transpose(0, 1).mean(-1, keepdim=True)  # (D, N)
    groups: List[torch.Tensor] = [torch.arange(n, device=device)]
    for _ in range(1, n_groups):
        idx = groups[0]
        right = torch.linalg.svd(x[:, idx])[2][0]  # first right-singular vector, (n_0,)
        left_idx, right_idx = idx[right <= 0], idx[right > 0]
        if left_idx.numel() == 0 or right_idx.numel() == 0:
            break  # the released loop would repeat this same split until the end: nothing changes any more
        groups = sorted([left_idx, right_idx] + groups[1:], key=lambda g: g.numel(), reverse=True)
    gid = torch.empty(n, dtype=torch.int64, device=device)
    for g, idx in enumerate(groups):
        gid[idx] = g
    return gid


def pddp_smooth(q: torch.Tensor, older: torch.Tensor, k: int, attn_temperature: float = 2.0,
                aggregation: str = "attention") -> torch.Tensor:
    """Smoothed positives ``z*`` ``(B, D)`` by PDDP groups over ``[q; older]`` (the module docstring).

    Args:
        q: ``(B, D)`` the normalised second views ``q2`` (differentiable).
        older: ``(M - B, D)`` the buffer rows before the batch, oldest first (:meth:`iscse.MemoryBuffer.rows`
            order; constants). ``M = B + len(older)`` and ``M // k`` groups are built (``1 <= k <= M``).
        k: the group size parameter (the number of groups is ``M // k``).
        attn_temperature: the attention divisor (2). aggregation: ``"attention"`` or ``"mean"``.

    Returns ``z*`` in fp32 (fp64 for fp64 inputs), differentiable in ``q``.
    """
    dtype = _compute_dtype(q.dtype, older.dtype)
    qc = q.to(dtype)
    s = torch.cat([qc, older.to(dtype)], dim=0)  # (M, D); rows 0..B-1 carry gradient
    batch = q.shape[0]
    gid = pddp_groups(s.detach(), s.shape[0] // k)
    same = gid[:batch, None] == gid[None, :]  # (B, M): row j is in query i's group (i's own row always is)
    if aggregation == "mean":
        w = same.to(dtype)
        w = w / w.sum(dim=1, keepdim=True)
    else:
        logits = (qc @ s.transpose(0, 1)) / attn_temperature  # (B, M)
        w = torch.softmax(logits.masked_fill(~same, float("-inf")), dim=1)
    return w @ s


def check_pddp(k, size: int, knn_backend: Optional[object] = None) -> int:
    """``k`` for ``grouping="pddp"``: an int with ``1 <= k <= size`` (``size // k >= 1`` groups); ``knn_backend``
    must be None (PDDP has no kNN step). Raises ``TypeError`` / ``ValueError`` naming the argument."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k > size:
        raise ValueError(f"grouping='pddp' builds buffer_size // k groups, so k must be in [1, buffer_size="
                         f"{size}], got k={k}")
    if knn_backend is not None:
        raise ValueError(f"knn_backend={knn_backend!r} has no effect with grouping='pddp' (it has no kNN step); "
                         f"pass knn_backend=None")
    return int(k)


def pddp_losses(impl, z1: torch.Tensor, z2: torch.Tensor, q2: torch.Tensor, buffer, pushed: bool, *, k: int,
                temperature: float, attn_temperature: float, aggregation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(L_cl, L_s)`` of one ``grouping="pddp"`` step (called by :func:`iscse.iscse_loss` after validation).

    ``pushed``: the caller has just pushed ``q2`` (a training step). ``L_cl`` and ``L_s``'s InfoNCE by ``impl`` (the
    backend), ``z*`` by :func:`pddp_smooth` (by :func:`iscse.reference.pddp_aggregate` when ``impl`` is the reference
    backend). ``L_s`` is zero, and the grouping skipped, until the buffer is full: a host read of the "full" flag, as the step
    reads the host anyway. ``pushed=False``: the set is ``[q2; the M - B newest rows]``, the one a training step with
    the same batch would use, and the buffer is left unchanged.
    """
    batch, size = q2.shape[0], buffer.size
    if pushed:
        older = buffer.rows()[:size - batch]  # the rows before the batch, oldest first (the reference's lbuf[:-B])
    else:
        older = buffer.rows()[batch:]  # the rows that stay if the batch were pushed
    l_cl = impl.info_nce(z1, z2, temperature)
    if not buffer.full:
        return l_cl, torch.zeros((), dtype=l_cl.dtype, device=l_cl.device)
    if getattr(impl, "name", None) == "reference":
        lbuf = torch.cat([older, q2.detach().to(older.dtype)], dim=0)  # the reference's buffer after the push
        aggr = "attn" if aggregation == "attention" else aggregation
        z_star = reference.pddp_aggregate(q2, lbuf, k, attn_temperature, aggr)
    else:
        z_star = pddp_smooth(q2, older, k, attn_temperature, aggregation)
    return l_cl, impl.info_nce(z1, z_star, temperature)
