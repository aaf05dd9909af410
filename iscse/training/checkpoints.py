"""Checkpoints of the trainer: what is in one, how it is checked before a resume, and how it is published.

A checkpoint is ``output_dir/checkpoint-N`` in the Hugging Face trainer's layout: the model (a
``SentenceEncoder.save_pretrained`` folder: loadable by ``AutoModel``, ``SentenceTransformer`` and
``SentenceEncoder``), ``training_args.bin``, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16),
``rng_state.pth`` (``rng_state_<rank>.pth`` under DDP) and ``trainer_state.json``, all written by
``transformers.Trainer``; and this trainer's own ``iscse_loss.pt`` (the IS-CSE memory buffer and its step),
``train_config.json`` (the run's settings) and, written last, ``iscse_state.json``: the data and process layout the
run needs to continue, and a manifest of every file with its size.

Atomic: a checkpoint is written into a hidden staging folder beside it, flushed to disk, and renamed into place,
so a crash while saving leaves the previous checkpoint as it was and never a half-written ``checkpoint-N``.
Checked: before a resume every file of the manifest must be there with its recorded size, each ``torch.save``
archive must pass its CRC check and each JSON/safetensors header must parse, so that a truncated or corrupt file
is named before anything is loaded (and a resume from an output folder falls back to the newest intact one).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._io import apply_umask, first_line, replace_dir, write_json

__all__ = ["MANIFEST", "CHECKPOINT_RE", "checkpoint_problem", "list_checkpoints", "find_checkpoint",
           "write_manifest", "fsync_tree", "fsync_dir", "publish"]

logger = logging.getLogger("iscse.train")

MANIFEST = "iscse_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(folder: Path) -> List[Tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder directly under ``folder``, newest first."""
    found = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    for child in children:
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found, reverse=True)


def _file_problem(path: Path, size: int) -> Optional[str]:
    name = path.name
    if not path.is_file():
        return f"{name} is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{name} is {'truncated' if actual < size else 'longer than written'} ({actual} of {size} bytes)"
    try:
        if name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith((".pt", ".pth", ".bin")) and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()  # reads every member and checks its CRC
            if bad is not None:
                return f"{name} is corrupt (member {bad} fails its CRC check)"
        elif name.endswith((".pt", ".pth", ".bin")):
            return f"{name} is corrupt (not a torch.save archive)"
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the file is unusable
        return f"{name} is corrupt ({first_line(exc)})"
    return None


def checkpoint_problem(folder: Path) -> Optional[str]:
    """None when ``folder`` is a complete, intact checkpoint of this trainer; else one phrase saying what is
    wrong with which file (e.g. ``"optimizer.pt is truncated (1024 of 8192 bytes)"``)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if (folder / "trainer_state.json").is_file():
            return f"{MANIFEST} is missing (not a checkpoint of iscse's trainer, or its save did not finish)"
        return f"it holds no {MANIFEST} (not a checkpoint of iscse's trainer)"
    try:
        state = json.loads(manifest.read_text(encoding="utf-8"))
        files: Dict[str, int] = dict(state["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is corrupt ({exc})"
    for rel, size in sorted(files.items()):
        problem = _file_problem(folder / rel, int(size))
        if problem is not None:
            return problem if "/" not in rel else problem.replace(Path(rel).name, rel, 1)
    return None


def find_checkpoint(path: str | os.PathLike, flag: str = "--resume_from") -> Path:
    """The checkpoint ``path`` names, checked: ``path`` itself when it is a checkpoint folder (an error if it is
    not intact), else the newest intact ``checkpoint-N`` in it (a warning for each newer one skipped). Raises
    ``ConfigError`` (one sentence naming ``flag``, the folder and the bad file)."""
    from .errors import ConfigError

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{flag} {str(path)!r} does not exist")
    if not p.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file; pass a checkpoint-N folder or the output folder that "
                          "holds them")
    if CHECKPOINT_RE.match(p.name) or (p / MANIFEST).is_file() or (p / "trainer_state.json").is_file():
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        others = [c.name for _, c in list_checkpoints(p.parent) if c != p and checkpoint_problem(c) is None]
        hint = (f"resume from another checkpoint ({', '.join(others)}) or pass the output folder {str(p.parent)!r} "
                "to take the newest intact one") if others else "no other intact checkpoint is there"
        raise ConfigError(f"{flag} {str(path)!r} cannot be resumed: {problem}; {hint}")
    candidates = list_checkpoints(p)
    if not candidates:
        raise ConfigError(f"{flag} {str(path)!r} holds no checkpoint (checkpoint-N folders, written every "
                          "--save_steps)")
    skipped = []
    for _, ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for name, why in skipped:
                logger.warning("%s is unusable (%s); resuming from %s instead", name, why, ckpt.name)
            return ckpt
        skipped.append((ckpt.name, problem))
    raise ConfigError(f"{flag} {str(path)!r}: no intact checkpoint ({'; '.join(f'{n}: {w}' for n, w in skipped)})")


def write_manifest(folder: Path, extra: Dict[str, Any]) -> None:
    """Write ``iscse_state.json`` into ``folder``: ``extra`` plus the size of every other file under it. Written
    last: a checkpoint without it is incomplete."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            full = Path(dirpath) / name
            rel = full.relative_to(folder).as_posix()
            if rel != MANIFEST:
                files[rel] = full.stat().st_size
    doc = dict(extra, files=dict(sorted(files.items())))
    write_json(folder / MANIFEST, doc, fsync=True)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk (where the file system allows it)."""
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


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk (before the rename that publishes it)."""
    for dirpath, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish(staged: Path, final: Path) -> None:
    """Make the complete folder ``staged`` appear at ``final`` in one rename (an existing ``final``, e.g. the same
    step saved again after a resume, is swapped out atomically where Linux allows it, then deleted)."""
    apply_umask(staged)  # torch.save and friends write some files 0600
    fsync_tree(staged)
    replace_dir(staged, final)
    fsync_dir(final.parent)


def remove_stale_staging(output_dir: Path) -> None:
    """Delete staging folders a crashed save left behind (never published, so never used)."""
    for stale in output_dir.glob(".staging-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
