"""Bad input raises ValueError/TypeError naming the argument, and leaves the buffer exactly as it was."""
import pytest
import torch

import iscse
from iscse import backends
from iscse.backends.pytorch import TorchBackend

B, D, M = 4, 8, 32


@pytest.fixture
def buf():
    b = iscse.MemoryBuffer(M, D)
    for _ in range(9):  # full and wrapped
        b.push(torch.nn.functional.normalize(torch.randn(B, D), dim=1))
    return b


def _snapshot(b):
    return b.storage.clone(), b.ptr, b.written, b.last_push, b.known_full


def _bad(value, row=0):
    z = torch.randn(B, D)
    z[row, 1] = value
    return z


ok = lambda: torch.randn(B, D)  # noqa: E731

BAD_CALLS = [
    ("mismatched shapes", lambda: (ok(), torch.randn(B + 1, D)), {}, ValueError, "same shape"),
    ("1-D input", lambda: (torch.randn(D), torch.randn(D)), {}, ValueError, "z1 must be 2-D"),
    ("3-D input", lambda: (torch.randn(2, B, D), torch.randn(2, B, D)), {}, ValueError, "z1 must be 2-D"),
    ("D differs from the buffer's", lambda: (torch.randn(B, D + 1), torch.randn(B, D + 1)), {}, ValueError,
     "buffer's dim"),
    ("k too large", lambda: (ok(), ok()), {"k": M}, ValueError, f"k={M} is larger"),
    ("k zero", lambda: (ok(), ok()), {"k": 0}, ValueError, "k must be >= 1"),
    ("k not an int", lambda: (ok(), ok()), {"k": 2.0}, TypeError, "k must be an int"),
    ("B larger than the buffer", lambda: (torch.randn(M + 1, D), torch.randn(M + 1, D)), {}, ValueError,
     "larger than the buffer size"),
    ("integer dtype", lambda: (torch.ones(B, D, dtype=torch.int64), torch.ones(B, D, dtype=torch.int64)), {},
     TypeError, "z1 must be float32"),
    ("NaN in z1", lambda: (_bad(float("nan")), ok()), {}, ValueError, "z1 contains NaN or inf"),
    ("inf in z2", lambda: (ok(), _bad(float("inf"), 3)), {}, ValueError, "z2 contains NaN or inf"),
    ("z1, z2 on different devices", lambda: (ok(), torch.randn(B, D, device="meta")), {}, ValueError,
     "same device"),
    ("inputs on another device than the buffer", lambda: (torch.randn(B, D, device="meta"),) * 2, {}, ValueError,
     "buffer is on"),
    ("unknown backend", lambda: (ok(), ok()), {"backend": "cuda"}, ValueError, "unknown backend"),
    ("backend not a str", lambda: (ok(), ok()), {"backend": 3}, TypeError, "backend must be a str"),
    ("unknown knn backend", lambda: (ok(), ok()), {"knn_backend": "annoy"}, ValueError, "unknown backend"),
    ("zero temperature", lambda: (ok(), ok()), {"temperature": 0.0}, ValueError, "temperature"),
    ("negative attn temperature", lambda: (ok(), ok()), {"attn_temperature": -2.0}, ValueError, "attn_temperature"),
    ("nan temperature", lambda: (ok(), ok()), {"temperature": float("nan")}, ValueError, "temperature"),
    ("negative alpha", lambda: (ok(), ok()), {"alpha": -1.0}, ValueError, "alpha"),
    ("list input", lambda: ([[0.0] * D] * B, ok()), {}, TypeError, "z1 must be a torch.Tensor"),
]


@pytest.mark.parametrize("what,make,kwargs,err,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_iscse_loss_rejects_and_keeps_buffer(buf, what, make, kwargs, err, match):
    before = _snapshot(buf)
    z1, z2 = make()
    with pytest.raises(err, match=match):
        iscse.iscse_loss(z1, z2, buf, **kwargs)
    after = _snapshot(buf)
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:], f"{what}: the buffer changed"


INPUT_ERRORS = [c for c in BAD_CALLS if not c[2]]  # hyperparameters are the constructor's (test_module.py)


@pytest.mark.parametrize("what,make,kwargs,err,match", INPUT_ERRORS, ids=[c[0] for c in INPUT_ERRORS])
def test_module_rejects_and_keeps_buffer(what, make, kwargs, err, match):
    crit = iscse.ISCSELoss(D, buffer_size=M, k=3)
    for _ in range(5):
        crit(torch.randn(B, D), torch.randn(B, D))
    before = _snapshot(crit.buffer), crit.step
    z1, z2 = make()
    with pytest.raises(err, match=match):
        crit(z1, z2)
    after = _snapshot(crit.buffer), crit.step
    assert torch.equal(after[0][0], before[0][0]) and after[0][1:] == before[0][1:] and after[1] == before[1]


