"""``ISCSELoss`` (the module) and ``alpha_schedule`` (the paper's weights for the smoothing loss)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from . import _validation as V
from . import backends as _backends
from .backends import Backend, check_backend_name, prepare
from .buffer import MemoryBuffer, snapshot
from .functional import AGGREGATIONS, GROUPINGS, iscse_loss
from .pddp import check_pddp

__all__ = ["ISCSELoss", "alpha_schedule", "AlphaSchedule"]


class AlphaSchedule:
    """A weight for ``L_s`` as a function of the training step; build one with :func:`alpha_schedule`.

    Called with a Python int it returns a float (the formula in ``math``); called with a 0-dim integer tensor (what
    :class:`ISCSELoss` passes: its step counter, on the buffer's device) the cosine schedule is evaluated in tensor
    math on that device (float64, except on MPS), so a step neither reads the device nor depends on a Python value
    that changes every step (no ``torch.compile`` recompilation). The constant schedule returns its float either way.
    """

    def __init__(self, kind: str, value: float, start: float, end: float, total_steps: Optional[int]):
        self.kind, self.value, self.start, self.end, self.total_steps = kind, value, start, end, total_steps

    def __call__(self, step: Union[int, torch.Tensor]) -> Union[float, torch.Tensor]:
        if self.kind == "constant":
            return self.value
        # The paper's cosine schedule (its code's cosineSchedule): capped at `end`.
        if isinstance(step, torch.Tensor):
            dtype = torch.float32 if step.device.type == "mps" else torch.float64
            alpha = torch.cos(math.pi * step.to(dtype) / self.total_steps) * (self.start - self.end) + self.end
            return alpha.clamp_max(self.end)
        alpha = math.cos(math.pi * step / self.total_steps) * (self.start - self.end) + self.end
        return min(self.end, alpha)

    def to_dict(self) -> Dict[str, Any]:
        """The schedule's arguments (saved in :meth:`ISCSELoss.state_dict`); :func:`alpha_schedule` rebuilds it."""
        return {"kind": self.kind, "value": self.value, "start": self.start, "end": self.end,
                "total_steps": self.total_steps}

    def __eq__(self, other) -> bool:
        return isinstance(other, AlphaSchedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().values()))

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

    Returns a callable ``alpha(step)`` (a float for an int step, a 0-dim tensor for a tensor step; see
    :class:`AlphaSchedule`), which :class:`ISCSELoss` accepts as ``alpha``.
    """
    if kind not in ("constant", "cosine"):
        raise ValueError(f"kind must be 'constant' or 'cosine', got {kind!r}")
    value, start, end = V.check_alpha(value), V.check_alpha(start), V.check_alpha(end)
    if kind == "cosine":
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int for the cosine schedule, got {total_steps!r}")
        total_steps = int(total_steps)
    return AlphaSchedule(kind, value, start, end, total_steps)


def _alpha_state(alpha) -> Optional[Dict[str, Any]]:
    """What :meth:`ISCSELoss.get_extra_state` saves of ``alpha``: a float or an :class:`AlphaSchedule` as a dict,
    None for any other callable (which cannot be saved)."""
    if isinstance(alpha, AlphaSchedule):
        return alpha.to_dict()
    if isinstance(alpha, float):
        return {"kind": "constant", "value": alpha}
    return None


def _alpha_from_state(state) -> Union[float, AlphaSchedule]:
    if not isinstance(state, dict) or state.get("kind") not in ("constant", "cosine"):
        raise ValueError(f"ISCSELoss state['alpha'] must be None or a dict with kind 'constant' or 'cosine', "
                         f"got {state!r}")
    if set(state) == {"kind", "value"}:  # a plain number was saved (see _alpha_state)
        return V.check_alpha(state["value"])
    return alpha_schedule(state["kind"], value=state["value"], start=state["start"], end=state["end"],
                          total_steps=state["total_steps"])


# The fields of a saved "auto" decision: iscse.backends.shape_key's order for an IS-CSE step.
_DECISION_FIELDS = ("op", "device", "M", "B", "D", "buffer_dtype", "dtype", "k", "aggregation")


def _decisions_from_state(entries):
    """Validate saved ``auto_decisions`` (see :meth:`ISCSELoss.get_extra_state`): ``[(shape class, name)]``."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"ISCSELoss state['auto_decisions'] must be a list, got {type(entries).__name__}")
    out = []
    for entry in entries:
        ok = isinstance(entry, dict) and set(entry) == set(_DECISION_FIELDS) | {"backend"} \
            and entry["op"] == "iscse_loss" and isinstance(entry["backend"], str) \
            and all(isinstance(entry[f], str) for f in ("device", "buffer_dtype", "dtype", "aggregation")) \
            and all(isinstance(entry[f], int) and not isinstance(entry[f], bool) for f in ("M", "B", "D", "k"))
        if not ok:
            raise ValueError(f"ISCSELoss state['auto_decisions'] has an invalid entry {entry!r}")
        out.append((tuple(entry[f] for f in _DECISION_FIELDS), entry["backend"]))
    return out


