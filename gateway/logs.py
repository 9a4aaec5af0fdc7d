"""Logging: JSON lines (or text) on stderr, each record with the request id of its request.

Nothing here logs request bodies; callers never pass secrets (PINs, SADs, passwords) to a logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def where_raised(tb: TracebackType | None) -> str:
    """``file:line`` of the innermost frame of a traceback ("?" without one): with the
    exception's type, what finds a fault without a stack trace in the log (the request path's
    rule: a trace may carry the request's data, a PIN's characters or a header's bytes)."""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"


#: Libraries whose log records carry exceptions raised on a client's input: aiohttp (a
#: request it could not parse: the raw request line or header in the message) and pyHanko
#: (a PDF changed after signing: its objects described in the message).
_CLIENT_INPUT_LOGGERS = ("aiohttp", "pyhanko")


class _NoTraceback(logging.Filter):
    """Library error logs about a client's input carry the exception, whose message quotes
    the input: a traceback with a client's bytes in it. Keep only what finds the fault: the
    exception's type, its HTTP status if it has one, and where it was raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith(_CLIENT_INPUT_LOGGERS):
            exc = record.exc_info[1]
            tb = record.exc_info[2]
            where = f" at {where_raised(tb)}" if tb else ""
            code = getattr(exc, "code", None)
            status = f" ({code})" if isinstance(code, int) else ""
            record.msg = f"{record.getMessage()}: {type(exc).__name__}{status}{where}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (0x09,)}


class TextFormatter(logging.Formatter):
    """Plain text with control characters shown as ``\\xNN``: a client's bytes in a log line
    (a path, a name) must not move an operator's terminal cursor or forge a line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(_CONTROL)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


#: The loggers whose INFO lines wait for the end of the loop's turn: the access log (a line
#: per request). Every other line is written at once, as a start-up line must be (its reader
#: may look for it as soon as the port answers).
_BATCHED = frozenset({"gateway.access"})


class _BatchingHandler(logging.Handler):
    """Writes the access lines of one event-loop turn together: formatted in a row and written
    with one ``write`` when the turn ends (under load a turn answers several requests).

    Measured on a served worker: an access line cost ~43 µs of the loop's time when each was
    formatted and written on its own (a system call per line), ~19 µs in a tight loop.
    Any other record, and any record logged where no event loop runs (a CLI, a thread), is
    written at once, after the lines still waiting: the order is kept. A line waits at most
    for the end of its loop's turn; one whose loop ended first goes out with the next record,
    or when ``eventloop.run`` returns, or at exit. The filters run when a record is logged
    (its request id is that of the request that logged it)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._waiting: list[logging.LogRecord] = []
        #: The loop a write is due on (at the end of its turn), if any.
        self._due_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self._waiting.append(record)
        if record.levelno >= logging.WARNING or record.name not in _BATCHED:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: at once
            self.flush()
            return
        if self._due_on is not loop:  # else: already due at the end of this turn
            # (A write due on a loop that has ended since, e.g. a start-up step's, is taken
            # over here.)
            self._due_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            waiting, self._waiting, self._due_on = self._waiting, [], None
            if not waiting:
                return
            lines = []
            for record in waiting:
                try:
                    lines.append(self.format(record) + "\n")
                except Exception:  # noqa: BLE001 - logging's own rule: report, never raise
                    self.handleError(record)
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:  # noqa: BLE001
                self.handleError(waiting[-1])

    def close(self) -> None:
        self.flush()
        super().close()


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = _BatchingHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(_NoTraceback())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    # No formatter here shows where a record was logged from (file, line, function): leave
    # out the stack walk that finds it for every record (the logging HOWTO's "Optimization";
    # measured ~1 % of a worker's CPU in the signing ceremony, an access line per request).
    setattr(logging, "_srcfile", None)  # noqa: B010 - the documented switch is module-private
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # python-fido2 logs every verified assertion at INFO; the audit log records each one
    # already (sad.issue), and a log line per authorization slows the ceremony.
    logging.getLogger("fido2").setLevel(logging.WARNING)
