"""PKCS#11 in a signing subprocess: one child process per gateway worker owns the session.

Why: in one process the PKCS#11 thread competes for the GIL with the event loop and the SQLite
threads (python-pkcs11 releases and re-takes it around every ``C_Sign``), so a signature costs
the thread about twice its CPU time in wall time. The child has one thread and nothing else to
do; the worker never loads the PKCS#11 module.

The child (``python -m gateway.hsm.signer_process``) runs an ordinary ``Pkcs11KeyStore`` and
calls it through the ``BlockingKeyStore`` protocol of ``hsm/api.py`` (``open_blocking``,
``sign_digests_blocking``, ...) on its main thread, so the fault model, the reconnect
behaviour, the error texts and the log lines are exactly those of the in-process store; SoftHSM
sees one session per worker, as before. Protocol: on the child's stdin and stdout (moved off fds
0/1 at start, so nothing else can write into the protocol), frames of a 4-byte big-endian length
and a pickle: the request ``(request_id, operation, args)``, the answer ``(request_id, ok, value)``
with ``value`` a result or an error tuple (see ``_encode_error``), or a forwarded log record
``(request_id, None, (level, logger, message))``. Requests are answered in order.

Lifetime: the child exits at EOF on its stdin, which the kernel delivers when the worker dies
however it dies (and ``PR_SET_PDEATHSIG`` kills it if the worker dies while it is blocked in
the HSM). If the child dies, its pending calls fail with ``HsmUnavailable`` and the next call
starts a new one (at most once per ``reconnect_interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, HsmUnavailable, KeyNotFound
from gateway.hsm.api import BlockingKeyStore, DigestAlgorithm, GeneratedKey, StoreKeyHandle
from gateway.hsm.encoding import check_key_request, digest_info

__all__ = ["SignerProcessKeyStore"]

_log = logging.getLogger("gateway.hsm")

_HEADER = struct.Struct(">I")
_UNAVAILABLE = "HSM token unavailable"

#: Operations the child runs, by name.
_OPERATIONS = frozenset(
    {"open", "close", "check", "generate", "get_key", "sign", "destroy", "public_key", "attrs"}
)


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _encode_error(
    e: HsmUnavailable | KeyNotFound | ConfigError | ValueError,
) -> tuple[str, str, int]:
    if isinstance(e, KeyNotFound):
        return ("KeyNotFound", e.description, e.retry_after)
    if isinstance(e, HsmUnavailable):
        return ("HsmUnavailable", e.description, e.retry_after)
    if isinstance(e, ConfigError):
        return ("ConfigError", str(e), 0)
    return ("ValueError", str(e), 0)


def _decode_error(error: tuple[str, str, int]) -> Exception:
    kind, text, retry_after = error
    if kind == "KeyNotFound":
        return KeyNotFound(text, retry_after=retry_after)
    if kind == "HsmUnavailable":
        return HsmUnavailable(text, retry_after=retry_after)
    if kind == "ConfigError":
        return ConfigError(text)
    return ValueError(text)


# --------------------------------------------------------------------------------------------
# Worker side.


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


class _Child:
    """One running signing process, attached to one event loop."""

    def __init__(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self.loop = loop
        self.writer: asyncio.WriteTransport | None = None
        self.reader: asyncio.ReadTransport | None = None
        self.pending: dict[int, tuple[asyncio.Future[Any], contextvars.Context]] = {}
        self.buffer = bytearray()
        self.alive = True
        self.stopped = False  # by us (close, another event loop), as opposed to died


def _start_process() -> subprocess.Popen[bytes]:
    # On the event loop's thread on purpose, not in an executor: PR_SET_PDEATHSIG fires when the
    # *thread* that started the child ends, and the loop's thread lives as long as the worker.
    # (Starting it is a posix_spawn/vfork: about a millisecond, once per process start.)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.hsm.signer_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )


class SignerProcessKeyStore:
    """KeyStore whose PKCS#11 work runs in a child process (``hsm.signing_process = true``).

    Same API, errors and texts as ``Pkcs11KeyStore``, which the child runs.
    """

    def __init__(
        self,
        *,
        module_path: str,
        token_label: str,
        pin: str,
        softhsm_conf: Path | None = None,
        retry_after: int = 5,
        reconnect_interval: float = 1.0,
    ) -> None:
        self._config = {
            "module_path": module_path,
            "token_label": token_label,
            "pin": pin,
            "softhsm_conf": str(softhsm_conf) if softhsm_conf is not None else None,
            "retry_after": retry_after,
            "reconnect_interval": reconnect_interval,
        }
        self._token_label = token_label
        self._retry_after = retry_after
        self._reconnect_interval = reconnect_interval
        self._child: _Child | None = None
        self._starting: asyncio.Task[_Child] | None = None
        self._last_spawn = float("-inf")
        self._next_id = 0
        self._opened = False
        self._closed = False
        self._handles: dict[str, StoreKeyHandle] = {}

    def __repr__(self) -> str:
        return f"SignerProcessKeyStore(token_label={self._token_label!r})"

    @property
    def child_pid(self) -> int | None:
        """The signing process's pid (tests, diagnostics)."""
        child = self._child
        return child.proc.pid if child is not None and child.alive else None

    @property
    def queue_depth(self) -> int:
        """Calls sent to the signing process and not answered yet (metrics)."""
        child = self._child
        return len(child.pending) if child is not None else 0

    # ---- KeyStore API ----------------------------------------------------------------------

    async def open(self) -> None:
        """Start the signing process; it connects and logs in now (as ``Pkcs11KeyStore.open``)."""
        self._closed = False
        self._last_spawn = float("-inf")  # open() always tries now
        try:
            await self._request("open", ())
        finally:
            self._opened = True  # a replacement process connects at once from now on

    async def close(self) -> None:
        self._opened = False
        self._closed = True
        child, self._child = self._child, None
        if child is None:
            return
        if child.alive and child.loop is asyncio.get_running_loop():
            with contextlib.suppress(HsmUnavailable):
                await self._send(child, "close", ())
        await self._stop(child)

    async def check(self) -> None:
        await self._request("check", ())

    async def generate_rsa_key(self, *, label: str, bits: int = 2048) -> GeneratedKey:
        check_key_request(label, bits)
        key: GeneratedKey = await self._request("generate", (label, bits))
        return key

    async def get_key(self, key_id: str) -> StoreKeyHandle:
        await self._request("get_key", (key_id,))
        handle = self._handles.get(key_id)
        if handle is None:
            handle = self._handles.setdefault(key_id, StoreKeyHandle(self, key_id))
        return handle

    async def sign_digests(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        """Look up ``key_id`` and sign ``digests`` in one message to the signing process."""
        for d in digests:  # a wrong length is refused here, before any message is sent
            digest_info(d, algorithm)
        if not digests:
            return []
        signatures: list[bytes] = await self._request("sign", (key_id, list(digests), algorithm))
        return signatures

    async def destroy_key(self, key_id: str) -> None:
        await self._request("destroy", (key_id,))

    async def public_key_der(self, key_id: str) -> bytes:
        der: bytes = await self._request("public_key", (key_id,))
        return der

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        attrs: dict[str, bool] = await self._request("attrs", (key_id,))
        return attrs

    # ---- plumbing --------------------------------------------------------------------------

    def _unavailable(self) -> HsmUnavailable:
        return HsmUnavailable(_UNAVAILABLE, retry_after=self._retry_after)

    async def _request(self, op: str, args: tuple[Any, ...]) -> Any:
        if self._closed:
            raise HsmUnavailable("HSM key store is closed", retry_after=self._retry_after)
        child = await self._ensure_child()
        return await self._send(child, op, args)

    def _send(self, child: _Child, op: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if not child.alive or child.writer is None:
            raise self._unavailable()
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Any] = child.loop.create_future()
        child.pending[request_id] = (future, contextvars.copy_context())
        child.writer.write(_frame((request_id, op, args)))
        return future

    async def _ensure_child(self) -> _Child:
        loop = asyncio.get_running_loop()
        child = self._child
        if child is not None and child.alive and child.loop is loop:
            return child
        # One start for all the callers arriving meanwhile; a caller that goes away does not
        # cancel it for the others.
        starting = self._starting
        if starting is None or starting.get_loop() is not loop:
            starting = self._starting = loop.create_task(self._restart(loop))

            def forget(task: asyncio.Task[_Child]) -> None:
                if self._starting is task:
                    self._starting = None

            starting.add_done_callback(forget)
        return await asyncio.shield(starting)

    async def _restart(self, loop: asyncio.AbstractEventLoop) -> _Child:
        old, self._child = self._child, None
        died = old is not None and not old.stopped
        if old is not None:  # dead, or attached to another (finished) event loop
            await self._stop(old)
        if died and time.monotonic() - self._last_spawn < self._reconnect_interval:
            raise self._unavailable()  # dying at once again and again: do not fork in a loop
        self._last_spawn = time.monotonic()
        child = await self._spawn(loop)
        self._child = child
        if self._opened:
            # A new process after a death: connect now, as the in-process store reconnects.
            await self._send(child, "open", ())
        return child

    async def _spawn(self, loop: asyncio.AbstractEventLoop) -> _Child:
        try:
            proc = _start_process()
        except OSError as e:
            _log.error("cannot start the HSM signing process: %s", e)
            raise self._unavailable() from e
        assert proc.stdin is not None and proc.stdout is not None
        child = _Child(proc, loop)

        def on_eof() -> None:
            self._child_gone(child)

        child.writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, proc.stdin)
        child.reader, _ = await loop.connect_read_pipe(
            lambda: _Reader(lambda data: self._on_data(child, data), on_eof), proc.stdout
        )
        child.writer.write(_frame(self._config))
        _log.debug("started HSM signing process %d", proc.pid)
        return child

    def _on_data(self, child: _Child, data: bytes) -> None:
        buf = child.buffer
        buf += data
        offset = 0
        size = len(buf)
        while size - offset >= 4:
            (length,) = _HEADER.unpack_from(buf, offset)
            end = offset + 4 + length
            if end > size:
                break
            # Our own child over a private pipe: no one else can write this stream.
            request_id, ok, value = pickle.loads(memoryview(buf)[offset + 4 : end])  # noqa: S301
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
            if entry is None:
                continue
            del child.pending[request_id]
            future = entry[0]
            if future.done():  # the caller went away
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(_decode_error(value))
        if offset:
            del buf[:offset]

    def _child_gone(self, child: _Child) -> None:
        if not child.alive:
            return
        child.alive = False
        if not child.stopped:
            _log.warning(
                "HSM signing process %d exited; %d pending call(s) fail",
                child.proc.pid,
                len(child.pending),
            )
        for future, _ in child.pending.values():
            if not future.done():
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    future.set_exception(self._unavailable())
        child.pending.clear()
        self._close_pipes(child)

    def _close_pipes(self, child: _Child) -> None:
        proc = child.proc
        for transport, pipe in ((child.writer, proc.stdin), (child.reader, proc.stdout)):
            if transport is not None and not child.loop.is_closed():
                transport.close()
            elif pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    async def _stop(self, child: _Child) -> None:
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


