"""STS and transfer-task evaluation with the SentEval protocol, as functions and a command.

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
Spearman x100. The data folder is ``--data_dir`` or the environment variable ``ISCSE_DATA_DIR``. ``--demo``
evaluates on the sample shipped in the package instead (375 STS-B dev pairs, ``iscse/demo_data``), offline::

    python -m iscse.evaluate --demo --model_name_or_path result/iscse-demo-minilm/model

Transfer tasks (``--task_set transfer``, or ``full`` for STS and transfer, or ``--tasks MR CR ...``): SentEval's
MR, CR, SUBJ, MPQA, SST2, TREC and MRPC with a scikit-learn logistic regression as in SentEval's scikit-learn
path (``iscse.evaluation.transfer`` describes the protocol and its departures): 10-fold cross-validation in ``--mode test``
and 5-fold (SentEval's prototyping setting, as SimCSE's ``fasttest`` and ``dev``) otherwise, or ``--kfold``.
The command prints SimCSE's transfer table (test accuracy; dev accuracy in ``--mode dev``) and a table with
accuracy, MRPC's F1, the example counts, the chosen C and the seconds per task; the JSON gains a ``"transfer"``
object (``evaluate_transfer``'s result).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from scipy.stats import spearmanr

from . import transfer  # numpy only; it imports scikit-learn when a protocol function runs
from .._io import write_json_atomic
from .encoder import POOLERS, SentenceEncoder, check_encoder
from .senteval import (DATA_DIR_ENV, DEMO_DATA_DIR, STS_TASKS, TRANSFER_FOLDERS, TRANSFER_TASKS, STSPairs, TransferSplit,
                       load_sts_task, load_transfer_task, resolve_data_dir)

__all__ = ["DEV_TASKS", "MODES", "TASK_SETS", "evaluate_sts", "evaluate_transfer", "format_table", "main"]

logger = logging.getLogger(__name__)

#: Tasks evaluated in dev mode (SimCSE's dev evaluation and IS-CSE's checkpoint selection use STS-B dev).
DEV_TASKS: tuple[str, ...] = ("STSBenchmark", "SICKRelatedness")
#: Accepted modes; SimCSE's "fasttest" differs from "test" only for transfer tasks (5 folds instead of 10).
MODES: tuple[str, ...] = ("test", "dev", "fasttest")
#: SimCSE's ``--task_set`` values: "na" means exactly ``--tasks``.
TASK_SETS: tuple[str, ...] = ("sts", "transfer", "full", "na")

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
    _check_embedder(model, batch_size, max_length, device)

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


def evaluate_transfer(
    model: Embedder,
    data_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    kfold: int = 10,
    batch_size: int = 128,
    max_length: int | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> dict:
    """SentEval's transfer tasks with a scikit-learn logistic regression on the model's sentence embeddings.

    ``model`` is a ``SentenceEncoder`` or a callable, as for ``evaluate_sts``; ``tasks`` are names from
    ``TRANSFER_TASKS`` (default: all seven). ``kfold`` is SentEval's ``kfold``: 10 for the full protocol, 5 for
    SentEval's prototyping setting (SimCSE's ``fasttest``). Per task (``iscse.evaluation.transfer`` has the protocol):
    MR, CR, SUBJ, MPQA by ``inner_kfold_eval`` over all examples; TREC by ``kfold_eval`` (train / test); MRPC by
    ``kfold_eval`` on ``pair_features`` of its two sentences, with F1; SST2 by ``split_eval`` (train / dev / test).
    Each task's distinct sentences are embedded once, then its classifiers are fitted (tqdm bars for both).

    Returns ``{"tasks": {task: result}, "avg": mean test accuracy, "avg_devacc": mean dev accuracy, "protocol":
    {...}}`` where a task's result holds ``acc`` and ``devacc`` (x100, rounded to 2 decimals as SentEval does),
    ``f1`` (MRPC only), ``ndev`` and ``ntest`` (SentEval's counts), ``n`` (examples per split), ``C`` (the chosen
    C; a list with one per outer fold for the inner k-fold tasks), and ``seconds`` (wall time of the task, of
    which ``encode_seconds`` embedding). ``protocol`` records the classifier settings and library versions.
    """
    sklearn = _import_sklearn()
    from sklearn.metrics import f1_score
    from tqdm.auto import tqdm

    if tasks is None:
        tasks = TRANSFER_TASKS
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError(f"tasks must be a non-empty list of task names from {', '.join(TRANSFER_TASKS)}, "
                         f"got {tasks!r}")
    for task in tasks:
        if task not in TRANSFER_TASKS:
            raise ValueError(f"tasks: unknown task {task!r}; expected names from {', '.join(TRANSFER_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: each task at most once, got {list(tasks)}")
    if isinstance(kfold, bool) or not isinstance(kfold, int) or kfold < 2:
        raise ValueError(f"kfold must be an int >= 2, got {kfold!r}")
    _check_embedder(model, batch_size, max_length, device)
    root = resolve_data_dir(data_dir, required=tuple(TRANSFER_FOLDERS[t] for t in tasks))

    results: dict[str, dict] = {}
    for task in tasks:
        started = time.perf_counter()
        splits = load_transfer_task(root, task)
        sentences = list(dict.fromkeys(s for split in splits.values()
                                       for s in (*split.sentences, *(split.sentences2 or ()))))
        logger.info("%s: %s; %d distinct sentences", task,
                    ", ".join(f"{name} {len(split)}" for name, split in splits.items()), len(sentences))
        embeddings = _embed(model, sentences, batch_size, max_length, show_progress, device).numpy()  # (N, D)
        encode_seconds = time.perf_counter() - started
        row = {s: i for i, s in enumerate(sentences)}

        def features(split: TransferSplit) -> np.ndarray:
            u = embeddings[[row[s] for s in split.sentences]]
            if split.sentences2 is None:
                return u
            return transfer.pair_features(u, embeddings[[row[s] for s in split.sentences2]])

        def labels(split: TransferSplit) -> np.ndarray:
            return np.asarray(split.labels, dtype=np.int64)

        if "all" in splits:
            n_fits = kfold * (kfold * len(transfer.INNER_C_GRID) + 1)
        elif "dev" in splits:
            n_fits = len(transfer.SPLIT_C_GRID) + 1
        else:
            n_fits = kfold * len(transfer.KFOLD_C_GRID) + 1
        with tqdm(total=n_fits, desc=f"{task} classifier", unit="fit", disable=not show_progress) as bar:
            if "all" in splits:
                out = transfer.inner_kfold_eval(features(splits["all"]), labels(splits["all"]), k=kfold,
                                                progress=bar.update)
                counts = {"ndev": len(splits["all"]), "ntest": len(splits["all"])}
            elif "dev" in splits:
                train, dev, test = splits["train"], splits["dev"], splits["test"]
                out = transfer.split_eval(features(train), labels(train), features(dev), labels(dev),
                                          features(test), labels(test), progress=bar.update)
                counts = {"ndev": len(dev), "ntest": len(test)}
            else:
                train, test = splits["train"], splits["test"]
                out = transfer.kfold_eval(features(train), labels(train), features(test), labels(test), k=kfold,
                                          progress=bar.update)
                if task == "MRPC":  # senteval/mrpc.py: F1 of the test predictions, class 1 (paraphrase) positive
                    out["f1"] = round(100.0 * float(f1_score(labels(test), out["predictions"])), 2)
                counts = {"ndev": len(train), "ntest": len(test)}
        result = {"acc": out["acc"], "devacc": out["devacc"]}
        if "f1" in out:
            result["f1"] = out["f1"]
        result.update(counts)
        result["n"] = {name: len(split) for name, split in splits.items()}
        result["C"] = out["C"]
        if "dev" in splits:
            result["selection"] = "dev split"
        else:
            result["kfold"] = kfold
        result["seconds"] = round(time.perf_counter() - started, 2)
        result["encode_seconds"] = round(encode_seconds, 2)
        results[task] = result
        logger.info("%s: acc %.2f, devacc %.2f%s, C %s, %.1f s (%.1f s embedding)", task, result["acc"],
                    result["devacc"], f", F1 {result['f1']:.2f}" if "f1" in result else "", result["C"],
                    result["seconds"], encode_seconds)

    return {
        "tasks": results,
        "avg": float(np.mean([r["acc"] for r in results.values()])),
        "avg_devacc": float(np.mean([r["devacc"] for r in results.values()])),
        "protocol": {
            "classifier": f"sklearn.linear_model.LogisticRegression(C, random_state={transfer.SEED}, "
                          f"max_iter={transfer.MAX_ITER}), default lbfgs solver, unscaled features, one BLAS thread",
            "kfold": kfold,
            "seed": transfer.SEED,
            "C_grid": {"MR/CR/SUBJ/MPQA (inner k-fold)": list(transfer.INNER_C_GRID),
                       "TREC/MRPC (k-fold on train)": list(transfer.KFOLD_C_GRID),
                       "SST2 (dev split)": list(transfer.SPLIT_C_GRID)},
            "scikit_learn": sklearn.__version__,
        },
    }


def _import_sklearn():
    try:
        import sklearn
    except ImportError:
        raise ImportError("the transfer tasks need scikit-learn: pip install scikit-learn (or the 'eval' extra, "
                          "pip install -e '.[eval]')") from None
    return sklearn


def _check_embedder(model: Embedder, batch_size: int, max_length: int | None, device) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(model, SentenceEncoder):
        if not callable(model):
            raise TypeError("model must be a SentenceEncoder or a callable mapping a list of sentences to an "
                            f"(n, D) tensor, got {type(model).__name__}")
        if max_length is not None or device is not None:
            raise ValueError("max_length and device apply to a SentenceEncoder only; a plain callable handles its "
                             "own tokenization and device")


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


def _transfer_tables(results: dict, mode: str) -> str:
    """SimCSE's transfer table (accuracy, or dev accuracy in dev mode, and "Avg.") and a per-task detail table."""
    tasks = results["tasks"]
    key = "devacc" if mode == "dev" else "acc"
    names = list(tasks)
    scores = ["%.2f" % tasks[t][key] for t in names]
    avg = "%.2f" % (sum(float(v) for v in scores) / len(scores))  # SimCSE averages the printed values
    rows = [("task", "acc", "devacc", "F1", "examples", "C", "seconds")]
    for task, r in tasks.items():
        c = r["C"]
        c_text = "/".join("%g" % v for v in sorted(set(c))) if isinstance(c, list) else "%g" % c
        rows.append((task, "%.2f" % r["acc"], "%.2f" % r["devacc"], "%.2f" % r["f1"] if "f1" in r else "",
                     " / ".join(f"{n} {split}" for split, n in r["n"].items()), c_text, "%.1f" % r["seconds"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return format_table(names + ["Avg."], scores + [avg]) + "\n" + "\n".join(lines)


class _OneLineParser(argparse.ArgumentParser):
    """Errors are one line (no usage block, no traceback), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


#: What ``--demo`` evaluates: the one STS split shipped in ``iscse/demo_data``.
DEMO_TASKS: tuple[str, ...] = ("STSBenchmark",)


def _build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows each default as the parser holds it (ArgumentDefaultsHelpFormatter), and
    says in words what a ``None`` default means."""
    parser = _OneLineParser(
        prog="python -m iscse.evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="STS12-16, STS-B and SICK-R Spearman x100 of a sentence encoder, with the SentEval protocol "
                    "as SimCSE and IS-CSE report it, and SentEval's transfer tasks (MR, CR, SUBJ, MPQA, SST2, "
                    "TREC, MRPC) with a scikit-learn logistic regression. --demo: offline, on the sample shipped "
                    "in the package.")
    parser.add_argument("--model_name_or_path", "--model-name-or-path", required=True,
                        help="Hugging Face model name or local folder (e.g. one written by the trainer)")
    parser.add_argument("--demo", action="store_true",
                        help=f"evaluate on the sample data shipped in the package, with no network and no data "
                             f"download: STS-B dev, 375 of its 1,500 pairs (not comparable with published STS-B "
                             f"dev numbers); the same as --data_dir {DEMO_DATA_DIR} --mode dev --tasks "
                             f"{' '.join(DEMO_TASKS)}")
    parser.add_argument("--pooler", choices=POOLERS, default=None,
                        help="pooler; not given: the one a saved iscse checkpoint records, else cls")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="test: STS12-16 + STS-B test + SICK-R test, transfer test accuracy with 10 folds; "
                             "dev: STS-B dev + SICK-R dev, transfer dev accuracy with 5 folds; fasttest: as test, "
                             "transfer with 5 folds; not given: test (dev with --demo)")
    parser.add_argument("--task_set", "--task-set", choices=TASK_SETS, default=None,
                        help="sts: every STS task of the mode; transfer: MR CR SUBJ MPQA SST2 TREC MRPC; full: "
                             "both; na: exactly --tasks (SimCSE's flag); not given: sts, or --tasks when given")
    parser.add_argument("--tasks", nargs="+", choices=STS_TASKS + TRANSFER_TASKS, default=None, metavar="TASK",
                        help=f"tasks to run, from {' '.join(STS_TASKS + TRANSFER_TASKS)}; not given: the STS "
                             "tasks of the mode")
    parser.add_argument("--kfold", type=int, default=None,
                        help="cross-validation folds for the transfer tasks; not given: 10 in test mode, 5 in dev "
                             "and fasttest, as SimCSE")
    parser.add_argument("--data_dir", "--data-dir", default=None,
                        help=f"SentEval's data/downstream folder; not given: ${DATA_DIR_ENV}")
    parser.add_argument("--output_json", "--output-json", default=None,
                        help="write {task: Spearman x100, ..., 'avg': mean} to this file (and, with transfer "
                             "tasks, 'transfer': {'tasks': {task: {acc, devacc, ...}}, 'avg': ...})")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=128,
                        help="sentences per forward pass (SentEval's value)")
    parser.add_argument("--max_seq_length", "--max-seq-length", type=int, default=None,
                        help="truncate inputs to this many tokens; not given: the model's limit, i.e. no "
                             "truncation for these tasks, as SimCSE")
    parser.add_argument("--device", default=None, help="torch device; not given: cuda if available, else cpu")
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _apply_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--demo``: the packaged data, dev mode, STS-B; a flag that asks for anything the sample does not hold is an
    error (rather than a missing-file message about a folder the user never named)."""
    if not args.demo:
        args.mode = args.mode or "test"
        return
    if args.data_dir is not None:
        parser.error("--demo evaluates on the packaged sample data; leave out --data_dir (or --demo)")
    if args.mode not in (None, "dev"):
        parser.error(f"--demo has STS-B dev pairs only; leave out --mode {args.mode}")
    if args.task_set not in (None, "sts", "na") or (args.tasks is not None and list(args.tasks) != list(DEMO_TASKS)):
        parser.error(f"--demo evaluates {' '.join(DEMO_TASKS)} (dev) only; leave out --task_set / --tasks")
    args.data_dir, args.mode, args.tasks, args.task_set = str(DEMO_DATA_DIR), "dev", list(DEMO_TASKS), None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m iscse.evaluate``); returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _apply_demo(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.task_set in ("sts", "transfer", "full") and args.tasks is not None:
        parser.error(f"--task_set {args.task_set} runs a fixed list of tasks; use --task_set na (or leave it out) "
                     "with --tasks")
    if args.task_set == "na" and args.tasks is None:
        parser.error("--task_set na needs --tasks")
    if args.kfold is not None and args.kfold < 2:
        parser.error(f"--kfold must be >= 2, got {args.kfold}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_seq_length is not None and args.max_seq_length < 1:
        parser.error(f"--max_seq_length must be >= 1, got {args.max_seq_length}")
    split_tasks = DEV_TASKS if args.mode == "dev" else STS_TASKS
    if args.tasks is not None:
        tasks = list(dict.fromkeys(args.tasks))
    elif args.task_set == "transfer":
        tasks = list(TRANSFER_TASKS)
    elif args.task_set == "full":
        tasks = list(split_tasks) + list(TRANSFER_TASKS)
    else:
        tasks = list(split_tasks)
    sts_tasks = [t for t in tasks if t in STS_TASKS]
    transfer_tasks = [t for t in tasks if t in TRANSFER_TASKS]
    if args.mode == "dev" and any(t not in DEV_TASKS for t in sts_tasks):
        parser.error(f"--mode dev evaluates only {' and '.join(DEV_TASKS)} (STS12-16 have no dev split)")
    kfold = args.kfold if args.kfold is not None else (10 if args.mode == "test" else 5)
    required = (("STS", "SICK") if sts_tasks else ()) + tuple(TRANSFER_FOLDERS[t] for t in transfer_tasks)
    try:
        data_dir = resolve_data_dir(args.data_dir, required=required)  # fail before the model loads
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if transfer_tasks:
        try:
            _import_sklearn()
        except ImportError as exc:
            parser.error(str(exc))
    split = "dev" if args.mode == "dev" else "test"
    for task in sts_tasks:  # every STS file the run reads, before the model loads
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
    results: dict = {}
    if sts_tasks:
        results = evaluate_sts(encoder, data_dir, tasks=sts_tasks, mode=args.mode, batch_size=args.batch_size,
                               max_length=args.max_seq_length, show_progress=not args.no_progress)
    if transfer_tasks:
        results["transfer"] = evaluate_transfer(encoder, data_dir, tasks=transfer_tasks, kfold=kfold,
                                                batch_size=args.batch_size, max_length=args.max_seq_length,
                                                show_progress=not args.no_progress)
    logger.info("evaluated in %.1f s", time.perf_counter() - started)

    print("------ %s ------" % args.mode)
    if sts_tasks:
        print(_table({k: v for k, v in results.items() if k != "transfer"}))
    if transfer_tasks:
        print(_transfer_tables(results["transfer"], args.mode))
    if args.output_json:
        write_json_atomic(Path(args.output_json), results)
        logger.info("wrote %s", args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
