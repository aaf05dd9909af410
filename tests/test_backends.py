"""Backend dispatch: names, instances, the registry, kNN-only providers, and the verified "auto" policy.

The policy's timing is checked on a fake clock (deterministic): only the wrapped backends advance it, by their
declared cost. The wall-clock check of the promise ("auto" is never slower than the faster backend) is a `timing`
test, run by the benchmark command, not by the default suite.
"""
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import iscse
from iscse import backends
from iscse.backends import get_backend
from iscse.backends.pytorch import TorchBackend

from conftest import assert_rel_close, run_ranks

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_decisions():
    backends.clear_auto_decisions()
    yield
    backends.clear_auto_decisions()


class _Clock:
    """A fake ``perf_counter`` for the policy's timing: only the wrapped calls advance it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(backends, "time", c)
    return c


class _Candidate(TorchBackend):
    """A candidate built on the torch backend: ``cost`` seconds of fake time per step or kNN call, and an optional
    relative ``error`` added to ``L_s`` (a wrong backend)."""

    def __init__(self, name, clock=None, cost=0.0, error=0.0):
        self.name, self.clock, self.cost, self.error, self.calls = name, clock, cost, error, 0
        self._in_step = False

    def _tick(self):
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.cost

    def iscse_loss(self, *args, **kwargs):
        self._tick()
        self._in_step = True
        try:
            l_cl, l_s = super().iscse_loss(*args, **kwargs)
        finally:
            self._in_step = False
        return l_cl, l_s * (1 + self.error)

    def knn_topk(self, *args, **kwargs):
        if self._in_step:  # the step's own kNN: counted with the step
            return super().knn_topk(*args, **kwargs)
        self._tick()
        vals, idx = super().knn_topk(*args, **kwargs)
        return vals * (1 + self.error), idx


@pytest.fixture
def register(monkeypatch):
    """Register test backends as CPU "auto" candidates; unregistered at teardown."""
    names = []

    def add(backend, auto=True):
        backends.register_backend(backend.name, lambda: backend, auto_devices=("cpu",) if auto else ())
        names.append(backend.name)
        return backend

    yield add
    for name in names:
        backends.unregister_backend(name)


@pytest.fixture
def timed_baseline(monkeypatch, clock):
    """The torch baseline costs 10 ms of fake time per step."""
    base = get_backend("torch")
    inner = base.iscse_loss

    def slow(*args, **kwargs):
        clock.now += 0.010
        return inner(*args, **kwargs)
    monkeypatch.setattr(base, "iscse_loss", slow)
    return base


def _full_criterion(M=32, D=16, k=4, **kw):
    crit = iscse.ISCSELoss(D, buffer_size=M, k=k, **kw)
    crit.buffer.push(F.normalize(torch.randn(M, D), dim=1))
    return crit


def test_a_wrong_candidate_is_dropped_with_one_warning_and_the_step_equals_the_baseline(register, timed_baseline,
                                                                                          clock):
    wrong = register(_Candidate("wrong", clock, cost=0.001, error=1e-2))  # faster, but L_s off by 1%
    crit, base = _full_criterion(backend="auto"), _full_criterion(backend="torch")
    base.load_state_dict(crit.state_dict())
    z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with pytest.warns(RuntimeWarning) as record:
        loss = crit(z1, z2)
    messages = [str(w.message) for w in record if "iscse" in str(w.message)]
    assert len(messages) == 1
    msg = messages[0]
    for part in ("'wrong'", "B=8", "M=32", "D=16", "k=4", "float32", "L_s", "python -m iscse.check"):
        assert part in msg, (part, msg)
    expected = base(z1, z2)
    assert torch.equal(loss, expected)
    g = torch.autograd.grad(loss, (z1, z2))
    g_expected = torch.autograd.grad(expected, (z1, z2))
    assert all(torch.equal(a, b) for a, b in zip(g, g_expected))
    # the buffer and the step end as one step leaves them
    assert torch.equal(crit.buffer.storage, base.buffer.storage) and crit.buffer.written == base.buffer.written
    assert crit.step == base.step == 1
    # dropped for the process: no second warning, no second verification, other shape classes skip it too
    calls = wrong.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crit(torch.randn(8, 16), torch.randn(8, 16))
        crit(torch.randn(4, 16), torch.randn(4, 16))
    assert wrong.calls == calls
    assert set(backends.auto_decisions().values()) == {"torch"}


def test_a_correct_but_slower_candidate_is_not_chosen_and_a_faster_one_is(register, timed_baseline, clock):
    slow = register(_Candidate("slow", clock, cost=0.020))
    crit = _full_criterion()
    crit(torch.randn(8, 16), torch.randn(8, 16))
    assert list(backends.auto_decisions().values()) == ["torch"]
    assert slow.calls == 1 + backends._PROBE_ROUNDS  # verified once, then timed in each round

    fast = register(_Candidate("fast", clock, cost=0.002))
    crit(torch.randn(4, 16), torch.randn(4, 16))  # a new shape class: both candidates verified and timed
    key = backends.shape_key("iscse_loss", torch.randn(4, 16), crit.buffer.storage, 4, "attention")
    assert backends.auto_decisions()[key] == "fast"
    calls = fast.calls
    crit(torch.randn(4, 16), torch.randn(4, 16))  # decided: the step runs on it, no new probe
    assert fast.calls == calls + 1


def test_near_ties_go_to_the_baseline(register, timed_baseline, clock):
    register(_Candidate("close", clock, cost=0.0097))  # 3% faster: under the 5% margin
    crit = _full_criterion()
    crit(torch.randn(8, 16), torch.randn(8, 16))
    assert list(backends.auto_decisions().values()) == ["torch"]


def test_no_decision_until_the_buffer_is_full_nor_for_named_backends(register, clock):
    cand = register(_Candidate("cand", clock, error=0.5))  # wrong: a named backend is used as it is
    crit = iscse.ISCSELoss(16, buffer_size=32, k=4)
    for _ in range(3):  # 24 of 32 rows: not full, the baseline runs and nothing is verified
        crit(torch.randn(8, 16), torch.randn(8, 16))
    assert cand.calls == 0 and backends.auto_decisions() == {}
    with pytest.warns(RuntimeWarning, match="'cand'"):
        crit(torch.randn(8, 16), torch.randn(8, 16))  # full now: the first step that can verify does
    assert cand.calls == 1 and backends.auto_decisions()
    backends.clear_auto_decisions()
    named = _full_criterion(backend="cand")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named(torch.randn(8, 16), torch.randn(8, 16))
    assert backends.auto_decisions() == {}


def test_no_probe_while_compiling_or_capturing(register, clock, monkeypatch):
    cand = register(_Candidate("cand", clock))
    crit = _full_criterion()
    monkeypatch.setattr(backends, "_capturing", lambda device: True)
    crit(torch.randn(8, 16), torch.randn(8, 16))
    assert cand.calls == 0 and backends.auto_decisions() == {}


def test_an_inconclusive_mismatch_on_tied_neighbours_is_retried_then_settles_on_the_baseline(register, clock):
    cand = register(_Candidate("tied", clock, error=1e-3))
    M, D = 32, 16
    crit = iscse.ISCSELoss(D, buffer_size=M, k=4)
    row = F.normalize(torch.randn(1, D), dim=1)
    crit.buffer.push(row.expand(M, D))  # every buffer row the same: neighbours tie exactly at rank k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rejection warning: the mismatch proves nothing
        for i in range(backends._MAX_INCONCLUSIVE):
            crit(torch.randn(2, D), torch.randn(2, D))
            crit.buffer.storage[:] = row  # keep the ties for the next step
            assert (backends.auto_decisions() != {}) == (i == backends._MAX_INCONCLUSIVE - 1)
    assert list(backends.auto_decisions().values()) == ["torch"]
    assert ("cpu", "tied") not in backends._REJECTED


def test_a_crashing_candidate_is_dropped(register, clock):
    class Crashing(_Candidate):
        def iscse_loss(self, *args, **kwargs):
            raise RuntimeError("illegal memory access")
    register(Crashing("crash", clock))
    crit = _full_criterion()
    with pytest.warns(RuntimeWarning, match="'crash'.*raised RuntimeError: illegal memory access"):
        loss = crit(torch.randn(8, 16), torch.randn(8, 16))
    assert torch.isfinite(loss) and crit.step == 1


def test_decisions_survive_state_dict_and_a_missing_backend_falls_back_with_a_warning(register, timed_baseline,
                                                                                      clock):
    fast = register(_Candidate("fast", clock, cost=0.001))
    crit = _full_criterion()
    crit(torch.randn(8, 16), torch.randn(8, 16))
    state = crit.state_dict()
    saved = state["_extra_state"]["auto_decisions"]
    assert [d["backend"] for d in saved] == ["fast"] and saved[0]["B"] == 8 and saved[0]["op"] == "iscse_loss"
    torch.save(state, "/dev/null")  # plain types only (weights_only=True loads it)

    backends.clear_auto_decisions()
    resumed = iscse.ISCSELoss(16, buffer_size=32, k=4)
    resumed.load_state_dict(state)
    calls = fast.calls
    resumed(torch.randn(8, 16), torch.randn(8, 16))
    assert fast.calls == calls + 1  # the saved decision is used: one step, no verification, no timing

    backends.clear_auto_decisions()
    state["_extra_state"]["auto_decisions"][0]["backend"] = "gone"
    with pytest.warns(RuntimeWarning, match="'gone'.*baseline"):
        iscse.ISCSELoss(16, buffer_size=32, k=4).load_state_dict(state)
    assert list(backends.auto_decisions().values()) == ["torch"]
    state["_extra_state"]["auto_decisions"] = [{"op": "iscse_loss"}]
    with pytest.raises(ValueError, match="auto_decisions"):
        iscse.ISCSELoss(16, buffer_size=32, k=4).load_state_dict(state)


def test_standalone_ops_verify_under_auto(register, clock):
    wrong = register(_Candidate("wrong", clock, error=1e-2))
    q, buf = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(64, 16), dim=1)
    with pytest.warns(RuntimeWarning, match="'wrong'.*knn_topk.*similarities"):
        vals, idx = iscse.knn_topk(q, buf, 5, self_slots=None)
    ref_vals, ref_idx = iscse.knn_topk(q, buf, 5, self_slots=None, backend="torch")
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx) and wrong.calls == 1
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    assert torch.equal(iscse.info_nce(a, b), iscse.info_nce(a, b, backend="torch"))
    z = iscse.smooth(q, buf, ref_idx, ref_vals)
    assert_rel_close(z, iscse.smooth(q, buf, ref_idx, ref_vals, backend="reference"), 1e-5, "z*")


def test_register_backend_validates():
    with pytest.raises(ValueError, match="auto"):
        backends.register_backend("auto", TorchBackend)
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend("torch", TorchBackend)
    with pytest.raises(TypeError, match="callable"):
        backends.register_backend("x", TorchBackend())
    with pytest.raises(ValueError, match="device type"):
        backends.register_backend("x", TorchBackend, auto_devices=("gpu0",))
    with pytest.raises(ValueError, match="built-in"):
        backends.unregister_backend("torch")
    backends.register_backend("notabackend", lambda: object())
    try:
        with pytest.raises(TypeError, match="not an iscse.backends.Backend"):
            get_backend("notabackend")
        assert "notabackend" in backends.backend_names()
    finally:
        backends.unregister_backend("notabackend")
    with pytest.raises(ValueError, match="unknown backend 'notabackend'"):
        iscse.ISCSELoss(8, buffer_size=16, k=2, backend="notabackend")


def test_builtin_candidates_and_baseline():
    assert backends.auto_candidates("cuda") == ["triton", "faiss"]
    assert backends.auto_candidates("cpu") == ["faiss"]
    assert get_backend("auto").name == backends.BASELINE == "torch"
    assert backends.compute_backend("faiss").name == "torch"  # a kNN provider pairs with the baseline


def test_faiss_is_a_cpu_candidate_for_large_buffers_only(monkeypatch, clock):
    pytest.importorskip("faiss")
    torch_be, faiss_be = get_backend("torch"), get_backend("faiss")
    for be, cost in ((torch_be, 0.03), (faiss_be, 0.01)):
        inner = be.knn_topk

        def slow(*args, _inner=inner, _cost=cost):
            clock.now += _cost
            return _inner(*args)
        monkeypatch.setattr(be, "knn_topk", slow)
    q = F.normalize(torch.randn(8, 16), dim=1)
    small = F.normalize(torch.randn(backends.PROBE_MIN_ROWS - 1, 16), dim=1)
    iscse.knn_topk(q, small, 4, self_slots=None)
    assert set(backends.auto_decisions().values()) == {"torch"}  # no candidate below the minimum rows
    large = F.normalize(torch.randn(backends.PROBE_MIN_ROWS, 16), dim=1)
    vals, _ = iscse.knn_topk(q, large, 4, self_slots=None)
    key = backends.shape_key("knn_topk", q, large, 4, False)
    assert backends.auto_decisions()[key] == "faiss"
    assert_rel_close(vals, iscse.knn_topk(q, large, 4, self_slots=None, backend="torch")[0], 1e-5, "vals")


def _run_workers(world, state, out_dir):
    run_ranks(Path(__file__).with_name("dispatch_ddp_worker.py"),
              lambda r, port: [r, world, port, state, out_dir / f"rank{r}.pt"], world=world, timeout=240)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_processes_share_rank_0s_decision(tmp_path):
    """Two gloo ranks whose own timings disagree (see tests/dispatch_ddp_worker.py) take rank 0's decision, FAISS,
    and their run equals one process on the global batch with that decision."""
    pytest.importorskip("faiss")
    crit = iscse.ISCSELoss(32, buffer_size=4096, k=8)
    crit.buffer.push(F.normalize(torch.randn(4096, 32), dim=1))
    torch.save(crit.state_dict(), tmp_path / "start.pt")
    (tmp_path / "two").mkdir()
    ranks = _run_workers(2, tmp_path / "start.pt", tmp_path / "two")
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert list(ranks[0]["decisions"].values()) == ["faiss"]  # rank 1 alone would have kept torch

    state = crit.state_dict()
    state["_extra_state"]["auto_decisions"] = ranks[0]["state"]["_extra_state"]["auto_decisions"]
    torch.save(state, tmp_path / "start1.pt")
    (tmp_path / "one").mkdir()
    (one,) = _run_workers(1, tmp_path / "start1.pt", tmp_path / "one")
    assert one["decisions"] == ranks[0]["decisions"]
    for rank, run in enumerate(ranks):
        assert all(torch.equal(a, b) for a, b in zip(run["losses"], one["losses"]))
        for (g1, g2), (o1, o2) in zip(run["grads"], one["grads"]):
            rows = slice(4 * rank, 4 * rank + 4)
            torch.testing.assert_close(g1, o1[rows], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(g2, o2[rows], rtol=1e-6, atol=1e-9)
    buf = [r["state"]["_extra_state"]["buffer"]["storage"] for r in ranks + [one]]
    assert torch.equal(buf[0], buf[1]) and torch.equal(buf[0], buf[2])


def test_backend_instances_are_accepted():
    backend = get_backend("torch", CPU)
    assert get_backend(backend, CPU) is backend
    crit = iscse.ISCSELoss(8, buffer_size=16, k=2, backend=backend, knn_backend=get_backend("reference", CPU))
    for _ in range(5):
        loss = crit(torch.randn(4, 8), torch.randn(4, 8))
    assert torch.isfinite(loss) and crit.buffer.full


def test_auto_on_a_large_buffer_matches_torch():
    pytest.importorskip("faiss")
    B, M, D = 16, 8192, 32
    bufs = [iscse.MemoryBuffer(M, D) for _ in range(2)]
    rows = F.normalize(torch.randn(M, D), dim=1)
    for buf in bufs:
        buf.push(rows)
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    auto = iscse.iscse_loss(z1, z2, bufs[0], backend="auto")
    plain = iscse.iscse_loss(z1, z2, bufs[1], backend="torch")
    assert torch.allclose(auto, plain, rtol=1e-5)


@pytest.mark.timing
def test_auto_within_ten_percent_of_the_faster_backend():
    """The policy's promise on this machine (a `timing` test: `python -m pytest -m timing`), at a shape where torch
    and FAISS are usually within 2x of each other: the step under "auto" (after its decision) is no slower than the
    faster of the two by more than 10%, the three timed interleaved in the same process (medians of 5). Checked up
    to three times, each with a fresh decision, since other load on the machine disturbs timings: a wrong policy
    fails all three."""
    pytest.importorskip("faiss")
    B, M, D = 32, 16384, 64
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    rows = F.normalize(torch.randn(M, D), dim=1)
    bufs = {}
    for name in ("auto", "torch", "faiss"):
        bufs[name] = iscse.MemoryBuffer(M, D)
        bufs[name].push(rows)
    attempts = []
    for _ in range(3):
        backends.clear_auto_decisions()
        iscse.iscse_loss(z1, z2, bufs["auto"], backend="auto")  # the decision (a training step, full buffer)
        with torch.no_grad():
            times = {name: [] for name in bufs}
            for _ in range(6):
                for name, buf in bufs.items():
                    start = time.perf_counter()
                    iscse.iscse_loss(z1, z2, buf, backend=name, push=False)
                    times[name].append(time.perf_counter() - start)
        med = {name: sorted(t[1:])[2] for name, t in times.items()}
        attempts.append((med, backends.auto_decisions()))
        if med["auto"] <= 1.10 * min(med["torch"], med["faiss"]) + 2e-3:
            return
    pytest.fail(f"auto slower than the faster backend by more than 10% in 3 attempts: {attempts}")
