"""Audit chain on a real store (SQLite and PostgreSQL): appends in the action's transaction,
tampering found."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from gateway.audit import ROLLED_BACK, AuditLog, event_hash
from gateway.store.db import Database
from tests.support.gateway import run_cli


async def _db(url: str) -> Database:
    db = Database(url)
    await db.migrate()
    return db


async def _fill(db: Database, audit: AuditLog, n: int) -> None:
    for i in range(n):
        async with db.write() as conn:
            await audit.append(conn, action="test.event", actor="test", detail={"i": i})


async def _verify(db: Database, audit: AuditLog) -> Any:
    async with db.read() as conn:
        return await audit.verify(conn)


def _sql(path: Path, stmt: str, *params: object) -> None:
    con = sqlite3.connect(path)
    con.execute(stmt, params)
    con.commit()
    con.close()


def _tamper(url: str, stmt: str, **params: object) -> Any:
    """Change the store behind the gateway's back (named parameters), on either engine; the
    rows a SELECT returns."""

    async def go() -> Any:
        db = Database(url)
        try:
            async with db.engine.begin() as conn:
                res = await conn.execute(text(stmt), params)
                return res.all() if res.returns_rows else None
        finally:
            await db.close()

    return asyncio.run(go())


@pytest.fixture
def store(store_url: str) -> str:
    """A store of each engine (SQLite, PostgreSQL) holding a chain of ten events."""

    async def go() -> None:
        db = await _db(store_url)
        await _fill(db, AuditLog(), 10)
        await db.close()

    asyncio.run(go())
    return store_url


def _report(url: str, key: bytes | None = None) -> Any:
    async def go() -> Any:
        db = Database(url)
        try:
            return await _verify(db, AuditLog(key=key))
        finally:
            await db.close()

    return asyncio.run(go())


def test_intact_chain(store: str) -> None:
    r = _report(store)
    assert r.ok and r.events == 10


def test_modified_row(store: str) -> None:
    _tamper(store, "UPDATE audit_event SET detail = :d WHERE seq = 4", d='{"i":999}')
    r = _report(store)
    assert not r.ok
    assert (r.problem, r.seq, r.events) == ("modified", 4, 3)


def test_gap(store: str) -> None:
    _tamper(store, "DELETE FROM audit_event WHERE seq = 6")
    r = _report(store)
    assert (r.ok, r.problem, r.seq) == (False, "gap", 7)
    assert "expected event 6" in r.message


def test_broken_link_even_with_a_recomputed_hash(store: str) -> None:
    # An attacker rewrites event 5 consistently with itself but cannot fix event 6's link.
    row = _tamper(
        store,
        "SELECT seq, ts, actor, facility_code, signer_id, action, prev_hash FROM audit_event "
        "WHERE seq = 5",
    )[0]
    detail = '{"i":"forged"}'
    h = event_hash(
        key=None,
        seq=row[0],
        ts=row[1],
        actor=row[2],
        facility_code=row[3],
        signer_id=row[4],
        action=row[5],
        detail=detail,
        prev_hash=row[6],
    )
    _tamper(store, "UPDATE audit_event SET detail = :d, hash = :h WHERE seq = 5", d=detail, h=h)
    r = _report(store)
    assert (r.ok, r.problem, r.seq) == (False, "broken_link", 6)


def test_truncated_tail(store: str) -> None:
    _tamper(store, "DELETE FROM audit_event WHERE seq = 10")
    r = _report(store)
    assert (r.ok, r.problem) == (False, "truncated")
    assert r.events == 9


def test_hmac_key_defeats_a_rewritten_chain(store_url: str) -> None:
    key = b"k" * 32

    async def go() -> None:
        db = await _db(store_url)
        await _fill(db, AuditLog(key=key), 3)
        await db.close()

    asyncio.run(go())
    assert _report(store_url, key).ok
    # Without the key, the chain does not verify (an attacker cannot recompute it).
    assert _report(store_url, None).problem == "modified"
    assert _report(store_url, b"x" * 32).problem == "modified"


def test_concurrent_appends_from_two_processes_keep_one_chain(store_url: str) -> None:
    async def create() -> None:
        await (await _db(store_url)).close()

    asyncio.run(create())
    script = textwrap.dedent(
        f"""
        import asyncio
        from gateway.audit import AuditLog
        from gateway.store.db import Database

        async def main():
            db = Database({store_url!r})
            audit = AuditLog()
            for i in range(150):
                async with db.write() as conn:
                    await audit.append(conn, action="race", actor="p", detail={{"i": i}})
            await db.close()

        asyncio.run(main())
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    r = _report(store_url)
    assert r.ok, r.message
    assert r.events == 300


