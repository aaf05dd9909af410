"""The paper's ablations: ``grouping="pddp"`` and ``aggregation="mean"`` (iscse.pddp, the torch and Triton paths)
against the transcription of the released ``find_neighbors_and_aggregation`` (iscse.reference), in float64.

Shapes are odd on purpose: B = 1, D not a power of two, M not a multiple of k, B not dividing M, B = M, k = M
(one PDDP group); several steps through the buffer's fill and past it, fresh random inputs every test.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import iscse  # noqa: E402
from iscse import reference as R  # noqa: E402
from iscse.pddp import pddp_groups, pddp_smooth  # noqa: E402

from conftest import assert_rel_close  # noqa: E402

F64 = torch.float64
COMBOS = [("knn", "attention"), ("knn", "mean"), ("pddp", "attention"), ("pddp", "mean")]
_AGGR = {"attention": "attn", "mean": "mean"}

# (B, M, D, k, steps)
CASES = [
    (1, 24, 13, 4, 30),    # B = 1; kNN k = 4, PDDP 6 groups
    (7, 30, 13, 4, 8),     # B does not divide M, M not a multiple of k
    (5, 37, 19, 5, 12),    # M prime
    (8, 8, 13, 3, 3),      # B = M: PDDP's set is the batch alone
    (3, 50, 6, 7, 20),     # D < number of rows of a group (wide SVDs)
    (16, 64, 33, 8, 6),
    (4, 20, 96, 16, 7),    # kNN: M = B + k; PDDP: one group (20 // 16)
]


def _run(B, M, D, k, steps, grouping, aggregation, backend="torch", rtol=1e-10):
    buf = iscse.MemoryBuffer(M, D, dtype=F64)
    lbuf = R.new_buffer(M, D, dtype=F64)
    smoothed = 0
    for step in range(steps):
        z1 = (3.0 * torch.randn(B, D, dtype=F64)).requires_grad_(True)
        z2 = torch.randn(B, D, dtype=F64).requires_grad_(True)
        grad_out = torch.rand((), dtype=F64) + 0.5
        out = iscse.iscse_loss(z1, z2, buf, k=k, alpha=0.3, backend=backend, return_components=True,
                               grouping=grouping, aggregation=aggregation)
        ref = R.iscse_step(z1, z2, lbuf, k=k, alpha=0.3, mode=grouping, aggr=_AGGR[aggregation])
        lbuf = ref.lbuf
        g = torch.autograd.grad(out.loss * grad_out, (z1, z2))
        r = torch.autograd.grad(ref.loss * grad_out, (z1, z2))
        where = f"step {step} ({grouping}, {aggregation}, B={B}, M={M}, D={D}, k={k})"
        assert_rel_close(out.loss, ref.loss, rtol, f"loss at {where}")
        assert_rel_close(out.smooth, ref.smooth, rtol, f"L_s at {where}")
        assert_rel_close(g[0], r[0], rtol, f"grad z1 at {where}")
        assert_rel_close(g[1], r[1], rtol, f"grad z2 at {where}")
        assert torch.equal(buf.rows(), lbuf), f"buffer contents differ at {where}"
        smoothed += int(buf.full)
    assert smoothed > 1, "the case never smoothed: it tests nothing"


@pytest.mark.parametrize("grouping, aggregation", COMBOS)
@pytest.mark.parametrize("B, M, D, k, steps", CASES)
def test_torch_matches_reference(B, M, D, k, steps, grouping, aggregation):
    _run(B, M, D, k, steps, grouping, aggregation)


@pytest.mark.parametrize("grouping, aggregation", COMBOS)
def test_reference_backend_matches_reference(grouping, aggregation):
    _run(5, 23, 13, 4, 9, grouping, aggregation, backend="reference", rtol=1e-12)


@pytest.mark.parametrize("grouping", ["knn", "pddp"])
def test_faiss_backend_matches_reference(grouping):
    """backend="faiss": kNN by FAISS and mean aggregation by the default path; PDDP routed to the torch one."""
    pytest.importorskip("faiss")
    _run(4, 19, 13, 3, 8, grouping, "mean", backend="faiss")


def test_pddp_k_equal_to_buffer_size_is_one_group():
    """k = M: M // k = 1 group, no split: every query attends over the whole set."""
    _run(3, 10, 7, 10, 6, "pddp", "attention")
    gid = pddp_groups(torch.randn(10, 7, dtype=F64), 1)
    assert torch.equal(gid, torch.zeros(10, dtype=torch.int64))


