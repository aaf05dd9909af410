"""Triton kernels and their host launchers for IS-CSE (installed as ``iscse.kernels``).

Each module holds one op: the ``@triton.jit`` kernel(s) and a host launcher that checks shapes, allocates outputs
and launches with a grid. Nothing here is imported by ``iscse`` unless the Triton backend is asked for, so the
library works without Triton installed.
"""
