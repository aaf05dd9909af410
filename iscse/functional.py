"""Functional IS-CSE API: validate, then dispatch to a backend (:mod:`iscse.backends`).

Every function takes ``backend=``: ``"auto"`` (default: the torch baseline, or a faster candidate once it has
matched the baseline on the actual inputs of that shape class: Triton on CUDA, FAISS's kNN for large buffers; see
:mod:`iscse.backends`), ``"torch"``, ``"reference"``, ``"triton"``, ``"faiss"`` (kNN by FAISS, the rest by torch),
a name added with :func:`iscse.backends.register_backend`, or a :class:`~iscse.backends.Backend` instance. A named
backend is used as it is, never second-guessed.

The paper's ablations: ``aggregation="mean"`` (:func:`smooth`, :func:`iscse_loss`) and ``grouping="pddp"``
(:func:`iscse_loss`; torch only, :mod:`iscse.pddp`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _validation as V
from . import backends as _backends
from .backends import compute_backend, get_backend
from .buffer import MemoryBuffer, snapshot
from .pddp import check_pddp, pddp_losses

__all__ = ["knn_topk", "smooth", "info_nce", "iscse_loss", "ISCSEOutput", "GROUPINGS", "AGGREGATIONS"]

#: ``grouping=`` names: ``"knn"`` (the paper: each query's k nearest buffer rows) or ``"pddp"`` (the released code's
#: ablation: ``M // k`` groups by Principal Direction Divisive Partitioning, :mod:`iscse.pddp`).
GROUPINGS = ("knn", "pddp")
#: ``aggregation=`` names: ``"attention"`` (the paper) or ``"mean"`` (the released code's ablation: plain mean).
AGGREGATIONS = ("attention", "mean")

BufferLike = Union[MemoryBuffer, torch.Tensor]


class ISCSEOutput(NamedTuple):
    """What :func:`iscse_loss` returns with ``return_components=True``.

    ``loss = contrastive + alpha * smooth``; ``contrastive`` is L_cl (InfoNCE of ``z1`` against ``z2``), ``smooth``
    is L_s (InfoNCE of ``z1`` against the smoothed positives ``z*``; zero until the buffer is full). All three are
    scalar tensors of the same graph: log ``contrastive.detach()``, no second computation is needed.
    """

    loss: torch.Tensor
    contrastive: torch.Tensor
    smooth: torch.Tensor


def _storage(buffer: BufferLike, name: str = "buffer") -> Tuple[torch.Tensor, Union[int, torch.Tensor]]:
    """``(storage, ptr)``: a buffer's ``ptr`` is its 0-dim device tensor (no host read), a plain tensor's is 0."""
    if isinstance(buffer, MemoryBuffer):
        return buffer.storage, buffer.ptr_tensor
    if isinstance(buffer, torch.Tensor):
        if buffer.dim() != 2:
            raise ValueError(f"{name} must be a MemoryBuffer or a 2-D (M, D) tensor, got shape {tuple(buffer.shape)}")
        if buffer.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {buffer.dtype}")
        return buffer, 0
    raise TypeError(f"{name} must be a MemoryBuffer or a torch.Tensor, got {type(buffer).__name__}")


def _self_slots(q: torch.Tensor, buffer: BufferLike, self_slots) -> Optional[torch.Tensor]:
    if self_slots is None:
        return None
    if isinstance(self_slots, str):
        if self_slots != "last":
            raise ValueError(f"self_slots must be 'last', None or an int64 tensor, got {self_slots!r}")
        if not isinstance(buffer, MemoryBuffer):
            raise ValueError("self_slots='last' needs a MemoryBuffer; for a plain tensor pass self_slots=None "
                             "(exclude nothing) or an int64 tensor of the slots to exclude")
        if buffer.last_push != q.shape[0]:
            raise ValueError(f"self_slots='last' means q is the batch pushed last, but the last push had "
                             f"{buffer.last_push} rows and q has {q.shape[0]}; push q first or pass self_slots")
        return buffer.last_slots()
    if not isinstance(self_slots, torch.Tensor) or self_slots.dtype != torch.int64:
        raise TypeError("self_slots must be 'last', None or an int64 tensor")
    if self_slots.shape != (q.shape[0],):
        raise ValueError(f"self_slots must have shape ({q.shape[0]},), got {tuple(self_slots.shape)}")
    V.check_same_device("self_slots", self_slots, q.device, "q")
    return self_slots


def knn_topk(q: torch.Tensor, buffer: BufferLike, k: int, *, self_slots="last",
             backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` buffer rows most similar to each query by inner product, the query's own slot excluded.

    Args:
        q: ``(B, D)`` queries (IS-CSE: the normalised second view ``q2``), fp32/bf16/fp16/fp64.
        buffer: a :class:`MemoryBuffer` or an ``(M, D)`` tensor of rows.
        k: neighbours per query, ``1 <= k <= M - 1``.
        self_slots: ``"last"`` (default): ``q`` is the batch most recently pushed into ``buffer`` and row ``i``'s own
            slot is excluded; ``None``: exclude nothing; or an int64 ``(B,)`` tensor of slots to exclude.
        backend: see the module docstring.

    Returns:
        ``(vals, idx)``, each ``(B, k)`` sorted by descending similarity: ``vals`` the dot products (fp32, fp64 for
        fp64 inputs), ``idx`` int64 slot indices into ``buffer`` (its storage order). Not differentiable.
    """
    storage, ptr = _storage(buffer)
    V.check_embeddings("q", q, storage.shape[1])
    V.check_same_device("q", q, storage.device)
    slots = _self_slots(q, buffer, self_slots)
    V.check_k(k, storage.shape[0] - (1 if slots is not None else 0))
    impl = _auto_knn(q, storage, k, slots, ptr) if _is_auto(backend) else get_backend(backend)
    return impl.knn_topk(q, storage, k, slots, ptr)


