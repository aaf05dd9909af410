"""Peak extra resident memory of one IS-CSE step on the CPU, measured in a fresh process (Linux only).

Writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS, so ``VmHWM - VmRSS_before`` after
a call is the most memory the call added at any moment. For that to follow the tensors the call creates, freed blocks
must leave the process: glibc raises its mmap threshold each time a large block is freed (after a warm-up call,
blocks of that size stay resident and would be missed), and fixing the threshold with ``mallopt`` turns that off.
Fixing it also slows large allocations, so the timings run with the default allocator and the memory is measured
here, in a subprocess: ``python bench/cpu_memory.py IMPL B M D K MODE`` prints the peak in bytes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import re
import subprocess
import sys
from typing import Callable, Optional

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1


def fix_malloc_thresholds() -> bool:
    """Make glibc mmap (and return on free) every block of 64 KiB or more; False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError, TypeError):
        return False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Run ``fn()`` once and return the peak resident memory it added, in bytes (None where unsupported)."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    out = fn()
    peak = _status_bytes("VmHWM") - before
    del out
    return max(peak, 0)


def step_peak_mib(impl: str, B: int, M: int, D: int, k: int, mode: str) -> Optional[float]:
    """Peak extra MiB of one step (after a warm-up step), measured in a fresh Python process; None if unsupported."""
    cmd = [sys.executable, os.path.abspath(__file__), impl, str(B), str(M), str(D), str(k), mode]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
    return None if peak is None else round(peak / 2**20, 2)


def main(argv) -> None:
    impl, B, M, D, k, mode = argv[0], *map(int, argv[1:5]), argv[5]
    fixed = fix_malloc_thresholds()
    import torch

    from test_bench_cpu import step_fn

    torch.manual_seed(0)
    step = step_fn(impl, B, M, D, k, backward=mode != "forward")
    step()  # warm-up
    peak = peak_extra_bytes(step) if fixed else None
    print(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    main(sys.argv[1:])
