"""Verification off the event loop: worker processes, a wall-clock limit, a concurrency cap.

Verification is CPU-bound (parsing, canonicalisation, RSA) in libraries that hold the GIL
(lxml, asn1crypto), so a thread would still stall the gateway's event loop; each verification
runs in a separate process instead. Per gateway worker there are ``verify_concurrency`` slots,
each with its own one-process pool (started on first use, ``spawn``): a request takes a free
slot or is refused at once (503 with Retry-After), never queued. A verification that runs past
``verify_timeout_seconds`` is stopped by killing its process; the slot gets a fresh pool, so
stuck work cannot pile up, and the other slots are not disturbed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool

from gateway.config import Settings
from gateway.errors import TemporarilyUnavailable
from gateway.verify import TrustConfig, VerificationReport, verify_document

__all__ = ["VerificationPool"]

_log = logging.getLogger("gateway.verify.pool")

#: Seconds allowed for a new worker process to start (not counted in the verification limit).
START_TIMEOUT = 60.0
_TRUST: TrustConfig | None = None  # in a worker process: built once from the settings


def _init_worker(settings: Settings, parent: int = 0) -> None:
    global _TRUST
    from gateway.lifetime import die_with_parent
    from gateway.logs import setup_logging
    from gateway.sign.setup import trust_config

    # End with the gateway worker, even a kill -9'd one (70-220 MB each otherwise held by an
    # orphan, and with them multiprocessing's resource tracker, which waits for its writers).
    if parent and not die_with_parent(parent):
        os._exit(0)

    # The gateway's own log set-up: without it, Python's last-resort handler would print
    # the libraries' warnings with their tracebacks (pyHanko's on a PDF changed after signing).
    setup_logging(settings.logging.level, settings.logging.format)
    _TRUST = trust_config(settings)


def _ready() -> bool:
    return _TRUST is not None


def _verify_job(document: bytes, content: bytes | None) -> VerificationReport:
    assert _TRUST is not None, "worker not initialised"
    return asyncio.run(verify_document(document, trust=_TRUST, content=content))


class VerificationPool:
    """``verify(document, content)`` in a worker process with a timeout; one per app."""

    def __init__(self, settings: Settings, *, slots: int, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self._pools: list[concurrent.futures.ProcessPoolExecutor | None] = [None] * slots
        self._free = list(range(slots))

    async def _pool(self, slot: int) -> concurrent.futures.ProcessPoolExecutor:
        pool = self._pools[slot]
        if pool is None:
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.settings, os.getpid()),
            )
            self._pools[slot] = pool
            # Start the process (imports, trust from the settings) outside the time limit.
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.run_in_executor(pool, _ready), START_TIMEOUT)
        return pool

    def _discard(self, slot: int) -> None:
        """Kill the slot's process (it may be stuck in C code) and forget its pool."""
        pool = self._pools[slot]
        self._pools[slot] = None
        if pool is None:
            return
        processes = dict(getattr(pool, "_processes", None) or {})
        for proc in processes.values():
            with contextlib.suppress(OSError, ValueError):  # already gone
                proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> int:
        return len(self._pools) - len(self._free)

    async def verify(self, document: bytes, content: bytes | None) -> VerificationReport:
        if not self._free:
            raise TemporarilyUnavailable(
                f"{len(self._pools)} verifications are already running in this worker "
                "(signing.verify_concurrency); retry shortly",
                retry_after=2,
            )
        slot = self._free.pop()
        try:
            loop = asyncio.get_running_loop()
            try:
                pool = await self._pool(slot)
                future = loop.run_in_executor(pool, _verify_job, document, content)
                return await asyncio.wait_for(future, self.timeout)
            except TimeoutError:
                _log.warning(
                    "verification stopped after %.1f s (%d bytes)", self.timeout, len(document)
                )
                self._discard(slot)
                raise TemporarilyUnavailable(
                    f"verification of this document took longer than {self.timeout:g} s "
                    "(signing.verify_timeout_seconds) and was stopped",
                    retry_after=5,
                ) from None
            except BrokenProcessPool as e:
                self._discard(slot)
                raise TemporarilyUnavailable(
                    "the verification process ended unexpectedly; retry", retry_after=2
                ) from e
            except BaseException:
                # Cancelled (client gone, shutdown): the process may still be working on it.
                self._discard(slot)
                raise
        finally:
            self._free.append(slot)

    def close(self) -> None:
        for slot in range(len(self._pools)):
            self._discard(slot)
