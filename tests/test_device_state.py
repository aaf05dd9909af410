"""Device-side step state: no host read inside a step, the masked smoothing branch, the buffer's device counters.

A step (push + loss + backward) must not read a device value back to the host, so that it can be captured in a CUDA
graph and compiled without graph breaks. On CPU there is no synchronisation to observe, so these tests watch the
dispatcher instead: every host read of a tensor's value (``.item()``, ``bool()``, ``int()``, ``float()``, and ops
whose output shape depends on the data, which sync on CUDA) goes through one of the aten ops listed in
:class:`NoHostReads`, which raises. The checks that are meant to read on CPU only (``check_finite=None``) are turned
off here, as they are on CUDA by default.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import iscse
from iscse import _validation as V
from iscse import reference as R

from conftest import assert_rel_close

F64 = torch.float64

# aten ops that read tensor data on the host (or whose output size depends on it: a sync on CUDA).
_HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2",
               "unique_dim", "unique_consecutive", "repeat_interleave", "allclose"}


class NoHostReads(TorchDispatchMode):
    """Raise on any aten op in ``_HOST_READS`` (forward and autograd backward alike)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _HOST_READS:
            raise AssertionError(f"host read inside a step: {func}")
        return func(*args, **(kwargs or {}))


def test_the_guard_catches_host_reads():
    x = torch.randn(4)
    for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: int(x.argmax()), lambda: x.nonzero()):
        with NoHostReads(), pytest.raises(AssertionError, match="host read"):
            read()


def _backends():
    out = ["torch", "reference"]
    try:
        from iscse.backends import triton_fused as triton_ops
    except ImportError:
        return out
    return out + (["triton"] if triton_ops.INTERPRETED else [])


@pytest.mark.parametrize("backend", _backends())
def test_a_step_makes_no_host_read(backend):
    """Training calls (forward + backward) through the fill and after it, and evaluation calls, with the cosine
    alpha schedule evaluated on the step tensor: no host read anywhere."""
    B, M, D, k = 5, 17, 13, 3
    dtype = torch.float32 if backend == "triton" else F64
    crit = iscse.ISCSELoss(D, buffer_size=M, k=k, backend=backend, check_finite=False, buffer_dtype=dtype,
                           alpha=iscse.alpha_schedule("cosine", total_steps=6))
    for _ in range(6):  # full after step 4
        z1 = torch.randn(B, D, dtype=dtype, requires_grad=True)
        z2 = torch.randn(B, D, dtype=dtype, requires_grad=True)
        with NoHostReads():
            crit.current_alpha(as_tensor=True)
            loss = crit(z1, z2)
            loss.backward()
            with torch.no_grad():
                crit(z1, z2)
    assert crit.step == 6 and crit.buffer.full
    assert torch.isfinite(z1.grad).all() and crit.last_components[1].item() > 0


def test_functional_step_makes_no_host_read():
    buf = iscse.MemoryBuffer(12, 8, dtype=F64)
    for push in (True, True, True, False):
        z1, z2 = torch.randn(4, 8, dtype=F64, requires_grad=True), torch.randn(4, 8, dtype=F64)
        alpha = torch.tensor(0.3, dtype=F64)
        with NoHostReads():
            out = iscse.iscse_loss(z1, z2, buf, k=3, alpha=alpha, check_finite=False, push=push,
                                   return_components=True)
            out.loss.backward()
            buf.rows(), buf.last_slots(), buf.full_tensor  # noqa: B018  (device views, no read)
    assert buf.written == 12


