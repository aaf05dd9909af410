"""Hard negatives (:mod:`iscse.hard_negatives`) against a float64 transcription written here, with gradients.

- SimCSE's loss: the ``(B, 2B)`` logits ``[cos(z1, z2) / tau | cos(z1, z3) / tau + w I]`` (the weight on each
  anchor's own hard negative only, after the temperature: SimCSE's ``cl_forward``), odd shapes, B = 1, negative and
  positive weights, a non-unit upstream gradient, fp32 inputs against the fp64 transcription.
- IS-CSE with hard negatives as extra columns of ``L_cl`` and ``L_s``: several steps through the buffer filling up,
  the kNN transcribed with a full ``argsort`` (rank 0, the query itself, dropped), attention and mean aggregation,
  k = 1, the torch and the reference routes; PDDP grouping against the released PDDP transcription; the module
  driver advances the criterion's step and records the components; bad input is refused before the buffer changes.
- Data parallel: two gloo processes all-gather their slices with the trainer's ``gather_with_grad``; each rank's
  loss is the global one and the gradient of its slice is the transcription's gradient of those rows.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_rel_close, run_ranks

from iscse import ISCSELoss, MemoryBuffer, reference
from iscse.hard_negatives import hard_negative_info_nce, hard_negative_step, iscse_hard_negative_loss

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ transcription


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def transcribed_ce(z1, positives, z3, tau, w):
    """``mean_i -log softmax([z1.pos^T / tau | z1.z3^T / tau + w I])_{i, i}``, cosines, in the inputs' dtype."""
    a = _unit(z1)
    logits = torch.cat([a @ _unit(positives).T / tau,
                        a @ _unit(z3).T / tau + w * torch.eye(z1.shape[0], dtype=z1.dtype)], dim=1)
    return -torch.log_softmax(logits, dim=1).diagonal().mean()


class TranscribedISCSE:
    """IS-CSE with hard-negative columns, step by step: the buffer as the reference holds it (oldest first, shifted
    with ``cat``), neighbours by a full ``argsort`` with rank 0 dropped, smoothing over ``[q2_i; neighbours]``."""

    def __init__(self, size, dim, k, tau=0.05, t_attn=2.0, alpha=0.1, w=0.0, aggregation="attention"):
        self.lbuf = torch.zeros(size, dim, dtype=torch.float64)
        self.written, self.size, self.k = 0, size, k
        self.tau, self.t_attn, self.alpha, self.w, self.aggregation = tau, t_attn, alpha, w, aggregation

    def step(self, z1, z2, z3):
        b = z1.shape[0]
        q2 = _unit(z2)
        self.lbuf = torch.cat([self.lbuf[b:], q2.detach()])
        self.written += b
        l_cl = transcribed_ce(z1, z2, z3, self.tau, self.w)
        if self.written < self.size:
            return l_cl, l_cl, torch.zeros((), dtype=l_cl.dtype)
        order = torch.argsort(q2.detach() @ self.lbuf.T, dim=1, descending=True)[:, 1:self.k + 1]
        group = torch.cat([q2[:, None], self.lbuf[order]], dim=1)  # (B, k + 1, D); row 0 carries gradient
        if self.aggregation == "attention":
            weights = torch.softmax((group @ q2[:, :, None]).squeeze(-1) / self.t_attn, dim=1)
        else:
            weights = torch.full(group.shape[:2], 1.0 / group.shape[1], dtype=group.dtype)
        z_star = (weights[:, :, None] * group).sum(dim=1)
        l_s = transcribed_ce(z1, z_star, z3, self.tau, self.w)
        return l_cl + self.alpha * l_s, l_cl, l_s


def _leaves(*shape, dtype=torch.float64):
    return [torch.randn(*shape, dtype=torch.float64).to(dtype).requires_grad_(True) for _ in range(3)]


def _grads(loss, zs, retain: bool = False):
    return torch.autograd.grad(loss, zs, retain_graph=retain)


# ------------------------------------------------------------------------------------------------ SimCSE's loss


