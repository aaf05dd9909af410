"""The released IS-CSE code's operations, kept as the baseline every test and benchmark compares with.

These follow ``simcse/models.py`` of the paper's code (He et al., AAAI 2023) operation for operation: the memory
buffer is an fp32 tensor shifted with ``cat`` every step, neighbours come from a full ``argsort`` of the
similarities with rank 0 (the query itself) dropped, neighbour rows are gathered and aggregated with a batched
matmul whose attention logits are divided by 2, and both losses are cross-entropies over cosine similarities
divided by the temperature. Two deliberate departures, neither of which changes a value: ``.squeeze()`` became
``.squeeze(1)`` (the original breaks at batch size 1), and the hard-coded buffer size, k and attention divisor are
arguments. Nothing here is fast; use :func:`iscse.iscse_loss` or :class:`iscse.ISCSELoss` for training.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "new_buffer", "push", "knn", "aggregate", "find_neighbors_and_aggregation", "cos_sim_ce", "iscse_step",
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
              attn_temperature: float = 2.0) -> torch.Tensor:
    """The smoothed positives ``z*``: attention of each anchor over ``[anchor; its k neighbours]``.

    ``anchors``: ``(B, D)`` (carries gradient), ``lbuf``: ``(M, D)``, ``idx``: ``(B, k)`` row indices of ``lbuf``.
    Returns ``(B, D)``.
    """
    batch_size = anchors.shape[0]
    k = idx.shape[1]
    neighbours = lbuf[idx.reshape(-1)].view(batch_size, k, -1).to(anchors.dtype)  # (B, k, D)
    group = torch.cat([anchors.unsqueeze(1), neighbours], dim=1)  # (B, k + 1, D)
    attn_score = torch.matmul(group[:, :1, :], group.transpose(1, 2)) / attn_temperature  # (B, 1, k + 1)
    attn_score = F.softmax(attn_score, dim=-1)
    return torch.matmul(attn_score, group).squeeze(1)  # (B, D)


def find_neighbors_and_aggregation(anchors: torch.Tensor, lbuf: torch.Tensor, k: int,
                                   attn_temperature: float = 2.0) -> torch.Tensor:
    """The paper's ``find_neighbors_and_aggregation(mode='knn', aggr='attn')``: :func:`knn` then :func:`aggregate`."""
    return aggregate(anchors, lbuf, knn(anchors, lbuf, k), attn_temperature)


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
               attn_temperature: float = 2.0, alpha: float = 0.1) -> ReferenceStep:
    """One IS-CSE loss step exactly as the paper's ``cl_forward``: push, then (buffer full) smooth, then losses.

    ``z1``, ``z2``: ``(B, D)`` the two dropout views; ``lbuf``: ``(M, D)`` the buffer before the step. The buffer
    counts as full when its oldest row is non-zero (``lbuf[0].norm() > 0``), as in the released code. Returns a
    :class:`ReferenceStep`; ``smooth`` is a zero tensor before the buffer is full.
    """
    z2_normalized = F.normalize(z2, dim=-1)
    lbuf = push(lbuf, z2_normalized)
    smooth_loss = torch.zeros((), dtype=z1.dtype, device=z1.device)
    if lbuf[0].norm() > 0:
        z2_star = find_neighbors_and_aggregation(z2_normalized, lbuf, k, attn_temperature)
        smooth_loss = cos_sim_ce(z1, z2_star, temperature)
    contrastive = cos_sim_ce(z1, z2, temperature)
    return ReferenceStep(contrastive + alpha * smooth_loss, lbuf, contrastive, smooth_loss)
