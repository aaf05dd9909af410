"""Loading SentEval's STS data (STS12-16, STS-B, SICK-R) exactly as SentEval reads it.

The files are SentEval's ``data/downstream`` layout, as produced by SentEval's ``get_transfer_data.bash`` (and
SimCSE's ``download_senteval.sh``), with SentEval's preprocessing (tokenized, lower-cased STS12-16 and STS-B):

- ``STS/STS1{2..6}-en-test/STS.input.<set>.txt``: two tab-separated sentences a line; ``STS.gs.<set>.txt``: the
  gold score a line, where an empty line marks an unscored pair that is skipped.
- ``STS/STSBenchmark/sts-{train,dev,test}.csv``: tab-separated; column 4 (0-based) is the score, columns 5 and 6
  the sentences.
- ``SICK/SICK_{train,trial,test_annotated}.txt``: a header line, then pair id, sentence A, sentence B,
  relatedness score. SentEval's (and SimCSE's) SICK-R "dev" split is the trial file.

Every sentence is normalised the way SentEval and SimCSE's batcher see it: SentEval splits it on whitespace
(``str.split()``) and SimCSE's batcher joins the tokens with single spaces before handing the string to the
tokenizer. Which sub-sets make up a year is SentEval's list (``STS_SUBSETS``), not whatever files are present:
a missing file is an error, so a partial download cannot silently change a reported number.

The data folder is an argument or the environment variable ``ISCSE_DATA_DIR``; nothing here knows a default.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATA_DIR_ENV",
    "STS_SUBSETS",
    "STS_TASKS",
    "STSPairs",
    "load_sts_task",
    "resolve_data_dir",
]

#: Environment variable consulted when no data folder is given.
DATA_DIR_ENV = "ISCSE_DATA_DIR"

#: The seven STS tasks, spelled as SentEval spells them, in SimCSE's table order.
STS_TASKS: tuple[str, ...] = (
    "STS12",
    "STS13",
    "STS14",
    "STS15",
    "STS16",
    "STSBenchmark",
    "SICKRelatedness",
)

#: SentEval's sub-sets of each STS year (senteval/sts.py). STS13 has no SMT set: it is licensed and SentEval
#: leaves it out, as do SimCSE's and IS-CSE's reported numbers.
STS_SUBSETS: dict[str, tuple[str, ...]] = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}

_SPLITS = ("train", "dev", "test")
_STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
_SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


@dataclass(frozen=True)
class STSPairs:
    """Scored sentence pairs of one STS (sub-)dataset.

    ``sentences1[i]`` and ``sentences2[i]`` are the two sentences of pair ``i`` (whitespace-normalised strings, as
    SimCSE's batcher feeds them to the tokenizer) and ``scores[i]`` its gold similarity (a float; 0-5 for STS,
    1-5 for SICK). Only scored pairs are kept. ``name`` says where the pairs come from, e.g.
    ``"STS12/MSRpar"`` or ``"STSBenchmark/test"``.
    """

    name: str
    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.sentences1) == len(self.sentences2) == len(self.scores):
            raise ValueError(
                f"STSPairs {self.name!r}: sentences1, sentences2 and scores must have one entry per pair, "
                f"got {len(self.sentences1)}, {len(self.sentences2)} and {len(self.scores)}"
            )

    def __len__(self) -> int:
        return len(self.scores)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return SentEval's ``data/downstream`` folder as a ``Path``, checked to exist.

    ``data_dir`` wins; when it is None the environment variable ``ISCSE_DATA_DIR`` is used. Raises ``ValueError``
    when neither is set and ``FileNotFoundError`` when the folder (or its ``STS`` / ``SICK`` sub-folders) is
    missing; both messages name ``--data_dir`` and ``ISCSE_DATA_DIR`` and say what the folder must contain.
    """
    hint = (
        "pass --data_dir (Python: data_dir=) or set the environment variable "
        f"{DATA_DIR_ENV} to SentEval's data/downstream folder (the one holding STS/ and SICK/; SentEval's "
        "data/downstream/get_transfer_data.bash or SimCSE's SentEval/data/downstream/download_dataset.sh "
        "fetches it)"
    )
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        if data_dir is None:
            raise ValueError(f"data_dir: no STS data folder given; {hint}")
        source = f"{DATA_DIR_ENV}={data_dir!r}"
    else:
        source = f"data_dir={str(data_dir)!r}"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"STS data folder not found ({source}); {hint}")
    missing = [sub for sub in ("STS", "SICK") if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"STS data folder {str(path)!r} ({source}) has no {' or '.join(missing)} sub-folder; {hint}"
        )
    return path


