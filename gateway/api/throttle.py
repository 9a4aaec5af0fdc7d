"""The middlewares of api/limits.py: per address before the certificate lookup, per facility
after it."""

from __future__ import annotations

from aiohttp import web

from gateway.api.keys import FACILITY_LIMITER, IP_LIMITER
from gateway.api.limits import Handler
from gateway.api.middleware import IDENTITY
from gateway.auth.mtls import ClientIdentity


@web.middleware
async def ip_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app.get(IP_LIMITER)
    if limiter is None:
        return await handler(request)
    bucket = limiter.acquire(request.remote or "?")
    try:
        return await handler(request)
    finally:
        limiter.release(bucket)


@web.middleware
async def facility_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app.get(FACILITY_LIMITER)
    ident = request.get(IDENTITY)
    if limiter is None or not isinstance(ident, ClientIdentity) or ident.kind != "facility":
        return await handler(request)
    bucket = limiter.acquire(ident.actor)
    try:
        return await handler(request)
    finally:
        limiter.release(bucket)
