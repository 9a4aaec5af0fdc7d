"""Signature building off the event loop: one thread with an event loop of its own.

Building an XAdES signature is CPU work on the client's document: parsing it (or building the
e-prescription XML from its CSV), checking it, canonicalising what is signed, serialising the
result. On the worker's event loop that work stops every other request of the worker for as
long as it takes (a few milliseconds per prescription; far longer for a large document, which
the untrusted-XML limits bound). Here it runs on the builder thread instead, and the loop keeps
serving TLS, HTTP, the ledger and the signing process meanwhile.

The format code is async (it awaits the key and the TSA between building steps), so the thread
runs an event loop of its own and the building coroutine runs there whole: every lxml tree is
created, changed and serialised on that one thread. What the coroutine awaits that belongs to
the request's loop is reached through bridges that run it there:

- the key (a ``GrantedKey``: its grant accounting and the signing process's pipe stay on the
  request's loop), closed when the request ends, so that a build still running after its
  request was cancelled can no longer sign;
- the TSA client (its HTTP session belongs to the request's loop).

One thread, not a pool: building holds the GIL most of the time, so more threads would not add
CPU, and a build waiting for the TSA does not hold the thread (other builds run meanwhile on
its loop, as they did on the worker's loop).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from gateway.errors import GatewayError
from gateway.hsm.api import DigestAlgorithm, KeyHandle

_T = TypeVar("_T")

__all__ = ["BuildCancelled", "LoopKey", "LoopTsa", "build_off_loop"]


class BuildCancelled(GatewayError):
    """A build reached the key after its request had ended (cancelled): nothing is signed."""

    status = 503


class _Gate:
    """Open while the request that started a build waits for it."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


class _Bridge:
    def __init__(self, home: asyncio.AbstractEventLoop, gate: _Gate) -> None:
        self._home = home
        self._gate = gate

    async def _call(self, make: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``make()`` on the request's loop and wait for it here (on the builder loop)."""

        async def guarded() -> _T:
            if not self._gate.open:
                raise BuildCancelled("the request ended before its signature was built")
            return await make()

        future = asyncio.run_coroutine_threadsafe(guarded(), self._home)
        return await asyncio.wrap_future(future)


class LoopKey(_Bridge):
    """A ``KeyHandle`` whose signatures are made by ``key`` on the request's loop."""

    def __init__(self, key: KeyHandle, home: asyncio.AbstractEventLoop, gate: _Gate) -> None:
        super().__init__(home, gate)
        self._key = key

    @property
    def key_id(self) -> str:
        return self._key.key_id

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        return await self._call(lambda: self._key.sign_digest(digest, algorithm))

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        return await self._call(lambda: self._key.sign_digests(digests, algorithm))


class LoopTsa(_Bridge):
    """A ``TimestampClient`` whose requests are made by ``tsa`` on the request's loop."""

    def __init__(self, tsa: Any, home: asyncio.AbstractEventLoop, gate: _Gate) -> None:
        super().__init__(home, gate)
        self._tsa = tsa

    async def timestamp(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        token: bytes = await self._call(lambda: self._tsa.timestamp(digest, algorithm))
        return token


class _BuilderThread:
    """The builder loop's thread, started on first use; a daemon (it holds no state that
    must be flushed: a build in flight when the process ends was never answered)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="signature-builder", daemon=True
                ).start()
                self._loop = loop
            return self._loop


_thread = _BuilderThread()


async def build_off_loop(
    build: Callable[[KeyHandle, Any], Coroutine[Any, Any, _T]], *, key: KeyHandle, tsa: Any
) -> _T:
    """``await build(key, tsa)`` on the builder thread, ``key`` and ``tsa`` bridged back here.

    Cancelling the caller cancels the build and closes its bridges (a build cannot sign after
    its request has gone). Exceptions of the build come back as they were raised.
    """
    home = asyncio.get_running_loop()
    gate = _Gate()
    bridged_tsa = LoopTsa(tsa, home, gate) if tsa is not None else None
    context = contextvars.copy_context()  # the request id of log lines, as on the loop

    async def in_context() -> _T:
        for var, value in context.items():
            var.set(value)  # in the build task's own context
        return await build(LoopKey(key, home, gate), bridged_tsa)

    future = asyncio.run_coroutine_threadsafe(in_context(), _thread.loop())
    try:
        return await asyncio.wrap_future(future)
    finally:
        gate.open = False
