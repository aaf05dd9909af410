"""Triton kernels and their host launchers for IS-CSE (installed as ``iscse.kernels``).

Each op module holds one op, under one name through every layer (kernel, launcher, autograd Function in
:mod:`iscse.backends.triton_fused`, functional, module): its ``@triton.jit`` kernel(s) and host launchers that check
shapes, allocate outputs and launch with a grid. Nothing here is imported by ``iscse`` unless the Triton backend is
asked for, so the library works without Triton installed.

Modules:

- :mod:`~iscse.kernels.knn_topk`: chunked top-k over the buffer + candidate merge (``knn_topk``,
  ``knn_topk_candidates``, ``knn_config``);
- :mod:`~iscse.kernels.smooth`: merge + gather + attention aggregation and its backward (``smooth_forward``,
  ``smooth_backward``; the softmax-backward device helpers the fused loss reuses);
- :mod:`~iscse.kernels.info_nce`: dual InfoNCE with its gradients: a row pass and a column pass, each split over
  programs, then a gradients kernel that merges the splits (and on the fused path runs the smooth backward)
  (``info_nce_forward``, ``info_nce_passes``, ``info_nce_grads``, ``info_nce_config``);
- :mod:`~iscse.kernels.iscse_loss`: the fused IS-CSE loss: forward (the ops above in a row) and backward, with the
  gradients made in backward from what the forward held, or in forward where that would be large
  (``iscse_loss_forward``, ``iscse_loss_backward``, ``hold_for_backward``);
- :mod:`~iscse.kernels._common`: shared helpers only (``k_pad``, ``fp32_dot_precision``, ``merge_block``,
  ``row_block_d``, ``num_sms``; the device function ``merge_topk``).

The launchers launch on the current CUDA device and stream, as Triton does: a caller with tensors on another device
makes theirs current first (:mod:`iscse.backends.triton_fused` does, for every op). They run compiled on CUDA
tensors, or in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` was set before ``triton`` was first
imported (Triton decides at import time).
``python bench/gpu_bench.py --compile-only`` builds every specialisation for sm_90 without a GPU.
"""
