"""The torch backend (and the reference backend behind the functional API) against the paper's code, in float64."""
import pytest
import torch

import iscse
from iscse import reference as R
from iscse.backends import pytorch as torch_ops

from conftest import assert_rel_close

F64 = torch.float64

# (B, M, D, k, steps): at least 20 cases; odd shapes on purpose.
CASES = [
    (1, 24, 13, 4, 30),      # B = 1 (the reference's .squeeze() broke here)
    (1, 17, 384, 16, 20),
    (4, 20, 13, 16, 6),      # M = B + k
    (64, 128, 768, 16, 3),   # the paper's B, D, k
    (64, 1024, 768, 16, 17),  # the paper's setting, through the fill and past it
    (7, 30, 13, 1, 6),       # k = 1; B does not divide M
    (5, 101, 1024, 64, 21),  # k = 64, D = 1024
    (3, 67, 384, 64, 23),    # M = B + k
    (33, 100, 768, 7, 5),
    (9, 50, 13, 5, 7),
    (16, 48, 96, 8, 4),      # B divides M: the write pointer wraps exactly
    (2, 9, 1024, 1, 6),
    (10, 25, 384, 3, 5),
    (6, 6 + 64, 13, 64, 13),  # M = B + k with k = 64
    (32, 96, 768, 16, 4),
    (11, 60, 1024, 12, 7),
    (1, 2, 13, 1, 3),        # the smallest buffer
    (8, 8, 13, 7, 3),        # B = M: every row is the current batch
    (13, 40, 384, 20, 5),
    (20, 45, 96, 24, 4),
    (3, 1000, 13, 64, 334),  # many steps, many wraps
]


def _rand(B, D, scale=1.0):
    return (scale * torch.randn(B, D, dtype=F64)).requires_grad_(True)


@pytest.mark.parametrize("B,M,D,k,steps", CASES)
def test_torch_backend_matches_reference(B, M, D, k, steps):
    buf = iscse.MemoryBuffer(M, D, dtype=F64)
    lbuf = R.new_buffer(M, D, dtype=F64)
    for step in range(steps):
        z1, z2 = _rand(B, D, 3.0), _rand(B, D, 0.5)
        grad_out = torch.rand((), dtype=F64) + 0.5  # non-unit upstream gradient
        out = iscse.iscse_loss(z1, z2, buf, k=k, alpha=0.3, backend="torch", return_components=True)
        ref = R.iscse_step(z1, z2, lbuf, k=k, alpha=0.3)
        lbuf = ref.lbuf
        g = torch.autograd.grad(out.loss * grad_out, (z1, z2))
        r = torch.autograd.grad(ref.loss * grad_out, (z1, z2))
        assert_rel_close(out.loss, ref.loss, 1e-10, f"loss at step {step}")
        assert_rel_close(out.contrastive, ref.contrastive, 1e-10, f"L_cl at step {step}")
        assert_rel_close(out.smooth, ref.smooth, 1e-10, f"L_s at step {step}")
        assert_rel_close(g[0], r[0], 1e-10, f"grad z1 at step {step}")
        assert_rel_close(g[1], r[1], 1e-10, f"grad z2 at step {step}")
        assert torch.equal(buf.rows(), lbuf), f"buffer contents differ at step {step}"
        assert buf.full == bool(lbuf[0].norm() > 0)
    assert buf.full == (steps * B >= M)


@pytest.mark.parametrize("B,M,D,k,steps", CASES[:8])
def test_reference_backend_matches_reference(B, M, D, k, steps):
    buf = iscse.MemoryBuffer(M, D, dtype=F64)
    lbuf = R.new_buffer(M, D, dtype=F64)
    for _ in range(steps):
        z1, z2 = _rand(B, D), _rand(B, D)
        out = iscse.iscse_loss(z1, z2, buf, k=k, backend="reference")
        ref = R.iscse_step(z1, z2, lbuf, k=k)
        lbuf = ref.lbuf
        assert_rel_close(out, ref.loss, 1e-12, "loss")
        assert_rel_close(torch.autograd.grad(out, z2)[0], torch.autograd.grad(ref.loss, z2)[0], 1e-12, "grad z2")


