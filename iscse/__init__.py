"""iscse: fused IS-CSE (instance-smoothed contrastive sentence embedding) ops.

Public API: :class:`MemoryBuffer`, the functional ops :func:`knn_topk`, :func:`smooth`, :func:`info_nce`,
:func:`iscse_loss`, the module :class:`ISCSELoss`, :func:`alpha_schedule`, the baseline :mod:`iscse.reference`, and
for training and evaluation :class:`SentenceEncoder` and :func:`evaluate_sts` (``python -m iscse.train``,
``python -m iscse.evaluate``).
"""
from . import reference
from .backends import available_backends
from .buffer import MemoryBuffer
from .evaluate import evaluate_sts
from .functional import ISCSEOutput, info_nce, iscse_loss, knn_topk, smooth
from .loss import AlphaSchedule, ISCSELoss, alpha_schedule
from .models import SentenceEncoder

__version__ = "0.1.0"

__all__ = [
    "MemoryBuffer", "knn_topk", "smooth", "info_nce", "iscse_loss", "ISCSEOutput", "ISCSELoss", "alpha_schedule",
    "AlphaSchedule", "available_backends", "reference", "SentenceEncoder", "evaluate_sts", "__version__",
]
