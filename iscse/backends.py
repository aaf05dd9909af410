"""Backend interface and registry: every backend computes the same function (DESIGN.md §2).

A backend provides four operations on plain tensors (the functional API has already validated them):

- ``knn_topk(q, storage, k, self_slots, ptr)`` -> ``(vals, idx)``: for each query row, the ``k`` buffer slots with
  the largest dot product, sorted by descending value, the query's own slot (``self_slots[i]``) excluded when
  ``self_slots`` is not None. ``vals`` float32 (float64 for float64 inputs) ``(B, k)``, ``idx`` int64 ``(B, k)``
  slot indices. ``ptr`` is the buffer's write pointer, an int or a 0-dim int64 device tensor (a
  :class:`~iscse.MemoryBuffer` passes its device tensor); only the reference (to rebuild its shifted order, by a
  gather, without reading it) and FAISS's approximate index (which reads it) use it.
- ``smooth(q, storage, idx, vals, attn_temperature, aggregation="attention")`` -> ``z*`` ``(B, D)``,
  differentiable in ``q``; ``aggregation="mean"`` (the paper's ablation): uniform weights ``1 / (k + 1)``. The
  functional API passes ``aggregation`` only when it is not the default, so a backend without the ablation keeps
  working for the paper's path.
- ``info_nce(a, b, temperature)`` -> scalar, differentiable in ``a`` and ``b``.
- ``losses(z1, z2, q2, storage, self_slots, ptr, k, temperature, attn_temperature, smooth, knn,
  aggregation="attention")`` -> ``(L_cl, L_s)``; the default composes the three above, a fused backend overrides
  it. ``self_slots`` is None when nothing is to be excluded. ``smooth`` is a Python bool: :func:`iscse.iscse_loss`
  passes ``True`` and masks ``L_s`` with the buffer's device "full" flag itself, so no backend branches on a device
  value.

A step must not read device values on the host (no ``.item()``, ``bool(tensor)``, ``int(tensor)`` or Python
branches on them), so that it can be captured in a CUDA graph and compiled without graph breaks. A backend that
cannot avoid it sets :attr:`Backend.syncs_host` (FAISS's approximate index, which reads the write pointer and runs
on numpy arrays); :func:`iscse.iscse_loss` then decides on the host whether to smooth, as such a step syncs anyway.

Backends are looked up by name with :func:`get_backend`; ``"auto"`` resolves by device (:func:`resolve_name`).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

__all__ = ["Backend", "get_backend", "resolve_knn", "resolve_name", "available_backends", "prepare",
           "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "reference", "torch", "triton", "faiss")

# name -> (module, class, install hint). Imported lazily, so optional dependencies are only needed when asked for.
_REGISTRY: Dict[str, Tuple[str, str, str]] = {
    "reference": ("iscse.reference_backend", "ReferenceBackend", ""),
    "torch": ("iscse.torch_ops", "TorchBackend", ""),
    "triton": ("iscse.triton_ops", "TritonBackend", "pip install 'iscse[triton]'"),
    "faiss": ("iscse.faiss_ops", "FaissBackend", "pip install 'iscse[faiss]' (or 'iscse[faiss-gpu]')"),
}
_CACHE: Dict[str, "Backend"] = {}
# Optional backends found missing (so a step does not try the import again: under torch.compile an import is a graph
# break), and whether Triton imports (asked once).
_MISSING: Dict[str, bool] = {}
_TRITON_USABLE: Optional[bool] = None


class Backend:
    """Base class: :meth:`losses` composes :meth:`knn_topk`, :meth:`smooth` and :meth:`info_nce`."""

    name = "base"
    #: True when this backend reads device values on the host inside a step (see the module docstring).
    syncs_host = False

    def knn_topk(self, q, storage, k, self_slots, ptr=0):  # pragma: no cover - interface
        raise NotImplementedError

    def smooth(self, q, storage, idx, vals, attn_temperature, aggregation="attention"):  # pragma: no cover
        raise NotImplementedError

    def info_nce(self, a, b, temperature):  # pragma: no cover - interface
        raise NotImplementedError

    def losses(self, z1, z2, q2, storage, self_slots, ptr, *, k, temperature, attn_temperature, smooth,
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


def _triton_usable() -> bool:
    global _TRITON_USABLE
    if _TRITON_USABLE is None:
        try:
            importlib.import_module("triton")
            importlib.import_module("iscse.triton_ops")
            _TRITON_USABLE = True
        except ImportError:
            _TRITON_USABLE = False
    return _TRITON_USABLE


def resolve_name(name, device: torch.device) -> str:
    """Validate a backend name and resolve ``"auto"``: Triton for CUDA tensors when it imports, else torch."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKEND_NAMES}, got {type(name).__name__}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_usable() else "torch"
    return name


