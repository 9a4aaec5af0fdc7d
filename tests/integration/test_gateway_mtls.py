"""The listener, end to end over real TLS: who gets in, and what everyone else gets."""

from __future__ import annotations

import shutil
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.sandbox import testworld
from tests.support.faults import wait_until
from tests.support.gateway import Server, client_context, request, run_cli, serving

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _handshake_refused(port: int, ctx: ssl.SSLContext, valid: ssl.SSLContext) -> None:
    """A client with ``ctx`` is refused by the server in the TLS handshake: fails if a request
    gets through, or if the connection fails some other way.

    With TLS 1.3 the client's side of the handshake is done before the server checks the
    client certificate, so the refusal reaches the client when it sends its request or reads
    the answer: the server's close as an EOF in violation of the protocol (``SSLEOFError``),
    as a close before any answer (``RemoteDisconnected``, a ``ConnectionResetError``), as a
    reset (``ConnectionResetError``; ``BrokenPipeError`` on a write), or the server's alert.
    A refused or timed-out connection, or the client refusing the server's certificate, is
    none of these. Then the same port serves a request with the ``valid`` certificate: the
    refusal was the handshake's, not a dead or busy server's."""
    try:
        r = request(port, "POST", "/csc/v2/info", ctx=ctx, json_body={})
    except ssl.SSLCertVerificationError as e:  # the client's refusal, not the server's
        raise AssertionError(f"the client refused the server's certificate: {e}") from e
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
        pass
    except ssl.SSLError as e:
        assert "ALERT" in str(e.reason), e  # any other TLS error: only the server's alert
    else:
        raise AssertionError(f"request without a valid client certificate got HTTP {r.status}")
    r = request(port, "POST", "/csc/v2/info", ctx=valid, json_body={})
    assert r.status == 200, r.body


