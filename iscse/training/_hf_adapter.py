"""Every use of ``transformers``' private code by the trainer, in one place, with the versions it was checked on.

The trainer uses public hooks wherever one does the job (``Trainer.save_model``, ``TrainerCallback`` events,
``TrainingArguments`` fields, ``argparse``'s public calls). What is left here has no public equivalent:

- :class:`CheckpointHooks` overrides ``Trainer._save_checkpoint`` and ``Trainer._load_from_checkpoint`` (and
  nothing else) and hands them to the subclass's public ``save_checkpoint`` / ``load_checkpoint``.
- :meth:`CheckpointHooks.library_checkpoint_into`: the library's ``Trainer._save_checkpoint`` run with
  ``args.output_dir`` pointing at a staging folder. A checkpoint must appear complete or not at all
  (``iscse.training.checkpoints``): the library's files go into a hidden staging folder, the trainer adds its own
  state and the manifest last, and one rename publishes it. ``on_save`` cannot do this: by then the library has
  written ``checkpoint-N`` in place (a re-save of the same step after a fallback resume would overwrite an older
  complete checkpoint file by file, a mix of old and new files under its old manifest) and rotated older
  checkpoints out (with ``--save_total_limit 1``, the last complete one before the new one is complete). The
  library writes into ``args.output_dir`` (through ``Trainer._get_output_dir``, private too) and takes no other
  folder, so the field points at the staging folder for the call and is put back after it.
- ``Trainer._load_from_checkpoint`` is replaced, not extended: the library's loader reads the checkpoint's
  ``model.safetensors`` by the state-dict names of the model it is given, but a checkpoint holds a
  ``SentenceEncoder`` folder (the backbone's weights under the backbone's own names, the MLP as its pooler, the
  sentence-transformers stages) and the IS-CSE memory buffer, and no public hook is given the checkpoint folder
  (``on_train_begin`` gets no path). Replacing the loader is the one way to load the weights once, from the right
  files, before the optimizer state is restored.
- :func:`rotate_checkpoints`: ``transformers.trainer_utils.rotate_checkpoints`` (not in the documented API) rotates
  the published checkpoints (:data:`UNDOCUMENTED_FUNCTIONS`: the keywords passed are checked).
- :func:`one_gpu_per_process`: ``TrainingArguments.n_gpu`` reads the private ``_n_gpu`` (the library sets it the same
  way itself for model-parallel models); without it one process on a machine with several GPUs wraps the model in
  ``nn.DataParallel`` and multiplies the batch by the GPU count.

``tests/test_hf_adapter.py`` compares the signatures below with the installed ``transformers`` and fails naming the
method, the signature found and the versions tested. setup.py's ``train`` extra reads :data:`TRANSFORMERS_REQUIREMENT`
from this file.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

from transformers import Trainer

__all__ = ["TESTED_TRANSFORMERS", "TRANSFORMERS_REQUIREMENT", "PRIVATE_METHODS", "UNDOCUMENTED_FUNCTIONS",
           "signature_problems", "CheckpointHooks", "rotate_checkpoints", "one_gpu_per_process"]

#: The transformers versions the trainer was run and tested on (5.17: the GPU machine; 5.24: the CPU machine and CI).
TESTED_TRANSFORMERS: Tuple[str, ...] = ("5.17", "5.24")
#: What setup.py's ``train`` extra requires: the tested versions and those between them (read by setup.py as text).
TRANSFORMERS_REQUIREMENT = "transformers>=5.17,<5.25"

#: ``Trainer`` methods the trainer overrides or calls whose parameters it relies on, with those parameters (in
#: order). ``save_model`` is public but passes the private-looking ``_internal_call``, which the override keeps.
PRIVATE_METHODS: Dict[str, Tuple[str, ...]] = {
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "save_model": ("self", "output_dir", "_internal_call"),
}
#: ``transformers.trainer_utils`` functions outside the documented API that the trainer calls, with the keywords it
#: passes (``rotate_checkpoints``: the library's rotation, run after a checkpoint is published).
UNDOCUMENTED_FUNCTIONS: Dict[str, Tuple[str, ...]] = {
    "rotate_checkpoints": ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"),
}


def signature_problems() -> List[str]:
    """One sentence for each :data:`PRIVATE_METHODS` entry whose parameters differ in the installed
    ``transformers``, each :data:`UNDOCUMENTED_FUNCTIONS` entry lacking a keyword, and ``TrainingArguments.n_gpu``
    no longer reading ``_n_gpu``; empty when all match."""
    import transformers
    from transformers import TrainingArguments

    tested = " and ".join(TESTED_TRANSFORMERS)
    problems = []
    for name, expected in PRIVATE_METHODS.items():
        method = getattr(Trainer, name, None)
        if method is None:
            problems.append(f"transformers {transformers.__version__} has no Trainer.{name} (iscse's trainer "
                            f"overrides it; tested with transformers {tested})")
            continue
        found = tuple(inspect.signature(method).parameters)
        if found != expected:
            problems.append(f"transformers {transformers.__version__} changed Trainer.{name}{_sig(found)}; iscse's "
                            f"trainer expects {name}{_sig(expected)} (tested with transformers {tested}); see "
                            "iscse/training/_hf_adapter.py")
    from transformers import trainer_utils

    for name, keywords in UNDOCUMENTED_FUNCTIONS.items():
        function = getattr(trainer_utils, name, None)
        found = () if function is None else tuple(inspect.signature(function).parameters)
        missing = [k for k in keywords if k not in found]
        if missing:
            problems.append(f"transformers {transformers.__version__}: trainer_utils.{name}"
                            f"{_sig(found) if function is not None else ' is gone'} lacks {', '.join(missing)} "
                            f"(iscse's trainer passes them; tested with transformers {tested})")
    try:
        reads_n_gpu = "_n_gpu" in inspect.getsource(TrainingArguments.n_gpu.fget)
    except (OSError, TypeError):  # no source shipped: nothing to compare
        reads_n_gpu = True
    if not reads_n_gpu:
        problems.append(f"transformers {transformers.__version__}: TrainingArguments.n_gpu no longer reads _n_gpu "
                        f"(tested with transformers {tested}); see one_gpu_per_process")
    return problems


def _sig(params: Tuple[str, ...]) -> str:
    return "(" + ", ".join(params) + ")"


class CheckpointHooks(Trainer):
    """``transformers.Trainer`` whose checkpoint save and load go to two public methods a subclass defines:
    ``save_checkpoint(model, trial)`` (in place of ``_save_checkpoint``; it may call
    :meth:`library_checkpoint_into`) and ``load_checkpoint(folder)`` (in place of ``_load_from_checkpoint``: the
    model's weights and whatever else the checkpoint holds; the optimizer, scheduler, scaler, RNG and trainer
    state stay the library's)."""

    def _save_checkpoint(self, model, trial) -> None:  # the library calls it at each save step, on every process
        self.save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:  # at the start of train()
        self.load_checkpoint(resume_from_checkpoint)

    def library_checkpoint_into(self, staging: str, model: Any, trial: Any) -> None:
        """Run the library's checkpoint save so that it writes ``staging/checkpoint-N`` (model through
        ``save_model``, optimizer, scheduler, scaler, RNG states, ``trainer_state.json``) instead of
        ``output_dir/checkpoint-N``; ``args.output_dir`` is put back whatever happens. Called on every process."""
        real = self.args.output_dir
        self.args.output_dir = staging
        try:
            Trainer._save_checkpoint(self, model, trial)
        finally:
            self.args.output_dir = real


def rotate_checkpoints(output_dir: Any, save_total_limit: Optional[int]) -> None:
    """Delete all but the newest ``save_total_limit`` ``checkpoint-N`` folders of ``output_dir`` (None: keep all),
    by step number (not modification time), with the library's rotation."""
    from transformers.trainer_utils import rotate_checkpoints as library_rotate

    library_rotate(output_dir=str(output_dir), save_total_limit=save_total_limit, best_model_checkpoint=None,
                   use_mtime=False)


def one_gpu_per_process(args: Any) -> None:
    """Make ``args.n_gpu`` 1: one process drives one GPU, and several GPUs are for ``torchrun`` (DDP), never
    ``nn.DataParallel`` (which the library picks when one process sees several GPUs)."""
    args._n_gpu = 1
