"""FIDO2 signer presence: enrolment codes, authenticator registration, hash-bound challenges.

Enrolment follows the MEDIS model: a registration officer issues a one-time enrolment code and a
separate password (``hpki-gateway signer enroll-code``; both shown once, stored hashed). The
doctor registers an authenticator with both; ``enrollment_max_password_tries`` wrong passwords
lock the code, and a used or expired code is refused. One code registers one authenticator; a
signer may hold several.

Authentication is bound to what will be signed. ``authenticate_begin`` returns WebAuthn request
options whose 48-byte challenge commits to the hashes (``auth/challenges.py``); the challenge
state is kept in the database (single use, short TTL, with the state python-fido2's ``*_begin``
returned, handed back to ``*_complete`` as is) and, when the assertion comes back, the binding
is recomputed from the ``credentials/authorize`` request and compared in constant time. User
verification is required; the sign count must grow (a clone of the authenticator shows as a
regression).

python-fido2's ``Fido2Server`` does the WebAuthn checks (type, origin, challenge, RP ID hash,
UP/UV flags, signature); this module keeps the state, the counters and the policy. It never
touches keys (``auth/`` rule): it returns who was present, the activation module turns that
into a SAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import typing
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import utils as fido2_utils
from fido2.cose import ES256, UnsupportedKey
from fido2.server import Fido2Server
from fido2.utils import websafe_decode, websafe_encode
from fido2.webauthn import (
    AttestedCredentialData,
    AuthenticationResponse,
    AuthenticatorAssertionResponse,
    AuthenticatorData,
    CollectedClientData,
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialType,
    PublicKeyCredentialUserEntity,
    RegistrationResponse,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)
from sqlalchemy import ColumnElement, Connection, and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog
from gateway.auth import presence
from gateway.auth.challenges import (
    WEBAUTHN_CHALLENGES,
    Approval,
    approves,
    challenge_id,
    check_issued_for,
    enrollment_binding,
    new_bound_challenge,
)
from gateway.clock import Clock, system_clock
from gateway.errors import AccessDenied, Conflict, GatewayError, InvalidRequest
from gateway.passwords import AttemptLimit, hash_password, verify_password
from gateway.signing.grant import Caller as Caller
from gateway.store.db import Database
from gateway.store.fast import FastStatement
from gateway.store.schema import credential, enrollment, fido_credential, signer, signer_facility

# python-fido2 2.x resolves the type hints of its WebAuthn data classes (string annotations)
# with typing.get_type_hints on every construction and every from_dict: about 1 ms of CPU per
# parsed assertion, most of a ceremony's parsing. A class's hints never change once it is
# defined and fido2 only reads them, so they are resolved once per class.
fido2_utils.get_type_hints = functools.cache(typing.get_type_hints)  # type: ignore[assignment,attr-defined]

# Crockford base32 without I, L, O, U: no look-alikes when a doctor types the code.
_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PASSWORD_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"  # noqa: S105
#: The one answer once a code is locked, or while every remaining attempt is being checked.
LOCKED_TEXT = "enrollment code is locked after too many wrong passwords: ask for a new one"


log = logging.getLogger("gateway.auth")

_ATTEMPTS = AttemptLimit(enrollment, failed="failed_tries", checking="checking_tries")


def _open_enrollment(enrollment_id: int) -> ColumnElement[bool]:
    return and_(enrollment.c.id == enrollment_id, enrollment.c.status == "active")


# -- pure helpers (unit-tested) ---------------------------------------------------------------


def normalize_code(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch not in "- ")


def code_hash(code: str) -> str:
    # The code carries 80 random bits, so a plain SHA-256 suffices (no dictionary to try);
    # the short password is what gets the slow hash.
    return hashlib.sha256(normalize_code(code).encode()).hexdigest()


def new_enrollment_code() -> str:
    raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(16))
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def new_enrollment_password() -> str:
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(12))


#: WebAuthn §7.1: "Verify that the credentialId is ≤ 1023 bytes."
MAX_CREDENTIAL_ID_BYTES = 1023
_PROBE_SIGNATURE = b"\x30\x06\x02\x01\x01\x02\x01\x01"  # DER ECDSA (1, 1): never valid


def check_registered_credential(
    cred: AttestedCredentialData | None, offered: frozenset[int]
) -> None:
    """A registered credential the gateway can use: an id of at most 1023 bytes, and a public
    key of an algorithm register/begin offered that verifies signatures (a probe signature is
    refused as invalid, not as unusable).

    python-fido2's ``register_complete`` checks neither: it stored RS1 (RSA with SHA-1, never
    offered) keys, keys of algorithms it cannot verify and ES256 keys off the curve (every
    assertion of those then failed with a 500), and credential ids longer than the column."""
    if cred is None:  # pragma: no cover - register_complete requires AT
        raise InvalidRequest("registration refused: no attested credential data")
    if len(cred.credential_id) > MAX_CREDENTIAL_ID_BYTES:
        raise InvalidRequest(
            f"registration refused: credential id of {len(cred.credential_id)} bytes "
            f"(at most {MAX_CREDENTIAL_ID_BYTES})"
        )
    alg = cred.public_key.get(3)
    if isinstance(cred.public_key, UnsupportedKey) or alg not in offered:
        raise InvalidRequest(
            f"registration refused: public key algorithm {alg!r} was not offered in "
            "pubKeyCredParams"
        )
    try:
        _attested(bytes(cred)).public_key.verify(b"registration probe", _PROBE_SIGNATURE)
    except InvalidSignature:
        return
    except Exception as e:
        raise InvalidRequest(
            f"registration refused: the public key cannot verify signatures ({_reason(e)})"
        ) from e
    raise InvalidRequest(  # pragma: no cover - a fixed signature verified: refuse that key too
        "registration refused: the public key accepts a forged signature"
    )


def sign_count_ok(stored: int, received: int) -> bool:
    """WebAuthn §6.1.1: a counter that does not grow signals a cloned authenticator.

    Authenticators without a counter always report 0; that is accepted while the stored value
    is 0 too.
    """
    if received == 0 and stored == 0:
        return True
    return received > stored


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IssuedEnrollment:
    """Shown once to the registration officer; only hashes are stored."""

    signer_id: str
    code: str
    password: str
    expires_at: datetime


@dataclass(frozen=True, kw_only=True)
class RegisteredAuthenticator:
    id: str
    signer_id: str
    credential_id: str  # base64url WebAuthn credential id
    aaguid: str
    label: str | None
    sign_count: int
    created_at: datetime
    last_used_at: datetime | None

    def to_json_dict(self) -> dict[str, Any]:
        return presence.json_dict(self)


@dataclass(frozen=True, kw_only=True)
class VerifiedPresence:
    """A verified assertion: this signer was present and approved exactly ``binding``."""

    signer_id: str
    fido_credential_id: str
    challenge_id: str
    sign_count: int


@dataclass(frozen=True, kw_only=True)
class ChallengeState:
    id: str
    signer_id: str
    facility_id: int | None
    credential_id: str | None
    binding: bytes
    fido2_state: dict[str, Any]  # what python-fido2's *_begin returned, as it was


class Fido2Authenticator(presence.PresenceMethod):
    """Enrolment and assertion verification over python-fido2, state in the database."""

    challenges = WEBAUTHN_CHALLENGES

    def __init__(
        self,
        *,
        db: Database,
        audit: AuditLog,
        rp_id: str,
        rp_name: str,
        origins: frozenset[str],
        challenge_ttl: timedelta = timedelta(seconds=120),
        enrollment_validity: timedelta = timedelta(days=14),
        max_password_tries: int = 5,
        clock: Clock = system_clock,
    ) -> None:
        self.db = db
        self.audit = audit
        self.rp_id = rp_id
        self.origins = origins
        self.challenge_ttl = challenge_ttl
        self.enrollment_validity = enrollment_validity
        self.max_password_tries = max_password_tries
        self.clock = clock
        self.server = Fido2Server(
            PublicKeyCredentialRpEntity(name=rp_name, id=rp_id),
            verify_origin=self._origin_allowed,
        )
        self._template = _options_template(self.server)
        #: The COSE algorithms register/begin offers (pubKeyCredParams): the only ones stored.
        self.offered_algorithms = frozenset(int(p.alg) for p in self.server.allowed_algorithms)

    def _origin_allowed(self, origin: object) -> bool:
        # clientDataJSON is the client's JSON: "origin" may be any JSON value (a list is not
        # hashable, and a set lookup of it raised TypeError: a 500 that skipped the refusal).
        return isinstance(origin, str) and origin in self.origins

    # -- enrolment codes (CLI) --------------------------------------------------------------

    async def issue_enrollment(
        self, signer_id: str, *, actor: str, now: datetime | None = None
    ) -> IssuedEnrollment:
        """A new code + password; earlier unused codes of the signer are revoked."""
        now = now or self.clock()
        code, password = new_enrollment_code(), new_enrollment_password()
        pw_hash = await asyncio.to_thread(hash_password, password)
        expires = now + self.enrollment_validity
        async with self.db.write() as conn:
            # One issue at a time per signer: the signer's row is locked (PostgreSQL; SQLite
            # writes one transaction at a time). Without it, codes issued at once each revoked
            # what was active before them and stayed active side by side.
            await conn.execute(
                select(signer.c.id).where(signer.c.id == signer_id).with_for_update()
            )
            await presence.require_active_signer(conn, signer_id)
            revoked = await conn.execute(
                update(enrollment)
                .where(enrollment.c.signer_id == signer_id, enrollment.c.status == "active")
                .values(status="revoked")
            )
            res = await conn.execute(
                insert(enrollment).values(
                    signer_id=signer_id,
                    code_hash=code_hash(code),
                    password_hash=pw_hash,
                    failed_tries=0,
                    status="active",
                    expires_at=expires,
                    created_at=now,
                )
            )
            await self.audit.append(
                conn,
                action="enrollment.issue",
                actor=actor,
                signer_id=signer_id,
                detail={
                    "enrollment": int(res.inserted_primary_key[0]),  # type: ignore[index]
                    "expires_at": expires.isoformat(),
                    "revoked_earlier_codes": revoked.rowcount,
                },
                now=now,
            )
        return IssuedEnrollment(
            signer_id=signer_id, code=code, password=password, expires_at=expires
        )

    async def list_authenticators(self, signer_id: str) -> list[RegisteredAuthenticator]:
        rows = await self._registrations(fido_credential, signer_id)
        return [presence.from_row(RegisteredAuthenticator, r) for r in rows]

    async def remove_authenticator(self, signer_id: str, fido_id: str, *, actor: str) -> None:
        """Remove an authenticator and end every live SAD it approved (a lost or stolen key
        must not keep signing through a signing session it opened)."""
        await self._remove_registration(
            fido_credential, fido_id, signer_id, actor=actor, action="fido2.remove",
            detail_key="authenticator",
            not_found=f"signer {signer_id} has no authenticator {fido_id}",
        )  # fmt: skip

    # -- registration -----------------------------------------------------------------------

    async def _enrollment_for(
        self, conn: AsyncConnection, code: str, caller: Caller, now: datetime
    ) -> Any:
        if caller.facility_id is None:
            # An admin certificate (or any caller without a facility) never relays an
            # enrolment: the signer's facility does, on its own registered certificate.
            raise AccessDenied("FIDO2 enrolment is relayed by facility client certificates")
        row = (
            await conn.execute(select(enrollment).where(enrollment.c.code_hash == code_hash(code)))
        ).one_or_none()
        if row is None:
            raise InvalidRequest("enrollment code is not valid")
        if row.status == "used":
            raise InvalidRequest("enrollment code was already used: ask for a new one")
        if row.status == "revoked":
            raise InvalidRequest("enrollment code was replaced by a newer one")
        if row.status == "locked":
            raise AccessDenied(LOCKED_TEXT)
        if row.expires_at <= now:
            raise InvalidRequest(
                f"enrollment code expired on {row.expires_at.isoformat(timespec='seconds')}: "
                "ask for a new one"
            )
        linked = (
            await conn.execute(
                select(signer_facility.c.signer_id).where(
                    signer_facility.c.signer_id == row.signer_id,
                    signer_facility.c.facility_id == caller.facility_id,
                )
            )
        ).one_or_none()
        if linked is None:
            raise AccessDenied("the signer of this enrollment code does not serve this facility")
        await presence.require_active_signer(conn, row.signer_id)
        return row

    async def register_begin(
        self, *, code: str, password: str, caller: Caller, now: datetime | None = None
    ) -> dict[str, Any]:
        """Check code + password, then return ``{"publicKey": creation options}``."""
        now = now or self.clock()
        checked = self.enrollment_checked(code=code, password=password, caller=caller, now=now)
        async with checked, self.db.write() as conn:
            row = await self.take_checked_enrollment(conn, code=code, caller=caller, now=now)
            srow = (await conn.execute(select(signer).where(signer.c.id == row.signer_id))).one()
            exclude = _descriptors(await _authenticator_ids(conn, row.signer_id))
            challenge = secrets.token_bytes(32)
            options, state = self.server.register_begin(
                PublicKeyCredentialUserEntity(
                    id=row.signer_id.encode(),
                    name=row.signer_id,
                    display_name=srow.name_kanji or srow.name,
                ),
                credentials=exclude,
                user_verification=UserVerificationRequirement.REQUIRED,
                resident_key_requirement=ResidentKeyRequirement.DISCOURAGED,
                challenge=challenge,
            )
            await self.put_challenge(
                conn, challenge, kind="register", signer_id=row.signer_id, caller=caller,
                binding=enrollment_binding(row.id), now=now,
                enrollment_id=row.id, fido2_state=json.dumps(state),
            )  # fmt: skip
        return {"publicKey": dict(options.public_key)}

    async def enrollment_for(
        self, conn: AsyncConnection, *, code: str, caller: Caller, now: datetime
    ) -> Any:
        """The active enrolment ``code`` of a signer this caller's facility serves, or refuse."""
        return await self._enrollment_for(conn, code, caller, now)

    async def check_enrollment_password(
        self, *, code: str, password: str, caller: Caller, now: datetime
    ) -> int:
        """Code + password, under the one attempt limit of every enrolment method.

        The attempt is reserved BEFORE the (slow) password check, atomically: however many
        guesses arrive at once, at most max_password_tries passwords are ever checked. A wrong
        password counts (the last one locks) and raises; the right one keeps its reservation
        until :meth:`take_checked_enrollment` gives it back (use it through
        :meth:`enrollment_checked`, which also gives it back when the request fails before).
        Returns the enrolment's id.
        """
        async with self.db.read() as conn:
            row = await self._enrollment_for(conn, code, caller, now)
        if not await self._reserve_try(row.id):
            await self._refuse_now(code, caller, now)
        try:
            ok = await asyncio.to_thread(verify_password, password, row.password_hash)
        except BaseException:  # cancelled while checking: nothing was learnt
            await self._give_back_try(row.id)
            raise
        if not ok:
            await self._wrong_password(row.id, row.signer_id, caller, now)
        return int(row.id)

    @contextlib.asynccontextmanager
    async def enrollment_checked(
        self, *, code: str, password: str, caller: Caller, now: datetime
    ) -> AsyncIterator[None]:
        """:meth:`check_enrollment_password`, then the body: the write transaction that calls
        :meth:`take_checked_enrollment` (and nothing after it). When the body fails (the
        signer was locked meanwhile, the store refused the write, the request was cancelled),
        its rollback undid the give-back, so the right password's reservation is given back
        here, in a transaction of its own: it stayed reserved, and each such failure took an
        attempt away until the right password was answered 'locked'."""
        enrollment_id = await self.check_enrollment_password(
            code=code, password=password, caller=caller, now=now
        )
        try:
            yield
        except BaseException:
            await self._give_back_try(enrollment_id)
            raise

    async def _give_back_try(self, enrollment_id: int) -> None:
        """Give a reservation back outside the request's transaction (best effort: when the
        store cannot be written now, the attempt stays reserved, which errs toward the lock)."""
        try:
            async with self.db.write() as conn:
                await _ATTEMPTS.give_back(conn, _open_enrollment(enrollment_id))
        except (GatewayError, SQLAlchemyError) as e:
            log.warning(
                "enrollment %s: reserved password attempt not given back (%s)",
                enrollment_id,
                type(e).__name__,
            )

    async def take_checked_enrollment(
        self, conn: AsyncConnection, *, code: str, caller: Caller, now: datetime
    ) -> Any:
        """After :meth:`check_enrollment_password` passed, inside the write transaction that
        issues the challenge: re-read the enrolment (a concurrent wrong guess may have locked
        it) and give the reservation back."""
        row = await self._enrollment_for(conn, code, caller, now)
        if not await _ATTEMPTS.give_back(conn, _open_enrollment(row.id)):
            raise AccessDenied(LOCKED_TEXT)  # pragma: no cover - the re-read saw it active
        return row

    async def _reserve_try(self, enrollment_id: int) -> bool:
        """Reserve one password check; False when none is left (locked, or every remaining
        attempt is being checked)."""
        async with self.db.write() as conn:
            return await _ATTEMPTS.reserve(
                conn, _open_enrollment(enrollment_id), self.max_password_tries
            )

    async def _refuse_now(self, code: str, caller: Caller, now: datetime) -> NoReturn:
        """No attempt could be reserved: say why the code cannot be used now (re-read); while
        it is still active, all attempts are taken, which answers exactly like the lock."""
        async with self.db.read() as conn:
            await self._enrollment_for(conn, code, caller, now)
        raise AccessDenied(LOCKED_TEXT)

    async def _wrong_password(
        self, enrollment_id: int, signer_id: str, caller: Caller, now: datetime
    ) -> NoReturn:
        """The reserved check failed: it counts as a wrong password; the last one locks."""
        async with self.db.write() as conn:
            counted = await _ATTEMPTS.failed_check(
                conn,
                enrollment.c.id == enrollment_id,
                _open_enrollment(enrollment_id),
                self.max_password_tries,
                lock={"status": "locked"},
            )
            if counted is None:  # pragma: no cover - selected by id; enrolments are kept
                raise InvalidRequest("enrollment code is not valid")
            tries, locked = counted
            await self.audit.append(
                conn,
                action="enrollment.locked" if locked else "enrollment.wrong_password",
                actor=caller.actor,
                facility_code=caller.institution_code,
                signer_id=signer_id,
                detail={"enrollment": enrollment_id, "failed_tries": tries},
                now=now,
            )
        if tries >= self.max_password_tries:
            raise AccessDenied(LOCKED_TEXT)
        left = self.max_password_tries - tries
        raise AccessDenied(f"wrong enrollment password ({left} tries left)")

    async def register_complete(
        self,
        *,
        code: str,
        response: Mapping[str, Any],
        caller: Caller,
        label: str | None = None,
        now: datetime | None = None,
    ) -> RegisteredAuthenticator:
        """Verify the attestation response and store the authenticator; uses up the code."""
        now = now or self.clock()
        try:
            registration = RegistrationResponse.from_dict(response)
            challenge = registration.response.client_data.challenge
        except Exception as e:
            raise InvalidRequest(f"Invalid parameter credential: {_reason(e)}") from e
        cid = challenge_id(challenge)
        refusal = self.attempt("fido2.register.refused", caller, now=now, challenge=cid)
        async with refusal as at, self.db.write() as conn:
            row = await self._enrollment_for(conn, code, caller, now)
            at.signer_id = row.signer_id
            state = await self._take_challenge(conn, cid, kind="register", now=now)
            if state.facility_id is None or state.facility_id != caller.facility_id:
                raise InvalidRequest("the challenge was issued to another facility")
            if json.loads(state.binding) != {"enrollment": row.id}:
                raise InvalidRequest("the challenge was issued for another enrollment code")
            try:
                auth_data = self.server.register_complete(state.fido2_state, registration)
            except ValueError as e:
                raise InvalidRequest(f"registration refused: {e}") from e
            check_registered_credential(auth_data.credential_data, self.offered_algorithms)
            return await self._store_authenticator(
                conn, auth_data, enrollment_id=row.id, signer_id=row.signer_id,
                caller=caller, label=label, now=now,
            )  # fmt: skip

    async def _store_authenticator(
        self,
        conn: AsyncConnection,
        auth_data: AuthenticatorData,
        *,
        enrollment_id: int,
        signer_id: str,
        caller: Caller,
        label: str | None,
        now: datetime,
    ) -> RegisteredAuthenticator:
        """Store a verified registration, use up its enrolment code, audit."""
        cred = auth_data.credential_data
        if cred is None:  # pragma: no cover - register_complete requires AT
            raise InvalidRequest("registration refused: no attested credential data")
        fido_id = f"fido-{secrets.token_hex(8)}"
        try:
            await conn.execute(
                insert(fido_credential).values(
                    id=fido_id,
                    signer_id=signer_id,
                    credential_id=websafe_encode(cred.credential_id),
                    credential_data=bytes(cred),
                    sign_count=auth_data.counter,
                    aaguid=str(cred.aaguid),
                    label=label,
                    created_at=now,
                )
            )
        except IntegrityError as e:
            raise Conflict("this authenticator is already registered") from e
        await use_enrollment(conn, enrollment_id, now=now)
        await self.audit.append(
            conn,
            action="fido2.register",
            actor=caller.actor,
            facility_code=caller.institution_code,
            signer_id=signer_id,
            detail={
                "authenticator": fido_id,
                "aaguid": str(cred.aaguid),
                "enrollment": enrollment_id,
                "sign_count": auth_data.counter,
            },
            now=now,
        )
        return RegisteredAuthenticator(
            id=fido_id,
            signer_id=signer_id,
            credential_id=websafe_encode(cred.credential_id),
            aaguid=str(cred.aaguid),
            label=label,
            sign_count=auth_data.counter,
            created_at=now,
            last_used_at=None,
        )

    # -- authentication ---------------------------------------------------------------------

    async def authenticate_begin(
        self, *, caller: Caller, approval: Approval, now: datetime | None = None
    ) -> dict[str, Any]:
        """Request options whose challenge commits to exactly this approval.

        One grouped write unit (``Database.run_grouped``): the checks of begin and the stored
        challenge, committed with the concurrent ceremonies of its group; the options are built
        outside it (nothing in them is read from the store but the authenticators' ids)."""
        now = now or self.clock()
        credential_id = approval.credential_id
        if caller.facility_id is None:
            raise AccessDenied("FIDO2 authentication is relayed by facility client certificates")
        facility_id = caller.facility_id
        binding = approval.binding()
        challenge = new_bound_challenge(binding)
        options, state = self._request_options(challenge)

        def unit(conn: Connection) -> list[str]:
            # The served credential and its signer's authenticators in one read.
            params = {"credential_id": credential_id, "facility_id": facility_id}
            rows = _BEGIN_READ.all(conn, params)
            signer_id = presence.served_signer(rows[0] if rows else None, credential_id)
            allow = [r.authenticator for r in rows if r.authenticator is not None]
            if not allow:
                raise InvalidRequest(
                    f"signer {signer_id} has no registered FIDO2 authenticator: enrol one "
                    "at /enroll with an enrollment code"
                )
            self.put_challenge_sync(
                conn, challenge, kind="authenticate", signer_id=signer_id, caller=caller,
                binding=binding, now=now,
                credential_id=credential_id, fido2_state=state,
            )  # fmt: skip
            return allow

        allow = await self.db.run_grouped(unit)
        return {"publicKey": {**options, "allowCredentials": _allow_credentials(tuple(allow))}}

    def _request_options(self, challenge: bytes) -> tuple[dict[str, Any], str]:
        """python-fido2's request options (without allowCredentials) and its state (as JSON)
        for ``challenge``.

        Both are python-fido2's own output for a fixed challenge, built once, with the challenge
        put in: building its data classes and converting them back to a dict cost ~0.25 ms of
        CPU per ceremony, and only the challenge differs between two ceremonies.
        ``_options_template`` checks that python-fido2 places the challenge only where it is
        replaced here; if not, every call goes through python-fido2."""
        template = self._template
        if template is None:
            built, fido2_state = self.server.authenticate_begin(
                user_verification=UserVerificationRequirement.REQUIRED, challenge=challenge
            )
            return _json_ready(dict(built.public_key)), json.dumps(fido2_state)
        options, state = template
        encoded = websafe_encode(challenge)
        return {**options, "challenge": encoded}, json.dumps({**state, "challenge": encoded})

    async def _take_challenge(
        self, conn: AsyncConnection, cid: str, *, kind: str, now: datetime
    ) -> ChallengeState:
        """Mark the challenge used (single use, atomic) and return its state."""
        return _state_of(cid, await self.challenges.take(conn, cid, kind=kind, now=now))

    @staticmethod
    def parse_assertion(response: Mapping[str, Any]) -> AuthenticationResponse:
        try:
            return _plain_assertion(response) or AuthenticationResponse.from_dict(response)
        except Exception as e:
            raise InvalidRequest(f"Invalid parameter authData: {_reason(e)}") from e

    def verify_assertion_sync(
        self,
        conn: Connection,
        *,
        assertion: AuthenticationResponse,
        facility_id: int,
        credential_id: str,
        binding: bytes,
        now: datetime,
    ) -> VerifiedPresence:
        """Check the assertion against its stored challenge, inside the caller's write unit
        (a grouped write unit's synchronous connection).

        Raises InvalidRequest with the reason; the caller rolls back and records the refusal
        (``refused``), which also burns the challenge.
        """
        challenge = assertion.response.client_data.challenge
        cid = challenge_id(challenge)
        row = self.challenges.take_sync(conn, cid, kind="authenticate", now=now)
        state = _state_of(cid, row)
        check_issued_for(state, facility_id=facility_id, credential_id=credential_id)
        if not approves(challenge, binding):
            raise InvalidRequest(
                "the assertion does not approve this request: credentialID, hashes, "
                "hashAlgorithmOID or numSignatures differ from authenticate/begin"
            )
        raw_id = websafe_encode(assertion.raw_id)
        frow = _FIDO_CREDENTIAL.one_or_none(conn, {"raw_id": raw_id})
        if frow is None or frow.signer_id != state.signer_id:
            raise InvalidRequest("the authenticator is not registered for this signer")
        try:
            self.server.authenticate_complete(
                state.fido2_state, [_attested(frow.credential_data)], assertion
            )
        except ValueError as e:
            raise InvalidRequest(f"WebAuthn assertion refused: {e}") from e
        counter = _count_signature(conn, frow, assertion.response.authenticator_data, now)
        return VerifiedPresence(
            signer_id=state.signer_id,
            fido_credential_id=frow.id,
            challenge_id=cid,
            sign_count=counter,
        )


