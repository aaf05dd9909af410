"""The Triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors, against the float64 reference (docs/concepts.md: The fused path; Measuring).

Triton picks interpreter or compiler when it is first imported (its language functions, and ours, are decorated
then, and some of its modules, imported lazily at the first launch, check that the variable still agrees), so the
variable must be set before triton's first import and stay set for the whole process. On a machine without a GPU,
where triton has not been imported yet, this module sets it (unless it is set already) before importing triton; if
triton was already imported in compiled mode (a GPU machine), the module is skipped and tests/test_triton_gpu.py
covers the compiled kernels. Shapes are tiny and odd on purpose (B in {1, 5, 33}, D in {13, 96}, k in {1, 7, 16,
64}, M not a multiple of any block, M = B + k, buffers not yet full, several steps), and every case draws fresh
inputs (the seed fixture in conftest).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import iscse  # noqa: E402
from iscse import reference as R  # noqa: E402
from iscse.backends import pytorch as torch_ops  # noqa: E402
from iscse.backends import triton_fused as triton_ops  # noqa: E402

from conftest import assert_rel_close, assert_triton_ops_equal, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_ops.INTERPRETED,
                                reason="triton was imported in compiled mode; tests/test_triton_gpu.py covers it")

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-4  # fp32 kernels against the float64 reference


@pytest.fixture(params=["held", "made in forward"])
def rows(request, monkeypatch):
    """Both ways the fused step makes its gradients (kernels/iscse_loss.py): in backward, from the neighbour rows
    and InfoNCE partials held since forward (the default at these tiny shapes), or in forward, on rows read from
    the buffer, with the backward only scaling them."""
    from iscse.kernels import iscse_loss as L

    monkeypatch.setattr(L, "HOLD_MAX_BYTES", 2**62 if request.param == "held" else -1)
    return request.param


def _full_buffer(rows, dtype):
    """A full MemoryBuffer of ``dtype`` holding ``rows`` (``(M, D)``), pointer at 0."""
    buf = iscse.MemoryBuffer(*rows.shape, dtype=dtype)
    buf.storage.copy_(rows.to(dtype))
    buf.written = rows.shape[0]
    return buf


def _steps(B, M, D, k, steps, *, knn_backend=None):
    """Run ``steps`` IS-CSE steps with the Triton backend and with the float64 reference; compare every step."""
    buf = iscse.MemoryBuffer(M, D)
    lbuf = R.new_buffer(M, D, dtype=torch.float64)
    smoothed = 0
    for step in range(steps):
        z1 = torch.randn(B, D, requires_grad=True)
        z2 = torch.randn(B, D, requires_grad=True)
        r1 = z1.detach().double().requires_grad_()
        r2 = z2.detach().double().requires_grad_()
        out = iscse.iscse_loss(z1, z2, buf, k=k, backend="triton", knn_backend=knn_backend,
                               return_components=True)
        ref = R.iscse_step(r1, r2, lbuf, k=k)
        lbuf = ref.lbuf
        # Separate, non-unit upstream gradients for the two components: each must scale its own part.
        g_cl, g_s = 0.5 + torch.rand(()), 0.5 + torch.rand(())
        (g_cl * out.contrastive + g_s * out.smooth).backward()
        (g_cl.double() * ref.contrastive + g_s.double() * ref.smooth).backward()
        where = f"step {step} (B={B}, M={M}, D={D}, k={k}, full={buf.full})"
        assert out.loss.dtype == torch.float32
        assert_rel_close(out.loss, ref.loss, RTOL, f"loss at {where}")
        assert_rel_close(out.contrastive, ref.contrastive, RTOL, f"L_cl at {where}")
        assert_rel_close(out.smooth, ref.smooth, RTOL, f"L_s at {where}")
        assert_rel_close(z1.grad, r1.grad, RTOL, f"grad z1 at {where}")
        assert_rel_close(z2.grad, r2.grad, RTOL, f"grad z2 at {where}")
        assert_rel_close(buf.rows(), lbuf, 1e-6, f"buffer at {where}")
        smoothed += int(buf.full)
    return smoothed


@pytest.mark.parametrize("B, M, D, k, steps", [
    (1, 9, 13, 1, 10),      # B = 1; full from step 9 on
    (5, 13, 13, 7, 4),      # M odd, pushes wrap around mid-batch
    (5, 12, 96, 7, 4),      # M = B + k
    (5, 37, 96, 1, 9),      # k = 1, not full for 7 steps
    (33, 70, 13, 7, 3),
    (33, 40, 96, 7, 3),     # M = B + k
    (33, 45, 96, 1, 3),
    (33, 131, 13, 16, 4),   # the paper's k, M not a multiple of the 64-row tiles
    (5, 69, 13, 64, 14),    # k = 64
    (1, 20, 96, 7, 21),     # B = 1, D = 96
])
def test_iscse_loss_matches_reference(B, M, D, k, steps, rows):
    """Loss, both components, both input gradients and the buffer, step after step (buffer filling, then full)."""
    assert _steps(B, M, D, k, steps) >= 1


def test_knn_backend_other_than_triton(rows):
    """``knn_backend="torch"``: neighbours from torch, aggregation and loss from Triton; same numbers."""
    assert _steps(5, 13, 13, 7, 4, knn_backend="torch") >= 1


def _true_topk(q, storage, k, self_slots):
    sim = q.double() @ storage.double().t()
    if self_slots is not None:
        sim[torch.arange(q.shape[0]), self_slots] = float("-inf")
    return sim, sim.topk(k + 1 if k < sim.shape[1] else k, dim=1)


@pytest.mark.parametrize("B, M, D, k, qdt, bdt, self_slots, overrides", [
    (5, 37, 13, 7, torch.float32, torch.float32, True, {}),
    (33, 200, 96, 1, torch.float32, torch.float32, True, {}),
    (1, 9, 13, 7, torch.float32, torch.float32, False, {}),
    (4, 130, 20, 64, torch.float32, torch.float32, True, {}),
    (33, 300, 96, 16, torch.bfloat16, torch.bfloat16, True, {}),
    (5, 77, 13, 16, torch.float16, torch.float32, True, {}),
    # Small tiles: many chunks, several tiles per chunk, the multi-block merge path.
    (17, 150, 40, 7, torch.float32, torch.float32, True,
     dict(BLOCK_B=16, BLOCK_N=16, BLOCK_D=16, chunk=48, BLOCK_C=16)),
])
def test_knn_topk_matches_exact(B, M, D, k, qdt, bdt, self_slots, overrides):
    """Neighbour sets equal the exact (float64) top-k wherever the k-th and (k+1)-th similarities differ by more
    than 1e-4; the returned values are the exact fp32 dot products, sorted descending; the self slot never appears."""
    from iscse.kernels.knn_topk import knn_topk

    q = torch.nn.functional.normalize(torch.randn(B, D), dim=1).to(qdt)
    storage = torch.nn.functional.normalize(torch.randn(M, D), dim=1).to(bdt)
    slots = torch.randint(0, M, (B,)) if self_slots else None
    vals, idx = knn_topk(q, storage, k, slots, **overrides)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == (B, k)
    # Reference: the query rounded to the buffer dtype (as the kernels and the torch backend search), exact dots.
    sim, (top_v, top_i) = _true_topk(q.to(bdt), storage, k, slots)
    got = sim.gather(1, idx)
    assert torch.allclose(got, top_v[:, :k], atol=1e-5), "chosen neighbours are not the most similar rows"
    if top_v.shape[1] > k:
        distinct = (top_v[:, k - 1] - top_v[:, k]) > 1e-4
        assert torch.equal(idx[distinct].sort(1).values, top_i[distinct, :k].sort(1).values)
    if slots is not None:
        assert not (idx == slots[:, None]).any()
    exact = torch.einsum("bd,bkd->bk", q.double(), storage[idx].double())
    assert_rel_close(vals, exact, 1e-5, "vals")
    assert (vals[:, :-1] >= vals[:, 1:] - 1e-6).all(), "vals are not sorted descending"


@pytest.mark.parametrize("B, M, D, k, dtype", [(5, 37, 13, 7, torch.float32), (33, 50, 96, 1, torch.float32),
                                               (4, 70, 20, 64, torch.float32), (6, 30, 13, 7, torch.bfloat16)])
def test_smooth_matches_torch(B, M, D, k, dtype):
    """Standalone smooth (given idx and vals) against torch_ops.smooth in float64: z* and grad q."""
    q = torch.nn.functional.normalize(torch.randn(B, D), dim=1).to(dtype).requires_grad_()
    storage = torch.nn.functional.normalize(torch.randn(M, D), dim=1).to(dtype)
    idx = torch.stack([torch.randperm(M)[:k] for _ in range(B)])
    vals = torch.randn(B, k) * 0.3
    qd = q.detach().double().requires_grad_()
    z = triton_ops.smooth(q, storage, idx, vals, 2.0)
    zd = torch_ops.smooth(qd, storage.double(), idx, vals.double(), 2.0)
    assert z.dtype == torch.float32
    assert_rel_close(z, zd, RTOL, "z*")
    g = torch.randn(B, D)
    z.backward(g)
    zd.backward(g.double())
    assert q.grad.dtype == dtype
    assert_rel_close(q.grad, qd.grad, RTOL if dtype == torch.float32 else 1e-2, "grad q")


@pytest.mark.parametrize("B, D, dtype", [(1, 13, torch.float32), (5, 96, torch.float32), (33, 13, torch.float32),
                                         (70, 40, torch.float32), (33, 96, torch.bfloat16), (5, 13, torch.float16)])
def test_info_nce_matches_reference(B, D, dtype):
    """InfoNCE loss and both gradients against the reference's cosine-similarity cross-entropy in float64 on the
    same (rounded) inputs; returned grads in the input dtype."""
    a = torch.randn(B, D).to(dtype).requires_grad_()
    b = torch.randn(B, D).to(dtype).requires_grad_()
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    loss = triton_ops.info_nce(a, b, 0.05)
    ref = R.cos_sim_ce(ad, bd, 0.05)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref, RTOL, "loss")
    g = 0.5 + torch.rand(())
    (loss * g).backward()
    (ref * g.double()).backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    tol = RTOL if dtype == torch.float32 else 1e-2  # the gradients are rounded to the input dtype
    assert_rel_close(a.grad, ad.grad, tol, "grad a")
    assert_rel_close(b.grad, bd.grad, tol, "grad b")


def _cos_ce_and_grads(a, b, temperature=0.05):
    """The reference InfoNCE of ``a`` against ``b`` in float64 and its gradients in both."""
    a, b = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    loss = R.cos_sim_ce(a, b, temperature)
    return (loss.detach(),) + torch.autograd.grad(loss, (a, b))


# Small blocks everywhere: several programs per pass, several splits, several merge programs.
_SMALL = dict(ROWS_M=16, ROWS_N=16, COLS_M=16, COLS_N=16, BLOCK_D=16)


@pytest.mark.parametrize("B, D, has_z, dtype, overrides", [
    # 3 row blocks x 2 splits of 3 column tiles (2 does not divide 3), 3 column blocks x 3 splits; B and D not
    # multiples of the blocks (D not a power of two), 2 merge blocks along D.
    (40, 24, True, torch.float32, dict(_SMALL, ROW_SPLITS=2, COL_SPLITS=3)),
    (40, 24, False, torch.float32, dict(_SMALL, ROW_SPLITS=3, COL_SPLITS=2)),
    # One 64-row block, 3 tiles of 16 over 3 / 2 splits (the interpreter's default blocks, smaller split tiles).
    (33, 13, True, torch.float32, dict(ROWS_N=16, COLS_M=16, ROW_SPLITS=3, COL_SPLITS=2)),
    (33, 13, True, torch.bfloat16, {}),  # the defaults: 2 splits of 32
    (1, 13, True, torch.float32, {}),    # B = 1: one tile, one split
    (5, 96, False, torch.float16, dict(ROW_SPLITS=4, COL_SPLITS=4)),  # more splits asked than tiles: clamped to 1
])
def test_info_nce_forward_split_merge(B, D, has_z, dtype, overrides):
    """``info_nce_forward`` with the row and column passes split over programs: both losses and all four
    gradients against the float64 reference on the same (rounded) inputs."""
    from iscse.kernels.info_nce import info_nce_config, info_nce_forward

    x, y = torch.randn(B, D).to(dtype), torch.randn(B, D).to(dtype)
    z = torch.randn(B, D) if has_z else None
    cfg = info_nce_config(B, D, x.device, has_z=has_z, **overrides)
    if B >= 17 and overrides.get("ROW_SPLITS", 2) > 1:
        assert cfg["ROW_SPLITS"] > 1 and cfg["COL_SPLITS"] > 1, cfg  # the split/merge path runs
    loss_cl, loss_s, gx1, gy, gx2, gz = info_nce_forward(x, y, z, 0.05, **overrides)
    l1, rx1, ry = _cos_ce_and_grads(x, y)
    assert loss_cl.dtype == torch.float32 and loss_cl.shape == () and gx1.dtype == torch.float32
    assert_rel_close(loss_cl, l1, RTOL, "L_cl")
    assert_rel_close(gx1, rx1, RTOL, "dL_cl/dx")
    assert_rel_close(gy, ry, RTOL, "dL_cl/dy")
    if has_z:
        l2, rx2, rz = _cos_ce_and_grads(x, z)
        assert_rel_close(loss_s, l2, RTOL, "L_s")
        assert_rel_close(gx2, rx2, RTOL, "dL_s/dx")
        assert_rel_close(gz, rz, RTOL, "dL_s/dz")
    else:
        assert loss_s.item() == 0.0 and gx2 is None and gz is None


def test_info_nce_forward_deterministic_with_splits():
    """Bit-identical outputs run to run with several splits per pass (the partials are merged in a fixed order,
    no atomics); and the same function as one split, to rounding."""
    from iscse.kernels.info_nce import info_nce_forward

    B, D = 33, 13
    x, y, z = torch.randn(B, D), torch.randn(B, D), torch.randn(B, D)
    split = dict(ROWS_N=16, COLS_M=16, ROW_SPLITS=3, COL_SPLITS=2)
    first = info_nce_forward(x, y, z, 0.05, **split)
    second = info_nce_forward(x, y, z, 0.05, **split)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    single = info_nce_forward(x, y, z, 0.05, **dict(split, ROW_SPLITS=1, COL_SPLITS=1))
    for name, a, b in zip(("L_cl", "L_s", "gx1", "gy", "gx2", "gz"), first, single):
        assert_rel_close(a, b, 1e-5, name)


def test_info_nce_config_fills_the_device():
    """The CUDA split rule (evaluated for a 132-SM device: ``meta`` tensors stand in): about two programs per SM
    at (B, D) = (512, 1024) and (1024, 768) (splits per block rounded to the nearest integer: 8 and 4), every
    16-wide tile its own program at the paper's (64, 768), split counts never above the tile count, and the partial
    buffers of one pass within their memory bound."""
    from iscse.kernels.info_nce import _PARTIAL_BYTES, info_nce_config

    meta = torch.device("meta")
    for B, D in ((512, 1024), (64, 768), (1024, 768), (256, 768), (1, 768), (100, 13), (4096, 4096)):
        cfg = info_nce_config(B, D, meta)
        for block, tile, splits in (("ROWS_M", "ROWS_N", "ROW_SPLITS"), ("COLS_N", "COLS_M", "COL_SPLITS")):
            blocks, tiles = -(-B // cfg[block]), -(-B // cfg[tile])
            assert 1 <= cfg[splits] <= tiles
            assert (cfg[splits] - 1) * B * D * 4 * 2 <= _PARTIAL_BYTES
            if (B, D) in ((512, 1024), (1024, 768)):
                assert abs(blocks * cfg[splits] - 2 * 132) <= blocks / 2
                assert cfg[splits] == {512: 8, 1024: 4}[B]
            if (B, D) == (64, 768):
                assert blocks * cfg[splits] == 16 and cfg[tile] == 16


def test_losses_without_smoothing_returns_zero():
    """``iscse_loss(..., smooth=False)``: ``(L_cl, 0)``; L_s's gradient contributes nothing."""
    B, M, D = 5, 13, 13
    z1, z2 = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    q2 = torch.nn.functional.normalize(z2, dim=1)
    l_cl, l_s = triton_ops.TritonBackend().iscse_loss(z1, z2, q2, torch.randn(M, D), torch.arange(B), 0, k=3,
                                                  temperature=0.05, attn_temperature=2.0, smooth=False)
    assert l_s.item() == 0.0
    assert_rel_close(l_cl, R.cos_sim_ce(z1.double(), z2.double()), RTOL, "L_cl")
    (l_cl + 3.0 * l_s).backward()
    d1, d2 = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    R.cos_sim_ce(d1, d2).backward()
    assert_rel_close(z1.grad, d1.grad, RTOL, "grad z1")
    assert_rel_close(z2.grad, d2.grad, RTOL, "grad z2")


