"""Renewal by the facility's own system: EST (RFC 7030) on the running gateway's mTLS listener.

Clients nobody here wrote: ``openssl req`` makes the key and the request, ``curl`` authenticates
with the facility's current certificate and posts it, ``openssl pkcs7`` / ``x509`` / ``verify``
read the answer. Then our own ``hpki-gateway client renew`` against the same gateway (real
process, real time), and across the whole window with an injected clock (the gateway app in
this process on a real TLS socket, sharing the clock).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509

from gateway.app import create_app
from gateway.audit import AuditLog
from gateway.clock import add_months, days_left
from gateway.config import load_settings
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.facilities import FacilityRegistry
from gateway.lifecycle.renewal_client import EXIT_OK, EXIT_RENEWED, ClientFiles, renew
from gateway.server import make_ssl_context
from gateway.store.db import Database
from tests.support.gateway import Server, run_cli
from tests.support.lifecycle import FakeClock

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

_codes = iter(range(2719000001, 2719000999))


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run `make test` (scripts/bootstrap.sh)")


def _service(
    sandbox: dict[str, Any], clock: FakeClock
) -> tuple[Database, ClientCertificateService]:
    settings = load_settings(sandbox["config"], environ={})
    db = Database(settings.database_url())
    audit = AuditLog(key=(Path(sandbox["dir"]) / "secrets" / "audit.key").read_bytes().strip())
    svc = ClientCertificateService(
        settings=settings,
        db=db,
        audit=audit,
        registry=FacilityRegistry(db=db, audit=audit, clock=clock),
        clock=clock,
    )
    return db, svc


def facility_expiring_in(sandbox: dict[str, Any], days: int, out: Path) -> tuple[str, Path]:
    """A new facility whose certificate (files in ``out``) expires ``days`` days from now."""
    code = str(next(_codes))
    now = datetime.now(UTC)
    issued = add_months(now + timedelta(days=days), -39)

    async def go() -> None:
        clock = FakeClock(issued)
        db, svc = _service(sandbox, clock)
        try:
            await svc.registry.add(
                institution_code=code, name=f"TEST clinic {code}", kind="clinic", actor="test"
            )
            await svc.issue(code, actor="test", hand_over_dir=out)
        finally:
            await db.close()

    asyncio.run(go())
    return code, out


def curl(sandbox: dict[str, Any], port: int, path: str, d: Path, *extra: str) -> tuple[int, bytes]:
    res = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            sandbox["server_ca"],
            "--cert",
            str(d / "client.pem"),
            "--key",
            str(d / "client.key"),
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            *extra,
            f"https://localhost:{port}{path}",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    body, _, status = res.stdout.rpartition(b"\n")
    return int(status), body


def openssl_req(tmp: Path, name: str, *args: str) -> Path:
    """``openssl req`` makes a key and a DER request; the request is base64 (RFC 7030)."""
    der = tmp / f"{name}.der"
    subprocess.run(
        ["openssl", "req", "-new", "-nodes", "-outform", "DER", "-out", str(der), *args],
        check=True,
        capture_output=True,
    )
    b64 = tmp / f"{name}.b64"
    b64.write_bytes(base64.encodebytes(der.read_bytes()))
    return b64


def post_csr(sandbox: dict[str, Any], port: int, d: Path, b64: Path) -> tuple[int, bytes]:
    return curl(
        sandbox,
        port,
        "/.well-known/est/simplereenroll",
        d,
        "-X",
        "POST",
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        f"@{b64}",
    )


def pkcs7_certs(b64_body: bytes, tmp: Path) -> str:
    p7 = tmp / "answer.p7"
    p7.write_bytes(base64.b64decode(b64_body))
    return subprocess.run(
        ["openssl", "pkcs7", "-inform", "DER", "-in", str(p7), "-print_certs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def refusals(sandbox: dict[str, Any], code: str) -> list[dict[str, Any]]:
    settings = load_settings(sandbox["config"], environ={})
    path = settings.database_url().split("///", 1)[1]
    with sqlite3.connect(path) as c:
        rows = c.execute(
            "SELECT detail FROM audit_event WHERE action = 'client_certificate.renewal_refused' "
            "AND facility_code = ?",
            (code,),
        ).fetchall()
    return [json.loads(r[0]) for r in rows]


def test_cacerts_and_simplereenroll_with_openssl_and_curl(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    _require("curl", "openssl")
    code, d = facility_expiring_in(sandbox, 30, tmp_path / "cur")
    settings = load_settings(sandbox["config"], environ={})
    ca_pem = str(settings.pki.facility_ca_cert)

    status, body = curl(sandbox, gateway.port, "/.well-known/est/cacerts", d)
    assert status == 200, body
    ca = x509.load_pem_x509_certificate(Path(ca_pem).read_bytes())
    assert ca.subject.rfc4514_string() in _subjects(pkcs7_certs(body, tmp_path))

    # Bad requests first (each refused with its reason and audited), then the good one.
    subj = f"/C=JP/CN=TEST clinic {code}/serialNumber={code}"
    cases = [
        (
            openssl_req(
                tmp_path,
                "weak",
                "-newkey",
                "rsa:1024",
                "-keyout",
                str(tmp_path / "w.key"),
                "-subj",
                subj,
            ),
            400,
            "1024 bits",
        ),
        (
            openssl_req(
                tmp_path,
                "other",
                "-newkey",
                "rsa:2048",
                "-keyout",
                str(tmp_path / "o.key"),
                "-subj",
                f"/C=JP/CN=TEST clinic {code}/serialNumber=1319999999",
            ),
            400,
            "names institution code 1319999999",
        ),
        (
            openssl_req(
                tmp_path,
                "san",
                "-newkey",
                "rsa:2048",
                "-keyout",
                str(tmp_path / "s.key"),
                "-subj",
                subj,
                "-addext",
                "subjectAltName=DNS:gateway.example",
            ),
            400,
            "subjectAltName",
        ),
        (
            openssl_req(
                tmp_path,
                "ca",
                "-newkey",
                "rsa:2048",
                "-keyout",
                str(tmp_path / "c.key"),
                "-subj",
                subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ),
            400,
            "CA certificate",
        ),
        (
            openssl_req(tmp_path, "reuse", "-key", str(d / "client.key"), "-subj", subj),
            409,
            "already certified",
        ),
    ]
    for b64, want_status, want_text in cases:
        status, body = post_csr(sandbox, gateway.port, d, b64)
        assert status == want_status, body
        assert want_text in json.loads(body)["detail"], body
    status, body = curl(
        sandbox,
        gateway.port,
        "/.well-known/est/simplereenroll",
        d,
        "-X",
        "POST",
        "-H",
        "Content-Type: text/plain",
        "--data-binary",
        "x",
    )
    assert status == 415, body
    assert len(refusals(sandbox, code)) == len(cases)

    good = openssl_req(
        tmp_path,
        "good",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-keyout",
        str(tmp_path / "new.key"),
        "-subj",
        subj,
    )
    status, body = post_csr(sandbox, gateway.port, d, good)
    assert status == 200, body
    new_pem = pkcs7_certs(body, tmp_path)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    (new_dir / "client.pem").write_text(new_pem)
    shutil.copy(tmp_path / "new.key", new_dir / "client.key")
    subprocess.run(
        ["openssl", "verify", "-CAfile", ca_pem, str(new_dir / "client.pem")],
        check=True,
        capture_output=True,
    )
    new = x509.load_pem_x509_certificate(new_pem.encode())
    old = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
    assert new.subject == old.subject
    assert days_left(new.not_valid_after_utc, datetime.now(UTC)) > 1000
    # The new certificate works at once; the old one overlaps, and cannot renew again.
    status, body = curl(sandbox, gateway.port, "/facility/applications", new_dir)
    assert status == 200, body
    status, body = curl(sandbox, gateway.port, "/facility/applications", d)
    assert status == 200, body
    again = openssl_req(
        tmp_path, "again", "-newkey", "rsa:2048", "-keyout", str(tmp_path / "a.key"), "-subj", subj
    )
    status, body = post_csr(sandbox, gateway.port, d, again)
    assert status == 409 and "already replaced" in json.loads(body)["detail"], body
    # A certificate far from expiry is refused with the date the window opens.
    status, body = post_csr(sandbox, gateway.port, new_dir, again)
    assert status == 409 and "renewal opens 90 days before" in json.loads(body)["detail"], body


def _subjects(pem_text: str) -> str:
    return " ".join(
        x509.load_pem_x509_certificate(b).subject.rfc4514_string()
        for b in [
            ("-----BEGIN CERTIFICATE-----" + part).encode()
            for part in pem_text.split("-----BEGIN CERTIFICATE-----")[1:]
        ]
    )


def test_client_renew_command_against_the_running_gateway(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    _require("openssl")
    _, d = facility_expiring_in(sandbox, 20, tmp_path / "sys")
    old_pem = (d / "client.pem").read_bytes()
    old_key = (d / "client.key").read_bytes()
    args = [
        "client",
        "renew",
        "--url",
        f"https://localhost:{gateway.port}",
        "--cert",
        str(d / "client.pem"),
        "--key",
        str(d / "client.key"),
        "--ca",
        sandbox["server_ca"],
        "--json",
    ]
    res = run_cli(*args, check=False)
    assert res.returncode == EXIT_RENEWED, res.stderr + res.stdout
    report = json.loads(res.stdout)
    assert report["renewed"] and report["days_left"] == 20
    old_serial = format(x509.load_pem_x509_certificate(old_pem).serial_number, "x")
    assert (d / f"client.pem.{old_serial}.bak").read_bytes() == old_pem
    assert (d / f"client.key.{old_serial}.bak").read_bytes() == old_key
    assert (d / "client.key").stat().st_mode & 0o777 == 0o600
    new = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
    assert format(new.serial_number, "x") == report["new_serial"]
    # The renewed files are what the next run (and the facility's TLS) uses: nothing to do.
    res = run_cli(*args, check=False)
    assert res.returncode == EXIT_OK, res.stderr + res.stdout
    assert json.loads(res.stdout)["renewed"] is False
    # openssl agrees that the new key and certificate belong together.
    pubs = [
        subprocess.run(
            ["openssl", *cmd, str(d / name)], capture_output=True, text=True, check=True
        ).stdout
        for cmd, name in (
            (["x509", "-noout", "-pubkey", "-in"], "client.pem"),
            (["pkey", "-pubout", "-in"], "client.key"),
        )
    ]
    assert pubs[0] == pubs[1] and "PUBLIC KEY" in pubs[0]


@asynccontextmanager
async def in_process_gateway(config: str, clock: FakeClock) -> AsyncIterator[int]:
    """The gateway app (create_app) on a real TLS socket in this process, on ``clock``."""
    settings = load_settings(config, environ={"HPKI_GATEWAY_SCHEDULER__ENABLED": "false"})
    app = create_app(settings, clock=clock)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=make_ssl_context(settings))
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_client_renew_across_the_whole_window_with_an_injected_clock(
    sandbox: dict[str, Any], tmp_path: Path
) -> None:
    # Real time is 100 days before expiry (TLS checks the certificate against it); the
    # injected clock walks the gateway and the client from 95 days before expiry to the end.
    code, d = await asyncio.to_thread(facility_expiring_in, sandbox, 100, tmp_path / "sys")
    expiry = x509.load_pem_x509_certificate((d / "client.pem").read_bytes()).not_valid_after_utc
    files = ClientFiles(
        cert=d / "client.pem", key=d / "client.key", server_ca=Path(sandbox["server_ca"])
    )
    clock = FakeClock(expiry - timedelta(days=95))
    seen: dict[int, tuple[int, str | None]] = {}
    async with in_process_gateway(sandbox["config"], clock) as port:
        url = f"https://localhost:{port}"
        # Asking before the gateway's window opens is refused, and the files stay.
        early = await asyncio.to_thread(renew, url, files, renew_within=120, clock=clock)
        assert early.exit_code == 1 and "renewal opens" in (early.error or "")
        assert not early.renewed and not list(d.glob("*.bak"))
        for _ in range(96):
            left = days_left(expiry, clock())
            r = await asyncio.to_thread(renew, url, files, renew_within=5, clock=clock)
            seen[left] = (r.exit_code, r.warning)
            clock.advance(days=1)
    warned = sorted((left for left, (_, w) in seen.items() if w), reverse=True)
    assert warned == [90, 60, 30, 15, 7, 6, 5]
    assert "あと90日" in (seen[90][1] or "") and "5日前から自動更新" in (seen[90][1] or "")
    assert "本日、自動更新" in (seen[5][1] or "")
    renewed = [left for left, (code_, _) in seen.items() if code_ == EXIT_RENEWED]
    assert renewed == [5]
    assert all(c == EXIT_OK for left, (c, _) in seen.items() if left != 5)
    new = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
    assert new.not_valid_after_utc > expiry + timedelta(days=365 * 3)
    # The gateway recorded the renewal: the old certificate overlaps, the fee is charged.
    db, svc = _service(sandbox, clock)
    try:
        status = await svc.status(code)
        fac = await svc.registry.get(code)
    finally:
        await db.close()
    old, current = status["certificates"]
    # renewed 5 days before expiry: revoked one month after the renewal, so it ran out first
    assert old["status"] == "expired" and old["revoke_at"] is not None
    assert datetime.fromisoformat(old["revoke_at"]) > expiry
    assert current["status"] == "active" and current["serial"] == format(new.serial_number, "x")
    assert fac.auto_renewal


def test_a_revoked_certificate_cannot_renew(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    _require("curl", "openssl")
    code, d = facility_expiring_in(sandbox, 30, tmp_path / "rev")
    serial = format(
        x509.load_pem_x509_certificate((d / "client.pem").read_bytes()).serial_number, "x"
    )

    async def revoke() -> None:
        db, svc = _service(sandbox, FakeClock(datetime.now(UTC)))
        try:
            await svc.revoke(serial, reason="key compromise (test)", actor="test")
        finally:
            await db.close()

    asyncio.run(revoke())
    csr = openssl_req(
        tmp_path,
        "r",
        "-newkey",
        "rsa:2048",
        "-keyout",
        str(tmp_path / "r.key"),
        "-subj",
        f"/C=JP/CN=TEST clinic {code}/serialNumber={code}",
    )
    status, body = post_csr(sandbox, gateway.port, d, csr)
    assert status == 403 and "was revoked" in json.loads(body)["detail"], body


async def test_a_renewal_whose_answer_was_lost_completes_on_the_next_run(
    sandbox: dict[str, Any], tmp_path: Path
) -> None:
    """The gateway certified the key of a client run, but the answer never arrived (the
    connection dropped after the commit): that run's key waits in ``<key>.<serial>.pending``.
    Before, the next run made another key and the gateway refused it for good (409: the
    certificate was replaced), the facility's system then holding a certificate revoked a month
    later; now the next run asks again for the pending key, the gateway answers with the
    certificate it issued, and the run installs it."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.lifecycle.renewal_client import pending_key_path

    code, d = await asyncio.to_thread(facility_expiring_in, sandbox, 100, tmp_path / "sys")
    old = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
    files = ClientFiles(
        cert=d / "client.pem", key=d / "client.key", server_ca=Path(sandbox["server_ca"])
    )
    clock = FakeClock(old.not_valid_after_utc - timedelta(days=30))
    # The lost run: its key kept, its request committed by the gateway.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pending = pending_key_path(files, old)
    pending.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(old.subject).sign(key, hashes.SHA256())
    )
    db, svc = _service(sandbox, clock)
    try:
        issued, _ = await svc.renew_from_request(
            format(old.serial_number, "x"),
            csr.public_bytes(serialization.Encoding.DER),
            actor=f"facility:{code}",
            facility_code=code,
        )
    finally:
        await db.close()
    async with in_process_gateway(sandbox["config"], clock) as port:
        r = await asyncio.to_thread(renew, f"https://localhost:{port}", files, clock=clock)
    assert r.exit_code == EXIT_RENEWED, r.error
    assert r.new_serial == format(issued.serial_number, "x")
    assert x509.load_pem_x509_certificate((d / "client.pem").read_bytes()) == issued
    installed = serialization.load_pem_private_key((d / "client.key").read_bytes(), None)
    assert installed.public_key() == key.public_key()
    assert not pending.exists()
