"""The "auto" decisions travel with the trainer's checkpoints: a resumed run reuses them without probing."""
from __future__ import annotations

import pytest
import torch

from test_backends import _Candidate, _Clock
from test_train import make_tiny_setup, one_thread, tiny_args  # noqa: F401

from iscse import backends
from iscse import train as T
from iscse.training.trainer import LOSS_STATE


@pytest.fixture
def fast_candidate(monkeypatch):
    """A correct CPU candidate ("fastcand", the torch backend underneath) that a fake clock times at 1 ms a step
    against the baseline's 10 ms."""
    clock = _Clock()
    monkeypatch.setattr(backends, "time", clock)
    base = backends.get_backend("torch")
    inner = base.iscse_loss

    def slow(*args, **kwargs):
        clock.now += 0.010
        return inner(*args, **kwargs)
    monkeypatch.setattr(base, "iscse_loss", slow)
    cand = _Candidate("fastcand", clock, cost=0.001)
    backends.clear_auto_decisions()
    backends.register_backend("fastcand", lambda: cand, auto_devices=("cpu",))
    yield cand
    backends.unregister_backend("fastcand")
    backends.clear_auto_decisions()


def test_trainer_checkpoints_carry_the_decisions(fast_candidate, tmp_path):
    setup = make_tiny_setup(tmp_path / "tiny", n_sentences=64)
    out = tmp_path / "run"
    # buffer 32, batch 8: full at step 4, where "auto" verifies and times fastcand and keeps it
    assert T.main(tiny_args(setup, out, max_steps=8, save_steps=3, ops="auto")) == 0
    saved = torch.load(out / "checkpoint-6" / LOSS_STATE, weights_only=True)["_extra_state"]["auto_decisions"]
    assert [(d["backend"], d["B"], d["M"], d["k"]) for d in saved] == [("fastcand", 8, 32, 4)]

    backends.clear_auto_decisions()
    calls = fast_candidate.calls
    assert T.main(["--resume_from", str(out / "checkpoint-6"), "--output_dir", str(tmp_path / "resumed"),
                   "--disable_tqdm"]) == 0
    assert fast_candidate.calls == calls + 2  # steps 7 and 8 on it, with no verification or timing
    assert list(backends.auto_decisions().values()) == ["fastcand"]


def test_sentence_transformers_checkpoints_carry_the_decisions(fast_candidate, tmp_path):
    from types import SimpleNamespace

    from test_integrations_st import _new_loss, _train_steps

    args = SimpleNamespace(output_dir=str(tmp_path), world_size=1, process_index=0, resume_from_checkpoint=None)
    original = _new_loss()
    _train_steps(original, 3)  # buffer 8, batch 4: full at step 2, decided there
    assert list(backends.auto_decisions().values()) == ["fastcand"]
    original.checkpoint_callback().on_save(args, SimpleNamespace(global_step=3), None)

    backends.clear_auto_decisions()
    resumed = _new_loss()
    resumed.checkpoint_callback().on_train_begin(args, SimpleNamespace(global_step=3), None)
    assert list(backends.auto_decisions().values()) == ["fastcand"]
    calls = fast_candidate.calls
    _train_steps(resumed, 1)
    assert fast_candidate.calls == calls + 1  # no verification or timing after the resume
