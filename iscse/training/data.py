"""Training data for unsupervised SimCSE / IS-CSE: one sentence a line, tokenized once, read in shuffled batches.

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
- :func:`inspect_text_file` checks a training file before anything else touches it (exists, is a file, is
  readable UTF-8 text, holds sentences) and counts its lines, so that a bad file is reported in one sentence.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

__all__ = ["TextFileStats", "inspect_text_file", "load_train_dataset", "tokenizer_fingerprint", "ShuffledBatches",
           "EpochBatchSampler", "collate_two_views"]

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
    """Read ``train_file`` (UTF-8 text, one sentence a line) and tokenize every line once; returns a
    ``datasets.Dataset`` with the tokenizer's columns (``input_ids``, ``attention_mask``, and ``token_type_ids``
    where the tokenizer makes them), each row a list of ints of length ``<= max_seq_length``.

    Empty lines are kept (they become ``[CLS] [SEP]``), as in SimCSE. ``cache_dir`` holds the ``datasets`` cache
    (None: ``datasets``' default); ``overwrite_cache`` re-tokenizes. ``num_proc`` processes tokenize in parallel.
    Raises ``FileNotFoundError`` naming ``train_file`` when it does not exist.
    """
    import datasets

    path = Path(train_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"train_file {str(path)!r} does not exist (one sentence a line expected)")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length must be an int >= 2, got {max_seq_length!r}")
    bars_were_on = not datasets.are_progress_bars_disabled()
    if not show_progress:
        datasets.disable_progress_bars()
    try:
        raw = datasets.load_dataset("text", data_files={"train": str(path.resolve())}, split="train",
                                    cache_dir=None if cache_dir is None else str(cache_dir))
        column = raw.column_names[0]

        def tokenize(examples: Dict[str, List[Optional[str]]]) -> Dict[str, list]:
            # SimCSE replaces a missing line by a space; the text builder yields "" for an empty line.
            sentences = [s if s is not None else " " for s in examples[column]]
            return tokenizer(sentences, max_length=max_seq_length, truncation=True, padding=False)

        # The fingerprint names the cached Arrow file: the raw data's own fingerprint (file path, size and mtime)
        # plus the tokenizer and length, so the cache is reused exactly when the result would be the same.
        fingerprint = hashlib.sha256(
            f"{raw._fingerprint}|{tokenizer_fingerprint(tokenizer)}|{max_seq_length}|iscse-v1".encode()
        ).hexdigest()[:16]
        return raw.map(tokenize, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=raw.column_names,
                       load_from_cache_file=not overwrite_cache, new_fingerprint=fingerprint,
                       desc="Tokenizing")
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


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
