"""A key store's blocking work in a child process: the plumbing that the HSM signing process
(``hsm/signer_process.py``) and the HPKI card process (``hsm/card_process.py``) share.

Why a process: in one process, the thread that waits on the device (PKCS#11's ``C_Sign``,
PC/SC's ``SCardTransmit``) must take the GIL back after every call from the threads that
build documents and serve requests, so each round trip costs about twice its own time. The
child has one thread and nothing else to do.

Protocol, on the child's stdin and stdout (moved off fds 0/1 at start, so nothing else can
write into it): frames of a 4-byte big-endian length and a pickle. The first frame is the
child's configuration (a dict); then requests ``(request_id, operation, args)`` and answers
``(request_id, ok, value, state)``: ``value`` is the result or an error tuple (the store's
``encode_error``), ``state`` whatever the child reports after every call (the card process:
its session's generation), or a forwarded log record ``(request_id, None, (level, logger,
message), None)``. Requests are answered in order, so several can be in flight: the child
finds the next one waiting when it has answered one.

The child's side is ``hsm/child_main.py``: it imports neither asyncio nor this module, so a
child starts in what its own imports cost.

Lifetime: the child exits at EOF on its stdin, which the kernel delivers when the parent dies
however it dies (and ``PR_SET_PDEATHSIG`` kills it if the parent dies while it is blocked in
the device). If the child dies, its pending calls fail with the store's "unavailable" error and
the next call starts a new one (at most once per ``reconnect_interval``).

Hand-written on purpose: ``multiprocessing`` would start the child by pickling a callable
through its own spawn machinery and gives no non-blocking reader for the event loop;
``concurrent.futures.ProcessPoolExecutor`` runs calls on any of its processes and in no
guaranteed order, while a session (a login, a card's verified PIN) lives in exactly one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.hsm.child_main import HEADER, Served, child_main, frame

__all__ = ["Child", "ChildStore", "Served", "child_main", "frame"]


# --------------------------------------------------------------------------------------------
# Parent side.


class _Reader(asyncio.Protocol):
    def __init__(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self._on_data = on_data
        self._on_eof = on_eof

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def eof_received(self) -> bool:
        self._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_eof()


class Child:
    """One running child process, attached to one event loop."""

    def __init__(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self.loop = loop
        self.writer: asyncio.WriteTransport | None = None
        self.reader: asyncio.ReadTransport | None = None
        self.pending: dict[int, tuple[asyncio.Future[Any], contextvars.Context]] = {}
        self.buffer = bytearray()
        self.alive = True
        self.stopped = False  # by us (close, another event loop), as opposed to died


class ChildStore:
    """The parent's side of a store whose work runs in ``python -m <module>``.

    Subclasses name the module and what it is (``_module``, ``_what``), say what callers get
    when the child cannot be reached (``_unavailable``) and how an error tuple becomes an
    exception (``_decode_error``); they may act on a new child (``_started``), on each answer's
    state (``_state``) and on a child that ended (``_ended``).
    """

    _module: str
    _what: str
    _log: logging.Logger

    def __init__(self, config: dict[str, Any], *, reconnect_interval: float) -> None:
        self._config = config
        self._reconnect_interval = reconnect_interval
        self._child: Child | None = None
        self._starting: asyncio.Task[Child] | None = None
        self._last_spawn = float("-inf")
        self._next_id = 0
        self._closed = False

    # ---- hooks -----------------------------------------------------------------------------

    def _unavailable(self) -> Exception:
        raise NotImplementedError

    def _closed_error(self) -> Exception:
        """What a call to a closed store raises; the default is ``_unavailable``."""
        return self._unavailable()

    def _decode_error(self, error: Any) -> Exception:
        raise NotImplementedError

    async def _started(self, child: Child) -> None:
        """A new child is up (after ``open`` or a death); the default does nothing."""

    def _state(self, state: Any) -> None:
        """The state the child reported with an answer; the default ignores it."""

    def _ended(self) -> None:
        """The child ended (died or stopped); the default does nothing."""

    # ---- diagnostics -----------------------------------------------------------------------

    @property
    def child_pid(self) -> int | None:
        """The child's pid (tests, diagnostics)."""
        child = self._child
        return child.proc.pid if child is not None and child.alive else None

    @property
    def queue_depth(self) -> int:
        """Calls sent to the child and not answered yet (metrics)."""
        child = self._child
        return len(child.pending) if child is not None else 0

    # ---- calls -----------------------------------------------------------------------------

    async def _request(self, op: str, args: tuple[Any, ...]) -> Any:
        if self._closed:
            raise self._closed_error()
        child = await self._ensure_child()
        return await self._send(child, op, args)

    def _send(self, child: Child, op: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if not child.alive or child.writer is None:
            raise self._unavailable()
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Any] = child.loop.create_future()
        child.pending[request_id] = (future, contextvars.copy_context())
        child.writer.write(frame((request_id, op, args)))
        return future

    async def _shutdown(self) -> None:
        """Ask the child to close its session (its ``close`` operation), then end it."""
        self._closed = True
        child, self._child = self._child, None
        if child is None:
            return
        if child.alive and child.loop is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await self._send(child, "close", ())
        await self._stop(child)

    # ---- the process -----------------------------------------------------------------------

    async def _ensure_child(self) -> Child:
        loop = asyncio.get_running_loop()
        child = self._child
        if child is not None and child.alive and child.loop is loop:
            return child
        # One start for all the callers arriving meanwhile; a caller that goes away does not
        # cancel it for the others.
        starting = self._starting
        if starting is None or starting.get_loop() is not loop:
            starting = self._starting = loop.create_task(self._restart(loop))

            def forget(task: asyncio.Task[Child]) -> None:
                if self._starting is task:
                    self._starting = None

            starting.add_done_callback(forget)
        return await asyncio.shield(starting)

    async def _restart(self, loop: asyncio.AbstractEventLoop) -> Child:
        old, self._child = self._child, None
        died = old is not None and not old.stopped
        if old is not None:  # dead, or attached to another (finished) event loop
            await self._stop(old)
        if died and time.monotonic() - self._last_spawn < self._reconnect_interval:
            raise self._unavailable()  # dying at once again and again: do not fork in a loop
        self._last_spawn = time.monotonic()
        child = await self._spawn(loop)
        self._child = child
        await self._started(child)
        return child

    def _start_process(self) -> subprocess.Popen[bytes]:
        # On the event loop's thread on purpose, not in an executor: PR_SET_PDEATHSIG fires
        # when the *thread* that started the child ends, and the loop's thread lives as long as
        # the parent. (Starting it is a posix_spawn/vfork: about a millisecond.)
        return subprocess.Popen(
            [sys.executable, "-m", self._module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )

    async def _spawn(self, loop: asyncio.AbstractEventLoop) -> Child:
        try:
            proc = self._start_process()
        except OSError as e:
            self._log.error("cannot start the %s: %s", self._what, e)
            raise self._unavailable() from e
        assert proc.stdin is not None and proc.stdout is not None
        child = Child(proc, loop)

        def on_eof() -> None:
            self._child_gone(child)

        child.writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, proc.stdin)
        child.reader, _ = await loop.connect_read_pipe(
            lambda: _Reader(lambda data: self._on_data(child, data), on_eof), proc.stdout
        )
        child.writer.write(frame(self._config))
        self._log.debug("started %s %d", self._what, proc.pid)
        return child

    def _on_data(self, child: Child, data: bytes) -> None:
        buf = child.buffer
        buf += data
        offset = 0
        size = len(buf)
        while size - offset >= 4:
            (length,) = HEADER.unpack_from(buf, offset)
            end = offset + 4 + length
            if end > size:
                break
            # Our own child over a private pipe: no one else can write this stream.
            request_id, ok, value, state = pickle.loads(  # noqa: S301
                memoryview(buf)[offset + 4 : end]
            )
            offset = end
            entry = child.pending.get(request_id)
            if ok is None:  # a log record of the child
                level, name, message = value
                logger = logging.getLogger(name)
                if entry is not None:
                    entry[1].run(logger.log, level, "%s", message)
                else:
                    logger.log(level, "%s", message)
                continue
            self._state(state)
            if entry is None:
                continue
            del child.pending[request_id]
            future = entry[0]
            if future.done():  # the caller went away
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(self._decode_error(value))
        if offset:
            del buf[:offset]

    def _child_gone(self, child: Child) -> None:
        if not child.alive:
            return
        child.alive = False
        if not child.stopped:
            self._log.warning(
                "%s %d exited; %d pending call(s) fail",
                self._what,
                child.proc.pid,
                len(child.pending),
            )
        for future, _ in child.pending.values():
            if not future.done():
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    future.set_exception(self._unavailable())
        child.pending.clear()
        self._close_pipes(child)
        self._ended()

    def _close_pipes(self, child: Child) -> None:
        proc = child.proc
        for transport, pipe in ((child.writer, proc.stdin), (child.reader, proc.stdout)):
            if transport is not None and not child.loop.is_closed():
                transport.close()
            elif pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    async def _stop(self, child: Child) -> None:
        """EOF to the child (it closes its session and exits), then reap it."""
        child.stopped = True
        self._child_gone(child)
        self._close_pipes(child)
        proc = child.proc
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