def get_backend(name, device: torch.device) -> Backend:
    """The backend object for ``name`` (``"auto"`` resolved for ``device``), or ``name`` itself when it is already
    a :class:`Backend` instance (e.g. ``FaissBackend(approximate=True)``); raises with the extra to install when the
    backend's optional dependency is missing."""
    if isinstance(name, Backend):
        return name
    name = resolve_name(name, device)
    if name not in _CACHE:
        module, cls, hint = _REGISTRY[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or ""
            if missing == module:  # the backend module itself is not part of this build
                raise ValueError(f"backend {name!r} is not available in this version of iscse") from exc
            raise ImportError(f"backend {name!r} needs a package that is not installed ({exc}); "
                              f"install it with: {hint}") from exc
        _CACHE[name] = getattr(mod, cls)()
    return _CACHE[name]


def resolve_knn(backend, knn_backend, device: torch.device, size: int, batch: int, dim: int) -> Optional[Backend]:
    """The backend for the kNN step: ``knn_backend`` when given; under ``backend="auto"`` FAISS where it was measured
    faster (:func:`iscse.faiss_ops.prefer_faiss`: CPU, ``M >= 16384``, ``B >= 16``) and installed; else None (the
    main backend's own kNN)."""
    if knn_backend is not None:
        return get_backend(knn_backend, device)
    if isinstance(backend, str) and backend == "auto" and device.type == "cpu" and _faiss_prefers(device, size,
                                                                                                   batch, dim):
        return get_backend("faiss", device)
    return None


def _faiss_prefers(device, size, batch, dim) -> bool:
    if "faiss" not in _CACHE:
        if _MISSING.get("faiss"):
            return False
        try:
            get_backend("faiss", device)
        except (ImportError, ValueError):
            _MISSING["faiss"] = True
            return False
    return _CACHE["faiss"].prefers(device, size, batch, dim)


def prepare(backend, knn_backend, device: torch.device | str) -> None:
    """Import (once) every backend a step with these arguments may dispatch to on ``device``, so that a step traced
    by ``torch.compile`` finds them loaded: an import inside a traced function is a graph break. :class:`iscse.ISCSELoss`
    calls this when it is built and whenever it moves; callers of the functional API under ``torch.compile`` can
    call it, or run one step eagerly, first. Missing optional dependencies are not raised here (the step raises
    them, naming the extra to install)."""
    device = torch.device(device)
    for name in (backend, knn_backend):
        if name is not None:
            try:
                get_backend(name, device)
            except (ImportError, ValueError):
                pass
    if knn_backend is None and isinstance(backend, str) and backend == "auto" and device.type == "cpu":
        _faiss_prefers(device, 0, 0, 0)  # imports FAISS, or records it missing


def available_backends(device: torch.device | str = "cpu") -> Dict[str, bool]:
    """Which concrete backends can be used on ``device`` here (imports each one)."""
    device = torch.device(device)
    out = {}
    for name in _REGISTRY:
        try:
            get_backend(name, device)
            out[name] = name != "triton" or device.type == "cuda" or _interpreting()
        except (ImportError, ValueError):
            out[name] = False
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"

