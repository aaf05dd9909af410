"""ISCSELoss: equals the functional API, owns and saves its buffer, follows the alpha schedule."""
import io
import math

import pytest
import torch

import iscse

from conftest import assert_rel_close


def _views(B, D, dtype=torch.float64):
    return torch.randn(B, D, dtype=dtype, requires_grad=True), torch.randn(B, D, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_module_equals_functional(backend):
    B, D, M, k = 6, 13, 20, 5
    crit = iscse.ISCSELoss(D, buffer_size=M, k=k, temperature=0.07, attn_temperature=1.5, alpha=0.2,
                           backend=backend).double()
    buf = iscse.MemoryBuffer(M, D, dtype=torch.float64)
    for _ in range(6):
        z1, z2 = _views(B, D)
        loss = crit(z1, z2)
        out = iscse.iscse_loss(z1, z2, buf, k=k, temperature=0.07, attn_temperature=1.5, alpha=0.2,
                               backend=backend, return_components=True)
        assert_rel_close(loss, out.loss, 0.0, "loss")
        assert_rel_close(crit.last_components[0], out.contrastive, 0.0, "L_cl")
        assert_rel_close(crit.last_components[1], out.smooth, 0.0, "L_s")
        for a, b in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(out.loss, (z1, z2))):
            assert_rel_close(a, b, 0.0, "grad")
        assert torch.equal(crit.buffer.storage, buf.storage)
    assert crit.step == 6 and crit.buffer.full


def test_components_are_the_loss_parts():
    crit = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=0.25).double()
    for _ in range(3):
        loss = crit(*_views(4, 8))
    l_cl, l_s = crit.last_components
    assert l_s.item() > 0 and loss.item() == pytest.approx(l_cl.item() + 0.25 * l_s.item(), rel=1e-12)


def test_alpha_callable_sees_the_step():
    seen = []
    crit = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=lambda step: seen.append(step) or 0.1).double()
    for _ in range(3):
        crit(*_views(4, 8))
    assert seen == [0, 1, 2]


def test_state_dict_round_trip_and_next_step_equal():
    D, M = 12, 30
    crit = iscse.ISCSELoss(D, buffer_size=M, k=4).double()
    for _ in range(9):
        crit(*_views(4, D))
    blob = io.BytesIO()
    torch.save(crit.state_dict(), blob)
    blob.seek(0)
    other = iscse.ISCSELoss(D, buffer_size=M, k=4).double()
    other.load_state_dict(torch.load(blob))
    assert other.step == crit.step and torch.equal(other.buffer.rows(), crit.buffer.rows())
    z1, z2 = _views(4, D)
    assert crit(z1, z2).item() == other(z1, z2).item()


def test_to_moves_and_casts_the_buffer():
    crit = iscse.ISCSELoss(8, buffer_size=16, k=2)
    assert crit.buffer.dtype == torch.float32
    crit.double()
    assert crit.buffer.dtype == torch.float64
    crit.to("cpu", torch.float32)
    assert crit.buffer.dtype == torch.float32 and crit.buffer.device.type == "cpu"
    crit.to("meta")
    assert crit.buffer.device.type == "meta"


@pytest.mark.parametrize("kwargs,err", [
    (dict(k=0), ValueError), (dict(k=16, buffer_size=16), ValueError), (dict(temperature=0), ValueError),
    (dict(attn_temperature=-1.0), ValueError), (dict(alpha=-0.1), ValueError), (dict(alpha="0.1"), TypeError),
    (dict(backend="cuda"), ValueError), (dict(knn_backend="annoy"), ValueError), (dict(k=2.5), TypeError)])
def test_bad_hyperparameters(kwargs, err):
    with pytest.raises(err):
        iscse.ISCSELoss(8, **{"buffer_size": 32, **kwargs})


@pytest.mark.parametrize("T", [1, 7, 100, 1000])
def test_cosine_schedule_equals_formula(T):
    sched = iscse.alpha_schedule("cosine", start=0.005, end=0.05, total_steps=T)
    for t in range(T + 1):
        expected = min(0.05, math.cos(math.pi * t / T) * (0.005 - 0.05) + 0.05)
        assert sched(t) == pytest.approx(expected, abs=0, rel=1e-15)
    assert sched(0) == pytest.approx(0.005) and sched(T) == 0.05 and sched(T // 2 + 1) == 0.05


def test_constant_schedule_and_errors():
    assert iscse.alpha_schedule("constant", value=0.1)(12345) == 0.1
    with pytest.raises(ValueError, match="kind"):
        iscse.alpha_schedule("linear")
    with pytest.raises(ValueError, match="total_steps"):
        iscse.alpha_schedule("cosine")
    with pytest.raises(ValueError, match="alpha"):
        iscse.alpha_schedule("constant", value=-1.0)
