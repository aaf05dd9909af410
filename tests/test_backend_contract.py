"""The Backend contract in every backend: ``self_slots`` excluded as given, values sorted in descending order."""
import pytest
import torch
import torch.nn.functional as F

import iscse
from iscse.backends import get_backend


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_self_slots_are_honoured_wherever_they_rank(name):
    """Excluding slots that do not rank first (here: arbitrary slots, and a buffer with a duplicate of the query
    ranking with it) removes exactly those slots, not whatever ranks first."""
    M, D, k = 12, 8, 4
    storage = F.normalize(torch.randn(M, D, dtype=torch.float64), dim=1)
    q = F.normalize(torch.randn(3, D, dtype=torch.float64), dim=1)
    slots = torch.tensor([5, 0, 11])
    for ptr in (0, 7):
        vals, idx = get_backend(name).knn_topk(q, storage, k, slots, ptr)
        sim = q @ storage.t()
        sim[torch.arange(3), slots] = -float("inf")
        exp_vals, exp_idx = sim.topk(k, dim=1)
        assert torch.equal(idx, exp_idx) and torch.allclose(vals, exp_vals)
    # the step's case: the query sits in its own slot; a duplicate of it elsewhere is a neighbour like any row
    storage[5], storage[9] = q[0], q[0]
    vals, idx = get_backend(name).knn_topk(q[:1], storage, k, slots[:1], 3)
    assert 5 not in idx[0].tolist() and idx[0, 0].item() == 9 and vals[0, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_neighbours_come_back_in_descending_order(dtype):
    """The torch backend ranks in the storage dtype and recomputes the values in fp32: they are sorted again."""
    torch.manual_seed(0)
    storage = F.normalize(torch.randn(4096, 64), dim=1).to(dtype)
    q = F.normalize(torch.randn(64, 64), dim=1)
    vals, idx = iscse.knn_topk(q, storage, 16, self_slots=None, backend="torch")
    assert vals.dtype == torch.float32
    assert bool((vals[:, :-1] >= vals[:, 1:]).all())
    exact = torch.einsum("bd,bkd->bk", q, storage[idx].float())
    assert torch.equal(vals, exact)
