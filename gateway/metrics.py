"""Prometheus metrics of one worker process (``prometheus_client``), HTTP-free.

One :class:`Metrics` per app, with its own registry (several apps can live in one test
process). The services that count hold an optional reference (``SigningService.metrics``,
``SadLedger.metrics``); the HTTP side (``api/metrics.py``) counts requests and serves the
scrape, where the gauges that describe state (HSM reachable, signing-process queue, expiring
certificates) are read.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
)

#: Latency buckets (seconds): a signHash is ~10 ms, a B-T signDoc with its TSA ~100 ms.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "hpki_gateway_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "hpki_gateway_request_duration_seconds",
            "HTTP request latency by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.signatures = Counter(
            "hpki_gateway_signatures",
            "Signatures returned to clients, by presence method, format and level",
            ["presence", "format", "level"],
            registry=r,
        )
        self.sad = Counter(
            "hpki_gateway_sad_events",
            "SAD events: issued, consumed (signatures spent), refused, refunded",
            ["event"],
            registry=r,
        )
        self.hsm_up = Gauge(
            "hpki_gateway_hsm_up", "1 if the key store answered its check at scrape", registry=r
        )
        self.signing_queue = Gauge(
            "hpki_gateway_signing_process_queue",
            "Calls waiting for this worker's signing process",
            registry=r,
        )
        self.scheduler_runs = Counter(
            "hpki_gateway_scheduler_runs",
            "Scheduler runs by outcome (ok, failed)",
            ["outcome"],
            registry=r,
        )
        self.certificates_expiring = Gauge(
            "hpki_gateway_certificates_expiring",
            "Active certificates whose notAfter is within the window (days)",
            ["kind", "within_days"],
            registry=r,
        )
        self.rate_limited = Counter(
            "hpki_gateway_rate_limited",
            "Requests refused with 429 by limit (address, facility)",
            ["limit"],
            registry=r,
        )
        self.gc_frozen = Gauge(
            "hpki_gateway_gc_frozen_objects",
            "Objects the worker froze after start-up (out of the cyclic collector's reach)",
            registry=r,
        )
        # prometheus_client's own: python_gc_* (collections and what they freed, per
        # generation) and process_* (resident memory, open files, CPU seconds, from /proc).
        GCCollector(registry=r)
        ProcessCollector(registry=r)
        # The per-request children by label values, looked up once each: ``labels()`` takes
        # a lock and checks its arguments on every call, three times per ceremony.
        self._per_request: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        for event in ("issued", "consumed", "refused", "refunded"):
            self.sad.labels(event)

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency. A method outside HTTP's usual ones
        (the parser also takes WebDAV's, PURGE and some 25 more) is counted as ``OTHER``."""
        key = (route, method if method in _METHODS else "OTHER", status)
        children = self._per_request.get(key)
        if children is None:
            children = self._per_request[key] = (
                self.requests.labels(route, key[1], str(status)),
                self.latency.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
