"""Grouped write units (``Database.run_grouped``, store/grouped.py) on SQLite and PostgreSQL.

On SQLite concurrent units share one write transaction, each in its own savepoint; on
PostgreSQL each unit is its own transaction. Either way: a challenge taken by several units at
once is taken by exactly one; a refused unit is rolled back alone and its refusal recorded; an
error in a transaction commits nothing of it; the audit chain stays verifiable throughout.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, func, insert, select

from gateway.audit import AuditLog, AuditRecord
from gateway.auth.challenges import WEBAUTHN_CHALLENGES, canonical_binding, new_bound_challenge
from gateway.errors import GatewayError, InvalidRequest
from gateway.store.db import Database
from gateway.store.schema import audit_event, facility, signer, webauthn_challenge

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AUDIT = AuditLog()
BINDING = canonical_binding(
    credential_id="cred-g",
    hash_algorithm_oid="2.16.840.1.101.3.4.2.1",
    hashes=[b"\x01" * 32],
    num_signatures=1,
)


async def _open(url: str) -> Database:
    db = Database(url)
    await db.migrate()
    async with db.write() as conn:
        await conn.execute(
            insert(facility).values(
                id=1, institution_code="0110000009", name="TEST 医院", kind="hospital",
                provisional=False, status="active", policy="{}", created_at=T0,
            )
        )  # fmt: skip
        await conn.execute(
            insert(signer).values(
                id="sgn-g", name="Group Taro", role="Medical Doctor", created_at=T0
            )
        )
    return db


def _put_unit(challenge: bytes) -> Any:
    def unit(conn: Connection) -> str:
        cid = WEBAUTHN_CHALLENGES.put_sync(
            conn, challenge, kind="authenticate", signer_id="sgn-g", facility_id=1,
            binding=BINDING, now=T0, ttl=timedelta(seconds=120),
            credential_id="cred-g", fido2_state="{}",
        )  # fmt: skip
        AUDIT.append_many_sync(conn, [AuditRecord(action="test.put", actor="t", now=T0)])
        return cid

    return unit


def _refusal(cid: str | None) -> Any:
    """What ``PresenceMethod.refusal_unit`` does: burn the challenge, audit the refusal."""

    def record(conn: Connection, e: GatewayError) -> None:
        if cid is not None:
            WEBAUTHN_CHALLENGES.burn_sync(conn, cid, now=T0)
        AUDIT.append_many_sync(
            conn,
            [AuditRecord(action="test.refused", actor="t", detail={"reason": e.description})],
        )

    return record


async def _counts(db: Database) -> dict[str, int]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(audit_event.c.action, func.count()).group_by(audit_event.c.action)
        )
        return {str(a): int(n) for a, n in rows.all()}


async def _challenges(db: Database) -> set[str]:
    async with db.read() as conn:
        return set((await conn.execute(select(webauthn_challenge.c.id))).scalars())


async def _chain_ok(db: Database) -> bool:
    async with db.read() as conn:
        return (await AUDIT.verify(conn)).ok


def test_concurrent_takes_of_one_challenge_exactly_one_wins(store_url: str) -> None:
    async def run() -> None:
        db = await _open(store_url)
        try:
            cid = await db.run_grouped(_put_unit(new_bound_challenge(BINDING)))

            def take(conn: Connection) -> str:
                WEBAUTHN_CHALLENGES.take_sync(conn, cid, kind="authenticate", now=T0)
                AUDIT.append_many_sync(conn, [AuditRecord(action="test.take", actor="t")])
                return "taken"

            # Sixteen callers at once: they queue together and run as one group (or more).
            outcomes = await asyncio.gather(
                *(db.run_grouped(take, on_refusal=_refusal(cid)) for _ in range(16)),
                return_exceptions=True,
            )
            assert outcomes.count("taken") == 1, outcomes
            refused = [o for o in outcomes if o != "taken"]
            assert len(refused) == 15
            assert all(isinstance(o, InvalidRequest) for o in refused), refused
            assert {o.description for o in refused} == {"challenge was already used"}  # type: ignore[union-attr]
            counts = await _counts(db)
            assert counts["test.take"] == 1
            assert counts["test.refused"] == 15
            assert await _chain_ok(db)
        finally:
            await db.close()

    asyncio.run(run())


def test_a_refused_unit_is_rolled_back_alone(store_url: str) -> None:
    asyncio.run(_refused_unit_rolled_back_alone(store_url))


def test_a_refused_unit_is_rolled_back_alone_in_memory() -> None:
    """SQLite in memory runs its groups through aiosqlite, not the SQLite threads: the
    savepoints there are SQLAlchemy's, and a unit is still rolled back alone."""
    asyncio.run(_refused_unit_rolled_back_alone("sqlite+aiosqlite://"))


