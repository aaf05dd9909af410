"""``torch.compile``: the criterion, and a training step that includes it, trace as one graph (``fullgraph=True``) that
serves every step, while the buffer fills and once it is full (no recompilation on the step, the pointer or the fill
state, which are device tensors).

Graph breaks and recompilations are decided by Dynamo, before any backend compiles, so most tests use the cheap
``"eager"``/``"aot_eager"`` compiler backends (``aot_eager`` also runs AOTAutograd's functionalisation of the
buffer's in-place updates, the part most likely to go wrong); one slow test runs Inductor, the default.
PyTorch's ``torch.optim`` optimizers break the graph in ``step()`` on purpose (torch/optim/optimizer.py), so the
training step here updates its parameters by hand; tracing ``loss.backward()`` needs Dynamo's
``trace_autograd_ops`` (torch >= 2.12), and those tests are skipped without it.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import iscse

B, D, M, K, STEPS = 8, 16, 40, 4, 22  # full after 5 steps, wrapped several times by the end


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _criterion(**kwargs):
    kwargs = {"backend": "torch", "alpha": iscse.alpha_schedule("cosine", total_steps=STEPS), **kwargs}
    return iscse.ISCSELoss(D, buffer_size=M, k=K, **kwargs)


def _trace_backward():
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace loss.backward() in a graph (no torch._dynamo.config.trace_autograd_ops)")
    return torch._dynamo.config.patch(trace_autograd_ops=True)


def test_criterion_is_one_graph_for_every_step():
    """The criterion alone (default check_finite: skipped while tracing), compiled with fullgraph=True: one graph
    for all steps, and the same losses, components and buffer as eager steps."""
    eager, compiled = _criterion(), _criterion()
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for step in range(STEPS):
        z1, z2 = torch.randn(B, D), torch.randn(B, D)
        expected, got = eager(z1, z2), fn(z1, z2)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(compiled.last_components, eager.last_components, rtol=0, atol=0)
    assert torch.equal(compiled.buffer.storage, eager.buffer.storage)
    assert (compiled.step, compiled.buffer.ptr, compiled.buffer.written) == (STEPS, eager.buffer.ptr, STEPS * B)
    assert compiled.buffer.full and compiled.last_components[1].item() > 0
    assert _graphs() <= 2 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))


def _training(seed=3):
    torch.manual_seed(seed)
    encoder = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh(), torch.nn.Linear(D, D))
    criterion = _criterion()
    params = list(encoder.parameters())

    def step(x1, x2):
        loss = criterion(encoder(x1), encoder(x2))
        loss.backward()
        with torch.no_grad():  # plain SGD: torch.optim's step() breaks the graph by design
            for p in params:
                p.sub_(0.05 * p.grad)
                p.grad = None
        return loss.detach()

    return step, encoder, criterion


def test_training_step_is_one_graph_and_equals_eager():
    """Encoder + criterion + backward + parameter update in one fullgraph compile: at most 2 graphs over 22 steps
    (the buffer filling, then full), the same losses, parameters and buffer as the eager loop."""
    with _trace_backward():
        step_e, enc_e, crit_e = _training()
        step_c, enc_c, crit_c = _training()
        compiled = torch.compile(step_c, fullgraph=True, backend="aot_eager")
        for _ in range(STEPS):
            x1, x2 = torch.randn(B, D), torch.randn(B, D)
            torch.testing.assert_close(compiled(x1, x2), step_e(x1, x2), rtol=1e-6, atol=1e-6)
    for p, q in zip(enc_c.parameters(), enc_e.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(crit_c.buffer.storage, crit_e.buffer.storage, rtol=1e-6, atol=1e-6)
    assert crit_c.step == STEPS and crit_c.buffer.full
    assert _graphs() <= 2 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))


def test_compiled_forward_with_backward_outside():
    """The usual pattern without trace_autograd_ops: encoder + criterion compiled (fullgraph), backward and
    torch.optim outside; one graph, same losses as eager."""
    results = []
    for compile_it in (False, True):
        torch.manual_seed(5)
        encoder = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())
        criterion = _criterion()
        opt = torch.optim.SGD(encoder.parameters(), lr=0.05)  # (Adam would amplify fp32 rounding)

        def forward(x1, x2):
            return criterion(encoder(x1), encoder(x2))

        fn = torch.compile(forward, fullgraph=True, backend="aot_eager") if compile_it else forward
        torch.manual_seed(6)
        losses = []
        for _ in range(10):  # full from step 4 (0-based)
            loss = fn(torch.randn(B, D), torch.randn(B, D))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        results.append(torch.stack(losses))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)
    assert _graphs() <= 2 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_backward_after_the_compiled_call_uses_that_steps_state(accumulate):
    """Backward outside the compiled criterion (after the step counter, pointer and fill count were advanced in
    place), also after a second call before the backward (gradient accumulation): the gradients equal eager ones.
    Regression: AOTAutograd recomputed alpha in the backward from the already advanced step counter
    (pytorch/pytorch#197039); iscse.buffer.snapshot pins such reads."""
    eager, compiled = _criterion(), _criterion()
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for step in range(8):  # full from step 4 (0-based)
        xs = [(torch.randn(B, D), torch.randn(B, D)) for _ in range(accumulate)]
        grads = []
        for crit in (eager, fn):
            leaves = [x.clone().requires_grad_() for pair in xs for x in pair]
            total = sum(crit(leaves[2 * i], leaves[2 * i + 1]) for i in range(accumulate))
            total.backward()
            grads.append([t.grad for t in leaves])
        for g, h in zip(*grads):
            torch.testing.assert_close(h, g, rtol=0, atol=0, msg=lambda m: f"step {step}: {m}")
    assert compiled.step == eager.step == 8 * accumulate and compiled.buffer.full


def test_no_recompilation_with_the_recompile_limit_at_one():
    """Dynamo itself refuses any recompilation here: 1 compiled graph, 25 steps."""
    crit = _criterion(alpha=0.1)
    fn = torch.compile(crit, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(25):
            fn(torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)).backward()
    assert crit.step == 25 and _graphs() == 1


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    """The default compiler (Inductor) on the training step: close to eager (fp32 reordering), one graph."""
    with _trace_backward():
        step_e, _, crit_e = _training()
        step_c, _, crit_c = _training()
        compiled = torch.compile(step_c, fullgraph=True)
        for _ in range(12):
            x1, x2 = torch.randn(B, D), torch.randn(B, D)
            torch.testing.assert_close(compiled(x1, x2), step_e(x1, x2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(crit_c.buffer.storage, crit_e.buffer.storage, rtol=1e-4, atol=1e-5)
    assert (crit_c.step, crit_c.buffer.ptr) == (crit_e.step, crit_e.buffer.ptr)
    assert _graphs() <= 2
