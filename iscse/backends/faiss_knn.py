"""``backend="faiss"``: the kNN step by FAISS, for very large memory buffers (docs/concepts.md: Backends).

What it does, per device:

- **CUDA tensors**: FAISS's brute-force GPU search (``faiss.bfKnn``, the function behind ``faiss.knn_gpu``) is
  called through raw device pointers on the buffer's storage and the queries, on the caller's current CUDA stream,
  writing into torch tensors: no copy to the host, no copy of the buffer per step. fp32 and fp16 buffers are
  searched as they are, bf16 when this FAISS build has ``DistanceDataType_BF16``; an fp64 buffer (or bf16 without
  that support) is converted to an fp32 temporary each call. Needs a FAISS build with GPU support
  (``pip install 'iscse[faiss-gpu]'``); with a CPU-only FAISS, CUDA tensors raise a ``RuntimeError``. FAISS's
  ``StandardGpuResources`` (one per device, made on first use) keeps its own temporary device memory outside
  torch's allocator; pass ``FaissBackend(gpu_resources=...)`` to size it. Nothing is read back to the host, so
  NaN input is not diagnosed on CUDA (on CPU it raises ``ValueError``).
- **CPU tensors**: FAISS's exact inner-product search (``faiss.knn``) on a numpy view of the storage, which shares
  memory with a contiguous fp32 buffer, so nothing is copied per step. bf16, fp16 and fp64 buffers (and
  non-contiguous tensors) are converted to an fp32 temporary of ``M x D`` each call: keep the buffer in fp32
  when using this backend on CPU. FAISS only takes its BLAS path (one matrix product per block of buffer rows,
  then a heap per query) when ``B * D`` reaches the process-wide ``faiss.cvar.distance_compute_blas_threshold``
  (128000 in faiss 1.15, so never for B = 64, D = 768); otherwise it streams the whole buffer once per query,
  which was 2-4x slower at B = 64. Each call therefore sets that threshold (BLAS from 8 queries on, streaming
  below, where it was as fast or faster) and the BLAS block sizes (:data:`CPU_BLOCK_ROWS`) for its own duration,
  under a lock, and restores them.

Host synchronisation (the other backends make none in a step): this backend may sync. On CPU it works on numpy
views of the tensors (free on CPU) and reads a NaN flag. On CUDA this module reads nothing back itself, but
whether FAISS's ``bfKnn`` synchronises internally, and whether its work can be captured in a CUDA graph, was not
checked (no GPU was available). In approximate mode it reads the buffer's write pointer (``int(ptr)``), so it sets
:attr:`FaissBackend.syncs_host` and :func:`iscse.iscse_loss` then decides on the host whether to smooth (skipping
the kNN while the buffer fills, which also keeps the index from being trained on the empty rows). FAISS calls are
opaque to ``torch.compile`` (a graph break each).

Contract (as every backend, :mod:`iscse.backends`): for each query the ``k`` buffer slots with the largest inner
product, the query's own slot excluded, as ``(vals, idx)`` of shape ``(B, k)`` sorted by descending value; ``vals``
fp32 (fp64 when ``q`` or the buffer is fp64), ``idx`` int64 slot indices. The self slot is excluded by index, not
by rank: FAISS is asked for ``k + 1`` rows, the self slot is dropped wherever it appears (a duplicate of the query
may rank before it), and when it is not among them the last of the ``k + 1`` is dropped. When the search ran in
another precision than the output's (fp64 inputs, fp16/bf16 on the GPU) a few extra candidates are searched and
their values recomputed from the rows in the output precision, then re-ranked, as the torch backend does.

Approximate mode (``FaissBackend(approximate=True)``, CPU only, off by default): an inverted-file index
(``IndexIVFFlat``, inner product) over the buffer, kept in step with the ring buffer's writes; see
:class:`FaissBackend` for the update and retraining policy, and bench/FAISS.md for its measured recall and speed.

This backend finds neighbours only (``FaissBackend.knn_only``): named as ``backend`` or ``knn_backend``, the
registry (:func:`iscse.backends.compute_backend`) pairs it with the device's default backend for the aggregation and
the losses. It never calls back into the registry.

Tested: the CPU paths (exact and approximate) against the torch backend (tests/test_faiss.py). The CUDA path is
written against faiss 1.15's ``GpuDistanceParams``/``bfKnn`` (as faiss/contrib/torch_utils.py drives them) but has
not run yet: no GPU was available when it was written. The ``gpu``-marked tests and bench/faiss_gpu_bench.py
exercise it where CUDA and a GPU build of FAISS exist.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import torch

try:
    import faiss
except ImportError as exc:  # raised again with the extra to install; backends.get_backend adds its own context
    raise ImportError(
        "iscse.backends.faiss_knn needs FAISS, which is not installed: install it with pip install 'iscse[faiss]' "
        "(CPU) or pip install 'iscse[faiss-gpu]' (CUDA tensors)", name="faiss") from exc

from .base import Backend

__all__ = ["FaissBackend", "knn_topk", "faiss_gpu_available", "CPU_BLOCK_ROWS"]

# Buffer rows per BLAS block on CPU: B * rows ~ 2**22 similarities (a 16 MiB block), clamped to these bounds.
# FAISS's default block (1024 rows) makes B = 64 products too small to run near the matrix-multiply rate; at
# M = 262144, B = 64 the search took 2.4-2.5 s with 4096-row blocks and 0.7-1.2 s with 65536 (bench/FAISS.md).
CPU_BLOCK_ROWS = (1024, 65536)
_CPU_BLOCK_ELEMENTS = 1 << 22

# Below this many queries FAISS's per-query streaming path (one pass over the buffer per query, no matrix product)
# was measured as fast as or faster than its BLAS path (B = 2, 4: 2-3.6x faster; B = 8: even; M = 262144).
_CPU_MIN_BLAS_QUERIES = 8

# Extra candidates searched when the search precision differs from the output precision, so that rows whose
# rounded similarity falls just below the k-th can still be re-ranked in.
_RERANK_MARGIN = 8

# FAISS's GPU k-selection limit (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh).
_GPU_MAX_K = 2048

_SETTINGS_LOCK = threading.Lock()
_GPU_RESOURCES: Dict[int, object] = {}


@functools.lru_cache(maxsize=None)
def faiss_gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU (asked once per process)."""
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "bfKnn") and faiss.get_num_gpus() > 0


