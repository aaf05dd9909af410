"""MemoryBuffer: ring semantics equal the reference's cat-shifted buffer; state round trips."""
import io

import pytest
import torch

import iscse
from iscse import reference as R


@pytest.mark.parametrize("M,B", [(10, 3), (12, 4), (7, 7), (5, 1)])
def test_rows_equal_reference_shift(M, B):
    buf, lbuf = iscse.MemoryBuffer(M, 4), R.new_buffer(M, 4)
    storage = buf.storage
    for step in range(3 * M // B + 2):
        q = torch.randn(B, 4)
        buf.push(q)
        lbuf = R.push(lbuf, q)
        assert torch.equal(buf.rows(), lbuf)
        assert buf.written == (step + 1) * B
        assert buf.full == ((step + 1) * B >= M)
        assert torch.equal(buf.storage[buf.last_slots()], q)
        ranks = buf.slots_to_ranks(buf.last_slots())
        assert torch.equal(lbuf[ranks], q) and torch.equal(buf.ranks_to_slots(ranks), buf.last_slots())
    assert buf.storage is storage, "push must not reallocate"


def test_push_detaches_and_casts():
    buf = iscse.MemoryBuffer(4, 3, dtype=torch.bfloat16)
    q = torch.randn(2, 3, requires_grad=True)
    buf.push(q)
    assert buf.storage.dtype == torch.bfloat16 and not buf.storage.requires_grad
    assert torch.equal(buf.storage[:2], q.detach().bfloat16())


def test_state_dict_round_trip_through_torch_save():
    buf = iscse.MemoryBuffer(9, 5)
    for _ in range(4):
        buf.push(torch.randn(2, 5))
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    other = iscse.MemoryBuffer(9, 5)
    other.load_state_dict(torch.load(blob))
    assert torch.equal(other.rows(), buf.rows())
    assert (other.ptr, other.written, other.last_push) == (buf.ptr, buf.written, buf.last_push)
    q = torch.randn(2, 5)
    buf.push(q)
    other.push(q)
    assert torch.equal(other.storage, buf.storage)


def test_load_state_dict_validates_before_changing():
    buf = iscse.MemoryBuffer(6, 3)
    buf.push(torch.randn(2, 3))
    before = buf.storage.clone()
    with pytest.raises(ValueError, match="storage"):
        buf.load_state_dict({"storage": torch.zeros(5, 3), "ptr": 0, "written": 0, "last_push": 0})
    with pytest.raises(ValueError, match="ptr"):
        buf.load_state_dict({"storage": torch.zeros(6, 3), "ptr": 6, "written": 0, "last_push": 0})
    assert torch.equal(buf.storage, before) and buf.ptr == 2


def test_to_and_clear():
    buf = iscse.MemoryBuffer(4, 2)
    buf.push(torch.ones(3, 2))
    buf.to(dtype=torch.float64)
    assert buf.dtype == torch.float64 and buf.storage[0, 0].item() == 1.0
    buf.clear()
    assert buf.written == 0 and not buf.full and buf.storage.abs().sum() == 0


@pytest.mark.parametrize("kwargs,err", [
    (dict(size=1, dim=3), ValueError), (dict(size=4, dim=0), ValueError), (dict(size=4.0, dim=3), ValueError),
    (dict(size=4, dim=3, dtype=torch.int32), TypeError)])
def test_constructor_errors(kwargs, err):
    with pytest.raises(err):
        iscse.MemoryBuffer(**kwargs)


def test_push_errors_leave_buffer_unchanged():
    buf = iscse.MemoryBuffer(4, 3)
    buf.push(torch.randn(2, 3))
    before = (buf.storage.clone(), buf.ptr, buf.written)
    for bad, err in [(torch.randn(5, 3), ValueError), (torch.randn(2, 4), ValueError), (torch.randn(3), ValueError),
                     ([[1.0, 2.0, 3.0]], TypeError), (torch.randn(2, 3, device="meta"), ValueError)]:
        with pytest.raises(err):
            buf.push(bad)
    assert torch.equal(buf.storage, before[0]) and (buf.ptr, buf.written) == before[1:]