def smooth(q: torch.Tensor, buffer: BufferLike, idx: torch.Tensor, vals: torch.Tensor,
           attn_temperature: float = 2.0, *, backend: str = "auto", aggregation: str = "attention") -> torch.Tensor:
    """Instance smoothing: ``z*_i = softmax([q_i.q_i, vals_i] / attn_temperature) @ [q_i; buffer[idx_i]]``.

    Args:
        q: ``(B, D)`` the normalised queries; differentiable (its gradient flows through both the group's row 0 and
            the attention logits, as in the paper's code).
        buffer: a :class:`MemoryBuffer` or an ``(M, D)`` tensor (constants).
        idx: int64 ``(B, k)`` neighbour slots, from :func:`knn_topk`.
        vals: ``(B, k)`` their dot products with ``q``, from :func:`knn_topk` (used as the attention logits).
        attn_temperature: the attention divisor (the paper's code divides by 2).
        aggregation: ``"attention"`` (the paper, above) or ``"mean"`` (the released code's ablation:
            ``z*_i = mean([q_i; buffer[idx_i]])``, uniform weights ``1 / (k + 1)``; ``vals`` and ``attn_temperature``
            are then unused).

    Returns:
        ``(B, D)`` smoothed positives ``z*`` in fp32 (fp64 for fp64 inputs).
    """
    storage, _ = _storage(buffer)
    V.check_embeddings("q", q, storage.shape[1])
    V.check_same_device("q", q, storage.device)
    t = V.check_positive("attn_temperature", attn_temperature)
    aggregation = V.check_choice("aggregation", aggregation, AGGREGATIONS)
    for name, x, dtypes in (("idx", idx, (torch.int64,)), ("vals", vals, V.FLOAT_DTYPES)):
        if not isinstance(x, torch.Tensor) or x.dtype not in dtypes:
            raise TypeError(f"{name} must be a tensor of dtype {dtypes}, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must have shape ({q.shape[0]}, k), got {tuple(x.shape)}")
        V.check_same_device(name, x, q.device, "q")
    if idx.shape != vals.shape:
        raise ValueError(f"idx and vals must have the same shape, got {tuple(idx.shape)} and {tuple(vals.shape)}")
    if _is_auto(backend):
        impl = _auto_smooth(q, storage, idx, vals, t, aggregation)
    else:
        impl = compute_backend(backend)
    return impl.smooth(q, storage, idx, vals, t, aggregation=aggregation)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05, *, backend: str = "auto") -> torch.Tensor:
    """InfoNCE with in-batch negatives: ``mean_i CE(cos(a_i, b_j) / temperature, target j = i)``.

    ``a``, ``b``: ``(B, D)``; temperature 0.05 is a logit scale of 20. Returns a scalar (fp32, fp64 for fp64
    inputs), differentiable in ``a`` and ``b``.
    """
    V.check_pair("a", a, "b", b)
    t = V.check_positive("temperature", temperature)
    impl = _auto_info_nce(a, b, t) if _is_auto(backend) else compute_backend(backend)
    return impl.info_nce(a, b, t)


