"""Bodies no parser should choke on, rates and concurrency per client: every JSON route answers
400 to a body nested too deeply or with a number too long; a client over its rate gets 429 with
Retry-After; refusals are written as counted summaries, not one audit row each."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.app import ROUTES
from gateway.store.schema import audit_event
from tests.support.gateway import Server, client_context, request, serving
from tests.support.hostile import deep_json, huge_integer_json
from tests.support.signing import services

pytestmark = [pytest.mark.tls]


def _admin_ctx(sandbox: dict[str, Any]) -> ssl.SSLContext:
    adm = sandbox["admin"]
    return client_context(sandbox["server_ca"], adm["client_cert"], adm["client_key"])


def _json_routes(code: str) -> list[str]:
    """Every POST route of the main listener, path parameters filled in."""
    paths = []
    for table in ROUTES:
        for route in table:
            if getattr(route, "method", None) == "POST":
                path = route.path.replace("{code}", code).replace("{serial}", "01")
                paths.append(path)
    return paths


def _audit(config: str, action: str) -> list[Any]:
    async def rows() -> list[Any]:
        async with services(config) as svc, svc.db.read() as conn:
            q = select(audit_event).where(audit_event.c.action == action)
            return list((await conn.execute(q.order_by(audit_event.c.seq))).all())

    return asyncio.run(rows())


@pytest.mark.parametrize("body", [deep_json(), huge_integer_json()], ids=["deep", "huge-int"])
def test_every_json_route_answers_400_to_a_body_no_parser_should_take(
    gateway: Server,
    sandbox: dict[str, Any],
    hospital: dict[str, Any],
    hospital_ctx: ssl.SSLContext,
    body: bytes,
) -> None:
    admin = _admin_ctx(sandbox)
    seen = {}
    for path in _json_routes(hospital["institution_code"]):
        ctx = admin if path.startswith("/admin/") else hospital_ctx
        r = request(gateway.port, "POST", path, ctx=ctx, body=body)
        seen[path] = (r.status, r.body[:200])
    assert {p: s for p, s in seen.items() if s[0] != 400} == {}
    logs = gateway.logs()
    assert "Traceback" not in logs
    assert "RecursionError" not in logs and "unhandled" not in logs
