"""The IS-CSE / SimCSE trainer: ``python -m iscse.train``.

What it does (He et al., AAAI 2023, on SimCSE's recipe, Gao et al. 2021; DESIGN.md §1): unsupervised contrastive
training of a BERT/RoBERTa-like encoder on one sentence a line. Each step encodes every sentence twice in one
forward pass (the batch is duplicated row by row; dropout makes the two views differ), pools (``--pooler_type``, with
SimCSE's MLP head for ``cls``), and minimises ``L = L_cl + alpha * L_s`` with :class:`iscse.ISCSELoss` (or plain
SimCSE InfoNCE with ``--objective simcse``). AdamW, linear decay (warm-up ``--warmup_steps``, 0 as in the released
scripts), gradient-norm clip ``--max_grad_norm`` (1.0), optional autocast (``--bf16``, or ``--fp16`` with a gradient
scaler). Every ``--eval_steps`` the model is scored on STS-B dev (and SICK-R dev) and the best one by STS-B dev is
kept in ``output_dir/model`` (``SentenceEncoder.save_pretrained``: loadable by ``AutoModel``, ``SentenceTransformer``
and ``iscse.models.SentenceEncoder``); at the end that model is scored on the STS test sets and the table printed.

Presets carry the released run scripts (dll-wu/IS-CSE ``run_unsup_*.sh``): 1 epoch of wiki1m, max length 32, CLS
pooler with the MLP in training only, temperature 0.05, evaluation every 125 steps, and

============== ===================== ===== ====== ==================== =====
preset          model                 batch  lr     alpha                fp16
============== ===================== ===== ====== ==================== =====
bert-base       bert-base-uncased     64     3e-5   0.1                  no
bert-large      bert-large-uncased    64     1e-5   cosine 0.005->0.05   yes
roberta-base    roberta-base          512    1e-5   0.1                  no
roberta-large   roberta-large         512    3e-5   cosine 0.005->0.05   yes
============== ===================== ===== ====== ==================== =====

(DESIGN.md quotes lr 3e-5 for all four; the scripts use 1e-5 for BERT-large and RoBERTa-base, and pass ``--fp16`` for
both large models: the presets follow the scripts.) Flags given on the command line override the preset.

Files in ``--output_dir``: ``train.log`` (what a person reads), ``metrics.jsonl`` (one JSON object a line:
``{"event": "train", "step", "epoch", "loss", "L_cl", "L_s", "alpha", "lr", "grad_norm"}`` every step,
``{"event": "eval", "step", "eval_stsb_spearman", "eval_sickr_spearman", "eval_avg_sts"}`` at each evaluation,
``{"event": "test", ...}`` at the end), ``train_config.json``, ``model/`` (the best checkpoint), ``sts_test.json``,
``train_results.json``, and ``checkpoints/step-N/`` (every ``--save_steps``, the last ``--save_total_limit`` kept).

Exact resume: ``--resume_from DIR`` (a ``checkpoints/step-N`` folder, or an output folder, whose newest checkpoint
is taken) restores the model, optimizer, scheduler, gradient scaler, the IS-CSE memory buffer and its step, the data
position (epoch and batch; each epoch's shuffle is seeded with ``seed + epoch``), the best dev score so far, and the
RNG states of every rank (Python, NumPy, torch CPU and CUDA: dropout is the augmentation, so the RNG must replay).
A run stopped at step ``s`` and resumed then logs the same per-step losses as one that never stopped. The settings
that shape the trajectory are taken from the checkpoint; passing a different value for one of them is an error.
Checkpoints are written to a temporary folder beside the target, flushed to disk and renamed into place, so a crash
while saving leaves the previous checkpoint intact. Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint
and stops; a second Ctrl-C stops at once.

Data parallel: ``torchrun --nproc-per-node N -m iscse.train ...`` (DDP; NCCL on GPUs, gloo on CPU).
``--per_device_train_batch_size`` is per process; ``z1, z2`` are all-gathered with the local slice kept
differentiable, so the loss and the memory buffer see the global batch and every rank holds the same buffer (as the
reference code does). Each rank then backpropagates the same global loss through its own slice and DDP averages the
gradients (``--ddp_gradient mean``, the reference's behaviour: the update is the single-process one on the global
batch up to AdamW's epsilon and the clip threshold, which both see a gradient ``1/N`` as large), or sums them
(``--ddp_gradient sum``: exactly the single-process gradient of the global batch). Rank ``r`` draws its dropout from
``seed + r``.

Without ``--train_file`` wiki1m is downloaded (as SimCSE's ``data/download_wiki.sh``); without ``--data_dir`` (and
``$ISCSE_DATA_DIR``) SentEval's data is (as SimCSE's ``download_dataset.sh``), both into ``--cache_dir``. Offline,
pass local paths; the error says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from .distributed import DistContext, any_flag, barrier, broadcast_object, cleanup, gather_with_grad, init_distributed

__all__ = ["TrainConfig", "PRESETS", "ConfigError", "parse_args", "resolve_config", "validate_config",
           "find_checkpoint", "Trainer", "train", "main"]

logger = logging.getLogger("iscse.train")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"

POOLERS = ("cls", "cls_before_pooler", "avg", "avg_top2", "avg_first_last")  # iscse.models.POOLERS
OPS = ("auto", "reference", "torch", "triton")
OBJECTIVES = ("iscse", "simcse")

_PAPER = dict(num_train_epochs=1.0, max_seq_length=32, eval_steps=125, pooler_type="cls", mlp_only_train=True,
              temp=0.05, objective="iscse", buffer_size=1024, k=16, alpha_start=0.005, alpha_end=0.05)
#: The released run scripts (dll-wu/IS-CSE run_unsup_*.sh) as flag values; explicit flags override them.
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
}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; the command-line flags have the same names (see ``--help``).

    Build one with :func:`parse_args` (flags, presets and resume merged and validated) or directly, then pass it to
    :func:`train`. Defaults are SimCSE's / the Hugging Face trainer's where those exist.
    """

    model_name_or_path: Optional[str] = None
    train_file: Optional[str] = None
    output_dir: Optional[str] = None
    preset: Optional[str] = None
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 64
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_seq_length: int = 32
    pooler_type: str = "cls"
    mlp_only_train: bool = False
    reinit_mlp: bool = True
    temp: float = 0.05
    objective: str = "iscse"
    alpha: float = 0.1
    alpha_mode_dynamic: bool = False
    alpha_start: float = 0.005
    alpha_end: float = 0.05
    attn_temp: float = 2.0
    buffer_size: int = 1024
    k: int = 16
    ops: str = "auto"
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    ddp_gradient: str = "mean"
    eval_steps: int = 125
    eval_at_start: bool = False
    data_dir: Optional[str] = None
    per_device_eval_batch_size: int = 128
    skip_test_eval: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    resume_from: Optional[str] = None
    overwrite_output_dir: bool = False
    cache_dir: Optional[str] = None
    overwrite_cache: bool = False
    preprocessing_num_workers: Optional[int] = None
    device: str = "auto"
    disable_tqdm: bool = False


