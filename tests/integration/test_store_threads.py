"""The SQLite file's transactions (``Database.run_write`` / ``run_read``): on the event loop's
thread when SQLite answers at once, on the write / read thread when it is busy. A write takes
the write lock when its transaction begins (``BEGIN IMMEDIATE``, before any statement of its
own), a read takes none, and each runs its function inside a transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection

from gateway.errors import TemporarilyUnavailable
from gateway.store.db import Database


def _other_writer_refused(path: Path) -> bool:
    """Whether another connection, not waiting, is refused the write lock just now."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        assert "locked" in str(e)
        return True
    else:
        other.execute("ROLLBACK")
        return False
    finally:
        other.close()


@asynccontextmanager
async def _store(
    tmp_path: Path, *, probe: str | None = None, busy_timeout_ms: int = 15000
) -> AsyncIterator[tuple[Database, Path]]:
    """A migrated SQLite store in ``tmp_path`` (with a table ``probe (x <probe>)``), closed
    after the block."""
    path = tmp_path / "t.db"
    db = Database(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=busy_timeout_ms)
    try:
        await db.migrate()
        if probe is not None:
            await db.run_write(lambda conn: conn.exec_driver_sql(f"CREATE TABLE probe (x {probe})"))
        yield db, path
    finally:
        await db.close()


async def test_write_thread_holds_the_write_lock_from_its_begin(tmp_path: Path) -> None:
    async with _store(tmp_path) as (db, path):

        def write(conn: Connection) -> tuple[bool, bool]:
            raw = conn.connection.driver_connection
            assert raw is not None
            return raw.in_transaction, _other_writer_refused(path)

        assert await db.run_write(write) == (True, True)
        assert not _other_writer_refused(path)  # committed: the lock is free again

        def read(conn: Connection) -> tuple[bool, bool]:
            raw = conn.connection.driver_connection
            assert raw is not None
            return raw.in_transaction, _other_writer_refused(path)

        assert await db.run_read(read) == (True, False)


async def test_write_thread_rolls_back_what_raised(tmp_path: Path) -> None:
    async with _store(tmp_path) as (db, path):

        def create(conn: Connection) -> None:
            conn.exec_driver_sql("CREATE TABLE probe (x INTEGER)")

        await db.run_write(create)

        def fail(conn: Connection) -> None:
            conn.exec_driver_sql("INSERT INTO probe VALUES (1)")
            raise RuntimeError("after the insert")

        with pytest.raises(RuntimeError):
            await db.run_write(fail)

        def count(conn: Connection) -> int:
            return int(conn.exec_driver_sql("SELECT count(*) FROM probe").scalar_one())

        assert await db.run_read(count) == 0
        assert not _other_writer_refused(path)


async def test_write_thread_commits_and_rolls_back_what_ran_on_the_driver(tmp_path: Path) -> None:
    """A write function whose statements all run on the driver connection (store/fast.py),
    none through SQLAlchemy: committed when it returns, rolled back when it raises, the lock
    free afterwards either way."""
    async with _store(tmp_path, probe="INTEGER") as (db, path):

        def driver(conn: Connection) -> Any:
            raw = conn.connection.driver_connection
            assert raw is not None
            return raw

        def insert(conn: Connection) -> bool:
            driver(conn).execute("INSERT INTO probe VALUES (1)")
            return bool(conn.in_transaction())

        assert await db.run_write(insert) is False  # SQLAlchemy never saw a statement

        def fail(conn: Connection) -> None:
            driver(conn).execute("INSERT INTO probe VALUES (2)")
            raise RuntimeError("after the insert")

        with pytest.raises(RuntimeError):
            await db.run_write(fail)

        def rows(conn: Connection) -> list[int]:
            return [r[0] for r in driver(conn).execute("SELECT x FROM probe")]

        assert await db.run_read(rows) == [1]
        assert not _other_writer_refused(path)


async def test_a_write_lock_held_elsewhere_past_the_busy_timeout_is_503(tmp_path: Path) -> None:
    async with _store(tmp_path, busy_timeout_ms=100) as (db, path):
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(TemporarilyUnavailable):
                await db.run_write(lambda conn: None)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await db.run_write(lambda conn: 7) == 7  # the same thread, working again


