"""Files only their owner may read: keys, secrets, PKCS#12 bundles, the delivery outbox."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private"]


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
