"""Fetch the training corpus and the evaluation data from where SimCSE's download scripts get them: the Hugging Face
Hub dataset repository ``princeton-nlp/datasets-for-simcse``, through ``huggingface_hub`` (resumable downloads,
its caching, ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / proxies and tokens honoured).

- wiki1m (SimCSE's ``data/download_wiki.sh``): ``wiki1m_for_simcse.txt``, one sentence a line, about 120 MB.
- the NLI training file (SimCSE's ``data/download_nli.sh``): ``nli_for_simcse.csv``, SNLI + MNLI as
  ``sent0,sent1,hard_neg`` triples (premise, entailment, contradiction), about 275k rows; the supervised runs'
  ``--train_file``.
- SentEval's data (SimCSE's ``SentEval/data/downstream/download_dataset.sh``): ``senteval.tar``, SentEval's
  ``data/downstream`` folder (``STS/``, ``SICK/`` and the transfer tasks), about 1 GB unpacked.

Files land under a cache folder (``--cache_dir``, else ``$ISCSE_CACHE``, else ``~/.cache/iscse``) and are fetched
once; ``huggingface_hub`` writes each file completely before it appears under its name, and the SentEval folder is
unpacked into a temporary folder and renamed into place, so an interrupted download never looks finished.

Command line (the equivalent of SimCSE's three scripts)::

    python -m iscse.download                 # wiki1m and SentEval, into ~/.cache/iscse
    python -m iscse.download nli             # nli_for_simcse.csv (or --nli)
    python -m iscse.download --wiki1m --dest data/
    python -m iscse.download --senteval --dest SentEval/data

Failures (no network, a proxy, a moved file) raise :class:`DownloadError` with a sentence saying which trainer
argument to pass instead (``--train_file``, ``--data_dir``).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .._io import first_line

__all__ = ["SIMCSE_DATA_REPO", "WIKI1M_FILE", "NLI_FILE", "SENTEVAL_ARCHIVE", "WIKI1M_URL", "NLI_URL", "SENTEVAL_URL",
           "DownloadError", "default_cache_dir", "fetch", "ensure_wiki1m", "ensure_nli", "ensure_senteval",
           "find_downstream_dir", "main"]

#: The Hub dataset repository SimCSE's scripts download from.
SIMCSE_DATA_REPO = "princeton-nlp/datasets-for-simcse"
WIKI1M_FILE = "wiki1m_for_simcse.txt"
NLI_FILE = "nli_for_simcse.csv"
SENTEVAL_ARCHIVE = "senteval.tar"
#: Where the two files are (for curl / wget: scripts/download_data.sh).
WIKI1M_URL = f"https://huggingface.co/datasets/{SIMCSE_DATA_REPO}/resolve/main/{WIKI1M_FILE}"
SENTEVAL_URL = f"https://huggingface.co/datasets/{SIMCSE_DATA_REPO}/resolve/main/{SENTEVAL_ARCHIVE}"
NLI_URL = f"https://huggingface.co/datasets/{SIMCSE_DATA_REPO}/resolve/main/{NLI_FILE}"

SENTEVAL_SUBDIR = Path("SentEval") / "data" / "downstream"

logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says what failed and which argument to pass instead."""


def default_cache_dir() -> Path:
    """``$ISCSE_CACHE`` if set, else ``~/.cache/iscse``."""
    return Path(os.environ.get("ISCSE_CACHE") or Path.home() / ".cache" / "iscse").expanduser()


