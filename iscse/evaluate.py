"""STS evaluation with the SentEval protocol as SimCSE and IS-CSE report it, as a function and a command.

Protocol (SimCSE ``evaluation.py`` over SentEval's ``STSEval``), which this reproduces:

- Each sentence pair is scored by the cosine similarity of the two embeddings; a task's number is Spearman's
  rank correlation between those scores and the gold scores, times 100.
- STS12-STS16: the "all" setting: the scored pairs of every sub-set of the year are pooled and one Spearman
  correlation is taken over the pool (not the mean over sub-sets). Pairs with an empty gold score are skipped.
- STSBenchmark and SICKRelatedness: the test split (``mode="test"``), or the dev split (``mode="dev"``; SICK's
  dev split is the trial file). In dev mode SimCSE evaluates only these two, and so does this module.
- Sentences are SentEval's whitespace tokens joined by single spaces, fed to the tokenizer as they are; no
  truncation below the model's limit (SimCSE's batcher passes no ``max_length``).

Command line (flag names as in SimCSE's ``evaluation.py``; dashed spellings are accepted too)::

    python -m iscse.evaluate --model_name_or_path princeton-nlp/unsup-simcse-bert-base-uncased \\
        --pooler cls_before_pooler --data_dir SentEval/data/downstream --mode test --output_json sts.json

prints SimCSE's table (task names, then Spearman x100, then "Avg.") and, with ``--output_json``, writes one JSON
object mapping STS12, STS13, STS14, STS15, STS16, STSBenchmark, SICKRelatedness (those evaluated) and ``avg`` to
Spearman x100. The data folder is ``--data_dir`` or the environment variable ``ISCSE_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from scipy.stats import spearmanr

from .models import POOLERS, SentenceEncoder, check_encoder, current_umask
from .senteval import DATA_DIR_ENV, STS_TASKS, STSPairs, load_sts_task, resolve_data_dir

__all__ = ["DEV_TASKS", "MODES", "evaluate_sts", "format_table", "main"]

logger = logging.getLogger(__name__)

#: Tasks evaluated in dev mode (SimCSE's dev evaluation and IS-CSE's checkpoint selection use STS-B dev).
DEV_TASKS: tuple[str, ...] = ("STSBenchmark", "SICKRelatedness")
#: Accepted modes; SimCSE's "fasttest" differs from "test" only for transfer tasks, so here it equals "test".
MODES: tuple[str, ...] = ("test", "dev", "fasttest")

Embedder = Union[SentenceEncoder, Callable[[list], object]]


def evaluate_sts(
    model: Embedder,
    data_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    mode: str = "test",
    batch_size: int = 128,
    max_length: int | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Spearman x100 of cosine similarities on SentEval's STS tasks; returns ``{task: score, ..., "avg": mean}``.

    ``model`` is a ``SentenceEncoder`` (encoded with ``encode``: eval mode, no grad, its train/eval mode
    restored afterwards, so the trainer can call this mid-training) or any callable mapping a list of ``n``
    strings to an ``(n, D)`` tensor or array (called on length-sorted batches of ``batch_size``).
    ``tasks`` are names from ``STS_TASKS`` (default: all seven for ``mode="test"``, STSBenchmark and
    SICKRelatedness for ``mode="dev"``); in dev mode only those two exist. ``max_length`` (tokens; None: the
    model's limit) and ``device`` apply to a ``SentenceEncoder`` only. Every distinct sentence is embedded once.
    The keys keep the order of ``tasks``; ``"avg"`` is the plain mean of the task scores (not rounded).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    split = "dev" if mode == "dev" else "test"
    if tasks is None:
        tasks = DEV_TASKS if split == "dev" else STS_TASKS
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError(f"tasks must be a non-empty list of task names from {', '.join(STS_TASKS)}, got {tasks!r}")
    for task in tasks:
        if task not in STS_TASKS:
            raise ValueError(f"tasks: unknown task {task!r}; expected names from {', '.join(STS_TASKS)}")
        if split == "dev" and task not in DEV_TASKS:
            raise ValueError(f"tasks: {task} has no dev split; mode='dev' evaluates {' and '.join(DEV_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: each task at most once, got {list(tasks)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(model, SentenceEncoder):
        if not callable(model):
            raise TypeError("model must be a SentenceEncoder or a callable mapping a list of sentences to an "
                            f"(n, D) tensor, got {type(model).__name__}")
        if max_length is not None or device is not None:
            raise ValueError("max_length and device apply to a SentenceEncoder only; a plain callable handles its "
                             "own tokenization and device")

    root = resolve_data_dir(data_dir)
    data = {task: load_sts_task(root, task, split) for task in tasks}
    sentences = list(dict.fromkeys(s for parts in data.values() for p in parts
                                   for s in (*p.sentences1, *p.sentences2)))
    logger.info("STS %s: %s; %d distinct sentences", split, ", ".join(tasks), len(sentences))
    embeddings = _embed(model, sentences, batch_size, max_length, show_progress, device)  # (N, D) float64
    row = {s: i for i, s in enumerate(sentences)}

    results: dict[str, float] = {}
    for task, parts in data.items():
        predicted = torch.cat([_cosine(embeddings, row, p) for p in parts]).numpy()
        gold = np.concatenate([np.asarray(p.scores, dtype=np.float64) for p in parts])
        results[task] = _spearman_x100(predicted, gold)
        logger.info("%s (%s, %d pairs): Spearman x100 = %.4f", task, split, gold.size, results[task])
    results["avg"] = float(np.mean([results[t] for t in tasks]))
    return results


def _embed(model: Embedder, sentences: list[str], batch_size: int, max_length: int | None, show_progress: bool,
           device) -> torch.Tensor:
    if isinstance(model, SentenceEncoder):
        emb = model.encode(sentences, batch_size=batch_size, max_length=max_length, show_progress=show_progress,
                           device=device)
        return emb.double()
    from tqdm.auto import tqdm

    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    chunks: list[torch.Tensor] = []
    with tqdm(total=len(sentences), desc="Encoding", unit="sent", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = [sentences[i] for i in order[start:start + batch_size]]
            with torch.inference_mode():
                out = model(batch)
            out = torch.as_tensor(np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out))
            if out.dim() != 2 or out.shape[0] != len(batch):
                raise ValueError(f"model returned shape {tuple(out.shape)} for {len(batch)} sentences; expected "
                                 f"({len(batch)}, D)")
            chunks.append(out.double())
            bar.update(len(batch))
    stacked = torch.cat(chunks)
    result = torch.empty_like(stacked)
    result[torch.tensor(order)] = stacked
    return result


def _cosine(embeddings: torch.Tensor, row: dict[str, int], pairs: STSPairs) -> torch.Tensor:
    a = embeddings[[row[s] for s in pairs.sentences1]]  # (P, D)
    b = embeddings[[row[s] for s in pairs.sentences2]]  # (P, D)
    # SentEval maps NaN to 0 (np.nan_to_num); the eps does the same for a zero vector.
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)


def _spearman_x100(predicted: np.ndarray, gold: np.ndarray) -> float:
    rho = spearmanr(predicted, gold)[0]
    return float(rho) * 100.0 if not math.isnan(rho) else float("nan")


def format_table(task_names: Sequence[str], scores: Sequence[str]) -> str:
    """A one-row ASCII table like SimCSE's ``print_table`` (PrettyTable): names in the header, values below."""
    widths = [max(len(n), len(s)) + 2 for n, s in zip(task_names, scores)]
    rule = "+" + "+".join("-" * w for w in widths) + "+"
    head = "|" + "|".join(n.center(w) for n, w in zip(task_names, widths)) + "|"
    body = "|" + "|".join(s.center(w) for s, w in zip(scores, widths)) + "|"
    return "\n".join([rule, head, rule, body, rule])


