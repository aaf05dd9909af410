"""Backend dispatch: names, instances, and the measured "auto" rule for the kNN step."""
import pytest
import torch

import iscse
from iscse.backends import get_backend, resolve_knn

CPU = torch.device("cpu")


def test_auto_knn_goes_to_faiss_only_where_measured_faster():
    pytest.importorskip("faiss")
    assert resolve_knn("auto", None, CPU, 65536, 64, 768).name == "faiss"
    assert resolve_knn("auto", None, CPU, 1024, 64, 768) is None  # the paper's buffer: torch's own kNN
    assert resolve_knn("auto", None, CPU, 65536, 8, 768) is None  # small batches: no measured win
    assert resolve_knn("torch", None, CPU, 65536, 64, 768) is None  # an explicit backend is respected
    assert resolve_knn("auto", "torch", CPU, 65536, 64, 768).name == "torch"


def test_backend_instances_are_accepted():
    backend = get_backend("torch", CPU)
    assert get_backend(backend, CPU) is backend
    crit = iscse.ISCSELoss(8, buffer_size=16, k=2, backend=backend, knn_backend=get_backend("reference", CPU))
    for _ in range(5):
        loss = crit(torch.randn(4, 8), torch.randn(4, 8))
    assert torch.isfinite(loss) and crit.buffer.full


def test_auto_on_a_large_buffer_matches_torch():
    pytest.importorskip("faiss")
    B, M, D = 16, 16384, 32
    bufs = [iscse.MemoryBuffer(M, D) for _ in range(2)]
    rows = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    for buf in bufs:
        buf.storage.copy_(rows)
        buf.written = M
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    auto = iscse.iscse_loss(z1, z2, bufs[0], backend="auto")
    plain = iscse.iscse_loss(z1, z2, bufs[1], backend="torch")
    assert torch.allclose(auto, plain, rtol=1e-5)