@pytest.mark.parametrize("b, d, w", [(1, 5, 0.0), (6, 33, 0.0), (17, 8, 0.8), (9, 64, -2.0)])
def test_simcse_hard_negative_loss_and_gradients_match_the_transcription(b, d, w):
    zs = _leaves(b, d)
    upstream = 1.7
    got = hard_negative_info_nce(*zs, 0.05, w) * upstream
    want = transcribed_ce(*zs, 0.05, w) * upstream
    assert got.dtype == torch.float64
    assert_rel_close(got, want, 1e-12, "loss")
    for name, g, e in zip(("z1", "z2", "z3"), _grads(got, zs), _grads(want, zs)):
        assert_rel_close(g, e, 1e-10, f"d{name}")
    if w:  # the weight reaches the loss (and only through each anchor's own hard negative)
        assert abs(hard_negative_info_nce(*zs, 0.05, 0.0).item() - got.item() / upstream) > 1e-6


def test_simcse_hard_negative_loss_in_fp32_is_close_to_fp64():
    zs64 = _leaves(12, 40)
    zs32 = [z.detach().float().requires_grad_(True) for z in zs64]
    got = hard_negative_info_nce(*zs32, 0.05, 0.5)
    want = transcribed_ce(*zs64, 0.05, 0.5)
    assert got.dtype == torch.float32
    assert_rel_close(got, want, 1e-5, "loss")
    for g, e in zip(_grads(got, zs32), _grads(want, zs64)):
        assert_rel_close(g, e, 1e-4, "grad")


def test_simcse_hard_negative_weight_sits_on_the_own_hard_negative_only():
    """Moving the weight to another column would change the loss: compare with a transcription that puts w on the
    whole hard-negative block (what a wrong broadcast would do)."""
    z1, z2, z3 = (torch.randn(5, 8, dtype=torch.float64) for _ in range(3))
    a = _unit(z1)
    whole = torch.cat([a @ _unit(z2).T / 0.05, a @ _unit(z3).T / 0.05 + 1.0], dim=1)
    wrong = -torch.log_softmax(whole, dim=1).diagonal().mean()
    got = hard_negative_info_nce(z1, z2, z3, 0.05, 1.0)
    assert_rel_close(got, transcribed_ce(z1, z2, z3, 0.05, 1.0), 1e-12, "loss")
    assert abs(got.item() - wrong.item()) > 1e-3


# ------------------------------------------------------------------------------------------------ IS-CSE


@pytest.mark.parametrize("b, d, size, k, aggregation, backend, w", [
    (6, 33, 24, 5, "attention", "torch", 0.0),
    (6, 33, 24, 5, "attention", "reference", 0.7),
    (5, 16, 15, 1, "mean", "torch", -1.0),
    (1, 7, 4, 2, "attention", "torch", 0.3),
])
def test_iscse_hard_negative_columns_match_the_transcription_over_steps(b, d, size, k, aggregation, backend, w):
    buffer = MemoryBuffer(size, d, dtype=torch.float64)
    ref = TranscribedISCSE(size, d, k, alpha=0.3, w=w, aggregation=aggregation)
    steps = size // b + 2  # while the buffer fills (L_s = 0) and after
    seen_smoothing = False
    for step in range(steps):
        zs = _leaves(b, d)
        out = iscse_hard_negative_loss(*zs, buffer, k=k, temperature=0.05, alpha=0.3, hard_negative_weight=w,
                                       backend=backend, aggregation=aggregation, return_components=True)
        want, want_cl, want_s = ref.step(*zs)
        assert_rel_close(out.contrastive, want_cl, 1e-12, f"step {step} L_cl")
        assert_rel_close(out.smooth, want_s, 1e-12, f"step {step} L_s")
        assert_rel_close(out.loss, want, 1e-12, f"step {step} loss")
        seen_smoothing |= bool(want_s != 0)
        upstream = 0.9 + 0.1 * step
        for name, g, e in zip(("z1", "z2", "z3"), _grads(out.loss * upstream, zs), _grads(want * upstream, zs)):
            assert_rel_close(g, e, 1e-10, f"step {step} d{name}")
        torch.testing.assert_close(buffer.rows(), ref.lbuf, rtol=0, atol=1e-15)
    assert seen_smoothing


