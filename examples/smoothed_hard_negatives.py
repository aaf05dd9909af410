"""Instance smoothing as a building block: in-batch negatives with hard negatives (MultipleNegativesRankingLoss-style
on (anchor, positive, negative) triples), plus IS-CSE's smoothing term, from ``iscse.knn_topk`` and ``iscse.smooth``
on the loss's own ``iscse.MemoryBuffer``.

The README's "sentence-transformers" section shows :func:`smoothed_mnrl_loss` verbatim (a test checks that), and
``tests/test_integrations_st.py`` checks its loss and gradients against a float64 computation built from
``iscse.reference``. Run this file for a few steps on random embeddings::

    python examples/smoothed_hard_negatives.py
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import iscse


def smoothed_mnrl_loss(anchor, positive, negative, buffer, *, k=16, scale=20.0, attn_temperature=2.0, alpha=0.1):
    """In-batch + hard-negative InfoNCE, plus alpha times the same loss with smoothed positives.

    anchor, positive, negative: (B, D) embeddings of the three columns; buffer: an iscse.MemoryBuffer(M, D) that
    holds past normalised positives. Each call pushes this batch's positives, then (once every slot has been written)
    smooths each positive with its k nearest buffer rows, its own slot excluded.
    """
    q = F.normalize(positive, dim=-1)    # (B, D) positives, unit norm
    a = F.normalize(anchor, dim=-1)      # (B, D)
    n = F.normalize(negative, dim=-1)    # (B, D) one hard negative per anchor
    labels = torch.arange(a.shape[0], device=a.device)
    buffer.push(q)                       # FIFO of past positives (stored detached)
    # (B, 2B) logits: every positive of the batch, then every hard negative
    loss = F.cross_entropy(scale * a @ torch.cat([q, n]).T, labels)
    if buffer.full:                      # smoothing starts once every slot has been written
        vals, idx = iscse.knn_topk(q, buffer, k)                       # (B, k), each row's own slot excluded
        z_star = iscse.smooth(q, buffer, idx, vals, attn_temperature)  # (B, D) smoothed positives
        s = F.normalize(z_star, dim=-1)
        loss = loss + alpha * F.cross_entropy(scale * a @ torch.cat([s, n]).T, labels)
    return loss


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows each default as the parser holds it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="steps on random embeddings")
    p.add_argument("--k", type=int, default=4, help="neighbours per positive (at most 31: the buffer has 32 rows)")
    return p


def main(argv=None) -> None:
    """A few steps on random embeddings: the smoothing term appears once the buffer (32 rows, 8 a step) is full."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or not 1 <= args.k <= 31:
        parser.error("--steps must be >= 1 and --k between 1 and 31")
    torch.manual_seed(0)
    batch, dim = 8, 32
    buffer = iscse.MemoryBuffer(32, dim)
    for step in range(args.steps):
        anchor, positive, negative = (torch.randn(batch, dim, requires_grad=True) for _ in range(3))
        loss = smoothed_mnrl_loss(anchor, positive, negative, buffer, k=args.k)
        loss.backward()
        print(f"step {step + 1}: loss {loss.item():.4f}, buffer full: {buffer.full}")


if __name__ == "__main__":
    main()
