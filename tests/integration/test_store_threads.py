"""The SQLite file's transaction threads (``Database.run_write`` / ``run_read``): the write
thread takes the write lock when its transaction begins (``BEGIN IMMEDIATE``, before any
statement of its own), the read thread takes none, and each runs its function inside a
transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Connection

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
