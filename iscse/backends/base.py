"""The backend interface (this module imports no implementation): every backend computes the same function
(docs/concepts.md: Backends).

A backend provides four operations on plain tensors (the functional API has already validated them):

- ``knn_topk(q, storage, k, self_slots, ptr)`` -> ``(vals, idx)``: for each query row, the ``k`` buffer slots with
  the largest dot product, sorted by descending value, the query's own slot (``self_slots[i]``) excluded when
  ``self_slots`` is not None. ``vals`` float32 (float64 for float64 inputs) ``(B, k)``, ``idx`` int64 ``(B, k)``
  slot indices. ``ptr`` is the buffer's write pointer, an int or a 0-dim int64 device tensor (a
  :class:`~iscse.MemoryBuffer` passes its device tensor); only the reference (to rebuild its shifted order, by a
  gather, without reading it) and FAISS's approximate index (which reads it) use it.
- ``smooth(q, storage, idx, vals, attn_temperature, aggregation="attention")`` -> ``z*`` ``(B, D)``,
  differentiable in ``q``; ``aggregation="mean"`` (the paper's ablation): uniform weights ``1 / (k + 1)``.
- ``info_nce(a, b, temperature)`` -> scalar, differentiable in ``a`` and ``b``.
- ``iscse_loss(z1, z2, q2, storage, self_slots, ptr, k, temperature, attn_temperature, smooth, knn,
  aggregation="attention")`` -> ``(L_cl, L_s)``; the default composes the three above, a fused backend overrides
  it. ``self_slots`` is None when nothing is to be excluded. ``smooth`` is a Python bool: :func:`iscse.iscse_loss`
  passes ``True`` and masks ``L_s`` with the buffer's device "full" flag itself, so no backend branches on a device
  value.

A step must not read device values on the host (no ``.item()``, ``bool(tensor)``, ``int(tensor)`` or Python
branches on them), so that it can be captured in a CUDA graph and compiled without graph breaks. A backend that
cannot avoid it sets :attr:`Backend.syncs_host` (FAISS's approximate index, which reads the write pointer and runs
on numpy arrays); :func:`iscse.iscse_loss` then decides on the host whether to smooth, as such a step syncs anyway.

The registry and the ``"auto"`` policy are in :mod:`iscse.backends`.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["Backend"]


class Backend:
    """Base class: :meth:`iscse_loss` composes :meth:`knn_topk`, :meth:`smooth` and :meth:`info_nce`."""

    name = "base"
    #: True when this backend reads device values on the host inside a step (see the module docstring).
    syncs_host = False
    #: True for a backend that only finds neighbours (FAISS): the registry pairs it with the device's default
    #: backend for the rest of the step (:func:`iscse.backends.compute_backend`), so it never calls back up.
    knn_only = False
    #: Under ``"auto"``, this backend is not tried as a candidate on buffers with fewer rows than this (FAISS: a
    #: probe on a small buffer could never pay for itself).
    auto_min_rows = 0

    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run on ``device`` here (``"auto"`` tries only candidates that can). Default:
        True; FAISS answers False for CUDA tensors without a GPU build of FAISS."""
        return True

    def check_inputs(self, z1: torch.Tensor, z2: torch.Tensor, storage: torch.Tensor, k: Optional[int]) -> None:
        """Raise ``TypeError``/``ValueError`` for a step this backend cannot run (dtypes, device, ``k``: None when it
        does not find neighbours), before the step changes any state: :func:`iscse.iscse_loss` calls it before
        pushing to the buffer. The default accepts everything."""

    def knn_topk(self, q, storage, k, self_slots, ptr=0):  # pragma: no cover - interface
        raise NotImplementedError

    def smooth(self, q, storage, idx, vals, attn_temperature, aggregation="attention"):  # pragma: no cover
        raise NotImplementedError

    def info_nce(self, a, b, temperature):  # pragma: no cover - interface
        raise NotImplementedError

    def iscse_loss(self, z1, z2, q2, storage, self_slots, ptr, *, k, temperature, attn_temperature, smooth,
                   knn: Optional["Backend"] = None, aggregation: str = "attention"):
        """``(L_cl, L_s)`` for one step; ``L_s`` is a zero tensor when ``smooth`` is False."""
        l_cl = self.info_nce(z1, z2, temperature)
        if not smooth:
            return l_cl, torch.zeros((), dtype=l_cl.dtype, device=l_cl.device)
        vals, idx = (knn or self).knn_topk(q2, storage, k, self_slots, ptr)
        if aggregation == "attention":
            z_star = self.smooth(q2, storage, idx, vals, attn_temperature)
        else:
            z_star = self.smooth(q2, storage, idx, vals, attn_temperature, aggregation=aggregation)
        return l_cl, self.info_nce(z1, z_star, temperature)
