"""Loading SentEval's STS data (STS12-16, STS-B, SICK-R) and transfer-task data exactly as SentEval reads them.

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

The transfer tasks (``TRANSFER_TASKS``; ``load_transfer_task``) are read as SentEval's task classes read them:

- MR, CR, SUBJ, MPQA (``senteval/binary.py``): two files of one sentence a line, read as latin-1 with
  ``splitlines()`` (empty lines are kept as empty sentences: CR has 3775 and MPQA 10606 examples because of them);
  label 1 for the first file SentEval names (``rt-polarity.pos``, ``custrev.pos``, ``subj.objective``,
  ``mpqa.pos``), 0 for the other.
- SST2 (``senteval/sst.py``): ``SST/binary/sentiment-{train,dev,test}``, utf-8, ``sentence<TAB>label``.
- TREC (``senteval/trec.py``): ``train_5500.label`` and ``TREC_10.label``, latin-1, ``COARSE:fine question``;
  the six coarse classes ABBR, DESC, ENTY, HUM, LOC, NUM are labels 0-5.
- MRPC (``senteval/mrpc.py``): ``msr_paraphrase_{train,test}.txt``, utf-8, a header line, then quality (the
  label), two ids and the two sentences, tab-separated.

Each split's examples come in SentEval's order: SentEval sorts them by token count (and label) before embedding,
and builds its cross-validation folds on that order, so keeping it reproduces SentEval's folds.

The data folder is an argument or the environment variable ``ISCSE_DATA_DIR``; nothing here knows a default.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATA_DIR_ENV",
    "DEMO_DATA_DIR",
    "STS_SUBSETS",
    "STS_TASKS",
    "STSPairs",
    "TRANSFER_FOLDERS",
    "TRANSFER_TASKS",
    "TransferSplit",
    "load_sts_task",
    "load_transfer_task",
    "resolve_data_dir",
]

#: Environment variable consulted when no data folder is given.
DATA_DIR_ENV = "ISCSE_DATA_DIR"

#: The sample data shipped in the package (``iscse/demo_data``, SentEval's layout): 375 STS-B dev pairs (no other
#: STS split, no SICK files), the demo presets' corpus and the supervised demo's triples. See its README.md.
DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "demo_data"

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

#: SentEval's transfer tasks, in SimCSE's table order.
TRANSFER_TASKS: tuple[str, ...] = ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC")

#: Where each transfer task lives under SentEval's ``data/downstream`` (senteval/engine.py).
TRANSFER_FOLDERS: dict[str, str] = {
    "MR": "MR", "CR": "CR", "SUBJ": "SUBJ", "MPQA": "MPQA", "SST2": "SST/binary", "TREC": "TREC", "MRPC": "MRPC",
}

# senteval/binary.py: (file labelled 1, file labelled 0)
_BINARY_FILES = {
    "MR": ("rt-polarity.pos", "rt-polarity.neg"),
    "CR": ("custrev.pos", "custrev.neg"),
    "SUBJ": ("subj.objective", "subj.subjective"),
    "MPQA": ("mpqa.pos", "mpqa.neg"),
}
_TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")

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


def resolve_data_dir(data_dir: str | os.PathLike | None = None, *,
                     required: tuple[str, ...] | list[str] = ("STS", "SICK")) -> Path:
    """Return SentEval's ``data/downstream`` folder as a ``Path``, checked to exist.

    ``data_dir`` wins; when it is None the environment variable ``ISCSE_DATA_DIR`` is used. Raises ``ValueError``
    when neither is set and ``FileNotFoundError`` when the folder (or one of its ``required`` sub-folders, by
    default ``STS`` and ``SICK``; e.g. ``("MR", "SST/binary")`` for transfer tasks) is missing; both messages name
    ``--data_dir`` and ``ISCSE_DATA_DIR`` and say what the folder must contain.
    """
    holding = "/, ".join(required) + "/" if required else "SentEval's task folders"
    hint = (
        "pass --data_dir (Python: data_dir=) or set the environment variable "
        f"{DATA_DIR_ENV} to SentEval's data/downstream folder (the one holding {holding}; SentEval's "
        "data/downstream/get_transfer_data.bash or SimCSE's SentEval/data/downstream/download_dataset.sh "
        "fetches it)"
    )
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        if data_dir is None:
            raise ValueError(f"data_dir: no SentEval data folder given; {hint}")
        source = f"{DATA_DIR_ENV}={data_dir!r}"
    else:
        source = f"data_dir={str(data_dir)!r}"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"SentEval data folder not found ({source}); {hint}")
    missing = [sub for sub in required if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"SentEval data folder {str(path)!r} ({source}) has no {', '.join(missing)} sub-folder"
            f"{'s' if len(missing) > 1 else ''}; {hint}"
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


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"SentEval data file missing: {str(path)!r}; the data folder (--data_dir / {DATA_DIR_ENV}) must be "
            "SentEval's complete data/downstream layout"
        )


def _read_lines(path: Path) -> list[str]:
    _require_file(path)
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


# ----------------------------------------------------------------------------- transfer tasks


@dataclass(frozen=True)
class TransferSplit:
    """Labelled examples of one split of a SentEval transfer task.

    ``sentences[i]`` is example ``i`` (SentEval's whitespace tokens joined by single spaces, as SimCSE's batcher
    feeds them to the tokenizer; it may be empty: SentEval keeps the empty lines of CR and MPQA) and ``labels[i]``
    its class (an int in ``0 .. n_classes - 1``). For MRPC an example is a sentence pair: ``sentences2[i]`` is its
    second sentence; for the other tasks ``sentences2`` is None. ``name`` says where the examples come from, e.g.
    ``"MR/all"`` or ``"TREC/train"``. Examples are in SentEval's order (sorted by token count, then label).
    """

    name: str
    sentences: tuple[str, ...]
    labels: tuple[int, ...]
    sentences2: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.sentences) != len(self.labels) or (
                self.sentences2 is not None and len(self.sentences2) != len(self.labels)):
            raise ValueError(
                f"TransferSplit {self.name!r}: sentences, sentences2 and labels must have one entry per example, "
                f"got {len(self.sentences)}, {None if self.sentences2 is None else len(self.sentences2)} and "
                f"{len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


def load_transfer_task(data_dir: str | os.PathLike | None, task: str) -> dict[str, TransferSplit]:
    """Load one SentEval transfer task as SentEval reads it; returns ``{split: TransferSplit}``.

    ``task`` is one of ``TRANSFER_TASKS``. The splits are SentEval's: ``{"all"}`` for MR, CR, SUBJ and MPQA
    (evaluated by cross-validation over all examples), ``{"train", "test"}`` for TREC and MRPC (cross-validation
    on train selects the classifier, test scores it), ``{"train", "dev", "test"}`` for SST2. ``data_dir`` is
    resolved by ``resolve_data_dir`` (it must hold the task's folder, ``TRANSFER_FOLDERS[task]``). Raises
    ``ValueError`` for an unknown task or a malformed line (naming the file and line) and ``FileNotFoundError``
    for a missing folder or file.
    """
    if task not in TRANSFER_TASKS:
        raise ValueError(f"task: expected one of {', '.join(TRANSFER_TASKS)}, got {task!r}")
    folder = resolve_data_dir(data_dir, required=(TRANSFER_FOLDERS[task],)) / TRANSFER_FOLDERS[task]
    if task in _BINARY_FILES:
        first, second = (_read_tokens_latin1(folder / name) for name in _BINARY_FILES[task])
        samples = [(tokens, 1) for tokens in first] + [(tokens, 0) for tokens in second]
        return {"all": _sorted_split(f"{task}/all", samples)}
    if task == "SST2":
        return {split: _sorted_split(f"{task}/{split}", _load_sst2(folder / f"sentiment-{split}"))
                for split in _SPLITS}
    if task == "TREC":
        return {split: _sorted_split(f"{task}/{split}", _load_trec(folder / name))
                for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label"))}
    return {split: _load_mrpc(folder / f"msr_paraphrase_{split}.txt", f"{task}/{split}")
            for split in ("train", "test")}


def _read_tokens_latin1(path: Path) -> list[list[str]]:
    # senteval/binary.py: io.open(..., encoding='latin-1'), f.read().splitlines(), line.split()
    _require_file(path)
    with io.open(path, encoding="latin-1") as handle:
        return [line.split() for line in handle.read().splitlines()]


def _sorted_split(name: str, samples: list[tuple[list[str], int]]) -> TransferSplit:
    # SentEval sorts (tokens, label) by (token count, label) before embedding and fold construction; the sort is
    # stable, so ties keep file order, as in SentEval.
    ordered = sorted(samples, key=lambda z: (len(z[0]), z[1]))
    return TransferSplit(name, tuple(" ".join(t) for t, _ in ordered), tuple(y for _, y in ordered))


def _load_sst2(path: Path) -> list[tuple[list[str], int]]:
    # senteval/sst.py (nclasses=2): utf-8, line.strip().split('\t'), label int(sample[1]), tokens sample[0].split()
    samples = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        fields = line.strip().split("\t")
        if len(fields) < 2 or fields[1] not in ("0", "1"):
            raise ValueError(f"{str(path)!r} line {lineno}: expected 'sentence<TAB>0|1', got {line!r}")
        samples.append((fields[0].split(), int(fields[1])))
    return samples


def _load_trec(path: Path) -> list[tuple[list[str], int]]:
    # senteval/trec.py: latin-1; target, sample = line.strip().split(':', 1); tokens sample.split(' ', 1)[1].split()
    _require_file(path)
    samples = []
    with io.open(path, encoding="latin-1") as handle:
        for lineno, line in enumerate(handle, start=1):
            target, _, rest = line.strip().partition(":")
            fine_and_question = rest.split(" ", 1)
            if target not in _TREC_CLASSES or len(fine_and_question) != 2:
                raise ValueError(f"{str(path)!r} line {lineno}: expected 'COARSE:fine question' with COARSE one of "
                                 f"{', '.join(_TREC_CLASSES)}, got {line.rstrip()!r}")
            samples.append((fine_and_question[1].split(), _TREC_CLASSES.index(target)))
    return samples


def _load_mrpc(path: Path, name: str) -> TransferSplit:
    # senteval/mrpc.py: utf-8; line.strip().split('\t'); label text[0], sentences text[3] and text[4]; the first
    # line is a header. Sorted by (tokens of A, tokens of B, label) as SentEval does before embedding.
    _require_file(path)
    samples = []
    with io.open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if lineno == 1:
                continue
            fields = line.strip().split("\t")
            if len(fields) < 5 or fields[0] not in ("0", "1"):
                raise ValueError(f"{str(path)!r} line {lineno}: expected 'quality<TAB>id<TAB>id<TAB>sentence<TAB>"
                                 f"sentence' with quality 0 or 1, got {line.rstrip()!r}")
            samples.append((fields[3].split(), fields[4].split(), int(fields[0])))
    ordered = sorted(samples, key=lambda z: (len(z[0]), len(z[1]), z[2]))
    return TransferSplit(name, tuple(" ".join(a) for a, _, _ in ordered), tuple(y for _, _, y in ordered),
                         tuple(" ".join(b) for _, b, _ in ordered))
