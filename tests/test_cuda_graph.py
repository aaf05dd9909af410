"""CUDA graphs and host synchronisation on a GPU (every test carries the ``gpu`` marker; skipped without CUDA).

The buffer's write pointer and fill count and the criterion's step live in device tensors that a step reads and
advances in place, so one captured step (push + loss + backward) replayed N times must equal N eager steps: the
ring advances, the "full" flag switches smoothing on in the middle of the replays, and the cosine alpha follows the
step. And a default CUDA step makes no host synchronisation at all (``torch.cuda.set_sync_debug_mode("error")``
raises on any). Run with ``python -m pytest -m gpu -q tests/test_cuda_graph.py``.
"""
import pytest
import torch

import iscse

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _backends():
    names = ["torch", "reference"]
    if torch.cuda.is_available():
        try:
            from iscse.backends import triton_fused as triton_ops
        except ImportError:
            return names
        if not triton_ops.INTERPRETED:
            names.append("triton")
    return names


def _criterion(backend, D, M, k, total_steps, **kwargs):
    sched = iscse.alpha_schedule("cosine", start=0.01, end=0.3, total_steps=total_steps)
    return iscse.ISCSELoss(D, buffer_size=M, k=k, backend=backend, alpha=sched, **kwargs).to(DEV)


def _close(name, got, expected, step):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} at replay {step}: {m}")


@pytest.mark.parametrize("backend", _backends())
def test_graph_replays_equal_eager_steps(backend):
    """Capture one training step after 2 warm-up steps, replay it 10 times with new inputs copied into the static
    ones, and compare every replay with an eager criterion fed the same inputs: loss, both components, both input
    gradients, the buffer rows, pointer, fill count and step. The buffer (72 rows, batches of 16) becomes full at
    the 3rd replay and wraps mid-batch afterwards."""
    B, M, D, k, warm, replays = 16, 72, 64, 5, 2, 10
    torch.manual_seed(0)
    inputs = [(torch.randn(B, D, device=DEV), torch.randn(B, D, device=DEV)) for _ in range(warm + replays)]
    eager = _criterion(backend, D, M, k, warm + replays)
    graphed = _criterion(backend, D, M, k, warm + replays)

    def eager_step(x1, x2):
        z1, z2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        loss = eager(z1, z2)
        loss.backward()
        return (loss.detach(), *eager.last_components, z1.grad, z2.grad)

    static1 = torch.zeros(B, D, device=DEV, requires_grad=True)
    static2 = torch.zeros(B, D, device=DEV, requires_grad=True)

    def load(x1, x2):
        with torch.no_grad():
            static1.copy_(x1)
            static2.copy_(x2)

    # Warm-up on a side stream (as torch.cuda.graph requires; it also compiles the kernels): real steps, which the
    # eager criterion takes too.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x1, x2 in inputs[:warm]:
            load(x1, x2)
            static1.grad = static2.grad = None
            graphed(static1, static2).backward()
    torch.cuda.current_stream().wait_stream(side)
    for x1, x2 in inputs[:warm]:
        eager_step(x1, x2)

    static1.grad = static2.grad = None  # allocated from the graph's pool during capture, rewritten by each replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = graphed(static1, static2)
        static_loss.backward()
    static_cl, static_s = graphed.last_components
    # Capture records the kernels without running them: the device state is still the warm-up's.
    assert (graphed.step, graphed.buffer.written, graphed.buffer.ptr) == (warm, warm * B, (warm * B) % M)

    smoothed = []
    for i, (x1, x2) in enumerate(inputs[warm:]):
        load(x1, x2)
        graph.replay()
        loss, l_cl, l_s, g1, g2 = eager_step(x1, x2)
        torch.cuda.synchronize()
        for name, got, expected in (("loss", static_loss, loss), ("L_cl", static_cl, l_cl), ("L_s", static_s, l_s),
                                    ("grad z1", static1.grad, g1), ("grad z2", static2.grad, g2),
                                    ("buffer", graphed.buffer.storage, eager.buffer.storage)):
            _close(name, got, expected, i)
        assert (graphed.step, graphed.buffer.ptr, graphed.buffer.written) == \
            (eager.step, eager.buffer.ptr, eager.buffer.written) == (warm + i + 1, ((warm + i + 1) * B) % M,
                                                                     (warm + i + 1) * B)
        smoothed.append(static_s.item() > 0)
    assert smoothed == [False, False] + [True] * (replays - 2), smoothed


@pytest.mark.parametrize("backend", _backends())
def test_default_cuda_step_makes_no_host_sync(backend):
    """Training steps (forward + backward, filling then full) and an evaluation call under
    ``set_sync_debug_mode("error")``; the opt-in ``check_finite=True`` does sync (which shows the detector works)."""
    B, M, D, k = 8, 40, 32, 4
    crit = _criterion(backend, D, M, k, 10)
    crit(torch.randn(B, D, device=DEV, requires_grad=True), torch.randn(B, D, device=DEV)).backward()  # warm-up
    torch.cuda.synchronize()
    checked = _criterion(backend, D, M, k, 10, check_finite=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(7):
            z1 = torch.randn(B, D, device=DEV, requires_grad=True)
            z2 = torch.randn(B, D, device=DEV, requires_grad=True)
            crit(z1, z2).backward()
            with torch.no_grad():
                crit(z1, z2)
        with pytest.raises(RuntimeError):
            checked(z1, z2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert crit.step == 8 and crit.buffer.full and crit.last_components[1].item() > 0