def test_two_losses_before_one_backward(rows):
    """Pushing again before the backward (gradient accumulation) is fine: the neighbour rows are held, as in the
    torch backend, which this is compared with in float64, or everything that needs them is done in forward."""
    B, M, D, k = 5, 12, 13, 3
    rows = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    zs = [torch.randn(B, D) for _ in range(4)]
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        buf = _full_buffer(rows, dtype)
        leaves = [z.detach().to(dtype).clone().requires_grad_() for z in zs]
        loss = (iscse.iscse_loss(leaves[0], leaves[1], buf, k=k, backend=backend)
                + 2.0 * iscse.iscse_loss(leaves[2], leaves[3], buf, k=k, backend=backend))
        loss.backward()
        grads[backend] = [t.grad for t in leaves]
    for i, (a, b) in enumerate(zip(grads["triton"], grads["torch"])):
        assert_rel_close(a, b, RTOL, f"grad of input {i}")


def test_deterministic_and_low_precision(rows):
    """Bit-identical results run to run (no atomics); bf16 inputs and buffer give fp32 losses and bf16 grads close
    to an fp32 run on the same rounded values."""
    B, M, D, k = 9, 20, 24, 5
    rows = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    results = []
    for dtype in (torch.bfloat16, torch.bfloat16, torch.float32):
        buf = _full_buffer(rows, dtype)
        a = z1.to(dtype).requires_grad_()
        b = z2.to(dtype).requires_grad_()
        out = iscse.iscse_loss(a, b, buf, k=k, backend="triton", return_components=True)
        out.loss.backward()
        assert out.loss.dtype == torch.float32 and a.grad.dtype == dtype and b.grad.dtype == dtype
        results.append((out.loss.detach(), out.smooth.detach(), a.grad, b.grad))
    assert all(torch.equal(x, y) for x, y in zip(results[0], results[1]))
    for x, y in zip(results[0], results[2]):
        assert rel_err(x.float(), y) < 5e-2


