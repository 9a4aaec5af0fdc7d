"""Challenges of every presence method: the binding they commit to, and their stored state.

A challenge that approves signing is ``nonce(16) || SHA-256(binding)``, where ``binding`` is
the canonical JSON ``{"credentialID", "hashAlgorithmOID", "hashes": [sorted base64],
"numSignatures"}`` (keys sorted, no whitespace; documented in docs/api-fido2-signing.md). A
client can recompute the tail and see that the authenticator (FIDO2) or the card (JPKI) signs a
commitment to its hashes; the server recomputes the binding from the authorize request and
compares it in constant time.

The state of a challenge is a row, single use and short-lived, in the table of its method
(``webauthn_challenge``, ``jpki_challenge``); :class:`ChallengeStore` is the only code that
reads or writes those tables: put, peek, take (atomically, once), burn (a refusal: only a
challenge of the refused caller's facility), purge (the scheduler).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.errors import InvalidRequest
from gateway.store.fast import FastStatement
from gateway.store.schema import jpki_challenge, webauthn_challenge

NONCE_BYTES = 16


def canonical_binding(
    *,
    credential_id: str,
    hash_algorithm_oid: str | None,
    hashes: Sequence[bytes],
    num_signatures: int,
) -> bytes:
    """The canonical JSON a challenge commits to (documented in docs/api-fido2-signing.md)."""
    return json.dumps(
        {
            "credentialID": credential_id,
            "hashAlgorithmOID": hash_algorithm_oid,
            "hashes": sorted(base64.b64encode(h).decode("ascii") for h in hashes),
            "numSignatures": num_signatures,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


@dataclass(frozen=True, kw_only=True)
class Approval:
    """What a signer is asked to approve: ``num_signatures`` signatures with a credential,
    over exactly ``hashes`` (SCAL 2) or, without hashes, a signing session (SCAL 1)."""

    credential_id: str
    hashes: Sequence[bytes]
    hash_algorithm_oid: str | None
    num_signatures: int

    def binding(self) -> bytes:
        return canonical_binding(
            credential_id=self.credential_id,
            hash_algorithm_oid=self.hash_algorithm_oid,
            hashes=self.hashes,
            num_signatures=self.num_signatures,
        )


def enrollment_binding(enrollment_id: int) -> bytes:
    """What a register challenge commits to: the enrolment code it was issued for."""
    return json.dumps({"enrollment": enrollment_id}, sort_keys=True).encode()


def bound_challenge(nonce: bytes, binding: bytes) -> bytes:
    """``nonce || SHA-256(binding)``: 48 bytes with a 16-byte nonce."""
    return nonce + hashlib.sha256(binding).digest()


def new_bound_challenge(binding: bytes) -> bytes:
    return bound_challenge(secrets.token_bytes(NONCE_BYTES), binding)


def approves(challenge: bytes, binding: bytes) -> bool:
    """Whether ``challenge`` commits to ``binding`` (constant time)."""
    expected = hashlib.sha256(binding).digest()
    return len(challenge) == NONCE_BYTES + len(expected) and hmac.compare_digest(
        challenge[NONCE_BYTES:], expected
    )


def challenge_id(challenge: bytes) -> str:
    """Primary key of the challenge state, found again from the challenge in the response."""
    return hashlib.sha256(challenge).hexdigest()


def check_issued_for(state: Any, *, facility_id: int, credential_id: str) -> None:
    """An authenticate challenge is answered for the facility and credential it was issued to."""
    if state.facility_id != facility_id:
        raise InvalidRequest("the challenge was issued to another facility")
    if state.credential_id != credential_id:
        raise InvalidRequest("the challenge was issued for another credentialID")


class ChallengeStore:
    """The stored state of one presence method's challenges (one table)."""

    def __init__(
        self,
        table: Table,
        *,
        unknown: str,
        required: Sequence[str] = (),
        keeps_challenge: bool = False,
    ) -> None:
        self.table = table
        self.unknown = unknown  # the answer for an id that was never issued (or of another kind)
        self.required = tuple(required)  # columns a usable row has filled
        # The card signs the challenge bytes themselves, verified against the stored copy;
        # WebAuthn's client data carries the challenge, python-fido2's state keeps it.
        self.keeps_challenge = keeps_challenge
        # Built once with bind parameters: compiled once, not per ceremony.
        c = table.c
        # The ones of a ceremony run on the plain sqlite3 connection (``store/fast.py``).
        self._inserts: dict[tuple[str, ...], FastStatement] = {}
        self._find = FastStatement(select(table).where(c.id == bindparam("b_cid")))
        use = (
            update(table)
            .where(c.id == bindparam("b_cid"), c.used_at.is_(None))
            .values(used_at=bindparam("b_now"))
        )
        self._use = FastStatement(use)
        self._take = FastStatement(use.returning(*c))
        self._burn_for = FastStatement(use.where(c.facility_id == bindparam("b_facility")))

    def _insert(self, keys: tuple[str, ...]) -> FastStatement:
        """The INSERT for exactly these columns (compiled once per set of columns)."""
        stmt = self._inserts.get(keys)
        if stmt is None:
            stmt = self._inserts[keys] = FastStatement(insert(self.table), column_keys=keys)
        return stmt

    async def put(self, conn: AsyncConnection, challenge: bytes, **kw: Any) -> str:
        """Store a new challenge (in the caller's transaction); returns its id."""
        return await conn.run_sync(lambda c: self.put_sync(c, challenge, **kw))

    def put_sync(
        self,
        conn: Connection,
        challenge: bytes,
        *,
        kind: str,
        signer_id: str,
        facility_id: int | None,
        binding: bytes,
        now: datetime,
        ttl: timedelta,
        **columns: Any,
    ) -> str:
        """:meth:`put` on a synchronous connection (grouped writes)."""
        cid = challenge_id(challenge)
        if self.keeps_challenge:
            columns["challenge"] = challenge
        row = {
            "id": cid,
            "kind": kind,
            "signer_id": signer_id,
            "facility_id": facility_id,
            "binding": binding.decode(),
            "created_at": now,
            "expires_at": now + ttl,
            **columns,
        }
        self._insert(tuple(row)).run(conn, row)
        return cid

    async def find(self, conn: AsyncConnection, cid: str) -> Any:
        """The row, used or not (None when there is none)."""
        return await conn.run_sync(self.find_sync, cid)

    def find_sync(self, conn: Connection, cid: str) -> Any:
        return self._find.one_or_none(conn, {"b_cid": cid})

    async def peek(self, conn: AsyncConnection, cid: str, *, kind: str, now: datetime) -> Any:
        """The row of an unused, unexpired challenge of ``kind``, or refuse saying why."""
        return await conn.run_sync(lambda c: self.peek_sync(c, cid, kind=kind, now=now))

    def peek_sync(self, conn: Connection, cid: str, *, kind: str, now: datetime) -> Any:
        row = self.find_sync(conn, cid)
        self._check(row, kind=kind, now=now, used=row is not None and row.used_at is not None)
        return row

    def _check(self, row: Any, *, kind: str, now: datetime, used: bool) -> None:
        if row is None or row.kind != kind or any(getattr(row, n) is None for n in self.required):
            raise InvalidRequest(self.unknown)
        if used:
            raise InvalidRequest("challenge was already used")
        if row.expires_at <= now:
            raise InvalidRequest("challenge expired")

    async def take(self, conn: AsyncConnection, cid: str, *, kind: str, now: datetime) -> Any:
        """:meth:`peek`, then mark it used: single use, atomic (a racing take finds it used)."""
        return await conn.run_sync(lambda c: self.take_sync(c, cid, kind=kind, now=now))

    def take_sync(self, conn: Connection, cid: str, *, kind: str, now: datetime) -> Any:
        """Mark it used and check it in one statement (``UPDATE ... RETURNING``). A refusal
        after the mark leaves the rollback of the caller's transaction (or savepoint) to undo
        it; every caller then burns the challenge anyway, as the refusal path does."""
        row = self._take.one_or_none(conn, {"b_cid": cid, "b_now": now})
        if row is None:  # unknown, or used already: say which
            self.peek_sync(conn, cid, kind=kind, now=now)
            raise InvalidRequest("challenge was already used")  # pragma: no cover - peek raised
        self._check(row, kind=kind, now=now, used=False)
        return row

    async def burn(self, conn: AsyncConnection, cid: str, *, now: datetime) -> None:
        """Use up a challenge whose ceremony was refused (no second try with the same one)."""
        await conn.run_sync(lambda c: self.burn_sync(c, cid, now=now))

    def burn_sync(self, conn: Connection, cid: str, *, now: datetime) -> None:
        self._use.run(conn, {"b_cid": cid, "b_now": now})

    async def burn_for(
        self, conn: AsyncConnection, cid: str, *, facility_id: int | None, now: datetime
    ) -> None:
        """:meth:`burn` only when the challenge was issued to ``facility_id``: a refusal burns
        the caller's own challenge, never another facility's (an id sent by the wrong facility
        is refused, and the challenge stays usable by the facility it was issued to)."""
        await conn.run_sync(lambda c: self.burn_for_sync(c, cid, facility_id=facility_id, now=now))

    def burn_for_sync(
        self, conn: Connection, cid: str, *, facility_id: int | None, now: datetime
    ) -> None:
        if facility_id is not None:
            self._burn_for.run(conn, {"b_cid": cid, "b_now": now, "b_facility": facility_id})

    async def purge(self, conn: AsyncConnection, *, before: datetime) -> int:
        """Delete the challenges that expired before ``before``; returns how many."""
        res = await conn.execute(delete(self.table).where(self.table.c.expires_at < before))
        return int(res.rowcount)


WEBAUTHN_CHALLENGES = ChallengeStore(
    webauthn_challenge, unknown="unknown challenge: call begin first", required=("fido2_state",)
)
JPKI_CHALLENGES = ChallengeStore(
    jpki_challenge, unknown="unknown challenge_id: call begin first", keeps_challenge=True
)
ALL = (WEBAUTHN_CHALLENGES, JPKI_CHALLENGES)


async def purge_expired(conn: AsyncConnection, *, before: datetime) -> int:
    """Every presence method's challenges that expired before ``before`` (the scheduler)."""
    return sum([await store.purge(conn, before=before) for store in ALL])
