"""Hot statements on the plain sqlite3 connection (``store/fast.py``), on SQLite and PostgreSQL.

On a SQLite file the write thread's statements of a ceremony run on the driver connection with
SQLAlchemy's compiled SQL and type processors; everywhere else they are ordinary
``Connection.execute`` calls. Both must store and return the same values (aware UTC datetimes,
bytes, NULLs, row counts, new primary keys), inside the caller's transaction.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Integer, bindparam, column, insert, select, update, values
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from gateway.auth.challenges import WEBAUTHN_CHALLENGES, canonical_binding, new_bound_challenge
from gateway.errors import InvalidRequest
from gateway.store.db import Database
from gateway.store.fast import FastStatement
from gateway.store.schema import credential, facility, sad, sad_hash, signer, webauthn_challenge

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
BINDING = canonical_binding(
    credential_id="cred-f", hash_algorithm_oid=None, hashes=[b"\x02" * 32], num_signatures=1
)
_FACILITY = FastStatement(insert(facility), column_keys=(
    "institution_code", "name", "kind", "provisional", "status", "policy", "created_at",
))  # fmt: skip
_SAD = FastStatement(insert(sad), column_keys=(
    "token_hash", "facility_id", "signer_id", "credential_id", "presence", "scal",
    "num_signatures", "remaining", "created_at", "expires_at",
))  # fmt: skip
_HASHES = FastStatement(insert(sad_hash), column_keys=("sad_id", "hash", "authorized", "remaining"))
_SPEND = FastStatement(
    update(sad_hash)
    .where(sad_hash.c.sad_id == bindparam("b_sad"), sad_hash.c.remaining >= bindparam("b_k"))
    .values(remaining=sad_hash.c.remaining - bindparam("b_k"))
)
_HASHES_OF = FastStatement(
    select(sad_hash.c.hash, sad_hash.c.remaining.label("left"))
    .where(sad_hash.c.sad_id == bindparam("b_sad"))
    .order_by(sad_hash.c.hash)
)
# A VALUES list: SQLAlchemy never caches it, so FastStatement compiles it once on every driver.
_BY_VALUES = values(column("id", Integer), column("n", Integer), name="v").data(
    [(bindparam("i0", type_=Integer), bindparam("n0", type_=Integer))]
)
_EXTEND = FastStatement(
    update(sad)
    .where(sad.c.id == _BY_VALUES.c.id)
    .values(remaining=sad.c.remaining + _BY_VALUES.c.n)
    .returning(sad.c.id, sad.c.remaining, sad.c.expires_at)
)
_EXPANDING = FastStatement(
    select(facility.c.id).where(facility.c.id.in_(bindparam("ids", expanding=True)))
)
_TWO_LISTS = FastStatement(
    select(sad_hash.c.hash)
    .where(
        sad_hash.c.sad_id.in_(bindparam("ids", expanding=True)),
        sad_hash.c.hash.in_(bindparam("hashes", expanding=True)),
    )
    .order_by(sad_hash.c.hash)
)


async def _open(url: str) -> Database:
    db = Database(url)
    await db.migrate()
    async with db.write() as conn:
        await conn.execute(
            insert(signer).values(id="sgn-f", name="Fast Taro", role="Medical Doctor",
                                  created_at=T0)
        )  # fmt: skip
        await conn.execute(
            insert(credential).values(id="cred-f", signer_id="sgn-f", key_id="k" * 64,
                                      key_bits=2048, status="active", created_at=T0,
                                      updated_at=T0)
        )  # fmt: skip
    return db


def _exercise(conn: Connection) -> dict[str, Any]:
    """Every kind of call, in one write transaction; what came back."""
    out: dict[str, Any] = {}
    fac = _FACILITY.insert(conn, {
        "institution_code": "0110000077", "name": "TEST 高速医院", "kind": "hospital",
        "provisional": False, "status": "active", "policy": "{}", "created_at": T0,
    })  # fmt: skip
    out["facility"] = fac
    sad_id = _SAD.insert(conn, {
        "token_hash": "f" * 64, "facility_id": fac, "signer_id": "sgn-f",
        "credential_id": "cred-f", "presence": "fido2", "scal": "2", "num_signatures": 3,
        "remaining": 3, "created_at": T0, "expires_at": T0 + timedelta(minutes=5),
    })  # fmt: skip
    out["hashes_inserted"] = _HASHES.run_many(conn, [
        {"sad_id": sad_id, "hash": bytes([i]) * 32, "authorized": 1, "remaining": 1}
        for i in (1, 2, 3)
    ])  # fmt: skip
    if conn.dialect.name == "postgresql":  # SQLite has no column list for a VALUES alias
        first = _EXTEND.all(conn, {"i0": sad_id, "n0": 2})
        plan = _EXTEND._plans.get(conn.dialect)
        second = _EXTEND.all(conn, {"i0": sad_id, "n0": -2})
        out["uncached"] = (_EXTEND.uncached, _SPEND.uncached)
        out["compiled_once"] = plan is not None and _EXTEND._plans.get(conn.dialect) is plan
        out["extended"] = [(r.id, r.remaining, r.expires_at) for r in first + second]
        out["extend_row_kind"] = isinstance(first[0], Row)
    out["spent"] = _SPEND.run(conn, {"b_sad": sad_id, "b_k": 1})
    out["spent_again"] = _SPEND.run(conn, {"b_sad": sad_id, "b_k": 1})  # none left
    rows = _HASHES_OF.all(conn, {"b_sad": sad_id})
    out["row_kind"] = isinstance(rows[0], Row)
    out["hashes"] = [(r.hash, r.left) for r in rows]
    out["in_list"] = [r.id for r in _EXPANDING.all(conn, {"ids": [fac, fac + 1000]})]
    out["in_list_one"] = [r.id for r in _EXPANDING.all(conn, {"ids": [fac]})]
    out["in_list_empty"] = _EXPANDING.all(conn, {"ids": []})  # through SQLAlchemy
    out["two_lists"] = [
        r.hash
        for r in _TWO_LISTS.all(
            conn, {"ids": [sad_id, sad_id + 7], "hashes": [b"\x03" * 32, b"\x01" * 32, b"x"]}
        )
    ]

    # The challenge store (a ceremony's statements): put, take once, find, burn.
    def put(fido2_state: str) -> str:
        return WEBAUTHN_CHALLENGES.put_sync(
            conn, new_bound_challenge(BINDING), kind="authenticate", signer_id="sgn-f",
            facility_id=fac, binding=BINDING, now=T0, ttl=timedelta(seconds=120),
            credential_id="cred-f", fido2_state=fido2_state,
        )  # fmt: skip

    cid = put('{"x": 1}')
    taken = WEBAUTHN_CHALLENGES.take_sync(conn, cid, kind="authenticate", now=T0)
    out["taken"] = (taken.id, taken.signer_id, taken.facility_id, taken.binding,
                    taken.fido2_state, taken.created_at, taken.expires_at, taken.used_at,
                    taken.enrollment_id)  # fmt: skip
    try:
        WEBAUTHN_CHALLENGES.take_sync(conn, cid, kind="authenticate", now=T0)
    except InvalidRequest as e:
        out["second_take"] = e.description
    oid = put("{}")
    WEBAUTHN_CHALLENGES.burn_sync(conn, oid, now=T0 + timedelta(seconds=1))
    burnt = WEBAUTHN_CHALLENGES.find_sync(conn, oid)
    out["burnt_at"] = burnt.used_at
    out["cid"] = cid
    return out


@pytest.mark.parametrize("write", [True, False], ids=["committed", "rolled-back"])
def test_fast_statements_store_and_return_what_sqlalchemy_does(store_url: str, write: bool) -> None:
    async def run() -> tuple[dict[str, Any], list[Any], list[Any]]:
        db = await _open(store_url)
        try:
            if write:
                out = await db.run_write(_exercise)
            else:

                def fail(conn: Connection) -> None:
                    _exercise(conn)
                    raise InvalidRequest("refused")

                with pytest.raises(InvalidRequest):
                    await db.run_write(fail)
                out = {}
            async with db.read() as conn:
                challenges = (await conn.execute(select(webauthn_challenge))).all()
                sads = (await conn.execute(select(sad))).all()
            return out, challenges, sads
        finally:
            await db.close()

    out, challenges, sads = asyncio.run(run())
    if not write:
        # Inside the caller's transaction: its rollback takes them all back.
        assert challenges == [] and sads == []
        return
    sqlite = store_url.startswith("sqlite")
    # executemany's row count: asyncpg reports none (-1), as through SQLAlchemy.
    assert out["hashes_inserted"] == (3 if sqlite else -1)
    if not sqlite:
        # The VALUES statement (the ledger's multi-row spends on PostgreSQL): compiled once,
        # run on the driver (no SQLAlchemy Row), through the same type processors (an aware
        # datetime back).
        assert out["uncached"] == (True, False)
        assert out["compiled_once"] is True
        assert out["extend_row_kind"] is False
        expires = T0 + timedelta(minutes=5)
        sid = out["extended"][0][0]
        assert out["extended"] == [(sid, 5, expires), (sid, 3, expires)]
        assert out["extended"][0][2].tzinfo is UTC
    assert out["spent"] == 3 and out["spent_again"] == 0
    assert out["hashes"] == [(bytes([i]) * 32, 0) for i in (1, 2, 3)]
    # The fast path on a SQLite file, SQLAlchemy's rows elsewhere.
    assert out["row_kind"] is (not sqlite)
    assert out["in_list"] == out["in_list_one"] == [out["facility"]]
    assert out["in_list_empty"] == []
    assert out["two_lists"] == [b"\x01" * 32, b"\x03" * 32]
    cid = out["cid"]
    assert out["taken"] == (
        cid, "sgn-f", out["facility"], BINDING.decode(), '{"x": 1}',
        T0, T0 + timedelta(seconds=120), T0, None,
    )  # fmt: skip
    assert out["taken"][5].tzinfo is UTC and out["taken"][7].tzinfo is UTC
    assert out["second_take"] == "challenge was already used"
    assert out["burnt_at"] == T0 + timedelta(seconds=1)
    # What was committed reads back the same through SQLAlchemy.
    stored = {r.id: r for r in challenges}
    assert stored[cid].used_at == T0 and stored[cid].expires_at == T0 + timedelta(seconds=120)
    (s,) = sads
    assert (s.facility_id, s.remaining, s.created_at, s.presence) == (
        out["facility"],
        3,
        T0,
        "fido2",
    )


def test_fast_statements_write_the_same_sqlite_text_as_sqlalchemy(tmp_path: Any) -> None:
    """Byte for byte: a row written through the fast path and one written through
    ``Connection.execute`` are stored alike (datetime text, blobs, NULLs)."""

    async def run() -> list[tuple[Any, ...]]:
        db = await _open(f"sqlite+aiosqlite:///{tmp_path / 'same.db'}")
        row = {
            "kind": "authenticate", "signer_id": "sgn-f", "facility_id": None,
            "binding": BINDING.decode(), "created_at": T0,
            "expires_at": T0 + timedelta(seconds=120), "credential_id": "cred-f",
            "fido2_state": "{}",
        }  # fmt: skip
        fast = FastStatement(insert(webauthn_challenge), column_keys=("id", *row))

        def write(conn: Connection) -> None:
            fast.run(conn, {"id": "a" * 64, **row})
            conn.execute(insert(webauthn_challenge), {"id": "b" * 64, **row})

        try:
            await db.run_write(write)
            async with db.read() as conn:
                res = await conn.exec_driver_sql("SELECT * FROM webauthn_challenge ORDER BY id")
                return [tuple(r) for r in res.all()]
        finally:
            await db.close()

    a, b = asyncio.run(run())
    assert a[0] == "a" * 64 and b[0] == "b" * 64
    assert a[1:] == b[1:]
    assert "2026-03-01 12:00:00.123456" in a  # naive UTC text, as SQLAlchemy writes it


def test_driver_errors_reach_callers_as_sqlalchemy_raises_them(store_url: str) -> None:
    """A constraint broken on the fast path is SQLAlchemy's IntegrityError (a locked or full
    database its OperationalError, which the store answers 503), as through SQLAlchemy."""
    row = {
        "id": "c" * 64, "kind": "authenticate", "signer_id": "sgn-f", "binding": "{}",
        "created_at": T0, "expires_at": T0,
    }  # fmt: skip
    fast = FastStatement(insert(webauthn_challenge), column_keys=tuple(row))

    async def run() -> None:
        db = await _open(store_url)
        try:
            await db.run_write(lambda conn: fast.run(conn, row))
            with pytest.raises(IntegrityError):
                await db.run_write(lambda conn: fast.run(conn, row))
        finally:
            await db.close()

    asyncio.run(run())