def _check_step(z1: torch.Tensor, z2: torch.Tensor, buffer: MemoryBuffer, *, k, temperature, attn_temperature,
                alpha, push, grouping, aggregation, knn_backend=None):
    """The checks every IS-CSE step makes before the buffer changes (:func:`iscse_loss` and
    :func:`iscse.hard_negatives.iscse_hard_negative_loss`): ``z1``, ``z2`` against the buffer, and the
    hyperparameters. Returns ``(k, temperature, attn_temperature, alpha, grouping, aggregation)``, normalised."""
    if not isinstance(buffer, MemoryBuffer):
        raise TypeError(f"buffer must be an iscse.MemoryBuffer, got {type(buffer).__name__}")
    V.check_pair("z1", z1, "z2", z2, buffer.dim)
    V.check_same_device("z1", z1, buffer.device)
    if z1.shape[0] > buffer.size:
        raise ValueError(f"batch size {z1.shape[0]} is larger than the buffer size {buffer.size}")
    grouping = V.check_choice("grouping", grouping, GROUPINGS)
    aggregation = V.check_choice("aggregation", aggregation, AGGREGATIONS)
    if grouping == "pddp":
        k = check_pddp(k, buffer.size, knn_backend)
    else:
        k = V.check_k(k, buffer.size - 1)
    temperature = V.check_positive("temperature", temperature)
    attn_temperature = V.check_positive("attn_temperature", attn_temperature)
    alpha = V.check_alpha(alpha, allow_tensor=True)
    if isinstance(alpha, torch.Tensor):
        V.check_same_device("alpha", alpha, z1.device, "z1")
    if not isinstance(push, bool):
        raise TypeError(f"push must be a bool, got {type(push).__name__}")
    return k, temperature, attn_temperature, alpha, grouping, aggregation


