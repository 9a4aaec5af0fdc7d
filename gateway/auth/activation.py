"""Signature activation data (SAD): issued after a verified FIDO2 assertion, consumed per signature.

The SAD is an opaque random token (``secrets.token_urlsafe(32)``) that the gateway stores only as
its SHA-256. It is bound to the facility that asked for it, the signer, the CSC credential, the
hash algorithm, the MULTISET of hashes the signer approved and a remaining count, and it expires
(``activation.sad_ttl_seconds``, 300 s by default). SCAL 2 is the default; a facility may enable
a *signing session* (SCAL 1: one biometric check, up to N signatures within H hours, hashes not
bound), capped by ``activation.signing_session_max_*``.

**The contract for every signing endpoint** (``signatures/signHash`` here, ``signatures/signDoc``
later): inside its write transaction (``Database.write()``) call::

    grant = await activation.consume(conn, sad=..., facility_id=..., credential_id=...,
                                     hashes=[digest, ...], algorithm=DigestAlgorithm.SHA256,
                                     now=clock())

then append the audit event in the same transaction, commit, and only then sign exactly
``grant.hashes`` with ``grant.key_id``. ``consume`` raises ``InvalidRequest`` with the CSC texts
("Invalid parameter SAD", "SAD expired", "SAD was not issued to this facility", "SAD is not valid
for this credential", "Hash algorithm does not match the SAD", "Number of signatures exceeds
those authorized by the SAD", "Hash is not authorized by the SAD") or ``AccessDenied`` (signer
locked, credential not active, signer no longer serving the facility, certificate not valid).
If signing then fails, ``refund`` gives the consumed count back.

Atomicity: consumption is two conditional UPDATEs, ``sad.remaining -= n WHERE remaining >= n``
and, for hash-bound SADs, ``sad_hash.remaining -= k WHERE hash IN (...) AND remaining >= k``
(one statement per multiplicity k) with the row count checked. On SQLite the write transaction
is ``BEGIN IMMEDIATE`` (one writer across all worker processes); on PostgreSQL the UPDATE takes
the row lock and re-checks its WHERE clause after a concurrent commit. Either way two requests
can never both spend the last signature, and a request that fails part-way rolls back whole.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog
from gateway.auth.fido2 import Caller, Fido2Authenticator, canonical_binding
from gateway.errors import AccessDenied, GatewayError, InvalidRequest, NotFound
from gateway.hsm.api import DigestAlgorithm
from gateway.store.db import Database
from gateway.store.schema import credential, facility, sad, sad_hash, signer, signer_facility

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SignatureGrant:
    """What a consumed SAD allows: sign exactly ``hashes`` with ``key_id``, nothing else."""

    facility_id: int
    institution_code: str
    signer_id: str
    credential_id: str
    key_id: str
    hashes: tuple[bytes, ...]
    algorithm: DigestAlgorithm
    scal: str


@dataclass(frozen=True, kw_only=True)
class IssuedSad:
    token: str  # returned to the client once; only its hash is stored
    expires_in: int
    scal: str
    num_signatures: int


@dataclass(frozen=True, kw_only=True)
class SigningSessionPolicy:
    """A facility's signing-session policy (``facility.policy["signing_session"]``)."""

    enabled: bool = False
    max_signatures: int = 0
    hours: float = 0.0

    @classmethod
    def from_policy(cls, policy: dict[str, Any]) -> SigningSessionPolicy:
        raw = policy.get("signing_session") or {}
        return cls(
            enabled=bool(raw.get("enabled", False)),
            max_signatures=int(raw.get("max_signatures", 0)),
            hours=float(raw.get("hours", 0.0)),
        )

    def capped(self, *, max_hours: float, max_signatures: int) -> SigningSessionPolicy:
        return SigningSessionPolicy(
            enabled=self.enabled,
            max_signatures=min(self.max_signatures, max_signatures),
            hours=min(self.hours, max_hours),
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "max_signatures": self.max_signatures, "hours": self.hours}