@pytest.mark.parametrize("grad_of", ["z1", "z2", "L_cl", "L_s"])
def test_partial_gradients(grad_of, rows):
    """Only one input requiring grad, or a gradient reaching only one component: the gradients that exist equal the
    torch backend's in float64."""
    B, M, D, k = 6, 15, 13, 4
    rows_ = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    zs = [torch.randn(B, D) for _ in range(2)]
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        buf = _full_buffer(rows_, dtype)
        leaves = [z.to(dtype).clone().requires_grad_(grad_of != ("z2", "z1")[i]) for i, z in enumerate(zs)]
        out = iscse.iscse_loss(*leaves, buf, k=k, backend=backend, return_components=True)
        target = {"L_cl": out.contrastive, "L_s": 3.0 * out.smooth}.get(grad_of, out.contrastive + 2.0 * out.smooth)
        target.backward()
        grads[backend] = [t.grad for t in leaves]
    for i, (a, b) in enumerate(zip(grads["triton"], grads["torch"])):
        assert (a is None) == (b is None), f"input {i}"
        if a is not None:
            assert_rel_close(a, b, RTOL, f"grad of input {i} ({grad_of})")


def test_hold_policy():
    """The fused forward holds its rows and partials for the backward at the paper's shape and at B = 128 (five
    launches), and makes the gradients itself from (512, 16, 1024) bf16 up, as counted for a 132-SM card
    (``meta``)."""
    from iscse.kernels.iscse_loss import hold_for_backward

    meta = torch.device("meta")
    assert hold_for_backward(64, 16, 768, meta) and hold_for_backward(128, 16, 768, meta)
    assert hold_for_backward(64, 16, 768, meta, buffer_dtype=torch.bfloat16, dtype=torch.bfloat16)
    assert not hold_for_backward(512, 16, 1024, meta, buffer_dtype=torch.bfloat16, dtype=torch.bfloat16)
    assert not hold_for_backward(1024, 16, 768, meta)


