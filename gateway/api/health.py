"""Health: behind mTLS like every route; probes the store and the HSM token for real."""

from __future__ import annotations

import os

from aiohttp import web
from sqlalchemy import text

from gateway.api.keys import DB, KEYSTORE

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    async with request.app[DB].read() as conn:
        await conn.execute(text("SELECT 1"))
    await request.app[KEYSTORE].check()  # raises HsmUnavailable -> 503 + Retry-After
    return web.json_response({"status": "ok", "store": "ok", "hsm": "ok", "worker": os.getpid()})
