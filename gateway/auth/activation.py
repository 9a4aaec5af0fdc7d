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

Atomicity: ``consume`` first reads the SAD (joined with its signer, credential and
certificate; ``FOR UPDATE OF sad`` on PostgreSQL) and the remaining count of each requested hash,
refuses with the texts above if anything is short, and only then writes conditional UPDATEs,
``sad.remaining -= n WHERE remaining >= n`` and, for hash-bound SADs, ``sad_hash.remaining -= k
WHERE hash = h AND remaining >= k`` per distinct hash, with every row count checked anyway. On
SQLite the write transaction is ``BEGIN IMMEDIATE`` (one writer across all worker processes); on
PostgreSQL the SAD row lock taken by the read is held to commit, and the UPDATEs re-check their
WHERE clause regardless. Either way two requests can never both spend the last signature, and a
request that fails part-way rolls back whole.

**The fast path: ``consume_and_audit(SignRequest(...))``** does the same check, consumption and
audit event, but groups concurrently waiting requests into ONE write transaction (one lock, one
``BEGIN IMMEDIATE``, one COMMIT, one audit-head update for the whole group, all in one hop to the
database thread: ``Database.run_write``). Each request is still checked on its own, in order,
against what the requests before it in the group spent; a refused request writes nothing but its
``refused_action`` audit event, so it never fails the others. It returns once the group has
committed, i.e. with the audit event durable before the caller signs or answers. signHash uses
it; a signDoc that only needs the consumption and one audit event per request can use it the
same way::

    grant = await activation.consume_and_audit(SignRequest(
        sad=..., facility_id=caller.facility_id, credential_id=..., hashes=[digest, ...],
        algorithm=alg, now=clock(), actor=caller.actor, facility_code=caller.institution_code,
        action="signature.sign_doc", detail=lambda g: {...},
        refused_detail={"credential": ...}))

(the refusal it raises is already audited), whereas an endpoint that must write more in the same
transaction keeps calling ``consume`` inside its own ``Database.write()``: both paths are the
same ``_Spender`` (read, check, write), so their rules cannot drift apart.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import secrets
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog, AuditRecord
from gateway.auth.fido2 import Caller, Fido2Authenticator, canonical_binding
from gateway.auth.jpki import JpkiAuthenticator, JpkiAuthorization
from gateway.clock import Clock, system_clock
from gateway.errors import (
    AccessDenied,
    GatewayError,
    InvalidRequest,
    NotFound,
    TemporarilyUnavailable,
)
from gateway.hsm.api import DigestAlgorithm
from gateway.store.db import Database
from gateway.store.schema import credential, facility, sad, sad_hash, signer, signer_facility


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
class SignRequest:
    """One signing request for ``SignatureActivation.consume_and_audit``.

    The consumption is ``consume(sad=..., facility_id=..., credential_id=..., hashes=...,
    algorithm=..., now=...)``; on success the event ``action`` (actor, facility_code, the
    grant's signer, ``detail(grant)``) is appended, on refusal ``refused_action`` with
    ``{"reason": <the CSC text>, **refused_detail}``; both stamped ``now``. ``detail`` runs on
    the database thread inside the transaction: it must be a quick, pure function of the grant.
    """

    sad: str
    facility_id: int
    credential_id: str
    hashes: Sequence[bytes]
    algorithm: DigestAlgorithm
    now: datetime
    actor: str
    facility_code: str | None
    action: str
    detail: Callable[[SignatureGrant], Mapping[str, Any]]
    refused_action: str = "signature.refused"
    refused_detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class _Pending:
    req: SignRequest
    token: str  # token_hash(req.sad), computed on the event loop
    future: asyncio.Future[SignatureGrant]


