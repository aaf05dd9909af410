"""CPU benchmark: FAISS kNN (exact and approximate) vs the torch backend, B = 64, D = 768, k = 16.

Run (both backends in the same run, as docs/concepts.md: Measuring asks)::

    pytest bench/test_bench_faiss.py --benchmark-only --benchmark-columns=median,iqr,min,rounds \
        --benchmark-json=bench/results/faiss_cpu_$(date +%Y%m%d).json

Buffers of M in {65536, 262144, 1048576} rows (the largest is 3 GiB of fp32), built once per M. The rows are
clustered unit vectors (one topic per 16 rows plus noise, see :func:`clustered_buffer`) rather than uniform ones,
because an inverted-file index is only useful on data with structure, as sentence embeddings have; the exact
searches do not care. Each round is one training step's search: ``push`` a new batch of 64 rows, then the kNN of
that batch (self slots excluded), so the approximate index also pays its per-step update.

``extra_info`` of every row: the peak resident-memory increase of one search, measured in a fresh subprocess
(``python bench/test_bench_faiss.py rss ...``: tracemalloc cannot see torch's allocations, so the kernel's VmHWM is
reset through /proc/self/clear_refs, one search runs, and VmHWM is read back), CPU name, thread counts, versions,
date; for the approximate mode also its build time, recall@16 against the exact search and the index's size.

``python bench/test_bench_faiss.py recall [--emb FILE.npy] --M M`` sweeps the approximate mode's nprobe (recall@16
and time against the exact searches), on real sentence embeddings (an (N, D) fp32 array) or the clustered rows;
see bench/FAISS.md. ``python bench/test_bench_faiss.py crossover`` times the exact searches against each other over
a grid of M and B (interleaved calls), the measurement behind ``iscse.backends.faiss_knn.prefer_faiss``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchlib, also under PYTHONSAFEPATH=1
import benchlib  # noqa: E402

B, D, K = 64, 768, 16
MS = (65536, 262144, 1048576)
ROWS_PER_CENTER = 16  # one "topic" per 16 rows, so that a row's 16 neighbours straddle topics
SIGMA = 0.04  # per-coordinate noise: a row's cosine with its centre is about 1 / sqrt(1 + D sigma^2) = 0.66
BACKENDS = ("torch", "faiss", "faiss-ivf")
ROUNDS = 7


def clustered_buffer(M: int, dim: int = D, seed: int = 0, sigma: float = SIGMA):
    """A full ``iscse.MemoryBuffer`` of ``M`` clustered unit rows (``M / ROWS_PER_CENTER`` random centres plus
    Gaussian noise), written in place in chunks (no second copy), and a function returning new batches from the
    same distribution. Calibrated on real sentence embeddings (bench/FAISS.md): at M = 65536 the approximate
    mode's recall on these rows is a little below its recall on all-MiniLM-L6-v2 embeddings."""
    import iscse

    n_centers = max(1, M // ROWS_PER_CENTER)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_centers, dim, generator=gen)
    centers /= centers.norm(dim=1, keepdim=True)

    def batch(n: int) -> torch.Tensor:
        x = centers[torch.randint(0, n_centers, (n,), generator=gen)]
        x += sigma * torch.randn(n, dim, generator=gen)
        return x / x.norm(dim=1, keepdim=True)

    buf = iscse.MemoryBuffer(M, dim)
    for start in range(0, M, 65536):
        buf.push(batch(min(65536, M - start)))
    return buf, batch


def make_search(backend: str):
    """``search(q, buf) -> (vals, idx)`` for a backend name of :data:`BACKENDS` (q already pushed)."""
    import iscse

    if backend == "faiss-ivf":
        from iscse.backends.faiss_knn import FaissBackend

        approx = FaissBackend(approximate=True)
        search = lambda q, buf: approx.knn_topk(q, buf.storage, K, buf.last_slots(), buf.ptr)  # noqa: E731
        search.backend = approx
        return search
    return lambda q, buf: iscse.knn_topk(q, buf, K, backend=backend)


def environment() -> dict:
    """Machine and versions for a result row (benchlib's record plus FAISS's thread count)."""
    import faiss

    return {**benchlib.environment(("faiss", "numpy")), "faiss_threads": faiss.omp_get_max_threads()}


# ------------------------------------------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_rss(backend: str, M: int) -> dict:
    """In this process: build the buffer, warm the search up, then the peak RSS increase (MiB) of one more step
    (push + search). For the approximate mode also the RSS the index build added (its copy of the rows)."""
    buf, batch = clustered_buffer(M)
    search = make_search(backend)
    out = {}
    q = batch(B)
    rss0 = _status_kib("VmRSS")
    buf.push(q)
    search(q, buf)  # warm-up: thread pools, FAISS's buffers, the approximate index
    out["build_rss_mib"] = (_status_kib("VmRSS") - rss0) / 1024
    q = batch(B)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    rss = _status_kib("VmRSS")
    buf.push(q)
    search(q, buf)
    out["peak_rss_delta_mib"] = (_status_kib("VmHWM") - rss) / 1024
    return out


def rss_in_subprocess(backend: str, M: int) -> dict:
    """:func:`measure_rss` in a fresh interpreter, so that nothing the benchmark process holds is counted."""
    import iscse

    cmd = [sys.executable, os.path.abspath(__file__), "rss", "--backend", backend, "--M", str(M)]
    env = dict(os.environ)  # the child imports the same iscse as this process, installed or not
    root = os.path.dirname(os.path.dirname(os.path.abspath(iscse.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        return {"rss_error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- the benchmark


def recall(idx: torch.Tensor, ref_idx: torch.Tensor) -> float:
    """Mean over queries of |returned ∩ exact| / k."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / idx.shape[1] for a, b in zip(idx, ref_idx)]))


try:
    import pytest
except ImportError:  # the script modes below run without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module", params=MS, ids=lambda m: f"M{m}")
    def buffer(request):
        """The clustered buffer for one M, built once, shared by the backends."""
        pytest.importorskip("faiss")
        buf, batch = clustered_buffer(request.param)
        yield buf, batch
        del buf

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_knn_cpu(benchmark, buffer, backend):
        """One training step's kNN (push 64 rows, search them), FAISS vs torch, per buffer size."""
        pytest.importorskip("pytest_benchmark")
        buf, batch = buffer
        M = buf.size
        search = make_search(backend)
        info = {"M": M, "B": B, "D": D, "k": K, "backend": backend, **environment()}
        if backend == "faiss-ivf":
            q = batch(B)
            buf.push(q)
            start = time.perf_counter()
            search(q, buf)  # builds the index
            info["build_s"] = round(time.perf_counter() - start, 2)
            ivf = search.backend._ivf
            info.update(nlist=ivf.index.nlist, nprobe=ivf.index.nprobe,
                        index_mib=round(M * (D * 4 + 8) / 2 ** 20, 1))
        batches = [batch(B) for _ in range(ROUNDS + 1)]
        results = []

        def step():
            q = batches[len(results) % len(batches)]
            buf.push(q)
            results.append((q, buf.last_slots(), search(q, buf)))

        benchmark.group = f"knn-cpu-M{M}"
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        if backend == "faiss-ivf":  # recall of the last step, against the exact torch search of the same rows
            from iscse.backends.pytorch import knn_topk

            q, slots, (_, idx) = results[-1]
            info["recall_at_16"] = round(recall(idx, knn_topk(q, buf.storage, K, slots)[1]), 4)
        info.update(rss_in_subprocess(backend, M))
        benchmark.extra_info.update(info)


# ------------------------------------------------------------------------------------------ recall/speed sweep


def recall_sweep(buf, batch, nprobes=(4, 8, 16, 32, 64, 128), steps: int = 10, nlist=None) -> list:
    """Approximate vs exact on a full buffer ``buf`` with new batches from ``batch(n)``: for ``steps`` training
    steps (push 64 rows, search them), the exact torch and FAISS searches and the approximate one at each
    ``nprobe`` (one index, updated once per step); per search, the median time and recall@16 against the exact
    torch search. The index's build (first search) is timed separately."""
    from iscse.backends.faiss_knn import FaissBackend, knn_topk as faiss_knn
    from iscse.backends.pytorch import knn_topk as torch_knn

    approx = FaissBackend(approximate=True, nlist=nlist)
    times = {name: [] for name in ("torch", "faiss") + tuple(nprobes)}
    recalls = {p: [] for p in nprobes}
    build = None
    for step in range(steps + 1):
        q = batch(B)
        buf.push(q)
        slots = buf.last_slots()
        start = time.perf_counter()
        _, ref = torch_knn(q, buf.storage, K, slots)
        times["torch"].append(time.perf_counter() - start)
        start = time.perf_counter()
        faiss_knn(q, buf.storage, K, slots)
        times["faiss"].append(time.perf_counter() - start)
        for p in nprobes:
            approx.nprobe = p
            start = time.perf_counter()
            _, idx = approx.knn_topk(q, buf.storage, K, slots, buf.ptr)  # the first one of a step also updates
            elapsed = time.perf_counter() - start
            if step == 0 and build is None:
                build = elapsed
                continue
            times[p].append(elapsed)
            recalls[p].append(recall(idx, ref))
    rows = []
    for name, ts in times.items():
        row = {"search": name if isinstance(name, str) else f"ivf nprobe={name}", "M": buf.size, "D": buf.dim,
               "median_ms": round(1e3 * float(np.median(ts[1:] if isinstance(name, str) else ts)), 1)}
        if not isinstance(name, str):
            row.update(nlist=approx.index.nlist, recall_at_16=round(float(np.mean(recalls[name])), 4),
                       min_recall=round(float(np.min(recalls[name])), 4), build_s=round(build, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def embeddings_source(path: str, M: int):
    """A full buffer of the first ``M`` rows of an ``(N, D)`` fp32 ``.npy`` of sentence embeddings, and the next
    rows as the stream of new batches."""
    import iscse

    emb = torch.from_numpy(np.load(path)).float()
    emb /= emb.norm(dim=1, keepdim=True)
    buf = iscse.MemoryBuffer(M, emb.shape[1])
    buf.push(emb[:M])
    cursor = [M]

    def batch(n: int) -> torch.Tensor:
        if cursor[0] + n > emb.shape[0]:
            raise ValueError(f"{path} has only {emb.shape[0]} rows; use a smaller --M or fewer --steps")
        cursor[0] += n
        return emb[cursor[0] - n:cursor[0]]

    return buf, batch


# ------------------------------------------------------------------------------------------------------ crossover


def crossover(Ms, Bs, dim: int = D, seed: int = 0) -> list:
    """Exact kNN, FAISS vs torch, on random unit rows, the two calls interleaved (so that load from other processes
    hits both alike), medians over many calls; the numbers behind :func:`iscse.backends.faiss_knn.prefer_faiss`."""
    from iscse.backends.faiss_knn import knn_topk as faiss_knn
    from iscse.backends.pytorch import knn_topk as torch_knn

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for M in Ms:
        storage = torch.randn(M, dim, generator=gen)
        storage /= storage.norm(dim=1, keepdim=True)
        for b in Bs:
            slots = torch.randperm(M, generator=gen)[:b]
            q = storage[slots]
            fns = {"torch": lambda: torch_knn(q, storage, K, slots), "faiss": lambda: faiss_knn(q, storage, K, slots)}
            calls = max(5, min(50, int(2e6 / M)))
            times = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(calls):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            row = {"M": M, "B": b, "D": dim, "calls": calls,
                   **{f"{name}_ms": round(1e3 * float(np.median(ts)), 2) for name, ts in times.items()}}
            row["torch_over_faiss"] = round(row["torch_ms"] / row["faiss_ms"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    """``rss``: one peak-RSS measurement (used by the benchmark); ``recall``: :func:`recall_sweep` on real
    embeddings (``--emb``) or on the benchmark's clustered rows (without ``--emb``); ``crossover``:
    :func:`crossover`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_rss = sub.add_parser("rss")
    p_rss.add_argument("--backend", choices=BACKENDS, required=True)
    p_rss.add_argument("--M", type=int, required=True)
    p_rec = sub.add_parser("recall")
    p_rec.add_argument("--emb", default=None, help="an (N, D) float32 .npy of sentence embeddings")
    p_rec.add_argument("--M", type=int, default=65536)
    p_rec.add_argument("--D", type=int, default=D, help="width of the clustered rows (without --emb)")
    p_rec.add_argument("--steps", type=int, default=10)
    p_rec.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p_rec.add_argument("--nlist", type=int, default=None)
    p_cross = sub.add_parser("crossover")
    p_cross.add_argument("--M", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144])
    p_cross.add_argument("--B", type=int, nargs="+", default=[1, 8, 16, 64])
    p_cross.add_argument("--D", type=int, default=D)
    args = parser.parse_args(argv)
    if args.cmd == "crossover":
        print(json.dumps(environment()))
        crossover(args.M, args.B, args.D)
        return
    if args.cmd == "rss":
        print(json.dumps({k: round(v, 1) for k, v in measure_rss(args.backend, args.M).items()}))
        return
    print(json.dumps(environment()))
    if args.emb:
        buf, batch = embeddings_source(args.emb, args.M)
    else:
        buf, batch = clustered_buffer(args.M, args.D)
    recall_sweep(buf, batch, tuple(args.nprobe), args.steps, args.nlist)


if __name__ == "__main__":
    main()
