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
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog, AuditRecord
from gateway.clock import Clock, system_clock
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.store.db import Database
from gateway.store.schema import admin, client_certificate, facility, vendor

FEE_TABLES = {"1": "medical", "3": "dental", "4": "pharmacy"}
FACILITY_KINDS = ("hospital", "clinic", "dental_clinic", "pharmacy")
PAYMENT_METHODS = {"deduction": "支払基金からの支払額との相殺", "transfer": "銀行振込"}
_CODE_RE = re.compile(r"[0-9]{10}")  # ASCII only: \d also matches full-width digits
_EMAIL_RE = re.compile(r"[^@\s<>\\\"]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
TERMINAL_LABEL_MAX = 64


def validate_terminal_label(label: str) -> str:
    """A terminal label goes into the certificate (OU) and the status: short, printable."""
    if not isinstance(label, str) or not label.strip():
        raise InvalidRequest("a terminal label must not be empty")
    label = label.strip()
    if len(label) > TERMINAL_LABEL_MAX:
        raise InvalidRequest(f"terminal label is longer than {TERMINAL_LABEL_MAX} characters")
    if any(not ch.isprintable() for ch in label):
        raise InvalidRequest("terminal label contains control characters")
    return label


def validate_recipient(name: str) -> str:
    """The person the post is addressed to (担当者 氏名): printable, one line."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("the recipient's name (担当者 氏名) must not be empty")
    name = name.strip()
    if len(name) > 100 or any(not ch.isprintable() for ch in name):
        raise InvalidRequest("the recipient's name must be one printable line of 100 characters")
    return name


def validate_payment_method(method: str) -> str:
    if method not in PAYMENT_METHODS:
        raise InvalidRequest(
            f"payment method {method!r} is not 'deduction' (from the fee payment) or 'transfer'"
        )
    return method


def spki_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certified key (SubjectPublicKeyInfo DER)."""
    return hashlib.sha256(
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()


def validate_email(email: str) -> str:
    if not isinstance(email, str) or not _EMAIL_RE.fullmatch(email.strip()):
        raise InvalidRequest(f"contact e-mail {email!r} is not an address like name@example.jp")
    return email.strip()


def validate_dental_link(medical_code: str, dental_code: str) -> None:
    """A co-located dental department: same prefecture, medical fee table 1 and dental 3."""
    validate_institution_code(medical_code)
    validate_institution_code(dental_code)
    if medical_code[2] != "1":
        raise InvalidRequest(
            f"facility {medical_code} is not registered under a medical (医科, fee table 1) "
            "code: only a medical code can carry a co-located dental department"
        )
    if dental_code[2] != "3":
        raise InvalidRequest(
            f"institution code {dental_code} is not a dental (歯科, fee table 3) code"
        )
    if dental_code[:2] != medical_code[:2]:
        raise InvalidRequest(
            f"dental code {dental_code} is in prefecture {dental_code[:2]}, the facility "
            f"{medical_code} in prefecture {medical_code[:2]}: a co-located department "
            "shares the prefecture"
        )


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
    dental_code: str | None = None
    contact_email: str | None = None
    recipient_name: str | None = None
    payment_method: str | None = None

    @property
    def per_terminal(self) -> bool:
        return bool(self.policy.get("per_terminal_certificates", False))

    @property
    def auto_renewal(self) -> bool:
        """The facility's own system renews over EST (``hpki-gateway client renew``)."""
        return bool(self.policy.get("auto_renewal", False))

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
            dental_code=r.dental_code,
            contact_email=r.contact_email,
            recipient_name=r.recipient_name,
            payment_method=r.payment_method,
        )


def current_certificates_clause(facility_id: int, now: datetime) -> Any:
    """SQL: the facility's current certificates (active, unexpired, no revocation scheduled)."""
    return and_(
        client_certificate.c.facility_id == facility_id,
        client_certificate.c.status == "active",
        client_certificate.c.revoke_at.is_(None),
        client_certificate.c.not_after > now,
    )


def certificate_status(row: Any, now: datetime) -> str:
    """``active``, ``overlapping`` (revocation scheduled), ``revoked`` or ``expired``."""
    if row.status == "revoked" or (row.revoke_at is not None and row.revoke_at <= now):
        return "revoked"
    if row.not_after <= now:
        return "expired"
    if row.revoke_at is not None:
        return "overlapping"
    return "active"


def _iso(d: datetime | None) -> str | None:
    return d.isoformat() if d else None


def certificate_json(row: Any, now: datetime) -> dict[str, Any]:
    """One certificate in the fixed status shape (docs/api-admin.md); dates ISO 8601 UTC."""
    status = certificate_status(row, now)
    revoked_at = row.revoked_at
    if status == "revoked" and revoked_at is None:
        revoked_at = row.revoke_at  # passed, the scheduler has not yet recorded it
    return {
        "serial": row.serial_hex,
        "terminal": row.terminal_label,
        "status": status,
        "issued": _iso(row.issued_at),
        "expires": _iso(row.not_after),
        "downloaded_at": _iso(row.downloaded_at),
        "revoke_at": _iso(row.revoke_at),
        "revoked_at": _iso(revoked_at),
        "reason": row.revocation_reason,
        "last_used": _iso(row.last_used_at),
    }


class FacilityRegistry:
    """Registry operations; every change is audited in its own transaction."""

    def __init__(self, *, db: Database, audit: AuditLog, clock: Clock = system_clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock

    @staticmethod
    async def ensure_code_free(conn: AsyncConnection, code: str) -> None:
        """Refuse a code that is registered, or linked as some facility's dental code."""
        row = (
            await conn.execute(
                select(facility.c.institution_code, facility.c.dental_code).where(
                    or_(facility.c.institution_code == code, facility.c.dental_code == code)
                )
            )
        ).first()
        if row is None:
            return
        if row.institution_code == code:
            raise Conflict(f"facility {code} is already registered")
        raise Conflict(
            f"institution code {code} is the dental (歯科) code of facility "
            f"{row.institution_code}, whose co-located dental department is registered under "
            f"its medical (医科) code {row.institution_code}: use that facility"
        )

    async def add(
        self,
        *,
        institution_code: str,
        name: str,
        kind: str,
        provisional: bool = False,
        actor: str,
        now: datetime | None = None,
        dental_code: str | None = None,
        contact_email: str | None = None,
        per_terminal: bool = False,
        recipient_name: str | None = None,
        payment_method: str | None = None,
    ) -> Facility:
        validate_institution_code(institution_code)
        if recipient_name is not None:
            recipient_name = validate_recipient(recipient_name)
        if payment_method is not None:
            payment_method = validate_payment_method(payment_method)
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
        if dental_code is not None:
            validate_dental_link(institution_code, dental_code)
        if contact_email is not None:
            contact_email = validate_email(contact_email)
        policy = {"per_terminal_certificates": True} if per_terminal else {}
        now = now or self.clock()
        async with self.db.write() as conn:
            await self.ensure_code_free(conn, institution_code)
            if dental_code is not None:
                await self.ensure_code_free(conn, dental_code)
            try:
                res = await conn.execute(
                    insert(facility).values(
                        institution_code=institution_code,
                        name=name.strip(),
                        kind=kind,
                        provisional=provisional,
                        status="active",
                        policy=json.dumps(policy),
                        created_at=now,
                        dental_code=dental_code,
                        contact_email=contact_email,
                        recipient_name=recipient_name,
                        payment_method=payment_method,
                    )
                )
            except IntegrityError as e:
                raise Conflict(f"facility {institution_code} is already registered") from e
            await self.audit.append(
                conn,
                action="facility.add",
                actor=actor,
                facility_code=institution_code,
                detail={
                    "name": name,
                    "kind": kind,
                    "provisional": provisional,
                    "dental_code": dental_code,
                    "per_terminal": per_terminal,
                },
                now=now,
            )
            pk = res.inserted_primary_key
            assert pk is not None
            row = (await conn.execute(select(facility).where(facility.c.id == pk[0]))).one()
        return Facility.from_row(row)

    async def get(self, institution_code: str) -> Facility:
        async with self.db.read() as conn:
            return await self.get_in(conn, institution_code)

    @staticmethod
    async def get_in(
        conn: AsyncConnection, institution_code: str, *, for_update: bool = False
    ) -> Facility:
        """The facility; ``for_update`` locks its row (PostgreSQL) so issuances serialise."""
        stmt = select(facility).where(facility.c.institution_code == institution_code)
        if for_update:
            stmt = stmt.with_for_update()
        row = (await conn.execute(stmt)).one_or_none()
        if row is None:
            dental = (
                await conn.execute(
                    select(facility.c.institution_code).where(
                        facility.c.dental_code == institution_code
                    )
                )
            ).scalar_one_or_none()
            if dental is not None:
                raise NotFound(
                    f"facility {institution_code} is not registered: it is the dental (歯科) "
                    f"code of facility {dental} (use {dental})"
                )
            raise NotFound(f"facility {institution_code} is not registered")
        return Facility.from_row(row)

    async def list_all(self) -> list[Facility]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(select(facility).order_by(facility.c.institution_code))
            ).all()
        return [Facility.from_row(r) for r in rows]

    async def set_status(
        self,
        institution_code: str,
        *,
        status: str,
        reason: str | None,
        actor: str,
        now: datetime | None = None,
    ) -> Facility:
        if status not in ("active", "suspended"):
            raise InvalidRequest(f"facility status {status!r} is not 'active' or 'suspended'")
        if status == "suspended" and not (reason and reason.strip()):
            raise InvalidRequest("a suspension needs a reason")
        now = now or self.clock()
        async with self.db.write() as conn:
            # Locked: a suspension racing the end of the service must not write "suspended"
            # (or "active") over "stopped" after it (PostgreSQL; SQLite has one writer).
            fac = await self.get_in(conn, institution_code, for_update=True)
            if fac.status == "stopped":
                raise Conflict(
                    f"facility {institution_code} stopped the service on "
                    f"{_iso(fac.status_changed_at)}: register a new application instead"
                )
            await self._change_in(
                conn,
                fac,
                {"status": status, "status_reason": reason, "status_changed_at": now},
                action=f"facility.{'suspend' if status == 'suspended' else 'resume'}",
                actor=actor,
                detail={"reason": reason},
                now=now,
            )
        return await self.get(institution_code)

    async def _change_in(
        self,
        conn: AsyncConnection,
        fac: Facility,
        values: dict[str, Any],
        *,
        action: str,
        actor: str,
        detail: dict[str, Any],
        now: datetime,
    ) -> None:
        """Change the facility's row and audit it, in the caller's transaction."""
        await conn.execute(update(facility).where(facility.c.id == fac.id).values(**values))
        await self.audit.append(
            conn,
            action=action,
            actor=actor,
            facility_code=fac.institution_code,
            detail=detail,
            now=now,
        )

    async def link_dental(
        self, institution_code: str, dental_code: str, *, actor: str, now: datetime | None = None
    ) -> Facility:
        """Record the co-located dental department's code under the medical registration."""
        validate_dental_link(institution_code, dental_code)
        now = now or self.clock()
        async with self.db.write() as conn:
            fac = await self.get_in(conn, institution_code, for_update=True)
            if fac.dental_code == dental_code:
                raise Conflict(
                    f"dental code {dental_code} is already linked to {fac.institution_code}"
                )
            if fac.dental_code is not None:
                raise Conflict(
                    f"facility {institution_code} already has the dental code {fac.dental_code}"
                )
            await self.ensure_code_free(conn, dental_code)
            await self._change_in(
                conn,
                fac,
                {"dental_code": dental_code},
                action="facility.link_dental",
                actor=actor,
                detail={"dental_code": dental_code},
                now=now,
            )
        return await self.get(institution_code)

    async def set_policy(
        self,
        institution_code: str,
        *,
        per_terminal: bool | None = None,
        contact_email: str | None = None,
        actor: str,
        now: datetime | None = None,
        recipient_name: str | None = None,
        payment_method: str | None = None,
        auto_renewal: bool | None = None,
    ) -> Facility:
        """Change the per-terminal policy, the contact address, the recipient of the post,
        the payment method and/or whether the facility renews by itself (EST)."""
        if contact_email is not None:
            contact_email = validate_email(contact_email)
        if recipient_name is not None:
            recipient_name = validate_recipient(recipient_name)
        if payment_method is not None:
            payment_method = validate_payment_method(payment_method)
        now = now or self.clock()
        async with self.db.write() as conn:
            fac = await self.get_in(conn, institution_code, for_update=True)
            policy = dict(fac.policy)
            values: dict[str, Any] = {}
            if per_terminal is not None:
                if not per_terminal and per_terminal != fac.per_terminal:
                    n = (
                        await conn.execute(
                            select(func.count())
                            .select_from(client_certificate)
                            .where(current_certificates_clause(fac.id, now))
                        )
                    ).scalar_one()
                    if n > 1:
                        raise Conflict(
                            f"facility {institution_code} has {n} current terminal "
                            "certificates: revoke all but one before ending the per-terminal "
                            "policy"
                        )
                policy["per_terminal_certificates"] = per_terminal
                values["policy"] = json.dumps(policy)
            if auto_renewal is not None:
                policy["auto_renewal"] = auto_renewal
                values["policy"] = json.dumps(policy)
            if contact_email is not None:
                values["contact_email"] = contact_email
            if recipient_name is not None:
                values["recipient_name"] = recipient_name
            if payment_method is not None:
                values["payment_method"] = payment_method
            if not values:
                raise InvalidRequest("nothing to change: give a policy or a contact address")
            await self._change_in(
                conn,
                fac,
                values,
                action="facility.policy",
                actor=actor,
                detail={
                    "per_terminal": per_terminal,
                    "contact_email_set": contact_email is not None,
                    "recipient_set": recipient_name is not None,
                    "payment_method": payment_method,
                    "auto_renewal": auto_renewal,
                },
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
        vendor_name: str | None = None,
        terminal_label: str | None = None,
        actor: str,
        now: datetime | None = None,
        downloaded: bool = False,
    ) -> str:
        """Register a client certificate for a facility, an administrator or a vendor; returns
        its serial.

        By default a facility has one current certificate (the source rules); a second one is
        refused unless the facility policy allows per-terminal certificates (then one per
        terminal label). A certificate is never silently replaced: rotation is explicit.
        """
        now = now or self.clock()
        async with self.db.write() as conn:
            serial, _ = await self.register_in(
                conn,
                cert,
                institution_code=institution_code,
                admin_name=admin_name,
                vendor_name=vendor_name,
                terminal_label=terminal_label,
                actor=actor,
                now=now,
                downloaded=downloaded,
            )
        return serial

    async def register_in(
        self,
        conn: AsyncConnection,
        cert: x509.Certificate,
        *,
        institution_code: str | None = None,
        admin_name: str | None = None,
        vendor_name: str | None = None,
        terminal_label: str | None = None,
        actor: str,
        now: datetime,
        downloaded: bool = False,
        audit_detail: dict[str, Any] | None = None,
    ) -> tuple[str, int]:
        """Register inside the caller's transaction; returns (serial, row id)."""
        owners = [o for o in (institution_code, admin_name, vendor_name) if o is not None]
        if len(owners) != 1:
            raise InvalidRequest(
                "a client certificate belongs to one facility, one admin or one vendor"
            )
        if terminal_label is not None:
            terminal_label = validate_terminal_label(terminal_label)
        der = cert.public_bytes(serialization.Encoding.DER)
        serial_hex = format(cert.serial_number, "x")
        facility_id = admin_id = vendor_id = None
        if institution_code is not None:
            fac = await self.get_in(conn, institution_code, for_update=True)
            facility_id = fac.id
            await self.check_one_current(conn, fac, terminal_label, now)
        elif vendor_name is not None:
            vrow = (
                await conn.execute(select(vendor).where(vendor.c.name == vendor_name))
            ).one_or_none()
            if vrow is None:
                raise NotFound(f"vendor {vendor_name!r} is not registered")
            if vrow.status != "active":
                raise Conflict(f"vendor {vendor_name!r} is {vrow.status}")
            vendor_id = vrow.id
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
            res = await conn.execute(
                insert(client_certificate).values(
                    serial_hex=serial_hex,
                    fingerprint_sha256=fingerprint(der),
                    facility_id=facility_id,
                    admin_id=admin_id,
                    vendor_id=vendor_id,
                    spki_sha256=spki_fingerprint(cert),
                    terminal_label=terminal_label,
                    subject=cert.subject.rfc4514_string(),
                    not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc,
                    status="active",
                    issued_at=now,
                    downloaded_at=now if downloaded else None,
                    certificate_der=der,
                )
            )
        except IntegrityError as e:
            raise Conflict(f"client certificate {serial_hex} is already registered") from e
        pk = res.inserted_primary_key
        assert pk is not None
        await self.audit.append(
            conn,
            action="client_certificate.register",
            actor=actor,
            facility_code=institution_code,
            detail={
                "serial": serial_hex,
                "admin": admin_name,
                "vendor": vendor_name,
                "terminal": terminal_label,
                "not_after": cert.not_valid_after_utc.isoformat(),
                "fingerprint_sha256": fingerprint(der),
                **(audit_detail or {}),
            },
            now=now,
        )
        return serial_hex, int(pk[0])

    @staticmethod
    async def check_one_current(
        conn: AsyncConnection, fac: Facility, terminal_label: str | None, now: datetime
    ) -> None:
        """One current certificate per facility, or per terminal under the per-terminal policy."""
        if fac.status != "active":
            raise Conflict(
                f"facility {fac.institution_code} is {fac.status}: no certificate can be issued"
            )
        stmt = select(client_certificate.c.serial_hex, client_certificate.c.terminal_label).where(
            current_certificates_clause(fac.id, now)
        )
        if fac.per_terminal:
            if terminal_label is None:
                raise InvalidRequest(
                    f"facility {fac.institution_code} has per-terminal certificates: "
                    "give a terminal label (e.g. 「総合受付 端末01」)"
                )
            stmt = stmt.where(client_certificate.c.terminal_label == terminal_label)
        existing = (await conn.execute(stmt)).first()
        if existing is None:
            return
        if fac.per_terminal:
            raise Conflict(
                f"terminal {terminal_label!r} of facility {fac.institution_code} already has "
                f"the current client certificate {existing.serial_hex} (one per terminal; "
                "rotate it instead)"
            )
        raise Conflict(
            f"facility {fac.institution_code} already has an active client certificate "
            f"{existing.serial_hex} (one per facility; rotate it instead)"
        )

    @staticmethod
    async def certificate_owner_in(conn: AsyncConnection, serial_hex: str) -> Any:
        """The certificate's row id, status and facility id (None for an administrator's or
        a vendor's), without locking; None if it is not registered."""
        return (
            await conn.execute(
                select(
                    client_certificate.c.id,
                    client_certificate.c.status,
                    client_certificate.c.facility_id,
                ).where(client_certificate.c.serial_hex == serial_hex)
            )
        ).one_or_none()

    @staticmethod
    async def lock_facility_in(conn: AsyncConnection, facility_id: int) -> None:
        """Lock the facility's row until the caller's transaction ends (PostgreSQL)."""
        await conn.execute(
            select(facility.c.id).where(facility.c.id == facility_id).with_for_update()
        )

    async def revoke_in(
        self,
        conn: AsyncConnection,
        serial_hex: str,
        *,
        reason: str,
        actor: str,
        now: datetime,
        action: str = "client_certificate.revoke",
        audit_later: list[AuditRecord] | None = None,
    ) -> Any:
        """Revoke at once inside the caller's transaction; returns the row before the change.
        ``audit_later``: its audit record goes there, for the caller to append with the rest
        of its transaction's (the audit head taken once, last, as every writer takes it)."""
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
            .where(client_certificate.c.id == row.id)
            .values(status="revoked", revoked_at=now, revocation_reason=reason)
        )
        record = AuditRecord(
            action=action,
            actor=actor,
            facility_code=row.institution_code,
            detail={"serial": serial_hex, "reason": reason},
            now=now,
        )
        if audit_later is not None:
            audit_later.append(record)
        else:
            await self.audit.append_many(conn, [record])
        return row

    async def certificates(
        self, institution_code: str, *, now: datetime | None = None
    ) -> list[dict[str, Any]]:
        now = now or self.clock()
        fac = await self.get(institution_code)
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(client_certificate)
                    .where(client_certificate.c.facility_id == fac.id)
                    .order_by(client_certificate.c.issued_at, client_certificate.c.id)
                )
            ).all()
        return [certificate_json(r, now) for r in rows]

    # -- client certificate rows: the store access of the lifecycle service -------------------

    @staticmethod
    async def certificate_rows_in(
        conn: AsyncConnection,
        facility_id: int,
        *,
        serial: str | None = None,
        terminal: str | None = None,
    ) -> list[Any]:
        """A facility's certificate rows, narrowed to one serial or one terminal if given."""
        stmt = select(client_certificate).where(client_certificate.c.facility_id == facility_id)
        if serial is not None:
            stmt = stmt.where(client_certificate.c.serial_hex == normalize_serial(serial))
        elif terminal is not None:
            stmt = stmt.where(client_certificate.c.terminal_label == terminal)
        return list((await conn.execute(stmt)).all())

    async def key_known(self, spki_sha256: str) -> bool:
        """Whether a certificate of any owner already certifies the key with this hash."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(client_certificate.c.id)
                    .where(client_certificate.c.spki_sha256 == spki_sha256)
                    .limit(1)
                )
            ).first()
        return row is not None

    @staticmethod
    async def schedule_revocation_in(
        conn: AsyncConnection, certificate_id: int, *, revoke_at: datetime, reason: str
    ) -> bool:
        """Schedule an active certificate's revocation; False if it already has one."""
        res = await conn.execute(
            update(client_certificate)
            .where(
                and_(
                    client_certificate.c.id == certificate_id,
                    client_certificate.c.status == "active",
                    client_certificate.c.revoke_at.is_(None),
                )
            )
            .values(revoke_at=revoke_at, revocation_reason=reason[:500])
        )
        return bool(res.rowcount == 1)

    async def change_code_in(self, conn: AsyncConnection, facility_id: int, new_code: str) -> None:
        """The facility's real (or new) institution code replaces the old one."""
        await self.ensure_code_free(conn, new_code)
        await conn.execute(
            update(facility)
            .where(facility.c.id == facility_id)
            .values(institution_code=new_code, provisional=False)
        )

    @staticmethod
    async def active_certificates_in(conn: AsyncConnection, facility_id: int) -> list[Any]:
        """``(serial_hex, id)`` of a facility's certificates not yet revoked."""
        rows = await conn.execute(
            select(client_certificate.c.serial_hex, client_certificate.c.id).where(
                and_(
                    client_certificate.c.facility_id == facility_id,
                    client_certificate.c.status == "active",
                )
            )
        )
        return list(rows.all())

    @staticmethod
    async def stop_in(
        conn: AsyncConnection, facility_id: int, *, reason: str, now: datetime
    ) -> None:
        await conn.execute(
            update(facility)
            .where(facility.c.id == facility_id)
            .values(status="stopped", status_reason=reason, status_changed_at=now)
        )

    @staticmethod
    async def mark_downloaded_in(conn: AsyncConnection, certificate_id: int, now: datetime) -> None:
        await conn.execute(
            update(client_certificate)
            .where(client_certificate.c.id == certificate_id)
            .values(downloaded_at=now)
        )

    @staticmethod
    async def downloaded_at_in(conn: AsyncConnection, certificate_id: int) -> datetime | None:
        """When the certificate's file was downloaded, exported or handed over (None: never)."""
        row = (
            await conn.execute(
                select(client_certificate.c.downloaded_at).where(
                    client_certificate.c.id == certificate_id
                )
            )
        ).one()
        downloaded: datetime | None = row.downloaded_at
        return downloaded

    async def due_revocations(self, now: datetime) -> list[Any]:
        """Active certificates whose scheduled revocation time has come."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(
                    client_certificate.c.id,
                    client_certificate.c.facility_id,
                    client_certificate.c.serial_hex,
                    client_certificate.c.revoke_at,
                    client_certificate.c.revocation_reason,
                    facility.c.institution_code,
                )
                .select_from(client_certificate.outerjoin(facility))
                .where(
                    and_(
                        client_certificate.c.status == "active",
                        client_certificate.c.revoke_at <= now,
                    )
                )
            )
            return list(rows.all())

    @staticmethod
    async def revoke_scheduled_in(
        conn: AsyncConnection, certificate_id: int, revoked_at: datetime
    ) -> bool:
        """Carry out one scheduled revocation; False when another worker got there first."""
        res = await conn.execute(
            update(client_certificate)
            .where(
                and_(
                    client_certificate.c.id == certificate_id,
                    client_certificate.c.status == "active",
                )
            )
            .values(status="revoked", revoked_at=revoked_at)
        )
        return bool(res.rowcount == 1)

    async def revoked_unexpired(self, now: datetime) -> list[Any]:
        """What the CRL lists: revoked certificates not yet expired."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(
                    client_certificate.c.serial_hex,
                    client_certificate.c.revoked_at,
                    client_certificate.c.revocation_reason,
                    client_certificate.c.certificate_der,
                ).where(
                    and_(
                        client_certificate.c.status == "revoked",
                        client_certificate.c.not_after > now,
                    )
                )
            )
            return list(rows.all())

    async def expiring_rows(self, now: datetime, until: datetime) -> list[Any]:
        """Active facility certificates expiring in (now, until], soonest first, with the
        facility's code and name."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(client_certificate, facility.c.institution_code, facility.c.name)
                .select_from(client_certificate.join(facility))
                .where(
                    and_(
                        client_certificate.c.status == "active",
                        client_certificate.c.not_after > now,
                        client_certificate.c.not_after <= until,
                    )
                )
                .order_by(client_certificate.c.not_after)
            )
            return list(rows.all())

    @staticmethod
    async def reminder_candidates_in(
        conn: AsyncConnection, *, now: datetime, horizon: datetime, expired_since: datetime
    ) -> list[Any]:
        """Certificates of active facilities, not being replaced, expiring by ``horizon`` or
        expired after ``expired_since``: the ones a reminder may be due for."""
        rows = await conn.execute(
            select(
                client_certificate.c.id,
                client_certificate.c.serial_hex,
                client_certificate.c.terminal_label,
                client_certificate.c.not_after,
                facility.c.id.label("facility_id"),
                facility.c.institution_code,
                facility.c.name,
                facility.c.contact_email,
                facility.c.policy,
            )
            .select_from(client_certificate.join(facility))
            .where(
                and_(
                    client_certificate.c.status == "active",
                    client_certificate.c.revoke_at.is_(None),
                    facility.c.status == "active",
                    client_certificate.c.not_after <= horizon,
                    client_certificate.c.not_after > expired_since,
                )
            )
        )
        return list(rows.all())

    @staticmethod
    async def certificate_and_facility_in(
        conn: AsyncConnection, serial: str
    ) -> tuple[Any, Facility]:
        """A facility certificate's row and its facility (not an administrator's)."""
        row = (
            await conn.execute(
                select(client_certificate).where(client_certificate.c.serial_hex == serial)
            )
        ).one_or_none()
        if row is None:
            raise NotFound(f"client certificate {serial} is not registered")
        if row.facility_id is None:
            raise InvalidRequest(f"client certificate {serial} is an administrator's")
        frow = (await conn.execute(select(facility).where(facility.c.id == row.facility_id))).one()
        return row, Facility.from_row(frow)


def normalize_serial(serial_hex: str) -> str:
    """Accept upper/lower case, an ``0x`` prefix, colons and leading zeros (as openssl prints)."""
    s = serial_hex.strip().lower().removeprefix("0x").replace(":", "")
    if not s or any(c not in "0123456789abcdef" for c in s):
        raise InvalidRequest(f"certificate serial {serial_hex!r} is not hexadecimal")
    return s.lstrip("0") or "0"
