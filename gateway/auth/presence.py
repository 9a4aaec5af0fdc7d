"""What every presence method (FIDO2, My Number card) does alike around its own proof.

Begin: the caller is a facility, the credential's signer serves it and both are active.
Authorize: the request is well formed for what it asks (hash-bound or not), the may-sign rule
holds in the issuing transaction, and a refusal is audited in its own transaction with its
challenge burnt. The proofs themselves stay in ``fido2.py`` and ``jpki.py``.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog, AuditRecord
from gateway.auth.challenges import ChallengeStore
from gateway.clock import Clock
from gateway.errors import AccessDenied, GatewayError, InvalidRequest, NotFound
from gateway.hsm.api import DigestAlgorithm
from gateway.logs import where_raised
from gateway.signing.grant import Caller, Grant, IssuedSad
from gateway.signing.ledger import SadLedger, end_sads_of
from gateway.signing.rules import require_credential_active, require_may_sign, require_signer_active
from gateway.store import signers as store
from gateway.store.db import Database
from gateway.store.grouped import OnRefusal

_T = TypeVar("_T")

log = logging.getLogger("gateway.auth")


class CheckFailed(GatewayError):
    """An unexpected exception while a presence proof was checked (input no check foresaw, or
    a bug): a refusal like the others (audited, its challenge burnt), answered 500 with a safe
    text; the server log names the exception's type and where it was raised."""

    status = 500
    code = "server_error"
    public_description = (
        "internal error while checking the presence proof; its challenge is used up: begin again"
    )


def as_refusal(e: Exception) -> GatewayError | None:
    """The refusal an exception raised during a presence check stands for: itself for a
    :class:`GatewayError`; :class:`CheckFailed` for anything unexpected (logged with its type
    and where it was raised). None for the store's own errors: the transaction that would
    record the refusal is in trouble too, and they keep their path (``Database.run_write``:
    503, and a grouped write's other units unaffected)."""
    if isinstance(e, GatewayError):
        return e
    if isinstance(e, SQLAlchemyError | sqlite3.Error):
        return None
    # No stack trace (it may carry the proof's data; docs/operations.md): the type and where
    # it was raised are enough to find the fault, as for any unhandled error of a request.
    where = where_raised(e.__traceback__)
    log.error("presence check failed: unexpected %s at %s", type(e).__name__, where)
    failed = CheckFailed(f"presence check failed: unexpected {type(e).__name__}")
    failed.__cause__ = e
    return failed


def refusing(unit: Callable[[Connection], _T]) -> Callable[[Connection], _T]:
    """A grouped write unit whose unexpected exceptions are refusals (:func:`as_refusal`), so
    that its ``on_refusal`` (:meth:`PresenceMethod.refusal_unit`, which grouped writes run for
    a ``GatewayError`` only) audits them and burns the challenge."""

    def run(conn: Connection) -> _T:
        try:
            return unit(conn)
        except GatewayError:
            raise
        except Exception as e:
            refusal = as_refusal(e)
            if refusal is None:
                raise
            raise refusal from e

    return run


def facility_of(caller: Caller) -> tuple[int, str]:
    """The caller's facility (id, institution code): CSC methods are relayed by facilities."""
    if caller.facility_id is None or caller.institution_code is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    return caller.facility_id, caller.institution_code


def hash_algorithm(oid: str | None) -> DigestAlgorithm | None:
    try:
        return DigestAlgorithm.from_oid(oid) if oid else None
    except ValueError as e:
        raise InvalidRequest(f"Invalid parameter hashAlgorithmOID: {e}") from e


def check_bound_request(
    hashes: Sequence[bytes], algorithm: DigestAlgorithm | None, num_signatures: int
) -> DigestAlgorithm:
    """A hash-bound request names its algorithm and one signature per hash."""
    if algorithm is None:
        raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
    if num_signatures != len(hashes):
        raise InvalidRequest("Invalid parameter numSignatures: must equal the number of hashes")
    return algorithm


async def require_active_signer(conn: AsyncConnection, signer_id: str) -> None:
    status = await store.signer_status(conn, signer_id)
    if status is None:
        raise NotFound(f"signer {signer_id} does not exist")
    require_signer_active(signer_id, status)


