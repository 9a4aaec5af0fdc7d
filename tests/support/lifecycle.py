"""In-process lifecycle world: a real SQLite store, a real facility CA, an injectable clock.

Each call of :func:`services` builds fresh service objects over a fresh engine, which is what a
restart (or another worker) looks like to the store.
"""

from __future__ import annotations

import email
import email.policy
import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

from gateway.audit import AuditLog
from gateway.config import Settings, load_settings
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.facilities import FacilityRegistry
from gateway.lifecycle.scheduler import Scheduler
from gateway.sandbox import testworld
from gateway.store.db import Database

CA_EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand; never sleeps."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when

    def advance(self, **kw: float) -> None:
        self.now = self.now + timedelta(**kw)


def make_settings(
    tmp: Path, *, smtp_port: int | None = None, extra: str = "", store_url: str | None = None
) -> Settings:
    """Settings of a lifecycle world in ``tmp``; the store is a SQLite file there unless
    ``store_url`` names another (the ``store_url`` fixture: SQLite or PostgreSQL)."""
    url = store_url or f"sqlite+aiosqlite:///{tmp}/gw.db"
    ca = testworld.make_client_ca(now=CA_EPOCH)
    ca.write(tmp / "ca.pem", tmp / "ca.key")
    (tmp / "delivery.key").write_text(secrets.token_hex(32))
    smtp = f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\nsender = "gw@test.invalid"\n'
    (tmp / "gateway.toml").write_text(
        f"""
[server]
tls_cert = "unused.pem"
tls_key = "unused.key"
client_ca = "ca.pem"

[store]
url = "{url}"

[pki]
facility_ca_cert = "ca.pem"
facility_ca_key = "ca.key"
facility_crl = "facility.crl"

[certificates]
outbox_dir = "outbox"
delivery_key_file = "delivery.key"

[delivery]
public_url = "https://dl.test.invalid:9444"

{smtp if smtp_port else ""}
{extra}
""",
        encoding="utf-8",
    )
    return load_settings(tmp / "gateway.toml", environ={})


@dataclass
class Services:
    db: Database
    registry: FacilityRegistry
    certs: ClientCertificateService
    scheduler: Scheduler


@asynccontextmanager
async def services(
    settings: Settings, clock: FakeClock, *, busy_timeout_ms: int | None = None
) -> AsyncIterator[Services]:
    """The store (migrated), registry, certificate service and scheduler of ``settings``;
    ``busy_timeout_ms``: the store's SQLite busy time-out, when a test needs a short one."""
    db = (
        Database(settings.database_url())
        if busy_timeout_ms is None
        else Database(settings.database_url(), busy_timeout_ms=busy_timeout_ms)
    )
    await db.migrate()
    audit = AuditLog()
    registry = FacilityRegistry(db=db, audit=audit)
    certs = ClientCertificateService(
        settings=settings, db=db, audit=audit, registry=registry, clock=clock
    )
    try:
        yield Services(db, registry, certs, Scheduler(service=certs))
    finally:
        await db.close()


def notice_text(pdf: Path) -> str:
    """Text of the password notice, as poppler's pdftotext reads it (fails if absent)."""
    res = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    )
    return res.stdout


def p12_password_from_notice(pdf: Path) -> str:
    text = notice_text(pdf)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    i = next(i for i, ln in enumerate(lines) if ln == "クライアント証明書パスワード")
    return lines[i + 1]


def read_eml(path: Path) -> EmailMessage:
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def download_password(box: Path, round_prefix: str = "") -> str:
    body = read_eml(box / f"{round_prefix}mail-2-download-password.eml").get_content()
    m = re.search(r"ダウンロード用パスワード: (\S+)", body)
    assert m, body
    return m.group(1)


def download_token(box: Path, round_prefix: str = "") -> str:
    body = read_eml(box / f"{round_prefix}mail-1-download-link.eml").get_content()
    m = re.search(r"/download/([A-Za-z0-9_-]+)", body)
    assert m, body
    return m.group(1)