def iscse_loss(z1: torch.Tensor, z2: torch.Tensor, buffer: MemoryBuffer, *, k: int = 16, temperature: float = 0.05,
               attn_temperature: float = 2.0, alpha: Union[float, torch.Tensor] = 0.1, backend: str = "auto",
               knn_backend: Optional[str] = None, return_components: bool = False,
               check_finite: Optional[bool] = None, push: bool = True, grouping: str = "knn",
               aggregation: str = "attention") -> Union[torch.Tensor, ISCSEOutput]:
    """One IS-CSE step: push ``normalize(z2)`` into ``buffer``, return ``L_cl + alpha * L_s``.

    ``L_cl`` is InfoNCE of ``z1`` against ``z2``; once every buffer slot has been written, ``L_s`` is InfoNCE of
    ``z1`` against the smoothed positives ``z*`` (:func:`smooth` over the :func:`knn_topk` neighbours of
    ``q2 = normalize(z2)``, its own slot excluded), and zero before that (docs/concepts.md: The computation).

    No host synchronisation (with the default ``check_finite`` on CUDA): the write slots (the queries' own slots)
    and whether the buffer is full come from the buffer's device state. ``L_s`` is computed every step and replaced
    by zero (``torch.where`` on the device "full" flag, so neither its value nor its gradient reaches the result)
    until the buffer is full; while it fills, the neighbours are found among the zero rows not yet written, which
    keeps every value finite. A kNN backend that reads the host anyway (``FaissBackend(approximate=True)``:
    ``Backend.syncs_host``) instead reads the flag on the host and skips the smoothing while the buffer fills.

    Args:
        z1: ``(B, D)`` embeddings of the first dropout view (fp32/bf16/fp16/fp64), ``B <= buffer.size``.
        z2: ``(B, D)`` embeddings of the second dropout view, same shape and dtype as ``z1``.
        buffer: the :class:`MemoryBuffer` (``D`` must match); it is pushed to, on success only.
        k: neighbours per query (paper: 16).
        temperature: InfoNCE temperature (0.05).
        attn_temperature: the attention divisor (2).
        alpha: weight of ``L_s`` (0.1), a number >= 0 or a 0-dim floating tensor (e.g. a schedule evaluated on the
            device; a tensor's value is not checked, as that would read the device).
        backend: which implementation computes the loss (a name, or a :class:`~iscse.backends.Backend` instance
            such as ``FaissBackend(approximate=True)``); see ``knn_backend`` for the kNN step.
            ``"auto"`` with ``knn_backend=None`` runs the torch baseline until the first training step of the shape
            class whose buffer is full; that step verifies the candidates (Triton on CUDA, FAISS's kNN for
            ``M >= 4096``) against torch on its own inputs and keeps the fastest that agrees, for the process
            (:mod:`iscse.backends`). ``"auto"`` with a ``knn_backend``: torch with that kNN provider.
        knn_backend: another backend for the kNN step only (e.g. ``"faiss"`` for very large buffers;
            ``backend="faiss"`` means the same with torch for the rest).
        return_components: return an :class:`ISCSEOutput` ``(loss, contrastive, smooth)`` instead of the loss.
        check_finite: raise ``ValueError`` on NaN/inf in ``z1``/``z2``. ``None`` (default): on CPU tensors only,
            where the check costs no synchronisation; ``True``: on CUDA too (a device-to-host read every step);
            ``False``: never. Skipped while ``torch.compile`` traces or a CUDA graph is captured.
        push: ``True`` (default): push ``q2`` first, then exclude each query's own slot from its neighbours (a
            training step). ``False``: leave the buffer unchanged and search all of its current rows (nothing to
            exclude: the queries are not in it); ``L_s`` is on when the buffer is already full (an evaluation).
        grouping: how each query's group is formed. ``"knn"`` (default, the paper): the query and its ``k``
            nearest buffer rows. ``"pddp"`` (the released code's ablation, :mod:`iscse.pddp`): ``M // k`` groups by
            Principal Direction Divisive Partitioning of ``[q2; the M - B buffer rows before the batch]``
            (``1 <= k <= M``); the gradient also flows through the other in-batch rows of the query's group. PDDP is
            torch only: whatever ``backend`` is given it runs :mod:`iscse.pddp` (``backend="reference"``: the
            transcription :func:`iscse.reference.pddp_aggregate`) and ``backend`` computes only the two InfoNCE
            terms; ``knn_backend`` must be None. A PDDP step reads the device on the host (group sizes are data
            dependent: a sync on CUDA, a graph break under ``torch.compile``), so it reads the "full" flag there
            too and skips the grouping while the buffer fills. With ``push=False`` the groups are those the same
            batch would get in a training step (``[q2; the M - B newest rows]``), the buffer unchanged.
        aggregation: ``"attention"`` (default, the paper): softmax of ``q2_i . x / attn_temperature`` over the
            group; ``"mean"`` (the released ablation): the group's plain mean (``"knn"``: the ``k + 1`` rows
            ``[q2_i; neighbours]``; ``"pddp"``: the query's group, which the released code does not define).

    Bad input raises ``ValueError``/``TypeError`` naming the argument before the buffer changes.
    """
    k, temperature, attn_temperature, alpha, grouping, aggregation = _check_step(
        z1, z2, buffer, k=k, temperature=temperature, attn_temperature=attn_temperature, alpha=alpha, push=push,
        grouping=grouping, aggregation=aggregation, knn_backend=knn_backend)
    # "auto" (without a knn_backend) starts from the baseline and may switch to a verified candidate after the push
    # (see _knn_losses); a named backend is used as it is.
    auto = _is_auto(backend) and knn_backend is None and grouping == "knn"
    impl = compute_backend(backend)
    if grouping == "pddp":
        knn = impl
        impl.check_inputs(z1, z2, buffer.storage, None)  # PDDP groups in torch: the backend finds no neighbours
    else:
        knn = _explicit_knn(backend, knn_backend, impl)
        impl.check_inputs(z1, z2, buffer.storage, k)
        if knn is not impl:
            knn.check_inputs(z1, z2, buffer.storage, k)
    if V.finite_check_wanted(check_finite, z1):
        V.check_finite("z1", z1)
        V.check_finite("z2", z2)

    q2 = F.normalize(z2, dim=-1)
    self_slots, undo = buffer._push_undoable(q2) if push else (None, None)  # the queries' own slots
    try:
        if grouping == "pddp":
            l_cl, l_s = pddp_losses(impl, z1, z2, q2, buffer, push, k=k, temperature=temperature,
                                    attn_temperature=attn_temperature, aggregation=aggregation)
        else:
            l_cl, l_s = _knn_losses(impl, knn, auto, z1, z2, q2, buffer, self_slots, push, k=k,
                                    temperature=temperature, attn_temperature=attn_temperature,
                                    aggregation=aggregation)
    except BaseException:
        # "On success only": a backend error (or FAISS's NaN check) after the push leaves the buffer as it was.
        if undo is not None:
            buffer._undo_push(undo)
        raise
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(l_s.dtype)
    loss = l_cl + alpha * l_s
    return ISCSEOutput(loss, l_cl, l_s) if return_components else loss


