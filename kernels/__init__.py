"""Triton kernels and their host launchers for IS-CSE (installed as ``iscse.kernels``).

Each module holds one op: the ``@triton.jit`` kernel(s) and a host launcher that checks shapes, allocates outputs
and launches with a grid. Nothing here is imported by ``iscse`` unless the Triton backend is asked for, so the
library works without Triton installed.

Modules: :mod:`~iscse.kernels.knn_topk` (chunked top-k over the buffer + candidate merge),
:mod:`~iscse.kernels.smooth` (merge + gather + attention aggregation; the smooth / fused-loss backward) and
:mod:`~iscse.kernels.info_nce` (dual InfoNCE with its gradients: a row pass and a column pass, each split over
programs, and a merge). They run compiled on CUDA tensors, or in Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` was set before ``triton`` was first imported (Triton decides at import time).
``python bench/gpu_bench.py --compile-only`` builds every specialisation for sm_90 without a GPU.
"""
