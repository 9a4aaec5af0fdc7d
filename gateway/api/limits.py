"""Request rates and concurrency per client IP and per facility; refusals counted, not written
one by one.

Two middlewares:

- ``ip_limit`` runs before the certificate lookup (so a flood from one address costs no
  database read): a token bucket per remote address (``limits.ip_rate`` requests per second,
  ``limits.ip_burst`` at once) and at most ``limits.ip_concurrency`` requests in progress;
- ``facility_limit`` runs after it: a token bucket per facility (``limits.facility_rate``,
  ``limits.facility_burst``) and at most ``limits.facility_concurrency`` requests in progress.
  Administrators are limited by address only.

Over a limit the answer is 429 ``rate_limited`` with ``Retry-After`` (whole seconds until a
token is back; 1 for a concurrency cap). Limits are per worker process: with ``serve --workers
N`` a client can reach N times the configured figure (the kernel spreads connections, not
requests), which is what bounds each worker's share of the HSM and of the write lock.

A refusal here (and a body that is not acceptable JSON) is not one audit row each, which would
let a client grow the database and compete for the write lock at wire speed: it is counted in
memory (:class:`RefusalSummary`) and written as one ``request.refused.summary`` event per
``limits.summary_seconds`` with the counts per reason and client, and once more at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.audit import AuditLog
from gateway.clock import Clock
from gateway.errors import GatewayError
from gateway.store.db import Database

log = logging.getLogger("gateway.limits")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Buckets kept per limiter; past it, the full (idle) ones are dropped first, so that a
#: client cycling source addresses cannot grow the worker's memory.
MAX_KEYS = 50_000
#: Distinct (reason, client) pairs in one summary; the rest is counted under "other".
MAX_SUMMARY_ROWS = 200


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"

    def __init__(self, description: str, *, retry_after: int, limit: str = "") -> None:
        super().__init__(description, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after
        self.limit = limit


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    active: int = 0


class Limiter:
    """Token buckets with a concurrency count, keyed by client (IP or facility)."""

    def __init__(self, *, rate: float, burst: int, concurrency: int, what: str) -> None:
        self.rate = rate
        self.burst = burst
        self.concurrency = concurrency
        self.what = what
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, key: str, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= MAX_KEYS:
                self._evict(now)
            b = self._buckets[key] = _Bucket(tokens=float(self.burst), stamp=now)
        else:
            b.tokens = min(float(self.burst), b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
        return b

    def _evict(self, now: float) -> None:
        idle = [
            k
            for k, b in self._buckets.items()
            if b.active == 0 and b.tokens + (now - b.stamp) * self.rate >= self.burst
        ]
        for k in idle or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[k]

    def acquire(self, key: str) -> _Bucket:
        """Take a token and a concurrency slot, or raise :class:`RateLimited`."""
        now = time.monotonic()
        b = self._bucket(key, now)
        if b.active >= self.concurrency:
            raise RateLimited(
                f"too many requests in progress for this {self.what} (limit {self.concurrency})",
                retry_after=1,
                limit=self.what,
            )
        if b.tokens < 1.0:
            wait = max(1, math.ceil((1.0 - b.tokens) / self.rate))
            raise RateLimited(
                f"request rate over the limit for this {self.what} "
                f"({self.rate:g} per second, burst {self.burst})",
                retry_after=wait,
                limit=self.what,
            )
        b.tokens -= 1.0
        b.active += 1
        return b

    @staticmethod
    def release(b: _Bucket) -> None:
        b.active -= 1


#: host:pid of this gateway process, named in its refusal summaries.
INSTANCE = f"{socket.gethostname()}:{os.getpid()}"


class RefusalSummary:
    """Refusals counted in memory, written as one audit event per interval."""

    def __init__(self, *, db: Database, audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self._counts: Counter[tuple[str, str | None, str | None]] = Counter()
        self._since = clock()

    def count(self, reason: str, *, actor: str | None, facility_code: str | None) -> None:
        key = (reason, actor, facility_code)
        if key not in self._counts and len(self._counts) >= MAX_SUMMARY_ROWS:
            key = (reason, "other", None)
        self._counts[key] += 1

    def pending(self) -> int:
        return sum(self._counts.values())

    async def flush(self) -> None:
        """Write what was counted since the last flush as one event (nothing if nothing)."""
        if not self._counts:
            return
        counts, since, now = self._counts, self._since, self.clock()
        self._counts, self._since = Counter(), now
        detail = {
            # Which gateway process counted them: instances and workers share one audit log.
            "instance": INSTANCE,
            "since": since.isoformat(),
            "until": now.isoformat(),
            "total": sum(counts.values()),
            "counts": [
                {"reason": reason, "client": actor, "facility": fac, "count": n}
                for (reason, actor, fac), n in counts.most_common()
            ],
        }
        try:
            await self.audit.append_alone(
                self.db,
                action="request.refused.summary",
                actor="gateway",
                detail=detail,
                now=now,
            )
        except GatewayError as e:
            # The store is unavailable: keep the counts for the next flush.
            log.warning("refusal summary not written: %s", e.description)
            self._counts.update(counts)
            self._since = since

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            await self.flush()


async def summary_task(summary: RefusalSummary, interval: float) -> AsyncIterator[None]:
    """Runs the summary's flush loop for the app's lifetime and flushes once more at the end."""
    stop = asyncio.Event()
    task = asyncio.create_task(summary.run(interval, stop))
    yield
    stop.set()
    await task
