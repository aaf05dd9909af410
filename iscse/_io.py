"""Writing files the way every part of the package writes them: atomically, with the user's umask, and JSON as
``indent=2`` plus a final newline; and the one-line form of an exception for error messages.

Used by training (checkpoints, ``train_config.json``, results), evaluation (``--output_json``) and the encoder's
``save_pretrained``. Standard library only, so any layer may import it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["current_umask", "apply_umask", "write_json", "write_text_atomic", "write_json_atomic", "replace_dir",
           "first_line"]


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | os.PathLike) -> None:
    """Give ``folder``, everything under it, the permissions a new file or folder gets from the user's umask
    (libraries that write through temporary files, ``mkdtemp`` and ``mkstemp`` leave some at 0600 / 0700)."""
    mask = current_umask()
    for dirpath, _, names in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _json_text(obj: Any, default: Optional[Callable[[Any], Any]] = None) -> str:
    return json.dumps(obj, indent=2, default=default) + "\n"


def write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False) -> None:
    """Write ``obj`` as JSON (``indent=2``, final newline) straight into ``path``: for files inside a folder that is
    itself published atomically (a staged checkpoint). ``fsync`` flushes the file to disk before returning."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_json_text(obj))
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one rename, so a reader or a crash sees the old file or the new
    one, never a part. The file gets the user's umask (not ``mkstemp``'s 0600) and is flushed to disk before the
    rename; the parent folder is created if missing; the temporary file is removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, *, default: Optional[Callable[[Any], Any]] = None) -> None:
    """Write ``obj`` as JSON (``indent=2``, final newline) to ``path`` with :func:`write_text_atomic`. ``default``
    is ``json.dumps``'s (e.g. ``str`` for values JSON has no type for). The text is built before the file is
    touched, so an object that cannot be serialised leaves ``path`` as it was."""
    write_text_atomic(path, _json_text(obj, default))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Make the folder ``new`` appear at ``target``, atomically where the platform allows (Linux
    ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, so a crash between them leaves the previous folder
    complete under ``.<name>.old-*`` beside the target). The previous ``target`` is deleted."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # now holds the previous folder
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(backup)
    os.rename(target, backup)
    os.rename(new, target)
    shutil.rmtree(backup)


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``str(exc)``, white space folded, or the exception's type name when it has no
    message: what an error message of ours quotes of another library's exception, kept to one line."""
    for line in str(exc).splitlines():
        if line.strip():
            return " ".join(line.split())
    return type(exc).__name__
