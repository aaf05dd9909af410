"""Hard negatives (SimCSE's supervised setting): a third sentence per example whose embedding ``z3`` is an extra
negative column of the contrastive logits. Torch only.

SimCSE's ``cl_forward`` with ``num_sent == 3`` (Gao et al., EMNLP 2021, section 4 and the released
``simcse/models.py``), for anchors ``z1``, positives ``z2`` and hard negatives ``z3`` (``(B, D)`` each, after the
data-parallel all-gather)::

    logits = [cos(z1_i, z2_j) / tau  |  cos(z1_i, z3_j) / tau + w * [i == j]]      # (B, 2B)
    L      = CE(logits, target i)

``w`` is ``--hard_negative_weight``: added, after the division by the temperature, to the logit of each anchor's
own hard negative ``z1_i . z3_i`` only (SimCSE calls it "logits of weights"; its default, 0, makes the hard
negatives plain extra negatives): :func:`hard_negative_info_nce`.

For IS-CSE the released code (dll-wu/IS-CSE ``simcse/models.py``) encodes the third sentence with the other two and
then ignores it: only ``z1`` and ``z2`` are gathered and used. The trainer offers that (``--iscse_hard_negatives
released``, the criterion called on ``z1, z2`` as usual) and the extension computed here (``columns``): the hard
negatives are extra columns of both InfoNCE terms, with the same weight on each anchor's own one::

    L_cl = CE([cos(z1, z2) / tau | cos(z1, z3) / tau + w I])
    L_s  = CE([cos(z1, z*) / tau | cos(z1, z3) / tau + w I])      # z* the smoothed positives, as without them
    L    = L_cl + alpha * L_s

The memory buffer, the neighbours and ``z*`` are those of the same step without hard negatives (``q2 =
normalize(z2)`` is pushed; the hard negatives never enter the buffer); only the two InfoNCE terms gain the ``B``
hard-negative columns.

Routing: the fused Triton kernels compute ``B x B`` logits, so a step with hard negatives runs here, in torch,
whatever backend the loss was given (as ``grouping="pddp"`` steps run in :mod:`iscse.pddp`): the kNN and the
aggregation by the torch backend's ops (``backend="reference"``: by the reference ops, and PDDP by its
transcription), the two InfoNCE terms by :func:`hard_negative_info_nce`. Both terms are computed in fp32 (fp64
for fp64 inputs).
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import math

import torch
import torch.nn.functional as F

from . import _validation as V
from . import reference
from .buffer import MemoryBuffer
from .functional import ISCSEOutput, _check_step, knn_topk, smooth
from .pddp import pddp_smooth

__all__ = ["hard_negative_info_nce", "iscse_hard_negative_loss", "hard_negative_step", "check_hard_negative_weight"]


def check_hard_negative_weight(value) -> float:
    """A finite real number (SimCSE puts no other bound on it); ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"hard_negative_weight must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"hard_negative_weight must be a finite number, got {value!r}")
    return float(value)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _info_nce_hard(anchors: torch.Tensor, positives: torch.Tensor, hard: torch.Tensor, temperature: float,
                   weight: float) -> torch.Tensor:
    """The loss of :func:`hard_negative_info_nce` on validated inputs."""
    dtype = _compute_dtype(anchors, positives, hard)
    a = F.normalize(anchors.to(dtype), dim=-1)
    pos = a @ F.normalize(positives.to(dtype), dim=-1).transpose(0, 1) / temperature  # (B, B)
    neg = a @ F.normalize(hard.to(dtype), dim=-1).transpose(0, 1) / temperature  # (B, B)
    if weight != 0.0:
        neg = neg + weight * torch.eye(neg.shape[0], dtype=dtype, device=neg.device)  # on z1_i . z3_i only
    logits = torch.cat([pos, neg], dim=1)  # (B, 2B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)


def hard_negative_info_nce(anchors: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor,
                           temperature: float = 0.05, hard_negative_weight: float = 0.0) -> torch.Tensor:
    """SimCSE's supervised loss: InfoNCE of ``anchors`` against ``[positives; hard_negatives]``.

    ``mean_i CE([cos(a_i, p_j) / temperature | cos(a_i, h_j) / temperature + w [i == j]], target i)``: the ``2B``
    columns are every positive and every hard negative of the batch; ``w = hard_negative_weight`` is added to each
    anchor's own hard negative's logit after the division by the temperature (SimCSE's ``--hard_negative_weight``,
    default 0). ``anchors``, ``positives``, ``hard_negatives``: ``(B, D)``, any float dtype, one device. Returns a
    scalar (fp32, fp64 for fp64 inputs), differentiable in all three.
    """
    V.check_pair("anchors", anchors, "positives", positives)
    V.check_pair("anchors", anchors, "hard_negatives", hard_negatives)
    t = V.check_positive("temperature", temperature)
    w = check_hard_negative_weight(hard_negative_weight)
    return _info_nce_hard(anchors, positives, hard_negatives, t, w)