def test_finite_check_default_is_cpu_only():
    cpu, meta = torch.randn(2, 3), torch.randn(2, 3, device="meta")  # meta stands in for a CUDA tensor
    assert V.finite_check_wanted(None, cpu) and not V.finite_check_wanted(None, meta)
    assert V.finite_check_wanted(True, meta) and not V.finite_check_wanted(False, cpu)
    with pytest.raises(TypeError, match="check_finite"):
        V.finite_check_wanted("yes", cpu)
    buf = iscse.MemoryBuffer(8, 3)
    bad = torch.tensor([[float("nan"), 0.0, 1.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="z1 contains NaN"):
        iscse.iscse_loss(bad, cpu, buf, k=2)  # default on CPU: checked
    assert buf.written == 0
    out = iscse.iscse_loss(bad, cpu, buf, k=2, check_finite=False)  # off: NaN propagates, no exception
    assert torch.isnan(out) and buf.written == 2


def test_the_masked_smoothing_branch_contributes_exactly_nothing_before_full():
    """Before the buffer is full L_s is computed on the unwritten (zero) rows and masked with torch.where: the loss
    and both gradients equal L_cl's own, bit for bit, and stay finite even for a zero row of z2 (whose normalised
    query is zero)."""
    B, M, D, k = 4, 40, 13, 5
    buf = iscse.MemoryBuffer(M, D, dtype=F64)
    lbuf = R.new_buffer(M, D, dtype=F64)
    for step in range(M // B + 2):
        z1 = torch.randn(B, D, dtype=F64, requires_grad=True)
        z2 = torch.randn(B, D, dtype=F64)
        if step < 2:
            z2[1] = 0.0  # q2 row of zeros: z* row of zeros while every neighbour is an unwritten row
        z2.requires_grad_(True)
        out = iscse.iscse_loss(z1, z2, buf, k=k, alpha=0.5, backend="torch", return_components=True)
        ref = R.iscse_step(z1, z2, lbuf, k=k, alpha=0.5)
        lbuf = ref.lbuf
        grads = torch.autograd.grad(out.loss, (z1, z2))
        assert all(torch.isfinite(g).all() for g in grads)
        if not buf.full:
            alone = iscse.info_nce(z1, z2, backend="torch")
            assert out.smooth.item() == 0.0 and torch.equal(out.loss, alone)
            for g, h in zip(grads, torch.autograd.grad(alone, (z1, z2))):
                assert torch.equal(g, h)
        assert_rel_close(out.loss, ref.loss, 1e-10, f"loss at step {step}")
        if step >= 2:  # (at a zero row the gradient is an artefact of each normalisation's eps, not comparable)
            for g, h in zip(grads, torch.autograd.grad(ref.loss, (z1, z2))):
                assert_rel_close(g, h, 1e-10, f"grad at step {step}")
    assert buf.full


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_module_matches_reference_through_the_fill(backend):
    """ISCSELoss (device step counter, cosine alpha on it, masked L_s) against the paper's step, float64, through the
    fill and past it, with wrap-around; buffer contents compared every step."""
    B, M, D, k, T = 7, 30, 13, 4, 12
    sched = iscse.alpha_schedule("cosine", start=0.01, end=0.3, total_steps=T)
    crit = iscse.ISCSELoss(D, buffer_size=M, k=k, alpha=sched, backend=backend, buffer_dtype=F64)
    lbuf = R.new_buffer(M, D, dtype=F64)
    for step in range(T):
        z1 = torch.randn(B, D, dtype=F64, requires_grad=True)
        z2 = torch.randn(B, D, dtype=F64, requires_grad=True)
        loss = crit(z1, z2)
        ref = R.iscse_step(z1, z2, lbuf, k=k, alpha=sched(step))
        lbuf = ref.lbuf
        assert_rel_close(loss, ref.loss, 1e-10, f"loss at step {step}")
        for g, h in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref.loss, (z1, z2))):
            assert_rel_close(g, h, 1e-10, f"grad at step {step}")
        assert torch.equal(crit.buffer.rows(), lbuf)
        assert crit.buffer.full == bool(lbuf[0].norm() > 0)
    assert crit.step == T


def test_push_advances_the_same_device_tensors():
    """The pointer and the count are updated in place (a CUDA graph replays their addresses); push returns the
    slots it wrote, which are what last_slots() returns."""
    buf = iscse.MemoryBuffer(7, 3)
    ptr, written, storage = buf.ptr_tensor, buf.written_tensor, buf.storage
    for step in range(5):
        q = torch.randn(3, 3)
        slots = buf.push(q)
        assert buf.ptr_tensor is ptr and buf.written_tensor is written and buf.storage is storage
        assert torch.equal(slots, buf.last_slots()) and torch.equal(buf.storage[slots], q)
        assert ptr.item() == (3 * (step + 1)) % 7 and written.item() == 3 * (step + 1)
        assert bool(buf.full_tensor) == (3 * (step + 1) >= 7)
        assert torch.equal(buf.rows(), torch.roll(buf.storage, -buf.ptr, 0))
    buf.clear()
    assert buf.ptr_tensor is ptr and ptr.item() == 0 and written.item() == 0


def test_buffer_state_validates():
    buf = iscse.MemoryBuffer(6, 2)
    rows = torch.randn(6, 2)
    buf.load_state_dict({"storage": rows, "ptr": 4, "written": 9, "last_push": 2})
    assert (buf.ptr, buf.written, buf.last_push, buf.full, buf.known_full) == (4, 9, 2, True, True)
    assert torch.equal(buf.last_slots(), torch.tensor([2, 3]))
    for bad in ({"ptr": torch.tensor(4)}, {"ptr": "3"}, {"written": -1}, {"last_push": 7}):
        with pytest.raises(ValueError):
            buf.load_state_dict({"storage": rows, "ptr": 0, "written": 0, "last_push": 0, **bad})
    assert (buf.ptr, buf.written, buf.last_push) == (4, 9, 2)
    with pytest.raises(ValueError, match="ptr"):
        buf.ptr = 6
    with pytest.raises(ValueError, match="written"):
        buf.written = -2
