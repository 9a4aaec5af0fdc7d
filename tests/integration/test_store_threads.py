"""The SQLite file's transaction threads (``Database.run_write`` / ``run_read``): the write
thread takes the write lock when its transaction begins (``BEGIN IMMEDIATE``, before any
statement of its own), the read thread takes none, and each runs its function inside a
transaction."""

from __future__ import annotations

import sqlite3
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


async def test_write_thread_holds_the_write_lock_from_its_begin(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.migrate()

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
    finally:
        await db.close()


async def test_write_thread_rolls_back_what_raised(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.migrate()

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
    finally:
        await db.close()


async def test_write_thread_commits_and_rolls_back_what_ran_on_the_driver(tmp_path: Path) -> None:
    """A write function whose statements all run on the driver connection (store/fast.py),
    none through SQLAlchemy: committed when it returns, rolled back when it raises, the lock
    free afterwards either way."""
    path = tmp_path / "t.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.migrate()
        await db.run_write(lambda conn: conn.exec_driver_sql("CREATE TABLE probe (x INTEGER)"))

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
    finally:
        await db.close()


async def test_a_write_lock_held_elsewhere_past_the_busy_timeout_is_503(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    db = Database(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=100)
    try:
        await db.migrate()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(TemporarilyUnavailable):
                await db.run_write(lambda conn: None)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await db.run_write(lambda conn: 7) == 7  # the same thread, working again
    finally:
        await db.close()