async def test_transactions_run_on_the_loop_thread_when_sqlite_answers_at_once(
    tmp_path: Path,
) -> None:
    """No hop when nothing is in the way: the write and the read run on the caller's thread
    (the event loop's), each in its transaction, the write with the write lock."""
    async with _store(tmp_path) as (db, path):
        me = threading.current_thread().name

        def write(conn: Connection) -> tuple[str, bool, bool]:
            raw = conn.connection.driver_connection
            assert raw is not None
            return threading.current_thread().name, raw.in_transaction, _other_writer_refused(path)

        assert await db.run_write(write) == (me, True, True)

        def read(conn: Connection) -> tuple[str, bool]:
            raw = conn.connection.driver_connection
            assert raw is not None
            return threading.current_thread().name, raw.in_transaction

        assert await db.run_read(read) == (me, True)


async def test_a_read_on_the_loop_runs_on_the_writers_connection_without_its_lock(
    tmp_path: Path,
) -> None:
    """Reads on the loop's thread use the writer's connection, whose page cache holds what
    this process wrote (another connection's cache is dropped whenever the file changed),
    in a read transaction: no write lock, and they see every committed write."""
    async with _store(tmp_path, probe="INTEGER") as (db, path):

        def insert(conn: Connection) -> int:
            conn.exec_driver_sql("INSERT INTO probe VALUES (7)")
            return id(conn.connection.driver_connection)

        def read(conn: Connection) -> tuple[int, bool, bool, int]:
            raw = conn.connection.driver_connection
            assert raw is not None
            n = int(conn.exec_driver_sql("SELECT sum(x) FROM probe").scalar_one())
            return id(raw), raw.in_transaction, _other_writer_refused(path), n

        writer = await db.run_write(insert)
        assert await db.run_read(read) == (writer, True, False, 7)
        # and the next write on that connection is not inside the read's transaction
        assert await db.run_write(insert) == writer
        assert (await db.run_read(read))[3] == 14


async def test_a_write_lock_held_elsewhere_sends_the_write_to_the_thread_and_the_loop_runs_on(
    tmp_path: Path,
) -> None:
    """Another process holds the write lock: the write waits on the write thread (the busy
    time-out), not on the loop, which goes on serving (here: a read, which WAL lets through
    at once, on the loop); once the lock is free the write commits."""
    async with _store(tmp_path, probe="INTEGER") as (db, path):
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        released = threading.Event()

        def release_later() -> None:
            released.wait(5)
            holder.execute("ROLLBACK")
            holder.close()

        releaser = threading.Thread(target=release_later)
        releaser.start()
        try:

            def insert(conn: Connection) -> str:
                conn.exec_driver_sql("INSERT INTO probe VALUES (1)")
                return threading.current_thread().name

            write = asyncio.create_task(db.run_write(insert))
            await asyncio.sleep(0.2)
            assert not write.done()  # waiting for the lock, off the loop

            def read(conn: Connection) -> tuple[str, int]:
                n = conn.exec_driver_sql("SELECT count(*) FROM probe").scalar_one()
                return threading.current_thread().name, int(n)

            assert await db.run_read(read) == (threading.current_thread().name, 0)
            released.set()
            assert await asyncio.wait_for(write, 10) == "sqlite-write"
        finally:
            released.set()
            releaser.join()
        assert (
            await db.run_read(
                lambda conn: conn.exec_driver_sql("SELECT count(*) FROM probe").scalar_one()
            )
            == 1
        )


async def test_the_wal_is_checkpointed_off_the_loop_and_stays_small(tmp_path: Path) -> None:
    """Writes on the loop's thread do not checkpoint the WAL themselves (its fsyncs would stop
    the loop); the write thread does, every CHECKPOINT_EVERY of them. Without it the WAL would
    only grow: 1,000 commits of a 4 KB row each are over 4 MB of WAL frames."""
    async with _store(tmp_path, probe="BLOB") as (db, path):

        def autocheckpoint(conn: Connection) -> int:
            return int(conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())

        assert await db.run_write(autocheckpoint) == 0  # the loop's writer: none of its own
        wal = path.with_name(path.name + "-wal")
        largest = 0
        for i in range(1000):
            await db.run_write(
                lambda conn: conn.exec_driver_sql("INSERT INTO probe VALUES (randomblob(4000))")
            )
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # let a pending checkpoint finish, as a server would
            largest = max(largest, wal.stat().st_size)
        assert largest < 4_000_000, largest
        count = await db.run_read(
            lambda conn: conn.exec_driver_sql("SELECT count(*) FROM probe").scalar_one()
        )
        assert count == 1000
