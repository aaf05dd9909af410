"""``ISCSELoss`` (the module) and ``alpha_schedule`` (the paper's weights for the smoothing loss)."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from . import _validation as V
from .backends import Backend, resolve_name
from .buffer import MemoryBuffer
from .functional import iscse_loss

__all__ = ["ISCSELoss", "alpha_schedule", "AlphaSchedule"]


class AlphaSchedule:
    """A weight for ``L_s`` as a function of the training step; build one with :func:`alpha_schedule`."""

    def __init__(self, kind: str, value: float, start: float, end: float, total_steps: Optional[int]):
        self.kind, self.value, self.start, self.end, self.total_steps = kind, value, start, end, total_steps

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.value
        # The paper's cosine schedule (its code's cosineSchedule): capped at `end`.
        alpha = math.cos(math.pi * step / self.total_steps) * (self.start - self.end) + self.end
        return min(self.end, alpha)

    def __repr__(self) -> str:
        if self.kind == "constant":
            return f"alpha_schedule('constant', value={self.value})"
        return f"alpha_schedule('cosine', start={self.start}, end={self.end}, total_steps={self.total_steps})"


def alpha_schedule(kind: str = "constant", *, value: float = 0.1, start: float = 0.005, end: float = 0.05,
                   total_steps: Optional[int] = None) -> AlphaSchedule:
    """The paper's two schedules for alpha, the weight of the smoothing loss.

    - ``"constant"``: ``alpha(t) = value`` (paper: 0.1 for BERT-base and RoBERTa-base).
    - ``"cosine"``: ``alpha(t) = min(end, cos(pi t / T) (start - end) + end)`` with ``T = total_steps`` (paper: start
      0.005, end 0.05 for the large models): it rises from ``start`` to ``end`` over the first half and stays there.

    Returns a callable ``alpha(step) -> float``, which :class:`ISCSELoss` accepts as ``alpha``.
    """
    if kind not in ("constant", "cosine"):
        raise ValueError(f"kind must be 'constant' or 'cosine', got {kind!r}")
    value, start, end = V.check_alpha(value), V.check_alpha(start), V.check_alpha(end)
    if kind == "cosine":
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int for the cosine schedule, got {total_steps!r}")
        total_steps = int(total_steps)
    return AlphaSchedule(kind, value, start, end, total_steps)


class ISCSELoss(nn.Module):
    """IS-CSE loss with its own memory buffer: ``loss = criterion(z1, z2)``.

    Computes ``L = L_cl + alpha * L_s`` (He et al., "Instance Smoothing Improves Unsupervised Sentence Embeddings",
    AAAI 2023): ``L_cl`` is the SimCSE InfoNCE of ``z1`` against ``z2`` at temperature ``temperature`` (0.05, i.e. a
    logit scale of 20); ``L_s`` is the same loss against smoothed positives, each ``normalize(z2_i)`` averaged with
    its ``k`` nearest buffer rows by attention (divisor ``attn_temperature``). Every call pushes ``normalize(z2)``
    into the buffer (a FIFO of ``buffer_size`` rows); ``L_s`` starts once the buffer is full.

    Args:
        dim: embedding width ``D``.
        buffer_size: buffer rows ``M`` (paper 1024). k: neighbours (paper 16).
        temperature, attn_temperature: as above. alpha: a number, or a callable of the step such as
            ``alpha_schedule("cosine", total_steps=T)``; the step is the number of earlier calls.
        backend: ``"auto"``, ``"torch"``, ``"reference"``, ``"triton"`` or ``"faiss"``; knn_backend: another
            backend for the kNN step only (default: the same).
        buffer_dtype: the buffer's storage dtype (fp32 default; bf16 halves its memory).
        check_finite: raise on NaN/inf input (a device-to-host read on CUDA).

    Inputs ``z1``, ``z2``: ``(B, D)``, ``B <= buffer_size``, any float dtype; the result is an fp32 scalar (fp64
    for fp64 inputs). The buffer moves with ``.to()`` and is saved in ``state_dict()`` with the step count; the last
    components are kept detached in :attr:`last_components` for logging.

    Example::

        criterion = ISCSELoss(dim=768)
        z1, z2 = encoder(batch), encoder(batch)  # two dropout views, (B, 768)
        loss = criterion(z1, z2)
        loss.backward()
    """

    def __init__(self, dim: int, buffer_size: int = 1024, k: int = 16, temperature: float = 0.05,
                 attn_temperature: float = 2.0, alpha: Union[float, Callable[[int], float]] = 0.1,
                 backend: str = "auto", knn_backend: Optional[str] = None, buffer_dtype: torch.dtype = torch.float32,
                 check_finite: bool = True) -> None:
        super().__init__()
        V.check_k(k, buffer_size - 1 if isinstance(buffer_size, int) else None)
        self.buffer = MemoryBuffer(buffer_size, dim, dtype=buffer_dtype)
        self.k = int(k)
        self.temperature = V.check_positive("temperature", temperature)
        self.attn_temperature = V.check_positive("attn_temperature", attn_temperature)
        self.alpha = alpha if callable(alpha) else V.check_alpha(alpha)
        for name, value in (("backend", backend), ("knn_backend", knn_backend)):
            if value is not None and not isinstance(value, Backend):
                resolve_name(value, torch.device("cpu"))  # validates the name
        self.backend, self.knn_backend = backend, knn_backend
        self.check_finite = bool(check_finite)
        self.step = 0
        self.last_components: Optional[tuple] = None

    def current_alpha(self) -> float:
        """Alpha for the next call."""
        return V.check_alpha(self.alpha(self.step)) if callable(self.alpha) else self.alpha

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The scalar loss for one batch; pushes ``normalize(z2)`` into the buffer."""
        out = iscse_loss(z1, z2, self.buffer, k=self.k, temperature=self.temperature,
                         attn_temperature=self.attn_temperature, alpha=self.current_alpha(), backend=self.backend,
                         knn_backend=self.knn_backend, return_components=True, check_finite=self.check_finite)
        self.step += 1
        self.last_components = (out.contrastive.detach(), out.smooth.detach())
        return out.loss

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.buffer.storage = fn(self.buffer.storage)
        return self

    def get_extra_state(self):
        return {"buffer": self.buffer.state_dict(), "step": self.step}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "buffer" not in state:
            raise ValueError("ISCSELoss state must be a dict with a 'buffer' entry (from state_dict())")
        self.buffer.load_state_dict(state["buffer"])
        self.step = int(state.get("step", 0))

    def extra_repr(self) -> str:
        return (f"dim={self.buffer.dim}, buffer_size={self.buffer.size}, k={self.k}, temperature={self.temperature}, "
                f"attn_temperature={self.attn_temperature}, alpha={self.alpha!r}, backend={self.backend!r}")
