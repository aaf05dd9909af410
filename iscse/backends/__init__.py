"""Backends: the registry, the verified ``"auto"`` policy, and one module per implementation (docs/concepts.md: Backends; Layering).

- :mod:`iscse.backends.base`: the :class:`Backend` interface (imports no implementation);
- :mod:`iscse.backends.reference`: ``"reference"``, the paper's ops (:mod:`iscse.reference`) behind the interface;
- :mod:`iscse.backends.pytorch`: ``"torch"``, efficient PyTorch: the **baseline** of ``"auto"`` on every device;
- :mod:`iscse.backends.triton_fused`: ``"triton"``, the fused kernels of :mod:`iscse.kernels` (an ``"auto"``
  candidate on CUDA);
- :mod:`iscse.backends.faiss_knn`: ``"faiss"``, a kNN provider only (``knn_only``; an ``"auto"`` candidate on CPU,
  and on CUDA with a GPU build of FAISS, for buffers of at least 4096 rows). Named as ``backend``, it finds the
  neighbours and the torch backend computes the rest of the step (:func:`compute_backend`).

Implementations are imported lazily, on first use, so optional dependencies (Triton, FAISS) are needed only when
asked for. :func:`register_backend` adds one of your own (another kernel library, another accelerator), optionally
as an ``"auto"`` candidate; the built-in backends are registered through it too.

``"auto"`` verifies a fast path before it trusts it. Each device type has the baseline (``"torch"``) and an ordered
list of candidates. The first time an op meets a *shape class* (the op, the device type, the sizes, the dtypes, k
and the aggregation), every candidate runs beside the baseline on the actual inputs (for the IS-CSE step: ``L_cl``,
``L_s`` and the gradients of ``z1``, ``z2``, on the first training step whose buffer is full, so that the real
neighbours are compared; until then the step runs on the baseline):

- a candidate that differs by more than :func:`tolerance` (1e-4 relative in fp32, 2e-2 in bf16), or raises, is
  dropped for the process with one warning that names it, the shape, the dtype and the worst error, and says what to
  do (``python -m iscse.check``, then report it);
- among the candidates that agree, the fastest by interleaved timing (one verified run as warm-up, then
  :data:`_PROBE_ROUNDS` timed rounds) is kept if it beats the baseline by 5%; ties go to the baseline;
- the decision holds for the rest of the process (:func:`auto_decisions`); under ``torch.distributed`` rank 0
  decides the IS-CSE step's and broadcasts it (one small collective, at decision time only; every rank meets the
  same shape class at the same step when the embeddings are all-gathered, as the trainer and the
  sentence-transformers loss do, or the per-rank batches are equal), and :class:`iscse.ISCSELoss`
  saves the decisions of its shape classes in its ``state_dict()``, so a resumed run reuses them without probing;
- nothing is probed while ``torch.compile`` traces or a CUDA graph is captured: the decision made, or the baseline;
- a backend named explicitly (``backend="triton"``) is never second-guessed.

Verification and timing cost a few steps' time once per shape class; they never push to the buffer or advance a
step counter, so the step returns what the chosen backend computes on the step's inputs.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import statistics
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .._io import first_line
from .base import Backend

__all__ = ["Backend", "register_backend", "unregister_backend", "backend_names", "get_backend", "compute_backend",
           "check_backend_name", "available_backends", "prepare", "auto_candidates", "auto_decisions",
           "clear_auto_decisions", "load_decisions", "shape_key", "decide", "tolerance", "BASELINE", "PROBE_MIN_ROWS"]

logger = logging.getLogger("iscse")

#: The backend every ``"auto"`` decision is measured against, and the one used until a decision is made.
BASELINE = "torch"

#: FAISS is an ``"auto"`` candidate only on buffers of at least this many rows (``FaissBackend.auto_min_rows``).
PROBE_MIN_ROWS = 4096
# Timed rounds per plan after the verified run (which is the warm-up: it compiles kernels, fills thread pools), and
# the margin a candidate must beat the baseline by: near ties go to the baseline.
_PROBE_ROUNDS = 3
_PROBE_MARGIN = 0.95
# Verification steps that may be inconclusive (a mismatch where neighbours nearly tie at rank k, so a last-bit
# difference may legitimately change the neighbour set) before the shape class settles on the baseline.
_MAX_INCONCLUSIVE = 3

# name -> factory (called once, lazily) and install hint
_FACTORIES: Dict[str, Callable[[], Backend]] = {}
_HINTS: Dict[str, str] = {}
_BUILTIN: Tuple[str, ...] = ("reference", "torch", "triton", "faiss")
# device type -> candidate names, in order
_AUTO: Dict[str, List[str]] = {}
_CACHE: Dict[str, Backend] = {}
# name -> why it cannot be built here (an ImportError message), so a step does not try the import again: under
# torch.compile an import is a graph break
_MISSING: Dict[str, str] = {}
# shape class -> the plan name ("torch", or a candidate's name)
_DECISIONS: Dict[tuple, str] = {}
# (device type, name) of candidates dropped for the process after a failed verification
_REJECTED: Set[Tuple[str, str]] = set()
_INCONCLUSIVE: Dict[tuple, int] = {}


# ---------------------------------------------------------------------------------------------------- the registry

def register_backend(name: str, factory: Callable[[], Backend], *, auto_devices: Iterable[str] = (),
                     replace: bool = False) -> None:
    """Make ``factory()`` available as ``backend=name`` (and ``knn_backend=name``) everywhere.

    Args:
        name: the backend's name (not ``"auto"``).
        factory: a callable with no arguments that returns a :class:`Backend`; called once, on first use. An
            ``ImportError`` it raises marks the backend unavailable here (its message is shown when the backend is
            named, and ``"auto"`` skips it).
        auto_devices: device types (``"cuda"``, ``"cpu"``, ``"xpu"``, ...) on which ``"auto"`` tries this backend as a
            candidate after the ones registered before it, under the same verification as the built-in ones (see
            the module docstring): it is used only where it matches the torch baseline and is faster. A kNN-only
            backend (``Backend.knn_only``) is tried for the kNN step with torch for the rest.
        replace: allow replacing a registered backend of the same name (its cached object and its ``"auto"``
            places are dropped).

    Example::

        class MyBackend(iscse.backends.Backend):
            name = "mine"
            ...  # knn_topk, smooth, info_nce (and optionally a fused iscse_loss)

        iscse.backends.register_backend("mine", MyBackend, auto_devices=("cuda",))
        loss = iscse.ISCSELoss(768, backend="mine")   # explicitly, or under "auto" once verified
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty str other than 'auto', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable (a Backend subclass or a function returning one), got "
                        f"{type(factory).__name__}")
    if isinstance(auto_devices, str):
        auto_devices = (auto_devices,)
    devices = []
    for dev in auto_devices:
        if not isinstance(dev, str):
            raise TypeError(f"auto_devices must be device type names such as 'cuda', got {dev!r}")
        try:
            devices.append(torch.device(dev).type)
        except RuntimeError as exc:
            raise ValueError(f"auto_devices: {dev!r} is not a torch device type") from exc
    if name in _FACTORIES and not replace:
        raise ValueError(f"a backend named {name!r} is already registered; pass replace=True to replace it")
    _forget(name)
    _FACTORIES[name] = factory
    for dev in devices:
        _AUTO.setdefault(dev, []).append(name)