class ISCSELoss(nn.Module):
    """IS-CSE loss with its own memory buffer: ``loss = criterion(z1, z2)``.

    Computes ``L = L_cl + alpha * L_s`` (He et al., "Instance Smoothed Contrastive Learning for Unsupervised
    Sentence Embedding", AAAI 2023): ``L_cl`` is the SimCSE InfoNCE of ``z1`` against ``z2`` at temperature ``temperature`` (0.05, i.e. a
    logit scale of 20); ``L_s`` is the same loss against smoothed positives, each ``normalize(z2_i)`` averaged with
    its ``k`` nearest buffer rows by attention (divisor ``attn_temperature``). A training call pushes
    ``normalize(z2)`` into the buffer (a FIFO of ``buffer_size`` rows) and advances the step; ``L_s`` starts once
    the buffer is full.

    Training and evaluation calls (``forward(z1, z2, update=None)``):

    - ``update=None`` (default): update when the module is in training mode and gradients are enabled; a call in
      eval mode (``criterion.eval()``) or under ``torch.no_grad()`` / ``torch.inference_mode()`` does not.
    - update (``update=True``): push ``normalize(z2)``, search the ``k`` neighbours of each query among the buffer
      rows other than its own slot, advance the step (the alpha schedule's input) by one.
    - no update (``update=False``): the buffer and the step are left unchanged; the queries are not in the buffer,
      so their neighbours are the ``k`` nearest of all ``M`` current rows (nothing excluded), and ``L_s`` is on when
      the buffer is already full (zero before). Alpha is the value at the current step.

    Args:
        dim: embedding width ``D``.
        buffer_size: buffer rows ``M`` (paper 1024).
        k: neighbours (paper 16).
        temperature: the InfoNCE temperature, as above.
        attn_temperature: the attention divisor, as above.
        alpha: a number, or a callable of the step such as
            ``alpha_schedule("cosine", total_steps=T)``. A callable receives the step (the number of earlier
            updating calls) as a 0-dim int64 tensor on the buffer's device and returns a number or a 0-dim floating
            tensor on that device; written in tensor math (``torch.cos`` ...) it keeps a step free of host reads and
            of ``torch.compile`` recompilations (:func:`alpha_schedule`'s schedules are). A callable that turns the
            step into a Python number (``int(step)``, ``math.cos(step)``, ``step < n`` in an ``if``) still works
            eagerly, at the cost of a host read on CUDA and a graph break under ``torch.compile``.
        backend: ``"auto"``, ``"torch"``, ``"reference"``, ``"triton"`` or ``"faiss"``.
        knn_backend: another backend for the kNN step only (default: the same).
        buffer_dtype: the buffer's storage dtype (fp32 default; bf16 halves its memory). ``module.to(dtype)``,
            ``.half()``, ``.double()`` do not change it (device moves do move the buffer); set
            :attr:`buffer_dtype` to change it.
        check_finite: raise ``ValueError`` on NaN/inf input. ``None`` (default): on CPU only, where it costs no
            synchronisation; ``True``: on CUDA too (a device-to-host read every step); ``False``: never. Skipped
            under ``torch.compile`` and CUDA graph capture.
        grouping: ``"knn"`` (default, the paper) or ``"pddp"`` (the released code's ablation: ``buffer_size // k``
            groups by Principal Direction Divisive Partitioning; torch only, host reads every step, ``k`` may equal
            ``buffer_size``). Saved in ``state_dict()``.
        aggregation: ``"attention"`` (default) or ``"mean"``. See :func:`iscse.iscse_loss` and the README's
            "Ablations" section. Saved in ``state_dict()``.

    Inputs ``z1``, ``z2``: ``(B, D)``, ``B <= buffer_size``, any float dtype; the result is an fp32 scalar (fp64
    for fp64 inputs). State on the device: the buffer (rows, write pointer, fill count) and the step counter, so a
    training step makes no host synchronisation and can be compiled (``torch.compile``, no graph break, one graph
    as the buffer fills and after; tested with the torch backend on CPU) or captured in a CUDA graph (each replay
    pushes and advances like an eager step). ``state_dict()`` saves the buffer, the step and the alpha schedule (a number or an
    :func:`alpha_schedule`; other callables are not saved and are kept on load); it reads the device. The last
    components are kept detached in :attr:`last_components` for logging.

    Example::

        criterion = ISCSELoss(dim=768)
        z1, z2 = encoder(batch), encoder(batch)  # two dropout views, (B, 768)
        loss = criterion(z1, z2)
        loss.backward()
    """

    def __init__(self, dim: int, buffer_size: int = 1024, k: int = 16, temperature: float = 0.05,
                 attn_temperature: float = 2.0, alpha: Union[float, Callable[[torch.Tensor], Any]] = 0.1,
                 backend: str = "auto", knn_backend: Optional[str] = None, buffer_dtype: torch.dtype = torch.float32,
                 check_finite: Optional[bool] = None, grouping: str = "knn", aggregation: str = "attention") -> None:
        super().__init__()
        self.grouping = V.check_choice("grouping", grouping, GROUPINGS)
        self.aggregation = V.check_choice("aggregation", aggregation, AGGREGATIONS)
        if grouping == "pddp" and isinstance(buffer_size, int):
            check_pddp(k, buffer_size, knn_backend)
        else:
            V.check_k(k, buffer_size - 1 if isinstance(buffer_size, int) else None)
        self.buffer = MemoryBuffer(buffer_size, dim, dtype=buffer_dtype)
        self.k = int(k)
        self.temperature = V.check_positive("temperature", temperature)
        self.attn_temperature = V.check_positive("attn_temperature", attn_temperature)
        self.alpha = alpha if callable(alpha) else V.check_alpha(alpha)
        for name, value in (("backend", backend), ("knn_backend", knn_backend)):
            if value is not None and not isinstance(value, Backend):
                check_backend_name(value)
        self.backend, self.knn_backend = backend, knn_backend
        prepare(backend, knn_backend, self.buffer.device)
        if check_finite is not None and not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be None (auto), True or False, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        # Updating calls so far: a 0-dim int64 tensor beside the buffer, advanced in place (see the class docstring).
        self._step = torch.zeros((), dtype=torch.int64, device=self.buffer.device)
        self.last_components: Optional[tuple] = None

    @property
    def step(self) -> int:
        """Updating calls so far, as an int (reads the device: a sync on CUDA; use outside a step). Assignable."""
        return int(self._step.item())

    @step.setter
    def step(self, value: int) -> None:
        self._step.fill_(V.check_count("step", value))

    @property
    def step_tensor(self) -> torch.Tensor:
        """The step counter itself: a 0-dim int64 tensor on the buffer's device (no host read)."""
        return self._step

    @property
    def buffer_dtype(self) -> torch.dtype:
        """The buffer's storage dtype; assign to cast it (``criterion.buffer_dtype = torch.bfloat16``)."""
        return self.buffer.dtype

    @buffer_dtype.setter
    def buffer_dtype(self, dtype: torch.dtype) -> None:
        self.buffer.to(dtype=dtype)

    def _alpha(self) -> Union[float, torch.Tensor]:
        if callable(self.alpha):
            # snapshot: the step is advanced in place after the loss (see iscse.buffer.snapshot)
            return V.check_alpha(self.alpha(snapshot(self._step)), allow_tensor=True)
        return self.alpha

    def current_alpha(self, as_tensor: bool = False) -> Union[float, torch.Tensor]:
        """Alpha for the next updating call: a float (for a schedule this reads the device: a sync on CUDA, so not
        once per step), or with ``as_tensor=True`` a 0-dim tensor on the buffer's device without any host read (to
        log it with the losses)."""
        alpha = self._alpha()
        if as_tensor:
            if isinstance(alpha, torch.Tensor):
                return alpha.detach().clone()
            dtype = torch.float32 if self.buffer.device.type == "mps" else torch.float64
            return torch.full((), alpha, dtype=dtype, device=self.buffer.device)
        return float(alpha.item()) if isinstance(alpha, torch.Tensor) else alpha

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, update: Optional[bool] = None) -> torch.Tensor:
        """The scalar loss for one batch. ``update``: push ``normalize(z2)`` and advance the step (True), or leave
        both unchanged (False); None (default): update in training mode with gradients enabled (see the class
        docstring for the neighbours each kind of call uses)."""
        if update is None:
            update = self.training and torch.is_grad_enabled()
        elif not isinstance(update, bool):
            raise TypeError(f"update must be None, True or False, got {type(update).__name__}")
        out = iscse_loss(z1, z2, self.buffer, k=self.k, temperature=self.temperature,
                         attn_temperature=self.attn_temperature, alpha=self._alpha(), backend=self.backend,
                         knn_backend=self.knn_backend, return_components=True, check_finite=self.check_finite,
                         push=update, grouping=self.grouping, aggregation=self.aggregation)
        if update:
            self._step.add_(1)
        self.last_components = (out.contrastive.detach(), out.smooth.detach())
        return out.loss

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # Applied to the int64 step, the conversions of .to(dtype), .half(), .double() ... change nothing but the
        # device (they cast floating tensors only); the buffer follows that device and keeps its dtype.
        step = fn(self._step)
        self._step = step if step.dtype == torch.int64 else step.to(torch.int64)
        self.buffer.to(device=self._step.device)
        prepare(self.backend, self.knn_backend, self._step.device)
        return self

    def get_extra_state(self):
        """``{"buffer": MemoryBuffer.state_dict(), "step": int, "alpha": dict or None, "grouping": str,
        "aggregation": str, "auto_decisions": list}`` (reads the device). ``alpha`` is None for a callable that is not
        an :func:`alpha_schedule` (not saved; the module keeps its own on load). ``auto_decisions``: the ``"auto"``
        backend decisions of this module's shape classes (one dict per class: ``op, device, M, B, D, buffer_dtype,
        dtype, k, aggregation, backend``), which a resumed run reuses without probing (:mod:`iscse.backends`)."""
        return {"buffer": self.buffer.state_dict(), "step": self.step, "alpha": _alpha_state(self.alpha),
                "grouping": self.grouping, "aggregation": self.aggregation, "auto_decisions": self._decisions()}

    def _decisions(self):
        out = []
        for key, name in _backends.auto_decisions().items():
            if key[0] == "iscse_loss" and (key[2], key[4], key[7], key[8]) == (self.buffer.size, self.buffer.dim,
                                                                              self.k, self.aggregation):
                out.append(dict(zip(_DECISION_FIELDS, key), backend=name))
        return out

    def set_extra_state(self, state) -> None:
        """Restore what :meth:`get_extra_state` saved: the buffer, the step, the alpha schedule (unless saved as
        None), grouping, aggregation and the ``"auto"`` decisions. Validated before anything changes."""
        if not isinstance(state, dict):
            raise ValueError(f"ISCSELoss state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"buffer", "step", "alpha", "grouping", "aggregation", "auto_decisions"} - set(state)
        if missing:
            raise ValueError(f"ISCSELoss state is missing {sorted(missing)} (expected what state_dict() saves)")
        step = V.check_count("ISCSELoss state['step']", state["step"])
        alpha = None if state["alpha"] is None else _alpha_from_state(state["alpha"])
        grouping = V.check_choice("ISCSELoss state['grouping']", state["grouping"], GROUPINGS)
        aggregation = V.check_choice("ISCSELoss state['aggregation']", state["aggregation"], AGGREGATIONS)
        decisions = _decisions_from_state(state["auto_decisions"])
        if grouping == "pddp":
            check_pddp(self.k, self.buffer.size, self.knn_backend)
        else:
            V.check_k(self.k, self.buffer.size - 1)
        self.buffer.load_state_dict(state["buffer"])  # validates before it changes anything
        self._step.fill_(int(step))
        if alpha is not None:
            self.alpha = alpha
        self.grouping, self.aggregation = grouping, aggregation
        _backends.load_decisions(decisions)

    def extra_repr(self) -> str:
        return (f"dim={self.buffer.dim}, buffer_size={self.buffer.size}, k={self.k}, temperature={self.temperature}, "
                f"attn_temperature={self.attn_temperature}, alpha={self.alpha!r}, backend={self.backend!r}, "
                f"buffer_dtype={self.buffer.dtype}"
                + (f", grouping={self.grouping!r}" if self.grouping != "knn" else "")
                + (f", aggregation={self.aggregation!r}" if self.aggregation != "attention" else ""))