def test_iscse_hard_negatives_with_pddp_match_the_released_pddp():
    b, d, size, k = 4, 6, 12, 3
    buffers = {name: MemoryBuffer(size, d, dtype=torch.float64) for name in ("torch", "reference")}
    lbuf = torch.zeros(size, d, dtype=torch.float64)
    for step in range(5):
        zs = _leaves(b, d)
        q2 = _unit(zs[1])
        lbuf = torch.cat([lbuf[b:], q2.detach()])
        want_cl = transcribed_ce(*zs, 0.05, 0.4)
        if (step + 1) * b >= size:
            z_star = reference.pddp_aggregate(q2, lbuf, k, 2.0, "attn")
            want = want_cl + 0.1 * transcribed_ce(zs[0], z_star, zs[2], 0.05, 0.4)
        else:
            want = want_cl
        for name, buffer in buffers.items():
            got = iscse_hard_negative_loss(*zs, buffer, k=k, alpha=0.1, hard_negative_weight=0.4, backend=name,
                                           grouping="pddp")
            assert_rel_close(got, want, 1e-10, f"{name} step {step} loss")
            for g, e in zip(_grads(got, zs), _grads(want, zs, retain=True)):
                assert_rel_close(g, e, 1e-9, f"{name} step {step} grad")


def test_the_module_driver_updates_the_criterion_like_forward():
    d = 10
    criterion = ISCSELoss(d, buffer_size=16, k=3, alpha=0.2, backend="torch", buffer_dtype=torch.float64)
    ref = TranscribedISCSE(16, d, 3, alpha=0.2, w=0.5)
    for step in range(4):
        zs = _leaves(4, d)
        loss = hard_negative_step(criterion, *zs, hard_negative_weight=0.5)
        want, want_cl, want_s = ref.step(*zs)
        assert_rel_close(loss, want, 1e-12, "loss")
        assert_rel_close(criterion.last_components[0], want_cl, 1e-12, "L_cl")
        assert_rel_close(criterion.last_components[1], want_s, 1e-12, "L_s")
        assert criterion.step == step + 1
    criterion.eval()
    before = criterion.buffer.rows().clone()
    with torch.no_grad():
        hard_negative_step(criterion, *_leaves(4, d))
    assert criterion.step == 4 and torch.equal(criterion.buffer.rows(), before)  # no update in eval mode


@pytest.mark.parametrize("bad, message", [
    (dict(z3=torch.randn(3, 8)), "z3"),
    (dict(hard_negative_weight=float("nan")), "hard_negative_weight"),
    (dict(k=8), "k=8"),
])
def test_bad_input_is_refused_before_the_buffer_changes(bad, message):
    buffer = MemoryBuffer(8, 8)
    args = dict(z1=torch.randn(4, 8), z2=torch.randn(4, 8), z3=torch.randn(4, 8), k=2, hard_negative_weight=0.0)
    args.update(bad)
    z1, z2, z3 = args.pop("z1"), args.pop("z2"), args.pop("z3")
    with pytest.raises((ValueError, TypeError), match=message):
        iscse_hard_negative_loss(z1, z2, z3, buffer, **args)
    assert buffer.written == 0


# ------------------------------------------------------------------------------------------------ data parallel


@pytest.mark.slow
def test_two_processes_gather_and_get_the_global_loss_and_their_rows_gradients(tmp_path):
    import hn_ddp_worker as W

    run_ranks(REPO / "tests" / "hn_ddp_worker.py", lambda rank, port: [tmp_path], timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    from st_ddp_worker import GROUP_THREADS

    for r, result in enumerate(ranks):  # no thread of the destroyed group runs on into the interpreter's exit
        left = [name for name in result.pop("threads") or () if name in GROUP_THREADS]
        assert not left, f"rank {r}: the process group's threads outlive destroy_process_group(): {left}"

    data = W.problem()
    rows = W.GLOBAL_BATCH // 2
    ref = TranscribedISCSE(W.BUFFER, W.DIM, W.K, tau=W.TEMP, alpha=W.ALPHA, w=W.WEIGHT)
    smoothed = 0
    for step in range(W.STEPS):
        for name in ("simcse", "iscse"):
            zs = [data[step, j].clone().requires_grad_(True) for j in range(3)]
            if name == "simcse":
                want = transcribed_ce(*zs, W.TEMP, W.WEIGHT)
            else:
                want, _, l_s = ref.step(*zs)
                smoothed += int(l_s != 0)
            grads = torch.stack(_grads(want, zs))  # (3, GLOBAL_BATCH, DIM)
            for r, got in enumerate(ranks):
                assert_rel_close(got[name][step], want, 1e-12, f"rank {r} step {step} {name} loss")
                assert_rel_close(got[f"{name}_grad"][step], grads[:, r * rows:(r + 1) * rows], 1e-10,
                                 f"rank {r} step {step} {name} gradient of its slice")
    assert smoothed == W.STEPS - 1  # L_s on from step 2