def fetch(filename: str, dest_dir: str | os.PathLike, *, repo_id: str = SIMCSE_DATA_REPO,
          show_progress: bool = True) -> Path:
    """Download ``filename`` of the Hub dataset ``repo_id`` into the folder ``dest_dir`` with
    ``huggingface_hub.hf_hub_download``; returns its path (``dest_dir/filename``). A file already there (and
    unchanged on the Hub) is not fetched again. Raises :class:`DownloadError` on any failure (offline included)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    dest = Path(dest_dir).expanduser()
    bars_were_on = not are_progress_bars_disabled()
    if not show_progress:
        disable_progress_bars()
    # huggingface_hub logs every retry of a failing request as a warning; a failure is reported once, below.
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    logger.info("fetching %s from the Hub dataset %s into %s", filename, repo_id, dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=dest))
    except Exception as exc:  # noqa: BLE001 - network, HTTP, offline mode, disk: all mean "not fetched"
        raise DownloadError(f"could not download {filename} from the Hub dataset {repo_id} ({first_line(exc)})") \
            from None
    finally:
        hub_logger.setLevel(hub_level)
        if bars_were_on and not show_progress:
            enable_progress_bars()


def _ensure(name: str, cache_dir, show_progress: bool, hint: str) -> Path:
    """``name`` in ``cache_dir`` (default :func:`default_cache_dir`), downloaded the first time; a failure raises
    :class:`DownloadError` ending with ``hint`` (what to pass as ``--train_file`` instead)."""
    base = Path(cache_dir or default_cache_dir()).expanduser()
    path = base / name
    if path.is_file():
        return path
    try:
        return fetch(name, base, show_progress=show_progress)
    except DownloadError as exc:
        raise DownloadError(f"{exc}: {hint}") from None


def ensure_wiki1m(cache_dir: Optional[str | os.PathLike] = None, *, show_progress: bool = True) -> Path:
    """The path of ``wiki1m_for_simcse.txt`` in ``cache_dir`` (default :func:`default_cache_dir`), downloaded the
    first time. Raises :class:`DownloadError` naming ``--train_file``."""
    return _ensure(WIKI1M_FILE, cache_dir, show_progress,
                   f"the training corpus could not be fetched; pass --train_file with a local text file (one "
                   f"sentence a line), e.g. wiki1m fetched elsewhere with `python -m iscse.download --wiki1m` or "
                   f"`wget {WIKI1M_URL}`")


def ensure_nli(cache_dir: Optional[str | os.PathLike] = None, *, show_progress: bool = True) -> Path:
    """The path of ``nli_for_simcse.csv`` (SimCSE's supervised training file) in ``cache_dir`` (default
    :func:`default_cache_dir`), downloaded the first time. Raises :class:`DownloadError` naming ``--train_file``."""
    return _ensure(NLI_FILE, cache_dir, show_progress,
                   f"the NLI training file could not be fetched; pass --train_file with a local CSV file "
                   f"(sent0,sent1,hard_neg), e.g. fetched elsewhere with `python -m iscse.download nli` or "
                   f"`wget {NLI_URL}`")


def find_downstream_dir(root: str | os.PathLike, max_depth: int = 4) -> Optional[Path]:
    """The first folder at most ``max_depth`` levels under ``root`` (``root`` included) that holds both ``STS/`` and
    ``SICK/`` (SentEval's ``data/downstream``), or None."""
    root = Path(root)
    frontier = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for folder in frontier:
            if (folder / "STS").is_dir() and (folder / "SICK").is_dir():
                return folder
            try:
                nxt.extend(sorted(p for p in folder.iterdir() if p.is_dir()))
            except OSError:
                continue
        frontier = nxt
    return None


def ensure_senteval(cache_dir: Optional[str | os.PathLike] = None, *, show_progress: bool = True) -> Path:
    """SentEval's ``data/downstream`` folder under ``cache_dir`` (default :func:`default_cache_dir`), downloaded
    and unpacked the first time; returns the folder that holds ``STS/`` and ``SICK/``. Raises
    :class:`DownloadError` naming ``--data_dir``."""
    base = Path(cache_dir or default_cache_dir()).expanduser()
    target = base / SENTEVAL_SUBDIR
    if (target / "STS").is_dir() and (target / "SICK").is_dir():
        return target
    hint = ("pass --data_dir with SentEval's data/downstream folder (the one holding STS/ and SICK/), or set "
            "ISCSE_DATA_DIR; fetch it elsewhere with `python -m iscse.download --senteval` or SimCSE's "
            "SentEval/data/downstream/download_dataset.sh")
    try:
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".senteval-", dir=base))
    except OSError as exc:
        raise DownloadError(f"cannot write into {str(base)!r} ({exc.strerror}); {hint}") from None
    try:
        try:
            archive = fetch(SENTEVAL_ARCHIVE, work, show_progress=show_progress)
        except DownloadError as exc:
            raise DownloadError(f"{exc}: the STS evaluation data could not be fetched; {hint}") from None
        unpacked = work / "unpacked"
        unpacked.mkdir()
        try:
            with tarfile.open(archive) as tar:
                _safe_extract(tar, unpacked)
        except (tarfile.TarError, OSError) as exc:
            raise DownloadError(f"could not unpack {SENTEVAL_ARCHIVE}: {exc}; {hint}") from None
        found = find_downstream_dir(unpacked)
        if found is None:
            raise DownloadError(f"{SENTEVAL_ARCHIVE} unpacked without an STS/ and SICK/ folder; {hint}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a partial earlier copy (it lacks STS/ or SICK/): set it aside, never merge into it
            os.rename(target, target.with_name(f"{target.name}.incomplete-{os.getpid()}"))
        os.rename(found, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack regular files and folders only, each inside ``dest`` (no absolute paths, ``..``, links or devices)."""
    try:
        tar.extractall(dest, filter="data")  # Python >= 3.9.17 / 3.10.12 / 3.11.4
        return
    except TypeError:
        pass
    root = dest.resolve()
    members = []
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or (target != root and root not in target.parents):
            raise tarfile.TarError(f"refusing to unpack {member.name!r} (outside the folder, or not a file)")
        members.append(member)
    tar.extractall(dest, members=members)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m iscse.download``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m iscse.download",
        description="Download wiki1m (SimCSE's unsupervised training corpus), nli_for_simcse.csv (its supervised "
                    "training file) and SentEval's STS data, as SimCSE's scripts do. Without a name or flag: wiki1m "
                    "and SentEval.")
    parser.add_argument("what", nargs="*", metavar="NAME",
                        help="what to fetch: wiki1m, nli and/or senteval (the same as the flags below)")
    parser.add_argument("--wiki1m", action="store_true", help=f"fetch {WIKI1M_FILE}")
    parser.add_argument("--nli", action="store_true", help=f"fetch {NLI_FILE} (sent0,sent1,hard_neg)")
    parser.add_argument("--senteval", action="store_true", help="fetch and unpack SentEval's data/downstream")
    parser.add_argument("--dest", default=None,
                        help="folder to put them in (default: $ISCSE_CACHE or ~/.cache/iscse, where "
                             "python -m iscse.train looks when --train_file / --data_dir are left out)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.what if name not in ("wiki1m", "nli", "senteval")]
    if unknown:
        parser.error(f"unknown name {unknown[0]!r}: choose from wiki1m, nli, senteval")
    wanted = set(args.what)
    wanted.update(name for name in ("wiki1m", "nli", "senteval") if getattr(args, name))
    if not wanted:
        wanted = {"wiki1m", "senteval"}
    try:
        if "wiki1m" in wanted:
            print(f"wiki1m: {ensure_wiki1m(args.dest)}")
        if "nli" in wanted:
            print(f"NLI (pass as --train_file): {ensure_nli(args.dest)}")
        if "senteval" in wanted:
            print(f"SentEval data (pass as --data_dir): {ensure_senteval(args.dest)}")
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