#: Settings that may differ between a checkpoint and the run that resumes it (they do not change the trajectory).
_RESUMABLE_CHANGES = frozenset({
    "train_file", "output_dir", "eval_steps", "eval_at_start", "data_dir", "per_device_eval_batch_size",
    "skip_test_eval", "save_steps", "save_total_limit", "logging_steps", "resume_from", "overwrite_output_dir",
    "cache_dir", "overwrite_cache", "preprocessing_num_workers", "device", "ops", "disable_tqdm",
})


class ConfigError(ValueError):
    """A bad flag value or combination; the message names the flag. Raised before anything is written."""


# ----------------------------------------------------------------------------------------------------- arguments

def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m iscse.train",
        description="Unsupervised IS-CSE / SimCSE training with STS-B dev model selection. Flags are named as in "
                    "the IS-CSE run scripts; --preset fills in a paper run, explicit flags override it.",
    )
    d = TrainConfig()
    B = argparse.BooleanOptionalAction

    def add(*flags, default_note=True, **kw):
        dest = flags[0].lstrip("-")
        dest = kw.get("dest", dest)
        value = getattr(d, dest, None)
        if default_note and "help" in kw and "(default" not in kw["help"] and value is not None:
            kw["help"] += f" (default: {value!r})"
        p.add_argument(*flags, default=None, **kw)

    g = p.add_argument_group("run")
    add("--preset", choices=sorted(PRESETS), default_note=False,
        help="a paper run: " + "; ".join(f"{n}: {c['model_name_or_path']}, batch {c['per_device_train_batch_size']}, "
                                         f"lr {c['learning_rate']:g}, "
                                         + ("cosine alpha" if c["alpha_mode_dynamic"] else f"alpha {c['alpha']}")
                                         + (", fp16" if c["fp16"] else "") for n, c in PRESETS.items()))
    add("--model_name_or_path", help="Hugging Face model name or local folder")
    add("--train_file", help="text file, one sentence a line (default: wiki1m, downloaded into --cache_dir)")
    add("--output_dir", help="where the log, metrics, checkpoints and the best model go")
    add("--overwrite_output_dir", action=B, help="train into a non-empty --output_dir (earlier checkpoints there are "
                                                  "moved aside, not deleted)")
    add("--resume_from", help="continue exactly from a checkpoint folder (checkpoints/step-N) or from an output "
                              "folder's newest checkpoint")
    add("--seed", type=int, help="seed for initialisation, shuffling (seed + epoch) and dropout (seed + rank)")
    add("--device", help="auto, cpu, cuda or cuda:N")
    add("--cache_dir", help="downloads and the tokenized-data cache (default: $ISCSE_CACHE or ~/.cache/iscse)")
    add("--disable_tqdm", action=B, help="no progress bars")

    g = p.add_argument_group("model and objective")
    add("--pooler_type", choices=POOLERS, help="sentence embedding: SimCSE's poolers")
    add("--mlp_only_train", action=B, help="cls pooler: apply the MLP head in training only (SimCSE unsup)")
    add("--reinit_mlp", action=B, help="start the MLP head fresh as SimCSE's BertForCL does; --no-reinit_mlp keeps a "
                                       "checkpoint's pooler weights")
    add("--objective", choices=OBJECTIVES, help="iscse: L_cl + alpha L_s; simcse: L_cl only")
    add("--temp", type=float, help="InfoNCE temperature")
    add("--alpha", "--alpha_constant", type=float, dest="alpha",
        help="constant weight of L_s (the scripts' alpha_constant)")
    add("--alpha_mode_dynamic", action=B, help="cosine schedule for alpha from --alpha_start to --alpha_end "
                                               "(the paper's large-model runs)")
    add("--alpha_start", type=float, help="cosine schedule start")
    add("--alpha_end", type=float, help="cosine schedule end (and cap)")
    add("--attn_temp", type=float, help="divisor of the smoothing attention logits")
    add("--buffer_size", type=int, help="memory buffer rows M")
    add("--k", type=int, help="neighbours per sentence")
    add("--ops", choices=OPS, help="ISCSELoss backend (auto: triton on CUDA when usable, else torch)")

    g = p.add_argument_group("optimisation")
    add("--num_train_epochs", type=float, help="epochs (ignored when --max_steps > 0)")
    add("--max_steps", type=int, help="total steps; > 0 overrides --num_train_epochs")
    add("--per_device_train_batch_size", type=int, help="sentences per step per process")
    add("--learning_rate", type=float, help="AdamW peak learning rate")
    add("--weight_decay", type=float, help="AdamW weight decay (not on biases and LayerNorm)")
    add("--adam_beta1", type=float, help="AdamW beta1")
    add("--adam_beta2", type=float, help="AdamW beta2")
    add("--adam_epsilon", type=float, help="AdamW epsilon")
    add("--warmup_steps", type=int, help="linear warm-up steps before the linear decay")
    add("--max_grad_norm", type=float, help="gradient-norm clip; 0 turns it off")
    add("--max_seq_length", type=int, help="truncate training sentences to this many tokens")
    add("--fp16", action=B, help="float16 autocast with a gradient scaler")
    add("--bf16", action=B, help="bfloat16 autocast")
    add("--ddp_gradient", choices=("mean", "sum"), help="under torchrun: mean = the reference's averaged "
                                                         "gradients; sum = exactly the global-batch gradient")

    g = p.add_argument_group("evaluation, logging and checkpoints")
    add("--eval_steps", type=int, help="score STS-B/SICK-R dev every this many steps and keep the best; 0: never")
    add("--eval_at_start", action=B, help="also score the model before training (step 0)")
    add("--data_dir", help="SentEval's data/downstream folder (default: $ISCSE_DATA_DIR, else downloaded)")
    add("--per_device_eval_batch_size", type=int, help="sentences per forward pass in evaluation")
    add("--skip_test_eval", action=B, help="do not score the best model on the STS test sets at the end")
    add("--save_steps", type=int, help="write a resumable checkpoint every this many steps; 0: never")
    add("--save_total_limit", type=int, help="checkpoints kept")
    add("--logging_steps", type=int, help="log line every this many steps (metrics.jsonl has every step)")
    add("--overwrite_cache", action=B, help="re-tokenize the training file")
    add("--preprocessing_num_workers", type=int, help="processes for tokenization")
    p.add_argument("--version", action="version", version=f"iscse {__version__}")
    return p


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: ``path`` itself if it holds ``trainer_state.json``, else the newest
    ``checkpoints/step-N`` (or ``step-N``) under it. Raises :class:`ConfigError` naming ``--resume_from``."""
    path = Path(path).expanduser()
    if (path / "trainer_state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        steps = []
        if root.is_dir():
            for child in root.iterdir():
                m = re.fullmatch(r"step-(\d+)", child.name)
                if m and (child / "trainer_state.json").is_file():
                    steps.append((int(m.group(1)), child))
        if steps:
            return max(steps)[1]
    raise ConfigError(f"--resume_from {str(path)!r} holds no checkpoint (a checkpoints/step-N folder with "
                      "trainer_state.json, or an output folder that has one)")


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse flags into a validated :class:`TrainConfig`: explicit flags, then ``--preset``, then the defaults; with
    ``--resume_from``, the checkpoint's settings (explicit flags may change only those that leave the trajectory
    alone). Raises :class:`ConfigError` naming the flag; ``argparse`` exits on unknown flags or bad types."""
    ns = _build_parser().parse_args(argv)
    explicit = {k: v for k, v in vars(ns).items() if v is not None}
    return resolve_config(explicit)