def test_buffer_argument_type():
    with pytest.raises(TypeError, match="buffer must be an iscse.MemoryBuffer"):
        iscse.iscse_loss(ok(), ok(), torch.zeros(M, D))


def test_knn_topk_errors(buf):
    q = torch.randn(B, D)
    with pytest.raises(ValueError, match=f"k={M} is larger"):
        iscse.knn_topk(q, buf, M)
    with pytest.raises(ValueError, match="last push had"):
        iscse.knn_topk(torch.randn(B + 1, D), buf, 2)
    with pytest.raises(ValueError, match="needs a MemoryBuffer"):
        iscse.knn_topk(q, buf.storage, 2)
    with pytest.raises(ValueError, match="buffer must be a MemoryBuffer or a 2-D"):
        iscse.knn_topk(q, buf.storage[0], 2, self_slots=None)
    with pytest.raises(ValueError, match="q has dim"):
        iscse.knn_topk(torch.randn(B, D + 1), buf, 2)
    with pytest.raises(TypeError, match="self_slots must be"):
        iscse.knn_topk(q, buf, 2, self_slots=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="unknown backend"):
        iscse.knn_topk(q, buf, 2, backend="numpy")
    # k = M is allowed once nothing is excluded
    assert iscse.knn_topk(q, buf, M, self_slots=None)[1].shape == (B, M)


def test_smooth_and_info_nce_errors(buf):
    q = torch.randn(B, D)
    vals, idx = iscse.knn_topk(q, buf, 3, self_slots=None)
    with pytest.raises(TypeError, match="idx must be"):
        iscse.smooth(q, buf, idx.int(), vals)
    with pytest.raises(ValueError, match="idx and vals"):
        iscse.smooth(q, buf, idx, vals[:, :2])
    with pytest.raises(ValueError, match="attn_temperature"):
        iscse.smooth(q, buf, idx, vals, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        iscse.info_nce(q, q, -0.05)
    with pytest.raises(ValueError, match="same shape"):
        iscse.info_nce(q, q[:2])


def test_auto_starts_from_torch_and_unknown_backends_say_so():
    from iscse.backends import check_backend_name, get_backend

    assert get_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="unknown backend 'fast'.*'auto'.*'torch'"):
        check_backend_name("fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        check_backend_name(3)


# ------------------------------------------------------------------------------------- a failed step changes nothing


class _Raising(TorchBackend):
    """A backend whose step fails after the push (as a kernel error or FAISS's NaN check would)."""

    name = "raising"

    def iscse_loss(self, *args, **kwargs):
        raise RuntimeError("kernel failed")

    def info_nce(self, a, b, temperature):
        raise RuntimeError("kernel failed")


@pytest.mark.parametrize("grouping", ["knn", "pddp"])
def test_a_failed_step_leaves_the_buffer_and_the_step_as_they_were(grouping):
    backends.register_backend("raising", _Raising)
    try:
        crit = iscse.ISCSELoss(8, buffer_size=16, k=2, grouping=grouping)
        for _ in range(5):  # 20 rows through a 16-row ring: full, pointer at 4
            crit(torch.randn(4, 8), torch.randn(4, 8))
        before, step = _snapshot(crit.buffer), crit.step
        crit.backend = "raising"
        with pytest.raises(RuntimeError, match="kernel failed"):
            crit(torch.randn(4, 8), torch.randn(4, 8))
        after = _snapshot(crit.buffer)
        assert torch.equal(after[0], before[0]) and after[1:] == before[1:] and crit.step == step
    finally:
        backends.unregister_backend("raising")


def test_faiss_nan_check_after_the_push_leaves_the_buffer_as_it_was():
    pytest.importorskip("faiss")
    buf = iscse.MemoryBuffer(16, 8)
    buf.push(torch.nn.functional.normalize(torch.randn(16, 8), dim=1))
    before = _snapshot(buf)
    z = torch.randn(4, 8)
    z[1, 3] = float("nan")
    with pytest.raises(ValueError):
        iscse.iscse_loss(torch.randn(4, 8), z, buf, k=2, knn_backend="faiss", check_finite=False)
    after = _snapshot(buf)
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]
