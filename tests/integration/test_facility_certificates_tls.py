"""Facility certificates against the running gateway: real TLS, real processes, real tools.

The admin API issues; the delivery listener serves the one-time download; ``openssl pkcs12``
and cryptography open the PKCS#12; ``curl`` uses it as a client certificate; poppler renders the
password notice. Certificates dated in the past come from the in-process service with an
injected clock, registered in the same store the gateway reads.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.audit import AuditLog
from gateway.clock import add_months, days_left, jst_date
from gateway.config import load_settings
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.facilities import FacilityRegistry
from gateway.store.db import Database
from tests.support.gateway import (
    Server,
    client_context,
    request,
    run_cli,
    serving_with_delivery,
)
from tests.support.lifecycle import FakeClock, download_password, notice_text

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

STATUS_KEYS = {
    "serial",
    "terminal",
    "status",
    "issued",
    "expires",
    "downloaded_at",
    "revoke_at",
    "revoked_at",
    "reason",
    "last_used",
}


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run `make test` (scripts/bootstrap.sh)")


@pytest.fixture(scope="module")
def delivery_gateway(sandbox: dict[str, Any]) -> Iterator[tuple[Server, int]]:
    with serving_with_delivery(Path(sandbox["config"])) as served:
        yield served


@pytest.fixture(scope="module")
def admin_ctx(sandbox: dict[str, Any]) -> ssl.SSLContext:
    a = sandbox["admin"]
    return client_context(sandbox["server_ca"], a["client_cert"], a["client_key"])


def _in_process(
    sandbox: dict[str, Any], clock: FakeClock
) -> tuple[Database, ClientCertificateService]:
    settings = load_settings(sandbox["config"], environ={})
    db = Database(settings.database_url())
    audit = AuditLog(key=(Path(sandbox["dir"]) / "secrets" / "audit.key").read_bytes().strip())
    svc = ClientCertificateService(
        settings=settings,
        db=db,
        audit=audit,
        registry=FacilityRegistry(db=db, audit=audit),
        clock=clock,
    )
    return db, svc


def _issue_at(
    sandbox: dict[str, Any], code: str, when: datetime, out: Path, *, rotate: bool = False
) -> dict[str, Any]:
    """Register a facility and issue (and optionally rotate) at a past time, files in ``out``."""

    async def go() -> dict[str, Any]:
        clock = FakeClock(when)
        db, svc = _in_process(sandbox, clock)
        try:
            await svc.registry.add(
                institution_code=code,
                name=f"TEST clinic {code}",
                kind="clinic",
                actor="t",
                now=when,
            )
            first = await svc.issue(code, actor="test", hand_over_dir=out / "first")
            second = None
            if rotate:
                second = await svc.rotate(code, actor="test", hand_over_dir=out / "second")
            return {"first": first, "second": second}
        finally:
            await db.close()

    return asyncio.run(go())


def _ctx(sandbox: dict[str, Any], d: Path) -> ssl.SSLContext:
    return client_context(sandbox["server_ca"], str(d / "client.pem"), str(d / "client.key"))


def test_issue_deliver_download_and_use_the_p12_with_curl(
    delivery_gateway: tuple[Server, int],
    admin_ctx: ssl.SSLContext,
    sandbox: dict[str, Any],
    tmp_path: Path,
) -> None:
    _require("curl", "openssl", "pdftoppm", "pdftotext")
    srv, dport = delivery_gateway
    r = request(
        srv.port,
        "POST",
        "/admin/facilities",
        ctx=admin_ctx,
        json_body={
            "institution_code": "0310000016",
            "name": "TEST 盛岡クリニック",
            "kind": "clinic",
        },
    )
    assert r.status == 201, r.body
    r = request(
        srv.port, "POST", "/admin/facilities/0310000016/certificates", ctx=admin_ctx, json_body={}
    )
    assert r.status == 201, r.body
    issued = r.json()
    assert "p12_password" not in r.body.decode() and "hand_over" not in issued
    serial, url = issued["serial"], issued["download_url"]
    assert url.startswith(f"https://localhost:{dport}/download/")
    box = Path(sandbox["dir"]) / "outbox" / "0310000016" / serial
    assert Path(issued["outbox"]) == box
    # The printed half: the notice PDF, fetched through the admin API, rendered by poppler.
    r = request(srv.port, "GET", f"/admin/certificates/{serial}/password-notice", ctx=admin_ctx)
    assert r.status == 200 and r.headers["content-type"] == "application/pdf"
    pdf = tmp_path / "notice.pdf"
    pdf.write_bytes(r.body)
    text = notice_text(pdf)
    assert serial in text and "クライアント証明書パスワード通知書" in text
    assert "TEST 盛岡クリニック" in text and "0310000016" in text
    subprocess.run(["pdftoppm", "-r", "60", "-png", str(pdf), str(tmp_path / "notice")], check=True)
    png = tmp_path / "notice-1.png"
    assert png.stat().st_size > 10_000  # a page with text, not a blank
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    p12_pwd = lines[lines.index("クライアント証明書パスワード") + 1]
    # The mailed half: the download password, from its own mail in the outbox.
    dl_pwd = download_password(box)
    curl = ["curl", "-sS", "--cacert", sandbox["server_ca"]]
    page = subprocess.run([*curl, url], capture_output=True, text=True, check=True).stdout
    assert 'type="password"' in page
    wrong = subprocess.run(
        [*curl, "-F", "password=nope", url], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(wrong)["code"] == "wrong_password"
    assert "4 attempts left" in json.loads(wrong)["detail"]
    p12_file = tmp_path / "client.hpki-gateway.p12"
    out = subprocess.run(
        [*curl, "-f", "-F", f"password={dl_pwd}", "-o", str(p12_file), "-D", "-", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'filename="client.hpki-gateway.p12"' in out
    again = subprocess.run(
        [*curl, "-o", "/dev/null", "-w", "%{http_code}", "-F", f"password={dl_pwd}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert again == "410"
    # openssl and cryptography open it with the password from the notice.
    certs = subprocess.run(
        ["openssl", "pkcs12", "-in", str(p12_file), "-passin", f"pass:{p12_pwd}", "-nokeys"],
        capture_output=True,
        check=True,
    ).stdout.decode(errors="replace")
    assert "serialNumber=0310000016" in certs.replace(" = ", "=")
    keys = subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-in",
            str(p12_file),
            "-passin",
            f"pass:{p12_pwd}",
            "-nocerts",
            "-nodes",
        ],
        capture_output=True,
        check=True,
    ).stdout.decode(errors="replace")
    assert "PRIVATE KEY" in keys
    key, cert, _ = pkcs12.load_key_and_certificates(p12_file.read_bytes(), p12_pwd.encode())
    assert key is not None and cert is not None and format(cert.serial_number, "x") == serial
    # curl uses it as the client certificate against the running gateway.
    info = subprocess.run(
        [
            *curl,
            "-f",
            "--cert-type",
            "P12",
            "--cert",
            f"{p12_file}:{p12_pwd}",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
            f"https://localhost:{srv.port}/csc/v2/info",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(info)["region"] == "JP"
    # The status records the download (and the use).
    r = request(srv.port, "GET", "/admin/facilities/0310000016", ctx=admin_ctx)
    st = r.json()
    assert set(st) >= {"institution_code", "name", "certificates"}
    (c,) = st["certificates"]
    assert set(c) == STATUS_KEYS
    assert c["serial"] == serial and c["status"] == "active" and c["downloaded_at"]
    assert c["last_used"] is not None
    # The delivery listener serves nothing else.
    for path in ("/health", "/admin/facilities", "/csc/v2/info"):
        code = subprocess.run(
            [*curl, "-o", "/dev/null", "-w", "%{http_code}", f"https://localhost:{dport}{path}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert code in ("404", "405"), (path, code)


def test_admin_api_is_for_admins_only_and_audited(
    delivery_gateway: tuple[Server, int],
    admin_ctx: ssl.SSLContext,
    hospital_ctx: ssl.SSLContext,
    sandbox: dict[str, Any],
) -> None:
    srv, _ = delivery_gateway
    r = request(srv.port, "GET", "/admin/facilities/1310000011", ctx=hospital_ctx)
    assert r.status == 403 and r.json()["code"] == "access_denied"
    assert r.headers["content-type"].startswith("application/problem+json")
    r = request(srv.port, "POST", "/csc/v2/info", ctx=admin_ctx, json_body={})
    assert r.status == 403 and r.json()["error"] == "access_denied"
    r = request(srv.port, "GET", "/admin/facilities", ctx=admin_ctx)
    assert r.status == 200 and any(
        f["institution_code"] == "1310000011" for f in r.json()["facilities"]
    )
    cases = [
        (
            "POST",
            "/admin/facilities",
            {"institution_code": "4810000011", "name": "x", "kind": "clinic"},
            400,
            "prefecture 48",
        ),
        (
            "POST",
            "/admin/facilities",
            {"institution_code": "0510000014", "name": "x", "kind": "clinic", "colour": 1},
            400,
            "colour",
        ),
        ("POST", "/admin/facilities/1310000011/certificates", {}, 409, "one per facility"),
        ("GET", "/admin/facilities/0999999999", None, 404, "not registered"),
        ("POST", "/admin/certificates/zz/revoke", {"reason": "x"}, 400, "not hexadecimal"),
        ("POST", "/admin/certificates/abc123/revoke", {"reason": "x"}, 404, "not registered"),
        (
            "POST",
            "/admin/certificates/abc123/revoke",
            {"reason": "x", "with_renewals": True},
            404,
            "not registered",
        ),
        (
            "POST",
            "/admin/certificates/abc123/revoke",
            {"reason": "x", "with_renewals": "yes"},
            400,
            "with_renewals",
        ),
        ("GET", "/admin/certificates/expiring?within=abc", None, 400, "within"),
    ]
    for method, path, body, status, needle in cases:
        r = request(srv.port, method, path, ctx=admin_ctx, json_body=body)
        assert r.status == status, (path, r.body)
        assert needle in r.json()["detail"], r.json()
    r = request(
        srv.port,
        "POST",
        "/admin/facilities",
        ctx=admin_ctx,
        json_body={"institution_code": "0510000014", "name": "TEST 監査医院", "kind": "clinic"},
    )
    assert r.status == 201
    r = request(
        srv.port,
        "POST",
        "/admin/facilities/0510000014/stop",
        ctx=admin_ctx,
        json_body={"reason": "閉院"},
    )
    assert r.status == 200 and r.json()["status"] == "stopped"
    db = Path(sandbox["dir"]) / "data" / "gateway.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT action, actor FROM audit_event WHERE facility_code = '0510000014' ORDER BY seq"
        ).fetchall()
    assert rows == [
        ("facility.add", "admin:sandbox-officer"),
        ("facility.stop", "admin:sandbox-officer"),
    ]


def test_expired_certificate_fails_the_tls_handshake(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    issued = _issue_at(sandbox, "0410000015", add_months(now, -40), tmp_path)["first"]
    cert = x509.load_pem_x509_certificate((tmp_path / "first" / "client.pem").read_bytes())
    assert cert.not_valid_after_utc < now, issued
    try:
        r = request(
            gateway.port,
            "POST",
            "/csc/v2/info",
            ctx=_ctx(sandbox, tmp_path / "first"),
            json_body={},
        )
    except (ssl.SSLError, ConnectionError, OSError):
        return
    raise AssertionError(f"an expired client certificate got HTTP {r.status}")


def test_expiry_header_within_90_days(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    _issue_at(sandbox, "0610000013", add_months(now + timedelta(days=42), -39), tmp_path)
    ctx = _ctx(sandbox, tmp_path / "first")
    not_after = x509.load_pem_x509_certificate(
        (tmp_path / "first" / "client.pem").read_bytes()
    ).not_valid_after_utc
    r = request(gateway.port, "POST", "/csc/v2/info", ctx=ctx, json_body={})
    assert r.status == 200
    left = days_left(not_after, datetime.now(UTC))
    assert 40 <= left <= 43
    assert (
        r.headers["x-client-certificate-expires"]
        == f"{jst_date(not_after).isoformat()}; days-left={left}"
    )
    # Also on an error response to that facility; never for a certificate far from expiry.
    r = request(gateway.port, "POST", "/csc/v2/credentials/info", ctx=ctx, json_body={})
    assert r.status == 400 and "x-client-certificate-expires" in r.headers
    r = request(gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
    assert "x-client-certificate-expires" not in r.headers
    res = run_cli("facility", "expiring", "--within", "60", "--json", "-c", sandbox["config"])
    items = json.loads(res.stdout)
    mine = [c for c in items if c["institution_code"] == "0610000013"]
    assert len(mine) == 1 and mine[0]["days_left"] == left
    assert all(c["institution_code"] != "1310000011" for c in items)


def test_rotation_through_the_gateway_then_scheduled_revocation(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    _require("openssl")
    now = datetime.now(UTC)
    out = _issue_at(
        sandbox, "0710000012", add_months(now, -1) - timedelta(hours=1), tmp_path, rotate=True
    )
    old, new = out["first"], out["second"]
    # Issued a month and an hour ago: the old certificate's month of overlap is over.
    r = request(
        gateway.port, "POST", "/csc/v2/info", ctx=_ctx(sandbox, tmp_path / "first"), json_body={}
    )
    assert r.status == 403
    desc = r.json()["error_description"]
    assert "(scheduled)" in desc and f"replaced by {new.serial} (renewal)" in desc
    r = request(
        gateway.port, "POST", "/csc/v2/info", ctx=_ctx(sandbox, tmp_path / "second"), json_body={}
    )
    assert r.status == 200
    run_cli("scheduler", "run-once", "--json", "-c", sandbox["config"])
    st = json.loads(
        run_cli("facility", "status", "0710000012", "--json", "-c", sandbox["config"]).stdout
    )
    by = {c["serial"]: c for c in st["certificates"]}
    assert by[old.serial]["status"] == "revoked" and by[new.serial]["status"] == "active"
    assert all(set(c) == STATUS_KEYS for c in st["certificates"])
    text = run_cli("facility", "status", "0710000012", "-c", sandbox["config"]).stdout
    assert f"revoked {by[old.serial]['revoked_at'][:10]}" in text
    crl = subprocess.run(
        [
            "openssl",
            "crl",
            "-inform",
            "DER",
            "-in",
            sandbox["crls"]["facility-client-ca"],
            "-noout",
            "-text",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert format(int(old.serial, 16), "X").zfill(2) in crl.replace(":", "").upper()
    assert "Superseded" in crl
    with sqlite3.connect(Path(sandbox["dir"]) / "data" / "gateway.db") as conn:
        n = conn.execute(
            "SELECT count(*) FROM audit_event WHERE action = 'client_certificate.revoke_scheduled' "
            "AND detail LIKE ?",
            (f'%"{old.serial}"%',),
        ).fetchone()[0]
    assert n == 1


def test_concurrent_download_guesses_are_reserved_before_checking(
    delivery_gateway: tuple[Server, int],
    admin_ctx: ssl.SSLContext,
    sandbox: dict[str, Any],
) -> None:
    """30 guesses at once, one right: at most max_download_attempts (5) are ever checked; all
    the others, and any guess after the lock, get the same 423, so the right one is not
    revealed by a different answer."""
    import threading
    import urllib.parse

    srv, dport = delivery_gateway
    code = "0810000018"
    r = request(
        srv.port,
        "POST",
        "/admin/facilities",
        ctx=admin_ctx,
        json_body={"institution_code": code, "name": "TEST 同時医院", "kind": "clinic"},
    )
    assert r.status == 201, r.body
    r = request(
        srv.port, "POST", f"/admin/facilities/{code}/certificates", ctx=admin_ctx, json_body={}
    )
    assert r.status == 201, r.body
    issued = r.json()
    path = urllib.parse.urlsplit(issued["download_url"]).path
    box = Path(sandbox["dir"]) / "outbox" / code / issued["serial"]
    right = download_password(box)
    ctx = client_context(sandbox["server_ca"])
    results: dict[int, tuple[int, str]] = {}
    start = threading.Barrier(30)

    def guess(i: int) -> None:
        pw = right if i == 25 else f"wrong{i:02d}"
        start.wait()
        resp = request(
            dport,
            "POST",
            path,
            ctx=ctx,
            body=urllib.parse.urlencode({"password": pw}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        detail = "" if resp.status == 200 else resp.json()["detail"]
        results[i] = (resp.status, detail)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [st for st, _ in results.values()]
    assert len(statuses) == 30
    assert 409 not in statuses, results
    assert set(statuses) <= {200, 403, 410, 423}, results
    # A guess that reaches the gateway after the right one has downloaded the file (a slow
    # TLS handshake on a busy machine) finds it gone: 410, as every guess afterwards does.
    gone = {d for st, d in results.values() if st == 410}
    assert not gone or results[25][0] == 200, results
    assert all(d.startswith("this certificate file was already downloaded") for d in gone)
    checked = [i for i, (st, _) in results.items() if st in (200, 403)]
    assert len(checked) <= 5, results
    locked = {d for st, d in results.values() if st == 423}
    assert len(locked) == 1, results
    # Whatever happened, now every guess (the right one included) answers the same.
    after = [
        request(
            dport,
            "POST",
            path,
            ctx=ctx,
            body=urllib.parse.urlencode({"password": pw}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        for pw in (right, "wrong-after")
    ]
    if results[25][0] == 200:
        assert [a.status for a in after] == [410, 410]
    else:
        assert [a.status for a in after] == [423, 423]
        assert {a.json()["detail"] for a in after} == locked
