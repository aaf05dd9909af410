"""The released IS-CSE code's operations, kept as the baseline every test and benchmark compares with.

These follow ``simcse/models.py`` of the paper's code (He et al., AAAI 2023) operation for operation: the memory
buffer is an fp32 tensor shifted with ``cat`` every step, neighbours come from a full ``argsort`` of the
similarities with rank 0 (the query itself) dropped, neighbour rows are gathered and aggregated with a batched
matmul whose attention logits are divided by 2, and both losses are cross-entropies over cosine similarities
divided by the temperature. Two deliberate departures, neither of which changes a value: ``.squeeze()`` became
``.squeeze(1)`` (the original breaks at batch size 1), and the hard-coded buffer size, k and attention divisor are
arguments. Nothing here is fast; use :func:`iscse.iscse_loss` or :class:`iscse.ISCSELoss` for training.

The released function's two ablations are here too (:func:`find_neighbors_and_aggregation` with ``mode="pddp"``
and/or ``aggr="mean"``; :func:`pddp_aggregate`), with the departures listed there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "new_buffer", "push", "knn", "aggregate", "pddp_aggregate", "find_neighbors_and_aggregation", "cos_sim_ce",
    "iscse_step",
    "ReferenceStep",
]


def new_buffer(size: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The reference's empty buffer: a ``(size, dim)`` tensor of zeros (``register_buffer('lbuf', zeros)``)."""
    return torch.zeros(size, dim, device=device, dtype=dtype)


def push(lbuf: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Return the shifted buffer ``cat([lbuf[B:], q2.detach()])``: the ``B`` oldest rows drop out (a new tensor)."""
    return torch.cat([lbuf[q2.shape[0]:, :], q2.detach().to(lbuf.dtype)], dim=0)


def knn(anchors: torch.Tensor, lbuf: torch.Tensor, k: int) -> torch.Tensor:
    """Ranks (row indices of ``lbuf``) of each anchor's ``k`` nearest rows by dot product, rank 0 dropped.

    ``anchors``: ``(B, D)``, ``lbuf``: ``(M, D)``; returns int64 ``(B, k)``. Rank 0 is the anchor's own row (it was
    pushed before the search), which is why the slice starts at 1.
    """
    sim = torch.matmul(anchors, lbuf.transpose(0, 1))  # (B, M)
    order = torch.argsort(sim, dim=-1, descending=True)
    return order[:, 1:k + 1].contiguous()


def aggregate(anchors: torch.Tensor, lbuf: torch.Tensor, idx: torch.Tensor,
              attn_temperature: float = 2.0, aggr: str = "attn") -> torch.Tensor:
    """The smoothed positives ``z*``: each anchor's group ``[anchor; its k neighbours]`` aggregated.

    ``aggr="attn"`` (the paper): attention of the anchor over its group, logits divided by ``attn_temperature``;
    ``aggr="mean"`` (the released ablation): the plain mean of the ``k + 1`` rows. ``anchors``: ``(B, D)`` (carries
    gradient), ``lbuf``: ``(M, D)``, ``idx``: ``(B, k)`` row indices of ``lbuf``. Returns ``(B, D)``.
    """
    batch_size = anchors.shape[0]
    k = idx.shape[1]
    neighbours = lbuf[idx.reshape(-1)].view(batch_size, k, -1).to(anchors.dtype)  # (B, k, D)
    group = torch.cat([anchors.unsqueeze(1), neighbours], dim=1)  # (B, k + 1, D)
    if aggr == "mean":
        return torch.mean(group, dim=1)
    if aggr != "attn":
        raise ValueError(f"aggr must be 'attn' or 'mean', got {aggr!r}")
    attn_score = torch.matmul(group[:, :1, :], group.transpose(1, 2)) / attn_temperature  # (B, 1, k + 1)
    attn_score = F.softmax(attn_score, dim=-1)
    return torch.matmul(attn_score, group).squeeze(1)  # (B, D)


def pddp_aggregate(anchors: torch.Tensor, lbuf: torch.Tensor, k: int, attn_temperature: float = 2.0,
                   aggr: str = "attn") -> torch.Tensor:
    """The released ``mode='pddp'`` branch: PDDP groups over ``[anchors; lbuf[:-B]]``, then aggregation per group.

    ``anchors``: ``(B, D)`` the batch's normalised ``q2`` (carries gradient); ``lbuf``: ``(M, D)`` the buffer
    *after* the batch was pushed (its last ``B`` rows are ``anchors.detach()``). The set ``X = [anchors; lbuf[:-B]]``
    has ``M`` rows and its first ``B`` carry gradient. Principal Direction Divisive Partitioning (Boley 1998), as
    released: the rows are mean-centred once, then ``M // k - 1`` times the largest group (first of the list) is
    split on the sign of the first right-singular vector of its centred rows (``<= 0`` left, ``> 0`` right; an
    empty side is dropped), ``[left, right]`` are put in front of the other groups, and the list is stably sorted by
    size, largest first. Sub-groups are never re-centred, so a split may put every row on one side: the same group
    is then "split" again, identically, and the tree stops growing. ``aggr="attn"``: each anchor attends over the
    whole set with logits ``anchor . x / attn_temperature``, ``-10000`` added outside its group (so, as in the
    released code, the gradient also flows through the other in-batch rows of its group); ``aggr="mean"``: the mean
    of its group's rows (the released code raises ``NameError`` for ``pddp`` + ``mean``: this is the meaning
    :func:`iscse.iscse_loss` gives it). Returns ``(B, D)``.
    """
    batch_size = anchors.shape[0]
    device = anchors.device
    buffer_size = lbuf.shape[0]
    Cmax = buffer_size // k
    undetached_buf = torch.cat([anchors, lbuf[:-batch_size]], dim=0)  # (M, D)
    # The covariance matrix is XX^T
    X = undetached_buf.transpose(0, 1) - undetached_buf.transpose(0, 1).mean(-1, keepdim=True)  # (D, M)
    # build PDDP tree
    groups = [X]
    groups_idx = [torch.arange(buffer_size).to(device)]
    for i in range(1, Cmax):
        node = groups[0]
        U, S, VT = torch.linalg.svd(node)
        rightvec = VT[0]
        indices_total = groups_idx[0]
        indices_L_mask = (rightvec <= 0)
        indices_R_mask = (rightvec > 0)
        indices_L = indices_total[indices_L_mask]
        indices_R = indices_total[indices_R_mask]
        groups_new = groups[1:]
        groups_idx_new = groups_idx[1:]
        if len(indices_R) > 0:
            groups_new = [node[:, indices_R_mask]] + groups_new
            groups_idx_new = [indices_R] + groups_idx_new
        if len(indices_L) > 0:
            groups_new = [node[:, indices_L_mask]] + groups_new
            groups_idx_new = [indices_L] + groups_idx_new
        sorted_groups = sorted(list(zip(groups_new, groups_idx_new)), key=lambda x: x[0].size(1), reverse=True)
        groups, groups_idx = zip(*sorted_groups)
        groups = list(groups)
        groups_idx = list(groups_idx)
    # find groups for in-batch samples
    attn_mask = torch.zeros(buffer_size, buffer_size).to(device)
    for g in groups_idx:
        select_mask = torch.zeros(buffer_size).to(device)
        select_mask[g] = 1
        select_mask = (select_mask.unsqueeze(-1) @ select_mask.unsqueeze(0)).bool()
        attn_mask[select_mask] = 1.
    if aggr == "mean":
        # Departure: the released code has no pddp + mean (NameError); here the mean of the anchor's group.
        member = attn_mask[:batch_size].to(undetached_buf.dtype)  # (B, M): 1 inside the anchor's group
        return torch.matmul(member / member.sum(-1, keepdim=True), undetached_buf)
    if aggr != "attn":
        raise ValueError(f"aggr must be 'attn' or 'mean', got {aggr!r}")
    attn_mask = (1 - attn_mask[:batch_size]) * (-10000.)  # bs, M
    attn_score = torch.matmul(anchors, undetached_buf.transpose(0, 1)) / attn_temperature
    attn_score += attn_mask
    attn_score = F.softmax(attn_score, dim=-1)
    return torch.matmul(attn_score, undetached_buf)


def find_neighbors_and_aggregation(anchors: torch.Tensor, lbuf: torch.Tensor, k: int,
                                   attn_temperature: float = 2.0, mode: str = "knn",
                                   aggr: str = "attn") -> torch.Tensor:
    """The paper's ``find_neighbors_and_aggregation(mode, aggr)``: ``mode="knn"`` is :func:`knn` then
    :func:`aggregate` (``k`` neighbours, group of ``k + 1``); ``mode="pddp"`` is :func:`pddp_aggregate` (``M // k``
    groups). ``aggr``: ``"attn"`` (the paper) or ``"mean"``. ``lbuf`` is the buffer after the batch's push."""
    if mode == "knn":
        return aggregate(anchors, lbuf, knn(anchors, lbuf, k), attn_temperature, aggr)
    if mode == "pddp":
        return pddp_aggregate(anchors, lbuf, k, attn_temperature, aggr)
    raise ValueError(f"mode must be 'knn' or 'pddp', got {mode!r}")