def unregister_backend(name: str) -> None:
    """Remove a backend added by :func:`register_backend` (the built-in ones cannot be removed), with the
    ``"auto"`` decisions that chose it."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in backend and cannot be unregistered")
    if name not in _FACTORIES:
        raise ValueError(f"no backend named {name!r} is registered")
    _forget(name)
    del _FACTORIES[name]


def _forget(name: str) -> None:
    _CACHE.pop(name, None)
    _MISSING.pop(name, None)
    _HINTS.pop(name, None)
    for names in _AUTO.values():
        while name in names:
            names.remove(name)
    for key in [key for key, chosen in _DECISIONS.items() if chosen == name]:
        del _DECISIONS[key]
    for item in [item for item in _REJECTED if item[1] == name]:
        _REJECTED.discard(item)


def _lazy(module: str, cls: str) -> Callable[[], Backend]:
    def factory() -> Backend:
        return getattr(importlib.import_module(module), cls)()
    factory.__qualname__ = f"{module}.{cls}"
    return factory


register_backend("reference", _lazy("iscse.backends.reference", "ReferenceBackend"))
register_backend("torch", _lazy("iscse.backends.pytorch", "TorchBackend"))
register_backend("triton", _lazy("iscse.backends.triton_fused", "TritonBackend"), auto_devices=("cuda",))
register_backend("faiss", _lazy("iscse.backends.faiss_knn", "FaissBackend"), auto_devices=("cpu", "cuda"))
_HINTS.update(triton="pip install 'iscse[triton]'",
              faiss="pip install 'iscse[faiss]' (or 'iscse[faiss-gpu]')")


def backend_names() -> Tuple[str, ...]:
    """The names ``backend=`` accepts: ``"auto"`` and every registered backend."""
    return ("auto",) + tuple(_FACTORIES)


def check_backend_name(name) -> str:
    """Validate a backend name (``TypeError``/``ValueError`` naming the choices); returns it."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {backend_names()}, or a Backend instance, got "
                        f"{type(name).__name__}")
    if name != "auto" and name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; expected one of {backend_names()}")
    return name