# --------------------------------------------------------------------------------------------
# Child side.


class _ForwardHandler(logging.Handler):
    def __init__(self, emit_frame: Callable[[bytes], None]) -> None:
        super().__init__(logging.DEBUG)
        self._emit_frame = emit_frame
        self.request_id = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{logging.Formatter().formatException(record.exc_info)}"
        message = (self.request_id, None, (record.levelno, record.name, text))
        self._emit_frame(_frame(message))


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


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


def main() -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the worker died before PR_SET_PDEATHSIG took effect
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which closes us
    # Move the protocol off fds 0 and 1: a stray print cannot corrupt it.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)

    def emit_frame(frame: bytes) -> None:
        _write_all(wfd, frame)

    forward = _ForwardHandler(emit_frame)
    logger = logging.getLogger("gateway")
    logger.handlers[:] = [forward]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    from gateway.hsm.pkcs11 import Pkcs11KeyStore

    buf = bytearray()
    if not _read_exact(rfd, buf, 4):
        return 0
    (length,) = _HEADER.unpack_from(buf)
    if not _read_exact(rfd, buf, 4 + length):
        return 0
    config = pickle.loads(buf[4 : 4 + length])  # noqa: S301 - from our parent, private pipe
    del buf[: 4 + length]
    conf = config.pop("softhsm_conf")
    softhsm_conf = Path(conf) if conf is not None else None
    store: BlockingKeyStore = Pkcs11KeyStore(**config, softhsm_conf=softhsm_conf)
    operations = _operations(store)
    while True:
        if not _read_exact(rfd, buf, 4):
            break
        (length,) = _HEADER.unpack_from(buf)
        if not _read_exact(rfd, buf, 4 + length):
            break
        request_id, op, args = pickle.loads(memoryview(buf)[4 : 4 + length])  # noqa: S301
        del buf[: 4 + length]
        forward.request_id = request_id
        try:
            result = operations[op](*args)
        except (HsmUnavailable, KeyNotFound, ConfigError, ValueError) as e:
            answer = (request_id, False, _encode_error(e))
        except Exception:  # noqa: BLE001 - a bug: report it and keep serving
            _log.exception("HSM signing process: %s failed", op)
            answer = (request_id, False, ("HsmUnavailable", "HSM operation failed", 5))
        else:
            answer = (request_id, True, result)
        forward.request_id = 0
        emit_frame(_frame(answer))
    with contextlib.suppress(Exception):
        store.close_blocking()
    return 0


def _operations(store: BlockingKeyStore) -> dict[str, Callable[..., Any]]:
    """The child's operations: the in-process store's blocking API, on this one thread."""
    ops: dict[str, Callable[..., Any]] = {
        "open": store.open_blocking,
        "close": store.close_blocking,
        "check": store.check_blocking,
        "generate": lambda label, bits: store.generate_rsa_key_blocking(label=label, bits=bits),
        "get_key": store.find_key_blocking,  # the key object stays here
        "sign": store.sign_digests_blocking,
        "destroy": store.destroy_key_blocking,
        "public_key": store.public_key_der_blocking,
        "attrs": store.key_attributes_blocking,
    }
    assert set(ops) == _OPERATIONS
    return ops


if __name__ == "__main__":
    sys.exit(main())
