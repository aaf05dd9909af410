"""``backend="reference"``: the paper's operations (:mod:`iscse.reference`) behind the backend interface.

The reference works on its ``cat``-shifted buffer order, so the ring buffer's storage is rolled into that order
first (a full copy, as the reference's own ``cat`` is; a gather at the write pointer, so the pointer may be a device
tensor and is never read on the host) and the returned ranks are mapped back to slots.
"""
from __future__ import annotations

import torch

from .. import reference
from .base import Backend


class ReferenceBackend(Backend):
    """Full ``argsort`` kNN, gather + bmm aggregation, cosine-similarity cross-entropy (baseline, slow)."""

    name = "reference"

    def knn_topk(self, q, storage, k, self_slots, ptr=0):
        size = storage.shape[0]
        ranks_to_slots = (torch.arange(size, device=storage.device) + ptr).remainder(size)
        rows = storage.index_select(0, ranks_to_slots)  # torch.roll(storage, -ptr, 0) without reading ptr
        anchors = q.detach().to(rows.dtype)
        sim = torch.matmul(anchors, rows.transpose(0, 1))  # (B, M)
        order = torch.argsort(sim, dim=-1, descending=True)  # (B, M) ranks into rows, most similar first
        if self_slots is not None:
            # The reference drops rank 0, its query's own row. To honour self_slots in every case, the own row is
            # moved to the end instead (a stable sort on "is it the own row", no host read): where it ranks first, as
            # it does for a step's unit rows, that is exactly dropping rank 0; where a row ties with it at the top
            # (a duplicate of the query), the same values and rows come out with another index.
            own = ((self_slots - ptr).remainder(size)).unsqueeze(1)  # (B, 1) the own row's rank position
            last = torch.argsort((order == own).to(torch.int8), dim=1, stable=True)
            order = order.gather(1, last)
        ranks = order[:, :k]
        vals = torch.gather(sim, 1, ranks)
        return vals.to(torch.promote_types(vals.dtype, torch.float32)), (ranks + ptr).remainder(size)

    def smooth(self, q, storage, idx, vals, attn_temperature, aggregation="attention"):
        return reference.aggregate(q, storage, idx, attn_temperature, "attn" if aggregation == "attention" else
                                   aggregation)

    def info_nce(self, a, b, temperature):
        return reference.cos_sim_ce(a, b, temperature)