def test_errors():
    """float64 and too large k fail loudly, naming what to use instead, before the buffer changes."""
    z = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        triton_ops.info_nce(z, z)
    buf = iscse.MemoryBuffer(400, 8)
    with pytest.raises(ValueError, match="k <= 256"):
        iscse.iscse_loss(torch.randn(4, 8), torch.randn(4, 8), buf, k=300, backend="triton")
    buf64 = iscse.MemoryBuffer(20, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        iscse.iscse_loss(z, z, buf64, k=3, backend="triton")
    crit = iscse.ISCSELoss(8, buffer_size=20, k=3, backend="triton").double()
    with pytest.raises(TypeError, match="float64"):
        crit(z, z)
    # Raised before the push: nothing changed.
    assert buf.written == 0 and buf64.written == 0 and crit.buffer.written == 0 and int(crit.step) == 0
    with pytest.raises(TypeError, match="float64"):
        iscse.knn_topk(z, torch.randn(10, 8, dtype=torch.float64), 3, self_slots=None, backend="triton")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every specialisation the launchers use at the paper's shape compiles for sm_90 with Triton's ptxas (no GPU
    needed), in a subprocess with the compiler (not the interpreter) selected."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build has no bundled ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--compile-only", "--quick"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed to compile" in proc.stdout


def _second_derivative_of(fn, *leaves):
    """``fn(*leaves)`` (a scalar), its gradient with ``create_graph=True``, then that gradient's backward."""
    out = fn(*leaves)
    (g,) = torch.autograd.grad(out, leaves[:1], create_graph=True)
    g.square().sum().backward()


@pytest.mark.parametrize("op", ["smooth", "info_nce", "iscse_loss", "iscse_loss + torch term", "backward()"])
def test_double_backward_raises(op):
    """The kernels' gradients carry no graph, so differentiating them again would be silently wrong (zero): every
    Function of the Triton backend refuses ``create_graph=True`` with an error that names the torch backend, whether
    the incoming gradient is a constant (plain ``autograd.grad``) or itself requires grad; first-order backward is
    unaffected (the rest of this module)."""
    B, M, D, k = 5, 12, 13, 3
    z1, z2 = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    storage = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    buf = _full_buffer(storage, torch.float32)

    def loss(a, b):
        return iscse.iscse_loss(a, b, buf, k=k, backend="triton")

    with pytest.raises(RuntimeError, match="no double backward.*backend='torch'"):
        if op == "smooth":
            idx = torch.stack([torch.randperm(M)[:k] for _ in range(B)])
            _second_derivative_of(lambda q: triton_ops.smooth(q, storage, idx, torch.randn(B, k)).sum(), z2)
        elif op == "info_nce":
            _second_derivative_of(lambda a, b: triton_ops.info_nce(a, b), z1, z2)
        elif op == "iscse_loss":
            _second_derivative_of(loss, z1, z2)
        elif op == "iscse_loss + torch term":  # the gradient has a graph through the torch term only
            _second_derivative_of(lambda a, b: loss(a, b) + a.square().sum(), z1, z2)
        else:  # an incoming gradient that requires grad, through backward(create_graph=True)
            (loss(z1, z2) * z1.sum()).backward(create_graph=True)


def test_launches_enter_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device, whatever the tensors' device: every kernel launch of every entry
    point of the backend (the standalone ops, the fused Function, their backward) happens inside the context
    ``_on_device`` gives for its inputs. The context and the kernels are replaced by recorders (no GPU here, and
    the recorded launches need not run); ``_on_device`` itself is checked on a CUDA device without entering it."""
    from types import SimpleNamespace

    from iscse.kernels import info_nce as N
    from iscse.kernels import iscse_loss as L
    from iscse.kernels import knn_topk as K
    from iscse.kernels import smooth as S

    ctx = triton_ops._on_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    entered, launches = [], []

    class Device:
        def __init__(self, t):
            self.device = t.device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, list(entered)))

    monkeypatch.setattr(triton_ops, "_on_device", Device)
    for mod in (K, S, N, L):
        for name in [n for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")]:
            monkeypatch.setattr(mod, name, Recorder(name))
    B, M, D, k = 5, 12, 13, 3
    z1, z2 = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    storage = torch.randn(M, D)
    idx = torch.randint(0, M, (B, k))
    triton_ops.knn_topk(z2, storage, k, torch.arange(B))
    triton_ops.smooth(z2, storage, idx, torch.randn(B, k)).sum().backward()
    triton_ops.info_nce(z1, z2).backward()
    for hold in (2**62, -1):
        monkeypatch.setattr(L, "HOLD_MAX_BYTES", hold)
        l_cl, l_s = triton_ops.TritonBackend().iscse_loss(
            z1, z2, z2.detach(), storage, torch.arange(B), 0, k=k, temperature=0.05, attn_temperature=2.0,
            smooth=True)
        (l_cl + l_s).backward()
    names = {name for name, _ in launches}
    assert names == {"_knn_chunk_kernel", "_knn_merge_kernel", "_smooth_fwd_kernel", "_smooth_bwd_kernel",
                     "_info_nce_rows_kernel", "_info_nce_cols_kernel", "_info_nce_grads_kernel",
                     "_iscse_loss_scale_kernel"}, names
    outside = [name for name, devices in launches if devices != [z1.device]]
    assert not outside, f"launched outside the inputs' device context: {outside}"


def test_configs_are_copies_and_follow_the_module_limits(monkeypatch):
    """``knn_config`` and ``info_nce_config`` return copies (a caller's edit does not reach the next launch), and
    their caches are keyed on everything they read: a changed SM count or module limit is seen at once, with no
    cache to clear."""
    from iscse.kernels import _common as C
    from iscse.kernels import info_nce as N
    from iscse.kernels import knn_topk as K

    meta = torch.device("meta")
    for get in (lambda: K.knn_config(512, 65536, 768, 16, meta), lambda: N.info_nce_config(512, 1024, meta)):
        cfg = get()
        cfg["num_warps"] = -1
        assert get()["num_warps"] != -1 and get() is not get()
    knn, nce = K.knn_config(512, 65536, 768, 16, meta), N.info_nce_config(512, 1024, meta)
    monkeypatch.setattr(C, "ASSUMED_SMS", 2 * C.ASSUMED_SMS)
    assert K.knn_config(512, 65536, 768, 16, meta)["chunk"] < knn["chunk"]  # more SMs: more, smaller chunks
    assert N.info_nce_config(512, 1024, meta)["ROW_SPLITS"] > nce["ROW_SPLITS"]
    monkeypatch.setattr(K, "_MAX_CHUNKS", 1)
    assert K.knn_config(512, 65536, 768, 16, meta)["chunk"] >= 65536
    monkeypatch.setattr(N, "_PARTIAL_BYTES", 0)
    assert N.info_nce_config(512, 1024, meta)["ROW_SPLITS"] == 1
    monkeypatch.undo()
    assert K.knn_config(512, 65536, 768, 16, meta) == knn and N.info_nce_config(512, 1024, meta) == nce


def test_knn_refuses_more_neighbours_than_candidates():
    """The kernels' own entry points and the backend's ``knn_topk`` refuse k above the rows that can be neighbours
    (M, or M - 1 with the own slots excluded): they used to fill the missing places with slot 0's candidate (M = 5,
    own slots excluded, k = 5 gave [1, 2, 3, 4, 1]). At the limit every other slot comes back once."""
    from iscse.kernels import iscse_loss as L
    from iscse.kernels import knn_topk as K
    from iscse.kernels import smooth as S

    B, M, D = 3, 5, 13
    q = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    storage = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    own = torch.tensor([0, 2, 4])
    for call in (lambda k, s: K.knn_topk(q, storage, k, s), lambda k, s: K.knn_topk_candidates(q, storage, k, s),
                 lambda k, s: triton_ops.TritonBackend().knn_topk(q, storage, k, s),
                 lambda k, s: L.iscse_loss_forward(q, q, q, storage, s, k, 0.05, 2.0)):
        with pytest.raises(ValueError, match=r"k=5 is larger than the 4 buffer rows .*own slot excluded"):
            call(M, own)
        with pytest.raises(ValueError, match=r"k=6 is larger than the 5 buffer rows"):
            call(M + 1, None)
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 256\]"):
            call(0, None)
    _, idx = K.knn_topk(q, storage, M - 1, own)
    for i in range(B):
        assert sorted(idx[i].tolist()) == [s for s in range(M) if s != own[i]]
    _, idx = K.knn_topk(q, storage, M, None)
    assert all(sorted(row) == list(range(M)) for row in idx.tolist())
    _, _, idx, _, _ = S.smooth_forward(q, storage, M - 1, 2.0, candidates=K.knn_topk_candidates(q, storage, M - 1, own))
    assert all(sorted(row) == sorted(set(row)) and len(row) == M - 1 for row in idx.tolist())


def _wide_view(rows, stride, transpose=False):
    """``rows`` (``(n, d)``) copied into a view whose row stride (or, ``transpose``, feature stride) is ``stride``
    elements, so that ``(n - 1) * stride`` (``(d - 1) * stride``) reaches ``2**31``. The storage is allocated and never
    written but for the view's elements: the OS commits only the pages touched (a few MiB of the 4 GiB here)."""
    n, d = rows.shape
    try:
        base = torch.empty(stride * ((d if transpose else n) - 1) + (n if transpose else d), dtype=rows.dtype)
    except RuntimeError as exc:  # an OS that commits memory at allocation time
        pytest.skip(f"cannot reserve the address space for a {stride}-element stride: {exc}")
    view = base.as_strided((n, d), (1, stride) if transpose else (stride, 1))
    view.copy_(rows)
    return view


def test_offsets_past_two_to_the_31():
    """Strided inputs whose element offsets reach ``2**31`` (int32 offsets wrapped there, and the kernels read
    another address: a crash under the interpreter): ``z = h[:, 0]``-like views with ``(B - 1) * stride = 2**31``
    and a transposed buffer with ``(D - 1) * stride = 2**31`` give exactly the results of contiguous copies, in the
    kNN, the smooth op, the dual InfoNCE and the fused step (forward and backward)."""
    stride = 2**30
    B, D, M, k = 3, 3, 11, 4
    dt = torch.bfloat16  # half the address space of fp32
    z1, z2 = torch.randn(B, D).to(dt), torch.randn(B, D).to(dt)
    rows = torch.nn.functional.normalize(torch.randn(M, D), dim=1).to(dt)
    w1, w2, wbuf = _wide_view(z1, stride), _wide_view(z2, stride), _wide_view(rows, stride, transpose=True)
    assert (B - 1) * w1.stride(0) >= 2**31 and (D - 1) * wbuf.stride(1) >= 2**31
    assert_triton_ops_equal((w1, w2, wbuf), (z1, z2, rows), k)
