"""Backend dispatch: names, instances, kNN-only providers, and the measured "auto" policy for the kNN step."""
import time

import pytest
import torch

import iscse
from iscse import backends
from iscse.backends import get_backend, resolve_knn

CPU = torch.device("cpu")


@pytest.fixture
def fresh_decisions():
    backends.clear_auto_knn_decisions()
    yield
    backends.clear_auto_knn_decisions()


class _Clock:
    """A fake ``perf_counter`` for the probe: only the wrapped kNN calls advance it, by their declared cost."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class _Slow:
    """Wraps a backend's kNN: runs it, counts the call, and advances the fake clock by ``delay`` seconds."""

    def __init__(self, inner, delay, clock):
        self.inner, self.delay, self.clock, self.calls = inner, delay, clock, 0

    def __call__(self, *args):
        self.calls += 1
        self.clock.now += self.delay
        return self.inner(*args)


def _shapes(M=backends.PROBE_MIN_ROWS, B=8, D=16):
    return torch.randn(B, D), torch.nn.functional.normalize(torch.randn(M, D), dim=1)


@pytest.mark.parametrize("faster", ["torch", "faiss"])
def test_auto_probes_once_per_shape_class_and_takes_the_faster(monkeypatch, fresh_decisions, faster):
    pytest.importorskip("faiss")
    torch_be, faiss_be = get_backend("torch", CPU), get_backend("faiss", CPU)
    clock = _Clock()
    monkeypatch.setattr(backends, "time", clock)
    slow = {"torch": 0.03 if faster == "faiss" else 0.01, "faiss": 0.03 if faster == "torch" else 0.01}
    wrapped = {}
    for name, be in (("torch", torch_be), ("faiss", faiss_be)):
        wrapped[name] = _Slow(be.knn_topk, slow[name], clock)
        monkeypatch.setattr(be, "knn_topk", wrapped[name])
    q, storage = _shapes()
    got = resolve_knn("auto", None, q, storage)
    assert (got.name if got is not None else "torch") == faster
    calls = {n: w.calls for n, w in wrapped.items()}
    assert calls == {"torch": 4, "faiss": 4}  # one warm-up and three timed calls each
    # cached: the same shape class does not probe again
    got2 = resolve_knn("auto", None, q, storage)
    assert got2 is got and {n: w.calls for n, w in wrapped.items()} == calls
    assert list(backends.auto_knn_decisions().values()) == [faster]
    # another batch size is another shape class
    resolve_knn("auto", None, torch.randn(4, 16), storage)
    assert len(backends.auto_knn_decisions()) == 2


def test_auto_near_tie_keeps_torch(monkeypatch, fresh_decisions):
    pytest.importorskip("faiss")
    clock = _Clock()
    monkeypatch.setattr(backends, "time", clock)
    for name, cost in (("torch", 0.100), ("faiss", 0.097)):  # FAISS 3% faster: under the 5% margin
        be = get_backend(name, CPU)
        monkeypatch.setattr(be, "knn_topk", _Slow(be.knn_topk, cost, clock))
    q, storage = _shapes()
    assert resolve_knn("auto", None, q, storage) is None


def test_no_probe_for_small_buffers_explicit_names_or_without_faiss(monkeypatch, fresh_decisions):
    q, storage = _shapes(M=backends.PROBE_MIN_ROWS - 1)
    assert resolve_knn("auto", None, q, storage) is None  # below the probe size: the compute backend's own kNN
    q, storage = _shapes()
    assert resolve_knn("torch", None, q, storage) is None  # an explicit backend is respected
    assert resolve_knn("auto", "torch", q, storage).name == "torch"
    assert backends.auto_knn_decisions() == {}
    monkeypatch.setitem(backends._MISSING, "faiss", True)
    monkeypatch.delitem(backends._CACHE, "faiss", raising=False)
    assert resolve_knn("auto", None, q, storage) is None  # FAISS not installed: torch, no probe
    assert backends.auto_knn_decisions() == {}


def test_auto_within_ten_percent_of_the_faster_backend(fresh_decisions):
    """The policy's promise on this machine, at a shape where the two are usually within 2x of each other: the step
    under "auto" (after its probe) is no slower than the faster of torch and FAISS by more than 10%, the three timed
    interleaved in the same process (medians of 5). Timings on a shared machine can be disturbed by other load, so
    the promise is checked up to three times, each with a fresh probe: a wrong policy fails all three."""
    pytest.importorskip("faiss")
    B, M, D = 32, 16384, 64
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    rows = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    bufs = {}
    for name in ("auto", "torch", "faiss"):
        bufs[name] = iscse.MemoryBuffer(M, D)
        bufs[name].push(rows)
    attempts = []
    for _ in range(3):
        backends.clear_auto_knn_decisions()
        with torch.no_grad():
            iscse.iscse_loss(z1, z2, bufs["auto"], backend="auto", push=False)  # the probe
            times = {name: [] for name in bufs}
            for _ in range(6):
                for name, buf in bufs.items():
                    start = time.perf_counter()
                    iscse.iscse_loss(z1, z2, buf, backend=name, push=False)
                    times[name].append(time.perf_counter() - start)
        med = {name: sorted(t[1:])[2] for name, t in times.items()}
        attempts.append((med, backends.auto_knn_decisions()))
        if med["auto"] <= 1.10 * min(med["torch"], med["faiss"]) + 2e-3:
            return
    pytest.fail(f"auto slower than the faster backend by more than 10% in 3 attempts: {attempts}")


def test_backend_instances_are_accepted():
    backend = get_backend("torch", CPU)
    assert get_backend(backend, CPU) is backend
    crit = iscse.ISCSELoss(8, buffer_size=16, k=2, backend=backend, knn_backend=get_backend("reference", CPU))
    for _ in range(5):
        loss = crit(torch.randn(4, 8), torch.randn(4, 8))
    assert torch.isfinite(loss) and crit.buffer.full


def test_auto_on_a_large_buffer_matches_torch(fresh_decisions):
    pytest.importorskip("faiss")
    B, M, D = 16, 16384, 32
    bufs = [iscse.MemoryBuffer(M, D) for _ in range(2)]
    rows = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    for buf in bufs:
        buf.push(rows)
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    auto = iscse.iscse_loss(z1, z2, bufs[0], backend="auto")
    plain = iscse.iscse_loss(z1, z2, bufs[1], backend="torch")
    assert torch.allclose(auto, plain, rtol=1e-5)