def _out_dtype(q: torch.Tensor, storage: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (q.dtype, storage.dtype) else torch.float32


def _finish(q: torch.Tensor, storage: torch.Tensor, cand_v: torch.Tensor, cand_i: torch.Tensor, k: int,
            self_slots: Optional[torch.Tensor], recompute: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """From FAISS's candidates ``(B, c)`` (c >= k, + 1 when a self slot is to be excluded) to the contract's
    ``(vals, idx)``: recompute values in the output precision if asked, drop the self slot by index (the last
    candidate when the self slot is absent), keep the best ``k`` sorted descending. No host synchronisation."""
    out_dtype = _out_dtype(q, storage)
    if recompute:
        rows = storage[cand_i].to(out_dtype)  # (B, c, D)
        cand_v = torch.einsum("bd,bcd->bc", q.detach().to(out_dtype), rows)
    else:
        cand_v = cand_v.to(out_dtype)
    if self_slots is not None:
        cand_v = cand_v.masked_fill(cand_i == self_slots.unsqueeze(1), float("-inf"))
    if cand_v.shape[1] == k and not recompute:
        return cand_v, cand_i
    vals, pos = cand_v.topk(k, dim=1)  # sorted descending; -inf (the self slot) is never among the best k
    return vals, cand_i.gather(1, pos)


def _n_candidates(k: int, size: int, self_slots, rerank: bool) -> int:
    return min(size, k + (1 if self_slots is not None else 0) + (_RERANK_MARGIN if rerank else 0))


# ----------------------------------------------------------------------------------------------------------- CPU


@contextlib.contextmanager
def _cpu_blas_settings(n_queries: int):
    """Make FAISS's exhaustive search take its BLAS path with blocks sized for ``n_queries``, for the duration.

    These are process-wide FAISS globals: they are set and restored under a lock, so concurrent calls from this
    module serialise; other FAISS users in other threads may see the values while a call runs."""
    cvar = faiss.cvar
    with _SETTINGS_LOCK:
        saved = (cvar.distance_compute_blas_threshold, cvar.distance_compute_blas_query_bs,
                 cvar.distance_compute_blas_database_bs)
        lo, hi = CPU_BLOCK_ROWS
        # FAISS takes the BLAS path when n_queries * D >= the threshold: 0 always takes it, INT_MAX never does.
        cvar.distance_compute_blas_threshold = 0 if n_queries >= _CPU_MIN_BLAS_QUERIES else 2 ** 31 - 1
        cvar.distance_compute_blas_query_bs = max(1, min(n_queries, 4096))
        cvar.distance_compute_blas_database_bs = max(lo, min(hi, _CPU_BLOCK_ELEMENTS // max(n_queries, 1)))
        try:
            yield
        finally:
            (cvar.distance_compute_blas_threshold, cvar.distance_compute_blas_query_bs,
             cvar.distance_compute_blas_database_bs) = saved


@contextlib.contextmanager
def _omp_threads(n: int):
    """Run FAISS's OpenMP regions in this thread with ``n`` threads (``omp_set_num_threads`` sets the calling
    thread's value only). Adding a batch of rows to an IVF index is microseconds of work, for which a parallel
    region's barrier costs milliseconds as soon as another process competes for the cores."""
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(saved)


def _fp32_numpy(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous fp32 numpy array of CPU tensor ``x``: a view for contiguous fp32, else a converted copy."""
    return x.detach().to(torch.float32).contiguous().numpy()


def _fp32_rows(storage: torch.Tensor, slots: np.ndarray) -> np.ndarray:
    """``storage[slots]`` as an fp32 numpy array. Gathered by numpy from a view when the storage is contiguous
    fp32: a few rows are microseconds of work, and torch's parallel gather waits milliseconds for its threads when
    other processes hold the cores."""
    if storage.dtype == torch.float32 and storage.is_contiguous():
        return storage.detach().numpy()[slots]
    return _fp32_numpy(storage[torch.from_numpy(slots)])


def _search_cpu_exact(q: torch.Tensor, storage: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    xb = _fp32_numpy(storage)  # (M, D), shares memory with a contiguous fp32 storage
    xq = _fp32_numpy(q)
    with _cpu_blas_settings(xq.shape[0]):
        dist, labels = faiss.knn(xq, xb, n, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(dist), torch.from_numpy(labels)


def _check_labels(labels: torch.Tensor) -> None:
    # FAISS leaves label -1 where fewer than n rows compare (NaN similarities never enter its heaps).
    if bool((labels < 0).any()):
        raise ValueError("FAISS found fewer neighbours than asked for: q or the buffer contains NaN values")


# ---------------------------------------------------------------------------------------------------------- CUDA


def _gpu_resources(device_index: int):
    """One ``StandardGpuResources`` per device, created on first use (it reserves FAISS's temporary memory)."""
    if device_index not in _GPU_RESOURCES:
        _GPU_RESOURCES[device_index] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device_index]


def _gpu_dtype(dtype: torch.dtype):
    """FAISS's ``DistanceDataType`` for a torch dtype, or None when the GPU search cannot read it directly."""
    table = {torch.float32: "DistanceDataType_F32", torch.float16: "DistanceDataType_F16",
             torch.bfloat16: "DistanceDataType_BF16"}
    name = table.get(dtype)
    return getattr(faiss, name, None) if name else None


def _void_ptr(x: torch.Tensor):
    # data_ptr() already includes the storage offset; the tensor must be contiguous (checked by the caller).
    return faiss.cast_integer_to_void_ptr(x.data_ptr())


def _gpu_search_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the GPU search reads the buffer in: its own when FAISS supports it, else fp32."""
    return dtype if _gpu_dtype(dtype) is not None else torch.float32


def _search_gpu(q: torch.Tensor, storage: torch.Tensor, n: int, gpu_resources=None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """bfKnn on device pointers, on the current stream: ``(dist, labels)``, each ``(B, n)``."""
    if not faiss_gpu_available():
        raise RuntimeError("backend 'faiss' got CUDA tensors but the installed FAISS has no GPU support: "
                           "install it with pip install 'iscse[faiss-gpu]', or use backend='torch'/'triton' on CUDA")
    if n > _GPU_MAX_K:
        raise ValueError(f"k is too large for FAISS's GPU search ({n} candidates asked for, at most {_GPU_MAX_K}); "
                         f"use backend='torch' or 'triton'")
    xb = storage if storage.is_contiguous() else storage.contiguous()
    # fp64 (or bf16 on a FAISS without BF16 support) becomes an fp32 temporary of the buffer.
    xb = xb.to(_gpu_search_dtype(xb.dtype))
    vtype = _gpu_dtype(xb.dtype)
    # bfKnn needs queries and vectors of one type; casting the (B, D) queries is cheap.
    xq = q.detach().to(xb.dtype).contiguous()
    device = storage.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    dist = torch.empty(xq.shape[0], n, dtype=torch.float32, device=device)
    labels = torch.empty(xq.shape[0], n, dtype=torch.int64, device=device)

    args = faiss.GpuDistanceParams()
    args.metric = faiss.METRIC_INNER_PRODUCT
    args.k = n
    args.dims = xb.shape[1]
    args.vectors = _void_ptr(xb)
    args.vectorsRowMajor = True
    args.vectorType = vtype
    args.numVectors = xb.shape[0]
    args.queries = _void_ptr(xq)
    args.queriesRowMajor = True
    args.queryType = vtype
    args.numQueries = xq.shape[0]
    args.outDistances = faiss.cast_integer_to_float_ptr(dist.data_ptr())
    args.outIndices = faiss.cast_integer_to_idx_t_ptr(labels.data_ptr())
    args.outIndicesType = faiss.IndicesDataType_I64
    args.device = index
    if hasattr(args, "use_cuvs"):  # FAISS's own kernels; a cuVS build would otherwise be asked to take over
        args.use_cuvs = False

    res = gpu_resources if gpu_resources is not None else _gpu_resources(index)
    with torch.cuda.device(index):
        # Issue FAISS's work on the caller's stream, so it is ordered after the push that wrote the buffer and
        # before whatever consumes the result, with no synchronisation (faiss/contrib/torch_utils.py does the same).
        stream = torch.cuda.current_stream(index)
        prior = res.getDefaultStream(index)
        res.setDefaultStream(index, faiss.cast_integer_to_cudastream_t(stream.cuda_stream))
        try:
            faiss.bfKnn(res, args)
        finally:
            res.setDefaultStream(index, prior)
    return dist, labels


# -------------------------------------------------------------------------------------------------------- public


def knn_topk(q: torch.Tensor, storage: torch.Tensor, k: int, self_slots: Optional[torch.Tensor] = None,
             gpu_resources=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` slots of ``storage`` ``(M, D)`` by inner product with each row of ``q`` ``(B, D)``, by FAISS.

    ``self_slots`` (int64 ``(B,)`` on ``q``'s device, or None) are excluded by index. Returns ``vals`` (fp32, fp64
    when ``q`` or ``storage`` is fp64) and int64 ``idx``, each ``(B, k)``, sorted by descending value; not
    differentiable. CUDA tensors are searched in place on the current stream (``gpu_resources``: a
    ``faiss.StandardGpuResources`` to use instead of this module's per-device one); CPU tensors through a numpy
    view (no copy for a contiguous fp32 buffer). See the module docstring for what is converted and when.
    Arguments are assumed valid (:func:`iscse.knn_topk` validates them).
    """
    size = storage.shape[0]
    if storage.is_cuda:
        # Searched in another precision than the output's: fp64 inputs, a low-precision buffer (the queries are
        # cast to it), or queries of another dtype. Then re-rank a few extra candidates in the output precision.
        rounded = (_gpu_search_dtype(storage.dtype) != _out_dtype(q, storage) or q.dtype != storage.dtype)
        n = _n_candidates(k, size, self_slots, rerank=rounded)
        dist, labels = _search_gpu(q, storage, n, gpu_resources)
        return _finish(q, storage, dist, labels, k, self_slots, recompute=rounded)
    # On CPU everything is searched in fp32 (q and buffer converted), which is the output precision unless fp64.
    rounded = _out_dtype(q, storage) == torch.float64
    n = _n_candidates(k, size, self_slots, rerank=rounded)
    dist, labels = _search_cpu_exact(q, storage, n)
    _check_labels(labels)
    return _finish(q, storage, dist, labels, k, self_slots, recompute=rounded)


class _RingIVF:
    """An ``IndexIVFFlat`` (inner product) mirroring a ring buffer's storage, kept in step with its writes.

    Slot ``s`` of the storage is id ``s`` in the index. Update policy, checked at every search:
    - the rows written since the last search are the slots from the last seen write pointer up to the current one
      (the :class:`~iscse.MemoryBuffer` writes only there); they are re-assigned to their lists
      (``remove_ids`` + ``add_with_ids``, O(rows) with the index's hash-table direct map);
    - a sample of other slots is compared with the copy taken when they were indexed; any difference (a whole cycle
      of pushes between two searches, ``load_state_dict``, a write elsewhere) rebuilds the index from the storage;
    - the coarse quantizer is retrained, and the index rebuilt, once ``retrain_fraction * M`` rows have been
      rewritten since the last training (default: once per pass over the buffer), so that the lists follow the
      embeddings as the encoder drifts; a new storage tensor (shape, dtype, address) also rebuilds.
    """

    _SAMPLE = 64

    def __init__(self, nlist: Optional[int], nprobe: Optional[int], retrain_fraction: float,
                 train_points_per_list: int, seed: int) -> None:
        self.nlist, self.nprobe, self.retrain_fraction = nlist, nprobe, retrain_fraction
        self.train_points_per_list, self.seed = train_points_per_list, seed
        self.index = None
        self.quantizer = None
        self.key = None
        self.ptr = 0
        self.rewritten = 0
        self.sample_slots = None
        self.sample_rows = None
        self.rebuilds = 0
        self.updates = 0

    def reset(self) -> None:
        self.index = None

    def _nlist_for(self, size: int) -> int:
        if self.nlist is not None:
            return self.nlist
        # About sqrt(M) lists, a power of two; each list then holds about sqrt(M) rows.
        return max(1, 2 ** int(round(math.log2(max(1.0, math.sqrt(size))))))

    def _rebuild(self, storage: torch.Tensor, ptr: int) -> None:
        size, dim = storage.shape
        nlist = self._nlist_for(size)
        if nlist > size:
            raise ValueError(f"nlist={nlist} is larger than the buffer's {size} rows")
        xb = _fp32_numpy(storage)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = self.train_points_per_list
        index.cp.seed = self.seed
        index.train(xb)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(xb, np.arange(size, dtype=np.int64))
        self.index, self.quantizer = index, quantizer  # the index does not own the Python quantizer object
        self.key = (storage.data_ptr(), tuple(storage.shape), storage.dtype)
        self.ptr, self.rewritten = ptr, 0
        gen = np.random.default_rng(self.seed)
        self.sample_slots = np.sort(gen.choice(size, size=min(self._SAMPLE, size), replace=False))
        self.sample_rows = xb[self.sample_slots].copy()
        self.rebuilds += 1

    def sync(self, storage: torch.Tensor, ptr: int) -> None:
        size = storage.shape[0]
        key = (storage.data_ptr(), tuple(storage.shape), storage.dtype)
        if self.index is None or key != self.key:
            self._rebuild(storage, ptr)
            return
        n_new = (ptr - self.ptr) % size
        slots = (self.ptr + np.arange(n_new, dtype=np.int64)) % size
        in_new = np.isin(self.sample_slots, slots)
        current = _fp32_rows(storage, self.sample_slots)
        if not np.array_equal(current[~in_new], self.sample_rows[~in_new], equal_nan=True):
            self._rebuild(storage, ptr)  # rows changed outside the pointer's range
            return
        if self.rewritten + n_new >= self.retrain_fraction * size:
            self._rebuild(storage, ptr)
            return
        if n_new:
            rows = _fp32_rows(storage, slots)
            selector = faiss.IDSelectorArray(n_new, faiss.swig_ptr(slots))
            with _omp_threads(1):
                self.index.remove_ids(selector)
                self.index.add_with_ids(rows, slots)
            self.sample_rows[in_new] = current[in_new]
            self.rewritten += n_new
            self.ptr = ptr
            self.updates += 1

    def search(self, q: torch.Tensor, storage: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        xq = _fp32_numpy(q)
        nlist = self.index.nlist
        self.index.nprobe = min(self.nprobe, nlist) if self.nprobe is not None else max(1, nlist // 8)
        dist, labels = self.index.search(xq, n)
        dist, labels = torch.from_numpy(dist), torch.from_numpy(labels)
        short = (labels < 0).any(dim=1)  # the probed lists held fewer than n rows: exact search for those queries
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            d2, l2 = _search_cpu_exact(q[rows], storage, n)
            dist[rows], labels[rows] = d2, l2
        _check_labels(labels)
        return dist, labels


class FaissBackend(Backend):
    """The FAISS kNN backend: exact search by default, an IVF index with ``approximate=True``.

    The registry's ``"faiss"`` is ``FaissBackend()`` (exact, stateless). It provides :meth:`knn_topk` only
    (``knn_only``): the registry pairs it with the device's default backend for the rest of a step.

    Args:
        approximate: search an ``IndexIVFFlat`` (inner product) instead of the whole buffer: CPU tensors only, and
            the object then holds an index of one buffer, so use one instance per buffer. Off by default.
        nlist: inverted lists (default: about ``sqrt(M)``, a power of two). nprobe: lists visited per query
            (default None: an eighth of the lists, so about M / 8 rows are scanned per query); recall rises and
            speed falls with it (bench/FAISS.md); settable between searches, no rebuild needed.
        retrain_fraction: retrain the coarse quantizer and rebuild the index once this fraction of the buffer has
            been rewritten since the last training (default 1.0: once per pass over the buffer); rows written in
            between are moved to their lists at each search (``remove_ids`` + ``add_with_ids``).
        train_points_per_list: k-means training sample per list (default 64), which bounds the retraining time.
        seed: k-means and sampling seed.
        gpu_resources: a ``faiss.StandardGpuResources`` for CUDA searches (default: one per device, shared).

    The approximate index follows a :class:`~iscse.MemoryBuffer`'s write pointer (the ``ptr`` argument of
    :meth:`knn_topk`); after writing to the storage in any other way call :meth:`reset` (a changed sample of rows
    also triggers a rebuild, but cannot catch every partial write).
    """

    name = "faiss"
    knn_only = True
    #: Under ``"auto"`` FAISS is a candidate from this many buffer rows on (:mod:`iscse.backends`): below it the
    #: torch kNN takes well under a millisecond per query block on any CPU, so a probe could not pay for itself.
    auto_min_rows = 4096

    def supports(self, device: torch.device) -> bool:
        """CPU always; CUDA with a GPU build of FAISS (:func:`faiss_gpu_available`)."""
        return torch.device(device).type != "cuda" or faiss_gpu_available()

    def __init__(self, *, approximate: bool = False, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                 retrain_fraction: float = 1.0, train_points_per_list: int = 64, seed: int = 1234,
                 gpu_resources=None) -> None:
        if not isinstance(approximate, bool):
            raise TypeError(f"approximate must be a bool, got {type(approximate).__name__}")
        for arg, value in (("nprobe", nprobe), ("train_points_per_list", train_points_per_list), ("nlist", nlist)):
            if arg != "train_points_per_list" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if isinstance(retrain_fraction, bool) or not isinstance(retrain_fraction, (int, float)) \
                or not 0 < retrain_fraction <= 1:
            raise ValueError(f"retrain_fraction must be a number in (0, 1], got {retrain_fraction!r}")
        self.approximate = approximate
        self.gpu_resources = gpu_resources
        self._ivf = _RingIVF(nlist, nprobe, float(retrain_fraction), train_points_per_list, seed) \
            if approximate else None

    @property
    def nprobe(self) -> Optional[int]:
        """Lists visited per query in approximate mode (None: an eighth of the lists); settable between searches
        without a rebuild."""
        return self._ivf.nprobe if self._ivf is not None else None

    @nprobe.setter
    def nprobe(self, value: Optional[int]) -> None:
        if self._ivf is None:
            raise ValueError("nprobe applies to FaissBackend(approximate=True) only")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"nprobe must be a positive int or None, got {value!r}")
        self._ivf.nprobe = value

    @property
    def index(self):
        """The approximate mode's ``faiss.IndexIVFFlat`` (None before the first search, or in exact mode)."""
        return self._ivf.index if self._ivf is not None else None

    def reset(self) -> None:
        """Forget the approximate index; the next search rebuilds it from the storage. No-op in exact mode."""
        if self._ivf is not None:
            self._ivf.reset()

    @property
    def syncs_host(self) -> bool:
        """True in approximate mode, which reads the write pointer and the rows on the host (see the module
        docstring); exact mode makes no host read of its own on CUDA."""
        return self.approximate

    def knn_topk(self, q, storage, k, self_slots, ptr=0):
        """See :func:`knn_topk` (exact) and the class docstring (approximate). ``ptr``: an int or a 0-dim tensor
        (read on the host in approximate mode)."""
        if not self.approximate:
            return knn_topk(q, storage, k, self_slots, self.gpu_resources)
        if storage.is_cuda:
            raise ValueError("FaissBackend(approximate=True) supports CPU buffers only; on CUDA use the exact "
                             "FaissBackend() (brute force on the GPU) or backend='triton'")
        n = _n_candidates(k, storage.shape[0], self_slots, rerank=_out_dtype(q, storage) == torch.float64)
        self._ivf.sync(storage, int(ptr))
        dist, labels = self._ivf.search(q, storage, n)
        return _finish(q, storage, dist, labels, k, self_slots, recompute=_out_dtype(q, storage) == torch.float64)

    def __repr__(self) -> str:
        if not self.approximate:
            return "FaissBackend()"
        ivf = self._ivf
        return (f"FaissBackend(approximate=True, nlist={ivf.nlist}, nprobe={ivf.nprobe}, "
                f"retrain_fraction={ivf.retrain_fraction})")