async def use_enrollment(conn: AsyncConnection, enrollment_id: int, *, now: datetime) -> None:
    """The code registered what it was issued for (an authenticator, a card): it is used up.

    Only an active code is: two registrations completed at once with one code (the facility
    relaying it knows code and password) both read it active, and on PostgreSQL (READ
    COMMITTED) both inserted their authenticator; the second UPDATE now waits for the first,
    finds the code used and matches no row: Conflict, and the caller's transaction (its
    authenticator or card link) rolls back."""
    res = await conn.execute(
        update(enrollment)
        .where(enrollment.c.id == enrollment_id, enrollment.c.status == "active")
        .values(status="used", used_at=now)
    )
    if res.rowcount != 1:
        raise Conflict("enrollment code was already used: ask for a new one")


async def _authenticator_ids(conn: AsyncConnection, signer_id: str) -> list[str]:
    """The WebAuthn credential ids (base64url) of the signer's authenticators."""
    return list((await conn.execute(_AUTHENTICATOR_IDS, {"signer_id": signer_id})).scalars())


def _options_template(
    server: Fido2Server,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """python-fido2's request options and state for a probe challenge, or None when the
    challenge is not (only) where ``_request_options`` puts it."""
    probe = bytes(range(48))
    options, state = server.authenticate_begin(
        user_verification=UserVerificationRequirement.REQUIRED, challenge=probe
    )
    opts, st = _json_ready(dict(options.public_key)), json.loads(json.dumps(state))
    encoded = websafe_encode(probe)
    if opts.get("challenge") != encoded or st.get("challenge") != encoded:
        return None  # pragma: no cover - another python-fido2 layout: no template
    if encoded in json.dumps([{**opts, "challenge": None}, {**st, "challenge": None}]):
        return None  # pragma: no cover - the challenge also elsewhere: no template
    return opts, st


@functools.lru_cache(maxsize=4096)
def _allow_credentials(credential_ids: tuple[str, ...]) -> list[dict[str, Any]]:
    """The allowCredentials of request options, as python-fido2 writes them, built once per
    set of authenticators (a signer's rarely change; a new one is another key). Never
    modified by the caller: json_response only reads it."""
    return [_json_ready(dict(d)) for d in _descriptors(list(credential_ids))]


def _json_ready(options: dict[str, Any]) -> dict[str, Any]:
    """python-fido2's dict with its enum values as the strings JSON carries."""
    ready: dict[str, Any] = json.loads(json.dumps(options))
    return ready


def _descriptors(credential_ids: list[str]) -> list[PublicKeyCredentialDescriptor]:
    return [_descriptor(c) for c in credential_ids]


@functools.lru_cache(maxsize=4096)
def _descriptor(credential_id: str) -> PublicKeyCredentialDescriptor:
    """One allowCredentials entry: immutable for its id, built once (python-fido2's data
    classes resolve their type hints on every construction)."""
    return PublicKeyCredentialDescriptor(
        type=PublicKeyCredentialType.PUBLIC_KEY, id=websafe_decode(credential_id)
    )


_PLAIN_KEYS = frozenset({"id", "rawId", "type", "response", "clientExtensionResults"})
_PLAIN_RESPONSE_KEYS = frozenset({"clientDataJSON", "authenticatorData", "signature"})


def _plain_assertion(data: Mapping[str, Any]) -> AuthenticationResponse | None:
    """The AuthenticationResponse of an assertion in the shape every browser sends
    (``PublicKeyCredential.toJSON()``: id = rawId, type public-key, no extension results, no
    user handle), built from its parts; None for any other shape (python-fido2's
    ``from_dict`` then parses it, and refuses what it refuses).

    Why by hand: ``from_dict`` walks the data classes' type hints field by field (~110 µs
    per assertion measured, ~190 µs on a served worker); the parts themselves
    (``CollectedClientData``, ``AuthenticatorData``) are python-fido2's, and the result is
    equal to ``from_dict``'s (``tests/unit/test_fido2_units.py``)."""
    if not isinstance(data, dict) or not data.keys() <= _PLAIN_KEYS:
        return None
    raw_id, response = data.get("rawId"), data.get("response")
    if (
        not isinstance(raw_id, str)
        or data.get("id", raw_id) != raw_id
        or data.get("type", "public-key") != "public-key"
        or data.get("clientExtensionResults", {}) != {}
        or not isinstance(response, dict)
        or response.keys() != _PLAIN_RESPONSE_KEYS
        or not all(isinstance(v, str) for v in response.values())
    ):
        return None
    return AuthenticationResponse(
        raw_id=websafe_decode(raw_id),
        response=AuthenticatorAssertionResponse(
            client_data=CollectedClientData(websafe_decode(response["clientDataJSON"])),
            authenticator_data=AuthenticatorData(websafe_decode(response["authenticatorData"])),
            signature=websafe_decode(response["signature"]),
        ),
    )


class _ES256(ES256):
    """python-fido2's ES256 key with its ``cryptography`` public key built once, when the
    stored credential is parsed (``_attested``), not for every assertion: building it
    checks that the point is on the curve, about a fifth of each verification (measured
    ~28 µs of ~100). Same checks, same exceptions as ``ES256.verify``."""

    def __init__(self, cose: Mapping[int, Any]) -> None:
        super().__init__(cose)
        if self[-1] != 1:
            raise ValueError("Unsupported elliptic curve")
        self._key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(self[-2], "big"), int.from_bytes(self[-3], "big"), ec.SECP256R1()
        ).public_key()

    def verify(self, message: bytes, signature: bytes) -> None:
        self._key.verify(signature, message, ec.ECDSA(hashes.SHA256()))