def _knn_losses(impl, knn, auto: bool, z1, z2, q2, buffer: MemoryBuffer, self_slots, push: bool, *, k, temperature,
                attn_temperature, aggregation):
    """``(L_cl, L_s)`` of a kNN-grouped step after its push (``self_slots``: the queries' own slots, None without a
    push): the backend's losses, ``L_s`` masked until the buffer is full; see :func:`iscse_loss`."""
    # Reads of the buffer's device state, snapshotted under torch.compile (see iscse.buffer.snapshot).
    self_slots = snapshot(self_slots) if self_slots is not None else None
    ptr = snapshot(buffer.ptr_tensor)
    if auto:
        plan = _auto_step(z1, z2, q2, buffer, self_slots, ptr, push, k=k, temperature=temperature,
                          attn_temperature=attn_temperature, aggregation=aggregation)
        impl, knn = plan.compute, plan.knn or plan.compute
    if knn.syncs_host or impl.syncs_host:
        smooth, full = buffer.full, None  # a host read, as these backends read the host anyway
    else:
        smooth, full = True, snapshot(buffer.full_tensor)
    l_cl, l_s = impl.iscse_loss(z1, z2, q2, buffer.storage, self_slots, ptr, k=k, temperature=temperature,
                                attn_temperature=attn_temperature, smooth=smooth, knn=knn, aggregation=aggregation)
    if full is not None:
        # torch.where, not a product: a 0 * NaN would be NaN, and where's backward sends exactly 0 to the branch
        # not taken.
        l_s = torch.where(full, l_s, torch.zeros((), dtype=l_s.dtype, device=l_s.device))
    return l_cl, l_s


# --------------------------------------------------------------------------------------------- "auto" dispatch
# Each op meets iscse.backends.decide with its shape class and a function that runs it on copies of the actual
# inputs: values and gradients to compare with the baseline, or one timed training-like call. Nothing here writes
# the buffer or draws from the caller's random stream.

def _is_auto(backend) -> bool:
    return isinstance(backend, str) and backend == "auto"


def _explicit_knn(backend, knn_backend, impl):
    """The kNN provider of a step with named backends: ``knn_backend``, or ``backend`` itself when it finds
    neighbours only (``"faiss"``), else the compute backend ``impl``."""
    if knn_backend is not None:
        return get_backend(knn_backend)
    named = get_backend(backend)
    return named if named.knn_only else impl


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _grads(out: torch.Tensor, inputs, retain: bool = False):
    return list(torch.autograd.grad(out, inputs, retain_graph=retain, allow_unused=True))


def _probe_grad(like: torch.Tensor) -> torch.Tensor:
    """A fixed upstream gradient, from a generator of its own (the caller's random stream is not touched)."""
    gen = torch.Generator(device=like.device).manual_seed(20230208)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32).to(like.dtype)


