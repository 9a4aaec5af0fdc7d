"""Peer certificate -> client identity (facility, administrator or vendor).

The TLS layer has already checked the chain to the client CA bundle and the validity period.
Here the certificate's SHA-256 fingerprint must be registered, not revoked, and its owner
active. The store is read on every call, so a revocation or suspension is immediate: one indexed
SELECT (``fingerprint_sha256`` is unique) in one transaction (``Database.run_read``). The
``last_used_at`` refresh (at most once a minute per certificate) is
written in the background (``Database.write_later``), never on the request's path.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, select, update

from gateway.errors import AccessDenied
from gateway.lifecycle.facilities import fingerprint
from gateway.store.db import Database
from gateway.store.fast import FastStatement
from gateway.store.schema import admin, client_certificate, facility, vendor

# last_used_at is a convenience for the status inquiry: refresh it at most this often per
# certificate, so the hot path does not write on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True, kw_only=True)
class ClientIdentity:
    kind: Literal["facility", "admin", "vendor"]
    certificate_serial: str
    fingerprint_sha256: str
    not_after: datetime
    facility_id: int | None = None
    institution_code: str | None = None
    facility_name: str | None = None
    admin_name: str | None = None
    vendor_id: int | None = None
    vendor_name: str | None = None

    @property
    def actor(self) -> str:
        """How this client is named in the audit log."""
        if self.kind == "admin":
            return f"admin:{self.admin_name}"
        if self.kind == "vendor":
            return f"vendor:{self.vendor_name}"
        return f"facility:{self.institution_code}"


_IDENTITY_QUERY = FastStatement(  # on the SQLite read connection (store/fast.py)
    select(
        client_certificate.c.id,
        client_certificate.c.fingerprint_sha256,
        client_certificate.c.serial_hex,
        client_certificate.c.status,
        client_certificate.c.revoke_at,
        client_certificate.c.revoked_at,
        client_certificate.c.revocation_reason,
        client_certificate.c.not_after,
        client_certificate.c.last_used_at,
        facility.c.id.label("facility_id"),
        facility.c.institution_code,
        facility.c.name.label("facility_name"),
        facility.c.status.label("facility_status"),
        facility.c.status_reason.label("facility_reason"),
        facility.c.status_changed_at.label("facility_changed"),
        admin.c.name.label("admin_name"),
        admin.c.status.label("admin_status"),
        vendor.c.id.label("vendor_id"),
        vendor.c.name.label("vendor_name"),
        vendor.c.status.label("vendor_status"),
    )
    .select_from(client_certificate.outerjoin(facility).outerjoin(admin).outerjoin(vendor))
    .where(client_certificate.c.fingerprint_sha256.in_(bindparam("fps", expanding=True)))
)


class _IdentityReader:
    """Shares one identity read among the requests waiting for it (per Database).

    A request's fingerprint waits for the next read; a read takes every fingerprint waiting
    when it starts, and starts after all of them arrived. So every request still sees the
    store as committed after it asked: nothing is cached, a revocation committed before a
    request's ``identify`` is always seen. Under load one SELECT serves every request that
    arrived while the previous read was running.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.waiting: dict[str, list[asyncio.Future[Any]]] = {}
        self.task: asyncio.Task[None] | None = None

    async def read(self, fp: str) -> Any:  # Row | None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.setdefault(fp, []).append(future)
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, {}
            try:
                rows = await self.db.run_read(functools.partial(_read_identities, sorted(batch)))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for futures in batch.values():
                    for f in futures:
                        if not f.done():
                            f.set_exception(e)
                continue
            for fp, futures in batch.items():
                for f in futures:
                    if not f.done():
                        f.set_result(rows.get(fp))


def _read_identities(fps: list[str], conn: Connection) -> dict[str, Any]:
    return {r.fingerprint_sha256: r for r in _IDENTITY_QUERY.all(conn, {"fps": fps})}


_readers: weakref.WeakKeyDictionary[Database, _IdentityReader] = weakref.WeakKeyDictionary()


def _reader(db: Database) -> _IdentityReader:
    reader = _readers.get(db)
    if reader is None:
        reader = _readers[db] = _IdentityReader(db)
    return reader


def _date(d: datetime | None) -> str:
    return d.astimezone(UTC).isoformat(timespec="seconds") if d else "an unknown date"


async def identify(db: Database, peer_der: bytes, *, now: datetime) -> ClientIdentity:
    """Map the peer certificate to an active client at ``now`` (the app's clock), or raise
    AccessDenied saying why not."""
    fp = fingerprint(peer_der)

    row = await _reader(db).read(fp)
    if row is None:
        raise AccessDenied(f"client certificate (SHA-256 {fp}) is not registered with this gateway")
    serial = row.serial_hex
    if row.status == "revoked":
        raise AccessDenied(
            f"client certificate {serial} was revoked on {_date(row.revoked_at)}: "
            f"{row.revocation_reason or 'no reason recorded'}"
        )
    if row.revoke_at is not None and row.revoke_at <= now:
        raise AccessDenied(
            f"client certificate {serial} was revoked on {_date(row.revoke_at)} "
            f"(scheduled): {row.revocation_reason or 'replaced by a newer certificate'}"
        )
    if row.not_after <= now:
        raise AccessDenied(f"client certificate {serial} expired on {_date(row.not_after)}")
    if row.institution_code is not None:
        if row.facility_status != "active":
            raise AccessDenied(
                f"facility {row.institution_code} is {row.facility_status} since "
                f"{_date(row.facility_changed)}: {row.facility_reason or 'no reason recorded'}"
            )
        ident = ClientIdentity(
            kind="facility",
            certificate_serial=serial,
            fingerprint_sha256=fp,
            not_after=row.not_after,
            facility_id=row.facility_id,
            institution_code=row.institution_code,
            facility_name=row.facility_name,
        )
    elif row.admin_name is not None:
        if row.admin_status != "active":
            raise AccessDenied(f"administrator {row.admin_name} is {row.admin_status}")
        ident = ClientIdentity(
            kind="admin",
            certificate_serial=serial,
            fingerprint_sha256=fp,
            not_after=row.not_after,
            admin_name=row.admin_name,
        )
    elif row.vendor_name is not None:
        if row.vendor_status != "active":
            raise AccessDenied(f"vendor {row.vendor_name} is {row.vendor_status}")
        ident = ClientIdentity(
            kind="vendor",
            certificate_serial=serial,
            fingerprint_sha256=fp,
            not_after=row.not_after,
            vendor_id=row.vendor_id,
            vendor_name=row.vendor_name,
        )
    else:  # pragma: no cover - the schema requires one owner; refuse rather than guess
        raise AccessDenied(f"client certificate {serial} has no owner")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        cert_id = int(row.id)

        def touch(conn: Connection) -> None:
            conn.execute(
                update(client_certificate)
                .where(client_certificate.c.id == cert_id)
                .values(last_used_at=now)
            )

        db.write_later(("client_certificate.last_used_at", cert_id), touch)
    return ident
