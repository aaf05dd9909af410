"""GPU benchmark of one IS-CSE step: reference, torch.compile(reference), torch and Triton backends.

Run on a CUDA machine from the repository root (bench/device_check.sh calls it)::

    python bench/gpu_bench.py --out "$OUT"

For each (B, M, D, k) in :data:`SHAPES` and dtype (fp32 everywhere; bf16 embeddings + bf16 buffer at the large
shapes): forward, backward and forward+backward of one step (push + ``L_cl + alpha L_s``) timed with
``triton.testing.do_bench`` (median, 20th and 80th percentiles), peak extra memory (``max_memory_allocated`` minus
the allocation before the call), CUDA kernel launches of one forward+backward (torch.profiler, device-side events),
per-kernel device time of the Triton step, and the roofline floor ``max(bytes / copy bandwidth, 2 B M D / bf16
matmul rate)`` with ``bytes = M D (buffer dtype) + small`` and both rates measured on this card first. The Triton
step is also timed as a CUDA graph (push + loss + backward captured once, replayed). Each configuration is
time-boxed and a global budget (``--budget``) is kept: what does not fit, OOMs or would be extremely slow is skipped
with a note. First, a short study of the fp32 ``tl.dot`` precision options (tf32x3, bf16x3, tf32, ieee) for the kNN
and the dual InfoNCE: time and error against float64, to choose the default on a real card. Writes
``gpu_bench.json`` under ``--out`` (default ``$OUT``, else ``./out``) with the card, driver, versions, date, rates,
precision study, rows and notes (rewritten after every configuration), and prints a table.

Other modes (no GPU needed):

- ``--compile-only``: compile every Triton kernel specialisation that the launchers would use at the benchmark
  shapes (and a few odd ones) for ``sm_<arch>`` with Triton's bundled ptxas, and print registers / spills / shared
  memory per kernel. Exit status 1 if any fails to compile. Runs the launchers' own code on ``meta`` tensors.
- ``--cpu-smoke``: the whole driver on tiny shapes on CPU with ``TRITON_INTERPRET=1`` (wall-clock timing instead
  of do_bench, no profiler counts): checks the script end to end before a GPU run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((args, kwargs, _Capture.shape))
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
    from iscse.kernels import knn_topk as K
    from iscse.kernels import smooth as S

    kernels = {
        (K, "_knn_chunk_kernel"): None, (K, "_knn_merge_kernel"): None, (S, "_smooth_fwd_kernel"): None,
        (S, "_smooth_bwd_kernel"): None, (N, "_info_nce_rows_kernel"): None, (N, "_info_nce_cols_kernel"): None,
        (N, "_info_nce_merge_kernel"): None,
    }
    for mod, name in kernels:
        kernels[(mod, name)] = _Capture(getattr(mod, name))
        setattr(mod, name, kernels[(mod, name)])
    # smooth.py imported merge_topk etc. by name; the kernels themselves are looked up in their module at launch.
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
            grads = tuple(torch.empty(B, D, **f32) for _ in range(4))
            S.smooth_backward_fused(g, g, z, z, grads, (q, nb, w), 2.0)
            S.smooth_backward_fused(g, None, z, z, (grads[0], grads[1], None, None), None, 2.0)
            S.smooth_backward(torch.empty(B, D, **f32), q, nb, w, 2.0)
            N.info_nce_forward(z, z, zs, 0.05)
            N.info_nce_forward(z, z, None, 0.05)
    finally:
        for (mod, name), cap in kernels.items():
            setattr(mod, name, cap.fn)
    return kernels


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
    shapes = [(B, M, D, k, dt) for (B, M, D, k) in (SHAPES[:1] + odd[:1] if quick else SHAPES + odd)
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
# the benchmark
# --------------------------------------------------------------------------------------------------------------

def _versions():
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["device"] = "cpu (TRITON_INTERPRET smoke run)"
    return info


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
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s) on this card."""
    import torch

    if not cuda:
        return {"copy_bytes_per_s": 1e10, "bf16_flops_per_s": 1e11, "note": "placeholders on CPU"}
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    med, _, _ = timer.time(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / (med * 1e-3)
    del x, y
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    med, _, _ = timer.time(lambda: a @ b)
    rate = 2 * n ** 3 / (med * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": rate}


def precision_study(timer: Timer) -> list:
    """fp32 ``tl.dot`` precision options for the kNN at (512, 65536, 1024, 16) and the dual InfoNCE at B = 512,
    D = 1024: time, and error against float64 (kNN: how far the chosen neighbours' exact similarities are from the
    exact top-k, i.e. the largest similarity gap that a precision error could have swapped; InfoNCE: relative error
    of both losses and of dL/dz1). For choosing the default precision on a real card."""
    import torch
    import torch.nn.functional as F

    from iscse import reference as R
    from iscse.kernels.info_nce import info_nce_forward
    from iscse.kernels.knn_topk import knn_topk

    rows = []
    B, M, D, k = 512, 65536, 1024, 16
    buf = F.normalize(torch.randn(M, D, device="cuda"), dim=1)
    q = F.normalize(torch.randn(B, D, device="cuda"), dim=1)
    slots = torch.randint(0, M, (B,), device="cuda")
    sim = q.double() @ buf.double().t()
    sim[torch.arange(B, device="cuda"), slots] = float("-inf")
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
    x, y, z = (torch.randn(B, D, device="cuda") for _ in range(3))
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
    torch.cuda.empty_cache()
    for r in rows:
        print("  precision:", {k_: (round(v, 6) if isinstance(v, float) else v) for k_, v in r.items()}, flush=True)
    return rows


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
    return any(s in name for s in ("_knn_chunk_kernel", "_knn_merge_kernel", "_smooth_fwd_kernel",
                                   "_smooth_bwd_kernel", "_info_nce_rows_kernel", "_info_nce_cols_kernel"))


def _make_step(impl, B, M, D, k, dtype, device, compiled_cache):
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
        fn = R.iscse_step
        if impl == "compile":
            if "fn" not in compiled_cache:
                compiled_cache["fn"] = torch.compile(R.iscse_step)
            fn = compiled_cache["fn"]

        def step():
            return fn(z1, z2, lbuf, k=k).loss
        return step, (z1, z2)
    buf = iscse.MemoryBuffer(M, D, dtype=dtype, device=device)
    buf.storage.copy_(rows.to(dtype))
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


def bench_config(impl, shape, dtype_name, timer, rates, cuda, deadline, compiled_cache):
    """Rows (one per mode) for one implementation at one shape and dtype; notes on what was skipped."""
    import torch

    B, M, D, k = shape
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = "cuda" if cuda else "cpu"
    elem = torch.finfo(dtype).bits // 8
    bytes_read = M * D * elem + 8 * B * D * elem
    flops = 2 * B * M * D
    floor_ms = max(bytes_read / rates["copy_bytes_per_s"], flops / rates["bf16_flops_per_s"]) * 1e3
    base = {"impl": impl, "B": B, "M": M, "D": D, "k": k, "dtype": dtype_name, "floor_ms": floor_ms}
    rows, notes = [], []
    try:
        step, leaves = _make_step(impl, B, M, D, k, dtype, device, compiled_cache)
        t0 = time.perf_counter()
        step().backward()  # warm-up: compiles Triton kernels / torch.compile graphs
        if cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        if impl == "compile":
            base["compile_s"] = first_s
        t0 = time.perf_counter()
        for t in leaves:
            t.grad = None
        step().backward()
        if cuda:
            torch.cuda.synchronize()
        once_s = time.perf_counter() - t0
        if once_s > 2.0:
            notes.append(f"{impl} {shape} {dtype_name}: one step takes {once_s:.1f}s; timed once, not with do_bench")
        if time.time() + 20 * once_s > deadline:
            notes.append(f"{impl} {shape} {dtype_name}: skipped (time budget)")
            return rows, notes
        rep = 100 if once_s < 0.05 else max(3 * once_s * 1e3, 100)
        if impl == "triton_graph":
            if not cuda:
                return rows, notes
            replay = _graph_step(step, leaves)
            med, p20, p80 = timer.time(replay, rep=rep)
            rows.append(dict(base, mode="fwd+bwd", median_ms=med, p20_ms=p20, p80_ms=p80))
            return rows, notes
        modes = {"forward": lambda: step(), "fwd+bwd": lambda: step().backward()}
        for mode, fn in modes.items():
            if once_s > 2.0:
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                med = p20 = p80 = (time.perf_counter() - t0) * 1e3
            else:
                med, p20, p80 = timer.time(fn, grad_to_none=list(leaves), rep=rep)
            rows.append(dict(base, mode=mode, median_ms=med, p20_ms=p20, p80_ms=p80))
        if once_s <= 2.0:
            loss = step()
            try:
                med, p20, p80 = timer.time(lambda: loss.backward(retain_graph=True), grad_to_none=list(leaves),
                                           rep=rep)
                rows.append(dict(base, mode="backward", median_ms=med, p20_ms=p20, p80_ms=p80))
            except RuntimeError as exc:  # e.g. a compiled backward that does not allow retain_graph
                notes.append(f"{impl} {shape} {dtype_name}: backward alone not timed ({str(exc)[:160]})")
            del loss
        if cuda:
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step().backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            names, ktimes = _count_launches(lambda: step().backward())
            for r in rows:
                r["peak_extra_bytes"] = peak
                r["launches_step"] = len(names)
                r["launches_fused"] = sum(map(_fused_kernel, names))
            if impl == "triton":
                for r in rows:
                    r["kernel_us"] = {n: round(t, 2) for n, t in sorted(ktimes.items(), key=lambda x: -x[1])}
    except torch.cuda.OutOfMemoryError as exc:
        notes.append(f"{impl} {shape} {dtype_name}: out of memory ({str(exc).splitlines()[0][:120]})")
    except Exception as exc:  # keep going: one failing configuration must not lose the others
        notes.append(f"{impl} {shape} {dtype_name}: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return rows, notes


def _configs(shapes, smoke):
    """(shape, dtype, impls): fp32 everywhere, bf16 at the large shapes; torch.compile at fp32 up to M = 65536."""
    out = []
    for shape in shapes:
        big = shape[1] >= 65536
        for dtype in (("fp32", "bf16") if (big or smoke) else ("fp32",)):
            impls = list(IMPLS)
            if shape[1] > 65536 or dtype == "bf16" or smoke:  # compile time: fp32 only, no smoke (no C++ needed)
                impls.remove("compile")
            if smoke:
                impls.remove("triton_graph")
            out.append((shape, dtype, impls))
    return out


def print_table(doc):
    """One line per (shape, dtype, impl, mode) with speedups against the reference."""
    rows = doc["rows"]
    ref = {(r["B"], r["M"], r["D"], r["k"], r["dtype"], r["mode"]): r["median_ms"] for r in rows
           if r["impl"] == "reference"}
    hdr = (f"{'B':>5} {'M':>8} {'D':>5} {'k':>3} {'dtype':5} {'impl':13} {'mode':8} {'median ms':>10} "
           f"{'p20':>9} {'p80':>9} {'vs ref':>7} {'floor ms':>9} {'x floor':>7} {'launch':>6} {'fused':>5} "
           f"{'peak MiB':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        key = (r["B"], r["M"], r["D"], r["k"], r["dtype"], r["mode"])
        sp = ref.get(key)
        sp = f"{sp / r['median_ms']:.1f}x" if sp else "-"
        xf = r["median_ms"] / r["floor_ms"] if r["floor_ms"] else float("nan")
        peak = r.get("peak_extra_bytes")
        print(f"{r['B']:>5} {r['M']:>8} {r['D']:>5} {r['k']:>3} {r['dtype']:5} {r['impl']:13} {r['mode']:8} "
              f"{r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} {r['p80_ms']:>9.4f} {sp:>7} {r['floor_ms']:>9.4f} "
              f"{xf:>7.2f} {r.get('launches_step', '-'):>6} {r.get('launches_fused', '-'):>5} "
              f"{(peak / 2**20 if peak is not None else float('nan')):>9.2f}")
    for note in doc["notes"]:
        print("note:", note)


def run(shapes, out_dir: Path, budget_s: float, smoke: bool) -> dict:
    """Time every configuration; write and return the JSON document."""
    import torch

    cuda = torch.cuda.is_available() and not smoke
    timer = Timer(cuda)
    doc = _versions()
    doc["shapes"] = [list(s) for s in shapes]
    doc["timer"] = "triton.testing.do_bench (median, 20th/80th percentiles)" if cuda else "wall clock (smoke)"
    doc["rows"], doc["notes"] = [], []
    deadline = time.time() + budget_s
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu_bench_smoke.json" if smoke else "gpu_bench.json")
    doc["rates"] = measure_rates(timer, cuda)
    print(f"{doc['device']} | torch {doc['torch']} | triton {doc['triton']} | copy "
          f"{doc['rates']['copy_bytes_per_s'] / 1e9:.0f} GB/s | bf16 matmul "
          f"{doc['rates']['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    if cuda:
        try:
            doc["precision"] = precision_study(timer)
        except Exception as exc:  # the main table matters more
            doc["notes"].append(f"precision study failed: {type(exc).__name__}: {str(exc)[:300]}")
        path.write_text(json.dumps(doc, indent=1))
    for shape, dtype, impls in _configs(shapes, smoke):
        compiled_cache = {}
        for impl in impls:
            if time.time() > deadline:
                doc["notes"].append(f"{impl} {shape} {dtype}: skipped (global budget of {budget_s:.0f}s spent)")
                continue
            t0 = time.time()
            # The largest shape gets the rest of the budget; smaller ones at most 60 s each.
            box = min(deadline, t0 + (60 if shape[1] <= 65536 else budget_s))
            rows, notes = bench_config(impl, shape, dtype, timer, doc["rates"], cuda, box, compiled_cache)
            doc["rows"] += rows
            doc["notes"] += notes
            path.write_text(json.dumps(doc, indent=1))  # after every configuration: a killed run keeps its rows
            print(f"  {shape} {dtype} {impl}: {len(rows)} rows, {time.time() - t0:.1f}s "
                  + (f"fwd+bwd {next((r['median_ms'] for r in rows if r['mode'] == 'fwd+bwd'), float('nan')):.3f}"
                     " ms" if rows else "; ".join(notes)), flush=True)
    path.write_text(json.dumps(doc, indent=1))
    print_table(doc)
    print(f"wrote {path}")
    return doc


def main(argv=None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out", help="directory for gpu_bench.json")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all timings together")
    ap.add_argument("--compile-only", action="store_true", help="compile the kernels for --arch, no GPU needed")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="--compile-only at two shapes only")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if args.compile_only:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("--compile-only: TRITON_INTERPRET=1 is set; unset it")
            return 1
        return compile_only(args.arch, args.quick)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (the interpreter is chosen at import)
    run(SMOKE_SHAPES if args.cpu_smoke else SHAPES, Path(args.out), args.budget, args.cpu_smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
