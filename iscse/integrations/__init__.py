"""Adapters that plug the IS-CSE loss into other trainers.

- :mod:`iscse.integrations.sentence_transformers`: :class:`~iscse.integrations.sentence_transformers.ISCSELoss`, a
  sentence-transformers loss (``SentenceTransformerTrainer``), and the callback that keeps its memory buffer in the
  trainer's checkpoints.

Nothing is imported here: each adapter loads its trainer library only when it is imported itself, so ``import iscse``
never needs sentence-transformers.
"""
