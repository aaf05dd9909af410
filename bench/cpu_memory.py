"""Peak extra resident memory of one call on the CPU, from the kernel's high-water mark (Linux only).

Writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS, so ``VmHWM - VmRSS_before`` after
the call is the most memory the call added at any moment. torch's CPU allocator returns large blocks to the OS on
free, so the figure follows the tensors the call created (what the profiler's memory events do not report here).
"""
from __future__ import annotations

import gc
import re
from typing import Callable, Optional


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
