"""The child's side of ``hsm/child.py``'s protocol: read the configuration, then answer each
request in order until EOF. Imports only the standard library and ``gateway.lifetime`` (no
asyncio): a child's start-up is what its own store imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
from collections.abc import Callable
from typing import Any

from gateway.lifetime import die_with_parent

HEADER = struct.Struct(">I")


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class _ForwardHandler(logging.Handler):
    def __init__(self, emit_frame: Callable[[bytes], None]) -> None:
        super().__init__(logging.DEBUG)
        self._emit_frame = emit_frame
        self.request_id = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{logging.Formatter().formatException(record.exc_info)}"
        message = (self.request_id, None, (record.levelno, record.name, text), None)
        self._emit_frame(frame(message))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, buf: bytearray, n: int) -> bool:
    while len(buf) < n:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return False
        buf += chunk
    return True


class Served:
    """What a child serves: its operations by name, the errors it reports (and how), the
    state sent with every answer, and the clean-up at EOF."""

    def __init__(
        self,
        operations: dict[str, Callable[..., Any]],
        *,
        reported: tuple[type[Exception], ...],
        encode_error: Callable[[Exception], Any],
        failed: Any,
        state: Callable[[], Any] = lambda: None,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.operations = operations
        self.reported = reported
        self.encode_error = encode_error
        self.failed = failed  # the error tuple of an unexpected exception (a bug)
        self.state = state
        self.close = close


def child_main(what: str, build: Callable[[dict[str, Any]], Served]) -> int:
    """The child's main loop: read the configuration, build what it serves, then answer each
    request in order until EOF."""
    parent = os.getppid()
    if not die_with_parent(parent):  # the parent died before PR_SET_PDEATHSIG took effect
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which closes us
    # Move the protocol off fds 0 and 1: a stray print cannot corrupt it.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)

    def emit_frame(data: bytes) -> None:
        _write_all(wfd, data)

    forward = _ForwardHandler(emit_frame)
    logger = logging.getLogger("gateway")
    logger.handlers[:] = [forward]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    log = logging.getLogger("gateway.hsm")

    buf = bytearray()
    if not _read_exact(rfd, buf, 4):
        return 0
    (length,) = HEADER.unpack_from(buf)
    if not _read_exact(rfd, buf, 4 + length):
        return 0
    config = pickle.loads(buf[4 : 4 + length])  # noqa: S301 - from our parent, private pipe
    del buf[: 4 + length]
    served = build(config)
    while True:
        if not _read_exact(rfd, buf, 4):
            break
        (length,) = HEADER.unpack_from(buf)
        if not _read_exact(rfd, buf, 4 + length):
            break
        request_id, op, args = pickle.loads(memoryview(buf)[4 : 4 + length])  # noqa: S301
        del buf[: 4 + length]
        forward.request_id = request_id
        try:
            result = served.operations[op](*args)
        except served.reported as e:
            answer = (request_id, False, served.encode_error(e), served.state())
        except Exception:  # a bug: report it and keep serving
            log.exception("%s: %s failed", what, op)
            answer = (request_id, False, served.failed, served.state())
        else:
            answer = (request_id, True, result, served.state())
        forward.request_id = 0
        emit_frame(frame(answer))
    with contextlib.suppress(Exception):
        served.close()
    return 0