def _reference_partition(rows: torch.Tensor, k: int):
    """The released code's groups, read back from its mean aggregation with the whole set as the batch (B = M):
    rows i and j share a group iff their smoothed positives (the group means) are equal (up to the matmul's
    rounding, which may differ between rows: different groups' means are O(0.1) apart here)."""
    z = R.pddp_aggregate(rows, rows, k, aggr="mean")
    return (z[:, None, :] - z[None, :, :]).abs().amax(-1) < 1e-9


def _partition(gid: torch.Tensor):
    return gid[:, None] == gid[None, :]


def _symmetric_rows(n_clusters: int, per: int, D: int) -> torch.Tensor:
    """Rows in equal-sized clusters, symmetric about the origin: equal-sized groups appear, so the tie rules
    (``[left, right]`` prepended, stable sort) decide which group is split next."""
    centres = torch.randn(n_clusters // 2, D, dtype=F64)
    centres = torch.cat([centres, -centres])
    rows = centres.repeat_interleave(per, 0) + 0.01 * torch.randn(n_clusters * per, D, dtype=F64)
    return F.normalize(rows, dim=1)


@pytest.mark.parametrize("M, D, k, kind", [
    (24, 13, 4, "random"), (64, 32, 8, "random"), (100, 17, 3, "random"), (37, 5, 2, "random"),
    (32, 12, 4, "symmetric"), (48, 7, 3, "symmetric"), (16, 9, 1, "symmetric"),
    (12, 6, 2, "duplicates"),
])
def test_pddp_groups_match_released_tree(M, D, k, kind):
    if kind == "random":
        rows = F.normalize(torch.randn(M, D, dtype=F64), dim=1)
    elif kind == "symmetric":
        rows = _symmetric_rows(4, M // 4, D)
    else:  # repeated rows: zero-variance directions and singular-vector entries that tie
        rows = F.normalize(torch.randn(3, D, dtype=F64), dim=1).repeat(M // 3, 1)
    gid = pddp_groups(rows, M // k)
    assert int(gid.max()) + 1 <= M // k
    if kind != "duplicates":  # equal rows have equal means whatever their groups: compare only what is readable
        assert torch.equal(_partition(gid), _reference_partition(rows, k))
    z = pddp_smooth(rows, rows[:0], k, aggregation="mean")
    assert_rel_close(z, R.pddp_aggregate(rows, rows, k, aggr="mean"), 1e-12, "group means")


def test_pddp_tree_stops_growing_as_released():
    """Sub-groups are not re-centred, so a split soon puts every row on one side and the tree stops: on random
    unit rows far fewer than M // k groups are built (the released behaviour, reproduced, not fixed)."""
    rows = F.normalize(torch.randn(128, 32, dtype=F64), dim=1)
    gid = pddp_groups(rows, 32)
    n_groups = int(gid.max()) + 1
    assert 2 <= n_groups < 32
    assert torch.equal(_partition(gid), _reference_partition(rows, 4))


def test_pddp_gradient_flows_through_in_batch_group_members():
    """z*_i depends on q_j (j != i) exactly when j is in i's group: the first B rows of the set carry gradient."""
    B, older_n, D, k = 6, 10, 5, 4
    q = F.normalize(torch.randn(B, D, dtype=F64), dim=1).requires_grad_(True)
    older = F.normalize(torch.randn(older_n, D, dtype=F64), dim=1)
    gid = pddp_groups(torch.cat([q.detach(), older]), (B + older_n) // k)
    for aggregation in ("attention", "mean"):
        jac = torch.autograd.functional.jacobian(lambda x: pddp_smooth(x, older, k, aggregation=aggregation), q)
        dep = jac.abs().amax(dim=(1, 3)) > 0  # (B, B): z*_i depends on q_j
        assert torch.equal(dep, _partition(gid[:B])), aggregation


@pytest.mark.parametrize("grouping", ["knn", "pddp"])
def test_evaluation_call_leaves_the_buffer(grouping):
    """push=False: no change to the buffer; for PDDP the loss equals a training step's on a copy of the buffer."""
    B, M, D, k = 4, 18, 7, 3
    buf = iscse.MemoryBuffer(M, D, dtype=F64)
    for _ in range(5):
        buf.push(F.normalize(torch.randn(B, D, dtype=F64), dim=1))
    z1, z2 = torch.randn(B, D, dtype=F64), torch.randn(B, D, dtype=F64)
    state = {k_: v.clone() if isinstance(v, torch.Tensor) else v for k_, v in buf.state_dict().items()}
    out = iscse.iscse_loss(z1, z2, buf, k=k, grouping=grouping, aggregation="mean", push=False,
                           return_components=True)
    for name, v in buf.state_dict().items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(state[name])), name
    assert out.smooth > 0
    if grouping == "pddp":
        trained = iscse.MemoryBuffer(M, D, dtype=F64)
        trained.load_state_dict(state)
        step = iscse.iscse_loss(z1, z2, trained, k=k, grouping=grouping, aggregation="mean")
        assert_rel_close(out.loss, step, 1e-12, "evaluation vs training loss")


def test_module_matches_functional_and_state():
    B, M, D, k = 3, 11, 6, 2
    crit = iscse.ISCSELoss(D, buffer_size=M, k=k, alpha=0.2, grouping="pddp", aggregation="mean", backend="torch")
    buf = iscse.MemoryBuffer(M, D)
    for _ in range(6):
        z1, z2 = torch.randn(B, D), torch.randn(B, D)
        expected = iscse.iscse_loss(z1, z2, buf, k=k, alpha=0.2, grouping="pddp", aggregation="mean",
                                    backend="torch")
        assert_rel_close(crit(z1, z2), expected, 1e-6, "module loss")
    state = crit.state_dict()["_extra_state"]
    assert state["grouping"] == "pddp" and state["aggregation"] == "mean"
    assert "grouping='pddp'" in repr(crit) and "aggregation='mean'" in repr(crit)
    default = iscse.ISCSELoss(D, buffer_size=M, k=k)
    assert default.state_dict()["_extra_state"]["grouping"] == "knn"
    assert default.state_dict()["_extra_state"]["aggregation"] == "attention"
    assert "grouping" not in repr(default)
    default.load_state_dict(crit.state_dict())  # restores the ablation with the buffer
    assert (default.grouping, default.aggregation) == ("pddp", "mean")
    assert torch.equal(default.buffer.rows(), crit.buffer.rows())
    # A bad saved name raises before anything changes.
    other = iscse.ISCSELoss(D, buffer_size=M, k=k)
    before = other.buffer.rows().clone()
    for key, bad in (("grouping", "kmeans"), ("aggregation", "max")):
        with pytest.raises(ValueError, match=key):
            other.load_state_dict({"_extra_state": {**state, key: bad}})
    assert torch.equal(other.buffer.rows(), before) and other.grouping == "knn" and other.aggregation == "attention"


def _buffer_snapshot(buf):
    return buf.storage.clone(), buf.ptr, buf.written


def test_errors_before_the_buffer_changes():
    B, M, D = 3, 8, 5
    buf = iscse.MemoryBuffer(M, D)
    buf.push(torch.randn(B, D))
    before = _buffer_snapshot(buf)
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    bad = [
        (dict(grouping="kmeans"), ValueError, "grouping"),
        (dict(grouping=None), TypeError, "grouping"),
        (dict(aggregation="max"), ValueError, "aggregation"),
        (dict(aggregation="attn"), ValueError, "aggregation"),  # the released spelling is not a public name
        (dict(grouping="pddp", k=M + 1), ValueError, "k must be in"),
        (dict(grouping="pddp", k=0), ValueError, "k must be in"),
        (dict(grouping="pddp", k=2.0), TypeError, "k must be an int"),
        (dict(grouping="pddp", knn_backend="torch"), ValueError, "knn_backend"),
        (dict(grouping="knn", k=M), ValueError, "k="),  # kNN: at most M - 1 neighbours
    ]
    for kwargs, exc, match in bad:
        kwargs = {"k": 2, **kwargs}
        with pytest.raises(exc, match=match):
            iscse.iscse_loss(z1, z2, buf, **kwargs)
        after = _buffer_snapshot(buf)
        assert torch.equal(after[0], before[0]) and after[1:] == before[1:], kwargs
    with pytest.raises(ValueError, match="larger than the buffer size"):
        iscse.iscse_loss(torch.randn(M + 1, D), torch.randn(M + 1, D), buf, k=2, grouping="pddp")
    # The module validates at construction.
    for kwargs, exc, match in bad[:4] + [(dict(grouping="pddp", k=M + 1), ValueError, "k must be in"),
                                         (dict(grouping="pddp", knn_backend="torch"), ValueError, "knn_backend")]:
        with pytest.raises(exc, match=match):
            iscse.ISCSELoss(D, buffer_size=M, **{"k": 2, **kwargs})
    iscse.ISCSELoss(D, buffer_size=M, k=M, grouping="pddp")  # k = M is one PDDP group: allowed
    with pytest.raises(ValueError, match="aggregation"):
        iscse.smooth(z2, buf, torch.zeros(B, 2, dtype=torch.int64), torch.zeros(B, 2), aggregation="median")


def test_smooth_mean_is_the_group_mean():
    B, M, D, k = 4, 15, 9, 5
    buf = torch.randn(M, D, dtype=F64)
    q = torch.randn(B, D, dtype=F64, requires_grad=True)
    vals, idx = iscse.knn_topk(q, buf, k, self_slots=None)
    for backend in ("torch", "reference"):
        z = iscse.smooth(q, buf, idx, vals, backend=backend, aggregation="mean")
        assert_rel_close(z, (q + buf[idx].sum(1)) / (k + 1), 1e-12, f"{backend} z*")
        (g,) = torch.autograd.grad(z.sum(), q)
        assert_rel_close(g, torch.full_like(q, 1.0 / (k + 1)), 1e-12, f"{backend} grad")


# --------------------------------------------------------------------------------------------------------------------
# The Triton path (interpreter on CPU): mean aggregation in the fused kernels; PDDP routed to the torch implementation

def _triton_ops():
    pytest.importorskip("triton")
    from iscse.backends import triton_fused as triton_ops
    if not triton_ops.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("triton was imported in compiled mode without a GPU")
    return triton_ops


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B, M, D, k, steps, knn_backend", [
    (1, 9, 13, 3, 12, None),   # B = 1
    (5, 17, 13, 7, 6, None),   # B does not divide M
    (3, 10, 20, 7, 5, None),   # M = B + k
    (4, 13, 13, 2, 6, "torch"),  # neighbours from another backend (the idx path of the kernel)
])
@pytest.mark.parametrize("hold", [True, False], ids=["held", "made in forward"])
def test_triton_mean_matches_reference(B, M, D, k, steps, knn_backend, hold, monkeypatch):
    _triton_ops()
    from iscse.kernels import iscse_loss as L

    # Both ways the fused step makes its gradients (kernels/iscse_loss.py): in backward from what the forward held,
    # or in forward on rows read from the buffer.
    monkeypatch.setattr(L, "HOLD_MAX_BYTES", 2**62 if hold else -1)
    dev = _device()
    buf = iscse.MemoryBuffer(M, D, device=dev)
    lbuf = R.new_buffer(M, D, dtype=F64)
    smoothed = 0
    for step in range(steps):
        z1 = torch.randn(B, D, device=dev, requires_grad=True)
        z2 = torch.randn(B, D, device=dev, requires_grad=True)
        r1 = z1.detach().cpu().double().requires_grad_()
        r2 = z2.detach().cpu().double().requires_grad_()
        out = iscse.iscse_loss(z1, z2, buf, k=k, backend="triton", knn_backend=knn_backend, aggregation="mean",
                               return_components=True)
        ref = R.iscse_step(r1, r2, lbuf, k=k, aggr="mean")
        lbuf = ref.lbuf
        g_cl, g_s = 0.5 + torch.rand(()), 0.5 + torch.rand(())
        (g_cl.to(dev) * out.contrastive + g_s.to(dev) * out.smooth).backward()
        (g_cl.double() * ref.contrastive + g_s.double() * ref.smooth).backward()
        where = f"step {step} (B={B}, M={M}, D={D}, k={k})"
        assert_rel_close(out.loss, ref.loss, 1e-4, f"loss at {where}")
        assert_rel_close(out.smooth, ref.smooth, 1e-4, f"L_s at {where}")
        assert_rel_close(z1.grad, r1.grad, 1e-4, f"grad z1 at {where}")
        assert_rel_close(z2.grad, r2.grad, 1e-4, f"grad z2 at {where}")
        smoothed += int(buf.full)
    assert smoothed > 1


def test_triton_smooth_mean_matches_torch():
    triton_ops = _triton_ops()
    dev = _device()
    B, M, D, k = 5, 21, 13, 6
    storage = F.normalize(torch.randn(M, D, device=dev), dim=1)
    q = F.normalize(torch.randn(B, D, device=dev), dim=1).requires_grad_(True)
    vals, idx = iscse.knn_topk(q, storage, k, self_slots=None, backend="torch")
    z = triton_ops.smooth(q, storage, idx, vals, 2.0, aggregation="mean")
    qd = q.detach().cpu().double().requires_grad_(True)
    zd = iscse.smooth(qd, storage.cpu().double(), idx.cpu(), vals.cpu().double(), backend="torch",
                      aggregation="mean")
    assert_rel_close(z, zd, 1e-5, "z*")
    g = torch.randn(B, D, device=dev)
    (gq,) = torch.autograd.grad(z, q, g)
    (gqd,) = torch.autograd.grad(zd, qd, g.cpu().double())
    assert_rel_close(gq, gqd, 1e-5, "grad q")


@pytest.mark.parametrize("backend", ["triton", "faiss"])
def test_pddp_routes_other_backends_to_torch(backend):
    if backend == "triton":
        _triton_ops()
    else:
        pytest.importorskip("faiss")
    dev = _device() if backend == "triton" else "cpu"
    B, M, D, k = 3, 12, 7, 3
    buf_a, buf_b = iscse.MemoryBuffer(M, D, device=dev), iscse.MemoryBuffer(M, D, device=dev)
    for _ in range(4):
        z1, z2 = torch.randn(B, D, device=dev), torch.randn(B, D, device=dev)
        for aggregation in ("attention", "mean"):
            a = iscse.iscse_loss(z1, z2, buf_a, k=k, backend=backend, grouping="pddp", aggregation=aggregation)
            b = iscse.iscse_loss(z1, z2, buf_b, k=k, backend="torch", grouping="pddp", aggregation=aggregation)
            assert_rel_close(a, b, 1e-5, f"{backend} vs torch")
    assert buf_a.full


def test_sentence_transformers_adapter_passes_the_ablation():
    pytest.importorskip("sentence_transformers")
    from iscse.integrations.sentence_transformers import ISCSELoss

    class Stub(torch.nn.Module):
        def get_sentence_embedding_dimension(self):
            return 6

    loss = ISCSELoss(Stub(), buffer_size=12, k=3, grouping="pddp", aggregation="mean", backend="torch")
    assert (loss.criterion.grouping, loss.criterion.aggregation) == ("pddp", "mean")
    config = loss.get_config_dict()
    assert config["grouping"] == "pddp" and config["aggregation"] == "mean"
    assert ISCSELoss(Stub(), buffer_size=12, k=3).get_config_dict()["grouping"] == "knn"
    z1, z2 = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    for _ in range(4):
        loss.compute_loss_from_embeddings([z1, z2])
    assert loss.last_components[1] > 0
    with pytest.raises(ValueError, match="grouping"):
        ISCSELoss(Stub(), buffer_size=12, k=3, grouping="kmeans")


@pytest.mark.gpu
def test_triton_mean_on_gpu_matches_torch():
    """Compiled kernels: the fused mean path against the torch backend, fp32, through the fill."""
    _triton_ops()
    B, M, D, k = 64, 1024, 768, 16
    buf_t, buf_c = iscse.MemoryBuffer(M, D, device="cuda"), iscse.MemoryBuffer(M, D, device="cuda")
    for _ in range(20):
        z1 = torch.randn(B, D, device="cuda", requires_grad=True)
        z2 = torch.randn(B, D, device="cuda", requires_grad=True)
        a = iscse.iscse_loss(z1, z2, buf_t, k=k, backend="triton", aggregation="mean")
        ga = torch.autograd.grad(a, (z1, z2))
        b = iscse.iscse_loss(z1, z2, buf_c, k=k, backend="torch", aggregation="mean")
        gb = torch.autograd.grad(b, (z1, z2))
        assert_rel_close(a, b, 1e-4, "loss")
        assert_rel_close(ga[0], gb[0], 1e-4, "grad z1")
        assert_rel_close(ga[1], gb[1], 1e-4, "grad z2")


def test_the_trainer_takes_k_equal_to_the_buffer_with_pddp_only(tmp_path):
    """PDDP builds buffer_size // k groups, so k = buffer_size (one group) is allowed, as in iscse_loss; the kNN
    grouping needs k <= buffer_size - 1."""
    from iscse.training.arguments import parse_args
    from iscse.training.errors import ConfigError

    def flags(k, *more):
        return ["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path), "--buffer_size", "32",
                "--per_device_train_batch_size", "8", "--device", "cpu", "--k", str(k), *more]

    assert parse_args(flags(32, "--grouping", "pddp")).k == 32
    with pytest.raises(ConfigError, match="--k 32 must be at most --buffer_size - 1 = 31"):
        parse_args(flags(32))
    with pytest.raises(ConfigError, match="--k 33 must be at most --buffer_size = 32 with --grouping pddp"):
        parse_args(flags(33, "--grouping", "pddp"))