def test_cli_audit_verify_detects_tampering(tmp_path: Path) -> None:
    d = tmp_path / "sb"
    run_cli("sandbox", "init", str(d), "--port", "18444")
    cfg = str(d / "gateway.toml")
    ok = json.loads(run_cli("audit", "verify", "-c", cfg, "--json").stdout)
    assert ok["ok"] is True
    # The head to keep off the database host (docs/deployment.md): the newest event's hash.
    db_path = d / "data" / "gateway.db"
    with sqlite3.connect(db_path) as con:
        head = con.execute("SELECT seq, hash FROM audit_head").fetchone()
    assert (ok["events"], ok["head_hash"]) == (head[0], head[1])
    assert ok["events"] > 0
    _sql(db_path, "UPDATE audit_event SET actor = 'someone-else' WHERE seq = 2")
    bad = run_cli("audit", "verify", "-c", cfg, check=False)
    assert bad.returncode == 1
    assert "AUDIT CHAIN BROKEN (modified)" in bad.stdout
    assert "event 2" in bad.stdout


def test_an_action_and_its_audit_event_commit_together(tmp_path: Path) -> None:
    """A failed registration leaves neither the facility nor an audit event behind."""
    d = tmp_path / "sb"
    run_cli("sandbox", "init", str(d), "--port", "18445")
    cfg = str(d / "gateway.toml")
    db = d / "data" / "gateway.db"
    count = sqlite3.connect(db).execute("SELECT count(*) FROM audit_event").fetchone()[0]
    dup = run_cli(
        "facility",
        "add",
        "1310000011",
        "--name",
        "dup",
        "--kind",
        "hospital",
        "-c",
        cfg,
        check=False,
    )
    assert dup.returncode == 1
    assert "already registered" in dup.stderr
    assert sqlite3.connect(db).execute("SELECT count(*) FROM audit_event").fetchone()[0] == count
    run_cli("facility", "add", "0510000015", "--name", "new", "--kind", "clinic", "-c", cfg)
    after = (
        sqlite3.connect(db)
        .execute("SELECT action, facility_code FROM audit_event ORDER BY seq DESC LIMIT 1")
        .fetchone()
    )
    assert after == ("facility.add", "0510000015")
    assert run_cli("audit", "verify", "-c", cfg).returncode == 0


def test_verify_on_a_live_chain_sees_one_snapshot(store_url: str) -> None:
    """`audit verify` run while the gateway appends (the daily cron of docs/deployment.md)
    reports the chain as of one moment. On PostgreSQL (READ COMMITTED) the walk of the events
    and the read of the head were two snapshots: an event committed in between made an intact
    chain read 'truncated' (head ahead of the events walked)."""

    async def go() -> list[Any]:
        db = await _db(store_url)
        audit = AuditLog(key=b"k" * 32)
        await _fill(db, audit, 400)
        stop = asyncio.Event()

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                async with db.write() as conn:
                    await audit.append(conn, action="live", actor="test", detail={"i": i})
                i += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(writer())
        reader = Database(store_url)
        try:
            reports = [await _verify(reader, audit) for _ in range(8)]
        finally:
            stop.set()
            await task
            await reader.close()
            await db.close()
        return reports

    reports = asyncio.run(go())
    assert [(r.ok, r.problem) for r in reports] == [(True, None)] * 8, reports
    counts = [r.events for r in reports]
    assert counts == sorted(counts) and counts[-1] > 400


def _head_of(url: str, seq: int) -> str:
    return str(_tamper(url, "SELECT hash FROM audit_event WHERE seq = :s", s=seq)[0][0])


def _roll_back(url: str, keep: int) -> None:
    """An insider without the HMAC key deletes every event after ``keep`` and sets the head to
    the last one kept: only rows already in the database are used."""
    h = _head_of(url, keep)
    _tamper(url, "DELETE FROM audit_event WHERE seq > :k", k=keep)
    _tamper(url, "UPDATE audit_head SET seq = :k, hash = :h WHERE id = 1", k=keep, h=h)


def _report_since(url: str, key: bytes | None, since: tuple[int, str]) -> Any:
    async def go() -> Any:
        db = Database(url)
        try:
            async with db.read() as conn:
                return await AuditLog(key=key).verify(conn, since=since)
        finally:
            await db.close()

    return asyncio.run(go())


def test_a_tail_deleted_with_the_head_set_back_is_found_against_an_earlier_head(
    store_url: str,
) -> None:
    key = b"k" * 32

    async def fill(n: int) -> None:
        db = await _db(store_url)
        await _fill(db, AuditLog(key=key), n)
        await db.close()

    asyncio.run(fill(10))
    exported = _report(store_url, key)  # the daily report kept off the database host
    assert (exported.ok, exported.events) == (True, 10)
    asyncio.run(fill(2))
    _roll_back(store_url, 7)
    # The HMAC key does not help here: the truncated chain and its head are consistent.
    assert _report(store_url, key).ok
    r = _report_since(store_url, key, (exported.events, exported.head_hash))
    assert (r.ok, r.problem, r.seq, r.events) == (False, "rolled_back", 10, 7)
    # Appending on after the rollback does not hide it: event 10 is another event now.
    asyncio.run(fill(5))
    assert _report(store_url, key).ok
    r = _report_since(store_url, key, (exported.events, exported.head_hash))
    assert (r.ok, r.problem, r.seq) == (False, "diverged", 10)
    # The chain as it stands, against its own head: intact.
    assert _report_since(store_url, key, (12, _head_of(store_url, 12))).ok


