"""The trainer's dependence on ``transformers``' private code stays in ``iscse/training/_hf_adapter.py`` and matches
the installed version.

- the private methods the adapter overrides or calls have the parameters it expects (a different ``transformers``
  fails here naming the method, the signature found and the versions tested), and the check itself notices a change;
- ``ISCSETrainer`` overrides no other private ``Trainer`` method, and none of the trainer modules touches the
  private attributes the adapter replaced;
- setup.py's ``train`` extra is the adapter's requirement, which admits the tested versions and the installed one;
- the staging redirect of ``output_dir`` is undone when the library's save raises;
- the public replacements: ``Optional[bool]`` flags alone mean True and ``_explicit`` sees only given flags,
  the progress bar follows the steps, ``one_gpu_per_process`` sets ``n_gpu``.
"""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402

from iscse.training import _hf_adapter as A  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_private_signatures_match_the_installed_transformers():
    problems = A.signature_problems()
    assert not problems, "\n".join(problems)


def test_a_changed_signature_is_named_with_the_tested_versions(monkeypatch):
    def changed(self, model, trial, metrics=None):  # what a future version might do
        pass

    monkeypatch.setattr(Trainer, "_save_checkpoint", changed)
    monkeypatch.delattr(Trainer, "_load_from_checkpoint")
    problems = A.signature_problems()
    assert len(problems) == 2, problems
    changed_msg = next(p for p in problems if "_save_checkpoint" in p)
    assert "_save_checkpoint(self, model, trial, metrics)" in changed_msg
    assert "expects _save_checkpoint(self, model, trial)" in changed_msg
    assert "tested with transformers 5.17 and 5.24" in changed_msg
    assert any("no Trainer._load_from_checkpoint" in p for p in problems)


def test_a_dropped_keyword_of_rotate_checkpoints_is_named(monkeypatch):
    from transformers import trainer_utils

    monkeypatch.setattr(trainer_utils, "rotate_checkpoints", lambda output_dir, save_total_limit=None: None)
    problems = A.signature_problems()
    assert len(problems) == 1 and "rotate_checkpoints(output_dir, save_total_limit) lacks best_model_checkpoint, " \
        "use_mtime" in problems[0], problems


def test_the_trainer_overrides_no_other_private_method():
    from iscse.training.trainer import ISCSETrainer

    private = {name for klass in ISCSETrainer.__mro__ if klass is not Trainer and issubclass(klass, Trainer)
               for name in vars(klass) if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert private == {"_save_checkpoint", "_load_from_checkpoint"}
    assert set(vars(A.CheckpointHooks)) >= private  # and only the adapter does it
    assert not private & set(vars(ISCSETrainer))


@pytest.mark.parametrize("pattern", [r"\._n_gpu\b", r"\._actions\b", r"training_bar", r"\._fingerprint\b",
                                     r"_save_checkpoint", r"_load_from_checkpoint", r"\b_save\(",
                                     r"trainer_utils"])
def test_no_trainer_module_touches_what_the_adapter_replaced(pattern):
    found = [f"{p.name}:{i}" for p in sorted((ROOT / "iscse" / "training").glob("*.py")) if p.name != "_hf_adapter.py"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if re.search(pattern, line)]
    assert not found, f"{pattern} outside iscse/training/_hf_adapter.py: {found}"


def test_setup_requires_the_tested_versions():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert "TRANSFORMERS_REQUIREMENT" in setup and '"train": [TRANSFORMERS,' in setup
    assert not re.search(r'"transformers>=5', setup)  # stated once, in the adapter
    name, spec = re.match(r"([a-z]+)(.*)", A.TRANSFORMERS_REQUIREMENT).groups()
    assert name == "transformers"
    spec = SpecifierSet(spec)
    for tested in A.TESTED_TRANSFORMERS:
        assert Version(tested) in spec
    assert Version(transformers.__version__) in spec, (
        f"the installed transformers {transformers.__version__} is outside {A.TRANSFORMERS_REQUIREMENT}")


def test_the_staging_redirect_is_undone_when_the_library_save_raises(monkeypatch):
    seen = []

    def failing(self, model, trial):
        seen.append(self.args.output_dir)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Trainer, "_save_checkpoint", failing)
    fake = types.SimpleNamespace(args=types.SimpleNamespace(output_dir="/run"))
    with pytest.raises(OSError, match="simulated"):
        A.CheckpointHooks.library_checkpoint_into(fake, "/run/.staging-checkpoint-3", None, None)
    assert seen == ["/run/.staging-checkpoint-3"] and fake.args.output_dir == "/run"


def test_optional_bool_flags_and_explicit_flags():
    from iscse.training.arguments import _explicit, build_parser

    parsed = build_parser().parse_args(["--tf32"])  # Optional[bool], default None
    assert parsed.tf32 is True and parsed.k == 16
    assert build_parser().parse_args(["--tf32", "false"]).tf32 is False
    assert _explicit([]) == {}
    assert _explicit(["--k", "4", "--no-reinit_mlp", "--tf32", "--alpha_constant", "0.2"]) == {
        "k": 4, "reinit_mlp": False, "tf32": True, "alpha": 0.2}


def test_progress_bar_follows_the_steps_and_shows_the_loss():
    from iscse.training.callbacks import QuietProgress

    bar = QuietProgress()
    state = types.SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=4)  # a resumed run
    bar.on_train_begin(None, state, None)
    tqdm_bar = bar.bar
    bar.on_step_end(None, state, None)
    state.global_step = 5
    bar.on_step_end(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 1.25})
    assert tqdm_bar.n == 5 and tqdm_bar.total == 10 and "1.2500" in str(tqdm_bar.postfix)
    bar.on_train_end(None, state, None)
    assert bar.bar is None
    other = QuietProgress()
    other.on_train_begin(None, types.SimpleNamespace(is_world_process_zero=False, max_steps=10, global_step=0), None)
    assert other.bar is None


def test_one_gpu_per_process(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    A.one_gpu_per_process(args)
    assert args.n_gpu == 1
