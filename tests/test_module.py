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
                           backend=backend, buffer_dtype=torch.float64)
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
    """A callable gets the step as a 0-dim int64 tensor (the live counter's value) and may return a number or a
    tensor; the loss uses what it returns."""
    seen = []

    def alpha(step):
        seen.append((step.dtype, step.shape, int(step)))
        return 0.1 * (step + 1).double() if int(step) % 2 else 0.25

    crit = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=alpha, buffer_dtype=torch.float64)
    for i in range(4):
        z1, z2 = _views(4, 8)
        loss = crit(z1, z2)
        expected = 0.1 * (i + 1) if i % 2 else 0.25
        l_cl, l_s = crit.last_components
        assert loss.item() == pytest.approx(l_cl.item() + expected * l_s.item(), rel=1e-12)
    assert seen == [(torch.int64, torch.Size([]), i) for i in range(4)]


def test_alpha_callable_errors_leave_the_state():
    crit = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=lambda step: -1.0)
    with pytest.raises(ValueError, match="alpha"):
        crit(*_views(4, 8, torch.float32))
    crit.alpha = lambda step: torch.ones(2)
    with pytest.raises(TypeError, match="alpha"):
        crit(*_views(4, 8, torch.float32))
    crit.alpha = lambda step: torch.tensor(1)
    with pytest.raises(TypeError, match="alpha"):
        crit(*_views(4, 8, torch.float32))
    assert crit.step == 0 and crit.buffer.written == 0


def test_cosine_schedule_in_the_module_matches_the_formula():
    """The module evaluates the cosine schedule on the step tensor; equal to the float formula at every step."""
    T = 9
    sched = iscse.alpha_schedule("cosine", start=0.005, end=0.05, total_steps=T)
    crit = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=sched, buffer_dtype=torch.float64)
    for t in range(T + 2):
        assert crit.current_alpha() == pytest.approx(sched(t), rel=1e-14, abs=0)
        z1, z2 = _views(4, 8)
        loss = crit(z1, z2)
        l_cl, l_s = crit.last_components
        assert loss.item() == pytest.approx(l_cl.item() + sched(t) * l_s.item(), rel=1e-12)
        assert isinstance(sched(torch.tensor(t)), torch.Tensor)
        as_tensor = crit.current_alpha(as_tensor=True)
        assert as_tensor.shape == () and as_tensor.item() == pytest.approx(sched(t + 1), rel=1e-14)
    assert iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=0.3).current_alpha(as_tensor=True).item() == 0.3


def test_state_dict_round_trip_and_next_step_equal():
    """Buffer, step and the alpha schedule survive torch.save / load_state_dict (weights_only load)."""
    D, M, T = 12, 30, 20
    sched = iscse.alpha_schedule("cosine", start=0.01, end=0.2, total_steps=T)
    crit = iscse.ISCSELoss(D, buffer_size=M, k=4, alpha=sched, buffer_dtype=torch.float64)
    for _ in range(9):
        crit(*_views(4, D))
    blob = io.BytesIO()
    torch.save(crit.state_dict(), blob)
    blob.seek(0)
    other = iscse.ISCSELoss(D, buffer_size=M, k=4, buffer_dtype=torch.float64)  # constant alpha until loaded
    other.load_state_dict(torch.load(blob, weights_only=True))
    assert other.step == crit.step == 9 and torch.equal(other.buffer.rows(), crit.buffer.rows())
    assert other.alpha == sched and other.current_alpha() == crit.current_alpha() == pytest.approx(sched(9))
    for _ in range(3):
        z1, z2 = _views(4, D)
        assert crit(z1, z2).item() == other(z1, z2).item()
    assert (other.step, other.buffer.ptr, other.buffer.written) == (crit.step, crit.buffer.ptr, crit.buffer.written)


def test_constant_alpha_and_custom_callables_in_the_state():
    crit = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=0.3)
    custom = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=lambda step: 0.7)
    assert crit.state_dict()["_extra_state"]["alpha"] == {"kind": "constant", "value": 0.3}
    other = iscse.ISCSELoss(8, buffer_size=8, k=3, alpha=0.1)
    other.load_state_dict(crit.state_dict())
    assert other.alpha == 0.3
    # A callable cannot be saved: None in the state, and loading keeps the module's own alpha.
    assert custom.state_dict()["_extra_state"]["alpha"] is None
    other.load_state_dict(custom.state_dict())
    assert other.alpha == 0.3
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict({"_extra_state": {**crit.state_dict()["_extra_state"], "alpha": {"kind": "linear"}}})
    with pytest.raises(ValueError, match="step"):
        other.load_state_dict({"_extra_state": {**crit.state_dict()["_extra_state"], "step": -1}})


def test_a_state_must_be_complete():
    """A state is what state_dict() saves, whole: a partial one (as a hand-built dict) is refused, naming what is
    missing, before anything changes."""
    D, M = 8, 12
    rows = torch.randn(M, D)
    partial = {"_extra_state": {"buffer": {"storage": rows, "ptr": 5, "written": 17, "last_push": 4}, "step": 4}}
    crit = iscse.ISCSELoss(D, buffer_size=M, k=3, alpha=0.2)
    with pytest.raises(ValueError, match=r"missing \['aggregation', 'alpha', 'auto_decisions', 'grouping'\]"):
        crit.load_state_dict(partial)
    state = crit.state_dict()["_extra_state"]
    del state["buffer"]["last_push"]
    with pytest.raises(ValueError, match="last_push"):
        crit.load_state_dict({"_extra_state": state})
    assert crit.step == 0 and crit.buffer.written == 0


