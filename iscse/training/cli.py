"""The command line ``python -m iscse.train`` (and :func:`train`, the same from Python).

What a run does: check every input (flags, training file, data folder, model) before writing anything; fetch
wiki1m / SentEval's data when not given (``huggingface_hub``); load the encoder (``SentenceEncoder``, SimCSE's MLP
head freshly initialised) and tokenize the corpus once (cached); train with :class:`ISCSETrainer`, scoring STS-B
dev every ``--eval_steps`` and keeping the best model in ``output_dir/model``; at the end score that model on the
STS test sets and print the table once.

Files in ``--output_dir``: ``train.log`` (what a person reads), ``metrics.jsonl`` (one JSON object a line, see
:mod:`iscse.training.callbacks`), ``curves.png`` (its curves, when matplotlib is installed; ``python -m iscse.plot``
draws them again or compares runs), ``train_config.json`` (every setting of the run, see the README), ``model/`` (the
best model; the final one when nothing was evaluated), ``sts_test.json``, ``train_results.json``, and
``checkpoint-N/`` every ``--save_steps`` (the newest ``--save_total_limit`` kept).

Bad input (a flag, a file, a folder, a model, a checkpoint) ends the command with one line on stderr that names
it and says what to do, exit status 2, and nothing written. Ctrl-C saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .._io import first_line, write_json_atomic, write_text_atomic

__all__ = ["main", "train"]

logger = logging.getLogger("iscse.train")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
PROG = "python -m iscse.train"


def _resolve_data(args) -> Dict[str, Optional[str]]:
    """The training file and the evaluation data folder: given, from ``$ISCSE_DATA_DIR``, or downloaded (by the
    main process first). Raises ConfigError naming the flag."""
    from .arguments import PRESET_CORPUS, check_hard_negative_flags
    from .download import DownloadError, ensure_nli, ensure_senteval, ensure_wiki1m
    from .errors import ConfigError

    need_eval_data = args.eval_strategy.value != "no" or args.eval_on_start or not args.skip_test_eval
    with args.main_process_first(desc="data download", local=False):
        try:
            fetch = ensure_nli if PRESET_CORPUS.get(args.preset or "") == "nli" else ensure_wiki1m
            train_file = args.train_file or str(fetch(args.cache_dir, show_progress=not args.disable_tqdm))
        except DownloadError as exc:
            raise ConfigError(str(exc)) from None
        data_dir = None
        if need_eval_data:
            data_dir = args.data_dir or os.environ.get("ISCSE_DATA_DIR") or None
            if data_dir is None:
                try:
                    data_dir = str(ensure_senteval(args.cache_dir, show_progress=not args.disable_tqdm))
                except DownloadError as exc:
                    raise ConfigError(f"{exc}; or train without evaluation: --eval_steps 0 --skip_test_eval") from None
    if args.train_file is None:
        from .data import inspect_train_file

        try:
            stats = inspect_train_file(train_file)
        except ValueError as exc:
            raise ConfigError(f"the downloaded corpus {exc}; delete it to fetch it again") from None
        check_hard_negative_flags(args, stats.columns)
    return {"train_file": train_file, "data_dir": data_dir}


def _check_eval_data(data_dir: str, args) -> None:
    """Read every STS file the run will use (dev, and test unless ``--skip_test_eval``) now, so that a missing or
    unreadable file is reported before training rather than after it."""
    from ..evaluation.senteval import STS_TASKS, load_sts_task, resolve_data_dir
    from .errors import ConfigError

    flag = "--data_dir" if args.data_dir else "$ISCSE_DATA_DIR" if os.environ.get("ISCSE_DATA_DIR") else "data"
    try:
        root = resolve_data_dir(data_dir)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(first_line(exc)) from None
    wanted = [(t, "dev") for t in args.dev_tasks]
    if not args.skip_test_eval:
        wanted += [(t, "test") for t in STS_TASKS]
    for task, split in wanted:
        try:
            load_sts_task(root, task, split)
        except (OSError, ValueError, UnicodeDecodeError, IndexError, KeyError) as exc:
            what = "cannot be read" if isinstance(exc, PermissionError) else "is incomplete or unreadable"
            raise ConfigError(f"{flag} {str(data_dir)!r} {what}: {task} {split} ({first_line(exc)}); pass SentEval's "
                              "data/downstream folder (SimCSE's download_dataset.sh fetches it)"
                              + ("" if split == "dev" else ", or --skip_test_eval")) from None


def _load_encoder(args, source: str, resume: bool):
    from ..evaluation.encoder import SentenceEncoder, check_encoder
    from .errors import ConfigError

    flag = "--resume_from" if resume else "--model_name_or_path"
    try:
        check_encoder(source)
    except ValueError as exc:
        raise ConfigError(f"{flag} {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {source!r} could not be loaded ({first_line(exc)}); offline, pass a local "
                          "folder holding the model and its tokenizer") from None
    from transformers import set_seed

    set_seed(args.seed)  # the fresh MLP head is drawn from the seed
    try:
        encoder = SentenceEncoder.from_pretrained(source, pooler=args.pooler_type, mlp_only_train=args.mlp_only_train,
                                                  reinit_mlp=args.reinit_mlp and not resume)
    except OSError as exc:
        raise ConfigError(f"{flag} {source!r} could not be loaded ({first_line(exc)})") from None
    if encoder.tokenizer.pad_token_id is None:
        raise ConfigError(f"{flag} {source!r}: its tokenizer has no padding token; set one (tokenizer.pad_token) "
                          "and save it again")
    return encoder


def _load_mlm_head(args, encoder, resume_dir: Optional[Path]):
    """``--do_mlm``: the masked-LM head on the encoder's backbone, from ``--model_name_or_path`` (initialised, with a
    warning, when the checkpoint has none); a resumed run starts from an initialised one and the trainer loads the
    checkpoint's head into it. Raises ConfigError naming the flag."""
    from .errors import ConfigError
    from .mlm import MLM_HEAD_FILE, MaskedLMHead, check_mlm_tokenizer

    source = str(resume_dir) if resume_dir else args.model_name_or_path
    try:
        check_mlm_tokenizer(encoder.tokenizer, encoder.config.vocab_size)
    except ValueError as exc:
        raise ConfigError(f"--do_mlm: {source!r}: {exc}") from None
    if resume_dir is not None:
        if not (resume_dir / MLM_HEAD_FILE).is_file():
            raise ConfigError(f"--resume_from {str(resume_dir)!r} holds no {MLM_HEAD_FILE}: it was not saved by a "
                              "--do_mlm run")
        return MaskedLMHead.from_config(encoder.backbone)
    try:
        return MaskedLMHead.from_pretrained(encoder.backbone, source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--do_mlm: the masked-LM head of {source!r} could not be loaded ({first_line(exc)})") \
            from None


def _check_resume(args, num_examples: int) -> None:
    from .errors import ConfigError
    from .checkpoints import MANIFEST

    state = json.loads((Path(args.resume_from_checkpoint) / MANIFEST).read_text(encoding="utf-8"))
    if state["world_size"] != args.world_size:
        raise ConfigError(f"--resume_from {args.resume_from_checkpoint!r} was saved by {state['world_size']} "
                          f"process(es); resume it with as many (this run has {args.world_size})")
    if state["num_examples"] != num_examples:
        raise ConfigError(f"--train_file {args.train_file!r} has {num_examples} examples but the checkpoint was "
                          f"trained on {state['num_examples']}; pass the same file")


def _prepare_output_dir(args, resume_dir: Optional[Path]) -> None:
    """Main process only: create the folder, set earlier checkpoints aside (--overwrite_output_dir), set aside
    unusable checkpoints newer than the resumed one, drop stale staging folders, start or trim metrics.jsonl,
    write train_config.json."""
    from .arguments import settings_of
    from .checkpoints import checkpoint_problem, list_checkpoints, remove_stale_staging

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    if resume_dir is None:
        old = list_checkpoints(out)
        if old:  # --overwrite_output_dir: an earlier run's checkpoints are set aside, never deleted or mixed in
            aside = out / f"old-checkpoints-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for _, ckpt in old:
                os.rename(ckpt, aside / ckpt.name)
            logger.warning("moved the checkpoints already in %s to %s", out, aside)
    else:
        resume_step = json.loads((resume_dir / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        if resume_dir.parent.resolve() == out.resolve():
            for step, ckpt in list_checkpoints(out):
                if step > resume_step and checkpoint_problem(ckpt) is not None:
                    os.rename(ckpt, out / f"unusable-{ckpt.name}")  # kept for inspection, never resumed from
    metrics = out / "metrics.jsonl"
    if resume_dir is not None and metrics.is_file():
        # Keep what happened up to the checkpoint; the steps after it are about to be replayed.
        kept = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if rec.get("event") in ("train", "eval") and rec.get("step", 0) <= resume_step:
                kept.append(line)
        write_text_atomic(metrics, "".join(line + "\n" for line in kept))
    elif resume_dir is None:
        metrics.write_text("", encoding="utf-8")
    write_json_atomic(out / "train_config.json", settings_of(args))


def train(args) -> Dict[str, Any]:
    """Run training with validated :class:`~iscse.training.arguments.ISCSETrainingArguments` (from
    :func:`~iscse.training.arguments.parse_args`); returns the summary (also written to ``train_results.json``).
    Raises :class:`~iscse.training.arguments.ConfigError` for bad input, before anything is written."""
    from accelerate import PartialState

    from .data import load_train_dataset
    from .download import default_cache_dir
    from ..loss import ISCSELoss, alpha_schedule
    from .errors import ConfigError
    from .model import ISCSEModel, StepAlpha
    from .trainer import ISCSETrainer

    state = PartialState()
    is_main = args.process_index == 0
    resume_dir = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    _check_ops(args)
    data = _resolve_data(args)
    if data["data_dir"] is not None:
        _check_eval_data(data["data_dir"], args)
    encoder = _load_encoder(args, str(resume_dir) if resume_dir else args.model_name_or_path, resume_dir is not None)
    mlm = _load_mlm_head(args, encoder, resume_dir) if args.do_mlm else None

    tok = encoder.tokenizer
    cache = Path(args.cache_dir or default_cache_dir()).expanduser() / "datasets"
    with args.main_process_first(desc="tokenizing", local=False):
        try:
            dataset = load_train_dataset(data["train_file"], tok, args.max_seq_length, cache_dir=str(cache),
                                         num_proc=args.preprocessing_num_workers,
                                         overwrite_cache=args.overwrite_cache and is_main,
                                         show_progress=not args.disable_tqdm and is_main)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--train_file {data['train_file']!r} could not be read ({first_line(exc)})") from None
    if resume_dir is not None:
        _check_resume(args, len(dataset))
        args.eval_on_start = False  # the start was evaluated by the run that saved the checkpoint

    global_batch = args.per_device_train_batch_size * args.world_size
    per_epoch = math.ceil(len(dataset) / global_batch)
    updates_per_epoch = max(per_epoch // args.gradient_accumulation_steps
                            + int(per_epoch % args.gradient_accumulation_steps > 0), 1)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * updates_per_epoch)
    criterion, alpha = None, 0.0
    if args.objective == "iscse":
        if args.alpha_mode_dynamic:
            alpha = StepAlpha(alpha_schedule("cosine", start=args.alpha_start, end=args.alpha_end,
                                             total_steps=total_steps))
        else:
            alpha = args.alpha
        criterion = ISCSELoss(encoder.hidden_size, buffer_size=args.buffer_size, k=args.k, temperature=args.temp,
                              attn_temperature=args.attn_temp, alpha=alpha, backend=args.ops, check_finite=False,
                              grouping=args.grouping, aggregation=args.aggregation)
    model = ISCSEModel(encoder, criterion, mlm)

    # ------------------------------------------------------------------ from here on, files are written
    handler = None
    if is_main:
        _prepare_output_dir(args, resume_dir)
        handler = logging.FileHandler(Path(args.output_dir) / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt=_LOG_DATEFMT))
        handler.setLevel(logging.INFO)
        logging.getLogger("iscse").addHandler(handler)
    state.wait_for_everyone()
    try:
        trainer = ISCSETrainer(model, args, dataset, data["data_dir"], alpha=alpha, num_examples=len(dataset))
        logger.info("training %s (pooler %s, mlp_only_train %s) on %s: %d %s, global batch %d (%d process%s), "
                    "%d steps (%d batches an epoch), objective %s%s, ops %s, device %s%s%s",
                    args.model_name_or_path, args.pooler_type, args.mlp_only_train, data["train_file"], len(dataset),
                    "triples" if trainer.sentences_per_example == 3 else "pairs" if _is_rows(dataset) else "lines",
                    global_batch, args.world_size, "" if args.world_size == 1 else "es", total_steps, per_epoch,
                    args.objective, f" + {args.mlm_weight:g} x MLM (p {args.mlm_probability:g})" if args.do_mlm
                    else "", args.ops, args.device, ", fp16" if args.fp16 else ", bf16" if args.bf16 else "",
                    f"; resuming from {resume_dir}" if resume_dir else "")
        started = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        finally:
            trainer.metrics.flush()  # the steps done before a crash are on record too
        runtime = time.perf_counter() - started
        summary: Dict[str, Any] = {"global_step": trainer.state.global_step, "total_steps": total_steps,
                                   "stopped": trainer.stopped, "best_metric": trainer.best_metric,
                                   "best_step": trainer.best_step, "train_runtime_s": round(runtime, 3)}
        if trainer.stopped:
            return summary
        if not trainer.evaluated:
            if is_main:  # no dev evaluation: the model this run produced is the final one
                encoder.save_pretrained(Path(args.output_dir) / "model")
        state.wait_for_everyone()
        logger.info("training done in %.1f s; model (%s) in %s", runtime,
                    "final weights" if not trainer.evaluated else
                    f"best STS-B dev {trainer.best_metric:.2f} at step {trainer.best_step}",
                    Path(args.output_dir) / "model")
        if is_main and trainer.first_eval is not None and trainer.first_eval["step"] == 0:
            print(f"STS-B dev (Spearman x100): {trainer.first_eval['score']:.2f} before training, "
                  f"{trainer.best_metric:.2f} after (best, step {trainer.best_step}; model in "
                  f"{Path(args.output_dir) / 'model'})", flush=True)
        if is_main and not args.skip_test_eval and data["data_dir"] is not None:
            summary["test"] = _test(args, data["data_dir"], trainer)
        if is_main:
            write_json_atomic(Path(args.output_dir) / "train_results.json", summary)
        state.wait_for_everyone()
        return summary
    finally:
        if handler is not None:
            logging.getLogger("iscse").removeHandler(handler)
            handler.close()


def _test(args, data_dir: str, trainer) -> Dict[str, float]:
    """Score ``output_dir/model`` on STS12-16, STS-B test and SICK-R test; print the table once (stdout), log it to
    ``train.log`` only, write ``sts_test.json``."""
    import torch

    from ..evaluation.evaluate import evaluate_sts, format_table
    from ..evaluation.encoder import SentenceEncoder

    best = Path(args.output_dir) / "model"
    model = SentenceEncoder.from_pretrained(str(best)).to(args.device)
    results = evaluate_sts(model, data_dir, mode="test", batch_size=args.per_device_eval_batch_size,
                           show_progress=not args.disable_tqdm)
    names = [t for t in results if t != "avg"]
    scores = ["%.2f" % results[t] for t in names]
    avg = "%.2f" % (sum(float(s) for s in scores) / len(scores))
    table = format_table(names + ["Avg."], scores + [avg])
    print(f"------ test (best checkpoint: {best}) ------\n{table}", flush=True)
    file_logger = logging.getLogger("iscse.train.file")  # to train.log only: the table is printed above
    file_logger.info("STS test of %s:\n%s", best, table)
    write_json_atomic(Path(args.output_dir) / "sts_test.json", results)
    trainer.metrics.write({"event": "test", "step": trainer.best_step if trainer.best_step is not None
                           else trainer.state.global_step, **{f"test_{k}": v for k, v in results.items()}})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def _is_rows(dataset) -> bool:
    """True for a CSV / JSONL dataset (each example a list of token lists)."""
    ids = dataset[0]["input_ids"] if len(dataset) else []
    return bool(len(ids)) and isinstance(ids[0], (list, tuple))


def _check_ops(args) -> None:
    from .errors import ConfigError

    if args.ops != "triton":
        return
    from ..backends import get_backend

    try:
        get_backend("triton", args.device)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"--ops triton is not usable here ({first_line(exc)}); use --ops auto or --ops torch") \
            from None
    # On CPU the kernels run only when Triton was imported in its interpreter (TRITON_INTERPRET=1 set before the
    # import); the backend records which it got.
    interpreted = getattr(sys.modules.get("iscse.backends.triton_fused"), "INTERPRETED", False)
    if args.device.type != "cuda" and not interpreted:
        raise ConfigError(f"--ops triton needs a CUDA device (or TRITON_INTERPRET=1 in the environment, Triton's slow "
                          f"CPU interpreter, for testing); this run is on {args.device}: use --ops torch")


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m iscse.train``: returns the exit status (0 done, 2 bad input, 130 stopped by a signal after
    saving a checkpoint)."""
    from .errors import ConfigError

    if "WORLD_SIZE" in os.environ:
        # Before any process group exists (TrainingArguments creates it): imported later (DDP imports it), this
        # module writes the live group into ten functions' default arguments, so destroy_process_group() cannot free
        # it and its gloo threads run on into the interpreter's teardown (see tests/st_ddp_worker.py).
        import torch.distributed.nn  # noqa: F401

    pkg = logging.getLogger("iscse")
    old_level = pkg.level
    pkg.setLevel(logging.INFO)
    rank = int(os.environ.get("RANK", "0") or 0)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt=_LOG_DATEFMT))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # train.log has everything; the console skips the file-only records and the evaluator's per-task lines (the
    # trainer logs each evaluation's result itself)
    console.addFilter(lambda record: not record.name.startswith("iscse.train.file") and not (
        record.name.startswith("iscse.evaluation") and record.levelno < logging.WARNING))
    pkg.addHandler(console)
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        from .arguments import parse_args

        args = parse_args(argv)
        if args.disable_tqdm or args.process_index != 0:
            hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards"
        with logging_redirect_tqdm(loggers=[pkg]):
            summary = train(args)
    except ConfigError as exc:
        if rank == 0:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        pkg.removeHandler(console)
        pkg.setLevel(old_level)
        _leave_process_group()
    return 130 if summary.get("stopped") else 0
