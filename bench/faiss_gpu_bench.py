"""GPU counterpart of bench/test_bench_faiss.py: FAISS's brute-force GPU kNN vs the torch and Triton backends.

Run on a CUDA machine (bench/device_check.sh calls it)::

    python bench/faiss_gpu_bench.py --out "$OUT/faiss_gpu.json"

For B = 64, D = 768, k = 16 and M in {65536, 262144, 1048576}, buffer dtypes fp32/fp16/bf16: the median, 20th and
80th percentile time of ``iscse.knn_topk(..., backend=...)`` for ``faiss``, ``torch`` and ``triton`` (when it
imports), timed with ``triton.testing.do_bench`` when Triton is installed (CUDA events otherwise) in this one
process; torch's peak allocation during one call (``max_memory_allocated``; FAISS's own temporary memory lives
outside torch's allocator, so the change in free device memory across FAISS's first call is recorded too); the
agreement of FAISS's neighbour sets with torch's; and the floor ``bytes of the buffer / copy bandwidth`` measured
on the same card. Writes one JSON document (device name, versions, date, rows); prints one line per row. Exits 0
with a "skipped" document when CUDA or FAISS GPU support is missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under PYTHONSAFEPATH=1
import benchlib  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _timer():
    """``bench(fn) -> (median, p20, p80)`` in ms: Triton's do_bench when it imports, else CUDA events."""
    try:
        from triton.testing import do_bench

        def bench(fn):
            med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
            return med, p20, p80

        return bench, "triton.testing.do_bench"
    except ImportError:
        def bench(fn):
            for _ in range(3):
                fn()
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return tuple(float(np.percentile(times, p)) for p in (50, 20, 80))

        return bench, "cuda events"


def _copy_bandwidth(x: torch.Tensor, bench) -> float:
    """Device copy bandwidth in bytes/s (read + write of ``x``), on this card."""
    y = torch.empty_like(x)
    med, _, _ = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (med * 1e-3)


def run(Ms=(65536, 262144, 1048576), B: int = 64, D: int = 768, k: int = 16, dtypes=("float32", "float16",
        "bfloat16"), seed: int = 0) -> dict:
    """Time the kNN backends on CUDA; returns the JSON document (see the module docstring)."""
    import iscse

    doc = {"device": None, "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": []}
    if not torch.cuda.is_available():
        doc["skipped"] = "CUDA is not available"
        return doc
    try:
        import faiss  # noqa: F401  (the import that fails without FAISS)

        from iscse.backends.faiss_knn import faiss_gpu_available
    except ImportError as exc:
        doc["skipped"] = f"faiss does not import: {exc}"
        return doc
    if not faiss_gpu_available():
        doc["skipped"] = "the installed FAISS has no GPU support (pip install 'iscse[faiss-gpu]')"
        return doc
    bench, timer_name = _timer()
    backends = ["faiss", "torch"] + (["triton"] if iscse.available_backends("cuda").get("triton") else [])
    doc.update(benchlib.environment(("faiss", "triton")), timer=timer_name, backends=backends)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for M in Ms:
        for name in dtypes:
            dtype = DTYPES[name]
            storage = torch.randn(M, D, device="cuda", generator=gen)
            storage /= storage.norm(dim=1, keepdim=True)
            storage = storage.to(dtype)
            slots = torch.randperm(M, device="cuda", generator=gen)[:B]
            q = storage[slots].float()
            nbytes = storage.numel() * storage.element_size()
            floor_ms = 1e3 * nbytes / _copy_bandwidth(storage, bench)
            ref_idx = None
            for backend in backends:
                fn = lambda: iscse.knn_topk(q, storage, k, self_slots=slots, backend=backend)  # noqa: E731
                torch.cuda.synchronize()
                free0 = torch.cuda.mem_get_info()[0]
                fn()  # first call: FAISS creates its resources (temporary memory) here
                torch.cuda.synchronize()
                first_call_free_drop = (free0 - torch.cuda.mem_get_info()[0]) / 2 ** 20
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                _, idx = fn()
                torch.cuda.synchronize()
                peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                med, p20, p80 = bench(fn)
                row = {"M": M, "B": B, "D": D, "k": k, "dtype": name, "backend": backend, "median_ms": round(med, 4),
                       "p20_ms": round(p20, 4), "p80_ms": round(p80, 4), "torch_peak_mib": round(peak_mib, 1),
                       "first_call_device_mem_drop_mib": round(first_call_free_drop, 1),
                       "floor_ms": round(floor_ms, 4), "buffer_mib": round(nbytes / 2 ** 20, 1)}
                if backend == "torch":
                    ref_idx = idx
                doc["rows"].append((row, idx))
            # Agreement with torch's neighbour sets (fp16/bf16: near-ties may legitimately differ).
            for row, idx in doc["rows"]:
                if row["M"] == M and row["dtype"] == name and "set_agreement_vs_torch" not in row:
                    same = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(idx.cpu(), ref_idx.cpu())]
                    row["set_agreement_vs_torch"] = round(float(np.mean(same)), 4)
                    print(json.dumps(row), flush=True)
            del storage
            torch.cuda.empty_cache()
    doc["rows"] = [row for row, _ in doc["rows"]]
    return doc


def build_parser() -> argparse.ArgumentParser:
    """Command line: ``--out FILE`` (JSON), ``--M`` sizes, ``--dtypes``; ``--help`` shows each default."""
    parser = argparse.ArgumentParser(description="FAISS GPU kNN benchmark",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=None, help="write the JSON document here")
    parser.add_argument("--M", type=int, nargs="+", default=[65536, 262144, 1048576], help="buffer sizes")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="buffer dtypes")
    return parser


def main(argv=None) -> int:
    """Run the benchmark from the command line (:func:`build_parser`)."""
    args = build_parser().parse_args(argv)
    doc = run(Ms=tuple(args.M), dtypes=tuple(args.dtypes))
    if "skipped" in doc:
        print(f"faiss_gpu_bench skipped: {doc['skipped']}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