def get_backend(name, device: Optional[torch.device] = None) -> Backend:
    """The backend object registered as ``name``, or ``name`` itself when it is already a :class:`Backend`
    instance (e.g. ``FaissBackend(approximate=True)``). ``"auto"`` gives the baseline (``"torch"``): which backend
    ``"auto"`` runs is decided per op and shape class (module docstring). Raises ``ImportError`` naming the extra
    to install when the backend's optional dependency is missing."""
    if isinstance(name, Backend):
        return name
    name = check_backend_name(name)
    if name == "auto":
        name = BASELINE
    impl = _CACHE.get(name)
    if impl is not None:
        return impl
    if name in _MISSING:
        raise ImportError(_MISSING[name])
    try:
        impl = _FACTORIES[name]()
    except ImportError as exc:
        hint = _HINTS.get(name)
        _MISSING[name] = (f"backend {name!r} needs a package that is not installed ({exc})"
                          + (f"; install it with: {hint}" if hint else ""))
        raise ImportError(_MISSING[name]) from exc
    if not isinstance(impl, Backend):
        raise TypeError(f"the factory of backend {name!r} returned {type(impl).__name__}, not an "
                        f"iscse.backends.Backend")
    _CACHE[name] = impl
    return impl


def compute_backend(name, device: Optional[torch.device] = None) -> Backend:
    """The backend that computes the aggregation and the losses for an explicit ``name``: ``get_backend(name)``,
    except that a kNN-only provider (FAISS) is paired with the baseline, torch (to pair it with Triton on CUDA, pass
    ``backend="triton", knn_backend="faiss"``)."""
    impl = get_backend(name, device)
    return get_backend(BASELINE) if impl.knn_only else impl