def _auto_knn(q, storage, k, slots, ptr):
    def run(plan, timed):
        vals, _ = (plan.knn or plan.compute).knn_topk(q.detach(), storage, k, slots, ptr)
        return [] if timed else [vals]  # the k largest similarities are the same whichever tied slots are taken
    key = _backends.shape_key("knn_topk", q, storage, k, slots is not None)
    plan = _backends.decide(key, q.device, run, rows=storage.shape[0], knn_ok=True,
                            check=lambda impl: impl.check_inputs(q, q, storage, k), labels=("similarities",))
    return plan.knn or plan.compute


def _auto_smooth(q, storage, idx, vals, t, aggregation):
    upstream = []  # the fixed upstream gradient, made on the first run (only when a decision is being made)

    def run(plan, timed):
        if not upstream:
            upstream.append(_probe_grad(q))
        qd = _leaf(q)
        z = plan.compute.smooth(qd, storage, idx, vals, t, aggregation=aggregation)  # (B, D)
        if timed:
            z.backward(upstream[0].to(z.dtype))
            return []
        return [z] + list(torch.autograd.grad(z, [qd], upstream[0].to(z.dtype), allow_unused=True))
    key = _backends.shape_key("smooth", q, storage, idx.shape[1], aggregation)
    plan = _backends.decide(key, q.device, run, rows=storage.shape[0], knn_ok=False,
                            check=lambda impl: impl.check_inputs(q, q, storage, idx.shape[1]),
                            labels=("z*", "grad q"))
    return plan.compute


def _auto_info_nce(a, b, t):
    def run(plan, timed):
        ad, bd = _leaf(a), _leaf(b)
        loss = plan.compute.info_nce(ad, bd, t)
        if timed:
            loss.backward()
            return []
        return [loss] + _grads(loss, [ad, bd])
    key = _backends.shape_key("info_nce", a)
    plan = _backends.decide(key, a.device, run, rows=0, knn_ok=False,
                            check=lambda impl: impl.check_inputs(a, b, b, None), labels=("loss", "grad a", "grad b"))
    return plan.compute


def _auto_step(z1, z2, q2, buffer: MemoryBuffer, self_slots, ptr, push: bool, *, k, temperature, attn_temperature,
               aggregation):
    """The plan of an ``"auto"`` IS-CSE step: decided on the first training step of the shape class whose buffer is
    known to be full (so the real neighbours are compared), the baseline until then."""
    storage = buffer.storage

    def run(plan, timed):
        z1d, z2d = _leaf(z1), _leaf(z2)
        q2d = F.normalize(z2d, dim=-1)
        l_cl, l_s = plan.compute.iscse_loss(z1d, z2d, q2d, storage, self_slots, ptr, k=k, temperature=temperature,
                                            attn_temperature=attn_temperature, smooth=True, knn=plan.knn,
                                            aggregation=aggregation)
        if timed:
            (l_cl + 0.1 * l_s).backward()
            return []
        return [l_cl, l_s] + _grads(l_cl, [z1d, z2d], retain=True) + _grads(l_s, [z1d, z2d])

    def near_tie(tol):
        # Whether some query's k-th and (k+1)-th neighbours are closer than the tolerance: then a last-bit
        # difference between two correct backends may swap them, and a mismatch proves nothing.
        available = storage.shape[0] - (1 if self_slots is not None else 0)
        if k >= available:
            return False
        vals, _ = _backends.get_backend(_backends.BASELINE).knn_topk(q2.detach(), storage, k + 1, self_slots, ptr)
        return bool((vals[:, k - 1] - vals[:, k]).min() <= tol)

    key = _backends.shape_key("iscse_loss", z1, storage, k, aggregation)
    return _backends.decide(key, z1.device, run, rows=storage.shape[0], knn_ok=True, ready=push and buffer.known_full,
                            check=lambda impl: impl.check_inputs(z1, z2, storage, k), near_tie=near_tie,
                            shared=True,
                            labels=("L_cl", "L_s", "grad z1 of L_cl", "grad z2 of L_cl", "grad z1 of L_s",
                                    "grad z2 of L_s"))