async def _refused_unit_rolled_back_alone(url: str) -> None:
    db = await _open(url)
    try:
        kept, refused, broken = (new_bound_challenge(BINDING) for _ in range(3))

        def refuse_after_writing(conn: Connection) -> str:
            _put_unit(refused)(conn)
            raise InvalidRequest("refused after its writes")

        def fail_after_writing(conn: Connection) -> str:
            _put_unit(broken)(conn)
            raise ValueError("not a refusal")

        outcomes = await asyncio.gather(
            db.run_grouped(_put_unit(kept)),
            db.run_grouped(refuse_after_writing, on_refusal=_refusal(None)),
            db.run_grouped(fail_after_writing, on_refusal=_refusal(None)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], str)
        assert isinstance(outcomes[1], InvalidRequest)
        assert isinstance(outcomes[2], ValueError)
        # Only the successful unit's rows remain; the refusal is recorded, the error not.
        assert await _challenges(db) == {outcomes[0]}
        assert await _counts(db) == {"test.put": 1, "test.refused": 1}
        assert await _chain_ok(db)
    finally:
        await db.close()


def test_a_failing_group_commits_nothing(store_url: str) -> None:
    async def run() -> None:
        db = await _open(store_url)
        try:

            def refused(conn: Connection) -> str:
                raise InvalidRequest("refused")

            def broken_record(conn: Connection, e: GatewayError) -> None:
                AUDIT.append_many_sync(conn, [AuditRecord(action="test.refused", actor="t")])
                raise RuntimeError("the refusal could not be recorded")

            outcomes = await asyncio.gather(
                db.run_grouped(_put_unit(new_bound_challenge(BINDING))),
                db.run_grouped(refused, on_refusal=broken_record),
                return_exceptions=True,
            )
            if db.is_sqlite:
                # One group: both callers get the group's error; the first unit's challenge
                # and audit event were not committed, so nothing may be answered as done.
                assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
                assert await _challenges(db) == set()
                assert await _counts(db) == {}
            else:
                # PostgreSQL: each unit is its own transaction; only the failing one is lost.
                assert isinstance(outcomes[0], str), outcomes
                assert isinstance(outcomes[1], RuntimeError), outcomes
                assert await _challenges(db) == {outcomes[0]}
                assert await _counts(db) == {"test.put": 1}
            assert await _chain_ok(db)
            # The writer is usable again afterwards.
            cid = await db.run_grouped(_put_unit(new_bound_challenge(BINDING)))
            assert cid in await _challenges(db)
        finally:
            await db.close()

    asyncio.run(run())


@pytest.mark.parametrize("n", [1, 100])
def test_groups_of_many_units_keep_one_chain(store_url: str, n: int) -> None:
    async def run() -> None:
        db = await _open(store_url)
        try:
            ids = await asyncio.gather(
                *(db.run_grouped(_put_unit(new_bound_challenge(BINDING))) for _ in range(n))
            )
            assert len(set(ids)) == n
            assert await _challenges(db) == set(ids)
            assert await _counts(db) == {"test.put": n}
            assert await _chain_ok(db)
        finally:
            await db.close()

    asyncio.run(run())


class _CountingAudit(AuditLog):
    """The audit log, counting its appends (one head move each)."""

    def __init__(self) -> None:
        super().__init__()
        self.appends = 0

    def append_many_sync(self, conn: Connection, records: Any) -> Any:
        self.appends += 1
        return super().append_many_sync(conn, records)


def test_units_record_their_events_once_per_group_in_unit_order(store_url: str) -> None:
    """``AuditLog.record_sync`` in a unit: its events join the group's one append at the end of
    the group, in unit order; a unit rolled back takes its events with it, and the refusal
    recorded after it takes its place."""
    audit = _CountingAudit()

    def unit(i: int, *, refuse: bool) -> Any:
        def fn(conn: Connection) -> int:
            audit.record_sync(conn, [AuditRecord(action=f"test.unit{i}", actor="t", now=T0)])
            if refuse:
                raise InvalidRequest(f"unit {i} refused after recording")
            return i

        return fn

    def refusal(i: int) -> Any:
        def record(conn: Connection, e: GatewayError) -> None:
            audit.record_sync(conn, [AuditRecord(action=f"test.refused{i}", actor="t", now=T0)])

        return record

    async def run() -> None:
        db = await _open(store_url)
        try:
            outcomes = await asyncio.gather(
                *(
                    db.run_grouped(unit(i, refuse=i % 4 == 1), on_refusal=refusal(i))
                    for i in range(16)
                ),
                return_exceptions=True,
            )
            assert [o if isinstance(o, int) else "refused" for o in outcomes] == [
                "refused" if i % 4 == 1 else i for i in range(16)
            ]
            async with db.read() as conn:
                actions = list(
                    (
                        await conn.execute(select(audit_event.c.action).order_by(audit_event.c.seq))
                    ).scalars()
                )
                assert (await audit.verify(conn)).ok
            expected = [f"test.refused{i}" if i % 4 == 1 else f"test.unit{i}" for i in range(16)]
            # PostgreSQL runs the units as concurrent transactions: any order, each once.
            assert actions == expected if db.is_sqlite else sorted(actions) == sorted(expected)
            # SQLite: the sixteen units queued together ran as one group, one append. PostgreSQL:
            # each unit is its own transaction with its own append.
            assert audit.appends == (1 if db.is_sqlite else 16)
            # Outside a unit, record_sync appends at once.
            async with db.write() as conn:
                await conn.run_sync(
                    lambda c: audit.record_sync(c, [AuditRecord(action="test.alone", actor="t")])
                )
            assert audit.appends == (2 if db.is_sqlite else 17)
            assert (await _counts(db))["test.alone"] == 1
        finally:
            await db.close()

    asyncio.run(run())
