"""``/metrics`` (Prometheus text format) on a listener of its own, and the request counter.

The listener (``metrics.port``; worker *i* of ``serve --workers N`` on ``metrics.port + i``)
is plain HTTP on ``metrics.host`` (127.0.0.1 by default): what it shows (routes, counts,
certificate expiry) is operational, not secret, but it is not for the network the facilities
reach. Each worker serves its own figures; Prometheus sums them across targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from datetime import timedelta

from aiohttp import web
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from gateway.api.keys import CLOCK, DB, KEYSTORE, METRICS
from gateway.api.limits import Handler
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.store.schema import client_certificate, credential

#: How long a scrape waits for the key store's check before reporting it down.
HSM_CHECK_SECONDS = 2.0
EXPIRY_WINDOWS = (30, 90)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app.get(METRICS)
    if metrics is None:
        return await handler(request)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.request_done(route, request.method, status, time.perf_counter() - started)


async def _refresh(app: web.Application, metrics: Metrics) -> None:
    """The gauges that describe state, read now."""
    metrics.gc_frozen.set(gc.get_freeze_count())
    keystore = app.get(KEYSTORE)
    if keystore is not None:
        up = 0
        with contextlib.suppress(GatewayError, TimeoutError):
            await asyncio.wait_for(keystore.check(), HSM_CHECK_SECONDS)
            up = 1
        metrics.hsm_up.set(up)
        metrics.signing_queue.set(getattr(keystore, "queue_depth", 0))
    now = app[CLOCK]()
    db = app[DB]
    with contextlib.suppress(GatewayError):
        async with db.read() as conn:
            for days in EXPIRY_WINDOWS:
                n = (
                    await conn.execute(
                        select(func.count())
                        .select_from(client_certificate)
                        .where(
                            client_certificate.c.status == "active",
                            client_certificate.c.not_after <= now + timedelta(days=days),
                        )
                    )
                ).scalar_one()
                metrics.certificates_expiring.labels("facility_client", str(days)).set(n)
            ders = (
                await conn.execute(
                    select(credential.c.certificate_der).where(
                        credential.c.status == "active",
                        credential.c.certificate_der.is_not(None),
                    )
                )
            ).scalars()
            after = [x509.load_der_x509_certificate(d).not_valid_after_utc for d in ders]
        for days in EXPIRY_WINDOWS:
            limit = now + timedelta(days=days)
            metrics.certificates_expiring.labels("signer", str(days)).set(
                sum(1 for a in after if a <= limit)
            )


def metrics_app(main: web.Application) -> web.Application:
    """The scrape listener's app: reads the main app's services and metrics."""

    async def scrape(request: web.Request) -> web.Response:
        metrics = main[METRICS]
        await _refresh(main, metrics)
        return web.Response(
            body=generate_latest(metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app