def test_a_keyless_chain_rewritten_whole_is_found_against_an_earlier_head(store: str) -> None:
    exported = _report(store)
    rows = _tamper(
        store,
        "SELECT seq, ts, actor, facility_code, signer_id, action, detail FROM audit_event "
        "ORDER BY seq",
    )
    prev = "0" * 64
    for seq, ts, actor, fc, sid, action, detail in rows:
        if seq == 4:
            detail = '{"i":"forged"}'
        h = event_hash(
            key=None, seq=seq, ts=ts, actor=actor, facility_code=fc, signer_id=sid,
            action=action, detail=detail, prev_hash=prev,
        )  # fmt: skip
        _tamper(
            store,
            "UPDATE audit_event SET detail = :d, prev_hash = :p, hash = :h WHERE seq = :s",
            d=detail, p=prev, h=h, s=seq,
        )  # fmt: skip
        prev = h
    _tamper(store, "UPDATE audit_head SET hash = :h WHERE id = 1", h=prev)
    assert _report(store).ok  # the documented open risk without a key
    r = _report_since(store, None, (exported.events, exported.head_hash))
    assert (r.ok, r.problem, r.seq) == (False, "diverged", 10)


def test_cli_audit_verify_since_an_earlier_report(tmp_path: Path) -> None:
    d = tmp_path / "sb"
    run_cli("sandbox", "init", str(d), "--port", "18445")
    cfg = str(d / "gateway.toml")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(run_cli("audit", "verify", "-c", cfg, "--json").stdout)
    n = json.loads(earlier.read_text())["events"]
    assert n > 2
    ok = run_cli("audit", "verify", "-c", cfg, "--since", str(earlier), "--json")
    assert json.loads(ok.stdout)["ok"] is True
    db_path = d / "data" / "gateway.db"
    with sqlite3.connect(db_path) as con:
        (h,) = con.execute("SELECT hash FROM audit_event WHERE seq = ?", (n - 1,)).fetchone()
        con.execute("DELETE FROM audit_event WHERE seq = ?", (n,))
        con.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (n - 1, h))
    assert run_cli("audit", "verify", "-c", cfg, check=False).returncode == 0
    bad = run_cli("audit", "verify", "-c", cfg, "--since", str(earlier), check=False)
    assert bad.returncode == 1
    assert "AUDIT CHAIN BROKEN (rolled_back)" in bad.stdout
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"ok": False, "events": 3, "head_hash": None}))
    refused = run_cli("audit", "verify", "-c", cfg, "--since", str(broken), check=False)
    assert refused.returncode != 0
    assert "intact chain" in refused.stdout + refused.stderr


def _actions(url: str) -> list[tuple[int, str, str]]:
    rows = _tamper(url, "SELECT seq, action, detail FROM audit_event ORDER BY seq")
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def test_the_running_gateway_records_a_head_set_back(store_url: str) -> None:
    """An insider deletes the newest events and sets the head to the last one kept (no key
    needed). The process that appended them finds it at its next append, under the head lock,
    and appends ``audit.head_rolled_back`` first, in the chain it cannot have forged; a
    transaction of its own that rolled back is not taken for one; another worker that appended
    past the point after the rollback does not hide it."""
    key = b"k" * 32

    async def go() -> None:
        db = await _db(store_url)
        audit, other = AuditLog(key=key), AuditLog(key=key)  # two worker processes
        try:
            await _fill(db, audit, 5)
            # A transaction of its own rolled back after its append: no alarm follows.
            with pytest.raises(RuntimeError):
                async with db.write() as conn:
                    await audit.append(conn, action="rolled.back", actor="test")
                    raise RuntimeError
            await _fill(db, audit, 1)  # event 6
            await _fill(db, audit, 1)  # event 7 (event 6 is now seen committed)
            acts = await asyncio.to_thread(_actions, store_url)
            assert [a for _, a, _ in acts] == ["test.event"] * 7
            await asyncio.to_thread(_roll_back, store_url, 3)
            await _fill(db, other, 4)  # events 4-7 again, by a worker that saw none of them
            await _fill(db, audit, 1)
        finally:
            await db.close()

    asyncio.run(go())
    acts = _actions(store_url)
    assert [a for _, a, _ in acts] == ["test.event"] * 7 + [ROLLED_BACK, "test.event"]
    detail = json.loads(acts[7][2])
    assert (detail["seen_seq"], detail["head_seq"]) == (6, 7)
    assert _report(store_url, key).ok  # the chain goes on, with the record of the rollback
