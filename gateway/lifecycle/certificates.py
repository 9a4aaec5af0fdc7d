"""Facility client certificate lifecycle: issue, deliver, rotate, revoke, stop, status, CRL.

The rules come from the source documents (HPKI.md §6):
- issuance produces two deliveries that never travel together: the PKCS#12 behind a download
  link (14 days, its own download password, in two separate mails) and the printed password
  notice (PDF) with the PKCS#12 password; the file is kept (wrapped) only until downloaded;
- a rotation (institution code change, provisional → real code, renewal) makes the new
  certificate active at once and schedules the old one's revocation one calendar month after
  the new one's issue date; the scheduler carries it out (gateway/lifecycle/scheduler.py).
  The old one's stored file and download link end at once, and an old one never downloaded
  (nobody can be using it) is revoked at once;
- stopping the service revokes at once; a certificate is never silently replaced;
- every revocation republishes the facility CA's CRL.

Every public method takes the acting identity (``actor``) for the audit log and reads the time
from the injected clock, so tests drive months in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog, AuditRecord
from gateway.clock import Clock, add_months, days_left, jst_date, system_clock
from gateway.config import Settings
from gateway.errors import ConfigError, Conflict, GatewayError, InvalidRequest, NotFound
from gateway.files import write_private
from gateway.lifecycle import delivery, fees, mailer
from gateway.lifecycle.facilities import (
    Facility,
    FacilityRegistry,
    certificate_json,
    certificate_status,
    normalize_serial,
    validate_institution_code,
)
from gateway.lifecycle.notice import NoticeFonts, PasswordNotice, jp_date, render_password_notice
from gateway.pki import csr_check, facility_ca
from gateway.pki.issue import CertAndKey
from gateway.store.db import Database
from gateway.store.schema import certificate_delivery, client_certificate, facility

log = logging.getLogger("gateway.certificates")

_REPLACED_LINK = "this download link is not valid (a resend replaces older links)"
EST_RENEWAL_REASON = "renewed by the facility's system (EST)"
# The reason a certificate renewed over EST carries until it is revoked (_schedule_replacement).
_EST_REPLACED = re.compile(r"replaced by ([0-9a-f]+) \(renewal\): " + re.escape(EST_RENEWAL_REASON))


@dataclass(frozen=True, kw_only=True)
class _Renewal:
    id: int
    serial_hex: str
    status: str
    facility_id: int | None


@dataclass(frozen=True, kw_only=True)
class _PendingDelivery:
    """A download window about to be stored with its certificate."""

    window: delivery.DeliveryWindow
    password_hash: str
    wrapped_p12: bytes


@dataclass(frozen=True, kw_only=True)
class IssueResult:
    """What an issuance did; no secrets unless ``hand_over`` (files written for the officer)."""

    serial: str
    institution_code: str
    terminal: str | None
    issued: str
    expires: str
    file_name: str
    outbox: str
    password_notice: str
    download_url: str | None = None
    download_expires: str | None = None
    mailed: bool = False
    mail_error: str | None = None
    replaced: list[dict[str, str]] = field(default_factory=list)
    fees: list[dict[str, Any]] = field(default_factory=list)
    hand_over: dict[str, str] | None = None

    def to_json_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_secrets:
            data.pop("hand_over")
        return data


@dataclass(frozen=True, kw_only=True)
class ResendResult:
    serial: str
    download_url: str
    download_expires: str
    round: int
    outbox: str
    mailed: bool
    mail_error: str | None


class ClientCertificateService:
    def notice_fonts(self) -> NoticeFonts:
        c = self.settings.certificates
        return NoticeFonts(
            mincho=c.notice_font_mincho, gothic=c.notice_font_gothic, mono=c.notice_font_mono
        )

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        audit: AuditLog,
        registry: FacilityRegistry | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit
        self.registry = registry or FacilityRegistry(db=db, audit=audit)
        self.clock = clock
        self._ca: CertAndKey | None = None
        self._wrapper: delivery.P12Wrapper | None = None
        if settings.pki.facility_ca_cert is not None:
            # A gateway that can issue stops at start-up, not at its first issuance, when a
            # font of the password notice is missing.
            self.notice_fonts().check()

    # -- configuration ----------------------------------------------------------------------

    @property
    def ca(self) -> CertAndKey:
        if self._ca is None:
            pki = self.settings.pki
            self._ca = facility_ca.load_ca(pki.facility_ca_cert, pki.facility_ca_key)
        return self._ca

    @property
    def wrapper(self) -> delivery.P12Wrapper:
        if self._wrapper is None:
            path = self.settings.certificates.delivery_key_file
            if path is None:
                raise ConfigError(
                    "certificates.delivery_key_file must be set to keep certificate files for "
                    "download (or hand the files over in person with --out)"
                )
            try:
                self._wrapper = delivery.P12Wrapper(path.read_bytes().strip())
            except OSError as e:
                raise ConfigError(
                    f"certificates.delivery_key_file: cannot read {path}: {e.strerror}"
                ) from e
        return self._wrapper

    @property
    def outbox(self) -> Path:
        return self.settings.certificates.outbox_dir

    def download_url(self, token: str) -> str:
        return f"{self.settings.delivery.public_url.rstrip('/')}/download/{token}"

    # -- issuance ---------------------------------------------------------------------------

    async def issue(
        self,
        institution_code: str,
        *,
        terminal: str | None = None,
        actor: str,
        hand_over_dir: Path | None = None,
        postage: str | None = None,
    ) -> IssueResult:
        """A new certificate for a facility that has no current one (or a new terminal).

        When the facility's (or the terminal's) last certificate expired, the new one is the
        costly way back: postage is charged as well as the licence fee (fees.py).
        """
        now = self.clock()
        fac = await self.registry.get(institution_code)
        async with self.db.read() as conn:
            await self.registry.check_one_current(conn, fac, terminal, now)
            if postage is None:
                rows = await self.registry.certificate_rows_in(
                    conn, fac.id, terminal=terminal if fac.per_terminal else None
                )
                if rows and all(certificate_status(r, now) == "expired" for r in rows):
                    postage = "expired"
        return await self._issue(
            fac,
            terminal=terminal,
            actor=actor,
            now=now,
            hand_over_dir=hand_over_dir,
            postage=postage,
        )

    async def rotate(
        self,
        institution_code: str,
        *,
        serial: str | None = None,
        terminal: str | None = None,
        new_code: str | None = None,
        reason: str | None = None,
        actor: str,
        hand_over_dir: Path | None = None,
        postage: str | None = None,
    ) -> IssueResult:
        """Reissue: new certificate now, the old one revoked one month after (scheduled).

        ``postage="notice_lost"``: the reissue replaces a certificate whose password notice was
        lost, which the source documents charge postage for."""
        now = self.clock()
        fac = await self.registry.get(institution_code)
        if new_code is not None:
            validate_institution_code(new_code)
            if new_code == fac.institution_code:
                raise InvalidRequest(f"facility {fac.institution_code} already has that code")
            if (new_code[2] == "4") != (fac.kind == "pharmacy"):
                raise InvalidRequest(
                    f"institution code {new_code} has fee table {new_code[2]}, which does not fit "
                    f"a facility of kind {fac.kind!r}"
                )
        elif fac.provisional:
            raise InvalidRequest(
                f"facility {fac.institution_code} is registered under a provisional code "
                "(仮コード): give the real code (--new-code) to rotate"
            )
        async with self.db.read() as conn:
            old = await self._rotation_target(conn, fac, serial=serial, terminal=terminal, now=now)
        kind = (
            "renewal"
            if new_code is None
            else ("provisional_to_real" if fac.provisional else "code_change")
        )
        return await self._issue(
            fac,
            terminal=old.terminal_label,
            actor=actor,
            now=now,
            hand_over_dir=hand_over_dir,
            replace=old,
            new_code=new_code,
            rotation_kind=kind,
            rotation_reason=reason,
            postage=postage,
            fee_event="reissue" if postage == "notice_lost" and kind == "renewal" else None,
        )

    async def _rotation_target(
        self,
        conn: AsyncConnection,
        fac: Facility,
        *,
        serial: str | None,
        terminal: str | None,
        now: datetime,
    ) -> Any:
        candidates = await self.registry.certificate_rows_in(
            conn, fac.id, serial=serial, terminal=terminal
        )
        rows = [r for r in candidates if certificate_status(r, now) == "active"]
        if serial is not None and not rows:
            raise NotFound(
                f"facility {fac.institution_code} has no current certificate {serial} "
                "(revoked, expired, already being replaced, or another facility's)"
            )
        if not rows:
            raise Conflict(
                f"facility {fac.institution_code} has no current certificate to rotate: "
                "issue a new one with issue-cert (after expiry a new issuance is needed)"
            )
        if len(rows) > 1:
            raise InvalidRequest(
                f"facility {fac.institution_code} has {len(rows)} current terminal certificates: "
                "name the one to rotate (serial or terminal)"
            )
        return rows[0]

    async def _issue(
        self,
        fac: Facility,
        *,
        terminal: str | None,
        actor: str,
        now: datetime,
        hand_over_dir: Path | None,
        replace: Any = None,
        new_code: str | None = None,
        rotation_kind: str | None = None,
        rotation_reason: str | None = None,
        postage: str | None = None,
        fee_event: str | None = None,
    ) -> IssueResult:
        # A missing font stops the issuance before a serial or a key is spent.
        self.notice_fonts().check()
        code = new_code or fac.institution_code
        file_name = self.settings.p12_file_name()
        material = await asyncio.to_thread(
            facility_ca.issue_material,
            self.ca,
            common_name=fac.name,
            institution_code=code,
            terminal_label=terminal,
            now=now,
            validity_months=self.settings.certificates.validity_months,
        )
        serial = material.serial_hex
        box = self.outbox / code / serial
        pending = None if hand_over_dir is not None else await self._new_delivery(material, now)
        window = pending.window if pending is not None else None
        notice_path = await self._write_notice(
            fac,
            code=code,
            provisional=fac.provisional and new_code is None,
            terminal=terminal,
            material=material,
            file_name=file_name,
            window=window,
            box=box,
            now=now,
        )
        try:
            replaced, charged = await self._register_issued(
                fac,
                material.cert,
                code=code,
                terminal=terminal,
                actor=actor,
                now=now,
                hand_over=hand_over_dir is not None,
                pending=pending,
                file_name=file_name,
                replace=replace,
                new_code=new_code,
                rotation_kind=rotation_kind,
                rotation_reason=rotation_reason,
                postage=postage,
                fee_event=fee_event,
            )
        except BaseException:
            shutil.rmtree(box, ignore_errors=True)
            raise
        hand_over = None
        if hand_over_dir is not None:
            files = facility_ca.write_material(material, hand_over_dir, file_name)
            hand_over = {
                "cert": str(files.cert_path),
                "key": str(files.key_path),
                "p12": str(files.p12_path),
                "p12_password": material.p12_password,
            }
        mailed, mail_error = False, None
        if window is not None:
            mailed, mail_error = await self._delivery_mails(fac, code, serial, window, box, now)
        return IssueResult(
            serial=serial,
            institution_code=code,
            terminal=terminal,
            issued=now.isoformat(),
            expires=material.cert.not_valid_after_utc.isoformat(),
            file_name=file_name,
            outbox=str(box),
            password_notice=str(notice_path),
            download_url=self.download_url(window.token) if window else None,
            download_expires=window.expires_at.isoformat() if window else None,
            mailed=mailed,
            mail_error=mail_error,
            replaced=replaced,
            fees=charged,
            hand_over=hand_over,
        )

    async def _new_delivery(
        self, material: facility_ca.ClientMaterial, now: datetime
    ) -> _PendingDelivery:
        """Download secrets and the wrapped PKCS#12 for a new download window."""
        token, download_password = delivery.new_secrets()
        return _PendingDelivery(
            window=delivery.DeliveryWindow(
                token=token,
                password=download_password,
                expires_at=now + timedelta(days=self.settings.certificates.download_days),
                round=1,
            ),
            password_hash=await asyncio.to_thread(delivery.hash_password, download_password),
            wrapped_p12=self.wrapper.wrap(material.p12, material.serial_hex),
        )

    async def _write_notice(
        self,
        fac: Facility,
        *,
        code: str,
        provisional: bool,
        terminal: str | None,
        material: facility_ca.ClientMaterial,
        file_name: str,
        window: delivery.DeliveryWindow | None,
        box: Path,
        now: datetime,
    ) -> Path:
        """Render the password notice and write it to the outbox (0600); returns its path."""
        notice_pdf = await asyncio.to_thread(
            render_password_notice,
            PasswordNotice(
                service_name=self.settings.service.name,
                facility_name=fac.name,
                institution_code=code,
                provisional=provisional,
                terminal_label=terminal,
                serial_hex=material.serial_hex,
                issued=now,
                expires=material.cert.not_valid_after_utc,
                file_name=file_name,
                download_expires=window.expires_at if window else None,
                p12_password=material.p12_password,
                recipient_name=fac.recipient_name,
            ),
            self.notice_fonts(),
        )
        # The paper half is written before the commit: if the outbox cannot be written, nothing
        # is registered (a certificate whose password nobody can read would be useless).
        notice_path = box / "password-notice.pdf"
        write_private(notice_path, notice_pdf)
        return notice_path

    async def _register_issued(
        self,
        fac: Facility,
        cert: x509.Certificate,
        *,
        code: str,
        terminal: str | None,
        actor: str,
        now: datetime,
        hand_over: bool,
        pending: _PendingDelivery | None,
        file_name: str,
        replace: Any,
        new_code: str | None,
        rotation_kind: str | None,
        rotation_reason: str | None,
        postage: str | None = None,
        delivery_kind: str | None = None,
        fee_event: str | None = None,
    ) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
        """One transaction: schedule (or carry out) the replaced certificate's revocation,
        register the new one, open its download window, charge its fees. Returns the replaced
        certificates and the fee entries."""
        replaced: list[dict[str, str]] = []
        serial = format(cert.serial_number, "x")
        async with self.db.write() as conn:
            # The facility's row first (_lock_in_order); register_in locks it again.
            await self.registry.lock_facility_in(conn, fac.id)
            if replace is not None:
                replaced.append(
                    await self._schedule_replacement(
                        conn,
                        fac,
                        replace,
                        new_serial=serial,
                        new_code=new_code,
                        kind=rotation_kind or "renewal",
                        reason=rotation_reason,
                        actor=actor,
                        now=now,
                    )
                )
            _, cert_id = await self.registry.register_in(
                conn,
                cert,
                institution_code=code,
                terminal_label=terminal,
                actor=actor,
                now=now,
                downloaded=hand_over,
                audit_detail={
                    "delivery": delivery_kind or ("hand_over" if hand_over else "download_link"),
                    "rotation": rotation_kind,
                    "replaces": [r["serial"] for r in replaced],
                },
            )
            if pending is not None:
                await delivery.create_in(
                    conn,
                    certificate_id=cert_id,
                    wrapped_p12=pending.wrapped_p12,
                    file_name=file_name,
                    now=now,
                    days=self.settings.certificates.download_days,
                    token=pending.window.token,
                    password_hash=pending.password_hash,
                )
            charged = await fees.charge_issuance_in(
                conn,
                self.settings,
                facility_id=fac.id,
                institution_code=code,
                serial=serial,
                event=fee_event or rotation_kind or "issue",
                postage=postage,
                now=now,
            )
            await self.audit.append(
                conn,
                action="fee.charge",
                actor=actor,
                facility_code=code,
                detail={"serial": serial, "entries": charged},
                now=now,
            )
        if any(r["status"] == "revoked" for r in replaced):
            await self.publish_crl()
        return replaced, charged

    async def _lock_in_order(
        self, conn: AsyncConnection, facility_id: int | None, certificate_id: int
    ) -> None:
        """Every lifecycle transaction that changes a certificate takes its locks in one order
        (PostgreSQL; SQLite has one writer): the facility's row, then the certificate's
        delivery (its file is dropped: a revoked or replaced certificate is never delivered),
        then the certificate's row, then the audit head. Two of them on the same facility
        (an officer's revocation, a rotation, a scheduled revocation, the end of the service)
        queue behind each other instead of deadlocking."""
        if facility_id is not None:
            await self.registry.lock_facility_in(conn, facility_id)
        await delivery.drop_file_in(conn, certificate_id)

    async def _schedule_replacement(
        self,
        conn: AsyncConnection,
        fac: Facility,
        old: Any,
        *,
        new_serial: str,
        new_code: str | None,
        kind: str,
        reason: str | None,
        actor: str,
        now: datetime,
    ) -> dict[str, str]:
        """The old certificate's file and link end now (a reissue after a lost notice must
        neutralise a notice and link that may be in other hands). Once downloaded, it stays
        valid for the overlap (the facility needs time to switch); never downloaded, nobody
        can be using it: revoked at once, audited and published as any revocation."""
        # The file first: this waits for (or defeats) a download committing meanwhile, so
        # downloaded_at read next is final.
        await delivery.drop_file_in(conn, old.id)
        downloaded = await self.registry.downloaded_at_in(conn, old.id) is not None
        overlap = self.settings.certificates.rotation_overlap_months
        revoke_at = add_months(now, overlap) if overlap and downloaded else now
        why = {
            "renewal": "renewal",
            "code_change": f"institution code change {fac.institution_code} → {new_code}",
            "provisional_to_real": (
                f"provisional code {fac.institution_code} → real code {new_code}"
            ),
        }[kind]
        text = f"replaced by {new_serial} ({why})" + (f": {reason}" if reason else "")
        if not await self.registry.schedule_revocation_in(
            conn, old.id, revoke_at=revoke_at, reason=text
        ):
            now_row = await self.registry.certificate_owner_in(conn, old.serial_hex)
            if now_row is not None and now_row.status == "revoked":
                raise Conflict(f"certificate {old.serial_hex} was revoked meanwhile")
            raise Conflict(f"certificate {old.serial_hex} is already being replaced")
        if new_code is not None:
            await self.registry.change_code_in(conn, fac.id, new_code)
        await self.audit.append(
            conn,
            action="client_certificate.rotate",
            actor=actor,
            facility_code=new_code or fac.institution_code,
            detail={
                "old_serial": old.serial_hex,
                "new_serial": new_serial,
                "kind": kind,
                "old_code": fac.institution_code,
                "new_code": new_code or fac.institution_code,
                "revoke_at": revoke_at.isoformat(),
                "downloaded": downloaded,
                "reason": reason,
            },
            now=now,
        )
        if not downloaded:
            await self.registry.revoke_in(
                conn, old.serial_hex, reason=text[:500], actor=actor, now=now
            )
        return {
            "serial": old.serial_hex,
            "revoke_at": revoke_at.isoformat(),
            "reason": text,
            "status": "revoked" if revoke_at <= now else "overlapping",
        }

    # -- renewal by the facility's own system (EST) -----------------------------------------

    async def renew_from_request(
        self, serial: str, request_body: bytes, *, actor: str, facility_code: str | None
    ) -> tuple[x509.Certificate, dict[str, Any]]:
        """Certify a key the facility made itself, replacing the certificate ``serial`` that
        authenticated the call (RFC 7030 simplereenroll).

        Refused with the reason (and audited) outside the renewal window, from a certificate
        already replaced, revoked or expired, and for a request that fails
        :func:`gateway.pki.csr_check.check_request` or reuses a key already certified. The
        replaced certificate follows the rotation rule (revoked one month after); the new
        one is delivered in the response (no file, no notice, no postage).
        """
        now = self.clock()
        serial = normalize_serial(serial)
        try:
            return await self._renew_from_request(serial, request_body, actor=actor, now=now)
        except GatewayError as e:
            await self.audit.append_alone(
                self.db,
                action="client_certificate.renewal_refused",
                actor=actor,
                facility_code=facility_code,
                detail={"serial": serial, "code": e.code, "reason": e.description[:300]},
                now=now,
            )
            raise

    async def _renew_from_request(
        self, serial: str, request_body: bytes, *, actor: str, now: datetime
    ) -> tuple[x509.Certificate, dict[str, Any]]:
        window = self.settings.certificates.renewal_window_days
        async with self.db.read() as conn:
            old, fac = await self.registry.certificate_and_facility_in(conn, serial)
        status = certificate_status(old, now)
        if status == "overlapping":
            repeated = await self._lost_answer(old, fac, request_body, actor=actor, now=now)
            if repeated is not None:
                return repeated, {"replaced": serial, "repeated": True}
            raise Conflict(
                f"certificate {serial} was already replaced ({old.revocation_reason}); renew "
                "with the newer certificate"
            )
        if status != "active":
            raise Conflict(
                f"certificate {serial} is {status}: a new certificate needs an application (再申請)"
            )
        left = days_left(old.not_after, now)
        if left > window:
            opens = jst_date(old.not_after) - timedelta(days=window)
            raise Conflict(
                f"certificate {serial} expires on {jst_date(old.not_after).isoformat()} "
                f"({left} days left): renewal opens {window} days before, on "
                f"{opens.isoformat()}"
            )
        current = x509.load_der_x509_certificate(old.certificate_der)
        csr = csr_check.decode_request(request_body)
        csr_check.check_request(
            csr, current=current, min_rsa_bits=self.settings.certificates.renewal_min_rsa_bits
        )
        if await self.registry.key_known(csr_check.spki_sha256(csr)):
            raise Conflict(
                "the request's key is already certified (the current or an earlier "
                "certificate): make a new key for every renewal"
            )
        cert = await asyncio.to_thread(
            facility_ca.certify_key,
            self.ca,
            csr.public_key(),
            common_name=fac.name,
            institution_code=fac.institution_code,
            terminal_label=old.terminal_label,
            now=now,
            validity_months=self.settings.certificates.validity_months,
        )
        _, charged = await self._register_issued(
            fac,
            cert,
            code=fac.institution_code,
            terminal=old.terminal_label,
            actor=actor,
            now=now,
            hand_over=True,
            pending=None,
            file_name=self.settings.p12_file_name(),
            replace=old,
            new_code=None,
            rotation_kind="renewal",
            rotation_reason=EST_RENEWAL_REASON,
            delivery_kind="est",
            fee_event="est_renewal",
        )
        if not fac.auto_renewal:
            # From now on the reminders tell this facility that renewal is automatic.
            await self.registry.set_policy(
                fac.institution_code, auto_renewal=True, actor=actor, now=now
            )
        return cert, {"replaced": serial, "fees": charged}

    async def _lost_answer(
        self, old: Any, fac: Facility, request_body: bytes, *, actor: str, now: datetime
    ) -> x509.Certificate | None:
        """The certificate that renewed ``old`` over EST, when the request is for its very key
        (proof of possession checked): the answer of a renewal that committed but never
        reached the facility, given again (audited), nothing issued. None otherwise."""
        m = _EST_REPLACED.fullmatch(old.revocation_reason or "")
        if m is None:
            return None
        current = x509.load_der_x509_certificate(old.certificate_der)
        try:
            csr = csr_check.decode_request(request_body)
            csr_check.check_request(
                csr, current=current, min_rsa_bits=self.settings.certificates.renewal_min_rsa_bits
            )
        except GatewayError:
            return None
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(client_certificate).where(client_certificate.c.serial_hex == m[1])
                )
            ).one_or_none()
        if (
            row is None
            or row.facility_id != old.facility_id
            or certificate_status(row, now) != "active"
            or row.spki_sha256 != csr_check.spki_sha256(csr)
        ):
            return None
        await self.audit.append_alone(
            self.db,
            action="client_certificate.renewal_repeated",
            actor=actor,
            facility_code=fac.institution_code,
            detail={"serial": old.serial_hex, "new_serial": row.serial_hex},
            now=now,
        )
        return x509.load_der_x509_certificate(row.certificate_der)

    # -- delivery ---------------------------------------------------------------------------

    async def _delivery_mails(
        self,
        fac: Facility,
        code: str,
        serial: str,
        window: delivery.DeliveryWindow,
        box: Path,
        now: datetime,
    ) -> tuple[bool, str | None]:
        """The two separate mails: the link, then the download password (never together)."""
        service = self.settings.service.name
        sender = self.settings.smtp.sender
        to = fac.contact_email
        prefix = "" if window.round == 1 else f"resend-{window.round}-"
        link = mailer.build(
            sender=sender,
            to=to,
            subject=f"【{service}】クライアント証明書ファイル受取のご案内（{code}）",
            body=(
                f"{fac.name} {fac.recipient_name or 'ご担当者'}様\n\n"
                f"{service} に接続するためのクライアント証明書ファイル"
                f"（{self.settings.p12_file_name()}）をお届けします。\n"
                "下記のリンクからダウンロードしてください。\n\n"
                f"  {self.download_url(window.token)}\n\n"
                f"証明書シリアル番号: {serial}\n"
                f"ダウンロード有効期限: {jp_date(window.expires_at)}"
                f"（{self.settings.certificates.download_days}日間）\n\n"
                "ダウンロード用パスワードは、この後に届く別のメールでお知らせします。\n"
                "証明書を設定するためのパスワードは、郵送する「パスワード通知書」に記載しています。\n"
                f"パスワードを{self.settings.certificates.max_download_attempts}回間違えると"
                "リンクはロックされます。期限切れ・ロックの場合は再送をご依頼ください。\n"
            ),
        )
        pwd = mailer.build(
            sender=sender,
            to=to,
            subject=f"【{service}】ダウンロード用パスワードのお知らせ（{code}）",
            body=(
                f"{fac.name} ご担当者様\n\n"
                f"先にお送りしたクライアント証明書ファイル（シリアル番号 {serial}）の"
                "ダウンロード用パスワードです。\n\n"
                f"  ダウンロード用パスワード: {window.password}\n\n"
                "このパスワードは、証明書を設定するためのパスワード（郵送のパスワード通知書）"
                "とは異なります。\n"
            ),
        )
        mailer.write_eml(box / f"{prefix}mail-1-download-link.eml", link)
        mailer.write_eml(box / f"{prefix}mail-2-download-password.eml", pwd)
        if not mailer.smtp_configured(self.settings) or not to:
            return False, None
        try:
            await asyncio.to_thread(mailer.send, self.settings, link)
            await asyncio.to_thread(mailer.send, self.settings, pwd)
        except GatewayError as e:
            log.warning("delivery mail for %s not sent: %s", serial, e.description)
            return False, e.description
        await self.audit.append_alone(
            self.db,
            action="delivery.mailed",
            actor="system:mailer",
            facility_code=code,
            detail={"serial": serial, "round": window.round, "to": to},
            now=now,
        )
        return True, None

    async def resend(self, serial: str, *, actor: str) -> ResendResult:
        """A new 14-day window: new link, new download password, attempts reset."""
        now = self.clock()
        serial = normalize_serial(serial)
        # The scrypt verifier is made off the event loop, before the write transaction.
        fresh = await asyncio.to_thread(delivery.make_secrets)
        async with self.db.write() as conn:
            cert, fac = await self.registry.certificate_and_facility_in(conn, serial)
            row = await delivery.delivery_for_certificate(conn, cert.id)
            if certificate_status(cert, now) == "overlapping":
                raise Conflict(
                    f"certificate {serial} is no longer the facility's current certificate "
                    f"({cert.revocation_reason}); resend the current certificate's link instead"
                )
            if row.downloaded_at is not None:
                raise Conflict(
                    f"certificate {serial} was downloaded on "
                    f"{row.downloaded_at.isoformat(timespec='seconds')}; the file is no longer "
                    "kept: if it is lost, reissue (rotate-cert)"
                )
            if certificate_status(cert, now) in ("revoked", "expired") or row.p12_wrapped is None:
                raise Conflict(f"certificate {serial} is {certificate_status(cert, now)}")
            window = await delivery.reset_window_in(
                conn,
                delivery_id=row.id,
                now=now,
                days=self.settings.certificates.download_days,
                fresh=fresh,
            )
            await self.audit.append(
                conn,
                action="delivery.resend",
                actor=actor,
                facility_code=fac.institution_code,
                detail={
                    "serial": serial,
                    "round": window.round,
                    "expires_at": window.expires_at.isoformat(),
                },
                now=now,
            )
        box = self.outbox / fac.institution_code / serial
        mailed, err = await self._delivery_mails(
            fac, fac.institution_code, serial, window, box, now
        )
        return ResendResult(
            serial=serial,
            download_url=self.download_url(window.token),
            download_expires=window.expires_at.isoformat(),
            round=window.round,
            outbox=str(box),
            mailed=mailed,
            mail_error=err,
        )

    async def download(self, token: str, password: str, *, remote: str | None) -> tuple[str, bytes]:
        """The one-time download; counts wrong passwords and locks the link at the limit."""
        now = self.clock()
        link = await self._reserve_check(token, now)
        ok = await asyncio.to_thread(delivery.verify_password, password, link.password_hash)
        if not ok:
            await self._wrong_download_password(link, now, remote=remote)
        return await self._consume(link, now, remote=remote)

    @staticmethod
    def _link_clauses(link: Any) -> tuple[Any, Any]:
        """SQL: the link row while its token is unchanged (``mine``), and while it is open."""
        mine = and_(
            certificate_delivery.c.id == link.id,
            certificate_delivery.c.token_hash == link.token_hash,
        )
        open_link = and_(
            mine,
            certificate_delivery.c.locked_at.is_(None),
            certificate_delivery.c.downloaded_at.is_(None),
        )
        return mine, open_link

    async def _reserve_check(self, token: str, now: datetime) -> Any:
        """The download's first step: the link (refused if it cannot be used now) and one
        password check reserved on it. Returns the link row."""
        max_attempts = self.settings.certificates.max_download_attempts
        th = delivery.token_hash(token)
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(
                        certificate_delivery,
                        client_certificate.c.serial_hex,
                        client_certificate.c.status.label("cert_status"),
                        client_certificate.c.revoke_at.label("cert_revoke_at"),
                        facility.c.institution_code,
                    )
                    .select_from(
                        certificate_delivery.join(client_certificate).outerjoin(
                            facility, facility.c.id == client_certificate.c.facility_id
                        )
                    )
                    .where(certificate_delivery.c.token_hash == th)
                )
            ).one_or_none()
        if row is None:
            raise NotFound(_REPLACED_LINK)
        delivery.refuse_unavailable(
            row,
            row.cert_status,
            now,
            max_attempts,
            replaced=row.cert_revoke_at is not None,
        )
        # Reserve a check BEFORE the (slow) password check, atomically: at most max_attempts
        # guesses are ever checked, however many arrive at once (delivery.ATTEMPTS). The right
        # password gives its reservation back when it consumes the file.
        _, open_link = self._link_clauses(row)
        async with self.db.write() as conn:
            reserved = await delivery.ATTEMPTS.reserve(conn, open_link, max_attempts)
        if not reserved:
            await self._refuse_now(th, now, max_attempts)
            raise delivery.locked_error(max_attempts)
        return row

    async def _wrong_download_password(
        self, link: Any, now: datetime, *, remote: str | None
    ) -> NoReturn:
        """The reserved check found a wrong password: counted and audited; the last one locks.

        A resend may have replaced the link while the password was checked: the guess is then
        audited against the certificate but not counted against the new link, and answered as
        the replaced link is."""
        from gateway.errors import WrongPassword

        max_attempts = self.settings.certificates.max_download_attempts
        mine, open_link = self._link_clauses(link)
        async with self.db.write() as conn:
            counted = await delivery.ATTEMPTS.failed_check(
                conn, mine, open_link, max_attempts, lock={"locked_at": now}
            )
            failed, locked = counted if counted is not None else (None, False)
            await self.audit.append(
                conn,
                action="delivery.locked" if locked else "delivery.wrong_password",
                actor=f"download:{remote or 'unknown'}",
                facility_code=link.institution_code,
                detail={"serial": link.serial_hex, "failed_attempts": failed}
                | ({} if counted is not None else {"link": "replaced meanwhile"}),
                now=now,
            )
        if failed is None:
            raise NotFound(_REPLACED_LINK)
        if failed >= max_attempts:
            raise delivery.locked_error(max_attempts)
        raise WrongPassword(
            f"wrong download password ({max_attempts - failed} attempts left before the link locks)"
        )

    async def _consume(self, link: Any, now: datetime, *, remote: str | None) -> tuple[str, bytes]:
        """The right password: the file leaves the store (once), the download is audited."""
        max_attempts = self.settings.certificates.max_download_attempts
        mine, _ = self._link_clauses(link)
        async with self.db.write() as conn:
            res2 = await conn.execute(
                update(certificate_delivery)
                .where(
                    and_(
                        mine,
                        certificate_delivery.c.downloaded_at.is_(None),
                        certificate_delivery.c.locked_at.is_(None),
                        certificate_delivery.c.p12_wrapped.is_not(None),
                    )
                )
                .values(
                    p12_wrapped=None,
                    downloaded_at=now,
                    checking_attempts=certificate_delivery.c.checking_attempts - 1,
                )
            )
            if res2.rowcount != 1:
                # Locked by a concurrent wrong guess meanwhile: the same answer as any guess
                # after the lock, so a late right password is not revealed.
                await self._refuse_in(conn, link.token_hash, now, max_attempts)
                raise Conflict("this download link was used or changed a moment ago")
            p12 = self.wrapper.unwrap(link.p12_wrapped, link.serial_hex)
            await self._released(
                conn,
                certificate_id=link.certificate_id,
                now=now,
                action="delivery.download",
                actor=f"download:{remote or 'unknown'}",
                facility_code=link.institution_code,
                detail={"serial": link.serial_hex, "round": link.rounds},
            )
        return link.file_name, p12

    async def _released(
        self,
        conn: AsyncConnection,
        *,
        certificate_id: int,
        now: datetime,
        action: str,
        actor: str,
        facility_code: str | None,
        detail: dict[str, Any],
    ) -> None:
        """The file left the store (download or export): the status records when, audited."""
        await self.registry.mark_downloaded_in(conn, certificate_id, now)
        await self.audit.append(
            conn, action=action, actor=actor, facility_code=facility_code, detail=detail, now=now
        )

    async def _refuse_now(self, th: str, now: datetime, max_attempts: int) -> None:
        """Raise why the link with token hash ``th`` cannot be used now (re-read), if any."""
        async with self.db.read() as conn:
            await self._refuse_in(conn, th, now, max_attempts)

    @staticmethod
    async def _refuse_in(conn: AsyncConnection, th: str, now: datetime, max_attempts: int) -> None:
        """:meth:`_refuse_now` in the caller's transaction: inside a write transaction, no
        second pooled connection is taken while this one is held (PostgreSQL's pool is
        bounded; writers each waiting for a reader would stall it)."""
        row = await delivery.link_state_in(conn, th)
        if row is None:
            raise NotFound(_REPLACED_LINK)
        delivery.refuse_unavailable(
            row, row.cert_status, now, max_attempts, replaced=row.cert_revoke_at is not None
        )

    async def export_p12(self, serial: str, *, actor: str) -> tuple[str, bytes]:
        """Take the stored file out for an officer's own transfer; counts as the download."""
        now = self.clock()
        serial = normalize_serial(serial)
        async with self.db.write() as conn:
            cert, fac = await self.registry.certificate_and_facility_in(conn, serial)
            row = await delivery.delivery_for_certificate(conn, cert.id)
            # An officer's export ignores the link's window and lock (those guard the link).
            delivery.refuse_unavailable(
                row,
                cert.status,
                now,
                self.settings.certificates.max_download_attempts,
                check_window=False,
                replaced=cert.revoke_at is not None,
            )
            p12 = self.wrapper.unwrap(row.p12_wrapped, serial)
            await delivery.export_file_in(conn, row.id, now)
            await self._released(
                conn,
                certificate_id=cert.id,
                now=now,
                action="delivery.export",
                actor=actor,
                facility_code=fac.institution_code,
                detail={"serial": serial},
            )
        return row.file_name, p12

    # -- revocation -------------------------------------------------------------------------

    async def revoke(
        self, serial: str, *, reason: str, actor: str, with_renewals: bool = False
    ) -> dict[str, Any]:
        """Revoke at once. A certificate renewed over EST lives on in its renewal, whose key
        whoever held this certificate made (a thief too): the answer names those still valid
        (``renewals``), and ``with_renewals`` revokes them as well, even when this certificate
        itself was revoked already (its scheduled revocation came)."""
        if not reason.strip():
            raise InvalidRequest("a revocation needs a reason")
        now = self.clock()
        serial = normalize_serial(serial)
        text = reason.strip()
        async with self.db.write() as conn:
            target = await self.registry.certificate_owner_in(conn, serial)
            if target is None:
                raise NotFound(f"client certificate {serial} is not registered")
            # The lock order (_lock_in_order): the facility first, then every file, then the
            # certificates and the audit head (the revocations' records appended together,
            # last). Under the facility's lock a renewal either committed or waits for us.
            if target.facility_id is not None:
                await self.registry.lock_facility_in(conn, target.facility_id)
                target = await self.registry.certificate_owner_in(conn, serial)
            renewals = await self._est_renewals_in(conn, serial)
            if target.status == "revoked" and not (with_renewals and renewals):
                into = ", ".join(r.serial_hex for r in renewals)
                raise Conflict(
                    f"client certificate {serial} was already revoked"
                    + (
                        f"; it was renewed over EST into {into} (still valid): revoke "
                        "with_renewals (--with-renewals) to end those"
                        if renewals
                        else ""
                    )
                )
            ending = [target, *renewals] if with_renewals else [target]
            for r in ending:
                await delivery.drop_file_in(conn, r.id)
            records: list[AuditRecord] = []
            if target.status != "revoked":
                await self.registry.revoke_in(
                    conn, serial, reason=text, actor=actor, now=now, audit_later=records
                )
            if with_renewals:
                for r in renewals:
                    await self.registry.revoke_in(
                        conn,
                        r.serial_hex,
                        reason=f"renewed over EST from revoked {serial}: {text}"[:500],
                        actor=actor,
                        now=now,
                        audit_later=records,
                    )
            await self.audit.append_many(conn, records)
        await self.publish_crl()
        return {
            "serial": serial,
            "status": "revoked",
            "revoked_at": now.isoformat(),
            "reason": reason,
            "renewals": [
                {"serial": r.serial_hex, "status": "revoked" if with_renewals else "active"}
                for r in renewals
            ],
        }

    async def _est_renewals_in(self, conn: AsyncConnection, serial: str) -> list[Any]:
        """The certificates, not revoked, that renewed ``serial`` over EST, and theirs in turn
        (each replaced one's reason names its replacement: :meth:`_schedule_replacement`)."""
        out: list[Any] = []
        seen = {serial}
        current = serial
        while True:
            row = (
                await conn.execute(
                    select(client_certificate.c.revocation_reason).where(
                        client_certificate.c.serial_hex == current
                    )
                )
            ).one_or_none()
            m = _EST_REPLACED.fullmatch((row.revocation_reason or "") if row else "")
            if m is None or m.group(1) in seen:
                return out
            current = m.group(1)
            seen.add(current)
            nxt = await self.registry.certificate_owner_in(conn, current)
            if nxt is None:
                return out
            if nxt.status != "revoked":
                out.append(
                    _Renewal(
                        id=nxt.id,
                        serial_hex=current,
                        status=nxt.status,
                        facility_id=nxt.facility_id,
                    )
                )

    async def stop_service(self, institution_code: str, *, reason: str, actor: str) -> list[str]:
        """The facility stops using the service: every certificate is revoked at once."""
        if not reason.strip():
            raise InvalidRequest("stopping the service needs a reason")
        now = self.clock()
        text = f"service stopped: {reason.strip()}"
        async with self.db.write() as conn:
            fac = await self.registry.get_in(conn, institution_code, for_update=True)
            if fac.status == "stopped":
                raise Conflict(f"facility {institution_code} has already stopped the service")
            rows = await self.registry.active_certificates_in(conn, fac.id)
            # The lock order (_lock_in_order): every file, then every certificate (each
            # revocation appends to the audit, whose head stays locked from the first on).
            for r in rows:
                await delivery.drop_file_in(conn, r.id)
            records: list[AuditRecord] = []
            for r in rows:
                await self.registry.revoke_in(
                    conn, r.serial_hex, reason=text, actor=actor, now=now, audit_later=records
                )
            await self.registry.stop_in(conn, fac.id, reason=text, now=now)
            records.append(
                AuditRecord(
                    action="facility.stop",
                    actor=actor,
                    facility_code=institution_code,
                    detail={"reason": reason, "revoked": [r.serial_hex for r in rows]},
                    now=now,
                )
            )
            # Last, in one move of the head: signatures wait for it no longer than that.
            await self.audit.append_many(conn, records)
        await self.publish_crl()
        return [r.serial_hex for r in rows]

    async def revoke_due(self, *, actor: str = "system:scheduler") -> list[str]:
        """Carry out scheduled revocations whose time has come (idempotent, any worker)."""
        now = self.clock()
        due = await self.registry.due_revocations(now)
        done = []
        for r in due:
            async with self.db.write() as conn:
                await self._lock_in_order(conn, r.facility_id, r.id)
                if not await self.registry.revoke_scheduled_in(conn, r.id, r.revoke_at):
                    continue  # another worker got there first
                await self.audit.append(
                    conn,
                    action="client_certificate.revoke_scheduled",
                    actor=actor,
                    facility_code=r.institution_code,
                    detail={
                        "serial": r.serial_hex,
                        "revoke_at": r.revoke_at.isoformat(),
                        "reason": r.revocation_reason,
                    },
                    now=now,
                )
            done.append(r.serial_hex)
        if done:
            await self.publish_crl()
        return done

    # -- CRL --------------------------------------------------------------------------------

    #: A publication re-reads the store after writing and writes again while it missed a
    #: revocation (another worker's, committed meanwhile); past this many rounds the
    #: scheduler's next run completes it (:meth:`refresh_crl`).
    CRL_PUBLISH_ROUNDS = 5

    async def _crl_entries(
        self, now: datetime
    ) -> list[tuple[int, datetime, x509.ReasonFlags | None]]:
        """What the CRL must list now: the store's revoked, unexpired certificates of this CA."""
        rows = await self.registry.revoked_unexpired(now)
        ca = self.ca
        entries = []
        for r in rows:
            if x509.load_der_x509_certificate(r.certificate_der).issuer != ca.cert.subject:
                continue
            text = r.revocation_reason or ""
            reason = (
                x509.ReasonFlags.superseded
                if text.startswith("replaced by")
                else x509.ReasonFlags.cessation_of_operation
                if text.startswith("service stopped")
                else None
            )
            entries.append((int(r.serial_hex, 16), r.revoked_at or now, reason))
        return entries

    async def publish_crl(self) -> Path | None:
        """Rewrite the facility CA's CRL from the store (all revoked, unexpired certificates).

        Workers publish independently and the last rename wins: a worker that read the store
        before another's revocation committed may rename its file over the other's. So after
        writing, the store is read again, and the CRL written again while it lacks a serial
        the store has revoked: the last writer's file then lists every revocation."""
        path = self.settings.pki.facility_crl
        if path is None:
            return None
        now = self.clock()
        entries = await self._crl_entries(now)
        for _ in range(self.CRL_PUBLISH_ROUNDS):
            await asyncio.to_thread(
                facility_ca.publish_crl,
                self.ca,
                path,
                revoked=entries,
                now=now,
                validity=timedelta(hours=self.settings.pki.crl_validity_hours),
            )
            written = {serial for serial, _, _ in entries}
            now = self.clock()
            entries = await self._crl_entries(now)
            if written >= {serial for serial, _, _ in entries}:
                return path
        log.warning(
            "the facility CRL kept missing revocations for %d rounds; the scheduler completes it",
            self.CRL_PUBLISH_ROUNDS,
        )
        return path

    async def refresh_crl(self) -> bool:
        """Republish when the CRL is missing, its nextUpdate is within crl_refresh_hours, or
        it lacks a revocation the store has (a publication that failed or was overwritten)."""
        path = self.settings.pki.facility_crl
        if path is None:
            return False
        pki = self.settings.pki
        # Without the CA configured nothing can be compared or published: as before, only
        # a CRL near its nextUpdate (or missing) is an error to report.
        ca = self.ca if pki.facility_ca_cert and pki.facility_ca_key else None
        published = await asyncio.to_thread(facility_ca.crl_contents, path, ca)
        margin = timedelta(hours=pki.crl_refresh_hours)
        now = self.clock()
        if published is not None and published.next_update - now > margin:
            if ca is None:
                return False
            wanted = {serial for serial, _, _ in await self._crl_entries(now)}
            if wanted <= published.serials:
                return False
        await self.publish_crl()
        return True

    # -- status inquiry ---------------------------------------------------------------------

    async def status(self, institution_code: str) -> dict[str, Any]:
        now = self.clock()
        fac = await self.registry.get(institution_code)
        certs = await self.registry.certificates(fac.institution_code, now=now)
        return {
            "institution_code": fac.institution_code,
            "name": fac.name,
            "status": fac.status,
            "provisional": fac.provisional,
            "certificates": certs,
        }

    async def expiring(self, within_days: int) -> list[dict[str, Any]]:
        """Active or overlapping facility certificates expiring within ``within_days`` (JST)."""
        if within_days < 0:
            raise InvalidRequest("--within must be 0 or more days")
        now = self.clock()
        rows = await self.registry.expiring_rows(now, now + timedelta(days=within_days + 1))
        out = []
        for r in rows:
            dl = days_left(r.not_after, now)
            st = certificate_status(r, now)
            if dl > within_days or st == "revoked":
                continue
            out.append(
                {
                    "institution_code": r.institution_code,
                    "name": r.name,
                    **certificate_json(r, now),
                    "expiry_date": jst_date(r.not_after).isoformat(),
                    "days_left": dl,
                }
            )
        return out