async def signer_of_credential(
    conn: AsyncConnection, *, credential_id: str, facility_id: int
) -> str:
    """At begin: the signer of a credential offered to this facility, both active."""
    row = await store.served_credential(conn, credential_id=credential_id, facility_id=facility_id)
    return served_signer(row, credential_id)


def served_signer(row: Any, credential_id: str) -> str:
    """The signer of a served-credential row (``store.served_credential``), both active."""
    if row is None:
        raise InvalidRequest("Invalid parameter credentialID")
    require_signer_active(row.signer_id, row.signer_status)
    require_credential_active(credential_id, row.status)
    return str(row.signer_id)


async def check_may_sign(
    conn: AsyncConnection, *, facility_id: int, credential_id: str, now: datetime
) -> None:
    """The one rule, read in the issuing transaction: active signer serving the facility,
    active credential with a certificate valid now (``signing/rules.py``)."""
    row = await store.may_sign_row(conn, credential_id=credential_id, facility_id=facility_id)
    _may_sign(row, credential_id, now)


def check_may_sign_sync(
    conn: Connection, *, facility_id: int, credential_id: str, now: datetime
) -> None:
    """:func:`check_may_sign` on a synchronous connection (grouped writes)."""
    row = store.may_sign_row_sync(conn, credential_id=credential_id, facility_id=facility_id)
    _may_sign(row, credential_id, now)


def _may_sign(row: Any, credential_id: str, now: datetime) -> None:
    if row is None:
        raise InvalidRequest("Invalid parameter credentialID")
    require_may_sign(
        signer_id=row.signer_id,
        signer_status=row.signer_status,
        serves_facility=row.facility_id is not None,
        credential_id=credential_id,
        credential_status=row.status,
        certificate_der=row.certificate_der,
        now=now,
    )


async def registered_methods(db: Database, signer_id: str) -> dict[str, bool]:
    """Which presence methods ``signer_id`` has registered (``webauthn``, ``jpki``)."""
    async with db.read() as conn:
        return await store.registered_presence(conn, signer_id)


@dataclass
class Attempt:
    """What a ceremony learnt before it was refused: its signer and its challenge."""

    signer_id: str | None = None
    challenge: str | None = None