def _table(results: dict[str, float]) -> str:
    names = [t for t in results if t != "avg"]
    scores = ["%.2f" % results[t] for t in names]
    # SimCSE averages the printed (2-decimal) values; the JSON "avg" is the unrounded mean.
    avg = "%.2f" % (sum(float(s) for s in scores) / len(scores))
    return format_table(names + ["Avg."], scores + [avg])


class _OneLineParser(argparse.ArgumentParser):
    """Errors are one line (no usage block, no traceback), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m iscse.evaluate",
        description="STS12-16, STS-B and SICK-R Spearman x100 of a sentence encoder, with the SentEval protocol "
                    "as SimCSE and IS-CSE report it.")
    parser.add_argument("--model_name_or_path", "--model-name-or-path", required=True,
                        help="Hugging Face model name or local folder (e.g. one written by the trainer)")
    parser.add_argument("--pooler", choices=POOLERS, default=None,
                        help="pooler (default: the one a saved iscse checkpoint records, else cls)")
    parser.add_argument("--mode", choices=MODES, default="test",
                        help="test: STS12-16 + STS-B test + SICK-R test; dev: STS-B dev + SICK-R dev; "
                             "fasttest: same as test (default: test)")
    parser.add_argument("--task_set", "--task-set", choices=("sts", "na"), default=None,
                        help="sts: every STS task of the mode; na: exactly --tasks (SimCSE's flag; transfer "
                             "tasks are not supported)")
    parser.add_argument("--tasks", nargs="+", choices=STS_TASKS, default=None,
                        help="tasks to run (default: all of the mode)")
    parser.add_argument("--data_dir", "--data-dir", default=None,
                        help=f"SentEval's data/downstream folder (default: ${DATA_DIR_ENV})")
    parser.add_argument("--output_json", "--output-json", default=None,
                        help="write {task: Spearman x100, ..., 'avg': mean} to this file")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=128,
                        help="sentences per forward pass (default: 128, SentEval's)")
    parser.add_argument("--max_seq_length", "--max-seq-length", type=int, default=None,
                        help="truncate inputs to this many tokens (default: the model's limit, i.e. no "
                             "truncation for these tasks, as SimCSE)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m iscse.evaluate``); returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.task_set == "sts" and args.tasks is not None:
        parser.error("--task_set sts runs every STS task; use --task_set na (or leave it out) with --tasks")
    if args.task_set == "na" and args.tasks is None:
        parser.error("--task_set na needs --tasks")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_seq_length is not None and args.max_seq_length < 1:
        parser.error(f"--max_seq_length must be >= 1, got {args.max_seq_length}")
    split_tasks = DEV_TASKS if args.mode == "dev" else STS_TASKS
    tasks = args.tasks if args.tasks is not None else split_tasks
    if args.mode == "dev" and any(t not in DEV_TASKS for t in tasks):
        parser.error(f"--mode dev evaluates only {' and '.join(DEV_TASKS)} (STS12-16 have no dev split)")
    try:
        data_dir = resolve_data_dir(args.data_dir)  # fail before the model loads
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    split = "dev" if args.mode == "dev" else "test"
    for task in tasks:  # every file the run reads, before the model loads
        try:
            load_sts_task(data_dir, task, split)
        except (OSError, ValueError, UnicodeDecodeError, IndexError, KeyError) as exc:
            parser.error(f"--data_dir {str(data_dir)!r}: {task} {split} cannot be read ({exc})")
    try:
        check_encoder(args.model_name_or_path)
    except ValueError as exc:
        parser.error(f"--model_name_or_path {exc}")
    except OSError as exc:
        parser.error(f"--model_name_or_path {args.model_name_or_path!r} could not be loaded ({exc}); offline, pass "
                     "a local model folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    started = time.perf_counter()
    try:
        encoder = SentenceEncoder.from_pretrained(args.model_name_or_path, pooler=args.pooler)
    except OSError as exc:
        parser.error(f"--model_name_or_path {args.model_name_or_path!r} could not be loaded ({exc})")
    encoder.to(device)
    logger.info("model %s, pooler %s (mlp_only_train=%s), device %s", args.model_name_or_path, encoder.pooler,
                encoder.mlp_only_train, device)
    results = evaluate_sts(encoder, data_dir, tasks=list(tasks), mode=args.mode, batch_size=args.batch_size,
                           max_length=args.max_seq_length, show_progress=not args.no_progress)
    logger.info("evaluated in %.1f s", time.perf_counter() - started)

    print("------ %s ------" % args.mode)
    print(_table(results))
    if args.output_json:
        _write_json_atomic(Path(args.output_json), results)
        logger.info("wrote %s", args.output_json)
    return 0


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the result follows the user's umask
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