def test_dtype_casts_keep_the_buffer_dtype_and_device_moves_move_it():
    crit = iscse.ISCSELoss(8, buffer_size=16, k=2)
    assert crit.buffer.dtype == torch.float32
    for cast in (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float(),
                 lambda m: m.to("cpu", torch.float64)):
        cast(crit)
        assert crit.buffer_dtype == torch.float32 and crit.buffer.dtype == torch.float32
        assert crit.step_tensor.dtype == torch.int64 and crit.buffer.ptr_tensor.dtype == torch.int64
    crit.buffer_dtype = torch.bfloat16
    assert crit.buffer.dtype == torch.bfloat16 and crit.buffer.storage.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        crit.buffer_dtype = torch.int32
    crit.to("meta")
    assert crit.buffer.device.type == "meta" and crit.buffer.ptr_tensor.device.type == "meta"
    assert crit.step_tensor.device.type == "meta" and crit.buffer.dtype == torch.bfloat16


def test_a_model_holding_the_criterion_keeps_its_buffer_dtype():
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8), "loss": iscse.ISCSELoss(8, buffer_size=16, k=2)})
    model.to(torch.bfloat16)
    assert model["proj"].weight.dtype == torch.bfloat16 and model["loss"].buffer.dtype == torch.float32
    z = torch.randn(4, 8, dtype=torch.bfloat16)
    loss = model["loss"](model["proj"](z), model["proj"](z))
    assert loss.dtype == torch.float32 and model["loss"].buffer.written == 4


def _trained(D=8, M=12, B=4, steps=4):
    crit = iscse.ISCSELoss(D, buffer_size=M, k=3, buffer_dtype=torch.float64)
    for _ in range(steps):
        crit(*_views(B, D))
    return crit


def _state(crit):
    return crit.buffer.storage.clone(), crit.buffer.ptr, crit.buffer.written, crit.step


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode", "update=False"])
def test_evaluation_calls_do_not_update(mode):
    """Eval mode, no_grad, inference_mode and update=False compute the loss without pushing or stepping; the
    neighbours are the k nearest of all current rows (nothing excluded) and L_s is on once the buffer is full."""
    crit = _trained()
    assert crit.buffer.full
    before = _state(crit)
    z1, z2 = _views(4, 8)
    if mode == "eval":
        loss = crit.eval()(z1, z2)
    elif mode == "no_grad":
        with torch.no_grad():
            loss = crit(z1, z2)
    elif mode == "inference_mode":
        with torch.inference_mode():
            loss = crit(z1, z2)
    else:
        loss = crit(z1, z2, update=False)
    assert _same(_state(crit), before)
    # The same loss from the pieces: no self slot to exclude.
    buf = crit.buffer
    q2 = torch.nn.functional.normalize(z2.detach(), dim=1)
    vals, idx = iscse.knn_topk(q2, buf, 3, self_slots=None)
    expected = iscse.info_nce(z1, z2) + 0.1 * iscse.info_nce(z1, iscse.smooth(q2, buf, idx, vals))
    assert_rel_close(loss, expected, 1e-12, "eval loss")


def test_evaluation_before_the_buffer_is_full_has_no_smoothing():
    crit = _trained(steps=2)
    assert not crit.buffer.full
    z1, z2 = _views(4, 8)
    loss = crit(z1, z2, update=False)
    assert crit.last_components[1].item() == 0.0
    assert_rel_close(loss, iscse.info_nce(z1, z2), 1e-12, "loss")


def test_update_can_be_forced_either_way():
    crit = _trained()
    before = _state(crit)
    crit(*_views(4, 8), update=False)  # training mode, grad enabled, but told not to update
    assert _same(_state(crit), before)
    crit.eval()
    with torch.no_grad():
        crit(*_views(4, 8), update=True)  # eval mode and no_grad, but told to update
    after = _state(crit)
    assert after[3] == before[3] + 1 and after[2] == before[2] + 4
    with pytest.raises(TypeError, match="update"):
        crit(*_views(4, 8), update=1)


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


def test_readme_plain_loop():
    """The README's plain PyTorch loop (bf16 autocast, torch.compile, gradient accumulation) on CPU: one graph, no
    break, the same losses as eagerly, and the step counting micro-batches; ``step // ACCUM`` schedules alpha in
    optimizer steps. (Dynamo's "eager" backend: the graph capture is what is tested, not Inductor's code.)"""
    ACCUM, T, B, D = 2, 5, 8, 16
    sched = iscse.alpha_schedule("cosine", total_steps=T)

    def run(compiled):
        torch.manual_seed(0)
        encoder = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Dropout(0.1))
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
        criterion = iscse.ISCSELoss(dim=D, buffer_size=32, k=4, backend="torch",
                                    alpha=lambda step: sched(step // ACCUM))

        def forward(batch):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                z1, z2 = encoder(batch), encoder(batch)
            return criterion(z1.float(), z2.float()) / ACCUM

        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(forward, fullgraph=True, backend="eager")
        losses, alphas = [], []
        gen = torch.Generator().manual_seed(1)
        for i in range(2 * T * ACCUM // 2):
            alphas.append(float(criterion.current_alpha()))
            loss = forward(torch.randn(B, D, generator=gen))
            loss.backward()
            losses.append(loss.detach())
            if (i + 1) % ACCUM == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses), alphas, criterion

    eager, alphas, crit = run(False)
    compiled, _, crit_c = run(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert crit.step == crit_c.step == T * ACCUM  # micro-batches
    assert alphas == pytest.approx([sched(i // ACCUM) for i in range(T * ACCUM)])
    assert crit.buffer.full and crit_c.last_components[1] > 0
