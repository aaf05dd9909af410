"""Backends: the registry, the ``"auto"`` policy, and one module per implementation (DESIGN.md §2).

- :mod:`iscse.backends.base`: the :class:`Backend` interface (imports no implementation);
- :mod:`iscse.backends.reference`: ``"reference"``, the paper's ops (:mod:`iscse.reference`) behind the interface;
- :mod:`iscse.backends.pytorch`: ``"torch"``, efficient PyTorch (the CPU default);
- :mod:`iscse.backends.triton_fused`: ``"triton"``, the fused kernels of :mod:`iscse.kernels` (the CUDA default);
- :mod:`iscse.backends.faiss_knn`: ``"faiss"``, a kNN provider only (``knn_only``): named as ``backend`` or
  ``knn_backend``, it finds the neighbours and the device's default backend computes the rest of the step
  (:func:`compute_backend`); it never calls back into this registry.

Implementations are imported lazily, on first use, so optional dependencies (Triton, FAISS) are needed only when
asked for.

``"auto"``: Triton for CUDA tensors when it imports, else torch. On CPU, when FAISS is installed and the buffer has
at least :data:`PROBE_MIN_ROWS` rows, the kNN step is given to whichever of torch and FAISS was faster *on this
machine* for that shape, measured once per shape class (a timed probe on the first step, cached for the process,
as cuDNN's benchmark mode and Triton's autotuner do): a crossover measured on one CPU was 3x wrong on another, so
none is hard-coded. See :func:`resolve_knn` and :func:`auto_knn_decisions`.
"""
from __future__ import annotations

import importlib
import os
import statistics
import time
from typing import Dict, Optional, Tuple

import torch

from .base import Backend

__all__ = ["Backend", "get_backend", "compute_backend", "resolve_knn", "resolve_name", "available_backends",
           "prepare", "auto_knn_decisions", "clear_auto_knn_decisions", "BACKEND_NAMES", "PROBE_MIN_ROWS"]

BACKEND_NAMES = ("auto", "reference", "torch", "triton", "faiss")

# name -> (module, class, install hint). Imported lazily, so optional dependencies are only needed when asked for.
_REGISTRY: Dict[str, Tuple[str, str, str]] = {
    "reference": ("iscse.backends.reference", "ReferenceBackend", ""),
    "torch": ("iscse.backends.pytorch", "TorchBackend", ""),
    "triton": ("iscse.backends.triton_fused", "TritonBackend", "pip install 'iscse[triton]'"),
    "faiss": ("iscse.backends.faiss_knn", "FaissBackend", "pip install 'iscse[faiss]' (or 'iscse[faiss-gpu]')"),
}
_CACHE: Dict[str, Backend] = {}
# Optional backends found missing (so a step does not try the import again: under torch.compile an import is a graph
# break), and whether Triton imports (asked once).
_MISSING: Dict[str, bool] = {}
_TRITON_USABLE: Optional[bool] = None

#: Buffers smaller than this never probe FAISS under ``"auto"`` (the kNN of a few thousand rows takes well under a
#: millisecond per query block on any CPU, so a probe could not pay for itself).
PROBE_MIN_ROWS = 4096
# Probe: rounds of interleaved timed calls per candidate (after one warm-up call each), and the margin FAISS must win
# by: near ties go to torch, the default that needs no extra package and gives bit-stable results.
_PROBE_ROUNDS = 3
_PROBE_MARGIN = 0.95
# (device type, M, B, D, storage dtype, query dtype) -> "torch" | "faiss"
_AUTO_KNN: Dict[Tuple, str] = {}


def _triton_usable() -> bool:
    global _TRITON_USABLE
    if _TRITON_USABLE is None:
        try:
            importlib.import_module("triton")
            importlib.import_module("iscse.backends.triton_fused")
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


