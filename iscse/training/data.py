"""Training data for SimCSE / IS-CSE: tokenized once, read in shuffled batches.

Three file formats, chosen by the file name's ending (SimCSE's ``train.py`` reads the same ones):

- ``.csv``: a header naming SimCSE's columns, ``sent0,sent1`` (pairs: ``z1`` from ``sent0``, ``z2`` from
  ``sent1``) or ``sent0,sent1,hard_neg`` (a hard negative per pair, SimCSE's supervised NLI file), in any order;
- ``.jsonl``: one JSON object a line with the same keys;
- anything else (``.txt``): one sentence a line, unsupervised (each sentence is both views, dropout the noise).

:func:`inspect_train_file` checks a file before anything else touches it and says in one sentence what is wrong
(missing or unknown column, empty cell, header only, rows of 2 and 3 sentences mixed, not UTF-8, ...).

- :func:`load_train_dataset` reads a text file with ``datasets.load_dataset("text", ...)`` and tokenizes it once
  (``Dataset.map``, truncation at ``max_seq_length``, no padding), as SimCSE's ``train.py`` does; both steps are
  cached on disk under ``cache_dir`` (an Arrow file keyed by the file and the tokenizer), so a second run with the
  same file and tokenizer starts at once. Works offline: ``"text"`` is a builder packaged with ``datasets``.
- :class:`ShuffledBatches` decides which rows make up each step: every epoch is a fresh permutation drawn from its
  own generator seeded with ``seed + epoch`` (not the global RNG, so nothing else can perturb it), cut into global
  batches of ``per_device_batch_size * world_size`` rows; rank ``r`` takes the ``r``-th slice of each global batch.
  A data position is therefore just ``(epoch, batch index)``, which is what exact resume stores; and a single process
  with the same global batch sees the same rows in the same order as ``world_size`` processes together.
  :class:`EpochBatchSampler` hands these batches to a ``torch.utils.data.DataLoader`` (``transformers.Trainer``
  calls its ``set_epoch`` at every epoch and skips the first batches of the epoch when it resumes).
- :func:`collate_two_views` builds one padded ``(2B, L)`` batch in which every sentence appears twice, in adjacent
  rows (SimCSE's layout: sentence ``i`` at rows ``2i`` and ``2i + 1``): one encoder forward then gives the two
  dropout views, ``z.view(B, 2, H)[:, 0]`` and ``[:, 1]``.
  :func:`collate_sentences` does the same for a one-sentence-a-line dataset and, for pairs and triples, puts the
  ``n`` sentences of example ``i`` at rows ``n i .. n i + n - 1`` (SimCSE's ``(bs, num_sent, len)`` flattened), so
  ``z.view(B, n, H)[:, j]`` is column ``j`` (``sent0``, ``sent1``, ``hard_neg``).
- :func:`inspect_text_file` checks a training file before anything else touches it (exists, is a file, is
  readable UTF-8 text, holds sentences) and counts its lines, so that a bad file is reported in one sentence.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["TextFileStats", "TrainFileStats", "COLUMNS", "file_format", "inspect_text_file", "inspect_train_file",
           "read_sentence_rows", "load_train_dataset", "tokenizer_fingerprint", "ShuffledBatches", "EpochBatchSampler", "collate_two_views",
           "collate_sentences"]

#: SimCSE's column names, in the order the sentences of an example are encoded: anchor, positive, hard negative.
COLUMNS = ("sent0", "sent1", "hard_neg")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextFileStats:
    """What :func:`inspect_text_file` found: ``lines`` (as ``datasets``' text reader splits them: a final line
    without a newline counts, a trailing newline adds none) and ``sentences`` (lines holding more than whitespace)."""

    lines: int
    sentences: int


def inspect_text_file(path: Union[str, os.PathLike], chunk_bytes: int = 1 << 20) -> TextFileStats:
    """Check that ``path`` is a readable UTF-8 text file holding at least one sentence; count its lines.

    Reads the file once, in chunks of ``chunk_bytes`` (about a second for wiki1m's 120 MB). Raises ``ValueError``
    with one sentence that starts with the path and says what to do: the path does not exist, is a folder, cannot
    be read, is empty, holds only blank lines, or is not UTF-8 (with the line of the first bad byte).
    """
    p = Path(path).expanduser()
    name = repr(str(path))
    if not p.exists():
        raise ValueError(f"{name} does not exist; pass a text file with one sentence a line")
    if p.is_dir():
        raise ValueError(f"{name} is a folder, not a file; pass the text file inside it (one sentence a line)")
    if not p.is_file():
        raise ValueError(f"{name} is not a regular file; pass a text file with one sentence a line")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    newlines = sentences = 0
    size = 0
    partial = ""  # the text after the last newline read so far
    try:
        with open(p, "rb") as fh:
            while True:
                chunk = fh.read(chunk_bytes)
                final = not chunk
                try:
                    text = decoder.decode(chunk, final=final)
                except UnicodeDecodeError as exc:
                    line = newlines + chunk[:max(exc.start, 0)].count(b"\n") + 1
                    bad = chunk[exc.start:exc.start + 1].hex() if exc.start < len(chunk) else "end of file"
                    raise ValueError(
                        f"{name} is not UTF-8 text (line {line}: byte 0x{bad} does not decode); convert it to UTF-8, "
                        f"e.g. iconv -f latin1 -t utf-8") from None
                size += len(chunk)
                if text:
                    parts = (partial + text).split("\n")
                    partial = parts.pop()
                    newlines += len(parts)
                    sentences += sum(1 for line in parts if line.strip())
                if final:
                    break
    except OSError as exc:
        raise ValueError(f"{name} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if partial.strip():
        sentences += 1
    lines = newlines + (1 if partial else 0)
    if size == 0:
        raise ValueError(f"{name} is empty; it needs one sentence a line")
    if sentences == 0:
        raise ValueError(f"{name} holds only blank lines ({lines}); it needs one sentence a line")
    return TextFileStats(lines=lines, sentences=sentences)


@dataclass(frozen=True)
class TrainFileStats:
    """What :func:`inspect_train_file` found: ``format`` (``"text"``, ``"csv"`` or ``"jsonl"``), ``examples`` (the
    training examples: sentences of a text file, rows of a CSV or JSONL file) and ``columns`` (sentences per
    example: 1 for a text file, 2 for ``sent0,sent1``, 3 with ``hard_neg``)."""

    format: str
    examples: int
    columns: int

    @property
    def has_hard_negatives(self) -> bool:
        """True for ``sent0,sent1,hard_neg`` files."""
        return self.columns == 3


_FORMAT_HINT = {
    "text": "a text file with one sentence a line",
    "csv": "a CSV file whose header names sent0,sent1 (pairs) or sent0,sent1,hard_neg",
    "jsonl": "a JSONL file, one object a line with the keys sent0, sent1 (and hard_neg)",
}


def file_format(path: Union[str, os.PathLike]) -> str:
    """``"csv"`` for a ``.csv`` name, ``"jsonl"`` for ``.jsonl`` (and ``.json``, which SimCSE's ``train.py`` reads
    with ``datasets``' JSON Lines reader), else ``"text"`` (one sentence a line)."""
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(Path(path).suffix.lower(), "text")


def _check_file(path: Union[str, os.PathLike], fmt: str) -> Path:
    """The path, after checking it is an existing regular file (``ValueError`` naming it otherwise)."""
    p = Path(path).expanduser()
    name, hint = repr(str(path)), _FORMAT_HINT[fmt]
    if not p.exists():
        raise ValueError(f"{name} does not exist; pass {hint}")
    if p.is_dir():
        raise ValueError(f"{name} is a folder, not a file; pass {hint}")
    if not p.is_file():
        raise ValueError(f"{name} is not a regular file; pass {hint}")
    return p


def _check_columns(name: str, names: Sequence[str], where: str) -> Tuple[int, ...]:
    """Positions of ``sent0``, ``sent1`` (and ``hard_neg``) among ``names``; ``ValueError`` for a missing, unknown or
    repeated column. ``where``: "the header" / "line N" (for the message)."""
    expected = "sent0,sent1 (pairs) or sent0,sent1,hard_neg (pairs with a hard negative)"
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{name}: {where} names the column {n!r} twice; the columns are {expected}")
        seen.add(n)
        if n not in COLUMNS:
            raise ValueError(f"{name}: {where} has an unknown column {n!r} (found {','.join(names) or 'none'}); the "
                             f"columns are {expected}")
    for n in COLUMNS[:2]:
        if n not in seen:
            raise ValueError(f"{name}: {where} has no {n} column (found {','.join(names) or 'none'}); the columns "
                             f"are {expected}")
    return tuple(list(names).index(c) for c in COLUMNS if c in seen)


def _mixed(name: str, where: str, got: int, want: int) -> ValueError:
    return ValueError(f"{name}: {where} has {got} sentence column{'s' if got != 1 else ''} where the file started "
                      f"with {want}; a file holds either pairs (sent0,sent1) or triples (sent0,sent1,hard_neg), not a "
                      f"mix: split it, or fill in every hard_neg")


def _empty_cell(name: str, where: str, column: str) -> ValueError:
    return ValueError(f"{name}: {where} has an empty {column}; every example needs all its sentences (fill it in or "
                      f"remove the row)")


def _csv_rows(p: Path, name: str) -> Iterator[Tuple[str, ...]]:
    reader = None
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports write one) is not part of the first column's name
        with open(p, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next((row for row in reader if row), None)  # blank lines before the header are skipped
            if header is None:
                raise ValueError(f"{name} is empty; it needs a header line (sent0,sent1 or sent0,sent1,hard_neg) "
                                 f"and one example a row")
            names = [h.strip() for h in header]
            order = _check_columns(name, names, "the header")
            cols = [COLUMNS[i] for i in range(len(order))]
            count = 0
            for row in reader:
                if not row:
                    continue  # a blank line (pandas, which SimCSE reads CSVs with, skips them too)
                where = f"line {reader.line_num}"
                if len(row) != len(names):
                    if len(row) in (2, 3) and len(names) in (2, 3):
                        raise _mixed(name, where, len(row), len(names))
                    raise ValueError(f"{name}: {where} has {len(row)} fields but the header has {len(names)} "
                                     f"({','.join(names)}); quote a field that holds a comma")
                out = tuple(row[i] for i in order)
                for col, cell in zip(cols, out):
                    if not cell.strip():
                        raise _empty_cell(name, where, col)
                count += 1
                yield out
            if count == 0:
                raise ValueError(f"{name} holds only a header ({','.join(names)}) and no examples; it needs one "
                                 f"example a row")
    except UnicodeDecodeError:
        # The text layer decodes ahead of the CSV reader, so its line count does not say where the bad byte is;
        # the text-file check reads the bytes and names the line (and raises the same sentence as for a .txt file).
        inspect_text_file(p)
        raise ValueError(f"{name} is not UTF-8 text; convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    except csv.Error as exc:
        line = reader.line_num if reader is not None else 1
        raise ValueError(f"{name} is not a readable CSV file (line {line}: {exc})") from None
    except OSError as exc:
        raise ValueError(f"{name} cannot be read ({exc.strerror or exc}); check its permissions") from None


def _jsonl_rows(p: Path, name: str) -> Iterator[Tuple[str, ...]]:
    first: Optional[Tuple[str, ...]] = None
    count = size = 0
    try:
        with open(p, "rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                size += len(raw)
                where = f"line {line_no}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad = raw[exc.start:exc.start + 1].hex()
                    raise ValueError(f"{name} is not UTF-8 text (line {line_no}: byte 0x{bad} does not decode); "
                                     f"convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
                if line_no == 1:
                    text = text.lstrip("\ufeff")
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}: {where} is not valid JSON ({exc.msg}, column {exc.colno}); each line "
                                     f"holds one object such as {{\"sent0\": ..., \"sent1\": ...}}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{name}: {where} holds a JSON {type(obj).__name__}, not an object with the keys "
                                     f"sent0, sent1 (and hard_neg)")
                keys = tuple(obj)
                _check_columns(name, keys, where)
                cols = tuple(c for c in COLUMNS if c in obj)
                if first is None:
                    first = cols
                elif len(cols) != len(first):
                    raise _mixed(name, where, len(cols), len(first))
                for col in cols:
                    value = obj[col]
                    if not isinstance(value, str):
                        raise ValueError(f"{name}: {where}: {col} must be a string, got {json.dumps(value)[:40]}")
                    if not value.strip():
                        raise _empty_cell(name, where, col)
                count += 1
                yield tuple(obj[c] for c in cols)
    except OSError as exc:
        raise ValueError(f"{name} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if size == 0:
        raise ValueError(f"{name} is empty; it needs one JSON object a line with the keys sent0, sent1 (and hard_neg)")
    if count == 0:
        raise ValueError(f"{name} holds only blank lines; it needs one JSON object a line with the keys sent0, sent1 "
                         f"(and hard_neg)")


def _iter_rows(path: Union[str, os.PathLike], fmt: str) -> Iterator[Tuple[str, ...]]:
    p = _check_file(path, fmt)
    return _csv_rows(p, repr(str(path))) if fmt == "csv" else _jsonl_rows(p, repr(str(path)))


def read_sentence_rows(path: Union[str, os.PathLike]) -> Tuple[Tuple[str, ...], List[Tuple[str, ...]]]:
    """Read a ``.csv`` or ``.jsonl`` training file: returns ``(columns, rows)``, ``columns`` either
    ``("sent0", "sent1")`` or ``("sent0", "sent1", "hard_neg")`` and each row a tuple of that many non-empty strings
    in that order (whatever the file's column order). Raises ``ValueError`` with one sentence naming the file, the
    line and the problem (see :func:`inspect_train_file`). This is the one parser the checks and the trainer share,
    so what was checked is what is trained on."""
    fmt = file_format(path)
    if fmt == "text":
        raise ValueError(f"{str(path)!r}: read_sentence_rows reads .csv and .jsonl files; a text file is read by "
                         f"load_train_dataset")
    rows = list(_iter_rows(path, fmt))
    return COLUMNS[:len(rows[0])], rows


def inspect_train_file(path: Union[str, os.PathLike]) -> TrainFileStats:
    """Check a training file of any of the three formats (module docstring) before training; count its examples.

    Raises ``ValueError`` with one sentence that starts with the path and says what to do: every problem of
    :func:`inspect_text_file`, and for CSV / JSONL files a missing, unknown or repeated column, an empty cell (or
    a non-string JSON value), a header without rows, rows of 2 and 3 sentences mixed, invalid CSV or JSON, each
    with its line number.
    """
    fmt = file_format(path)
    if Path(path).suffix.lower() == ".tsv":
        # read as text, each line would be one "sentence" holding all the columns: refuse instead
        raise ValueError(f"{str(path)!r} is tab-separated, which is not read; save it as .csv with a header "
                         f"sent0,sent1 (or sent0,sent1,hard_neg)")
    if fmt == "text":
        stats = inspect_text_file(path)
        return TrainFileStats("text", stats.sentences, 1)
    count, columns = 0, 0
    for row in _iter_rows(path, fmt):
        count += 1
        columns = len(row)
    return TrainFileStats(fmt, count, columns)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash that changes whenever ``tokenizer`` would tokenize differently (its full serialized pipeline
    for fast tokenizers, else its class, vocabulary and special tokens); used to key the tokenized-data cache."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    h.update(repr(getattr(tokenizer, "padding_side", "right")).encode())
    return h.hexdigest()[:16]


def load_train_dataset(train_file: str | os.PathLike, tokenizer: Any, max_seq_length: int, *,
                       cache_dir: Optional[str | os.PathLike] = None, num_proc: Optional[int] = None,
                       overwrite_cache: bool = False, show_progress: bool = True):
    """Read ``train_file`` and tokenize every sentence once; returns a ``datasets.Dataset`` with the tokenizer's
    columns (``input_ids``, ``attention_mask``, and ``token_type_ids`` where the tokenizer makes them).

    A text file (one sentence a line): each row a list of ints of length ``<= max_seq_length``; empty lines are kept
    (they become ``[CLS] [SEP]``), as in SimCSE. A ``.csv`` / ``.jsonl`` file (:func:`read_sentence_rows`): each row
    a list of 2 or 3 such lists, the tokenized ``sent0``, ``sent1`` (and ``hard_neg``), as SimCSE's
    ``prepare_features`` stores them. ``cache_dir`` holds the ``datasets`` cache (None: ``datasets``' default); the
    tokenized data is cached there under a name made of the file (path, size, modification time), the tokenizer
    and ``max_seq_length``, so it is reused exactly when the result would be the same; ``overwrite_cache``
    re-tokenizes. ``num_proc`` processes tokenize in parallel. Raises ``FileNotFoundError`` naming ``train_file``
    when it does not exist, ``ValueError`` for a malformed CSV / JSONL file.
    """
    import datasets

    path = Path(train_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"train_file {str(path)!r} does not exist ({_FORMAT_HINT[file_format(path)]} "
                                f"expected)")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length must be an int >= 2, got {max_seq_length!r}")
    bars_were_on = not datasets.are_progress_bars_disabled()
    if not show_progress:
        datasets.disable_progress_bars()
    try:
        if file_format(path) != "text":
            return _load_sentence_rows(path, tokenizer, max_seq_length, cache_dir=cache_dir, num_proc=num_proc,
                                       overwrite_cache=overwrite_cache)
        raw = datasets.load_dataset("text", data_files={"train": str(path.resolve())}, split="train",
                                    cache_dir=None if cache_dir is None else str(cache_dir))
        column = raw.column_names[0]

        def tokenize(examples: Dict[str, List[Optional[str]]]) -> Dict[str, list]:
            # SimCSE replaces a missing line by a space; the text builder yields "" for an empty line.
            sentences = [s if s is not None else " " for s in examples[column]]
            return tokenizer(sentences, max_length=max_seq_length, truncation=True, padding=False)

        # The fingerprint names the cached Arrow file: the file's identity and content stamp (path, size, mtime),
        # the tokenizer and the length, so the cache is reused exactly when the result would be the same (as for
        # CSV / JSONL below; the raw dataset's own fingerprint is a private attribute of datasets).
        st = path.stat()
        fingerprint = hashlib.sha256(
            f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tokenizer_fingerprint(tokenizer)}|{max_seq_length}|"
            f"iscse-v2".encode()).hexdigest()[:16]
        return raw.map(tokenize, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=raw.column_names,
                       load_from_cache_file=not overwrite_cache, new_fingerprint=fingerprint,
                       desc="Tokenizing")
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_sentence_rows(path: Path, tokenizer: Any, max_seq_length: int, *, cache_dir, num_proc, overwrite_cache):
    """:func:`load_train_dataset` for ``.csv`` / ``.jsonl`` files: parse with :func:`read_sentence_rows`, tokenize
    each column separately (no padding; truncation at ``max_seq_length``) and store each example's sentences
    together."""
    import datasets

    columns, rows = read_sentence_rows(path)
    raw = datasets.Dataset.from_dict({c: [r[j] for r in rows] for j, c in enumerate(columns)})
    del rows

    def tokenize(examples: Dict[str, List[str]]) -> Dict[str, list]:
        per_column = [tokenizer(examples[c], max_length=max_seq_length, truncation=True, padding=False)
                      for c in columns]
        n = len(examples[columns[0]])
        return {key: [[enc[key][i] for enc in per_column] for i in range(n)] for key in per_column[0].keys()}

    # The raw rows live in memory (parsing is the check, and it is fast), so datasets cannot derive a cache name
    # from them; the name is made here from what decides the result: the file's identity and content stamp, the
    # tokenizer and the length.
    st = path.stat()
    fingerprint = hashlib.sha256(
        f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tokenizer_fingerprint(tokenizer)}|{max_seq_length}|"
        f"iscse-rows-v1".encode()).hexdigest()[:16]
    base = Path(cache_dir).expanduser() if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    folder = base / "iscse-sentence-rows"
    folder.mkdir(parents=True, exist_ok=True)
    return raw.map(tokenize, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=raw.column_names,
                   load_from_cache_file=not overwrite_cache, new_fingerprint=fingerprint,
                   cache_file_name=str(folder / f"{fingerprint}.arrow"), desc="Tokenizing")


class ShuffledBatches:
    """Which dataset rows each training step reads, per epoch and per rank (see the module docstring).

    Args:
        num_examples: rows in the dataset (``N >= 1``).
        per_device_batch_size: rows per step on each rank (``B``).
        seed: epoch ``e`` is shuffled by ``torch.randperm(N, generator=manual_seed(seed + e))``.
        world_size, rank: the data-parallel layout (1, 0 for a single process).

    An epoch has ``ceil(N / (B * world_size))`` batches; the last one holds the remaining rows (kept, as the
    Hugging Face trainer SimCSE uses keeps it). Under data parallelism it is padded with rows from the start of the
    epoch's permutation to a multiple of ``world_size`` (as ``DistributedSampler`` pads), so every rank holds the
    same number of rows for the all-gather.
    """

    def __init__(self, num_examples: int, per_device_batch_size: int, seed: int, world_size: int = 1,
                 rank: int = 0) -> None:
        for name, value, low in (("num_examples", num_examples, 1), ("per_device_batch_size", per_device_batch_size, 1),
                                 ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.num_examples, self.per_device_batch_size = num_examples, per_device_batch_size
        self.seed, self.world_size, self.rank = int(seed), world_size, rank
        self.global_batch_size = per_device_batch_size * world_size
        self._order_epoch: Optional[int] = None
        self._order: Optional[torch.Tensor] = None

    @property
    def batches_per_epoch(self) -> int:
        """Steps in one epoch: ``ceil(N / global_batch_size)``."""
        return math.ceil(self.num_examples / self.global_batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The int64 ``(N,)`` permutation of epoch ``epoch`` (cached for the current epoch)."""
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed + int(epoch))
            self._order = torch.randperm(self.num_examples, generator=generator)
            self._order_epoch = epoch
        return self._order

    def global_indices(self, epoch: int, batch: int) -> List[int]:
        """Row indices of global batch ``batch`` of ``epoch``, every rank's rows in rank order (padded for
        ``world_size > 1`` as described in the class docstring)."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} out of range for {self.batches_per_epoch} batches per epoch")
        order = self.epoch_order(epoch)
        start = batch * self.global_batch_size
        rows = order[start:start + self.global_batch_size].tolist()
        short = (-len(rows)) % self.world_size
        if short:
            rows += order[:short].tolist()
        return rows

    def local_indices(self, epoch: int, batch: int) -> List[int]:
        """Row indices this rank reads at global batch ``batch`` of ``epoch``."""
        rows = self.global_indices(epoch, batch)
        per_rank = len(rows) // self.world_size
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]


class EpochBatchSampler(torch.utils.data.Sampler):
    """A batch sampler over :class:`ShuffledBatches`: iterating yields this rank's row indices of every batch of
    the current epoch, in order; :meth:`set_epoch` picks the epoch (``transformers.Trainer`` calls it at the start
    of each one). ``len()`` is the number of batches per epoch.

    Args are those of :class:`ShuffledBatches`.
    """

    def __init__(self, num_examples: int, per_device_batch_size: int, seed: int, world_size: int = 1,
                 rank: int = 0) -> None:
        self.batches = ShuffledBatches(num_examples, per_device_batch_size, seed, world_size, rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Iterate over epoch ``epoch`` from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches.batches_per_epoch

    def __iter__(self) -> Iterator[List[int]]:
        for batch in range(self.batches.batches_per_epoch):
            yield self.batches.local_indices(self.epoch, batch)


def collate_two_views(features: Union[Mapping[str, Sequence[Sequence[int]]], Sequence[Mapping[str, Sequence[int]]]],
                      pad_token_id: int, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad a batch of tokenized sentences and repeat each one, for two dropout views in one forward pass.

    ``features`` is a column dict as ``Dataset.__getitem__`` returns for a list of rows, or a list of row dicts as
    a ``DataLoader`` collects them (``input_ids`` and ``attention_mask`` required, ``token_type_ids`` optional),
    ``B`` rows each. Returns int64 tensors of shape
    ``(2B, L)``, ``L`` the longest row: row ``2i`` and ``2i + 1`` are both sentence ``i``; ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` with 0, on ``padding_side``.
    """
    if not isinstance(features, Mapping):
        rows = list(features)
        if not rows:
            raise ValueError("features must hold at least one row")
        features = {key: [row[key] for row in rows] for key in rows[0]}
    if "input_ids" not in features or "attention_mask" not in features:
        raise ValueError("features must hold 'input_ids' and 'attention_mask' columns")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id: the tokenizer has no padding token; set tokenizer.pad_token first")
    ids = features["input_ids"]
    n = len(ids)
    if n == 0:
        raise ValueError("features must hold at least one row")
    length = max(len(row) for row in ids)
    out: Dict[str, torch.Tensor] = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key not in features:
            continue
        fill = pad_token_id if key == "input_ids" else 0
        tensor = torch.full((n, length), fill, dtype=torch.long)
        for i, row in enumerate(features[key]):
            if len(row):
                if padding_side == "right":
                    tensor[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
                else:
                    tensor[i, length - len(row):] = torch.as_tensor(row, dtype=torch.long)
        out[key] = tensor.repeat_interleave(2, dim=0)  # (2B, L): rows 2i and 2i + 1 are sentence i
    return out


def collate_sentences(features: Union[Mapping[str, Sequence[Any]], Sequence[Mapping[str, Any]]], pad_token_id: int,
                      padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad a batch of any of the three formats into one ``(n B, L)`` batch for a single encoder forward.

    ``features`` as for :func:`collate_two_views`. Rows of a text dataset (a list of ints each) are repeated, as
    :func:`collate_two_views` does (``n = 2``: the two dropout views). Rows of a CSV / JSONL dataset (a list of
    ``n`` = 2 or 3 token lists each: ``sent0``, ``sent1`` and ``hard_neg``) are spread out: sentence ``j`` of
    example ``i`` at row ``n i + j``, so ``z.view(B, n, H)[:, j]`` is column ``j``. Returns int64 tensors padded as
    in :func:`collate_two_views`.
    """
    if not isinstance(features, Mapping):
        rows = list(features)
        if not rows:
            raise ValueError("features must hold at least one row")
        features = {key: [row[key] for row in rows] for key in rows[0]}
    ids = features.get("input_ids")
    if not ids or not len(ids[0]) or not isinstance(ids[0][0], (list, tuple)):
        return collate_two_views(features, pad_token_id, padding_side)
    n = len(ids[0])
    if any(len(row) != n for row in ids):
        raise ValueError(f"every example must hold the same number of sentences, got {sorted({len(r) for r in ids})}")
    flat = {key: [sentence for row in column for sentence in row] for key, column in features.items()}
    batch = collate_two_views(flat, pad_token_id, padding_side)  # (2 n B, L): every sentence twice
    return {key: t[0::2] for key, t in batch.items()}  # (n B, L): each sentence once, example-major
