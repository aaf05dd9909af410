"""GPU benchmark of one IS-CSE step: reference, torch.compile(reference), torch and Triton backends.

Run on a CUDA machine from the repository root (bench/device_check.sh calls it)::

    python bench/gpu_bench.py --out "$OUT"                               # the default plan below, ~6 minutes
    python bench/gpu_bench.py --shapes 64x1024x768x16 --impls reference,triton --no-precision

The plan is a list of items measured in order of value, each bounded in time (warm-up and compiles included), with
``gpu_bench.json`` rewritten after every item, so a run cut short keeps what it measured:

(a) (B, M, D, k) = (512, 65536, 1024, 16) in bf16 and fp32; (b) the paper's (64, 1024, 768, 16) in fp32;
(c) (1024, 1048576, 768, 16) in bf16 and fp32 (peak extra memory matters most there): for each, the Triton step,
the reference, the torch backend, then the Triton step captured in a CUDA graph; (d) a short study of the fp32
``tl.dot`` precisions (tf32x3, bf16x3, tf32, ieee) of the kNN and the dual InfoNCE (time and error against float64),
and last ``torch.compile(reference)`` (paper's shape first): its warm-up is unbounded and it recompiles per shape.

An item is one implementation at one shape and dtype: forward+backward, forward and backward of one step (push +
``L_cl + alpha L_s``), each timed with ``triton.testing.do_bench`` after warm-up (median, 20th and 80th percentiles;
a step over 2 s is timed once), peak extra memory (``max_memory_allocated`` minus the allocation before the call;
for the Triton step also the count of :func:`memory_plan` beside it),
CUDA launches of one forward+backward (torch.profiler, device-side events; per-kernel device time for the Triton
step), the first step's time (Triton's or Inductor's compile included), and the roofline floor of each mode beside
each figure: ``max(bytes / copy bandwidth, FLOPs / bf16 matmul rate)`` with both rates measured on this card first
(the bf16 rate for every dtype: a lower bound). The JSON carries the card, driver, CUDA, torch, triton, Python and
the date.

Time bounds: the items run in a worker process. An item that passes its limit (:data:`ITEM_LIMIT_S`, or
``--item-limit``) is interrupted by an alarm in the worker, which then exits, and a fresh worker takes the next item;
a worker that does not react (a kernel or a compiler that never returns) is killed :data:`GRACE_S` later. A CUDA
error that poisons the context also moves on to a fresh worker. ``--budget`` bounds the whole run; Ctrl-C (SIGINT,
as ``timeout -s INT`` sends) stops it, writes the JSON and prints the table.

Other modes (no GPU needed):

- ``--compile-only``: compile every Triton kernel specialisation that the launchers would use at the benchmark shapes
  (and a few odd ones, and the paper's shape at k = 128 and 256) for ``sm_<arch>`` with Triton's bundled ptxas, and
  print registers / spills / shared memory per kernel. Exit status 1 if any fails to compile. Runs the launchers' own
  code on ``meta`` tensors.
- ``--cpu-smoke`` (or ``--dry-run``): the whole driver, worker processes and time bounds included, on tiny shapes on
  CPU with ``TRITON_INTERPRET=1`` (wall-clock timing instead of do_bench, no profiler counts, no CUDA graph,
  ``torch.compile`` with its ``eager`` backend): checks the script end to end before a GPU run.
- ``--memory``: the Triton step's peak extra memory at each shape (fp32 and bf16; gradients made in backward from
  what the forward held, and in forward), counted allocation by allocation on ``meta`` tensors
  (:func:`memory_plan`).
- ``--list``: print the plan (items and their time limits) and exit.

Exit status: 0 when every item was measured, 3 when the budget ran out before the last items (the others were
measured), 1 when an item failed, timed out or crashed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under PYTHONSAFEPATH=1
import benchlib  # noqa: E402

# (B, M, D, k): the paper's setting, a large batch, a large buffer, a very large buffer.
SHAPES = [(64, 1024, 768, 16), (512, 1024, 1024, 16), (512, 65536, 1024, 16), (1024, 1048576, 768, 16)]
SMOKE_SHAPES = [(5, 37, 13, 7), (33, 70, 96, 7)]
IMPLS = ("reference", "compile", "torch", "triton", "triton_graph")


# --------------------------------------------------------------------------------------------------------------
# compile-only: build the kernels for a GPU architecture without a GPU
# --------------------------------------------------------------------------------------------------------------

class _Capture:
    """Stands in for a ``@triton.jit`` kernel: records ``kernel[grid](*args, **kwargs)`` instead of launching,
    with the benchmark shape being launched (``_Capture.shape``, set by :func:`_launch_all_for_compile`)."""

    shape = None

    def __init__(self, fn, record: bool = True):
        self.fn = fn
        self.calls = []
        self.record = record  # False: count launches only, keep no reference to their tensors

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((args, kwargs, _Capture.shape) if self.record else None)
        return record


def _signature(fn, args, kwargs):
    """Triton's specialisation of one call, as ``ASTSource`` wants it: (signature, constexprs, attrs, options)."""
    import torch

    names = fn.arg_names
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    bound = dict(zip(names, args))
    bound.update(kwargs)
    tname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
             torch.int64: "i64", torch.float64: "fp64"}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + tname[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocator pointers are 16-byte aligned
        elif value is None:  # an absent optional pointer: Triton specialises None as a constexpr
            signature[name] = "constexpr"
            constexprs[name] = None
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specialises ints equal to 1 as constants
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={value!r}")
    return signature, constexprs, attrs, options


def _launch_all_for_compile(shapes):
    """Run the kernels' host launchers on ``meta`` tensors with every kernel replaced by a :class:`_Capture`."""
    import torch

    from iscse.kernels import info_nce as N
    from iscse.kernels import iscse_loss as L
    from iscse.kernels import knn_topk as K
    from iscse.kernels import smooth as S

    kernels = _patch_kernels()
    meta = torch.device("meta")
    try:
        for (B, M, D, k, dt) in shapes:
            _Capture.shape = f"{B}x{M}x{D}x{k}/{str(dt).replace('torch.', '')}"
            buf = torch.empty(M, D, device=meta, dtype=dt)
            q = torch.empty(B, D, device=meta, dtype=dt)
            z = torch.empty(B, D, device=meta, dtype=dt)
            slots = torch.empty(B, device=meta, dtype=torch.int64)
            cands = K.knn_topk_candidates(q, buf, k, slots)
            K.knn_topk(q, buf, k, slots)
            K.knn_topk(q, buf, k, None)
            zs, w, idx, _, nb = S.smooth_forward(q, buf, k, 2.0, candidates=cands)
            S.smooth_forward(q, buf, k, 2.0, idx=idx, vals=torch.empty(B, k, device=meta))
            S.smooth_forward(q, buf, k, 2.0, idx=idx)
            f32 = dict(device=meta, dtype=torch.float32)
            g = torch.empty((), **f32)
            dts = (dt, dt)
            # The fused loss: forward holding for the backward and forward making the gradients (its gradients
            # kernel reads the rows from the buffer), with attention and mean aggregation, neighbours from the
            # Triton kNN or given; without smoothing; then the backward of each state, also with one factor absent.
            for hold in (True, False):
                for mean in (False, True):  # aggregation="mean" (the paper's ablation): the MEAN specialisations
                    _, _, st = L.iscse_loss_forward(z, z, q, buf, slots, k, 0.05, 2.0, hold=hold, mean=mean)
                    L.iscse_loss_backward(g, g, st, 2.0, mean=mean, dtypes=dts)
                    L.iscse_loss_backward(None, g, st, 2.0, mean=mean, dtypes=dts)
                    L.iscse_loss_backward(g, None, st, 2.0, mean=mean, dtypes=dts)
                _, _, st = L.iscse_loss_forward(z, z, q, buf, slots, k, 0.05, 2.0, idx=idx, hold=hold)
                _, _, st = L.iscse_loss_forward(z, z, q, buf, slots, k, 0.05, 2.0, smooth=False, hold=hold)
                L.iscse_loss_backward(g, None, st, 2.0, dtypes=dts)
            S.smooth_backward(torch.empty(B, D, **f32), q, nb, w, 2.0)
            S.smooth_forward(q, buf, k, 2.0, candidates=cands, mean=True)
            S.smooth_backward(torch.empty(B, D, **f32), q, nb, w, 2.0, mean=True)
            N.info_nce_forward(z, z, zs, 0.05)
            N.info_nce_forward(z, z, None, 0.05)
    finally:
        _unpatch_kernels(kernels)
    return kernels


def _patch_kernels(record: bool = True) -> dict:
    """Replace every ``@triton.jit`` kernel of every op module by a :class:`_Capture`; returns them by
    ``(module, name)`` (:func:`_unpatch_kernels` puts the kernels back).

    One kernel file per op (kernels/): the op modules import each other's launchers and the shared device helpers
    (_common.merge_topk, smooth.smooth_logit_grads, ...) by name; a launcher looks its kernel up in its own module
    at launch, so patching the module attribute suffices. ``record=False``: the captures count launches but keep
    no reference to their arguments (which would keep every tensor a kernel saw alive)."""
    from iscse.kernels import info_nce as N
    from iscse.kernels import iscse_loss as L
    from iscse.kernels import knn_topk as K
    from iscse.kernels import smooth as S

    kernels = {
        (K, "_knn_chunk_kernel"): None, (K, "_knn_merge_kernel"): None, (S, "_smooth_fwd_kernel"): None,
        (S, "_smooth_bwd_kernel"): None, (N, "_info_nce_rows_kernel"): None, (N, "_info_nce_cols_kernel"): None,
        (N, "_info_nce_grads_kernel"): None, (L, "_iscse_loss_scale_kernel"): None,
    }
    for mod, name in kernels:
        kernels[(mod, name)] = _Capture(getattr(mod, name), record)
        setattr(mod, name, kernels[(mod, name)])
    return kernels


def _unpatch_kernels(kernels: dict) -> None:
    for (mod, name), cap in kernels.items():
        setattr(mod, name, cap.fn)


def compile_only(arch: int = 90, quick: bool = False) -> int:
    """Compile every specialisation the launchers use (see the module docstring); returns the exit status.
    ``quick``: only the paper's shape and one odd shape (what the test suite checks)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from iscse.kernels import knn_topk as K

    if not isinstance(K._knn_chunk_kernel, JITFunction):
        print("compile-only needs the compiled (not interpreted) kernels: unset TRITON_INTERPRET")
        return 1
    odd = [(5, 37, 13, 7), (33, 97, 13, 64), (1, 9, 13, 1)]
    # Large k at a real width: the per-row kernels' K_PAD x BLOCK_D neighbour tiles and the kNN's running top-k
    # are largest there (row_block_d and knn_config shrink their blocks as k grows).
    large_k = [(64, 1024, 768, 128), (64, 1024, 768, 256)]
    shapes = [(B, M, D, k, dt) for (B, M, D, k) in (SHAPES[:1] + odd[:1] if quick else SHAPES + odd + large_k)
              for dt in (torch.float32, torch.bfloat16)]
    if not quick:
        shapes.append((64, 1024, 768, 16, torch.float16))
    kernels = _launch_all_for_compile(shapes)
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    seen, failures, spills = {}, 0, 0
    print(f"triton {triton.__version__}, target sm_{arch}")
    for (mod, name), cap in kernels.items():
        for args, kwargs, shape in cap.calls:
            sig, consts, attrs, opts = _signature(cap.fn, args, dict(kwargs))
            key = (name, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
                   tuple(sorted(attrs)), tuple(sorted(opts.items())))
            if key not in seen:
                seen[key] = (cap, sig, consts, attrs, opts, [])
            if shape not in seen[key][5]:
                seen[key][5].append(shape)
    for key, (cap, sig, consts, attrs, opts, shapes_used) in seen.items():
        name = key[0]
        shown = {k: v for k, v in consts.items() if k.isupper()}
        dtypes = ",".join(sorted({v for v in sig.values() if v.startswith("*")}))
        t0 = time.time()
        try:
            ck = triton.compile(ASTSource(fn=cap.fn, signature=sig, constexprs=consts, attrs=attrs),
                                target=target, options=opts)
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"FAIL {name} {shown} {dtypes}: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        usage = ""
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(ck.asm["cubin"])
                f.flush()
                out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                     text=True).stdout
            usage = " ".join(p for line in out.splitlines() if "REG:" in line
                             for p in line.split() if p.split(":")[0] in ("REG", "STACK"))
            if "STACK:0" not in usage:
                spills += 1
        print(f"ok   {name:24s} {dtypes:18s} {shown} {opts} {usage} smem={ck.metadata.shared} "
              f"({time.time() - t0:.1f}s) shapes={','.join(shapes_used)}")
    print(f"{len(seen)} specialisations, {failures} failed to compile, {spills} with register spills (STACK > 0)")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------------------------
# memory plan: the fused step's extra memory at any shape, counted on ``meta`` tensors (no GPU, no interpreter)
# --------------------------------------------------------------------------------------------------------------

def memory_plan(B: int, M: int, D: int, k: int, dtype, *, hold=None, sms: int = 132) -> dict:
    """Peak extra memory of one Triton step, ``iscse.iscse_loss(...).backward()`` (push, ``normalize``, the fused
    losses, the mask on ``L_s``, both input gradients), counted allocation by allocation on ``meta`` tensors with
    the kernels' launches skipped: the launchers' own code picks the CUDA configuration of a 132-SM device (split
    counts, chunking, what the forward holds for the backward; ``sms``: the card's SM count), so the count is what
    ``torch.cuda.max_memory_allocated()`` minus the allocation before the step would show on a card, up to the
    caching allocator's rounding of each block and what cuBLAS or the profiler allocate. ``hold``: force where the
    gradients are made (True: in backward, from what the forward held; False: in forward; None: the launcher's
    :func:`iscse.kernels.iscse_loss.hold_for_backward`). Returns ``peak_bytes``, ``held`` and the ``largest``
    allocations live at the peak (shape, dtype, bytes)."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import iscse
    from iscse.backends import triton_fused as T
    from iscse.kernels import _common as C
    from iscse.kernels import iscse_loss as L

    class Count(TorchDispatchMode):
        """Bytes of the storages created inside the mode that are still alive; outputs that alias an input (views,
        in-place results) are not new."""

        def __init__(self):
            super().__init__()
            self.live, self.current, self.peak, self.at_peak = {}, 0, 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key, (ref, n, _) in list(self.live.items()):
                if ref.expired():
                    del self.live[key]
                    self.current -= n
            inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st._cdata not in inputs and st._cdata not in self.live:
                        self.live[st._cdata] = (StorageWeakRef(st), st.nbytes(), (tuple(t.shape), str(t.dtype)))
                        self.current += st.nbytes()
            if self.current > self.peak:
                self.peak = self.current
                self.at_peak = sorted((v[1], v[2]) for v in self.live.values())[::-1]
            return out

    kernels = _patch_kernels(record=False)
    saved = (T._check, L.HOLD_MAX_BYTES, C.ASSUMED_SMS)
    T._check = lambda **tensors: None  # the launchers run on meta tensors: no device check
    C.ASSUMED_SMS = sms  # the launchers' config caches are keyed on the SM count, so no stale entry is used
    if hold is not None:
        L.HOLD_MAX_BYTES = 2**62 if hold else -1
    try:
        meta = torch.device("meta")
        buf = iscse.MemoryBuffer(M, D, dtype=dtype, device=meta)
        buf.written = M  # full: smoothing on
        z1 = torch.empty(B, D, device=meta, dtype=dtype, requires_grad=True)
        z2 = torch.empty(B, D, device=meta, dtype=dtype, requires_grad=True)
        with Count() as count:
            iscse.iscse_loss(z1, z2, buf, k=k, backend="triton", check_finite=False).backward()
        held = L.hold_for_backward(B, k, D, meta, buffer_dtype=dtype, dtype=dtype)
    finally:
        T._check, L.HOLD_MAX_BYTES, C.ASSUMED_SMS = saved
        _unpatch_kernels(kernels)
    return dict(shape=[B, M, D, k], dtype=str(dtype).replace("torch.", ""), peak_bytes=count.peak,
                held=held if hold is None else hold,
                largest=[dict(shape=list(s), dtype=d, bytes=n) for n, (s, d) in count.at_peak[:6]])


def print_memory_plan(shapes) -> int:
    """``--memory``: :func:`memory_plan` at ``shapes`` in fp32 and bf16, gradients made in backward (held) and in
    forward."""
    import torch

    print(f"{'B x M x D x k':>22} {'dtype':>9} {'gradients made':>22} {'peak MiB':>9}  largest live at the peak (MiB)")
    for (B, M, D, k) in shapes:
        for dt in (torch.float32, torch.bfloat16):
            for hold in (None, True, False):
                r = memory_plan(B, M, D, k, dt, hold=hold)
                policy = ("default: " if hold is None else "") + ("in backward" if r["held"] else "in forward")
                big = ", ".join(f"{'x'.join(map(str, a['shape']))} {a['dtype'].replace('torch.', '')}"
                                f" {a['bytes'] / 2**20:.1f}" for a in r["largest"][:4])
                print(f"{'x'.join(map(str, (B, M, D, k))):>22} {r['dtype']:>9} {policy:>22} "
                      f"{r['peak_bytes'] / 2**20:>9.1f}  {big}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------------------

#: The default plan's shapes, in order of value: (a) a large batch and buffer, (b) the paper's setting, (c) a buffer
#: of 1,048,576 rows. Measured in bf16 and fp32 where M >= 65536, in fp32 below.
PLAN_SHAPES = [(512, 65536, 1024, 16), (64, 1024, 768, 16), (1024, 1048576, 768, 16)]
PAPER_SHAPE = (64, 1024, 768, 16)
#: Within one (shape, dtype), in order of value: does the fused path run, the baseline, the torch backend, the graph.
STEP_IMPLS = ("triton", "reference", "torch", "triton_graph")
#: Seconds one item may take, warm-up and compiles included ("huge": M > 65536). Estimates on an H100 (none
#: measured yet): a step item 3-10 s with warm kernels, plus up to ~30 s when its Triton kernels compile first; an
#: M = 1,048,576 item 5-20 s (the reference's full argsort of B x M); the precision study 20-40 s (eight kernel
#: specialisations compile); torch.compile 30-90 s per shape with a cold Inductor cache.
ITEM_LIMIT_S = {"step": 45.0, "huge": 75.0, "precision": 60.0, "compile": 150.0}
#: Seconds after an item's limit before the worker is killed (it did not react to the alarm).
GRACE_S = 15.0
PRECISION_SHAPE = (512, 65536, 1024, 16)
SMOKE_PRECISION_SHAPE = (9, 40, 32, 5)
_DTYPES = ("fp32", "bf16")


class _ItemTimeout(BaseException):
    """Raised in the worker by its alarm when an item passes its limit (a BaseException: no ``except Exception``
    on the way swallows it)."""


def parse_shapes(text: str) -> list:
    """``"512x65536x1024x16,64x1024x768x16"`` -> ``[(512, 65536, 1024, 16), (64, 1024, 768, 16)]`` (B x M x D x k).

    Raises ``ValueError`` naming the bad entry."""
    shapes = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            vals = tuple(int(f) for f in part.lower().split("x"))
        except ValueError:
            vals = ()
        if len(vals) != 4 or min(vals) < 1:
            raise ValueError(f"--shapes: {part!r} is not BxMxDxk, four positive integers (e.g. 64x1024x768x16)")
        B, M, D, k = vals
        if B > M or k > M - 1:
            raise ValueError(f"--shapes: {part!r} needs B <= M and k <= M - 1")
        shapes.append(vals)
    if not shapes:
        raise ValueError("--shapes: no shape given (e.g. 64x1024x768x16)")
    return shapes


def parse_choices(text: str, choices, flag: str) -> tuple:
    """A comma-separated subset of ``choices`` (order kept, duplicates dropped); ``ValueError`` names the bad one."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part not in choices:
            raise ValueError(f"{flag}: unknown {part!r}; choose from {','.join(choices)}")
        if part not in out:
            out.append(part)
    return tuple(out)


def plan_items(shapes, impls=IMPLS, dtypes=None, precision=True, smoke=False, item_limit=None) -> list:
    """The items to measure, in order of value (see the module docstring).

    ``dtypes`` None: bf16 and fp32 where M >= 65536, fp32 below (and for torch.compile). ``smoke``: no CUDA graph.
    A torch.compile item comes after the reference at its shape and dtype, which is added when the plan lacks it, so
    that both are timed in the same worker process. Each item is a dict: ``id``, ``kind`` ("step" or
    "precision"), ``impl``, ``shape``, ``dtype``, ``limit_s``."""
    items = []

    def add(kind, impl=None, shape=None, dtype=None, limit="step"):
        name = "precision study" if kind == "precision" else f"{impl} {'x'.join(map(str, shape))} {dtype}"
        items.append(dict(id=name, kind=kind, impl=impl, shape=list(shape) if shape else None, dtype=dtype,
                          limit_s=float(item_limit or ITEM_LIMIT_S[limit])))

    for shape in shapes:
        for dtype in dtypes or (("bf16", "fp32") if shape[1] >= 65536 else ("fp32",)):
            for impl in STEP_IMPLS:
                if impl in impls and not (smoke and impl == "triton_graph"):
                    add("step", impl, shape, dtype, "huge" if shape[1] > 65536 else "step")
    if precision:
        add("precision", limit="precision")
    if "compile" in impls:
        # Not above M = 65536: the compiled reference still materialises B x M similarities and their argsort.
        for shape in sorted((s for s in shapes if s[1] <= 65536), key=lambda s: tuple(s) != PAPER_SHAPE):
            for dtype in dtypes or ("fp32",):
                if not any(it["impl"] == "reference" and it["shape"] == list(shape) and it["dtype"] == dtype
                           for it in items):  # its baseline in the same process (a few seconds)
                    add("step", "reference", shape, dtype, "step")
                add("step", "compile", shape, dtype, "compile")
    return items


def _versions():
    return benchlib.environment(("triton",))


class Timer:
    """``time(fn) -> (median, p20, p80)`` in ms: do_bench on CUDA, a short wall-clock loop on CPU (smoke)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def time(self, fn, grad_to_none=None, rep=100):
        if self.cuda:
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
            return float(med), float(p20), float(p80)
        times = []
        for _ in range(3):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[1], times[0], times[-1]


def measure_rates(timer: Timer, cuda: bool) -> dict:
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s) on this card
    (:func:`iscse._roofline.measure_rates`, which ``python -m iscse.check`` uses too)."""
    if not cuda:
        return {"copy_bytes_per_s": 1e10, "bf16_flops_per_s": 1e11, "note": "placeholders on CPU"}
    from iscse._roofline import measure_rates as measure

    return measure(lambda fn: timer.time(fn)[0])


def floors_ms(B, M, D, k, elem, rates) -> dict:
    """Roofline floor (ms) of each mode: :func:`iscse._roofline.floors_ms` (imported here, lazily: the supervisor
    process does not import torch)."""
    from iscse._roofline import floors_ms as floors

    return floors(B, M, D, k, elem, rates)


def precision_study(timer: Timer, cuda: bool, rows: list) -> None:
    """fp32 ``tl.dot`` precision options for the kNN at :data:`PRECISION_SHAPE` and the dual InfoNCE at its B and D:
    time, and error against float64 (kNN: how far the chosen neighbours' exact similarities are from the exact
    top-k, i.e. the largest similarity gap that a precision error could have swapped; InfoNCE: relative error of
    both losses and of dL/dz1). For choosing the default precision on a real card. Appends to ``rows``."""
    import torch
    import torch.nn.functional as F

    from iscse import reference as R
    from iscse.kernels.info_nce import info_nce_forward
    from iscse.kernels.knn_topk import knn_topk

    dev = "cuda" if cuda else "cpu"
    B, M, D, k = PRECISION_SHAPE if cuda else SMOKE_PRECISION_SHAPE
    buf = F.normalize(torch.randn(M, D, device=dev), dim=1)
    q = F.normalize(torch.randn(B, D, device=dev), dim=1)
    slots = torch.randint(0, M, (B,), device=dev)
    sim = q.double() @ buf.double().t()
    sim[torch.arange(B, device=dev), slots] = float("-inf")
    best = sim.topk(k, dim=1).values
    for prec in ("tf32x3", "bf16x3", "tf32", "ieee"):
        try:
            _, idx = knn_topk(q, buf, k, slots, PRECISION=prec)
            got = sim.gather(1, idx).sort(dim=1, descending=True).values
            med, p20, p80 = timer.time(lambda: knn_topk(q, buf, k, slots, PRECISION=prec))
            rows.append(dict(op="knn_topk", B=B, M=M, D=D, k=k, precision=prec, median_ms=med, p20_ms=p20,
                             p80_ms=p80, max_topk_value_error=float((got - best).abs().max())))
        except Exception as exc:  # a precision this triton does not support on this card
            rows.append(dict(op="knn_topk", precision=prec, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
    del buf, sim
    x, y, z = (torch.randn(B, D, device=dev) for _ in range(3))
    xd, yd, zd = (t.double().requires_grad_() for t in (x, y, z))
    l1, l2 = R.cos_sim_ce(xd, yd), R.cos_sim_ce(xd, zd)
    g1 = torch.autograd.grad(l1, xd)[0]
    for prec in ("tf32x3", "bf16x3", "tf32", "ieee"):
        try:
            out = info_nce_forward(x, y, z, 0.05, PRECISION=prec)
            med, p20, p80 = timer.time(lambda: info_nce_forward(x, y, z, 0.05, PRECISION=prec))
            rows.append(dict(op="info_nce(dual)", B=B, D=D, precision=prec, median_ms=med, p20_ms=p20, p80_ms=p80,
                             rel_err_l_cl=abs(out[0].item() - l1.item()) / abs(l1.item()),
                             rel_err_l_s=abs(out[1].item() - l2.item()) / abs(l2.item()),
                             rel_err_grad_z1=float((out[2].double() - g1).abs().max() / g1.abs().max())))
        except Exception as exc:
            rows.append(dict(op="info_nce(dual)", precision=prec, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
    for r in rows:
        print("  precision:", {k_: (round(v, 6) if isinstance(v, float) else v) for k_, v in r.items()}, flush=True)


def _count_launches(fn):
    """CUDA device-side events (kernels, memcpy, memset) of one call of ``fn``, and per-kernel device time (us)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names, times = [], {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names.append(e.name)
            try:
                t = float(e.time_range.elapsed_us())
            except AttributeError:  # other torch versions
                t = float(getattr(e, "device_time_total", 0.0))
            times[e.name] = times.get(e.name, 0.0) + t
    return names, times


def _fused_kernel(name: str) -> bool:
    """Whether a profiled kernel name is one of iscse's Triton kernels (every one is ``_<op>_..._kernel``)."""
    return "_kernel" in name and any(s in name for s in ("_knn_", "_smooth_", "_info_nce_", "_iscse_"))


def _make_step(impl, B, M, D, k, dtype, device, compile_backend):
    """``(step, leaves)``: ``step()`` runs one IS-CSE step and returns the loss; ``leaves`` are ``z1, z2``."""
    import torch
    import torch.nn.functional as F

    import iscse
    from iscse import reference as R

    z1 = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
    z2 = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
    rows = F.normalize(torch.randn(M, D, device=device), dim=1)
    if impl in ("reference", "compile"):
        lbuf = rows.to(dtype)
        del rows
        fn = R.iscse_step
        if impl == "compile":
            torch._dynamo.reset()  # a cold compile each time: its cost is part of the item
            fn = torch.compile(R.iscse_step, dynamic=False, backend=compile_backend)

        def step():
            return fn(z1, z2, lbuf, k=k).loss
        return step, (z1, z2)
    buf = iscse.MemoryBuffer(M, D, dtype=dtype, device=device)
    buf.storage.copy_(rows.to(dtype))
    del rows
    buf.written = M  # full: smoothing on
    backend = "triton" if impl.startswith("triton") else "torch"

    def step():
        return iscse.iscse_loss(z1, z2, buf, k=k, backend=backend, check_finite=False)
    return step, (z1, z2)


def _graph_step(step, leaves):
    """Capture push + loss + backward in a CUDA graph; returns ``replay``."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in leaves:
                t.grad = None
            step().backward()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step().backward()
    return graph.replay


def bench_step(item, timer, rates, cuda, deadline, rows, notes, compile_backend="inductor"):
    """Measure one step item (one implementation at one shape and dtype), appending to ``rows`` and ``notes`` as it
    goes (an interrupted item keeps the modes it finished). Checks ``deadline`` between phases."""
    import torch

    impl, (B, M, D, k), dtype_name = item["impl"], item["shape"], item["dtype"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    elem = torch.finfo(dtype).bits // 8
    floors = floors_ms(B, M, D, k, elem, rates)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = {"impl": impl, "B": B, "M": M, "D": D, "k": k, "dtype": dtype_name}
    mine = []  # this item's rows, to annotate with memory and launches at the end

    def check(phase):
        if time.time() > deadline:
            raise _ItemTimeout(phase)

    def clear():
        for t in leaves:
            t.grad = None

    step, leaves = _make_step(impl, B, M, D, k, dtype, "cuda" if cuda else "cpu", compile_backend)
    t0 = time.perf_counter()
    step().backward()  # warm-up: compiles Triton kernels / torch.compile graphs
    sync()
    base["first_step_s"] = round(time.perf_counter() - t0, 3)
    check("after the first step")
    clear()
    t0 = time.perf_counter()
    step().backward()
    sync()
    once_s = time.perf_counter() - t0
    once = once_s > 2.0
    if once:
        notes.append(f"{item['id']}: one step takes {once_s:.1f}s; timed once, not with do_bench")
    rep = 100 if once_s < 0.05 else max(3 * once_s * 1e3, 100)

    def measure(mode, fn):
        check(f"before {mode}")
        if once:
            clear()
            t0 = time.perf_counter()
            fn()
            sync()
            med = p20 = p80 = (time.perf_counter() - t0) * 1e3
        else:
            med, p20, p80 = timer.time(fn, grad_to_none=list(leaves), rep=rep)
        row = dict(base, mode=mode, median_ms=med, p20_ms=p20, p80_ms=p80, floor_ms=floors[mode],
                   x_floor=med / floors[mode])
        rows.append(row)
        mine.append(row)

    if impl == "triton_graph":
        if not cuda:
            notes.append(f"{item['id']}: CUDA graphs need a GPU; skipped")
            return
        measure("fwd+bwd", _graph_step(step, leaves))
        return
    measure("fwd+bwd", lambda: step().backward())
    measure("forward", step)
    if not once:
        loss = step()
        try:
            measure("backward", lambda: loss.backward(retain_graph=True))
        except RuntimeError as exc:  # e.g. a compiled backward that does not allow retain_graph
            notes.append(f"{item['id']}: backward alone not timed ({str(exc)[:160]})")
        del loss
    if cuda:
        check("before the memory and launch counts")
        clear()
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step().backward()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
        clear()
        names, ktimes = _count_launches(lambda: step().backward())
        counted = None
        if impl == "triton":  # the count on meta tensors (--memory) beside the measured peak
            try:
                sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                counted = memory_plan(B, M, D, k, dtype, sms=sms)["peak_bytes"]
            except Exception as exc:  # never lose the measured row to the count
                notes.append(f"{item['id']}: memory count failed ({type(exc).__name__}: {str(exc)[:160]})")
        for r in mine:
            r["peak_extra_bytes"] = peak
            if counted is not None:
                r["peak_counted_bytes"] = counted
            r["launches_step"] = len(names)
            r["launches_fused"] = sum(map(_fused_kernel, names))
            if impl == "triton":
                r["kernel_us"] = {n: round(t, 2) for n, t in sorted(ktimes.items(), key=lambda x: -x[1])}


def _cuda_broken() -> bool:
    """True when the CUDA context no longer works (an illegal access poisons it for the rest of the process)."""
    import torch

    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() != 2.0
    except Exception:
        return True


def _exit_with_parent() -> None:
    """End this worker when the supervising process dies (killed by ``timeout -k``): a daemon thread polls the
    parent id, so an orphaned worker never keeps the GPU busy under the next step."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(plan_path: str) -> int:
    """Measure ``plan["todo"]`` items in order, reporting each as JSON lines to ``plan["events"]``; returns 3 after
    an item that timed out or broke the CUDA context (the supervisor starts a fresh worker for the rest)."""
    import signal

    plan = json.loads(Path(plan_path).read_text())
    _exit_with_parent()
    events = open(plan["events"], "a", encoding="utf-8")

    def emit(**event):
        events.write(json.dumps(event) + "\n")
        events.flush()

    import torch

    smoke = plan["smoke"]
    cuda = torch.cuda.is_available() and not smoke
    if not smoke and not cuda:
        print("gpu_bench.py: error: no CUDA device; --cpu-smoke checks the script on CPU", file=sys.stderr)
        return 2
    timer = Timer(cuda)
    env = _versions()
    if not cuda:
        env["device"] = "cpu (TRITON_INTERPRET smoke run)"
    rates = plan.get("rates") or measure_rates(timer, cuda)
    emit(event="env", env=env, rates=rates)

    def on_alarm(signum, frame):
        raise _ItemTimeout("by the alarm")

    signal.signal(signal.SIGALRM, on_alarm)
    for i in plan["todo"]:
        item = plan["items"][i]
        start = time.time()
        limit = min(item["limit_s"], plan["deadline"] - start)
        if limit < 1.0:
            emit(event="done", i=i, status="not run (budget spent)", seconds=0.0, rows=[], notes=[])
            continue
        emit(event="start", i=i, t=start, limit=limit)
        rows, notes, status = [], [], "ok"
        try:
            signal.setitimer(signal.ITIMER_REAL, limit)
            if item["kind"] == "precision":
                precision_study(timer, cuda, rows)
            else:
                bench_step(item, timer, rates, cuda, start + limit, rows, notes, plan["compile_backend"])
        except _ItemTimeout as exc:
            status = "timeout" if limit >= item["limit_s"] else "cut (budget spent)"
            why = "its item limit" if status == "timeout" else "the end of the budget"
            notes.append(f"{item['id']}: stopped after {limit:.3g}s ({why}, {exc}); rows measured before are kept")
        except Exception as exc:  # one failing item must not lose the others
            status = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
            notes.append(f"{item['id']}: {type(exc).__name__}: {str(exc)[:400]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if cuda and status == "error" and _cuda_broken():
            status = "cuda_error"
        if cuda and status != "cuda_error":
            torch.cuda.empty_cache()
        emit(event="done", i=i, status=status, seconds=round(time.time() - start, 2), rows=rows, notes=notes)
        fb = next((r["median_ms"] for r in rows if r.get("mode") == "fwd+bwd"), None)
        print(f"  [{i + 1}/{len(plan['items'])}] {item['id']}: {status}, {time.time() - start:.1f}s"
              + (f", fwd+bwd {fb:.4f} ms" if fb is not None else "") + "".join(f"\n    note: {n}" for n in notes),
              flush=True)
        if status in ("timeout", "cut (budget spent)", "cuda_error"):
            return 3
    return 0


def _read_events(path: Path, offset: int):
    """New complete JSON lines of ``path`` from ``offset``: ``(events, new_offset)``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


def run(items, json_path: Path, budget_s: float, smoke: bool, compile_backend: str) -> dict:
    """Measure ``items`` in worker processes within ``budget_s`` seconds; write and return the JSON document."""
    import shutil
    import signal

    doc = {"script": "bench/gpu_bench.py", "argv": sys.argv[1:], "budget_s": budget_s,
           "timer": "wall clock (smoke)" if smoke else "triton.testing.do_bench (median, 20th/80th percentiles)",
           "items": [dict(it, status="pending") for it in items], "rows": [], "precision": [], "notes": []}
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        json_path.write_text(json.dumps(doc, indent=1))

    save()
    deadline = time.time() + budget_s
    tmp = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    rates, proc, current, attempt = None, None, None, 0
    env = dict(os.environ)
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # before triton is imported (the interpreter is chosen at import)

    def handle(event):
        nonlocal rates, current
        if event["event"] == "env":
            if rates is None:
                doc.update(event["env"])
                doc["rates"] = rates = event["rates"]
                print(f"{doc.get('device')} | torch {doc['torch']} | triton {doc['triton']} | copy "
                      f"{rates['copy_bytes_per_s'] / 1e9:.0f} GB/s | bf16 matmul "
                      f"{rates['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
        elif event["event"] == "start":
            current = event
            doc["items"][event["i"]]["status"] = "running"
        elif event["event"] == "done":
            current = None
            it = doc["items"][event["i"]]
            it["status"], it["seconds"], it["worker"] = event["status"], event["seconds"], attempt
            for row in event["rows"]:
                row["worker"] = attempt  # rows with the same number were timed in the same process
            (doc["precision"] if it["kind"] == "precision" else doc["rows"]).extend(event["rows"])
            doc["notes"].extend(event["notes"])
            save()

    def stop_worker():
        # The worker leads its own session: this ends it and whatever it started (compiler processes) that is left.
        nonlocal proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the worker and all its children have exited
            pass
        proc.wait()
        proc = None

    try:
        while True:
            todo = [i for i, it in enumerate(doc["items"]) if it["status"] == "pending"]
            if not todo or deadline - time.time() < 2.0:
                break
            attempt += 1
            events = tmp / f"events{attempt}.jsonl"
            plan = {"items": items, "todo": todo, "rates": rates, "deadline": deadline, "events": str(events),
                    "smoke": smoke, "compile_backend": compile_backend}
            plan_path = tmp / f"plan{attempt}.json"
            plan_path.write_text(json.dumps(plan))
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(plan_path)],
                                    env=env, start_new_session=True)
            offset, killed = 0, None
            while True:
                finished = proc.poll() is not None
                new, offset = _read_events(events, offset)
                for event in new:
                    handle(event)
                if finished:
                    break
                now = time.time()
                if current is not None and now > current["t"] + current["limit"] + GRACE_S:
                    killed = f"killed {GRACE_S:.0f}s after its limit of {current['limit']:.3g}s (no reaction)"
                elif current is None and now > deadline + GRACE_S:
                    killed = "killed: the worker passed the budget between items"
                if killed:
                    break
                time.sleep(0.2)
            returncode = proc.returncode
            stop_worker()
            if current is not None:  # the worker died or was killed inside an item
                it = doc["items"][current["i"]]
                it["status"] = "killed" if killed else f"crashed (exit status {returncode})"
                it["seconds"] = round(time.time() - current["t"], 2)
                doc["notes"].append(f"{it['id']}: {killed or f'the worker died (exit status {returncode})'}")
                current = None
                save()
            elif killed:
                doc["notes"].append(killed)
            if rates is None:  # it never got as far as measuring the card: retrying would fail the same way
                doc["notes"].append(f"the worker failed before the first item (exit status {returncode})")
                break
    except KeyboardInterrupt:
        stop_worker()
        if current is not None:
            doc["items"][current["i"]]["status"] = "interrupted"
        doc["notes"].append("interrupted (SIGINT) before the plan was done")
    finally:
        stop_worker()
        shutil.rmtree(tmp, ignore_errors=True)
        for it in doc["items"]:
            if it["status"] in ("pending", "running"):
                it["status"] = "not run (budget spent)" if time.time() > deadline - 2.0 else "not run"
        save()
        print_table(doc)
        print(f"wrote {json_path}", flush=True)
    return doc


def print_table(doc):
    """One line per (shape, dtype, impl, mode) with speedups against the reference, then the items' status."""
    rows = doc["rows"]
    ref = {(r["B"], r["M"], r["D"], r["k"], r["dtype"], r["mode"]): r["median_ms"] for r in rows
           if r["impl"] == "reference"}
    hdr = (f"{'B':>5} {'M':>8} {'D':>5} {'k':>3} {'dtype':5} {'impl':13} {'mode':8} {'median ms':>10} "
           f"{'p20':>9} {'p80':>9} {'vs ref':>7} {'floor ms':>9} {'x floor':>7} {'launch':>6} {'fused':>5} "
           f"{'peak MiB':>9} {'count MiB':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        key = (r["B"], r["M"], r["D"], r["k"], r["dtype"], r["mode"])
        sp = ref.get(key)
        sp = f"{sp / r['median_ms']:.1f}x" if sp else "-"
        peak = r.get("peak_extra_bytes")
        print(f"{r['B']:>5} {r['M']:>8} {r['D']:>5} {r['k']:>3} {r['dtype']:5} {r['impl']:13} {r['mode']:8} "
              f"{r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} {r['p80_ms']:>9.4f} {sp:>7} {r['floor_ms']:>9.4f} "
              f"{r['x_floor']:>7.2f} {r.get('launches_step', '-'):>6} {r.get('launches_fused', '-'):>5} "
              f"{(peak / 2**20 if peak is not None else float('nan')):>9.2f} "
              f"{r.get('peak_counted_bytes', float('nan') * 2**20) / 2**20:>9.2f}")
    for it in doc["items"]:
        if it["status"] != "ok":
            print(f"item {it['id']}: {it['status']}" + (f" after {it['seconds']:.0f}s" if "seconds" in it else ""))
    for note in doc["notes"]:
        print("note:", note)


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out", help="directory for the JSON (default $OUT, "
                    "else ./out)")
    ap.add_argument("--json", default=None, help="result file (default OUT/gpu_bench.json, OUT/gpu_bench_smoke.json "
                    "with --cpu-smoke)")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole plan (default: %(default)g)")
    ap.add_argument("--shapes", default=None, help="BxMxDxk,... (default: "
                    + ",".join("x".join(map(str, s)) for s in PLAN_SHAPES) + ")")
    ap.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS) + " (default: all)")
    ap.add_argument("--dtypes", default=None, help="fp32,bf16 (default: both where M >= 65536, fp32 below)")
    ap.add_argument("--no-precision", action="store_true", help="leave out the fp32 dot-precision study")
    ap.add_argument("--item-limit", type=float, default=None, help="seconds per item, for every item (default: "
                    + ", ".join(f"{k} {v:.0f}" for k, v in ITEM_LIMIT_S.items()) + ")")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--compile-only", action="store_true", help="compile the kernels for --arch, no GPU needed")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (default: %(default)s, H100/H200)")
    ap.add_argument("--quick", action="store_true", help="--compile-only at two shapes only")
    ap.add_argument("--memory", action="store_true", help="print the Triton step's peak extra memory at --shapes "
                    "(default: the benchmark shapes), counted on meta tensors; no GPU needed")
    ap.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (torch.compile with its eager backend)")
    ap.add_argument("--compile-backend", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.compile_only:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("--compile-only: TRITON_INTERPRET=1 is set; unset it")
            return 1
        return compile_only(args.arch, args.quick)
    if args.memory:
        try:
            shapes = parse_shapes(args.shapes) if args.shapes else SHAPES
        except ValueError as exc:
            print(f"gpu_bench.py: error: {exc}", file=sys.stderr)
            return 2
        return print_memory_plan(shapes)
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else (SMOKE_SHAPES if args.cpu_smoke else PLAN_SHAPES)
        impls = parse_choices(args.impls, IMPLS, "--impls")
        dtypes = parse_choices(args.dtypes, _DTYPES, "--dtypes") if args.dtypes else None
        if args.budget <= 0 or (args.item_limit is not None and args.item_limit <= 0):
            raise ValueError("--budget and --item-limit must be positive")
    except ValueError as exc:
        print(f"gpu_bench.py: error: {exc}", file=sys.stderr)
        return 2
    items = plan_items(shapes, impls, dtypes or None, not args.no_precision, args.cpu_smoke, args.item_limit)
    if args.list or not items:
        for it in items:
            print(f"{it['id']} (limit {it['limit_s']:.0f}s)")
        return 0
    path = Path(args.json) if args.json else Path(args.out) / ("gpu_bench_smoke.json" if args.cpu_smoke
                                                              else "gpu_bench.json")
    backend = args.compile_backend or ("eager" if args.cpu_smoke else "inductor")
    doc = run(items, path, args.budget, args.cpu_smoke, backend)
    status = {it["status"] for it in doc["items"]}
    if status <= {"ok"}:
        return 0
    return 3 if status <= {"ok", "not run (budget spent)", "cut (budget spent)"} else 1


if __name__ == "__main__":
    sys.exit(main())
