"""My Number card (JPKI) signer presence: the card signs a challenge bound to what is signed.

Only the card's user-authentication key is used (利用者証明用, HPKI.md §4). Begin
(``authenticate_begin``) returns a 48-byte challenge built exactly as for FIDO2:
``nonce(16) || SHA-256(canonical binding of credential, algorithm, sorted hashes, count)``;
its state (single use, short TTL) is kept server-side with the challenge bytes. The card
client signs SHA-256 of those 48 bytes (RSA PKCS#1 v1.5) and sends, as
``authData [{"id": "jpki", "value": "{certificate, signature, challenge_id}"}]``:

- the challenge is looked up by id and its binding recomputed from the authorize request
  (constant time): other hashes, count, algorithm or credential are refused;
- the signature is verified over the stored challenge bytes with the certificate's key;
- the certificate must be issued (signature checked) by one of the configured anchors. All
  JPKI roots share one DN, so an anchor is a match only when its KEY verifies the certificate
  (``verify_directly_issued_by``), never by name: a rogue CA with the same DN fails;
- validity now, digitalSignature key usage, then revocation through the configured source
  (:mod:`gateway.auth.jpki_revocation`); when the source cannot answer, refused unless the
  operator set ``jpki.on_revocation_unavailable = "accept"`` (audited as such); a responder
  that answers "unknown" (no record of the certificate) is refused in any case;
- the certificate must be linked to the challenge's signer by its public key AND its issuer
  and serial (a renewed card has a new key and serial: it needs a new link).

Links are made by an officer after an identity check (``signer link-jpki``, admin API) or by
the doctor with the enrolment code + password (proof of possession: the card signs a register
challenge). Every step is audited. Nothing here touches signing keys (``auth/`` rule): it
returns who was present; the activation turns that into a SAD.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import safe_json
from gateway.audit import AuditLog
from gateway.auth import presence
from gateway.auth.challenges import (
    JPKI_CHALLENGES,
    Approval,
    approves,
    check_issued_for,
    enrollment_binding,
    new_bound_challenge,
)
from gateway.auth.fido2 import Caller, Fido2Authenticator, use_enrollment
from gateway.auth.jpki_revocation import JpkiRevocationSource
from gateway.clock import Clock, system_clock
from gateway.errors import AccessDenied, Conflict, GatewayError, InvalidRequest
from gateway.signing.grant import PRESENCE_JPKI, Grant, IssuedSad
from gateway.signing.ledger import SadLedger
from gateway.store.db import Database
from gateway.store.schema import jpki_binding

AUTH_DATA_ID = "jpki"
MAX_CERT_BYTES = 8192


@dataclass(frozen=True, kw_only=True)
class JpkiAuthorization:
    """The parsed ``authData`` value."""

    certificate: x509.Certificate
    certificate_der: bytes
    signature: bytes
    challenge_id: str


@dataclass(frozen=True, kw_only=True)
class CheckedCertificate:
    cert: x509.Certificate
    der: bytes
    anchor: x509.Certificate
    spki_sha256: str
    revocation: str  # "good" | "unavailable-accepted"


@dataclass(frozen=True, kw_only=True)
class JpkiPresence:
    """A verified card signature: this signer was present and approved exactly ``binding``."""

    signer_id: str
    binding_id: str
    challenge_id: str
    revocation: str


@dataclass(frozen=True, kw_only=True)
class JpkiLink:
    id: str
    signer_id: str
    issuer: str
    serial: str
    spki_sha256: str
    not_after: datetime
    label: str | None
    created_at: datetime
    last_used_at: datetime | None

    def to_json_dict(self) -> dict[str, Any]:
        return presence.json_dict(self)


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def load_certificate(data: bytes) -> x509.Certificate:
    """DER or PEM; a clear 400 otherwise."""
    if len(data) > MAX_CERT_BYTES * 2:
        raise InvalidRequest("the certificate is too large")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise InvalidRequest("the certificate is not a DER or PEM X.509 certificate") from e


def parse_auth_data(auth_data: Sequence[Mapping[str, Any]]) -> JpkiAuthorization | None:
    """The ``jpki`` item of ``authData`` (None when there is none)."""
    for item in auth_data:
        if item.get("id") != AUTH_DATA_ID:
            continue
        value = item.get("value")
        if isinstance(value, str):
            # The bounded loader, as for the webauthn value: a value nested past its depth or
            # with an integer past Python's digit limit is a 400, not RecursionError / ValueError.
            try:
                value = safe_json.loads(value, what="the jpki value")
            except InvalidRequest as e:
                raise InvalidRequest(f"Invalid parameter authData: {e.description}") from e
        if not isinstance(value, dict):
            break
        cert_b64, sig_b64, cid = (
            value.get("certificate"),
            value.get("signature"),
            value.get("challenge_id"),
        )
        if not (isinstance(cert_b64, str) and isinstance(sig_b64, str) and isinstance(cid, str)):
            break
        if len(cert_b64) > MAX_CERT_BYTES * 2 or len(sig_b64) > 2048 or len(cid) > 128:
            raise InvalidRequest("Invalid parameter authData: jpki value too large")
        if not (cid.isascii() and cid.isprintable()):
            # Ids are hex; a lone surrogate (a JSON "\udcff") cannot even be looked up or
            # burnt in the store (UnicodeEncodeError: a 500 with the refusal unrecorded).
            raise InvalidRequest(
                "Invalid parameter authData: the jpki challenge_id is not printable ASCII"
            )
        try:
            der = base64.b64decode(cert_b64, validate=True)
            sig = base64.b64decode(sig_b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidRequest(
                "Invalid parameter authData: jpki certificate/signature are not base64"
            ) from e
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as e:
            raise InvalidRequest(
                "Invalid parameter authData: the jpki certificate is not DER X.509"
            ) from e
        return JpkiAuthorization(
            certificate=cert, certificate_der=der, signature=sig, challenge_id=cid
        )
    if any(item.get("id") == AUTH_DATA_ID for item in auth_data):
        raise InvalidRequest(
            'Invalid parameter authData: expected {"id": "jpki", "value": "<JSON: certificate, '
            'signature, challenge_id>"}'
        )
    return None


def card_key(cert: x509.Certificate) -> rsa.RSAPublicKey:
    """The card certificate's RSA key, or a 400 that names why not.

    The certificate is the client's: its SubjectPublicKeyInfo may name an algorithm
    cryptography cannot load (``UnsupportedAlgorithm``, e.g. 1.2.840.113549.1.1.99) or hold
    a key it refuses (``ValueError``); either was a 500 that skipped the refusal's record.
    """
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as e:
        raise InvalidRequest(
            "the JPKI authentication certificate's key cannot be read (algorithm "
            f"{cert.public_key_algorithm_oid.dotted_string}): a card's key is RSA"
        ) from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidRequest("the JPKI authentication certificate does not hold an RSA key")
    return key


def verify_card_signature(cert: x509.Certificate, challenge: bytes, signature: bytes) -> None:
    key = card_key(cert)
    try:
        key.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as e:
        raise InvalidRequest(
            "the card signature does not verify over this challenge (signed another challenge, "
            "or another card)"
        ) from e


class JpkiAuthenticator(presence.PresenceMethod):
    """Links, challenges and verification of My Number card authentication signatures."""

    challenges = JPKI_CHALLENGES

    def __init__(
        self,
        *,
        db: Database,
        audit: AuditLog,
        fido2: Fido2Authenticator,
        ledger: SadLedger,
        trust_anchors: Sequence[x509.Certificate],
        revocation: JpkiRevocationSource,
        on_revocation_unavailable: Literal["refuse", "accept"] = "refuse",
        challenge_ttl: timedelta = timedelta(seconds=120),
        sad_ttl: timedelta = timedelta(seconds=300),
        clock: Clock = system_clock,
    ) -> None:
        self.db = db
        self.audit = audit
        self.fido2 = fido2  # enrolment codes are shared with FIDO2 (one code, one device)
        self.ledger = ledger  # the one SAD ledger: card grants are stored and spent as FIDO2's
        self.sad_ttl = sad_ttl
        self.trust_anchors = list(trust_anchors)
        self.revocation = revocation
        self.on_revocation_unavailable = on_revocation_unavailable
        self.challenge_ttl = challenge_ttl
        self.clock = clock

    # -- certificate checks -----------------------------------------------------------------

    def _issuer_by_key(self, cert: x509.Certificate, now: datetime) -> x509.Certificate:
        for anchor in self.trust_anchors:
            try:
                cert.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if anchor.not_valid_before_utc <= now < anchor.not_valid_after_utc:
                return anchor
        raise AccessDenied(
            "the JPKI certificate is not issued by a configured JPKI authentication trust "
            "anchor (checked by key, not by name)"
        )

    async def check_certificate(self, cert: x509.Certificate, now: datetime) -> CheckedCertificate:
        """Path (by key), validity, key usage, revocation. Network I/O: call outside a txn."""
        card_key(cert)  # a key that cannot be read is a 400 before anything uses it
        anchor = self._issuer_by_key(cert, now)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise AccessDenied(
                "the JPKI certificate is expired or not yet valid "
                f"(valid {cert.not_valid_before_utc.date()} .. {cert.not_valid_after_utc.date()})"
            )
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.digital_signature:
                raise AccessDenied("the JPKI certificate is not for digital signatures")
        except x509.ExtensionNotFound:
            pass
        status = await self.revocation.status(cert, anchor, now)
        if status.status == "revoked":
            raise AccessDenied(f"the JPKI certificate is revoked ({status.reason})")
        if status.status == "unrecognized":
            # The responder answered that it has no record of this certificate: an answer, not
            # an outage, so the fallback for a source that cannot answer does not apply.
            raise AccessDenied(
                f"the JPKI certificate is not known to the revocation source ({status.reason}); "
                "refused whatever jpki.on_revocation_unavailable says"
            )
        revocation = "good"
        if status.status != "good":
            if self.on_revocation_unavailable != "accept":
                raise AccessDenied(
                    "the revocation status of the JPKI certificate cannot be checked now "
                    f"({status.reason}); refused (jpki.on_revocation_unavailable = refuse)"
                )
            revocation = "unavailable-accepted"
        der = cert.public_bytes(serialization.Encoding.DER)
        return CheckedCertificate(
            cert=cert, der=der, anchor=anchor, spki_sha256=spki_sha256(cert), revocation=revocation
        )

    # -- links ------------------------------------------------------------------------------

    async def _insert_link(
        self,
        conn: AsyncConnection,
        *,
        signer_id: str,
        checked: CheckedCertificate,
        label: str | None,
        now: datetime,
    ) -> JpkiLink:
        link_id = f"jpki-{secrets.token_hex(8)}"
        cert = checked.cert
        try:
            await conn.execute(
                insert(jpki_binding).values(
                    id=link_id,
                    signer_id=signer_id,
                    spki_sha256=checked.spki_sha256,
                    issuer=cert.issuer.rfc4514_string()[:500],
                    serial=f"{cert.serial_number:x}",
                    certificate_der=checked.der,
                    not_after=cert.not_valid_after_utc,
                    label=label,
                    created_at=now,
                )
            )
        except IntegrityError as e:
            raise Conflict("this My Number card is already linked to a signer") from e
        return JpkiLink(
            id=link_id,
            signer_id=signer_id,
            issuer=cert.issuer.rfc4514_string(),
            serial=f"{cert.serial_number:x}",
            spki_sha256=checked.spki_sha256,
            not_after=cert.not_valid_after_utc,
            label=label,
            created_at=now,
            last_used_at=None,
        )

    async def link(
        self, signer_id: str, cert_data: bytes, *, actor: str, label: str | None = None
    ) -> JpkiLink:
        """Officer path, after an identity check: link the card's authentication certificate."""
        now = self.clock()
        cert = load_certificate(cert_data)
        try:
            checked = await self.check_certificate(cert, now)
        except GatewayError as e:
            await self.audit.append_alone(
                self.db,
                action="jpki.link.refused",
                actor=actor,
                signer_id=signer_id,
                detail={"reason": e.description, "serial": f"{cert.serial_number:x}"},
                now=now,
            )
            raise
        async with self.db.write() as conn:
            await presence.require_active_signer(conn, signer_id)
            link = await self._insert_link(
                conn, signer_id=signer_id, checked=checked, label=label, now=now
            )
            await self.audit.append(
                conn,
                action="jpki.link",
                actor=actor,
                signer_id=signer_id,
                detail=_link_detail(link, checked, how="officer"),
                now=now,
            )
        return link

    async def list_links(self, signer_id: str) -> list[JpkiLink]:
        return [
            presence.from_row(JpkiLink, r)
            for r in await self._registrations(jpki_binding, signer_id)
        ]

    async def unlink(self, signer_id: str, link_id: str, *, actor: str) -> None:
        """Remove a link and end every live SAD it approved (a lost card stops at once)."""
        await self._remove_registration(
            jpki_binding, link_id, signer_id, actor=actor, action="jpki.unlink",
            detail_key="link",
            not_found=f"signer {signer_id} has no My Number card link {link_id}",
        )  # fmt: skip

    # -- enrolment by the doctor (code + password + proof of possession) ---------------------

    async def register_begin(self, *, code: str, password: str, caller: Caller) -> dict[str, Any]:
        """Check code + password (shared attempt counter with FIDO2), return a challenge."""
        now = self.clock()
        # The same code, password and attempt limit as FIDO2 enrolment.
        checked = self.fido2.enrollment_checked(
            code=code, password=password, caller=caller, now=now
        )
        async with checked, self.db.write() as conn:
            row = await self.fido2.take_checked_enrollment(conn, code=code, caller=caller, now=now)
            binding = enrollment_binding(row.id)
            challenge = new_bound_challenge(binding)
            cid = await self.put_challenge(
                conn, challenge, kind="register", signer_id=row.signer_id, caller=caller,
                binding=binding, now=now, enrollment_id=row.id,
            )  # fmt: skip
        return _challenge_json(challenge, cid, self.challenge_ttl)

    async def register_complete(
        self,
        *,
        code: str,
        authorization: JpkiAuthorization,
        caller: Caller,
        label: str | None = None,
    ) -> JpkiLink:
        now = self.clock()
        cid = authorization.challenge_id
        async with self.attempt("jpki.link.refused", caller, now=now, challenge=cid) as at:
            async with self.db.read() as conn:
                row = await self.fido2.enrollment_for(conn, code=code, caller=caller, now=now)
                at.signer_id = row.signer_id
                state = await self.challenges.peek(conn, cid, kind="register", now=now)
            if state.enrollment_id != row.id or state.facility_id != caller.facility_id:
                raise InvalidRequest("the challenge was issued for another enrollment code")
            verify_card_signature(
                authorization.certificate, state.challenge, authorization.signature
            )
            checked = await self.check_certificate(authorization.certificate, now)
            async with self.db.write() as conn:
                row = await self.fido2.enrollment_for(conn, code=code, caller=caller, now=now)
                await self.challenges.take(conn, cid, kind="register", now=now)
                link = await self._insert_link(
                    conn, signer_id=row.signer_id, checked=checked, label=label, now=now
                )
                await use_enrollment(conn, row.id, now=now)
                await self.audit.append(
                    conn,
                    action="jpki.link",
                    actor=caller.actor,
                    facility_code=caller.institution_code,
                    signer_id=row.signer_id,
                    detail={**_link_detail(link, checked, how="enrollment"), "enrollment": row.id},
                    now=now,
                )
                return link

    # -- authentication ---------------------------------------------------------------------

    async def authenticate_begin(self, *, caller: Caller, approval: Approval) -> dict[str, Any]:
        """A card challenge that commits to exactly this approval."""
        now = self.clock()
        credential_id = approval.credential_id
        if caller.facility_id is None:
            raise AccessDenied("My Number card authentication is relayed by facility certificates")
        async with self.db.write() as conn:
            signer_id = await presence.signer_of_credential(
                conn, credential_id=credential_id, facility_id=caller.facility_id
            )
            linked = (
                await conn.execute(
                    select(jpki_binding.c.id).where(jpki_binding.c.signer_id == signer_id)
                )
            ).first()
            if linked is None:
                raise InvalidRequest(
                    f"signer {signer_id} has no linked My Number card: link one with "
                    "`hpki-gateway signer link-jpki` or `hpki-gateway card enroll`"
                )
            binding = approval.binding()
            challenge = new_bound_challenge(binding)
            cid = await self.put_challenge(
                conn, challenge, kind="authenticate", signer_id=signer_id, caller=caller,
                binding=binding, now=now, credential_id=credential_id,
            )  # fmt: skip
        return _challenge_json(challenge, cid, self.challenge_ttl)

    async def precheck(
        self,
        authorization: JpkiAuthorization,
        *,
        facility_id: int,
        credential_id: str,
        binding: bytes,
        now: datetime,
    ) -> CheckedCertificate:
        """Everything that needs no write lock (and the network): run before the transaction."""
        async with self.db.read() as conn:
            state = await self.challenges.peek(
                conn, authorization.challenge_id, kind="authenticate", now=now
            )
        _check_state(state, facility_id=facility_id, credential_id=credential_id, binding=binding)
        verify_card_signature(authorization.certificate, state.challenge, authorization.signature)
        return await self.check_certificate(authorization.certificate, now)

    async def verify(
        self,
        conn: AsyncConnection,
        authorization: JpkiAuthorization,
        checked: CheckedCertificate,
        *,
        facility_id: int,
        credential_id: str,
        binding: bytes,
        now: datetime,
    ) -> JpkiPresence:
        """Inside the caller's write transaction: take the challenge, check the link."""
        state = await self.challenges.take(
            conn, authorization.challenge_id, kind="authenticate", now=now
        )
        _check_state(state, facility_id=facility_id, credential_id=credential_id, binding=binding)
        cert = checked.cert
        row = (
            await conn.execute(
                select(jpki_binding).where(jpki_binding.c.spki_sha256 == checked.spki_sha256)
            )
        ).one_or_none()
        if (
            row is None
            or row.signer_id != state.signer_id
            or row.serial != f"{cert.serial_number:x}"
            or row.issuer != cert.issuer.rfc4514_string()[:500]
        ):
            raise AccessDenied(
                "this My Number card is not linked to the signer of this credential (a renewed "
                "card must be linked again)"
            )
        touched = await conn.execute(
            update(jpki_binding).where(jpki_binding.c.id == row.id).values(last_used_at=now)
        )
        if touched.rowcount != 1:
            # Unlinked meanwhile (PostgreSQL: this UPDATE waited for the unlink's DELETE, which
            # ended the SADs it knew of, not this one): refuse, as with no link at all.
            raise AccessDenied(
                "this My Number card is not linked to the signer of this credential (a renewed "
                "card must be linked again)"
            )
        return JpkiPresence(
            signer_id=state.signer_id,
            binding_id=row.id,
            challenge_id=authorization.challenge_id,
            revocation=checked.revocation,
        )

    async def authorize(
        self,
        *,
        caller: Caller,
        approval: Approval,
        authorization: JpkiAuthorization,
        now: datetime | None = None,
    ) -> IssuedSad:
        """Verify the card's signature for exactly this request and issue a SAD (SCAL 2).

        The certificate checks (network: OCSP/CRL) run before the write transaction; the
        challenge, the link and the grant inside it. Every outcome is audited (``sad.issue``
        by the ledger, ``sad.refused`` here); a refused attempt burns its challenge.
        """
        now = now or self.clock()
        facility_id, _ = presence.facility_of(caller)
        credential_id, hashes = approval.credential_id, approval.hashes
        detail = {
            "credential": credential_id,
            "presence": PRESENCE_JPKI,
            "hashes": [h.hex() for h in hashes],
        }
        refusal = self.attempt(
            "sad.refused", caller, now=now, challenge=authorization.challenge_id, detail=detail
        )
        async with refusal as at:
            if not hashes:
                raise InvalidRequest(
                    "Missing (or invalid type) parameter hashes: a My Number card approves "
                    "hashes (SCAL 2), not a signing session"
                )
            if approval.hash_algorithm_oid is None:
                raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
            algorithm = presence.check_bound_request(
                hashes,
                presence.hash_algorithm(approval.hash_algorithm_oid),
                approval.num_signatures,
            )
            binding = approval.binding()
            checked = await self.precheck(
                authorization, facility_id=facility_id, credential_id=credential_id,
                binding=binding, now=now,
            )  # fmt: skip
            async with self.db.write() as conn:
                card = await self.verify(
                    conn, authorization, checked, facility_id=facility_id,
                    credential_id=credential_id, binding=binding, now=now,
                )  # fmt: skip
                at.signer_id = card.signer_id
                grant = Grant(
                    facility_id=facility_id,
                    signer_id=card.signer_id,
                    credential_id=credential_id,
                    hashes=tuple(bytes(h) for h in hashes),
                    hash_algorithm=algorithm,
                    count=approval.num_signatures,
                    scal="2",
                    presence=PRESENCE_JPKI,
                    presence_ref=card.binding_id,
                    ttl=self.sad_ttl,
                    evidence={
                        "presence": PRESENCE_JPKI,
                        "jpki_link": card.binding_id,
                        "jpki_serial": f"{checked.cert.serial_number:x}",
                        "revocation": card.revocation,
                    },
                )
                return await presence.issue_grant(conn, self.ledger, grant, caller=caller, now=now)

    async def abort(self, *, caller: Caller, challenge_id: str, reason: str) -> None:
        """The card client gave up after begin (PIN blocked, card pulled, ...): burn the
        challenge and audit why, so a refusal at the card leaves a record like any other."""
        now = self.clock()
        async with self.db.read() as conn:
            row = await self.challenges.find(conn, challenge_id)
        if row is None or row.facility_id != caller.facility_id:
            raise InvalidRequest("unknown challenge_id: call begin first")
        await self.refused(
            action="jpki.card_refused",
            caller=caller,
            signer_id=row.signer_id,
            reason=reason,
            challenge=challenge_id,
            detail={"credential": row.credential_id, "kind": row.kind},
            now=now,
        )


def _check_state(state: Any, *, facility_id: int, credential_id: str, binding: bytes) -> None:
    check_issued_for(state, facility_id=facility_id, credential_id=credential_id)
    if not approves(bytes(state.challenge), binding):
        raise InvalidRequest(
            "the card signature does not approve this request: credentialID, hashes, "
            "hashAlgorithmOID or numSignatures differ from authenticate/begin"
        )


def _challenge_json(challenge: bytes, cid: str, ttl: timedelta) -> dict[str, Any]:
    return {
        "challenge": base64.urlsafe_b64encode(challenge).rstrip(b"=").decode(),
        "challenge_id": cid,
        "expires_in": int(ttl.total_seconds()),
    }


def _link_detail(link: JpkiLink, checked: CheckedCertificate, *, how: str) -> dict[str, Any]:
    return {
        "link": link.id,
        "how": how,
        "issuer": link.issuer,
        "serial": link.serial,
        "spki_sha256": link.spki_sha256,
        "anchor_spki_sha256": spki_sha256(checked.anchor),
        "not_after": link.not_after.isoformat(),
        "revocation": checked.revocation,
    }
