"""Functional IS-CSE API: validate, then dispatch to a backend (:mod:`iscse.backends`).

Every function takes ``backend=``: ``"auto"`` (Triton for CUDA tensors when it imports, otherwise torch),
``"torch"``, ``"reference"``, ``"triton"`` or ``"faiss"`` (kNN by FAISS, the rest by the device's default path).

The paper's ablations: ``aggregation="mean"`` (:func:`smooth`, :func:`iscse_loss`) and ``grouping="pddp"``
(:func:`iscse_loss`; torch only, :mod:`iscse.pddp`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _validation as V
from .backends import compute_backend, resolve_knn
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
    impl = resolve_knn(backend, None, q, storage) or compute_backend(backend, q.device)
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
    impl = compute_backend(backend, q.device)
    if aggregation == "attention":  # the interface's original call, for backends that predate the ablation
        return impl.smooth(q, storage, idx, vals, t)
    return impl.smooth(q, storage, idx, vals, t, aggregation=aggregation)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05, *, backend: str = "auto") -> torch.Tensor:
    """InfoNCE with in-batch negatives: ``mean_i CE(cos(a_i, b_j) / temperature, target j = i)``.

    ``a``, ``b``: ``(B, D)``; temperature 0.05 is a logit scale of 20. Returns a scalar (fp32, fp64 for fp64
    inputs), differentiable in ``a`` and ``b``.
    """
    V.check_pair("a", a, "b", b)
    t = V.check_positive("temperature", temperature)
    return compute_backend(backend, a.device).info_nce(a, b, t)


def iscse_loss(z1: torch.Tensor, z2: torch.Tensor, buffer: MemoryBuffer, *, k: int = 16, temperature: float = 0.05,
               attn_temperature: float = 2.0, alpha: Union[float, torch.Tensor] = 0.1, backend: str = "auto",
               knn_backend: Optional[str] = None, return_components: bool = False,
               check_finite: Optional[bool] = None, push: bool = True, grouping: str = "knn",
               aggregation: str = "attention") -> Union[torch.Tensor, ISCSEOutput]:
    """One IS-CSE step: push ``normalize(z2)`` into ``buffer``, return ``L_cl + alpha * L_s``.

    ``L_cl`` is InfoNCE of ``z1`` against ``z2``; once every buffer slot has been written, ``L_s`` is InfoNCE of
    ``z1`` against the smoothed positives ``z*`` (:func:`smooth` over the :func:`knn_topk` neighbours of
    ``q2 = normalize(z2)``, its own slot excluded), and zero before that (DESIGN.md §1).

    No host synchronisation (with the default ``check_finite`` on CUDA): the write slots (the queries' own slots)
    and whether the buffer is full come from the buffer's device state. ``L_s`` is computed every step and replaced
    by zero (``torch.where`` on the device "full" flag, so neither its value nor its gradient reaches the result)
    until the buffer is full; while it fills, the neighbours are found among the zero rows not yet written, which
    keeps every value finite. A kNN backend that reads the host anyway (``FaissBackend(approximate=True)``:
    ``Backend.syncs_host``) instead reads the flag on the host and skips the smoothing while the buffer fills.

    Args:
        z1, z2: ``(B, D)`` embeddings of the two dropout views (fp32/bf16/fp16/fp64), ``B <= buffer.size``.
        buffer: the :class:`MemoryBuffer` (``D`` must match); it is pushed to, on success only.
        k: neighbours per query (paper: 16). temperature: InfoNCE temperature (0.05). attn_temperature: the
            attention divisor (2). alpha: weight of ``L_s`` (0.1), a number >= 0 or a 0-dim floating tensor (e.g.
            a schedule evaluated on the device; its value is checked on CPU only).
        backend: which implementation computes the loss (a name, or a :class:`~iscse.backends.Backend` instance
            such as ``FaissBackend(approximate=True)``); ``knn_backend``: another one for the kNN step only (e.g.
            ``"faiss"`` for very large buffers; ``backend="faiss"`` means the same with the device's default for the
            rest). Default: the same, except that under ``"auto"`` on CPU the kNN goes to FAISS, when installed,
            where a timed probe on the first step found it faster on this machine (:mod:`iscse.backends`).
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
    impl = compute_backend(backend, z1.device)
    if grouping == "pddp":
        knn = impl
        impl.check_inputs(z1, z2, buffer.storage, None)  # PDDP groups in torch: the backend finds no neighbours
    else:
        knn = resolve_knn(backend, knn_backend, z2, buffer.storage) or impl
        impl.check_inputs(z1, z2, buffer.storage, k)
        if knn is not impl:
            knn.check_inputs(z1, z2, buffer.storage, k)
    if V.finite_check_wanted(check_finite, z1):
        V.check_finite("z1", z1)
        V.check_finite("z2", z2)

    q2 = F.normalize(z2, dim=-1)
    if grouping == "pddp":
        l_cl, l_s = pddp_losses(impl, z1, z2, q2, buffer, push, k=k, temperature=temperature,
                                attn_temperature=attn_temperature, aggregation=aggregation)
    else:
        l_cl, l_s = _knn_losses(impl, knn, z1, z2, q2, buffer, push, k=k, temperature=temperature,
                                attn_temperature=attn_temperature, aggregation=aggregation)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(l_s.dtype)
    loss = l_cl + alpha * l_s
    return ISCSEOutput(loss, l_cl, l_s) if return_components else loss


def _knn_losses(impl, knn, z1, z2, q2, buffer: MemoryBuffer, push: bool, *, k, temperature, attn_temperature,
                aggregation):
    """``(L_cl, L_s)`` of a kNN-grouped step (push, then the backend's losses, ``L_s`` masked until the buffer is
    full): see :func:`iscse_loss`."""
    self_slots = buffer.push(q2) if push else None  # the write slots are the queries' own slots
    # Reads of the buffer's device state, snapshotted under torch.compile (see iscse.buffer.snapshot).
    self_slots = snapshot(self_slots) if self_slots is not None else None
    ptr = snapshot(buffer.ptr_tensor)
    if knn.syncs_host or impl.syncs_host:
        smooth, full = buffer.full, None  # a host read, as these backends read the host anyway
    else:
        smooth, full = True, snapshot(buffer.full_tensor)
    # aggregation is passed only when it is not the default, so Backend subclasses that predate it keep working.
    extra = {} if aggregation == "attention" else {"aggregation": aggregation}
    l_cl, l_s = impl.iscse_loss(z1, z2, q2, buffer.storage, self_slots, ptr, k=k, temperature=temperature,
                                attn_temperature=attn_temperature, smooth=smooth, knn=knn, **extra)
    if full is not None:
        # torch.where, not a product: a 0 * NaN would be NaN, and where's backward sends exactly 0 to the branch
        # not taken.
        l_s = torch.where(full, l_s, torch.zeros((), dtype=l_s.dtype, device=l_s.device))
    return l_cl, l_s
