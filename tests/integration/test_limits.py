"""Bodies no parser should choke on, rates and concurrency per client: every JSON route answers
400 to a body nested too deeply or with a number too long; a client over its rate gets 429 with
Retry-After; refusals are written as counted summaries, not one audit row each."""

from __future__ import annotations

import asyncio
import json
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.app import ROUTES
from gateway.store.schema import audit_event
from tests.support.gateway import Server, client_context, request, run_cli, serving
from tests.support.hostile import deep_json, huge_integer_json
from tests.support.signing import services

pytestmark = [pytest.mark.tls]


def _admin_ctx(sandbox: dict[str, Any]) -> ssl.SSLContext:
    adm = sandbox["admin"]
    return client_context(sandbox["server_ca"], adm["client_cert"], adm["client_key"])


def _vendor_ctx(sandbox: dict[str, Any], tmp_path: Path) -> ssl.SSLContext:
    """A vendor with its own client certificate (the /vendor/ routes take no other)."""
    name = f"limits-vendor-{tmp_path.name[-8:]}"
    run_cli("vendor", "add", name, "-c", sandbox["config"])
    run_cli("vendor", "issue-cert", name, "--out", str(tmp_path / "v"), "-c", sandbox["config"])
    return client_context(
        sandbox["server_ca"], str(tmp_path / "v" / "client.pem"), str(tmp_path / "v" / "client.key")
    )


def _json_routes(code: str) -> list[str]:
    """Every POST route of the main listener, path parameters filled in."""
    paths = []
    for table in ROUTES:
        for route in table:
            if getattr(route, "method", None) == "POST":
                path = route.path.replace("{code}", code).replace("{serial}", "01")
                paths.append(path)
    return paths


def _summaries(config: str, srv: Server) -> list[Any]:
    """The refusal summaries that ``srv`` wrote (the session gateway writes its own, on its own
    schedule, into the same audit log)."""
    assert srv.proc is not None
    mine = f":{srv.proc.pid}"
    rows = _audit(config, "request.refused.summary")
    return [r for r in rows if json.loads(r.detail)["instance"].endswith(mine)]


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
    tmp_path: Path,
) -> None:
    admin = _admin_ctx(sandbox)
    vendor = _vendor_ctx(sandbox, tmp_path)
    seen = {}
    for path in _json_routes(hospital["institution_code"]):
        ctx = {"admin": admin, "vendor": vendor}.get(path.split("/")[1], hospital_ctx)
        r = request(gateway.port, "POST", path, ctx=ctx, body=body)
        seen[path] = (r.status, r.body[:200])
    assert {p: s for p, s in seen.items() if s[0] != 400} == {}
    logs = gateway.logs()
    assert "Traceback" not in logs
    assert "RecursionError" not in logs and "unhandled" not in logs


def test_rates_per_facility_and_address_429_and_one_summary_row(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    pharmacy = next(f for f in sandbox["facilities"] if f["kind"] == "pharmacy")
    pharmacy_ctx = client_context(
        sandbox["server_ca"], pharmacy["client_cert"], pharmacy["client_key"]
    )
    admin = _admin_ctx(sandbox)
    env = {
        "HPKI_GATEWAY_LIMITS__FACILITY_RATE": "0.01",
        "HPKI_GATEWAY_LIMITS__FACILITY_BURST": "3",
        "HPKI_GATEWAY_LIMITS__IP_RATE": "0.01",
        "HPKI_GATEWAY_LIMITS__IP_BURST": "10",
        "HPKI_GATEWAY_LIMITS__SUMMARY_SECONDS": "3600",
        "HPKI_GATEWAY_SCHEDULER__ENABLED": "false",
        "HPKI_GATEWAY_TEST_TSA__ENABLED": "false",
    }
    with serving(Path(sandbox["config"]), env=env) as srv:
        info = [
            request(srv.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
            for _ in range(5)
        ]
        assert [r.status for r in info] == [200, 200, 200, 429, 429]
        assert info[3].json()["error"] == "rate_limited"
        assert int(info[3].headers["retry-after"]) >= 1
        # Another facility and an administrator have their own budgets.
        assert request(srv.port, "GET", "/admin/facilities", ctx=admin).status == 200
        bad = request(srv.port, "POST", "/csc/v2/info", ctx=pharmacy_ctx, body=deep_json(2000))
        assert bad.status == 400
        # The address's budget (10) is shared by everyone behind it.
        tail = [request(srv.port, "GET", "/admin/facilities", ctx=admin) for _ in range(4)]
        assert [r.status for r in tail] == [200, 200, 200, 429]
        assert tail[3].headers["content-type"].startswith("application/problem+json")
        assert int(tail[3].headers["retry-after"]) >= 1
        # Nothing written yet: the refusals are counted in memory.
        assert _summaries(sandbox["config"], srv) == []
    rows = _summaries(sandbox["config"], srv)
    assert len(rows) == 1
    detail = json.loads(rows[-1].detail)
    counts = {(c["reason"], c["client"]): c["count"] for c in detail["counts"]}
    assert counts == {
        ("rate_limited", "facility:1310000011"): 2,
        ("rate_limited", "ip:127.0.0.1"): 1,
        ("unreadable_body", "facility:1340000019"): 1,
    }
    assert detail["total"] == 4
    assert "Traceback" not in srv.logs()


def test_concurrency_cap_per_client_is_refused_at_once_and_given_back() -> None:
    from gateway.api.limits import Limiter, RateLimited

    lim = Limiter(rate=1000, burst=1000, concurrency=2, what="facility")
    a, b = lim.acquire("f"), lim.acquire("f")
    with pytest.raises(RateLimited) as e:
        lim.acquire("f")
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    assert lim.acquire("g") is not a  # another client is not affected
    lim.release(a)
    c = lim.acquire("f")
    lim.release(b)
    lim.release(c)


def test_a_flood_of_refusals_is_counted_not_written_row_by_row(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    """200 unreadable bodies from 8 threads: no audit row until the summary, then one."""
    env = {
        "HPKI_GATEWAY_LIMITS__SUMMARY_SECONDS": "3600",
        "HPKI_GATEWAY_SCHEDULER__ENABLED": "false",
        "HPKI_GATEWAY_TEST_TSA__ENABLED": "false",
    }
    with serving(Path(sandbox["config"]), env=env) as srv:

        def one(_: int) -> int:
            return request(
                srv.port,
                "POST",
                "/csc/v2/signatures/signHash",
                ctx=hospital_ctx,
                body=huge_integer_json(),
            ).status

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(200)))
        assert set(statuses) == {400}
        assert _summaries(sandbox["config"], srv) == []
    rows = _summaries(sandbox["config"], srv)
    assert len(rows) == 1
    assert json.loads(rows[-1].detail)["total"] == 200
