"""Shared helpers of the benchmarks: the environment record, timing summaries, resident-memory readings, one step.

Every benchmark script and pytest-benchmark file in ``bench/`` imports this module and nothing else from ``bench/``
(no import circle). Scripts put their own folder on ``sys.path`` first (``bench/device_check.sh`` runs them with
``PYTHONSAFEPATH=1``, which does not), with::

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchlib

- :func:`environment`: the machine and versions for a result record (CPU name, cores, threads, Python, torch and any
  optional package asked for, the CUDA device, capability, CUDA and driver versions when a GPU is visible, the date).
- :func:`summarize_ms`: median with 20th and 80th percentiles of a list of times.
- Peak resident memory on Linux: :func:`fix_malloc_thresholds`, :func:`peak_extra_bytes`, :func:`status_bytes`, and
  :func:`step_peak_mib`, which measures one IS-CSE step (:func:`step_fn`) in a fresh process
  (``python bench/benchlib.py peak IMPL B M D K MODE`` prints ``{"peak_bytes": N}``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from typing import Callable, Dict, Iterable, Optional, Sequence

__all__ = ["cpu_name", "environment", "summarize_ms", "fix_malloc_thresholds", "status_bytes", "peak_extra_bytes",
           "step_fn", "step_peak_mib"]


# ---------------------------------------------------------------------------------------------- environment record

def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else ``"unknown"``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpu_driver() -> Optional[str]:
    from iscse.check import gpu_driver  # one implementation: python -m iscse.check reports it too

    return gpu_driver()


def environment(packages: Iterable[str] = ("triton",)) -> Dict[str, object]:
    """The machine and versions for a result record.

    Always: ``date`` (ISO, seconds), ``python``, ``torch``, ``cpu``, ``cores``, ``torch_threads``; one entry per name
    in ``packages`` (its ``__version__``, or None where it does not import); on a machine with a visible CUDA device:
    ``device`` (its name), ``capability`` (``sm_XY``), ``cuda`` and ``driver``; else ``device = "cpu"``.
    """
    import torch

    info: Dict[str, object] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
        "torch": torch.__version__, "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    for name in packages:
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        info["cuda"] = torch.version.cuda
        info["driver"] = _gpu_driver()
    else:
        info["device"] = "cpu"
    return info


# --------------------------------------------------------------------------------------------------------- timing

def summarize_ms(times_ms: Sequence[float]) -> Dict[str, float]:
    """``{"median_ms", "p20_ms", "p80_ms", "n"}`` of a non-empty list of times in milliseconds."""
    xs = sorted(float(t) for t in times_ms)
    if not xs:
        raise ValueError("summarize_ms needs at least one time")

    def pct(q: float) -> float:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median_ms": statistics.median(xs), "p20_ms": pct(0.2), "p80_ms": pct(0.8), "n": len(xs)}


# ------------------------------------------------------------------------------------------- resident memory (Linux)
#
# Writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS, so ``VmHWM - VmRSS_before`` after
# a call is the most memory the call added at any moment. For that to follow the tensors the call creates, freed
# blocks must leave the process: glibc raises its mmap threshold each time a large block is freed (after a warm-up
# call, blocks of that size stay resident and would be missed), and fixing the threshold with ``mallopt`` turns that
# off. Fixing it also slows large allocations, so timings run with the default allocator and the memory is measured
# in a subprocess.

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1


def fix_malloc_thresholds() -> bool:
    """Make glibc mmap (and return on free) every block of 64 KiB or more; False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError, TypeError):
        return False


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Run ``fn()`` once and return the peak resident memory it added, in bytes (None where unsupported)."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_bytes("VmRSS")
    except OSError:
        return None
    out = fn()
    peak = status_bytes("VmHWM") - before
    del out
    return max(peak, 0)


# -------------------------------------------------------------------------------------------------- one IS-CSE step

def step_fn(impl: str, B: int, M: int, D: int, k: int, backward: bool) -> Callable[[], object]:
    """One IS-CSE step on a full buffer of random unit rows: ``impl`` is ``"reference"`` (the paper's ops on their
    ``cat``-shifted tensor) or an iscse backend name; forward only, or forward + the gradients of ``z1, z2``."""
    import torch
    import torch.nn.functional as F

    import iscse
    from iscse import reference as R

    z1 = torch.randn(B, D, requires_grad=True)
    z2 = torch.randn(B, D, requires_grad=True)
    rows = F.normalize(torch.randn(M, D), dim=1)
    if impl == "reference":
        def loss():
            return R.iscse_step(z1, z2, rows, k=k).loss
    else:
        buf = iscse.MemoryBuffer(M, D)
        buf.push(rows)  # every slot written: smoothing on

        def loss():
            return iscse.iscse_loss(z1, z2, buf, k=k, backend=impl)

    if not backward:
        def step():
            with torch.enable_grad():
                return loss()
        return step

    def step():
        return torch.autograd.grad(loss(), (z1, z2))
    return step


def step_peak_mib(impl: str, B: int, M: int, D: int, k: int, mode: str) -> Optional[float]:
    """Peak extra MiB of one step (after a warm-up step), measured in a fresh Python process; None if unsupported.
    ``mode``: ``"forward"`` or ``"forward+backward"``."""
    cmd = [sys.executable, os.path.abspath(__file__), "peak", impl, str(B), str(M), str(D), str(k), mode]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
    return None if peak is None else round(peak / 2**20, 2)


def _peak_main(argv: Sequence[str]) -> None:
    impl, B, M, D, k, mode = argv[0], *map(int, argv[1:5]), argv[5]
    fixed = fix_malloc_thresholds()
    import torch

    torch.manual_seed(0)
    step = step_fn(impl, B, M, D, k, backward=mode != "forward")
    step()  # warm-up
    peak = peak_extra_bytes(step) if fixed else None
    print(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "peak":
        _peak_main(sys.argv[2:])
    else:
        sys.exit("usage: python bench/benchlib.py peak IMPL B M D K MODE")
