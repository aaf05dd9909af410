"""The model the trainer trains: a :class:`~iscse.evaluation.encoder.SentenceEncoder` (backbone and SimCSE pooler) together with
the :class:`~iscse.ISCSELoss` that owns the IS-CSE memory buffer.

Keeping the loss inside the model means it moves with ``.to(device)`` and is wrapped with the encoder by DDP (it has
no parameters, so DDP has nothing to synchronise for it); its state (buffer and step) is saved with each checkpoint
by the trainer (``iscse_loss.pt``). ``forward`` only embeds; the trainer's ``compute_loss`` forms the two views,
all-gathers them across processes and calls :attr:`ISCSEModel.criterion`. With ``--do_mlm`` the model also holds
the masked-LM head (:class:`~iscse.training.mlm.MaskedLMHead`), and ``forward`` encodes the masked copy too, in the
same call, so that under DDP both encodings go through the wrapped module's forward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..loss import ISCSELoss
from ..evaluation.encoder import SentenceEncoder
from .mlm import MaskedLMHead

__all__ = ["ISCSEModel", "StepAlpha"]


class StepAlpha:
    """Alpha as a function of the optimizer step, for :class:`~iscse.ISCSELoss` (which passes its own call count,
    ignored here): the trainer sets :attr:`step` before each loss call, so with gradient accumulation every
    micro-batch of an update gets that update's alpha. ``schedule(step) -> float``."""

    def __init__(self, schedule: Callable[[int], float]) -> None:
        self.schedule = schedule
        self.step = 0

    def __call__(self, _calls: int) -> float:
        return float(self.schedule(self.step))

    def __repr__(self) -> str:
        return f"StepAlpha({self.schedule!r})"


class ISCSEModel(nn.Module):
    """A sentence encoder and its training criterion.

    Args:
        encoder: the :class:`~iscse.evaluation.encoder.SentenceEncoder` being trained.
        criterion: an :class:`~iscse.ISCSELoss` (``--objective iscse``), or None for plain SimCSE InfoNCE.
        mlm: the :class:`~iscse.training.mlm.MaskedLMHead` on ``encoder``'s backbone (``--do_mlm``), or None.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` returns the encoder's ``(N, H)`` embeddings, with
    the MLP head applied in training as the encoder's pooler says; given ``mlm_input_ids`` (the ``(N, L)`` masked
    copy) it returns ``(embeddings, logits)``, the ``(N, L, V)`` masked-LM logits of the copy encoded separately.
    """

    def __init__(self, encoder: SentenceEncoder, criterion: Optional[ISCSELoss] = None,
                 mlm: Optional[MaskedLMHead] = None) -> None:
        super().__init__()
        if not isinstance(encoder, SentenceEncoder):
            raise TypeError(f"encoder must be a SentenceEncoder, got {type(encoder).__name__}")
        if criterion is not None and not isinstance(criterion, ISCSELoss):
            raise TypeError(f"criterion must be an ISCSELoss or None, got {type(criterion).__name__}")
        if mlm is not None and not isinstance(mlm, MaskedLMHead):
            raise TypeError(f"mlm must be a MaskedLMHead or None, got {type(mlm).__name__}")
        if mlm is not None and mlm._backbone is not encoder.backbone:
            raise ValueError("mlm must sit on the encoder's own backbone (MaskedLMHead.from_pretrained(encoder.backbone"
                             ", ...))")
        self.encoder = encoder
        self.criterion = criterion
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, mlm_input_ids: Optional[torch.Tensor] = None):
        """``(N, L)`` token ids -> ``(N, H)`` sentence embeddings (see :meth:`SentenceEncoder.forward`); with
        ``mlm_input_ids`` also the ``(N, L, V)`` logits of the masked copy: ``(embeddings, logits)``."""
        embeddings = self.encoder(input_ids, attention_mask, token_type_ids)
        if mlm_input_ids is None:
            return embeddings
        if self.mlm is None:
            raise ValueError("mlm_input_ids: this model has no masked-LM head (built without --do_mlm)")
        if attention_mask is None:
            attention_mask = torch.ones_like(mlm_input_ids)
        return embeddings, self.mlm(mlm_input_ids, attention_mask, token_type_ids)