def test_info_with_facility_certificate(gateway: Server, hospital_ctx: ssl.SSLContext) -> None:
    r = request(gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
    assert r.status == 200, r.body
    info = r.json()
    assert "TLS" in info["authType"]
    assert info["methods"][:3] == ["info", "credentials/list", "credentials/info"]
    assert {"credentials/authorize", "signatures/signHash"} <= set(info["methods"])
    assert info["specs"].startswith("2.")
    assert info["region"] == "JP"
    assert len(r.headers["x-request-id"]) == 16


def test_no_client_certificate_fails_handshake(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    _handshake_refused(gateway.port, client_context(sandbox["server_ca"]), hospital_ctx)


def test_certificate_from_another_ca_fails_handshake(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    rogue_ca = testworld.make_client_ca(now=now, name="ROGUE client CA")
    leaf = testworld.issue_client_cert(
        rogue_ca,
        common_name="rogue",
        institution_code="1310000011",
        now=now,
        validity=timedelta(days=30),
    )
    leaf.write(tmp_path / "c.pem", tmp_path / "c.key")
    ctx = client_context(sandbox["server_ca"], str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    _handshake_refused(gateway.port, ctx, hospital_ctx)


def test_unknown_certificate_from_the_right_ca_is_403(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    pki = Path(sandbox["dir"]) / "pki"
    ca = testworld.CertAndKey(
        cert=x509.load_pem_x509_certificate((pki / "facility-client-ca.pem").read_bytes()),
        key=serialization.load_pem_private_key(  # type: ignore[arg-type]
            (pki / "facility-client-ca.key").read_bytes(), password=None
        ),
    )
    leaf = testworld.issue_client_cert(
        ca,
        common_name="never registered",
        institution_code="1310000011",
        now=datetime.now(UTC),
        validity=timedelta(days=30),
    )
    leaf.write(tmp_path / "c.pem", tmp_path / "c.key")
    ctx = client_context(sandbox["server_ca"], str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    r = request(gateway.port, "POST", "/csc/v2/info", ctx=ctx, json_body={})
    assert r.status == 403
    assert r.json()["error"] == "access_denied"
    assert "not registered" in r.json()["error_description"]
    # Also on a non-CSC route and an unknown one: problem+json, still 403 (no route leaks).
    for path in ("/health", "/no/such/route"):
        r = request(gateway.port, "GET", path, ctx=ctx)
        assert r.status == 403, path
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "access_denied"


def _new_facility(sandbox: dict[str, Any], code: str, out: Path) -> ssl.SSLContext:
    cfg = sandbox["config"]
    run_cli("facility", "add", code, "--name", f"TEST clinic {code}", "--kind", "clinic", "-c", cfg)
    run_cli("facility", "issue-cert", code, "--out", str(out), "-c", cfg)
    return client_context(sandbox["server_ca"], str(out / "client.pem"), str(out / "client.key"))


def test_revoked_certificate_is_403_with_when_and_why(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    ctx = _new_facility(sandbox, "0110000018", tmp_path)
    assert request(gateway.port, "POST", "/csc/v2/info", ctx=ctx, json_body={}).status == 200
    serial = format(
        x509.load_pem_x509_certificate((tmp_path / "client.pem").read_bytes()).serial_number, "x"
    )
    run_cli(
        "facility",
        "revoke-cert",
        serial,
        "--reason",
        "key compromise reported",
        "-c",
        sandbox["config"],
    )
    r = request(gateway.port, "POST", "/csc/v2/info", ctx=ctx, json_body={})
    assert r.status == 403
    desc = r.json()["error_description"]
    assert "revoked on" in desc and "key compromise reported" in desc
    assert datetime.now(UTC).strftime("%Y-%m-%d") in desc


def test_suspended_facility_is_403_then_resumed(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    ctx = _new_facility(sandbox, "0210000017", tmp_path)
    cfg = sandbox["config"]
    run_cli("facility", "suspend", "0210000017", "--reason", "contract ended", "-c", cfg)
    r = request(gateway.port, "POST", "/csc/v2/credentials/list", ctx=ctx, json_body={})
    assert r.status == 403
    assert "suspended" in r.json()["error_description"]
    assert "contract ended" in r.json()["error_description"]
    run_cli("facility", "resume", "0210000017", "-c", cfg)
    assert request(gateway.port, "POST", "/csc/v2/info", ctx=ctx, json_body={}).status == 200


def test_body_over_limit_is_413(gateway: Server, hospital_ctx: ssl.SSLContext) -> None:
    big = b'{"lang": "' + b"a" * (11 * 1024 * 1024) + b'"}'
    try:
        r = request(gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, body=big)
    except (ConnectionError, ssl.SSLError) as e:  # server may close after answering
        raise AssertionError(f"no 413 response: {e}") from e
    assert r.status == 413
    assert r.json()["error"] == "payload_too_large"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"credentialID": 42}', "credentialID"),
        (b'{"credentialID": "x", "certificates": "all"}', "certificates"),
        (b'{"credentialID": "x", "certInfo": "yes"}', "certInfo"),
        (b"{}", "Missing (or invalid type) parameter credentialID"),
        (b'{"credentialID": "cred-does-not-exist"}', "Invalid parameter credentialID"),
    ],
)
def test_bad_input_is_400_invalid_request(
    gateway: Server, hospital_ctx: ssl.SSLContext, body: bytes, needle: str
) -> None:
    r = request(gateway.port, "POST", "/csc/v2/credentials/info", ctx=hospital_ctx, body=body)
    assert r.status == 400, r.body
    err = r.json()
    assert err["error"] == "invalid_request"
    assert needle in err["error_description"]
    assert "Traceback" not in r.body.decode()


def test_unknown_csc_route_and_method(gateway: Server, hospital_ctx: ssl.SSLContext) -> None:
    r = request(gateway.port, "POST", "/csc/v2/signatures/nope", ctx=hospital_ctx, json_body={})
    assert r.status == 404
    assert r.json()["error"] == "invalid_request"
    r = request(gateway.port, "GET", "/csc/v2/info", ctx=hospital_ctx)
    assert r.status == 405
    assert "POST" in r.headers.get("allow", "")


def test_token_missing_is_503_then_recovers_without_restart(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    tokens = Path(sandbox["dir"]) / "softhsm" / "tokens"
    away = tokens.with_name("tokens.away")
    signer = next(s for s in sandbox["signers"] if "1310000011" in s["facilities"])
    body = {"credentialID": signer["credential_id"]}
    assert request(gateway.port, "GET", "/health", ctx=hospital_ctx).status == 200
    shutil.move(tokens, away)
    try:
        r = request(gateway.port, "GET", "/health", ctx=hospital_ctx)
        assert r.status == 503, r.body
        assert r.json()["code"] == "temporarily_unavailable"
        assert int(r.headers["retry-after"]) > 0
        r = request(
            gateway.port, "POST", "/csc/v2/credentials/info", ctx=hospital_ctx, json_body=body
        )
        assert r.status == 503, r.body
        assert r.json()["error"] == "temporarily_unavailable"
    finally:
        shutil.move(away, tokens)
    deadline = time.monotonic() + 15
    statuses = []
    while time.monotonic() < deadline:
        r = request(
            gateway.port, "POST", "/csc/v2/credentials/info", ctx=hospital_ctx, json_body=body
        )
        statuses.append(r.status)
        if r.status == 200:
            break
        time.sleep(0.3)
    assert statuses[-1] == 200, statuses
    assert request(gateway.port, "GET", "/health", ctx=hospital_ctx).status == 200


def test_admin_certificate_is_not_a_facility(gateway: Server, sandbox: dict[str, Any]) -> None:
    adm = sandbox["admin"]
    ctx = client_context(sandbox["server_ca"], adm["client_cert"], adm["client_key"])
    r = request(gateway.port, "POST", "/csc/v2/info", ctx=ctx, json_body={})
    assert r.status == 403
    assert r.json()["error_description"] == (
        "CSC methods are for facility client certificates; administrators use /admin/"
    )
    assert request(gateway.port, "GET", "/health", ctx=ctx).status == 200


def test_request_id_is_in_the_log_and_no_traceback(
    gateway: Server, hospital_ctx: ssl.SSLContext
) -> None:
    r = request(gateway.port, "POST", "/csc/v2/credentials/info", ctx=hospital_ctx, body=b"{x")
    rid = r.headers["x-request-id"]
    assert r.json()["request_id"] == rid

    def lines() -> list[str]:  # the access line is written when the answering turn ends
        return [line for line in gateway.logs().splitlines() if rid in line]

    assert wait_until(lambda: any('"status": 400' in line for line in lines()), 5), lines()
    assert "Traceback" not in gateway.logs()


def _admin_ctx(sandbox: dict[str, Any]) -> ssl.SSLContext:
    adm = sandbox["admin"]
    return client_context(sandbox["server_ca"], adm["client_cert"], adm["client_key"])


def test_bodies_must_be_sent_as_json_415(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    """A cross-site form or no-cors fetch can send text/plain, a form or no type at all, never
    application/json: such bodies are refused before any handler runs (CSRF)."""
    admin = _admin_ctx(sandbox)
    code = "1110000015"
    r = request(
        gateway.port,
        "POST",
        "/admin/facilities",
        ctx=admin,
        json_body={"institution_code": code, "name": "TEST CSRF医院", "kind": "clinic"},
    )
    assert r.status == 201, r.body
    suspend = f"/admin/facilities/{code}/suspend"
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = request(
            gateway.port,
            "POST",
            suspend,
            ctx=admin,
            body=b'{"reason": "csrf"}',
            headers={"Content-Type": ctype},
        )
        assert r.status == 415, (ctype, r.body)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "unsupported_media_type"
        assert ctype in r.json()["detail"]
    r = request(
        gateway.port, "POST", f"/admin/facilities/{code}/resume", ctx=admin, json_content_type=False
    )
    assert r.status == 415, r.body
    r = request(gateway.port, "GET", f"/admin/facilities/{code}", ctx=admin)
    assert r.json()["status"] == "active"
    # Under /csc/ the error is CSC JSON; a charset parameter is fine.
    r = request(
        gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, body=b"{}", json_content_type=False
    )
    assert r.status == 415, r.body
    assert r.json()["error"] == "unsupported_media_type"
    r = request(
        gateway.port,
        "POST",
        "/csc/v2/info",
        ctx=hospital_ctx,
        body=b"{}",
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status == 200, r.body


def test_cross_site_requests_are_403(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    admin = _admin_ctx(sandbox)
    code = "1110000016"
    r = request(
        gateway.port,
        "POST",
        "/admin/facilities",
        ctx=admin,
        json_body={"institution_code": code, "name": "TEST 越境医院", "kind": "clinic"},
    )
    assert r.status == 201, r.body
    suspend = f"/admin/facilities/{code}/suspend"
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": f"https://localhost:{gateway.port}.evil.example"},
    ):
        r = request(
            gateway.port,
            "POST",
            suspend,
            ctx=admin,
            json_body={"reason": "csrf"},
            headers=headers,
        )
        assert r.status == 403, (headers, r.body)
        assert r.json()["code"] == "access_denied"
    r = request(
        gateway.port,
        "POST",
        "/csc/v2/info",
        ctx=hospital_ctx,
        json_body={},
        headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert r.status == 403 and r.json()["error"] == "access_denied"
    assert (
        request(gateway.port, "GET", f"/admin/facilities/{code}", ctx=admin).json()["status"]
        == "active"
    )
    # The gateway's own pages (same origin) and non-browser clients (no Origin) still work.
    for headers in (
        {"Origin": f"https://localhost:{gateway.port}", "Sec-Fetch-Site": "same-origin"},
        {},
    ):
        r = request(
            gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={}, headers=headers
        )
        assert r.status == 200, (headers, r.body)


def test_cross_site_admin_gets_are_403(gateway: Server, sandbox: dict[str, Any]) -> None:
    """Admin GETs that write an audit record (a statement made, a password notice fetched) were
    served to a cross-site <img> in an administrator's browser (no-cors GET: no Origin, no
    guard), so any page could write records in the administrator's name. Under /admin/ a
    request marked cross-site is 403 whatever its method; same-origin and non-browser clients
    (no Sec-Fetch-Site) still get the statement."""
    admin = _admin_ctx(sandbox)
    code = sandbox["facilities"][0]["institution_code"]
    statement = f"/admin/facilities/{code}/statements/2026-01"
    img = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    for path in (statement, f"{statement}?format=csv", "/admin/facilities"):
        r = request(gateway.port, "GET", path, ctx=admin, headers=img)
        assert r.status == 403, (path, r.body[:200])
        assert r.json()["code"] == "access_denied"
    for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
        r = request(gateway.port, "GET", statement, ctx=admin, headers=headers)
        assert r.status == 200, (headers, r.body[:200])


def _serving_line(srv: Server) -> str:
    """The start-up line, logged right after the port opened (a client may be faster)."""

    def lines() -> list[str]:
        return [x for x in srv.logs().splitlines() if "serving https://" in x]

    assert wait_until(lambda: bool(lines()), 5), srv.logs()[-2000:]
    return lines()[0]


def test_the_gateway_runs_on_uvloop_by_default(gateway: Server) -> None:
    """``server.event_loop`` defaults to uvloop: the start-up line names the loop running."""
    line = _serving_line(gateway)
    assert "event loop uvloop" in line, line


def test_the_standard_event_loop_serves_the_same(
    sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    """``server.event_loop = "asyncio"`` (the fallback): mTLS refusals in the handshake and a
    CSC call answered as on uvloop."""
    env = {"HPKI_GATEWAY_SERVER__EVENT_LOOP": "asyncio", "HPKI_GATEWAY_TEST_TSA__ENABLED": "false"}
    with serving(Path(sandbox["config"]), env=env) as srv:
        line = _serving_line(srv)
        assert "event loop asyncio" in line, line
        _handshake_refused(srv.port, client_context(sandbox["server_ca"]), hospital_ctx)
        r = request(srv.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
        assert r.status == 200, r.body
        assert r.json()["region"] == "JP"


def test_every_answer_carries_the_hardening_headers(
    gateway: Server, hospital_ctx: ssl.SSLContext
) -> None:
    """nosniff on every answer of the mTLS listener, and no-store on errors (a problem+json
    that repeats the path and names the certificate). Before, an error answer had neither."""
    ok = request(gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
    missing = request(gateway.port, "GET", "/no/such/route", ctx=hospital_ctx)
    assert (ok.status, missing.status) == (200, 404)
    for r in (ok, missing):
        assert r.headers["x-content-type-options"] == "nosniff"
    assert missing.headers["cache-control"] == "no-store"
    assert missing.headers["content-type"].startswith("application/problem+json")