def load_sts_task(data_dir: str | os.PathLike | None, task: str, split: str = "test") -> list[STSPairs]:
    """Load one STS task as SentEval does and return its (sub-)datasets.

    ``task`` is one of ``STS_TASKS``. For STS12-16 the result holds one ``STSPairs`` per SentEval sub-set (only a
    test split exists, so ``split`` must be ``"test"``); SimCSE's "all" setting pools them. For ``STSBenchmark``
    and ``SICKRelatedness`` it holds the one requested split (``"train"``, ``"dev"`` or ``"test"``; SICK's dev
    split is ``SICK_trial.txt``). ``data_dir`` is resolved by ``resolve_data_dir``. Raises ``ValueError`` for an
    unknown task or split, ``FileNotFoundError`` for a missing file and ``ValueError`` for a malformed line
    (naming the file and line).
    """
    if task not in STS_TASKS:
        raise ValueError(f"task: expected one of {', '.join(STS_TASKS)}, got {task!r}")
    if split not in _SPLITS:
        raise ValueError(f"split: expected one of {', '.join(_SPLITS)}, got {split!r}")
    root = resolve_data_dir(data_dir)
    if task in STS_SUBSETS:
        if split != "test":
            raise ValueError(
                f"split: {task} has only a test split (SentEval's STS12-16 are test sets), got {split!r}; "
                "dev evaluation uses STSBenchmark and SICKRelatedness"
            )
        folder = root / "STS" / f"{task}-en-test"
        return [_load_sts_year_subset(folder, task, subset) for subset in STS_SUBSETS[task]]
    if task == "STSBenchmark":
        return [_load_stsb(root / "STS" / "STSBenchmark" / _STSB_FILES[split], f"{task}/{split}")]
    return [_load_sick(root / "SICK" / _SICK_FILES[split], f"{task}/{split}")]


def _normalise(sentence: str) -> str:
    # SentEval stores sentences as s.split(); SimCSE's batcher sends ' '.join(tokens) to the tokenizer.
    return " ".join(sentence.split())


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"STS data file missing: {str(path)!r}; the data folder (--data_dir / {DATA_DIR_ENV}) must be "
            "SentEval's complete data/downstream layout"
        )
    # SentEval reads with utf8 and str.splitlines(); doing the same keeps line numbering identical.
    with io.open(path, encoding="utf8") as handle:
        return handle.read().splitlines()


def _load_sts_year_subset(folder: Path, task: str, subset: str) -> STSPairs:
    input_path = folder / f"STS.input.{subset}.txt"
    gold_path = folder / f"STS.gs.{subset}.txt"
    inputs = _read_lines(input_path)
    gold = _read_lines(gold_path)
    if len(inputs) != len(gold):
        raise ValueError(
            f"{str(input_path)!r} has {len(inputs)} lines but {str(gold_path)!r} has {len(gold)}; "
            "they must pair up line by line"
        )
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for lineno, (line, raw_score) in enumerate(zip(inputs, gold), start=1):
        if raw_score.strip() == "":  # unscored pair: SentEval drops it
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(
                f"{str(input_path)!r} line {lineno}: expected 2 tab-separated sentences, got {len(fields)}")
        try:
            score = float(raw_score)
        except ValueError:
            raise ValueError(f"{str(gold_path)!r} line {lineno}: gold score {raw_score!r} is not a number") from None
        s1.append(_normalise(fields[0]))
        s2.append(_normalise(fields[1]))
        scores.append(score)
    return STSPairs(f"{task}/{subset}", tuple(s1), tuple(s2), tuple(scores))


def _load_columns(path: Path, name: str, score_col: int, a_col: int, b_col: int, skip_header: bool) -> STSPairs:
    # Mirrors SentEval's STSBenchmarkEval / SICKRelatednessEval.loadFile: line.strip().split('\t').
    lines = _read_lines(path)
    if skip_header:
        lines = lines[1:]
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    need = max(score_col, a_col, b_col) + 1
    for lineno, line in enumerate(lines, start=2 if skip_header else 1):
        fields = line.strip().split("\t")
        if len(fields) < need:
            raise ValueError(
                f"{str(path)!r} line {lineno}: expected at least {need} tab-separated columns, got {len(fields)}")
        try:
            score = float(fields[score_col])
        except ValueError:
            raise ValueError(f"{str(path)!r} line {lineno}: score {fields[score_col]!r} is not a number") from None
        s1.append(_normalise(fields[a_col]))
        s2.append(_normalise(fields[b_col]))
        scores.append(score)
    return STSPairs(name, tuple(s1), tuple(s2), tuple(scores))


def _load_stsb(path: Path, name: str) -> STSPairs:
    return _load_columns(path, name, score_col=4, a_col=5, b_col=6, skip_header=False)


def _load_sick(path: Path, name: str) -> STSPairs:
    return _load_columns(path, name, score_col=3, a_col=1, b_col=2, skip_header=True)