#: A group transaction takes at most this many waiting requests / hashes (the first always).
GROUP_MAX_REQUESTS = 64
GROUP_MAX_HASHES = 1000


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
        clock: Clock = system_clock,
    ) -> None:
        self.db = db
        self.audit = audit
        self.fido2 = fido2
        self.sad_ttl = sad_ttl
        self.session_max_hours = session_max_hours
        self.session_max_signatures = session_max_signatures
        self.clock = clock
        # consume_and_audit: requests waiting for the next group transaction, and its runner.
        self._queue: deque[_Pending] = deque()
        self._drainer: asyncio.Task[None] | None = None

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
            # Sessions opened under the old policy end now: a disabled (or narrowed) policy
            # must not leave hours of unbound signing behind (new sessions follow the new one).
            now = self.clock()
            ended = await conn.execute(
                update(sad)
                .where(sad.c.facility_id == row.id, sad.c.scal == "1", sad.c.expires_at > now)
                .values(expires_at=now)
            )
            await self.audit.append(
                conn,
                action="facility.signing_session",
                actor=actor,
                facility_code=institution_code,
                detail={**policy.to_json_dict(), "sessions_ended": ended.rowcount},
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
        assertion: dict[str, Any] | None = None,
        jpki: tuple[JpkiAuthenticator, JpkiAuthorization] | None = None,
        now: datetime | None = None,
    ) -> IssuedSad:
        """Verify the WebAuthn assertion (or the My Number card signature, ``jpki``) for
        exactly this request and issue a SAD.

        Every outcome is audited; a refused attempt also burns its challenge.
        """
        now = now or self.clock()
        if caller.facility_id is None or caller.institution_code is None:
            raise AccessDenied("CSC methods are for facility client certificates")
        facility_id = caller.facility_id
        if jpki is not None:
            return await self._authorize_jpki(
                caller=caller,
                credential_id=credential_id,
                num_signatures=num_signatures,
                hashes=hashes,
                hash_algorithm_oid=hash_algorithm_oid,
                jpki=jpki,
                now=now,
            )
        if assertion is None:
            raise InvalidRequest("Missing (or invalid type) parameter authData")
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

    async def _authorize_jpki(
        self,
        *,
        caller: Caller,
        credential_id: str,
        num_signatures: int,
        hashes: Sequence[bytes],
        hash_algorithm_oid: str | None,
        jpki: tuple[JpkiAuthenticator, JpkiAuthorization],
        now: datetime,
    ) -> IssuedSad:
        """The card path: the same rules and SAD as FIDO2; the certificate checks (network:
        OCSP/CRL) run before the write transaction, the challenge and link inside it."""
        authenticator, auth = jpki
        assert caller.facility_id is not None
        facility_id = caller.facility_id
        signer_id: str | None = None
        try:
            algorithm = DigestAlgorithm.from_oid(hash_algorithm_oid) if hash_algorithm_oid else None
        except ValueError as e:
            raise InvalidRequest(f"Invalid parameter hashAlgorithmOID: {e}") from e
        binding = canonical_binding(
            credential_id=credential_id,
            hash_algorithm_oid=hash_algorithm_oid,
            hashes=hashes,
            num_signatures=num_signatures,
        )
        try:
            checked = await authenticator.precheck(
                auth, facility_id=facility_id, credential_id=credential_id, binding=binding, now=now
            )
            async with self.db.write() as conn:
                scal, ttl, count = await self._scal(
                    conn, facility_id, hashes, algorithm, num_signatures
                )
                presence = await authenticator.verify(
                    conn,
                    auth,
                    checked,
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
                        # The presence that approved it: unlinking the card ends the SAD.
                        fido_credential_id=presence.binding_id,
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
                        "presence": "jpki",
                        "jpki_link": presence.binding_id,
                        "jpki_serial": f"{checked.cert.serial_number:x}",
                        "revocation": presence.revocation,
                        "scal": scal,
                        "num_signatures": count,
                        "hash_algorithm": hash_algorithm_oid,
                        "hashes": [h.hex() for h in hashes],
                        "expires_at": (now + ttl).isoformat(),
                    },
                    now=now,
                )
        except GatewayError as e:
            await authenticator.refused(
                action="sad.refused",
                caller=caller,
                signer_id=signer_id,
                reason=e.description,
                challenge=auth.challenge_id,
                detail={
                    "credential": credential_id,
                    "presence": "jpki",
                    "hashes": [h.hex() for h in hashes],
                },
                now=now,
            )
            raise
        return IssuedSad(
            token=token, expires_in=int(ttl.total_seconds()), scal=scal, num_signatures=count
        )

    async def _scal(
        self,
        conn: AsyncConnection,
        facility_id: int,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm | None,
        num_signatures: int,
    ) -> tuple[str, timedelta, int]:
        """SCAL 2 bound to the hashes, or the facility's signing session (SCAL 1)."""
        if hashes:
            if algorithm is None:
                raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
            if num_signatures != len(hashes):
                raise InvalidRequest(
                    "Invalid parameter numSignatures: must equal the number of hashes"
                )
            return "2", self.sad_ttl, num_signatures
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
        return "1", timedelta(hours=pol.hours), num_signatures

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

        token = token_hash(sad)

        def spend(sync_conn: Connection) -> SignatureGrant:
            spender = _Spender(sync_conn, [token], hashes)
            grant = spender.check(
                token=token,
                facility_id=facility_id,
                credential_id=credential_id,
                hashes=hashes,
                algorithm=algorithm,
                now=now,
            )
            spender.write()
            return grant

        return await conn.run_sync(spend)

    async def consume_and_audit(self, req: SignRequest) -> SignatureGrant:
        """``consume`` + the audit event, grouped with concurrent callers into one transaction.

        Returns the grant once the consumption and its ``req.action`` event are committed;
        raises the refusal (``InvalidRequest``/``AccessDenied``) once a ``req.refused_action``
        event saying why is committed, so callers must not audit it again. See the module doc.
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(req=req, token=token_hash(req.sad), future=loop.create_future())
        self._queue.append(pending)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await pending.future

    async def _drain(self) -> None:
        """Run the queue as batches, one write transaction each, until it is empty.

        Requests that arrive while a batch is in the database wait for the next one: under
        load a batch holds every request that queued during the previous one.
        """
        while self._queue:
            batch: list[_Pending] = []
            n_hashes = 0
            while self._queue and len(batch) < GROUP_MAX_REQUESTS:
                nxt = len(self._queue[0].req.hashes)
                if batch and n_hashes + nxt > GROUP_MAX_HASHES:
                    break
                batch.append(self._queue.popleft())
                n_hashes += nxt
            try:
                outcomes = await self.db.run_write(functools.partial(self._run_group, batch=batch))
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, out in zip(batch, outcomes, strict=True):
                if p.future.done():  # the request went away; its outcome is committed anyway
                    continue
                if isinstance(out, SignatureGrant):
                    p.future.set_result(out)
                else:
                    p.future.set_exception(out)

    def _run_group(
        self, conn: Connection, *, batch: Sequence[_Pending]
    ) -> list[SignatureGrant | Exception]:
        """One write transaction for a batch (runs in ``Database.run_write``).

        Each request is checked on its own, in arrival order, against what its predecessors in
        the batch spent (``_Spender``: two requests spending the last signature of one SAD
        cannot both pass). A refused request spends nothing, so it fails alone and is audited
        as refused; a failure in the writes (which cannot fail after the checks under the
        write lock) or in the audit append aborts the whole transaction, and every request of
        the batch gets the error. Statements per batch on SQLite: BEGIN IMMEDIATE, two reads,
        two UPDATEs (executemany; one per row where the driver reports no executemany row
        count, e.g. asyncpg), three for the audit chain, COMMIT, whatever its size.
        """
        spender = _Spender(conn, [p.token for p in batch], (h for p in batch for h in p.req.hashes))
        outcomes: list[SignatureGrant | Exception] = []
        for p in batch:
            r = p.req
            try:
                outcomes.append(
                    spender.check(
                        token=p.token,
                        facility_id=r.facility_id,
                        credential_id=r.credential_id,
                        hashes=r.hashes,
                        algorithm=r.algorithm,
                        now=r.now,
                    )
                )
            except GatewayError as e:
                if e.status >= 500:
                    raise
                outcomes.append(e)
            except DBAPIError:
                raise  # the transaction may be unusable: the whole batch fails
            except Exception as e:  # noqa: BLE001 - e.g. an unparsable certificate: this
                outcomes.append(e)  # request fails (500, not audited, as before), not the batch
        try:
            spender.write()
        except GatewayError as e:
            raise TemporarilyUnavailable(
                "signature activation changed during the transaction; retry", retry_after=1
            ) from e
        records: list[AuditRecord] = []
        for p, out in zip(batch, outcomes, strict=True):
            r = p.req
            if isinstance(out, SignatureGrant):
                action, signer_id, detail = r.action, out.signer_id, r.detail(out)
            elif isinstance(out, GatewayError):
                action, signer_id = r.refused_action, None
                detail = {"reason": out.description, **r.refused_detail}
            else:
                continue
            records.append(
                AuditRecord(
                    action=action,
                    actor=r.actor,
                    facility_code=r.facility_code,
                    signer_id=signer_id,
                    detail=detail,
                    now=r.now,
                )
            )
        self.audit.append_many_sync(conn, records)
        return outcomes

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

# Statements of the hot path, built once: with bind parameters only, SQLAlchemy reuses their
# memoized cache keys and compiled forms instead of rebuilding expressions per request.

#: The SADs with everything ``consume`` checks about their signer, credential and certificate,
#: in one indexed read (token_hash is unique). FOR UPDATE OF sad on PostgreSQL, in id order (a
#: fixed lock order: two workers' groups cannot deadlock): the rows stay locked until commit,
#: so the remaining counts read here are the ones the UPDATEs change. SQLite: BEGIN IMMEDIATE
#: already excludes every other writer; the clause renders empty.
_SADS = (
    select(
        _sad.c.id,
        _sad.c.token_hash,
        _sad.c.facility_id,
        _sad.c.signer_id,
        _sad.c.credential_id,
        _sad.c.hash_algorithm,
        _sad.c.scal,
        _sad.c.expires_at,
        _sad.c.remaining,
        credential.c.key_id,
        credential.c.status.label("credential_status"),
        credential.c.certificate_der,
        signer.c.status.label("signer_status"),
        signer_facility.c.facility_id.label("serves_facility"),
        facility.c.institution_code,
    )
    .select_from(
        _sad.join(credential, credential.c.id == _sad.c.credential_id)
        .join(signer, signer.c.id == credential.c.signer_id)
        .outerjoin(
            signer_facility,
            (signer_facility.c.signer_id == signer.c.id)
            & (signer_facility.c.facility_id == _sad.c.facility_id),
        )
        .outerjoin(facility, facility.c.id == signer_facility.c.facility_id)
    )
    .where(_sad.c.token_hash.in_(bindparam("tokens", expanding=True)))
    .order_by(_sad.c.id)
    .with_for_update(of=_sad)
)
#: Remaining counts of the requested hashes (a superset when several SADs are read at once).
_HASHES_LEFT = select(sad_hash.c.sad_id, sad_hash.c.hash, sad_hash.c.remaining).where(
    sad_hash.c.sad_id.in_(bindparam("sad_ids", expanding=True)),
    sad_hash.c.hash.in_(bindparam("hashes", expanding=True)),
)
_SPEND_SAD = (
    update(_sad)
    .where(_sad.c.id == bindparam("b_id"), _sad.c.remaining >= bindparam("b_n"))
    .values(remaining=_sad.c.remaining - bindparam("b_n"))
)
_SPEND_HASH = (
    update(sad_hash)
    .where(
        sad_hash.c.sad_id == bindparam("b_sad"),
        sad_hash.c.hash == bindparam("b_hash"),
        sad_hash.c.remaining >= bindparam("b_k"),
    )
    .values(remaining=sad_hash.c.remaining - bindparam("b_k"))
)


class _Spender:
    """Consumption of one or more SADs in one transaction: read once, check in Python, write once.

    ``__init__`` reads (and on PostgreSQL locks) every SAD named by ``tokens`` and the counts
    left of the requested ``hashes`` (two statements whatever the number of requests); ``check``
    validates one request against what is left after the requests checked before it and
    records what it spends, or raises the CSC refusal having recorded nothing; ``write`` applies
    the totals with conditional UPDATEs (``remaining >= spent``) whose row counts are verified,
    so even a check that was wrong could not make a count negative or over-sign.
    """

    def __init__(self, conn: Connection, tokens: Sequence[str], hashes: Iterable[bytes]) -> None:
        self.conn = conn
        self.rows = {r.token_hash: r for r in conn.execute(_SADS, {"tokens": sorted(set(tokens))})}
        self.sad_left = {int(r.id): int(r.remaining) for r in self.rows.values()}
        self.hash_left: dict[tuple[int, bytes], int] = {}
        bound = sorted(int(r.id) for r in self.rows.values() if r.scal == "2")
        wanted = sorted({bytes(h) for h in hashes})
        if bound and wanted:
            res = conn.execute(_HASHES_LEFT, {"sad_ids": bound, "hashes": wanted})
            self.hash_left = {(int(r.sad_id), bytes(r.hash)): int(r.remaining) for r in res}
        self.sad_spent: Counter[int] = Counter()
        self.hash_spent: Counter[tuple[int, bytes]] = Counter()

    def check(
        self,
        *,
        token: str,
        facility_id: int,
        credential_id: str,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm,
        now: datetime,
    ) -> SignatureGrant:
        if not hashes:
            raise InvalidRequest("Missing (or invalid type) parameter hashes")
        row = self.rows.get(token)
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
        # Invariant 1, read in this transaction (never cached): active signer serving the
        # facility, active credential, certificate valid now.
        if row.signer_status != "active":
            raise AccessDenied(f"signer {row.signer_id} is {row.signer_status}")
        if row.serves_facility is None:
            raise AccessDenied(f"signer {row.signer_id} does not serve this facility")
        if row.credential_status != "active" or row.certificate_der is None:
            raise AccessDenied(f"credential {credential_id} is {row.credential_status}")
        cert = _certificate(row.certificate_der)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise AccessDenied(f"the certificate of credential {credential_id} is not valid now")
        sad_id, n = int(row.id), len(hashes)
        if self.sad_left[sad_id] - self.sad_spent[sad_id] < n:
            raise InvalidRequest("Number of signatures exceeds those authorized by the SAD")
        multiset = Counter((sad_id, bytes(h)) for h in hashes)
        if row.scal == "2":
            left = self.hash_left
            if any(left.get(key, 0) - self.hash_spent[key] < k for key, k in multiset.items()):
                raise InvalidRequest("Hash is not authorized by the SAD")
            self.hash_spent.update(multiset)
        self.sad_spent[sad_id] += n
        return SignatureGrant(
            facility_id=facility_id,
            institution_code=str(row.institution_code),
            signer_id=row.signer_id,
            credential_id=credential_id,
            key_id=row.key_id,
            hashes=tuple(bytes(h) for h in hashes),
            algorithm=algorithm,
            scal=row.scal,
        )

    def write(self) -> None:
        _update_checked(
            self.conn,
            _SPEND_SAD,
            [{"b_id": i, "b_n": n} for i, n in sorted(self.sad_spent.items())],
            "Number of signatures exceeds those authorized by the SAD",
        )
        _update_checked(
            self.conn,
            _SPEND_HASH,
            [{"b_sad": i, "b_hash": h, "b_k": k} for (i, h), k in sorted(self.hash_spent.items())],
            "Hash is not authorized by the SAD",
        )


def _update_checked(
    conn: Connection, stmt: Any, params: list[dict[str, Any]], refusal: str
) -> None:
    """Run a one-row conditional UPDATE per parameter set; refuse unless every one matched."""
    if not params:
        return
    if len(params) > 1 and conn.dialect.supports_sane_multi_rowcount:
        if conn.execute(stmt, params).rowcount != len(params):
            raise InvalidRequest(refusal)
        return
    for one in params:
        if conn.execute(stmt, one).rowcount != 1:
            raise InvalidRequest(refusal)


_cert_cache: dict[bytes, x509.Certificate] = {}


def _certificate(der: bytes) -> x509.Certificate:
    """Parse once per process: the hot path checks the validity period on every signature."""
    cert = _cert_cache.get(der)
    if cert is None:
        if len(_cert_cache) > 10_000:
            _cert_cache.clear()
        cert = _cert_cache[der] = x509.load_der_x509_certificate(der)
    return cert