def iscse_hard_negative_loss(z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor, buffer: MemoryBuffer, *,
                             k: int = 16, temperature: float = 0.05, attn_temperature: float = 2.0,
                             alpha: Union[float, torch.Tensor] = 0.1, hard_negative_weight: float = 0.0,
                             backend: str = "torch", push: bool = True, grouping: str = "knn",
                             aggregation: str = "attention", check_finite: Optional[bool] = None,
                             return_components: bool = False) -> Union[torch.Tensor, ISCSEOutput]:
    """One IS-CSE step with hard negatives as extra columns of ``L_cl`` and ``L_s`` (the module docstring).

    Args are those of :func:`iscse.iscse_loss` plus ``z3`` (``(B, D)``, the hard negatives, same shape and device as
    ``z1``) and ``hard_negative_weight``; ``backend``: ``"reference"`` runs the kNN and aggregation with the
    reference ops (PDDP: its transcription), any other name with the torch ops (this step has no fused path).
    ``buffer`` is pushed ``normalize(z2)`` when ``push``; ``L_s`` is zero until the buffer is full (for ``"knn"``
    by ``torch.where`` on the device flag, for ``"pddp"`` by a host read, as :func:`iscse.iscse_loss` does).

    Returns ``L_cl + alpha * L_s`` (fp32, fp64 for fp64 inputs), or an :class:`iscse.ISCSEOutput` with
    ``return_components``. Bad input raises ``ValueError`` / ``TypeError`` naming the argument before the buffer
    changes.
    """
    k, temperature, attn_temperature, alpha, grouping, aggregation = _check_step(
        z1, z2, buffer, k=k, temperature=temperature, attn_temperature=attn_temperature, alpha=alpha, push=push,
        grouping=grouping, aggregation=aggregation)
    V.check_pair("z1", z1, "z3", z3, buffer.dim)
    weight = check_hard_negative_weight(hard_negative_weight)
    ops = "reference" if backend == "reference" else "torch"
    if V.finite_check_wanted(check_finite, z1):
        for name, z in (("z1", z1), ("z2", z2), ("z3", z3)):
            V.check_finite(name, z)

    q2 = F.normalize(z2, dim=-1)
    batch = q2.shape[0]
    if grouping == "pddp":
        if push:
            buffer.push(q2)
            older = buffer.rows()[:buffer.size - batch]
        else:
            older = buffer.rows()[batch:]
        z_star = None
        if buffer.full:  # host read, as the PDDP grouping reads the host anyway
            if ops == "reference":
                lbuf = torch.cat([older, q2.detach().to(older.dtype)], dim=0)
                z_star = reference.pddp_aggregate(q2, lbuf, k, attn_temperature,
                                                  "attn" if aggregation == "attention" else aggregation)
            else:
                z_star = pddp_smooth(q2, older, k, attn_temperature, aggregation)
        full = None
    else:
        if push:
            buffer.push(q2)
        vals, idx = knn_topk(q2, buffer, k, self_slots="last" if push else None, backend=ops)
        z_star = smooth(q2, buffer, idx, vals, attn_temperature, backend=ops, aggregation=aggregation)
        full = buffer.full_tensor
    l_cl = _info_nce_hard(z1, z2, z3, temperature, weight)
    if z_star is None:
        l_s = torch.zeros((), dtype=l_cl.dtype, device=l_cl.device)
    else:
        l_s = _info_nce_hard(z1, z_star, z3, temperature, weight)
        if full is not None:
            # while the buffer fills, the neighbours are zero rows: computed, then replaced by 0 (value and gradient)
            l_s = torch.where(full, l_s, torch.zeros((), dtype=l_s.dtype, device=l_s.device))
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(l_s.dtype)
    loss = l_cl + alpha * l_s
    return ISCSEOutput(loss, l_cl, l_s) if return_components else loss


def hard_negative_step(criterion, z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor, *,
                       hard_negative_weight: float = 0.0, update: Optional[bool] = None) -> torch.Tensor:
    """``criterion(z1, z2)`` of an :class:`iscse.ISCSELoss` with the hard negatives ``z3`` as extra columns.

    Uses the criterion's buffer, ``k``, temperatures, alpha (its schedule at the current step), grouping and
    aggregation, and behaves as its ``forward`` does: ``update`` (None: in training mode with gradients enabled)
    pushes ``normalize(z2)`` and advances the criterion's step; :attr:`~iscse.ISCSELoss.last_components` is set.
    Returns the scalar loss of :func:`iscse_hard_negative_loss`.
    """
    if update is None:
        update = criterion.training and torch.is_grad_enabled()
    elif not isinstance(update, bool):
        raise TypeError(f"update must be None, True or False, got {type(update).__name__}")
    out = iscse_hard_negative_loss(
        z1, z2, z3, criterion.buffer, k=criterion.k, temperature=criterion.temperature,
        attn_temperature=criterion.attn_temperature, alpha=criterion.current_alpha(as_tensor=True),
        hard_negative_weight=hard_negative_weight, backend=criterion.backend, push=update,
        grouping=criterion.grouping, aggregation=criterion.aggregation, check_finite=criterion.check_finite,
        return_components=True)
    if update:
        criterion.step_tensor.add_(1)
    criterion.last_components = (out.contrastive.detach(), out.smooth.detach())
    return out.loss