@functools.lru_cache(maxsize=4096)
def _attested(credential_data: bytes) -> AttestedCredentialData:
    """A stored credential's public key, parsed once: immutable for its bytes."""
    attested = AttestedCredentialData(credential_data)
    if type(attested.public_key) is ES256 and attested.public_key.get(-1) == 1:
        # python-fido2 sets its parsed fields this way (the class is immutable bytes).
        object.__setattr__(attested, "public_key", _ES256(attested.public_key))
    return attested


def _state_of(cid: str, row: Any) -> ChallengeState:
    return ChallengeState(
        id=cid,
        signer_id=row.signer_id,
        facility_id=row.facility_id,
        credential_id=row.credential_id,
        binding=row.binding.encode(),
        fido2_state=json.loads(row.fido2_state),
    )


_AUTHENTICATOR_IDS = select(fido_credential.c.credential_id).where(
    fido_credential.c.signer_id == bindparam("signer_id")
)
#: ``store.signers.served_credential``, one row per authenticator of the credential's signer
#: (one row with ``authenticator`` NULL when it has none).
_BEGIN_READ = FastStatement(
    select(
        credential.c.signer_id,
        credential.c.status,
        signer.c.status.label("signer_status"),
        fido_credential.c.credential_id.label("authenticator"),
    )
    .select_from(
        credential.join(signer, signer.c.id == credential.c.signer_id)
        .join(signer_facility, signer_facility.c.signer_id == signer.c.id)
        .outerjoin(fido_credential, fido_credential.c.signer_id == signer.c.id)
    )
    .where(
        credential.c.id == bindparam("credential_id"),
        signer_facility.c.facility_id == bindparam("facility_id"),
    )
)
_FIDO_CREDENTIAL = FastStatement(
    select(fido_credential).where(fido_credential.c.credential_id == bindparam("raw_id"))
)
_COUNT = FastStatement(
    update(fido_credential)
    .where(
        fido_credential.c.id == bindparam("b_id"),
        fido_credential.c.sign_count == bindparam("b_old"),
    )
    .values(sign_count=bindparam("b_new"), last_used_at=bindparam("b_now"))
)


def _count_signature(
    conn: Connection, frow: Any, auth_data: AuthenticatorData, now: datetime
) -> int:
    """Store the assertion's sign count; it must grow (WebAuthn §6.1.1), and a concurrent
    assertion of the same authenticator loses."""
    counter = int(auth_data.counter)
    if not sign_count_ok(int(frow.sign_count), counter):
        raise InvalidRequest(
            f"WebAuthn assertion refused: sign count {counter} does not exceed "
            f"{frow.sign_count} (cloned authenticator?)"
        )
    params = {"b_id": frow.id, "b_old": frow.sign_count, "b_new": counter, "b_now": now}
    if _COUNT.run(conn, params) != 1:
        raise InvalidRequest("WebAuthn assertion refused: sign count changed concurrently")
    return counter


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text[:200]
