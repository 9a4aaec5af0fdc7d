"""Files written whole or not at all, and files only their owner may read (keys, secrets,
PKCS#12 bundles, the delivery outbox)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "replace_atomically", "write_private"]


def replace_atomically(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` as ``path`` so that a reader, or the file after a crash, holds the old
    content or the new one, never part of it.

    A temporary file beside ``path`` (same file system) is written and fsync'ed, then renamed
    over ``path``, and the directory fsync'ed (the rename on disk). Its mode is ``mode``;
    without one, the mode of the file it replaces, or the umask's for a new file. The
    temporary file is removed when anything fails.
    """
    if mode is None:
        with contextlib.suppress(FileNotFoundError):
            mode = path.stat().st_mode & 0o7777
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created private when a mode is given (a key's bytes are never readable by others, even
    # for the moment before the fchmod); the umask's mode otherwise.
    created = 0o600 if mode is not None else 0o666
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, created)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path | str) -> None:
    """The directory's entries on disk (a rename or a new file in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, creating missing parent directories 0700.

    The mode is set on the open descriptor before any byte is written: ``O_CREAT`` keeps the
    mode of a file that already exists, so a key written over an old world-readable file would
    otherwise stay readable.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)
