"""Fetch the training corpus and the evaluation data from where SimCSE's download scripts get them.

- wiki1m (SimCSE's ``data/download_wiki.sh``): ``WIKI1M_URL``, one sentence a line, about 120 MB.
- SentEval's data (SimCSE's ``SentEval/data/downstream/download_dataset.sh``): ``SENTEVAL_URL``, a tar holding
  SentEval's ``data/downstream`` folder (``STS/``, ``SICK/`` and the transfer tasks), about 1 GB unpacked.

Files land under a cache folder (``--cache_dir``, else ``$ISCSE_CACHE``, else ``~/.cache/iscse``) and are fetched
once: each download goes to a temporary file beside its target and is renamed into place only when complete, so an
interrupted download never leaves a truncated file that looks finished.

Command line (the equivalent of SimCSE's two scripts)::

    python -m iscse.download                 # both, into ~/.cache/iscse
    python -m iscse.download --wiki1m --dest data/
    python -m iscse.download --senteval --dest SentEval/data

Failures (no network, a proxy, a moved file) raise :class:`DownloadError` with a sentence saying which trainer
argument to pass instead (``--train_file``, ``--data_dir``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["WIKI1M_URL", "SENTEVAL_URL", "DownloadError", "default_cache_dir", "fetch", "ensure_wiki1m",
           "ensure_senteval", "find_downstream_dir", "main"]

#: SimCSE's unsupervised training corpus (data/download_wiki.sh).
WIKI1M_URL = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/wiki1m_for_simcse.txt"
#: SentEval's data/downstream folder as a tar (SentEval/data/downstream/download_dataset.sh in SimCSE).
SENTEVAL_URL = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/senteval.tar"

WIKI1M_FILE = "wiki1m_for_simcse.txt"
SENTEVAL_SUBDIR = Path("SentEval") / "data" / "downstream"
_TIMEOUT_S = 60


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says what failed and which argument to pass instead."""


def default_cache_dir() -> Path:
    """``$ISCSE_CACHE`` if set, else ``~/.cache/iscse``."""
    return Path(os.environ.get("ISCSE_CACHE") or Path.home() / ".cache" / "iscse").expanduser()


def fetch(url: str, dest: str | os.PathLike, *, desc: Optional[str] = None, show_progress: bool = True,
          timeout: float = _TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` (a file path): streamed into a temporary file in ``dest``'s folder, flushed to
    disk, then renamed onto ``dest``. Returns ``dest``. Raises :class:`DownloadError` on any network or HTTP error
    (the partial file is removed)."""
    from tqdm.auto import tqdm

    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "iscse-download"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=desc or dest.name,
                              disable=not show_progress) as bar:
                        while True:
                            chunk = response.read(1 << 20)
                            if not chunk:
                                break
                            out.write(chunk)
                            bar.update(len(chunk))
                    if total is not None and out.tell() != total:
                        raise DownloadError(f"download of {url} stopped after {out.tell()} of {total} bytes")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DownloadError(f"could not download {url}: {exc}") from exc
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def ensure_wiki1m(cache_dir: Optional[str | os.PathLike] = None, *, url: Optional[str] = None,
                  show_progress: bool = True) -> Path:
    """The path of ``wiki1m_for_simcse.txt`` in ``cache_dir`` (default :func:`default_cache_dir`), downloaded from
    ``url`` (default :data:`WIKI1M_URL`) the first time. Raises :class:`DownloadError` naming ``--train_file``."""
    path = Path(cache_dir or default_cache_dir()).expanduser() / WIKI1M_FILE
    if path.is_file():
        return path
    url = url or WIKI1M_URL
    try:
        return fetch(url, path, desc="wiki1m", show_progress=show_progress)
    except DownloadError as exc:
        raise DownloadError(
            f"{exc}. The training corpus could not be fetched: pass --train_file with a local text file (one "
            f"sentence a line), e.g. wiki1m fetched elsewhere with `python -m iscse.download --wiki1m` or "
            f"`wget {WIKI1M_URL}`") from exc


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


def ensure_senteval(cache_dir: Optional[str | os.PathLike] = None, *, url: Optional[str] = None,
                    show_progress: bool = True) -> Path:
    """SentEval's ``data/downstream`` folder under ``cache_dir`` (default :func:`default_cache_dir`), downloaded
    and unpacked from ``url`` (default :data:`SENTEVAL_URL`) the first time; returns the folder that holds ``STS/``
    and ``SICK/``. Raises :class:`DownloadError` naming ``--data_dir``."""
    base = Path(cache_dir or default_cache_dir()).expanduser()
    target = base / SENTEVAL_SUBDIR
    if (target / "STS").is_dir() and (target / "SICK").is_dir():
        return target
    url = url or SENTEVAL_URL
    hint = ("pass --data_dir with SentEval's data/downstream folder (the one holding STS/ and SICK/), or set "
            "ISCSE_DATA_DIR; fetch it elsewhere with `python -m iscse.download --senteval` or SimCSE's "
            "SentEval/data/downstream/download_dataset.sh")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".senteval-", dir=base))
    try:
        try:
            archive = fetch(url, work / "senteval.tar", desc="SentEval data", show_progress=show_progress)
        except DownloadError as exc:
            raise DownloadError(f"{exc}. The STS evaluation data could not be fetched: {hint}") from exc
        unpacked = work / "unpacked"
        unpacked.mkdir()
        try:
            with tarfile.open(archive) as tar:
                _safe_extract(tar, unpacked)
        except (tarfile.TarError, OSError) as exc:
            raise DownloadError(f"could not unpack {url}: {exc}; {hint}") from exc
        found = find_downstream_dir(unpacked)
        if found is None:
            raise DownloadError(f"{url} unpacked without an STS/ and SICK/ folder; {hint}")
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
        description="Download wiki1m (SimCSE's training corpus) and SentEval's STS data, as SimCSE's scripts do.")
    parser.add_argument("--wiki1m", action="store_true", help=f"fetch {WIKI1M_FILE}")
    parser.add_argument("--senteval", action="store_true", help="fetch and unpack SentEval's data/downstream")
    parser.add_argument("--dest", default=None,
                        help="folder to put them in (default: $ISCSE_CACHE or ~/.cache/iscse, where "
                             "python -m iscse.train looks when --train_file / --data_dir are left out)")
    args = parser.parse_args(argv)
    both = not (args.wiki1m or args.senteval)
    try:
        if args.wiki1m or both:
            print(f"wiki1m: {ensure_wiki1m(args.dest)}")
        if args.senteval or both:
            print(f"SentEval data (pass as --data_dir): {ensure_senteval(args.dest)}")
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
