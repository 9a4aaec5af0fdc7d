"""Applications (申請): new (新規), re-application (再申請), stop (停止); vendors (代理申請).

What the source documents' office does by hand, as records:
- an application is never edited: a change is a re-application, with its reason in the remarks
  (備考); it closes the earlier open application (``superseded``), which stays as it was;
- a vendor (an organisation with its own client certificate, registered by an officer and
  linked to the facilities it serves) may apply on a linked facility's behalf, but every
  delivery still goes to the facility's registered address and recipient, never to the vendor;
- an officer approves (the lifecycle issues, rotates or stops) or rejects with a reason;
- the status inquiry lists each application in the online-billing shape: request id, status,
  issue date, last update, whether the file was downloaded.
A submission may carry an idempotency key: the same key with the same content returns the
first application, with other content it is refused. Every submission, refusal and decision is
audited.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog
from gateway.clock import Clock, system_clock
from gateway.errors import AccessDenied, Conflict, GatewayError, InvalidRequest, NotFound
from gateway.lifecycle.certificates import ClientCertificateService, IssueResult
from gateway.lifecycle.facilities import (
    FACILITY_KINDS,
    Facility,
    FacilityRegistry,
    certificate_status,
    validate_email,
    validate_institution_code,
    validate_recipient,
    validate_terminal_label,
)
from gateway.store.db import Database
from gateway.store.schema import application, client_certificate, facility, vendor, vendor_facility

KINDS = ("new", "reapply", "stop")
VIAS = ("officer", "facility", "vendor")
CAUSES = ("correction", "code_change", "provisional_to_real", "notice_lost", "expired", "other")
#: Statuses: submitted → issued | stopped | rejected; an open one re-applied is superseded.
OPEN = "submitted"
REMARKS_MAX = 1000
IDEMPOTENCY_KEY_MAX = 100


def _iso(d: datetime | None) -> str | None:
    return d.isoformat() if d else None


@dataclass(frozen=True, kw_only=True)
class Submission:
    """One application as submitted (the form's fields)."""

    kind: str
    institution_code: str
    facility_name: str | None = None
    facility_kind: str | None = None
    provisional: bool = False
    new_institution_code: str | None = None
    recipient_name: str | None = None
    contact_email: str | None = None
    terminals: tuple[str, ...] = ()
    remarks: str | None = None
    cause: str | None = None

    def digest(self) -> str:
        """The content's hash: what an idempotency key is bound to."""
        body = json.dumps(
            {**self.__dict__, "terminals": list(self.terminals)}, sort_keys=True
        ).encode()
        return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Applicant:
    """Who submits: an officer (CLI/admin API), the facility itself, or a vendor."""

    actor: str
    via: str
    vendor_id: int | None = None
    vendor_name: str | None = None
    facility_code: str | None = None  # the facility's own certificate, when via == "facility"

    @property
    def scope(self) -> str:
        """Idempotency keys are unique per submitter."""
        return self.actor


class VendorRegistry:
    """Vendors and the facilities they serve; every change audited."""

    def __init__(self, *, db: Database, audit: AuditLog, clock: Clock = system_clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock

    async def add(self, name: str, *, contact_email: str | None, actor: str) -> dict[str, Any]:
        name = (name or "").strip()
        if not name or len(name) > 200 or any(not c.isprintable() for c in name):
            raise InvalidRequest("a vendor name must be one printable line of 1-200 characters")
        if contact_email is not None:
            contact_email = validate_email(contact_email)
        now = self.clock()
        async with self.db.write() as conn:
            try:
                await conn.execute(
                    insert(vendor).values(
                        name=name, contact_email=contact_email, status="active", created_at=now
                    )
                )
            except IntegrityError as e:
                raise Conflict(f"vendor {name!r} is already registered") from e
            await self.audit.append(
                conn, action="vendor.add", actor=actor, detail={"vendor": name}, now=now
            )
        return await self.get(name)

    async def _row(self, conn: AsyncConnection, name: str) -> Any:
        row = (await conn.execute(select(vendor).where(vendor.c.name == name))).one_or_none()
        if row is None:
            raise NotFound(f"vendor {name!r} is not registered")
        return row

    async def get(self, name: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            row = await self._row(conn, name)
            codes = (
                await conn.execute(
                    select(facility.c.institution_code)
                    .select_from(vendor_facility.join(facility))
                    .where(vendor_facility.c.vendor_id == row.id)
                    .order_by(facility.c.institution_code)
                )
            ).scalars()
            return {
                "name": row.name,
                "contact_email": row.contact_email,
                "status": row.status,
                "facilities": list(codes),
            }

    async def list_all(self) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            names = list(
                (await conn.execute(select(vendor.c.name).order_by(vendor.c.name))).scalars()
            )
        return [await self.get(n) for n in names]

    async def link(self, name: str, institution_code: str, *, actor: str) -> dict[str, Any]:
        now = self.clock()
        async with self.db.write() as conn:
            v = await self._row(conn, name)
            fac = await FacilityRegistry.get_in(conn, institution_code)
            try:
                await conn.execute(
                    insert(vendor_facility).values(
                        vendor_id=v.id, facility_id=fac.id, created_at=now
                    )
                )
            except IntegrityError as e:
                raise Conflict(f"vendor {name!r} already serves {institution_code}") from e
            await self.audit.append(
                conn,
                action="vendor.link",
                actor=actor,
                facility_code=fac.institution_code,
                detail={"vendor": name},
                now=now,
            )
        return await self.get(name)

    async def unlink(self, name: str, institution_code: str, *, actor: str) -> dict[str, Any]:
        now = self.clock()
        async with self.db.write() as conn:
            v = await self._row(conn, name)
            fac = await FacilityRegistry.get_in(conn, institution_code)
            res = await conn.execute(
                vendor_facility.delete().where(
                    and_(
                        vendor_facility.c.vendor_id == v.id,
                        vendor_facility.c.facility_id == fac.id,
                    )
                )
            )
            if res.rowcount != 1:
                raise NotFound(f"vendor {name!r} does not serve {institution_code}")
            # Its open applications for the facility stay open but are not approved while the
            # vendor is unlinked (ApplicationService.approve: 409): recorded here for the officer.
            still_open = (
                await conn.execute(
                    select(application.c.request_id)
                    .where(
                        and_(
                            application.c.vendor_id == v.id,
                            application.c.facility_id == fac.id,
                            application.c.status == OPEN,
                        )
                    )
                    .order_by(application.c.created_at, application.c.id)
                )
            ).scalars()
            await self.audit.append(
                conn,
                action="vendor.unlink",
                actor=actor,
                facility_code=fac.institution_code,
                detail={"vendor": name, "open_applications": list(still_open)},
                now=now,
            )
        return await self.get(name)

    @staticmethod
    async def serves_in(conn: AsyncConnection, vendor_id: int, facility_id: int) -> bool:
        row = (
            await conn.execute(
                select(vendor_facility.c.vendor_id).where(
                    and_(
                        vendor_facility.c.vendor_id == vendor_id,
                        vendor_facility.c.facility_id == facility_id,
                    )
                )
            )
        ).first()
        return row is not None


class ApplicationService:
    def __init__(
        self,
        *,
        db: Database,
        audit: AuditLog,
        registry: FacilityRegistry,
        certificates: ClientCertificateService,
        clock: Clock = system_clock,
    ) -> None:
        self.db = db
        self.audit = audit
        self.registry = registry
        self.certificates = certificates
        self.clock = clock

    # -- submission ----------------------------------------------------------------------

    async def submit(
        self, sub: Submission, who: Applicant, *, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Record an application; returns (the application, whether it was created now).

        A replay (same idempotency key, same content) returns the first one with ``False``.
        """
        now = self.clock()
        try:
            return await self._submit(sub, who, idempotency_key, now)
        except GatewayError as e:
            await self.audit.append_alone(
                self.db,
                action="application.refused",
                actor=who.actor,
                facility_code=sub.institution_code[:10]
                if isinstance(sub.institution_code, str)
                else None,
                detail={
                    "kind": sub.kind,
                    "via": who.via,
                    "code": e.code,
                    "reason": e.description[:300],
                    "idempotency_key": _audited_key(idempotency_key),
                },
                now=now,
            )
            raise

    async def _submit(
        self, sub: Submission, who: Applicant, key: str | None, now: datetime
    ) -> tuple[dict[str, Any], bool]:
        _check_idempotency_key(key)
        digest = sub.digest()
        if key is not None:
            earlier = await self._by_idempotency_key(who.scope, key)
            if earlier is not None:
                return await self._replay(earlier, digest, who, key, now), False
        clean = self._validate(sub)
        async with self.db.write() as conn:
            fac = await self._facility_in(conn, clean.institution_code)
            await self._check_applicant(conn, clean, who, fac)
            values = self._row_values(clean, fac)
            open_rows = await _open_applications(conn, clean.institution_code)
            _check_open(clean, fac, open_rows, values)
            request_id = await self._new_request_id(conn)
            supersedes = await _supersede(conn, clean, open_rows, request_id, now)
            await _insert_application(
                conn,
                request_id=request_id,
                who=who,
                supersedes=supersedes,
                key=key,
                digest=digest,
                values=values,
                now=now,
            )
            await self.audit.append(
                conn,
                action="application.submit",
                actor=who.actor,
                facility_code=clean.institution_code,
                detail={
                    "request_id": request_id,
                    "kind": clean.kind,
                    "cause": clean.cause,
                    "via": who.via,
                    "vendor": who.vendor_name,
                    "supersedes": supersedes,
                    "idempotency_key": key,
                },
                now=now,
            )
        return await self.get(request_id), True

    async def _by_idempotency_key(self, scope: str, key: str) -> Any:
        async with self.db.read() as conn:
            return (
                await conn.execute(
                    select(application).where(
                        and_(
                            application.c.idempotency_scope == scope,
                            application.c.idempotency_key == key,
                        )
                    )
                )
            ).one_or_none()

    async def _replay(
        self, earlier: Any, digest: str, who: Applicant, key: str, now: datetime
    ) -> dict[str, Any]:
        # A replay answers with the application as it is now (status, decision, serials): only
        # to a submitter still entitled to it, checked first (the 409 below names it too).
        async with self.db.read() as conn:
            await self._check_replayer(conn, earlier, who)
        if earlier.body_sha256 != digest:
            raise Conflict(
                f"idempotency key {key!r} was used for application {earlier.request_id} with "
                "other content: use a new key for a new application"
            )
        await self.audit.append_alone(
            self.db,
            action="application.replayed",
            actor=who.actor,
            facility_code=earlier.institution_code,
            detail={"request_id": earlier.request_id, "idempotency_key": key},
            now=now,
        )
        return await self.get(earlier.request_id)

    async def _check_replayer(self, conn: AsyncConnection, earlier: Any, who: Applicant) -> None:
        """The right a new submission needs, for the application replayed: a vendor still
        linked to its facility (an unlinked vendor got 200 and the application as it is now:
        security review of 2026-11-28), the facility itself; officers always."""
        if who.via == "officer":
            return
        fid = earlier.facility_id
        if fid is None:
            fac = await self._facility_in(conn, earlier.institution_code)
            fid = fac.id if fac else None
        if who.via == "facility":
            own = await self._facility_in(conn, who.facility_code or "")
            if fid is None or own is None or own.id != fid:
                raise AccessDenied("a facility applies for itself only")
            return
        linked = (
            who.via == "vendor"
            and who.vendor_id is not None
            and fid is not None
            and await VendorRegistry.serves_in(conn, who.vendor_id, fid)
        )
        if linked:
            return
        raise AccessDenied(
            f"vendor {who.vendor_name!r} is not linked to facility {earlier.institution_code}: "
            "an officer links a vendor to the facilities it serves"
        )

    @staticmethod
    def _validate(sub: Submission) -> Submission:
        if sub.kind not in KINDS:
            raise InvalidRequest(f"application kind {sub.kind!r} is not one of {', '.join(KINDS)}")
        validate_institution_code(sub.institution_code)
        remarks = (sub.remarks or "").strip() or None
        if remarks is not None and len(remarks) > REMARKS_MAX:
            raise InvalidRequest(f"the remarks (備考) are longer than {REMARKS_MAX} characters")
        if sub.kind == "reapply" and remarks is None:
            raise InvalidRequest("a re-application (再申請) needs its reason in the remarks (備考)")
        if sub.kind == "stop" and remarks is None:
            raise InvalidRequest("stopping the service (停止) needs its reason in the remarks")
        cause = sub.cause
        new_code = sub.new_institution_code
        if new_code is not None:
            validate_institution_code(new_code)
            if sub.kind != "reapply":
                raise InvalidRequest("a new institution code is given in a re-application only")
            if new_code == sub.institution_code:
                raise InvalidRequest("the new institution code is the current one")
        if cause is not None and cause not in CAUSES:
            raise InvalidRequest(f"cause {cause!r} is not one of {', '.join(CAUSES)}")
        if sub.kind == "reapply" and cause is None:
            cause = "code_change" if new_code else "correction"
        if sub.kind != "reapply" and cause is not None:
            raise InvalidRequest("a cause is given in a re-application only")
        if cause in ("code_change", "provisional_to_real") and new_code is None:
            raise InvalidRequest(f"cause {cause!r} needs the new institution code")
        terminals = tuple(validate_terminal_label(t) for t in sub.terminals)
        if len(set(terminals)) != len(terminals):
            raise InvalidRequest("a terminal label is listed twice")
        if len(terminals) > 50:
            raise InvalidRequest("at most 50 terminals per application")
        return Submission(
            kind=sub.kind,
            institution_code=sub.institution_code,
            facility_name=(sub.facility_name or "").strip() or None,
            facility_kind=sub.facility_kind,
            provisional=sub.provisional,
            new_institution_code=new_code,
            recipient_name=(
                validate_recipient(sub.recipient_name) if sub.recipient_name is not None else None
            ),
            contact_email=(
                validate_email(sub.contact_email) if sub.contact_email is not None else None
            ),
            terminals=terminals,
            remarks=remarks,
            cause=cause,
        )

    async def _facility_in(self, conn: AsyncConnection, code: str) -> Facility | None:
        try:
            return await self.registry.get_in(conn, code)
        except NotFound:
            return None

    async def _check_applicant(
        self, conn: AsyncConnection, sub: Submission, who: Applicant, fac: Facility | None
    ) -> None:
        if who.via == "officer":
            return
        if fac is None:
            raise NotFound(
                f"facility {sub.institution_code} is not registered: its first application "
                "goes through the office (the officer records it)"
            )
        if who.via == "facility":
            if who.facility_code != fac.institution_code:
                raise AccessDenied("a facility applies for itself only")
        elif who.via == "vendor":
            assert who.vendor_id is not None
            if not await VendorRegistry.serves_in(conn, who.vendor_id, fac.id):
                raise AccessDenied(
                    f"vendor {who.vendor_name!r} is not linked to facility "
                    f"{fac.institution_code}: an officer links a vendor to the facilities it "
                    "serves"
                )
        else:
            raise InvalidRequest(f"unknown applicant kind {who.via!r}")
        # The post goes to the facility's registered address and recipient only (代理申請も).
        for field_, given, registered in (
            ("recipient_name", sub.recipient_name, fac.recipient_name),
            ("contact_email", sub.contact_email, fac.contact_email),
        ):
            if given is not None and given != registered:
                raise InvalidRequest(
                    f"{field_} differs from the facility's registered one: deliveries go only to "
                    "the facility's registered address and recipient, never to a vendor; an "
                    "officer changes them with the facility"
                )

    @staticmethod
    def _row_values(sub: Submission, fac: Facility | None) -> dict[str, Any]:
        return {
            "facility_id": fac.id if fac else None,
            "institution_code": sub.institution_code,
            "kind": sub.kind,
            "cause": sub.cause,
            "facility_name": sub.facility_name or (fac.name if fac else None),
            "facility_kind": sub.facility_kind or (fac.kind if fac else None),
            "provisional": sub.provisional if fac is None else fac.provisional,
            "new_institution_code": sub.new_institution_code,
            "recipient_name": sub.recipient_name,
            "contact_email": sub.contact_email,
            "terminals": json.dumps(list(sub.terminals), ensure_ascii=False),
            "remarks": sub.remarks,
        }

    @staticmethod
    async def _new_request_id(conn: AsyncConnection) -> str:
        """15 digits, like the online-billing request ids; random so none can be guessed."""
        for _ in range(10):
            rid = "".join(secrets.choice("0123456789") for _ in range(15))
            taken = (
                await conn.execute(select(application.c.id).where(application.c.request_id == rid))
            ).first()
            if taken is None:
                return rid
        raise Conflict("could not allocate a request id; try again")  # pragma: no cover

    # -- decisions -------------------------------------------------------------------------

    async def _claim(self, request_id: str, actor: str, *, approving: bool = False) -> Any:
        """Take the open application for a decision (one officer wins a double click). An
        approval also needs a vendor's application to come from a vendor still linked to the
        facility, checked in the same transaction as the claim (an unlink commits before or
        after it, never between)."""
        now = self.clock()
        async with self.db.write() as conn:
            row = await self._get_row(conn, request_id)
            if approving and row.status == OPEN:
                await self._check_vendor_still_linked(conn, row)
            res = await conn.execute(
                update(application)
                .where(and_(application.c.id == row.id, application.c.status == OPEN))
                .values(status="deciding", decided_by=actor, updated_at=now)
            )
            if res.rowcount != 1:
                raise Conflict(
                    f"application {request_id} is {row.status}: only an open (submitted) "
                    "application can be decided"
                )
        return row

    async def _check_vendor_still_linked(self, conn: AsyncConnection, row: Any) -> None:
        if row.via != "vendor" or row.vendor_id is None:
            return
        fid = row.facility_id
        if fid is None:
            fac = await self._facility_in(conn, row.institution_code)
            fid = fac.id if fac else None
        if fid is not None and await VendorRegistry.serves_in(conn, row.vendor_id, fid):
            return
        name = (
            await conn.execute(select(vendor.c.name).where(vendor.c.id == row.vendor_id))
        ).scalar_one_or_none()
        raise Conflict(
            f"application {row.request_id} was submitted by vendor {name!r}, which is no longer "
            f"linked to facility {row.institution_code}: it is not approved; reject it with a "
            "reason, or link the vendor again"
        )

    async def _release(self, row: Any) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                update(application)
                .where(and_(application.c.id == row.id, application.c.status == "deciding"))
                .values(status=OPEN, decided_by=None)
            )

    async def reject(self, request_id: str, *, reason: str, actor: str) -> dict[str, Any]:
        reason = (reason or "").strip()
        if not reason:
            raise InvalidRequest("a rejection needs a reason")
        row = await self._claim(request_id, actor)
        now = self.clock()
        async with self.db.write() as conn:
            await conn.execute(
                update(application)
                .where(application.c.id == row.id)
                .values(status="rejected", decision_reason=reason[:500], updated_at=now)
            )
            await self.audit.append(
                conn,
                action="application.reject",
                actor=actor,
                facility_code=row.institution_code,
                detail={"request_id": request_id, "reason": reason},
                now=now,
            )
        return await self.get(request_id)

    async def approve(
        self, request_id: str, *, actor: str, note: str | None = None
    ) -> dict[str, Any]:
        """Carry the application out through the lifecycle; on failure it stays open, and a
        refusal (not open, an unlinked vendor's, the lifecycle's own refusal) is audited as
        ``application.approve_refused``."""
        try:
            row = await self._claim(request_id, actor, approving=True)
            try:
                results, status = await self._carry_out(row, actor)
            except BaseException:
                await self._release(row)
                raise
        except GatewayError as e:
            await self.audit.append_alone(
                self.db,
                action="application.approve_refused",
                actor=actor,
                facility_code=None,
                detail={
                    "request_id": request_id[:64],
                    "code": e.code,
                    "reason": e.description[:300],
                },
                now=self.clock(),
            )
            raise
        now = self.clock()
        serials = [r.serial for r in results]
        async with self.db.write() as conn:
            await conn.execute(
                update(application)
                .where(application.c.id == row.id)
                .values(
                    status=status,
                    decision_reason=(note or "").strip()[:500] or None,
                    certificates=json.dumps(serials),
                    updated_at=now,
                    facility_id=await self._facility_id_in(
                        conn, row.new_institution_code or row.institution_code
                    ),
                )
            )
            await self.audit.append(
                conn,
                action="application.approve",
                actor=actor,
                facility_code=row.new_institution_code or row.institution_code,
                detail={
                    "request_id": request_id,
                    "kind": row.kind,
                    "cause": row.cause,
                    "certificates": serials,
                    "note": note,
                },
                now=now,
            )
        out = await self.get(request_id)
        out["issued_certificates"] = [r.to_json_dict() for r in results]
        return out

    @staticmethod
    async def _facility_id_in(conn: AsyncConnection, code: str) -> int | None:
        return (
            await conn.execute(select(facility.c.id).where(facility.c.institution_code == code))
        ).scalar_one_or_none()

    async def _carry_out(self, row: Any, actor: str) -> tuple[list[IssueResult], str]:
        code = row.institution_code
        terminals: list[str | None] = list(json.loads(row.terminals)) or [None]
        if row.kind == "stop":
            await self.certificates.stop_service(code, reason=row.remarks, actor=actor)
            return [], "stopped"
        try:
            fac = await self.registry.get(code)
        except NotFound:
            fac = await self.registry.add(
                institution_code=code,
                name=row.facility_name,
                kind=row.facility_kind,
                provisional=row.provisional,
                contact_email=row.contact_email,
                recipient_name=row.recipient_name,
                per_terminal=terminals != [None],
                actor=actor,
            )
        else:
            if row.via == "officer" and (row.contact_email or row.recipient_name):
                fac = await self.registry.set_policy(
                    code,
                    contact_email=row.contact_email,
                    recipient_name=row.recipient_name,
                    actor=actor,
                )
        if not fac.contact_email or not fac.recipient_name:
            raise Conflict(
                f"facility {code} has no registered contact address or recipient (担当者): the "
                "delivery could not be addressed; an officer sets them first"
            )
        return [await self._issue_one(row, fac, t, actor) for t in terminals], "issued"

    async def _issue_one(
        self, row: Any, fac: Facility, terminal: str | None, actor: str
    ) -> IssueResult:
        now = self.clock()
        async with self.db.read() as conn:
            rows = await self.registry.certificate_rows_in(
                conn, fac.id, terminal=terminal if fac.per_terminal else None
            )
        current = [r for r in rows if certificate_status(r, now) == "active"]
        postage = "notice_lost" if row.cause == "notice_lost" else None
        if row.kind == "reapply" and row.new_institution_code and current:
            return await self.certificates.rotate(
                fac.institution_code,
                serial=current[0].serial_hex if len(current) == 1 else None,
                terminal=terminal if len(current) > 1 else None,
                new_code=row.new_institution_code,
                reason=row.remarks,
                actor=actor,
            )
        if row.kind == "reapply" and current:
            return await self.certificates.rotate(
                fac.institution_code,
                serial=current[0].serial_hex if len(current) == 1 else None,
                terminal=terminal if len(current) > 1 else None,
                reason=row.remarks,
                actor=actor,
                postage=postage,
            )
        return await self.certificates.issue(
            fac.institution_code, terminal=terminal, actor=actor, postage=postage
        )

    # -- inquiry ---------------------------------------------------------------------------

    @staticmethod
    async def _get_row(conn: AsyncConnection, request_id: str) -> Any:
        if not isinstance(request_id, str) or not request_id.isascii() or not request_id.isdigit():
            raise InvalidRequest(f"request id {request_id!r} is not a number")
        row = (
            await conn.execute(select(application).where(application.c.request_id == request_id))
        ).one_or_none()
        if row is None:
            raise NotFound(f"application {request_id} does not exist")
        return row

    async def get(self, request_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            row = await self._get_row(conn, request_id)
            return await self._view_in(conn, row)

    async def _view_in(self, conn: AsyncConnection, row: Any) -> dict[str, Any]:
        serials = json.loads(row.certificates)
        certs = []
        if serials:
            certs = list(
                (
                    await conn.execute(
                        select(
                            client_certificate.c.serial_hex,
                            client_certificate.c.issued_at,
                            client_certificate.c.downloaded_at,
                        ).where(client_certificate.c.serial_hex.in_(serials))
                    )
                ).all()
            )
        vendor_name = None
        if row.vendor_id is not None:
            vendor_name = (
                await conn.execute(select(vendor.c.name).where(vendor.c.id == row.vendor_id))
            ).scalar_one_or_none()
        issued = min((c.issued_at for c in certs), default=None)
        downloads = [c.downloaded_at for c in certs if c.downloaded_at is not None]
        last = max([row.updated_at, *downloads])
        return {
            "request_id": row.request_id,
            "institution_code": row.institution_code,
            "kind": row.kind,
            "cause": row.cause,
            "status": row.status,
            "submitted": _iso(row.created_at),
            "issued": _iso(issued),
            "last_update": _iso(last),
            "downloaded": bool(certs) and len(downloads) == len(certs),
            "certificates": serials,
            "facility_name": row.facility_name,
            "new_institution_code": row.new_institution_code,
            "terminals": json.loads(row.terminals),
            "remarks": row.remarks,
            "applicant": row.applicant,
            "via": row.via,
            "vendor": vendor_name,
            "supersedes": row.supersedes,
            "superseded_by": row.superseded_by,
            "decided_by": row.decided_by,
            "decision_reason": row.decision_reason,
        }

    async def status(self, institution_code: str) -> dict[str, Any]:
        """The status inquiry (申請状況照会) of one facility: every application, newest first,
        under its current or earlier code."""
        validate_institution_code(institution_code)
        async with self.db.read() as conn:
            fac = await self._facility_in(conn, institution_code)
            clause = application.c.institution_code == institution_code
            if fac is not None:
                clause = clause | (application.c.facility_id == fac.id)
            rows = (
                await conn.execute(
                    select(application)
                    .where(clause)
                    .order_by(application.c.created_at.desc(), application.c.id.desc())
                )
            ).all()
            if fac is None and not rows:
                raise NotFound(f"facility {institution_code} has no applications")
            items = [await self._view_in(conn, r) for r in rows]
        return {
            "institution_code": institution_code,
            "name": fac.name if fac else rows[0].facility_name,
            "applications": items,
        }

    async def pending(self) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(application)
                    .where(application.c.status == OPEN)
                    .order_by(application.c.created_at, application.c.id)
                )
            ).all()
            return [await self._view_in(conn, r) for r in rows]


# -- the steps of a submission ------------------------------------------------------------------


def _idempotency_key_ok(key: str) -> bool:
    """1-100 printable ASCII characters, not all spaces. ASCII: the key comes in an HTTP
    header, where aiohttp turns a byte that is not UTF-8 into a lone surrogate ('k\\xff' ->
    'k\\udcff'), which UTF-8 cannot encode (the refusal's audit record failed: a 500)."""
    return (
        0 < len(key) <= IDEMPOTENCY_KEY_MAX
        and key.isascii()
        and key.isprintable()
        and bool(key.strip())
    )


def _check_idempotency_key(key: str | None) -> None:
    if key is not None and not _idempotency_key_ok(key):
        raise InvalidRequest(
            f"an idempotency key is 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters"
        )


def _audited_key(key: str | None) -> str | None:
    """The key as a refusal records it: as given when valid, else its first 100 characters
    with everything outside ASCII backslash-escaped (bounded, and always encodable)."""
    if key is None or _idempotency_key_ok(key):
        return key
    return key[:IDEMPOTENCY_KEY_MAX].encode("ascii", "backslashreplace").decode("ascii")


async def _open_applications(conn: AsyncConnection, institution_code: str) -> list[Any]:
    return list(
        (
            await conn.execute(
                select(application).where(
                    and_(
                        application.c.institution_code == institution_code,
                        application.c.status == OPEN,
                    )
                )
            )
        ).all()
    )


def _check_open(clean: Submission, fac: Any, open_rows: list[Any], values: dict[str, Any]) -> None:
    """One open application per facility: a new one waits, a re-application replaces it (and,
    before the facility is registered, takes its facility data). ``values`` is completed."""
    if clean.kind == "reapply":
        if fac is None and not open_rows:
            raise NotFound(
                f"nothing to re-apply for: facility {clean.institution_code} is not "
                "registered and has no open application (apply as new, 新規)"
            )
        if fac is None:
            # Re-applying before the first application was decided: its facility data.
            first = open_rows[0]
            values.update(
                facility_name=values["facility_name"] or first.facility_name,
                facility_kind=values["facility_kind"] or first.facility_kind,
            )
    elif open_rows:
        o = open_rows[0]
        raise Conflict(
            f"application {o.request_id} ({o.kind}) for {clean.institution_code} is "
            "still open: an application is not changed or repeated, re-apply (再申請) "
            "with the reason in the remarks (備考)"
        )
    if not values["facility_name"] or values["facility_kind"] not in FACILITY_KINDS:
        raise InvalidRequest(
            f"facility {clean.institution_code} is not registered: a new application "
            f"names the facility (facility_name) and its kind ({', '.join(FACILITY_KINDS)})"
        )


async def _supersede(
    conn: AsyncConnection,
    clean: Submission,
    open_rows: list[Any],
    request_id: str,
    now: datetime,
) -> str | None:
    """What a re-application supersedes: the open application (now ``superseded``), else the
    facility's latest one; None for other kinds."""
    if clean.kind != "reapply":
        return None
    if open_rows:
        await conn.execute(
            update(application)
            .where(application.c.id == open_rows[0].id)
            .values(status="superseded", superseded_by=request_id, updated_at=now)
        )
        return str(open_rows[0].request_id)
    latest: str | None = (
        await conn.execute(
            select(application.c.request_id)
            .where(application.c.institution_code == clean.institution_code)
            .order_by(application.c.created_at.desc(), application.c.id.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    return latest


async def _insert_application(
    conn: AsyncConnection,
    *,
    request_id: str,
    who: Applicant,
    supersedes: str | None,
    key: str | None,
    digest: str,
    values: dict[str, Any],
    now: datetime,
) -> None:
    try:
        await conn.execute(
            insert(application).values(
                request_id=request_id,
                status=OPEN,
                applicant=who.actor,
                via=who.via,
                vendor_id=who.vendor_id,
                supersedes=supersedes,
                idempotency_scope=who.scope if key is not None else None,
                idempotency_key=key,
                body_sha256=digest,
                created_at=now,
                updated_at=now,
                certificates="[]",
                **values,
            )
        )
    except IntegrityError as e:
        # The same key committed by a concurrent request a moment ago.
        raise Conflict(
            "an application with this idempotency key was submitted a moment ago: "
            "repeat the request to get it"
        ) from e