class PresenceMethod:
    """What the authenticators of every presence method share: their challenge store, the
    audited refusal that burns the challenge, and the registrations (an authenticator, a card
    link) whose removal ends the SADs they approved."""

    db: Database
    audit: AuditLog
    clock: Clock
    challenge_ttl: timedelta
    challenges: ChallengeStore

    async def put_challenge(self, conn: AsyncConnection, challenge: bytes, **kw: Any) -> str:
        """:meth:`put_challenge_sync` on an asynchronous connection (same keywords)."""
        return await conn.run_sync(lambda c: self.put_challenge_sync(c, challenge, **kw))

    def put_challenge_sync(
        self,
        conn: Connection,
        challenge: bytes,
        *,
        kind: str,
        signer_id: str,
        caller: Caller,
        binding: bytes,
        now: datetime,
        **columns: Any,
    ) -> str:
        """Store a new challenge for ``caller`` in the caller's transaction; returns its id."""
        return self.challenges.put_sync(
            conn, challenge, kind=kind, signer_id=signer_id, facility_id=caller.facility_id,
            binding=binding, now=now, ttl=self.challenge_ttl, **columns,
        )  # fmt: skip

    async def refused(
        self,
        *,
        action: str,
        caller: Caller,
        signer_id: str | None,
        reason: str,
        challenge: str | None = None,
        detail: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> None:
        """Record a refused ceremony in its own transaction and burn its challenge (when it was
        issued to the caller's facility: another facility's is left to that facility)."""
        now = now or self.clock()
        async with self.db.write() as conn:
            if challenge is not None:
                await self.challenges.burn_for(
                    conn, challenge, facility_id=caller.facility_id, now=now
                )
            await self.audit.append(
                conn,
                action=action,
                actor=caller.actor,
                facility_code=caller.institution_code,
                signer_id=signer_id,
                detail={"reason": reason, **(detail or {})},
                now=now,
            )

    def refusal_unit(
        self,
        *,
        action: str,
        caller: Caller,
        attempt: Attempt,
        detail: Mapping[str, Any] | None = None,
        now: datetime,
    ) -> OnRefusal:
        """:meth:`refused` as the ``on_refusal`` of a grouped write unit: after the unit's
        rollback, in the same group transaction, burn ``attempt``'s challenge and audit the
        refusal with what the unit set on ``attempt``."""

        def record(conn: Connection, e: GatewayError) -> None:
            if attempt.challenge is not None:
                self.challenges.burn_for_sync(
                    conn, attempt.challenge, facility_id=caller.facility_id, now=now
                )
            self.audit.record_sync(
                conn,
                [
                    AuditRecord(
                        action=action,
                        actor=caller.actor,
                        facility_code=caller.institution_code,
                        signer_id=attempt.signer_id,
                        detail={"reason": e.description, **(detail or {})},
                        now=now,
                    )
                ],
            )

        return record

    @contextlib.asynccontextmanager
    async def attempt(
        self,
        action: str,
        caller: Caller,
        *,
        now: datetime,
        challenge: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Attempt]:
        """A ceremony whose refusal (any ``GatewayError``, and any unexpected exception: see
        :func:`as_refusal`) is audited as ``action`` with what the body set on the
        :class:`Attempt`, its challenge burnt, and raised again (an unexpected one as
        :class:`CheckFailed`, 500)."""
        attempt = Attempt(challenge=challenge)
        try:
            yield attempt
        except Exception as e:
            refusal = as_refusal(e)
            if refusal is None:
                raise
            await self.refused(
                action=action, caller=caller, signer_id=attempt.signer_id,
                reason=refusal.description, challenge=attempt.challenge, detail=detail, now=now,
            )  # fmt: skip
            if refusal is e:
                raise
            raise refusal from e

    async def _registrations(self, table: Table, signer_id: str) -> list[Any]:
        async with self.db.read() as conn:
            q = select(table).where(table.c.signer_id == signer_id).order_by(table.c.created_at)
            return list((await conn.execute(q)).all())

    async def _remove_registration(
        self,
        table: Table,
        ref: str,
        signer_id: str,
        *,
        actor: str,
        action: str,
        detail_key: str,
        not_found: str,
    ) -> None:
        """Delete a signer's registration ``ref`` of ``table`` and end every live SAD it
        approved (a lost key or card must not keep signing), audited as ``action``."""
        now = self.clock()
        async with self.db.write() as conn:
            res = await conn.execute(
                delete(table).where(table.c.id == ref, table.c.signer_id == signer_id)
            )
            if res.rowcount == 0:
                raise NotFound(not_found)
            ended = await end_sads_of(conn, ref, now=now)
            await self.audit.append(
                conn,
                action=action,
                actor=actor,
                signer_id=signer_id,
                detail={detail_key: ref, "sads_ended": ended},
                now=now,
            )


async def issue_grant(
    conn: AsyncConnection, ledger: SadLedger, grant: Grant, *, caller: Caller, now: datetime
) -> IssuedSad:
    """Check the may-sign rule in the issuing transaction, then store ``grant`` as a SAD."""
    await check_may_sign(
        conn, facility_id=grant.facility_id, credential_id=grant.credential_id, now=now
    )
    return await ledger.issue(
        conn, grant, actor=caller.actor, facility_code=caller.institution_code, now=now
    )


def issue_grant_sync(
    conn: Connection, ledger: SadLedger, grant: Grant, *, caller: Caller, now: datetime
) -> IssuedSad:
    """:func:`issue_grant` on a synchronous connection (grouped writes)."""
    check_may_sign_sync(
        conn, facility_id=grant.facility_id, credential_id=grant.credential_id, now=now
    )
    return ledger.issue_sync(
        conn, grant, actor=caller.actor, facility_code=caller.institution_code, now=now
    )


def from_row(cls: type[_T], row: Any) -> _T:
    """A registration dataclass from its row (same field names)."""
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def json_dict(obj: Any) -> dict[str, Any]:
    """A registration dataclass as JSON: datetimes in ISO 8601."""
    return {
        f.name: v.isoformat() if isinstance(v := getattr(obj, f.name), datetime) else v
        for f in fields(obj)
    }