def resolve_config(explicit: Dict[str, Any]) -> TrainConfig:
    """Merge explicit settings with the preset / checkpoint / defaults and validate (see :func:`parse_args`)."""
    unknown = set(explicit) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}")
    if explicit.get("resume_from"):
        ckpt = find_checkpoint(explicit["resume_from"])
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        saved = state["config"]
        values = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
        for key, value in explicit.items():
            if key in _RESUMABLE_CHANGES or key == "preset" and value == saved.get("preset"):
                values[key] = value
            elif _differs(value, saved.get(key)):
                raise ConfigError(f"--{key} {value!r} differs from the checkpoint's {saved.get(key)!r}: a resumed run "
                                  "keeps the settings it was started with; leave --" + key + " out to continue")
        values["resume_from"] = str(ckpt)
        if "output_dir" not in explicit:
            values["output_dir"] = saved.get("output_dir")
        cfg = TrainConfig(**values)
    else:
        preset = explicit.get("preset")
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values = dict(PRESETS[preset]) if preset else {}
        values.update(explicit)
        cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a != b


def validate_config(cfg: TrainConfig) -> None:
    """Check every value and combination; raises :class:`ConfigError` naming the flag. Touches nothing."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    if cfg.preset is not None:
        need(cfg.preset in PRESETS, f"--preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
    need(bool(cfg.model_name_or_path), "--model_name_or_path is required (a Hugging Face name or a local folder), "
                                      "or pass --preset")
    need(bool(cfg.output_dir), "--output_dir is required (or pass --preset, which names one)")
    if cfg.train_file is not None:
        need(Path(cfg.train_file).expanduser().is_file(), f"--train_file {cfg.train_file!r} does not exist")
    if cfg.data_dir is not None:
        need(Path(cfg.data_dir).expanduser().is_dir(), f"--data_dir {cfg.data_dir!r} is not a folder (SentEval's "
                                                       "data/downstream, holding STS/ and SICK/)")
    for name in ("per_device_train_batch_size", "max_seq_length", "buffer_size", "k", "per_device_eval_batch_size"):
        v = getattr(cfg, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"--{name} must be a positive int, got {v!r}")
    need(cfg.max_seq_length >= 2, f"--max_seq_length must be >= 2 (room for [CLS] and [SEP]), got {cfg.max_seq_length}")
    for name in ("max_steps", "warmup_steps", "eval_steps", "save_steps", "save_total_limit", "logging_steps", "seed"):
        v = getattr(cfg, name)
        need(isinstance(v, int) and not isinstance(v, bool), f"--{name} must be an int, got {v!r}")
    need(cfg.max_steps == -1 or cfg.max_steps >= 1, f"--max_steps must be >= 1 (or -1: use --num_train_epochs), "
                                                    f"got {cfg.max_steps}")
    need(cfg.max_steps >= 1 or (math.isfinite(cfg.num_train_epochs) and cfg.num_train_epochs > 0),
         f"--num_train_epochs must be > 0, got {cfg.num_train_epochs}")
    for name in ("warmup_steps", "eval_steps", "save_steps"):
        need(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.save_total_limit >= 1, f"--save_total_limit must be >= 1, got {cfg.save_total_limit}")
    need(cfg.logging_steps >= 1, f"--logging_steps must be >= 1, got {cfg.logging_steps}")
    need(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    for name in ("learning_rate", "temp", "attn_temp", "adam_epsilon"):
        v = getattr(cfg, name)
        need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"--{name} must be a positive number, got {v!r}")
    for name in ("weight_decay", "max_grad_norm", "alpha", "alpha_start", "alpha_end"):
        v = getattr(cfg, name)
        need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"--{name} must be a number >= 0, got {v!r}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(cfg, name)
        need(0 <= v < 1, f"--{name} must be in [0, 1), got {v!r}")
    need(cfg.pooler_type in POOLERS, f"--pooler_type must be one of {POOLERS}, got {cfg.pooler_type!r}")
    need(cfg.objective in OBJECTIVES, f"--objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    need(cfg.ops in OPS, f"--ops must be one of {OPS}, got {cfg.ops!r}")
    need(cfg.ddp_gradient in ("mean", "sum"), f"--ddp_gradient must be mean or sum, got {cfg.ddp_gradient!r}")
    need(not (cfg.fp16 and cfg.bf16), "--fp16 and --bf16 are exclusive; pass one (or --no-fp16 to drop a preset's)")
    need(cfg.k <= cfg.buffer_size - 1, f"--k {cfg.k} must be at most --buffer_size - 1 = {cfg.buffer_size - 1}")
    need(cfg.objective == "iscse" or not cfg.alpha_mode_dynamic, "--alpha_mode_dynamic applies to --objective iscse")
    if cfg.preprocessing_num_workers is not None:
        need(cfg.preprocessing_num_workers >= 1, f"--preprocessing_num_workers must be >= 1, got "
                                                 f"{cfg.preprocessing_num_workers}")
    if cfg.device not in (None, "", "auto"):
        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"--device {cfg.device!r} is not a device name (auto, cpu, cuda, cuda:N): {exc}")
    if cfg.output_dir:
        out = Path(cfg.output_dir).expanduser()
        need(not out.exists() or out.is_dir(), f"--output_dir {cfg.output_dir!r} exists and is not a folder")
        # Resuming continues in the run's own folder (the one holding the checkpoint); any other folder must be
        # empty, as for a fresh run, so that no other run's metrics or model are overwritten.
        own = cfg.resume_from is not None and out.is_dir() and \
            out.resolve() in Path(cfg.resume_from).expanduser().resolve().parents
        need(own or not (out.is_dir() and any(out.iterdir())) or cfg.overwrite_output_dir,
             f"--output_dir {cfg.output_dir!r} is not empty; pass --overwrite_output_dir to train into it anyway, "
             "or --resume_from to continue the run saved there")


# ----------------------------------------------------------------------------------------------------- helpers

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # every CUDA device too


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk (before the rename that publishes it)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:  # transformers' get_linear_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class _StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the loop to checkpoint and stop at the next step boundary, a
    second SIGINT interrupts at once. Installed only in the main thread; the old handlers come back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------- trainer

class Trainer:
    """One training run: build with a validated :class:`TrainConfig` and a :class:`~iscse.distributed.DistContext`,
    then call :meth:`train`. See the module docstring for what it does and writes.

    Attributes a caller may read afterwards: ``encoder`` (the :class:`~iscse.models.SentenceEncoder`), ``step``,
    ``best_metric`` / ``best_step`` (STS-B dev Spearman x100), ``history`` (the per-step train records).
    """

    def __init__(self, cfg: TrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.output_dir).expanduser()
        self.resume_dir = Path(cfg.resume_from) if cfg.resume_from else None
        self.step = 0
        self.position = (0, 0)  # (epoch, batch) of the next batch
        self.best_metric: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evaluated = False
        self.history: List[Dict[str, Any]] = []
        self._pending: List[Tuple] = []
        self._run_id = uuid.uuid4().hex
        self._log_handlers: List[logging.Handler] = []
        self._check_ops()

    def close(self) -> None:
        """Detach and close this run's log file."""
        pkg = logging.getLogger("iscse")
        for handler in self._log_handlers:
            pkg.removeHandler(handler)
            handler.close()
        self._log_handlers.clear()

    # ------------------------------------------------------------------ set-up

    def _check_ops(self) -> None:
        if self.cfg.ops != "triton":
            return
        from .backends import get_backend

        try:
            get_backend("triton", self.ctx.device)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"--ops triton is not usable here ({exc}); use --ops auto or --ops torch") from None
        # On CPU the kernels run only when Triton was imported in its interpreter (TRITON_INTERPRET=1 set before
        # the import); the backend records which it got.
        interpreted = getattr(sys.modules.get("iscse.triton_ops"), "INTERPRETED", False)
        if self.ctx.device.type != "cuda" and not interpreted:
            raise ConfigError(f"--ops triton needs a CUDA device (or TRITON_INTERPRET=1 in the environment, Triton's "
                              f"slow CPU interpreter, for testing); this run is on {self.ctx.device}: use --ops torch")

    def _resolve_data(self) -> None:
        """Find (or download, on rank 0) the training file and the evaluation data; errors name the flag."""
        from .download import DownloadError, ensure_senteval, ensure_wiki1m

        cfg = self.cfg
        need_eval_data = cfg.eval_steps > 0 or cfg.eval_at_start or not cfg.skip_test_eval
        result: Dict[str, Any] = {}
        if self.ctx.is_main:
            try:
                train_file = cfg.train_file or str(ensure_wiki1m(cfg.cache_dir, show_progress=not cfg.disable_tqdm))
                data_dir = None
                if need_eval_data:
                    data_dir = cfg.data_dir or os.environ.get("ISCSE_DATA_DIR") or None
                    if data_dir is None:
                        try:
                            data_dir = str(ensure_senteval(cfg.cache_dir, show_progress=not cfg.disable_tqdm))
                        except DownloadError as exc:
                            raise DownloadError(f"{exc}; or train without evaluation: --eval_steps 0 "
                                                "--skip_test_eval") from None
                    from .senteval import resolve_data_dir

                    try:
                        data_dir = str(resolve_data_dir(data_dir))
                    except (ValueError, FileNotFoundError) as exc:
                        raise ConfigError(str(exc)) from None
                result = {"train_file": train_file, "data_dir": data_dir}
            except (DownloadError, ConfigError) as exc:
                result = {"error": str(exc)}
        result = broadcast_object(result, self.ctx)
        if "error" in result:
            raise ConfigError(result["error"])
        self.train_file, self.data_dir = result["train_file"], result["data_dir"]

    def _prepare_output_dir(self) -> None:
        if not self.ctx.is_main:
            return
        out = self.out
        if self.resume_dir is None and out.is_dir() and (out / "checkpoints").is_dir():
            # --overwrite_output_dir: an earlier run's checkpoints are set aside, never deleted or mixed with ours.
            aside = out / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(out / "checkpoints", aside)
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt=_LOG_DATEFMT))
        handler.setLevel(logging.INFO)
        logging.getLogger("iscse").addHandler(handler)
        self._log_handlers.append(handler)
        ckpts = out / "checkpoints"
        if ckpts.is_dir():
            for stale in ckpts.glob(".step-*.tmp"):  # a save that crashed: never published, so never used
                shutil.rmtree(stale, ignore_errors=True)
        metrics = out / "metrics.jsonl"
        if self.resume_dir is not None and metrics.is_file():
            # Keep what happened up to the checkpoint; the steps after it are about to be replayed.
            resume_step = json.loads((self.resume_dir / "trainer_state.json").read_text(encoding="utf-8"))["step"]
            kept = []
            for line in metrics.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if rec.get("event") in ("train", "eval") and rec.get("step", 0) <= resume_step:
                    kept.append(line)
            tmp = metrics.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, metrics)
        elif self.resume_dir is None:
            metrics.write_text("", encoding="utf-8")
        _write_json_atomic(out / "train_config.json", dataclasses.asdict(self.cfg))

    def _build(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from .data import ShuffledBatches, load_train_dataset
        from .loss import ISCSELoss, alpha_schedule
        from .models import SentenceEncoder

        cfg, ctx = self.cfg, self.ctx
        _seed_everything(cfg.seed)
        source = str(self.resume_dir / "model") if self.resume_dir else cfg.model_name_or_path
        try:
            self.encoder = SentenceEncoder.from_pretrained(
                source, pooler=cfg.pooler_type, mlp_only_train=cfg.mlp_only_train,
                reinit_mlp=cfg.reinit_mlp and self.resume_dir is None)
        except OSError as exc:
            raise ConfigError(f"could not load --model_name_or_path {source!r} ({exc}); offline, pass a local folder "
                              "holding the model and its tokenizer") from None
        tok = self.encoder.tokenizer
        if tok.pad_token_id is None:
            raise ConfigError(f"--model_name_or_path {source!r}: its tokenizer has no padding token")
        self.encoder.to(ctx.device)
        self.encoder.train()

        # Tokenize once on rank 0 (written to the datasets cache), then the other ranks read the cache.
        from .download import default_cache_dir

        kwargs = dict(cache_dir=str(Path(cfg.cache_dir or default_cache_dir()).expanduser() / "datasets"),
                      num_proc=cfg.preprocessing_num_workers, overwrite_cache=cfg.overwrite_cache,
                      show_progress=not cfg.disable_tqdm and ctx.is_main)
        if ctx.is_main:
            self.dataset = load_train_dataset(self.train_file, tok, cfg.max_seq_length, **kwargs)
        barrier(ctx)
        if not ctx.is_main:
            kwargs["overwrite_cache"] = False
            self.dataset = load_train_dataset(self.train_file, tok, cfg.max_seq_length, **kwargs)
        self.batches = ShuffledBatches(len(self.dataset), cfg.per_device_train_batch_size, cfg.seed,
                                       ctx.world_size, ctx.rank)
        per_epoch = self.batches.batches_per_epoch
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
        if cfg.objective == "iscse" and self.batches.global_batch_size > cfg.buffer_size:
            raise ConfigError(f"the global batch ({cfg.per_device_train_batch_size} x {ctx.world_size} processes = "
                              f"{self.batches.global_batch_size}) is larger than --buffer_size {cfg.buffer_size}; "
                              "raise --buffer_size or lower --per_device_train_batch_size")

        self.criterion = None
        if cfg.objective == "iscse":
            alpha = (alpha_schedule("cosine", start=cfg.alpha_start, end=cfg.alpha_end, total_steps=self.total_steps)
                     if cfg.alpha_mode_dynamic else cfg.alpha)
            self.criterion = ISCSELoss(self.encoder.hidden_size, buffer_size=cfg.buffer_size, k=cfg.k,
                                       temperature=cfg.temp, attn_temperature=cfg.attn_temp, alpha=alpha,
                                       backend=cfg.ops, check_finite=False).to(ctx.device)

        self.params = [p for p in self.encoder.parameters() if p.requires_grad]
        no_decay = set()
        for module in self.encoder.modules():
            if isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower():
                no_decay.update(id(p) for p in module.parameters(recurse=False))
        for name, p in self.encoder.named_parameters():
            if name.endswith("bias"):
                no_decay.add(id(p))
        groups = [{"params": [p for p in self.params if id(p) not in no_decay], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in self.params if id(p) in no_decay], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _linear_schedule(cfg.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.fp16)
        self.amp_dtype = torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None

        if ctx.enabled:
            self.model = DistributedDataParallel(self.encoder, device_ids=[ctx.device.index]
                                                 if ctx.device.type == "cuda" else None)
        else:
            self.model = self.encoder
        if self.resume_dir is not None:
            self._load_checkpoint(self.resume_dir)

    # ------------------------------------------------------------------ checkpoints

    def _load_checkpoint(self, folder: Path) -> None:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        if state["world_size"] != self.ctx.world_size:
            raise ConfigError(f"--resume_from {str(folder)!r} was saved by {state['world_size']} processes; resume it "
                              f"with as many (this run has {self.ctx.world_size})")
        if state["num_examples"] != len(self.dataset):
            raise ConfigError(f"--train_file {self.train_file!r} has {len(self.dataset)} lines but the checkpoint was "
                              f"trained on {state['num_examples']}; pass the same file")
        rng_file = folder / f"rng_state_{self.ctx.rank}.pt"
        for needed in (folder / "training_state.pt", rng_file, folder / "model"):
            if not needed.exists():
                raise ConfigError(f"--resume_from {str(folder)!r} is incomplete: {needed.name} is missing")
        training = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        self.scaler.load_state_dict(training["scaler"])
        if self.criterion is not None:
            self.criterion.load_state_dict(training["criterion"])
        self.step = int(state["step"])
        self.position = (int(state["epoch"]), int(state["batch_in_epoch"]))
        self.best_metric, self.best_step = state.get("best_metric"), state.get("best_step")
        self.evaluated = bool(state.get("evaluated", self.best_metric is not None))
        self._run_id = state.get("run_id", self._run_id)
        self._resume_rng = rng  # applied right before the loop, after everything else that might draw

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` for the current step (every rank takes part: each saves its RNG state)."""
        ctx, step = self.ctx, self.step
        self._check_replicas_agree()
        root = self.out / "checkpoints"
        final = root / f"step-{step}"
        tmp = root / f".step-{step}.tmp"
        self._flush_metrics()
        if ctx.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier(ctx)
        torch.save(_rng_state(), tmp / f"rng_state_{ctx.rank}.pt")
        if ctx.is_main:
            self.encoder.save_pretrained(tmp / "model")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(),
                        "criterion": None if self.criterion is None else self.criterion.state_dict()},
                       tmp / "training_state.pt")
        barrier(ctx)
        if ctx.is_main:
            state = {"step": step, "epoch": self.position[0], "batch_in_epoch": self.position[1],
                     "total_steps": self.total_steps, "best_metric": self.best_metric, "best_step": self.best_step,
                     "evaluated": self.evaluated, "num_examples": len(self.dataset), "world_size": ctx.world_size,
                     "run_id": self._run_id, "iscse_version": __version__, "saved_at": time.time(),
                     "config": dataclasses.asdict(self.cfg)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (after a resume): swap, then drop the old copy
                old = root / f".step-{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(root)
            self._rotate_checkpoints(root, keep=final)
            logger.info("saved checkpoint %s", final)
        barrier(ctx)
        return final

    def _check_replicas_agree(self) -> None:
        """Under DDP every rank must hold the same memory buffer (it is pushed the same all-gathered batch); a
        checkpoint records rank 0's, so compare a checksum first and refuse to save a state that is not shared."""
        if not self.ctx.enabled or self.criterion is None:
            return
        import torch.distributed as dist

        buf = self.criterion.buffer
        mine = torch.stack([buf.storage.double().sum(), buf.storage.double().abs().sum(),
                            torch.tensor(float(buf.ptr), dtype=torch.float64, device=buf.device),
                            torch.tensor(float(buf.written), dtype=torch.float64, device=buf.device)])
        every = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(every, mine)
        if any(not torch.equal(every[0], other) for other in every[1:]):
            raise RuntimeError(f"the IS-CSE memory buffers of the {self.ctx.world_size} ranks differ at step "
                               f"{self.step}; not saving a checkpoint that rank 0 alone describes")

    def _rotate_checkpoints(self, root: Path, keep: Path) -> None:
        steps = []
        for child in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", child.name)
            if m and child != keep:
                steps.append((int(m.group(1)), child))
        steps.sort()
        excess = len(steps) + 1 - self.cfg.save_total_limit
        for _, child in steps[:max(0, excess)]:
            shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------ metrics

    def _record(self, rec: Dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    def _flush_metrics(self) -> Optional[Dict[str, Any]]:
        """Read the pending per-step values back from the device (one sync) and append them to metrics.jsonl."""
        if not self._pending:
            return None
        values = torch.stack([torch.stack(p[2]) for p in self._pending]).double().cpu().tolist()
        recs = []
        for (step, epoch, _, alpha, lr), (loss, l_cl, l_s, gnorm) in zip(self._pending, values):
            rec = {"event": "train", "step": step, "epoch": round(epoch, 6), "loss": loss, "L_cl": l_cl, "L_s": l_s,
                   "alpha": alpha, "lr": lr}
            if gnorm >= 0:
                rec["grad_norm"] = gnorm
            recs.append(rec)
            if not math.isfinite(loss):
                logger.warning("step %d: the loss is %s", step, loss)
        self._pending.clear()
        self.history.extend(recs)
        if self.ctx.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in recs))
        return recs[-1]

    # ------------------------------------------------------------------ evaluation

    def evaluate_dev(self) -> Optional[float]:
        """Score STS-B dev and SICK-R dev on rank 0 and keep the model if STS-B dev is the best so far; returns the
        STS-B dev Spearman x100 (on every rank)."""
        from .evaluate import evaluate_sts

        ctx, cfg = self.ctx, self.cfg
        results = None
        if ctx.is_main:
            # Evaluation draws no random numbers, but fork the RNG anyway: where and how often the model is
            # evaluated must never change the training trajectory.
            devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                results = evaluate_sts(self.encoder, self.data_dir, mode="dev",
                                       batch_size=cfg.per_device_eval_batch_size, show_progress=False)
        results = broadcast_object(results, ctx)
        stsb, sickr = results["STSBenchmark"], results["SICKRelatedness"]
        self.evaluated = True
        improved = self.best_metric is None or stsb > self.best_metric
        rec = {"event": "eval", "step": self.step, "eval_stsb_spearman": stsb, "eval_sickr_spearman": sickr,
               "eval_avg_sts": (stsb + sickr) / 2, "best": improved}
        self._record(rec)
        logger.info("step %d: STS-B dev %.2f, SICK-R dev %.2f%s", self.step, stsb, sickr,
                    " (best so far: saved to model/)" if improved else
                    f" (best {self.best_metric:.2f} at step {self.best_step})")
        if improved:
            self.best_metric, self.best_step = stsb, self.step
            if ctx.is_main:
                self.encoder.save_pretrained(self.out / "model")
        barrier(ctx)
        return stsb

    def evaluate_test(self) -> Dict[str, float]:
        """Score ``output_dir/model`` on STS12-16, STS-B test and SICK-R test (rank 0), print the table and write
        ``sts_test.json``; returns the scores."""
        from .evaluate import evaluate_sts, format_table
        from .models import SentenceEncoder

        model = SentenceEncoder.from_pretrained(str(self.out / "model")).to(self.ctx.device)
        results = evaluate_sts(model, self.data_dir, mode="test", batch_size=self.cfg.per_device_eval_batch_size,
                               show_progress=not self.cfg.disable_tqdm)
        names = [t for t in results if t != "avg"]
        scores = ["%.2f" % results[t] for t in names]
        avg = "%.2f" % (sum(float(s) for s in scores) / len(scores))
        table = format_table(names + ["Avg."], scores + [avg])
        print(f"------ test (best checkpoint: {self.out / 'model'}) ------\n{table}", flush=True)
        logger.info("STS test of %s:\n%s", self.out / "model", table)
        _write_json_atomic(self.out / "sts_test.json", results)
        self._record({"event": "test", "step": self.best_step if self.best_step is not None else self.step,
                      **{f"test_{k}": v for k, v in results.items()}})
        return results

    # ------------------------------------------------------------------ training

    def _train_step(self, inputs: Dict[str, torch.Tensor]) -> Tuple[List[torch.Tensor], float, float]:
        cfg, ctx = self.cfg, self.ctx
        inputs = {k: v.to(ctx.device, non_blocking=True) for k, v in inputs.items()}
        lr = self.scheduler.get_last_lr()[0]
        with torch.autocast(device_type=ctx.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            emb = self.model(**inputs)  # (2B, H): rows 2i and 2i + 1 are two dropout views of sentence i
        emb = emb.float()  # the loss runs in fp32
        z = emb.reshape(-1, 2, emb.shape[-1])  # (B, 2, H)
        z1, z2 = gather_with_grad(z[:, 0], ctx), gather_with_grad(z[:, 1], ctx)  # (global B, H)
        if self.criterion is not None:
            alpha = self.criterion.current_alpha()
            loss = self.criterion(z1, z2)
            l_cl, l_s = self.criterion.last_components
        else:
            from .functional import info_nce

            alpha = 0.0
            loss = info_nce(z1, z2, cfg.temp, backend=cfg.ops)
            l_cl, l_s = loss.detach(), torch.zeros((), device=loss.device)
        # Every rank holds the same global loss; DDP averages the per-rank gradients ("mean", the reference) or,
        # scaled by the world size, sums them into exactly the global-batch gradient ("sum").
        backward_loss = loss * ctx.world_size if ctx.enabled and cfg.ddp_gradient == "sum" else loss
        self.scaler.scale(backward_loss).backward()
        gnorm = torch.full((), -1.0, device=loss.device)
        if cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return [loss.detach().float(), l_cl.float(), l_s.float(), gnorm.detach().float()], alpha, lr

    def train(self) -> Dict[str, Any]:
        """Run the loop to ``total_steps`` (or until a stop signal), evaluating and checkpointing on the way, then
        score the best model on the test sets. Returns a summary (also written to ``train_results.json``)."""
        from tqdm.auto import tqdm

        from .data import collate_two_views

        cfg, ctx = self.cfg, self.ctx
        self._resolve_data()
        self._build()  # model, data, optimizer: a bad --model_name_or_path fails here, before anything is written
        self._prepare_output_dir()
        barrier(ctx)
        if self.resume_dir is not None:
            _set_rng_state(self._resume_rng)
            logger.info("resumed from %s at step %d (epoch %d, batch %d); best STS-B dev so far %s", self.resume_dir,
                        self.step, self.position[0], self.position[1],
                        "none" if self.best_metric is None else f"{self.best_metric:.2f} (step {self.best_step})")
        else:
            # Dropout draws from seed + rank, so ranks see independent masks (rank 0 of 1: the plain seed).
            _seed_everything(cfg.seed + ctx.rank)
        tok = self.encoder.tokenizer
        per_epoch = self.batches.batches_per_epoch
        logger.info("training %s (pooler %s, mlp_only_train %s) on %s: %d sentences, global batch %d (%d process%s), "
                    "%d steps (%d per epoch), objective %s, ops %s, device %s%s",
                    cfg.model_name_or_path, cfg.pooler_type, cfg.mlp_only_train, self.train_file, len(self.dataset),
                    self.batches.global_batch_size, ctx.world_size, "" if ctx.world_size == 1 else "es",
                    self.total_steps, per_epoch, cfg.objective, cfg.ops, ctx.device,
                    ", fp16" if cfg.fp16 else ", bf16" if cfg.bf16 else "")
        started = time.perf_counter()
        if cfg.eval_at_start and self.step == 0 and self.data_dir is not None:
            self.evaluate_dev()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="Training", unit="step",
                   disable=cfg.disable_tqdm or not ctx.is_main, dynamic_ncols=True)
        stopped = False
        last_log = time.perf_counter()
        last_log_step = self.step
        try:
            with _StopRequest() as stop:
                self.model.train()
                while self.step < self.total_steps:
                    epoch, batch = self.position
                    rows = self.batches.local_indices(epoch, batch)
                    inputs = collate_two_views(self.dataset[rows], tok.pad_token_id, tok.padding_side)
                    values, alpha, lr = self._train_step(inputs)
                    self.step += 1
                    self.position = (epoch, batch + 1) if batch + 1 < per_epoch else (epoch + 1, 0)
                    self._pending.append((self.step, epoch + (batch + 1) / per_epoch, values, alpha, lr))
                    bar.update(1)
                    at_log = self.step % cfg.logging_steps == 0 or self.step == self.total_steps
                    if at_log:
                        last = self._flush_metrics()
                        now = time.perf_counter()
                        rate = (now - last_log) / max(1, self.step - last_log_step)
                        last_log, last_log_step = now, self.step
                        logger.info("step %d/%d | loss %.4f (L_cl %.4f, L_s %.4f, alpha %.4g) | lr %.3g | %.2f s/step",
                                    self.step, self.total_steps, last["loss"], last["L_cl"], last["L_s"],
                                    last["alpha"], last["lr"], rate)
                        bar.set_postfix(loss=f"{last['loss']:.4f}")
                    if self.data_dir is not None and cfg.eval_steps > 0 and (
                            self.step % cfg.eval_steps == 0 or self.step == self.total_steps):
                        self.evaluate_dev()
                    if cfg.save_steps > 0 and self.step % cfg.save_steps == 0:
                        self.save_checkpoint()
                    # A stop signal is honoured at a step boundary. Under DDP the ranks agree at logging steps.
                    check = (not ctx.enabled) or at_log
                    if check and self.step < self.total_steps and any_flag(stop.requested, ctx):
                        if not (cfg.save_steps > 0 and self.step % cfg.save_steps == 0):
                            self.save_checkpoint()
                        logger.warning("stopped at step %d on request; continue with --resume_from %s", self.step,
                                       self.out / "checkpoints" / f"step-{self.step}")
                        stopped = True
                        break
        finally:
            bar.close()
            self._flush_metrics()
        runtime = time.perf_counter() - started
        summary: Dict[str, Any] = {"global_step": self.step, "total_steps": self.total_steps, "stopped": stopped,
                                   "best_metric": self.best_metric, "best_step": self.best_step,
                                   "train_runtime_s": round(runtime, 3)}
        if stopped:
            return summary
        if not self.evaluated:
            # No dev evaluation: the model this run produced is the final one.
            if ctx.is_main:
                self.encoder.save_pretrained(self.out / "model")
            barrier(ctx)
        logger.info("training done in %.1f s; model (%s) in %s", runtime,
                    "final weights" if not self.evaluated else
                    f"best STS-B dev {self.best_metric:.2f} at step {self.best_step}", self.out / "model")
        if ctx.is_main and not cfg.skip_test_eval and self.data_dir is not None:
            summary["test"] = self.evaluate_test()
        if ctx.is_main:
            _write_json_atomic(self.out / "train_results.json", summary)
        barrier(ctx)
        return summary


# ----------------------------------------------------------------------------------------------------- entry points

def _console_handler(is_main: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt=_LOG_DATEFMT))
    handler.setLevel(logging.INFO if is_main else logging.WARNING)
    return handler


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run training with a validated config (from :func:`parse_args`); returns the summary dict. Joins the process
    group when launched by ``torchrun`` and leaves it at the end."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    ctx = init_distributed(cfg.device)
    pkg = logging.getLogger("iscse")
    old_level = pkg.level
    pkg.setLevel(logging.INFO)
    console = _console_handler(ctx.is_main)
    pkg.addHandler(console)
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if cfg.disable_tqdm or not ctx.is_main:
        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards"
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg, ctx)  # checks --ops before anything is written
        with logging_redirect_tqdm(loggers=[pkg]):
            return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if bars_were_on:
            hf_logging.enable_progress_bar()
        pkg.removeHandler(console)
        pkg.setLevel(old_level)
        cleanup(ctx)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m iscse.train``); returns the exit status (2 for a bad argument,
    130 when stopped by a signal after saving a checkpoint)."""
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except ConfigError as exc:
        print(f"python -m iscse.train: error: {exc}", file=sys.stderr)
        return 2
    return 130 if summary.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
