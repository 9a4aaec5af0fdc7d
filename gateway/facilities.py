"""Facility registry: facilities, their client certificates, and administrators.

Facilities are keyed by the 10-digit insurance institution code (都道府県 2 digits 01–47, fee table
1 医科 / 3 歯科 / 4 調剤, 7-digit institution number). Each registered client certificate maps,
by its SHA-256 fingerprint, to exactly one facility or administrator; the mTLS middleware looks
it up on every call, so a revocation or suspension takes effect at once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from gateway.audit import AuditLog
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.store.db import Database
from gateway.store.schema import admin, client_certificate, facility

FEE_TABLES = {"1": "medical", "3": "dental", "4": "pharmacy"}
FACILITY_KINDS = ("hospital", "clinic", "dental_clinic", "pharmacy")
_CODE_RE = re.compile(r"[0-9]{10}")  # ASCII only: \d also matches full-width digits


def validate_institution_code(code: str) -> str:
    """Return the code if it is a well-formed institution code, else raise InvalidRequest."""
    if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
        raise InvalidRequest(
            f"institution code {code!r} must be exactly 10 digits "
            "(prefecture 01-47, fee table 1/3/4, 7-digit number)"
        )
    pref = int(code[:2])
    if not 1 <= pref <= 47:
        raise InvalidRequest(f"institution code {code}: prefecture {code[:2]} is not 01-47")
    if code[2] not in FEE_TABLES:
        raise InvalidRequest(
            f"institution code {code}: fee table {code[2]} is not 1 (医科), 3 (歯科) or 4 (調剤)"
        )
    return code


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Facility:
    id: int
    institution_code: str
    name: str
    kind: str
    provisional: bool
    status: str
    status_reason: str | None
    status_changed_at: datetime | None
    policy: dict[str, Any]

    @classmethod
    def from_row(cls, r: Any) -> Facility:
        return cls(
            id=r.id,
            institution_code=r.institution_code,
            name=r.name,
            kind=r.kind,
            provisional=bool(r.provisional),
            status=r.status,
            status_reason=r.status_reason,
            status_changed_at=r.status_changed_at,
            policy=json.loads(r.policy or "{}"),
        )


class FacilityRegistry:
    """Registry operations; every change is audited in its own transaction."""

    def __init__(self, *, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    async def add(
        self,
        *,
        institution_code: str,
        name: str,
        kind: str,
        provisional: bool = False,
        actor: str,
        now: datetime | None = None,
    ) -> Facility:
        validate_institution_code(institution_code)
        if kind not in FACILITY_KINDS:
            raise InvalidRequest(
                f"facility kind {kind!r} is not one of {', '.join(FACILITY_KINDS)}"
            )
        if not name.strip():
            raise InvalidRequest("facility name must not be empty")
        fee = FEE_TABLES[institution_code[2]]
        if (kind == "pharmacy") != (fee == "pharmacy"):
            raise InvalidRequest(
                f"institution code {institution_code} has fee table {institution_code[2]} "
                f"({fee}), which does not fit a facility of kind {kind!r}"
            )
        now = now or datetime.now(UTC)
        async with self.db.write() as conn:
            try:
                res = await conn.execute(
                    insert(facility).values(
                        institution_code=institution_code,
                        name=name.strip(),
                        kind=kind,
                        provisional=provisional,
                        status="active",
                        policy="{}",
                        created_at=now,
                    )
                )
            except IntegrityError as e:
                raise Conflict(f"facility {institution_code} is already registered") from e
            await self.audit.append(
                conn,
                action="facility.add",
                actor=actor,
                facility_code=institution_code,
                detail={"name": name, "kind": kind, "provisional": provisional},
                now=now,
            )
            pk = res.inserted_primary_key
            assert pk is not None
            row = (await conn.execute(select(facility).where(facility.c.id == pk[0]))).one()
        return Facility.from_row(row)

    async def get(self, institution_code: str) -> Facility:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(facility).where(facility.c.institution_code == institution_code)
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"facility {institution_code} is not registered")
        return Facility.from_row(row)

    async def list_all(self) -> list[Facility]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(select(facility).order_by(facility.c.institution_code))
            ).all()
        return [Facility.from_row(r) for r in rows]

    async def set_status(
        self, institution_code: str, *, status: str, reason: str | None, actor: str
    ) -> Facility:
        if status not in ("active", "suspended"):
            raise InvalidRequest(f"facility status {status!r} is not 'active' or 'suspended'")
        if status == "suspended" and not (reason and reason.strip()):
            raise InvalidRequest("a suspension needs a reason")
        now = datetime.now(UTC)
        async with self.db.write() as conn:
            res = await conn.execute(
                update(facility)
                .where(facility.c.institution_code == institution_code)
                .values(status=status, status_reason=reason, status_changed_at=now)
            )
            if res.rowcount == 0:
                raise NotFound(f"facility {institution_code} is not registered")
            await self.audit.append(
                conn,
                action=f"facility.{'suspend' if status == 'suspended' else 'resume'}",
                actor=actor,
                facility_code=institution_code,
                detail={"reason": reason},
                now=now,
            )
        return await self.get(institution_code)

    # -- client certificates -------------------------------------------------------------

    async def register_certificate(
        self,
        cert: x509.Certificate,
        *,
        institution_code: str | None = None,
        admin_name: str | None = None,
        terminal_label: str | None = None,
        actor: str,
    ) -> str:
        """Register a client certificate for a facility or an administrator; returns its serial.

        By default a facility has one active certificate (the source rules); a second one is
        refused unless the facility policy allows per-terminal certificates.
        """
        if (institution_code is None) == (admin_name is None):
            raise InvalidRequest("a client certificate belongs to one facility or one admin")
        der = cert.public_bytes(serialization.Encoding.DER)
        serial_hex = format(cert.serial_number, "x")
        now = datetime.now(UTC)
        async with self.db.write() as conn:
            facility_id = admin_id = None
            if institution_code is not None:
                frow = (
                    await conn.execute(
                        select(facility).where(facility.c.institution_code == institution_code)
                    )
                ).one_or_none()
                if frow is None:
                    raise NotFound(f"facility {institution_code} is not registered")
                facility_id = frow.id
                policy = json.loads(frow.policy or "{}")
                active = (
                    await conn.execute(
                        select(func.count())
                        .select_from(client_certificate)
                        .where(client_certificate.c.facility_id == facility_id)
                        .where(client_certificate.c.status == "active")
                    )
                ).scalar_one()
                if active and not policy.get("per_terminal_certificates", False):
                    raise Conflict(
                        f"facility {institution_code} already has an active client certificate "
                        "(one per facility; rotate it instead)"
                    )
            else:
                arow = (
                    await conn.execute(select(admin).where(admin.c.name == admin_name))
                ).one_or_none()
                if arow is None:
                    res = await conn.execute(
                        insert(admin).values(name=admin_name, status="active", created_at=now)
                    )
                    pk = res.inserted_primary_key
                    assert pk is not None
                    admin_id = pk[0]
                else:
                    admin_id = arow.id
            try:
                await conn.execute(
                    insert(client_certificate).values(
                        serial_hex=serial_hex,
                        fingerprint_sha256=fingerprint(der),
                        facility_id=facility_id,
                        admin_id=admin_id,
                        terminal_label=terminal_label,
                        subject=cert.subject.rfc4514_string(),
                        not_before=cert.not_valid_before_utc,
                        not_after=cert.not_valid_after_utc,
                        status="active",
                        issued_at=now,
                        certificate_der=der,
                    )
                )
            except IntegrityError as e:
                raise Conflict(f"client certificate {serial_hex} is already registered") from e
            await self.audit.append(
                conn,
                action="client_certificate.register",
                actor=actor,
                facility_code=institution_code,
                detail={
                    "serial": serial_hex,
                    "admin": admin_name,
                    "terminal": terminal_label,
                    "not_after": cert.not_valid_after_utc.isoformat(),
                    "fingerprint_sha256": fingerprint(der),
                },
                now=now,
            )
        return serial_hex

    async def revoke_certificate(self, serial_hex: str, *, reason: str, actor: str) -> None:
        if not reason.strip():
            raise InvalidRequest("a revocation needs a reason")
        serial_hex = serial_hex.lower().removeprefix("0x")
        now = datetime.now(UTC)
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    select(client_certificate, facility.c.institution_code)
                    .select_from(client_certificate.outerjoin(facility))
                    .where(client_certificate.c.serial_hex == serial_hex)
                )
            ).one_or_none()
            if row is None:
                raise NotFound(f"client certificate {serial_hex} is not registered")
            if row.status == "revoked":
                raise Conflict(f"client certificate {serial_hex} was already revoked")
            await conn.execute(
                update(client_certificate)
                .where(client_certificate.c.serial_hex == serial_hex)
                .values(status="revoked", revoked_at=now, revocation_reason=reason)
            )
            await self.audit.append(
                conn,
                action="client_certificate.revoke",
                actor=actor,
                facility_code=row.institution_code,
                detail={"serial": serial_hex, "reason": reason},
                now=now,
            )

    async def certificates(self, institution_code: str) -> list[dict[str, Any]]:
        fac = await self.get(institution_code)
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(client_certificate)
                    .where(client_certificate.c.facility_id == fac.id)
                    .order_by(client_certificate.c.issued_at)
                )
            ).all()
        return [
            {
                "serial": r.serial_hex,
                "terminal": r.terminal_label,
                "status": r.status,
                "issued": r.issued_at.isoformat(),
                "expires": r.not_after.isoformat(),
                "downloaded_at": r.downloaded_at.isoformat() if r.downloaded_at else None,
                "revoke_at": r.revoke_at.isoformat() if r.revoke_at else None,
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                "reason": r.revocation_reason,
                "last_used": r.last_used_at.isoformat() if r.last_used_at else None,
            }
            for r in rows
        ]