class SignatureActivation:
    """Issues SADs after a verified assertion and consumes them atomically."""

    def __init__(
        self,
        *,
        db: Database,
        audit: AuditLog,
        fido2: Fido2Authenticator,
        sad_ttl: timedelta = timedelta(seconds=300),
        session_max_hours: float = 18,
        session_max_signatures: int = 1000,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.audit = audit
        self.fido2 = fido2
        self.sad_ttl = sad_ttl
        self.session_max_hours = session_max_hours
        self.session_max_signatures = session_max_signatures
        self.clock = clock

    # -- policy -----------------------------------------------------------------------------

    async def session_policy(self, conn: AsyncConnection, facility_id: int) -> SigningSessionPolicy:
        raw = (
            await conn.execute(select(facility.c.policy).where(facility.c.id == facility_id))
        ).scalar_one_or_none()
        pol = SigningSessionPolicy.from_policy(json.loads(raw or "{}"))
        return pol.capped(
            max_hours=self.session_max_hours, max_signatures=self.session_max_signatures
        )

    async def set_session_policy(
        self, institution_code: str, policy: SigningSessionPolicy, *, actor: str
    ) -> SigningSessionPolicy:
        """Store a facility's signing-session policy; refuse values above the caps."""
        if policy.enabled:
            if not 0 < policy.hours <= self.session_max_hours:
                raise InvalidRequest(
                    f"signing session hours must be in (0, {self.session_max_hours}] "
                    "(activation.signing_session_max_hours)"
                )
            if not 0 < policy.max_signatures <= self.session_max_signatures:
                raise InvalidRequest(
                    f"signing session max signatures must be 1-{self.session_max_signatures} "
                    "(activation.signing_session_max_signatures)"
                )
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    select(facility.c.id, facility.c.policy).where(
                        facility.c.institution_code == institution_code
                    )
                )
            ).one_or_none()
            if row is None:
                raise NotFound(f"facility {institution_code} is not registered")
            data = json.loads(row.policy or "{}")
            data["signing_session"] = policy.to_json_dict()
            await conn.execute(
                update(facility)
                .where(facility.c.id == row.id)
                .values(policy=json.dumps(data, sort_keys=True))
            )
            await self.audit.append(
                conn,
                action="facility.signing_session",
                actor=actor,
                facility_code=institution_code,
                detail=policy.to_json_dict(),
            )
        return policy

    # -- authorize --------------------------------------------------------------------------

    async def authorize(
        self,
        *,
        caller: Caller,
        credential_id: str,
        num_signatures: int,
        hashes: Sequence[bytes],
        hash_algorithm_oid: str | None,
        assertion: dict[str, Any],
        now: datetime | None = None,
    ) -> IssuedSad:
        """Verify the WebAuthn assertion for exactly this request and issue a SAD.

        Every outcome is audited; a refused attempt also burns its challenge.
        """
        now = now or self.clock()
        if caller.facility_id is None or caller.institution_code is None:
            raise AccessDenied("CSC methods are for facility client certificates")
        facility_id = caller.facility_id
        parsed = self.fido2.parse_assertion(assertion)
        cid: str | None = None
        signer_id: str | None = None
        try:
            algorithm = DigestAlgorithm.from_oid(hash_algorithm_oid) if hash_algorithm_oid else None
        except ValueError as e:
            raise InvalidRequest(f"Invalid parameter hashAlgorithmOID: {e}") from e
        try:
            async with self.db.write() as conn:
                from gateway.auth.fido2 import challenge_id

                cid = challenge_id(parsed.response.client_data.challenge)
                if hashes:
                    if algorithm is None:
                        raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
                    if num_signatures != len(hashes):
                        raise InvalidRequest(
                            "Invalid parameter numSignatures: must equal the number of hashes"
                        )
                    scal, ttl, count = "2", self.sad_ttl, num_signatures
                else:
                    pol = await self.session_policy(conn, facility_id)
                    if not pol.enabled:
                        raise InvalidRequest(
                            "Missing (or invalid type) parameter hashes: this facility has no "
                            "signing-session policy, so a SAD must be bound to hashes"
                        )
                    if num_signatures > pol.max_signatures:
                        raise InvalidRequest(
                            f"Invalid parameter numSignatures: the signing session of this "
                            f"facility allows at most {pol.max_signatures}"
                        )
                    scal, ttl, count = "1", timedelta(hours=pol.hours), num_signatures
                binding = canonical_binding(
                    credential_id=credential_id,
                    hash_algorithm_oid=hash_algorithm_oid,
                    hashes=hashes,
                    num_signatures=num_signatures,
                )
                presence = await self.fido2.verify_assertion(
                    conn,
                    assertion=parsed,
                    facility_id=facility_id,
                    credential_id=credential_id,
                    binding=binding,
                    now=now,
                )
                signer_id = presence.signer_id
                await self._check_signer(
                    conn, facility_id=facility_id, credential_id=credential_id, now=now
                )
                token = secrets.token_urlsafe(32)
                res = await conn.execute(
                    insert(sad).values(
                        token_hash=token_hash(token),
                        facility_id=facility_id,
                        signer_id=presence.signer_id,
                        credential_id=credential_id,
                        fido_credential_id=presence.fido_credential_id,
                        hash_algorithm=algorithm.value if (algorithm and scal == "2") else None,
                        scal=scal,
                        num_signatures=count,
                        remaining=count,
                        created_at=now,
                        expires_at=now + ttl,
                    )
                )
                sad_id = int(res.inserted_primary_key[0])  # type: ignore[index]
                if scal == "2":
                    multiset = Counter(bytes(h) for h in hashes)
                    await conn.execute(
                        insert(sad_hash),
                        [
                            {"sad_id": sad_id, "hash": h, "authorized": k, "remaining": k}
                            for h, k in multiset.items()
                        ],
                    )
                await self.audit.append(
                    conn,
                    action="sad.issue",
                    actor=caller.actor,
                    facility_code=caller.institution_code,
                    signer_id=presence.signer_id,
                    detail={
                        "sad": sad_id,
                        "credential": credential_id,
                        "authenticator": presence.fido_credential_id,
                        "sign_count": presence.sign_count,
                        "scal": scal,
                        "num_signatures": count,
                        "hash_algorithm": hash_algorithm_oid,
                        "hashes": [h.hex() for h in hashes],
                        "expires_at": (now + ttl).isoformat(),
                    },
                    now=now,
                )
        except GatewayError as e:
            await self.fido2.refused(
                action="sad.refused",
                caller=caller,
                signer_id=signer_id,
                reason=e.description,
                challenge=cid,
                detail={"credential": credential_id, "hashes": [h.hex() for h in hashes]},
                now=now,
            )
            raise
        return IssuedSad(
            token=token, expires_in=int(ttl.total_seconds()), scal=scal, num_signatures=count
        )

    async def _check_signer(
        self, conn: AsyncConnection, *, facility_id: int, credential_id: str, now: datetime
    ) -> Any:
        """Invariant 1: active signer linked to the facility, active credential, valid cert."""
        row = (
            await conn.execute(
                select(
                    credential.c.signer_id,
                    credential.c.key_id,
                    credential.c.status,
                    credential.c.certificate_der,
                    signer.c.status.label("signer_status"),
                    signer_facility.c.facility_id,
                    facility.c.institution_code,
                )
                .select_from(
                    credential.join(signer, signer.c.id == credential.c.signer_id)
                    .outerjoin(
                        signer_facility,
                        (signer_facility.c.signer_id == signer.c.id)
                        & (signer_facility.c.facility_id == facility_id),
                    )
                    .outerjoin(facility, facility.c.id == signer_facility.c.facility_id)
                )
                .where(credential.c.id == credential_id)
            )
        ).one_or_none()
        if row is None:
            raise InvalidRequest("Invalid parameter credentialID")
        if row.signer_status != "active":
            raise AccessDenied(f"signer {row.signer_id} is {row.signer_status}")
        if row.facility_id is None:
            raise AccessDenied(f"signer {row.signer_id} does not serve this facility")
        if row.status != "active" or row.certificate_der is None:
            raise AccessDenied(f"credential {credential_id} is {row.status}")
        cert = _certificate(row.certificate_der)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise AccessDenied(f"the certificate of credential {credential_id} is not valid now")
        return row

    # -- consume ----------------------------------------------------------------------------

    async def consume(
        self,
        conn: AsyncConnection,
        *,
        sad: str,
        facility_id: int,
        credential_id: str,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm,
        now: datetime,
    ) -> SignatureGrant:
        """Spend the SAD on ``hashes`` inside the caller's write transaction (see module doc)."""
        if not hashes:
            raise InvalidRequest("Missing (or invalid type) parameter hashes")
        row = (
            await conn.execute(_SAD_QUERY.where(_sad.c.token_hash == token_hash(sad)))
        ).one_or_none()
        if row is None:
            raise InvalidRequest("Invalid parameter SAD")
        if row.facility_id != facility_id:
            raise InvalidRequest("SAD was not issued to this facility")
        if row.credential_id != credential_id:
            raise InvalidRequest("SAD is not valid for this credential")
        if row.expires_at <= now:
            raise InvalidRequest("SAD expired")
        if row.scal == "2" and row.hash_algorithm != algorithm.value:
            raise InvalidRequest("Hash algorithm does not match the SAD")
        cred = await self._check_signer(
            conn, facility_id=facility_id, credential_id=credential_id, now=now
        )
        n = len(hashes)
        res = await conn.execute(
            update(_sad)
            .where(_sad.c.id == row.id, _sad.c.remaining >= n)
            .values(remaining=_sad.c.remaining - n)
        )
        if res.rowcount != 1:
            raise InvalidRequest("Number of signatures exceeds those authorized by the SAD")
        if row.scal == "2":
            by_count: dict[int, list[bytes]] = {}
            for h, k in Counter(bytes(h) for h in hashes).items():
                by_count.setdefault(k, []).append(h)
            for k, group in by_count.items():
                res = await conn.execute(
                    update(sad_hash)
                    .where(
                        sad_hash.c.sad_id == row.id,
                        sad_hash.c.hash.in_(group),
                        sad_hash.c.remaining >= k,
                    )
                    .values(remaining=sad_hash.c.remaining - k)
                )
                if res.rowcount != len(group):
                    raise InvalidRequest("Hash is not authorized by the SAD")
        return SignatureGrant(
            facility_id=facility_id,
            institution_code=str(cred.institution_code),
            signer_id=row.signer_id,
            credential_id=credential_id,
            key_id=cred.key_id,
            hashes=tuple(bytes(h) for h in hashes),
            algorithm=algorithm,
            scal=row.scal,
        )

    async def refund(self, conn: AsyncConnection, *, sad: str, grant: SignatureGrant) -> None:
        """Give back what ``consume`` took when the signature could not be produced."""
        row = (
            await conn.execute(
                select(_sad.c.id, _sad.c.scal).where(_sad.c.token_hash == token_hash(sad))
            )
        ).one_or_none()
        if row is None:
            return
        await conn.execute(
            update(_sad)
            .where(_sad.c.id == row.id)
            .values(remaining=_sad.c.remaining + len(grant.hashes))
        )
        if row.scal == "2":
            for h, k in Counter(grant.hashes).items():
                await conn.execute(
                    update(sad_hash)
                    .where(sad_hash.c.sad_id == row.id, sad_hash.c.hash == h)
                    .values(remaining=sad_hash.c.remaining + k)
                )


_sad = sad
_SAD_QUERY = select(
    _sad.c.id,
    _sad.c.facility_id,
    _sad.c.signer_id,
    _sad.c.credential_id,
    _sad.c.hash_algorithm,
    _sad.c.scal,
    _sad.c.expires_at,
)

_cert_cache: dict[bytes, x509.Certificate] = {}


def _certificate(der: bytes) -> x509.Certificate:
    """Parse once per process: the hot path checks the validity period on every signature."""
    cert = _cert_cache.get(der)
    if cert is None:
        if len(_cert_cache) > 10_000:
            _cert_cache.clear()
        cert = _cert_cache[der] = x509.load_der_x509_certificate(der)
    return cert