def _full_buffer(M, D, B, dtype=F64):
    buf = iscse.MemoryBuffer(M, D, dtype=dtype)
    for _ in range(-(-M // B)):
        buf.push(torch.nn.functional.normalize(torch.randn(B, D, dtype=dtype), dim=1))
    return buf


@pytest.mark.parametrize("B,M,D,k,chunk", [(5, 1000, 13, 16, 64), (64, 4099, 96, 64, 1024), (1, 300, 384, 1, 7),
                                           (3, 50, 13, 47, 10)])
def test_chunked_knn_matches_argsort(B, M, D, k, chunk):
    buf = _full_buffer(M, D, B)
    q = buf.storage[buf.last_slots()]
    vals, idx = torch_ops.knn_topk(q, buf.storage, k, buf.last_slots(), chunk_size=chunk)
    rvals, ridx = iscse.knn_topk(q, buf, k, backend="reference")
    assert torch.equal(idx, ridx)
    assert_rel_close(vals, rvals, 1e-13, "vals")
    assert not (idx == buf.last_slots()[:, None]).any(), "a query's own slot was returned"
    # Values are the true dot products, sorted in descending order.
    assert_rel_close(vals, torch.einsum("bd,bkd->bk", q, buf.storage[idx]), 1e-13, "vals vs rows")
    assert (vals[:, :-1] >= vals[:, 1:]).all()


def test_knn_excludes_self_slot_even_when_not_ranked_first():
    # A duplicate of the query elsewhere in the buffer ties with it at 1.0: the self *slot* is what is excluded.
    D = 8
    buf = iscse.MemoryBuffer(10, D, dtype=F64)
    rows = torch.nn.functional.normalize(torch.randn(10, D, dtype=F64), dim=1)
    buf.push(rows[:9])
    q = rows[9:].clone()
    buf.storage[0] = q[0]  # a duplicate of the next query, in another slot
    buf.push(q)
    vals, idx = iscse.knn_topk(q, buf, 3, backend="torch")
    assert idx[0, 0].item() == 0 and vals[0, 0].item() == pytest.approx(1.0)
    assert 9 not in idx[0].tolist()


def test_knn_self_slots_none_and_explicit():
    buf = _full_buffer(40, 13, 4)
    q = buf.storage[buf.last_slots()]
    _, idx_all = iscse.knn_topk(q, buf, 1, self_slots=None)
    assert torch.equal(idx_all[:, 0], buf.last_slots())  # each query finds itself first
    _, idx_plain = iscse.knn_topk(q, buf.storage, 5, self_slots=buf.last_slots())
    _, idx_last = iscse.knn_topk(q, buf, 5)
    assert torch.equal(idx_plain, idx_last)


@pytest.mark.parametrize("B,k,D", [(1, 1, 13), (6, 9, 96), (33, 64, 768)])
def test_smooth_and_info_nce_match_reference_pieces(B, k, D):
    buf = _full_buffer(200, D, B)
    q = torch.nn.functional.normalize(torch.randn(B, D, dtype=F64), dim=1).requires_grad_(True)
    vals, idx = iscse.knn_topk(q, buf, k, self_slots=None)
    zs = iscse.smooth(q, buf, idx, vals)
    ref = R.aggregate(q, buf.storage, idx)
    assert_rel_close(zs, ref, 1e-12, "z*")
    g = torch.randn(B, D, dtype=F64)
    assert_rel_close(torch.autograd.grad(zs, q, g)[0], torch.autograd.grad(ref, q, g)[0], 1e-12, "grad q")
    a, b = torch.randn(B, D, dtype=F64, requires_grad=True), torch.randn(B, D, dtype=F64, requires_grad=True)
    ours, theirs = iscse.info_nce(a, b, 0.07), R.cos_sim_ce(a, b, 0.07)
    assert_rel_close(ours, theirs, 1e-12, "info_nce")
    for x, y in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(theirs, (a, b))):
        assert_rel_close(x, y, 1e-12, "info_nce grad")


@pytest.mark.parametrize("dtype,buffer_dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                     (torch.bfloat16, torch.float32, 3e-2),
                                                     (torch.float16, torch.float32, 5e-3),
                                                     (torch.bfloat16, torch.bfloat16, 3e-2),
                                                     (torch.float32, torch.float16, 5e-3)])
def test_low_precision_close_to_float64(dtype, buffer_dtype, tol):
    B, M, D, k = 16, 64, 96, 8
    low = iscse.MemoryBuffer(M, D, dtype=buffer_dtype)
    exact = iscse.MemoryBuffer(M, D, dtype=F64)
    for step in range(6):
        z1, z2 = torch.randn(B, D).to(dtype), torch.randn(B, D).to(dtype)
        z1.requires_grad_(True)
        out = iscse.iscse_loss(z1, z2, low, k=k, backend="torch")
        assert out.dtype == torch.float32
        # The float64 run sees the same (rounded) inputs and, to isolate the ops' error, the same buffer.
        exact.load_state_dict({**low.state_dict(), "storage": low.storage.double()})
        exact.ptr, exact.written = (low.ptr - B) % M, low.written - B
        ref = iscse.iscse_loss(z1.detach().double().requires_grad_(True), z2.double(), exact, k=k, backend="torch")
        assert_rel_close(out, ref, tol, f"loss at step {step}")
        (grad,) = torch.autograd.grad(out, z1)
        assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