def compute_backend(name, device: torch.device) -> Backend:
    """The backend that computes the aggregation and the losses for ``name``: ``get_backend(name, device)``, except
    that a kNN-only provider (FAISS) is replaced by the device's default (``"auto"``)."""
    impl = get_backend(name, device)
    return get_backend("auto", device) if impl.knn_only else impl


def resolve_knn(backend, knn_backend, q: torch.Tensor, storage: torch.Tensor) -> Optional[Backend]:
    """The backend for the kNN step of queries ``q`` ``(B, D)`` over ``storage`` ``(M, D)``, or None for the compute
    backend's own kNN.

    - ``knn_backend`` when given; else ``backend`` itself when it is a kNN-only provider (``backend="faiss"``);
    - under ``backend="auto"`` on CPU, with FAISS installed and ``M >= PROBE_MIN_ROWS``: FAISS if it was measured
      faster than the torch kNN on this machine for this shape class ``(M, B, D, dtypes)``. The first call for a
      shape class times both (one warm-up and :data:`_PROBE_ROUNDS` interleaved calls each, on ``q`` and
      ``storage``; nothing is written) and caches the choice for the process; FAISS must be at least 5% faster. No
      probe runs while ``torch.compile`` traces (FAISS would be a graph break there: torch is kept);
    - else None.
    """
    device = q.device
    if knn_backend is not None:
        return get_backend(knn_backend, device)
    if not (isinstance(backend, str) and backend == "auto"):
        impl = get_backend(backend, device)
        return impl if impl.knn_only else None
    if device.type != "cpu" or storage.shape[0] < PROBE_MIN_ROWS or _faiss_missing(device):
        return None
    key = (device.type, storage.shape[0], q.shape[0], q.shape[1], storage.dtype, q.dtype)
    choice = _AUTO_KNN.get(key)
    if choice is None:
        if torch.compiler.is_compiling():
            return None
        choice = _AUTO_KNN[key] = _probe_knn(q, storage)
    return get_backend(choice, device) if choice != "torch" else None


def _faiss_missing(device) -> bool:
    if "faiss" in _CACHE:
        return False
    if _MISSING.get("faiss"):
        return True
    try:
        get_backend("faiss", device)
    except (ImportError, ValueError):
        _MISSING["faiss"] = True
        return True
    return False


def _probe_knn(q: torch.Tensor, storage: torch.Tensor) -> str:
    """Time the torch and the FAISS kNN of ``q`` over ``storage`` (k = 16, no exclusion), interleaved; return the
    name of the faster one (torch unless FAISS wins by the margin)."""
    q = q.detach()
    k = min(16, storage.shape[0])
    candidates = {name: get_backend(name, q.device) for name in ("torch", "faiss")}
    times: Dict[str, list] = {name: [] for name in candidates}
    for rnd in range(_PROBE_ROUNDS + 1):
        for name, impl in candidates.items():
            start = time.perf_counter()
            impl.knn_topk(q, storage, k, None, 0)
            if rnd:  # round 0 warms both up (thread pools, FAISS's buffers)
                times[name].append(time.perf_counter() - start)
    t_torch, t_faiss = statistics.median(times["torch"]), statistics.median(times["faiss"])
    return "faiss" if t_faiss < _PROBE_MARGIN * t_torch else "torch"


def auto_knn_decisions() -> Dict[Tuple, str]:
    """The ``"auto"`` kNN choices made so far in this process: ``(device type, M, B, D, storage dtype, query dtype)
    -> "torch" | "faiss"`` (a copy)."""
    return dict(_AUTO_KNN)


def clear_auto_knn_decisions() -> None:
    """Forget the ``"auto"`` kNN choices, so the next step of each shape class probes again (e.g. after the machine's
    load or thread settings changed)."""
    _AUTO_KNN.clear()


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
    try:
        get_backend("auto", device)  # the compute backend paired with a kNN-only provider
    except (ImportError, ValueError):
        pass
    if knn_backend is None and isinstance(backend, str) and backend == "auto" and device.type == "cpu":
        _faiss_missing(device)  # imports FAISS, or records it missing


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
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

