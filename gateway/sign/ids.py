"""Random element Ids for signatures, from a buffer of the operating system's random bytes.

A document signature needs several random Ids (the signature's, its references', its signed
properties'...). ``secrets.token_hex`` makes one ``getrandom`` system call per Id; a batch
signing documents at the card's pace spent more on those calls than on the Ids' use. The bytes
are the same (``os.urandom``), drawn 4 kB at a time: unpredictable, so a caller's document
cannot carry an element with the Id a signature is about to use. The buffer is dropped in a
forked child so that parent and child never hand out the same bytes.
"""

from __future__ import annotations

import os
import threading
import uuid

_CHUNK = 4096
_lock = threading.Lock()
_buf = b""
_pos = 0


def _reset() -> None:
    global _buf, _pos
    _buf, _pos = b"", 0


os.register_at_fork(after_in_child=_reset)


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG (``n`` at most 4,096)."""
    global _buf, _pos
    if not 0 < n <= _CHUNK:
        raise ValueError("1 to 4096 bytes at a time")
    with _lock:
        if _pos + n > len(_buf):
            _buf, _pos = os.urandom(_CHUNK), 0
        out = _buf[_pos : _pos + n]
        _pos += n
    return out


def token_hex(nbytes: int) -> str:
    """Like ``secrets.token_hex``: ``2 * nbytes`` hex digits."""
    return random_bytes(nbytes).hex()


def uuid4() -> uuid.UUID:
    """Like ``uuid.uuid4``."""
    return uuid.UUID(bytes=random_bytes(16), version=4)
