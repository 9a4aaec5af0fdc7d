"""Signature activation data (SAD): issued after a verified FIDO2 assertion, consumed per signature.

The SAD is an opaque random token (``secrets.token_urlsafe(32)``) that the gateway stores only as
its SHA-256. It is bound to the facility that asked for it, the signer, the CSC credential, the
hash algorithm, the MULTISET of hashes the signer approved and a remaining count, and it expires
(``activation.sad_ttl_seconds``, 300 s by default). SCAL 2 is the default; a facility may enable
a *signing session* (SCAL 1: one biometric check, up to N signatures within H hours, hashes not
bound), capped by ``activation.signing_session_max_*``.

The SAD issue follows the same path for every presence method: the authenticator proves
presence for exactly the request (here ``Fido2Authenticator.verify_assertion_sync``), this module
turns that into a ``gateway.signing.grant.Grant`` (level, count, TTL, hashes) after checking
``signing.rules.require_may_sign``, and ``SadLedger.issue`` stores it, in one transaction. A
My Number card authenticator returns its presence the same way and builds a Grant with
``presence=PRESENCE_JPKI``; spending is ``gateway.signing.core.SigningService``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog
from gateway.auth import presence
from gateway.auth.challenges import Approval, challenge_id
from gateway.auth.fido2 import Caller, Fido2Authenticator
from gateway.clock import Clock, system_clock
from gateway.errors import InvalidRequest, NotFound
from gateway.hsm.api import DigestAlgorithm
from gateway.signing.grant import PRESENCE_FIDO2, Grant, IssuedSad
from gateway.signing.ledger import SadLedger, end_sessions
from gateway.store.db import Database
from gateway.store.schema import facility


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
    """Signing-session policy, and the FIDO2 authorization that issues a SAD."""

    def __init__(
        self,
        *,
        db: Database,
        audit: AuditLog,
        fido2: Fido2Authenticator,
        ledger: SadLedger,
        sad_ttl: timedelta = timedelta(seconds=300),
        session_max_hours: float = 18,
        session_max_signatures: int = 1000,
        clock: Clock = system_clock,
    ) -> None:
        self.db = db
        self.audit = audit
        self.fido2 = fido2
        self.ledger = ledger
        self.sad_ttl = sad_ttl
        self.session_max_hours = session_max_hours
        self.session_max_signatures = session_max_signatures
        self.clock = clock

    # -- policy -----------------------------------------------------------------------------

    async def session_policy(self, conn: AsyncConnection, facility_id: int) -> SigningSessionPolicy:
        raw = (
            await conn.execute(select(facility.c.policy).where(facility.c.id == facility_id))
        ).scalar_one_or_none()
        return self._capped(raw)

    async def check_session_begin(
        self, conn: AsyncConnection, facility_id: int, num_signatures: int
    ) -> None:
        """``authenticate/begin`` without hashes: refuse now what ``authorize`` would refuse
        (no signing-session policy; more signatures than it allows), before the signer
        touches an authenticator or a card. ``authorize`` checks again: the policy may change
        in between."""
        self._session_level(await self.session_policy(conn, facility_id), num_signatures)

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
            ended = await end_sessions(conn, row.id, now=now)
            await self.audit.append(
                conn,
                action="facility.signing_session",
                actor=actor,
                facility_code=institution_code,
                detail={**policy.to_json_dict(), "sessions_ended": ended},
                now=now,
            )
        return policy

    # -- authorize --------------------------------------------------------------------------

    async def authorize(
        self,
        *,
        caller: Caller,
        approval: Approval,
        assertion: dict[str, Any],
        now: datetime | None = None,
    ) -> IssuedSad:
        """Verify the WebAuthn assertion for exactly this request and issue a SAD.

        Every outcome is audited; a refused attempt also burns its challenge.
        """
        now = now or self.clock()
        facility_id, _ = presence.facility_of(caller)
        credential_id, hashes, num_signatures = (
            approval.credential_id,
            approval.hashes,
            approval.num_signatures,
        )
        detail = {"credential": credential_id, "hashes": [h.hex() for h in hashes]}
        # An assertion that does not parse names no challenge to burn and no signer: its
        # refusal is audited here, in a transaction of its own, as the handler audits a body
        # it cannot read.
        async with self.fido2.attempt("sad.refused", caller, now=now, detail=detail):
            parsed = self.fido2.parse_assertion(assertion)
            algorithm = presence.hash_algorithm(approval.hash_algorithm_oid)
            challenge = challenge_id(parsed.response.client_data.challenge)
        binding = approval.binding()
        attempt = presence.Attempt(challenge=challenge)

        def unit(conn: Connection) -> IssuedSad:
            scal, ttl = self._level_sync(conn, facility_id, hashes, algorithm, num_signatures)
            verified = self.fido2.verify_assertion_sync(
                conn,
                assertion=parsed,
                facility_id=facility_id,
                credential_id=credential_id,
                binding=binding,
                now=now,
            )
            attempt.signer_id = verified.signer_id
            grant = Grant(
                facility_id=facility_id,
                signer_id=verified.signer_id,
                credential_id=credential_id,
                hashes=tuple(bytes(h) for h in hashes) if scal == "2" else (),
                hash_algorithm=algorithm,
                count=num_signatures,
                scal=scal,
                presence=PRESENCE_FIDO2,
                presence_ref=verified.fido_credential_id,
                ttl=ttl,
                evidence={
                    "authenticator": verified.fido_credential_id,
                    "sign_count": verified.sign_count,
                },
            )
            return presence.issue_grant_sync(conn, self.ledger, grant, caller=caller, now=now)

        # One grouped write unit: take the challenge, check the assertion, move the sign count,
        # check the may-sign rule and issue the SAD with its audit event. A refusal rolls the
        # unit back; its challenge is then burnt and the refusal audited in the same group.
        # An unexpected exception in the checks is such a refusal too (presence.refusing).
        refusal = self.fido2.refusal_unit(
            action="sad.refused", caller=caller, attempt=attempt, detail=detail, now=now
        )
        issued = await self.db.run_grouped(presence.refusing(unit), on_refusal=refusal)
        self.ledger.count_issued()
        return issued

    def _level_sync(
        self,
        conn: Connection,
        facility_id: int,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm | None,
        num_signatures: int,
    ) -> tuple[str, timedelta]:
        """SCAL 2 for hashes (the SAD's TTL); without hashes, the facility's signing session
        (SCAL 1, its hours) when its policy allows one."""
        if hashes:
            presence.check_bound_request(hashes, algorithm, num_signatures)
            return "2", self.sad_ttl
        # FOR SHARE (PostgreSQL): a policy change waits for this session's SAD to commit, so
        # its end_sessions sees it; or this waits for the change and reads the new policy.
        # Unlocked, a session opened under the old policy could commit after the change ended
        # the others, and outlive it. SQLite: one writer; the clause renders empty.
        raw = conn.execute(
            select(facility.c.policy).where(facility.c.id == facility_id).with_for_update(read=True)
        ).scalar_one_or_none()
        return self._session_level(self._capped(raw), num_signatures)

    def _capped(self, raw: str | None) -> SigningSessionPolicy:
        pol = SigningSessionPolicy.from_policy(json.loads(raw or "{}"))
        return pol.capped(
            max_hours=self.session_max_hours, max_signatures=self.session_max_signatures
        )

    @staticmethod
    def _session_level(pol: SigningSessionPolicy, num_signatures: int) -> tuple[str, timedelta]:
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
        return "1", timedelta(hours=pol.hours)
