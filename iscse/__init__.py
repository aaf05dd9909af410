"""iscse: fused IS-CSE (instance-smoothed contrastive sentence embedding) ops.

Public API: :class:`MemoryBuffer`, the functional ops :func:`knn_topk`, :func:`smooth`, :func:`info_nce`,
:func:`iscse_loss`, the module :class:`ISCSELoss`, :func:`alpha_schedule`, the baseline :mod:`iscse.reference`, and
for training and evaluation :class:`SentenceEncoder` and :func:`evaluate_sts` (``python -m iscse.train``,
``python -m iscse.evaluate``).
"""
from . import reference
from .backends import available_backends
from .buffer import MemoryBuffer
from .functional import ISCSEOutput, info_nce, iscse_loss, knn_topk, smooth
from .loss import AlphaSchedule, ISCSELoss, alpha_schedule

__version__ = "0.1.0"

# Loaded on first use: the evaluation stack (scipy, the encoder) is not needed for the ops, and importing
# iscse.evaluate here would make `python -m iscse.evaluate` warn that the module was imported twice.
_LAZY = {"SentenceEncoder": "evaluation.encoder", "evaluate_sts": "evaluation.evaluate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "MemoryBuffer", "knn_topk", "smooth", "info_nce", "iscse_loss", "ISCSEOutput", "ISCSELoss", "alpha_schedule",
    "AlphaSchedule", "available_backends", "reference", "SentenceEncoder", "evaluate_sts", "__version__",
]