def cos_sim_ce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """``CrossEntropy(cos(a_i, b_j) / temperature, target i)``, the mean over rows, as the reference computes it."""
    cos_sim = nn.CosineSimilarity(dim=-1)(a.unsqueeze(1), b.unsqueeze(0)) / temperature  # (B, B)
    labels = torch.arange(cos_sim.size(0), device=cos_sim.device)
    return nn.CrossEntropyLoss()(cos_sim, labels)


class ReferenceStep(NamedTuple):
    """What :func:`iscse_step` returns: the loss, the shifted buffer, and the two loss components."""

    loss: torch.Tensor
    lbuf: torch.Tensor
    contrastive: torch.Tensor
    smooth: torch.Tensor


def iscse_step(z1: torch.Tensor, z2: torch.Tensor, lbuf: torch.Tensor, *, k: int = 16, temperature: float = 0.05,
               attn_temperature: float = 2.0, alpha: float = 0.1, mode: str = "knn",
               aggr: str = "attn") -> ReferenceStep:
    """One IS-CSE loss step exactly as the paper's ``cl_forward``: push, then (buffer full) smooth, then losses.

    ``z1``, ``z2``: ``(B, D)`` the two dropout views; ``lbuf``: ``(M, D)`` the buffer before the step. The buffer
    counts as full when its oldest row is non-zero (``lbuf[0].norm() > 0``), as in the released code. Returns a
    :class:`ReferenceStep`; ``smooth`` is a zero tensor before the buffer is full. ``mode`` / ``aggr``: the
    released ablations (:func:`find_neighbors_and_aggregation`).
    """
    z2_normalized = F.normalize(z2, dim=-1)
    lbuf = push(lbuf, z2_normalized)
    smooth_loss = torch.zeros((), dtype=z1.dtype, device=z1.device)
    if lbuf[0].norm() > 0:
        z2_star = find_neighbors_and_aggregation(z2_normalized, lbuf, k, attn_temperature, mode, aggr)
        smooth_loss = cos_sim_ce(z1, z2_star, temperature)
    contrastive = cos_sim_ce(z1, z2, temperature)
    return ReferenceStep(contrastive + alpha * smooth_loss, lbuf, contrastive, smooth_loss)