def available_backends(device: torch.device | str = "cpu") -> Dict[str, bool]:
    """Which registered backends can be used on ``device`` here (imports each one): ``{name: bool}``. Triton counts
    as available on CPU only inside Triton's interpreter (``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    out = {}
    for name in _FACTORIES:
        try:
            impl = get_backend(name, device)
        except (ImportError, ValueError, TypeError):
            out[name] = False
            continue
        ok = impl.supports(device)
        if name == "triton" and device.type != "cuda":
            ok = ok and os.environ.get("TRITON_INTERPRET", "0") == "1"
        out[name] = bool(ok)
    return out


def prepare(backend, knn_backend, device: torch.device | str) -> None:
    """Import (once) every backend a step with these arguments may dispatch to on ``device`` (the ``"auto"``
    candidates included), so that a step traced by ``torch.compile`` finds them loaded: an import inside a traced
    function is a graph break. :class:`iscse.ISCSELoss` calls this when it is built and whenever it moves. Missing
    optional dependencies are not raised here (a step that names them raises, naming the extra to install)."""
    device = torch.device(device)
    names = [n for n in (backend, knn_backend) if n is not None]
    if isinstance(backend, str) and backend == "auto" and knn_backend is None:
        names += list(_AUTO.get(device.type, ()))
    for name in names + [BASELINE]:
        try:
            get_backend(name, device)
        except (ImportError, ValueError, TypeError):
            pass


# ------------------------------------------------------------------------------------------ the verified "auto" policy

def tolerance(*dtypes: torch.dtype, device: Optional[torch.device] = None) -> float:
    """Relative tolerance of ``"auto"``'s verification for inputs of these dtypes: 1e-4 (fp32, fp64), 4e-3 (fp16),
    2e-2 (bf16). On CUDA with TF32 matmuls allowed (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision`` below "highest") the fp32 baseline itself is only that exact: 5e-3."""
    table = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
    tol = max([table.get(d, 1e-4) for d in dtypes] or [1e-4])
    if device is not None and torch.device(device).type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        tol = max(tol, 5e-3)
    return tol


def auto_candidates(device: torch.device | str) -> List[str]:
    """The ``"auto"`` candidates registered for ``device``'s type, in order (before the per-shape checks: minimum
    buffer rows, input dtypes, availability here, and candidates dropped after a failed verification)."""
    return list(_AUTO.get(torch.device(device).type, ()))


def auto_decisions() -> Dict[tuple, str]:
    """The ``"auto"`` decisions made (or loaded) so far in this process: shape class -> backend name (a copy).

    A shape class is ``(op, device type, M, B, D, buffer dtype, input dtype, k, aggregation)`` for
    ``"iscse_loss"``, ``"knn_topk"`` and ``"smooth"`` (``"knn_topk"``: ``aggregation`` is whether own slots are
    excluded), and ``("info_nce", device type, B, D, dtype)``; dtypes as names (``"float32"``)."""
    return dict(_DECISIONS)


def clear_auto_decisions() -> None:
    """Forget every ``"auto"`` decision and rejection, so the next op of each shape class verifies and times its
    candidates again (e.g. after the machine's load or thread settings changed)."""
    _DECISIONS.clear()
    _REJECTED.clear()
    _INCONCLUSIVE.clear()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_key(op: str, z: torch.Tensor, storage: Optional[torch.Tensor] = None, k: int = 0, extra=None) -> tuple:
    """The shape class of one op's call (see :func:`auto_decisions`): ``z`` the queries or embeddings ``(B, D)``,
    ``storage`` the buffer ``(M, D)`` (None for ``"info_nce"``)."""
    if storage is None:
        return (op, z.device.type, z.shape[0], z.shape[1], _dtype_name(z.dtype))
    return (op, z.device.type, storage.shape[0], z.shape[0], z.shape[1], _dtype_name(storage.dtype),
            _dtype_name(z.dtype), int(k), extra)


def load_decisions(entries: Sequence[Tuple[tuple, str]]) -> None:
    """Install saved decisions (``(shape class, backend name)`` pairs, as :class:`iscse.ISCSELoss` saves them) for
    this process, without probing. A decision that names a backend this machine cannot build runs the baseline,
    with a warning."""
    for key, name in entries:
        if name != BASELINE:
            try:
                impl = get_backend(name)
                ok, why = impl.supports(torch.device(key[1])), "it does not support this device here"
            except (ImportError, ValueError, TypeError) as exc:
                ok, why = False, str(exc)
            if not ok:
                warnings.warn(f"iscse: a saved 'auto' decision chose backend {name!r} for {_describe(key)}, but "
                              f"{why}; the step uses the baseline, {BASELINE!r}, instead", RuntimeWarning,
                              stacklevel=3)
                name = BASELINE
        _DECISIONS[tuple(key)] = name


def _describe(key: tuple) -> str:
    op, dev = key[0], key[1]
    if op == "info_nce":
        return f"info_nce on {dev} at B={key[2]}, D={key[3]}, {key[4]} inputs"
    _, _, m, b, d, sdtype, dtype, k, extra = key
    extra = f", {extra}" if op != "knn_topk" else (", own slots excluded" if extra else "")
    return f"{op} on {dev} at B={b}, M={m}, D={d}, k={k}, {dtype} inputs, {sdtype} buffer{extra}"


def _capturing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(device)


def _distributed() -> Optional[int]:
    """This process's rank when ``torch.distributed`` runs more than one process, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


def _broadcast(choice: Optional[str]) -> Optional[str]:
    holder = [choice]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


class _Plan:
    """What runs an op: ``compute`` (a full backend) and ``knn`` (None: the compute backend's own kNN)."""

    __slots__ = ("name", "compute", "knn")

    def __init__(self, name: str, compute: Backend, knn: Optional[Backend]):
        self.name, self.compute, self.knn = name, compute, knn


def _plan(name: str) -> _Plan:
    impl = get_backend(name)
    if impl.knn_only:
        return _Plan(name, get_backend(BASELINE), impl)
    return _Plan(name, impl, None)


def _candidates(device: torch.device, rows: int, check: Callable[[Backend], None], knn_ok: bool) -> List[_Plan]:
    plans = []
    for name in _AUTO.get(device.type, ()):
        if (device.type, name) in _REJECTED or name == BASELINE:
            continue
        try:
            impl = get_backend(name)
        except (ImportError, ValueError, TypeError):
            continue
        if (impl.knn_only and not knn_ok) or rows < impl.auto_min_rows or not impl.supports(device):
            continue
        try:
            check(impl)  # dtypes, k: a candidate that cannot run these inputs is simply not one for this class
        except (TypeError, ValueError):
            continue
        plans.append(_plan(name))
    return plans


def _rel_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / max(scale, 1e-12)


def decide(key: tuple, device: torch.device, run: Callable[[_Plan, bool], List[Optional[torch.Tensor]]], *,
           rows: int, check: Callable[[Backend], None], knn_ok: bool, ready: bool = True,
           near_tie: Optional[Callable[[float], bool]] = None, labels: Sequence[str] = (),
           shared: bool = False) -> _Plan:
    """The plan ``"auto"`` runs for shape class ``key`` on ``device``: the decision made for it, or else (when
    ``ready`` and nothing is being traced or captured) a new one, verified and timed here.

    ``run(plan, timed)`` runs the op with ``plan`` on copies of the actual inputs and returns the tensors to compare
    (``timed=False``: values and gradients) or nothing to compare (``timed=True``: the op as a training step runs
    it). ``check(backend)`` raises for inputs a candidate cannot take. ``near_tie(tol)``: whether a mismatch may come
    from neighbours that nearly tie (then the class is retried on a later call instead of dropping the candidate).
    ``labels`` name the compared tensors in the warning. ``shared``: under ``torch.distributed``, rank 0 decides and
    every rank takes its decision (a broadcast every rank must reach at the same call: the IS-CSE step, whose shape
    class is the same on every rank when embeddings are all-gathered or per-rank batches are equal); otherwise
    each process decides for itself."""
    chosen = _DECISIONS.get(key)
    if chosen is not None:
        try:
            return _plan(chosen)
        except (ImportError, ValueError, TypeError):
            return _plan(BASELINE)
    if not ready or _capturing(device):
        return _plan(BASELINE)
    rank = _distributed() if shared else None
    if rank is not None and rank != 0:
        chosen = _broadcast(None)  # rank 0 verifies and times; every rank takes its decision
    else:
        candidates = _candidates(device, rows, check, knn_ok)
        if not candidates:
            # Nothing to verify here (the broadcast still runs: every rank must take part in it).
            chosen = BASELINE
        else:
            chosen = _verify_and_time(key, device, run, candidates, near_tie, labels)
        if rank is not None:
            chosen = _broadcast(chosen)
    if chosen is None:  # inconclusive: this call runs the baseline, a later one verifies again
        return _plan(BASELINE)
    load_decisions([(key, chosen)])  # warns (and keeps the baseline) where rank 0's choice cannot run here
    return _plan(_DECISIONS[key])


def _verify_and_time(key, device, run, candidates: List[_Plan], near_tie, labels) -> Optional[str]:
    dtypes = [getattr(torch, name) for name in key[5:7]] if key[0] != "info_nce" else [getattr(torch, key[4])]
    tol = tolerance(*dtypes, device=device)
    base = _plan(BASELINE)
    with torch.enable_grad():
        expected = run(base, False)
        agreeing = []
        inconclusive = False
        for plan in candidates:
            try:
                got = run(plan, False)
                errors = [_rel_err(a, b) for a, b in zip(got, expected)] if len(got) == len(expected) else [math.inf]
                worst = max(errors) if errors else 0.0
                what = labels[errors.index(worst)] if labels and len(labels) == len(errors) else "output"
                failure = None if worst <= tol else f"differs from the {BASELINE} baseline by {worst:.2e} " \
                                                    f"relative in {what} (tolerance {tol:.0e})"
            except Exception as exc:  # noqa: BLE001 - a candidate that crashes is dropped like a wrong one
                failure = f"raised {type(exc).__name__}: {first_line(exc)}"
                worst = math.inf
            if failure is None:
                agreeing.append(plan)
                continue
            if near_tie is not None and worst != math.inf and near_tie(tol):
                inconclusive = True
                continue
            _REJECTED.add((device.type, plan.name))
            warnings.warn(
                f"iscse: 'auto' dropped backend {plan.name!r} for this process: for {_describe(key)} it {failure}. "
                f"'auto' runs {BASELINE!r} instead (correct, maybe slower). Please run `python -m iscse.check` and "
                f"report its output with this message to the iscse issue tracker; pass backend={BASELINE!r} to "
                f"silence this.", RuntimeWarning, stacklevel=5)
        if inconclusive and not agreeing:
            _INCONCLUSIVE[key] = _INCONCLUSIVE.get(key, 0) + 1
            if _INCONCLUSIVE[key] < _MAX_INCONCLUSIVE:
                return None
            logger.info("auto: %s: neighbours tie too closely to verify in %d steps; keeping %s",
                        _describe(key), _MAX_INCONCLUSIVE, BASELINE)
            return BASELINE
        if not agreeing:
            return BASELINE
        plans = [base] + agreeing
        times: Dict[str, List[float]] = {plan.name: [] for plan in plans}
        for _ in range(_PROBE_ROUNDS):
            for plan in plans:  # interleaved, so a change of load hits every plan alike
                _sync(device)
                start = time.perf_counter()
                run(plan, True)
                _sync(device)
                times[plan.name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    best = min(agreeing, key=lambda plan: med[plan.name])
    chosen = best.name if med[best.name] < _PROBE_MARGIN * med[BASELINE] else BASELINE
    logger.info("auto: %s: %s; using %s", _describe(key),
                ", ".join(f"{name} {1e3 * t:.3g} ms" for name, t in med.items()), chosen)
    return chosen
