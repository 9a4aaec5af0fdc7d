"""Grouped write units: small write transactions of concurrent requests committed together.

The presence ceremonies (``authenticate/begin`` stores a challenge; ``credentials/authorize``
takes it, checks the assertion, moves the sign count, issues the SAD and audits) are each a few
statements. Run one transaction at a time, each statement a hop to the database thread, the
write lock was held mostly waiting for hops and commits. Here every request hands a *unit* (a
synchronous function of a SQLAlchemy ``Connection``) to :meth:`GroupedWrites.run`; units that
queue while a group is in the database run as the next group, in ONE write transaction through
``Database.run_write`` (one lock, one ``BEGIN IMMEDIATE``, one COMMIT).

Each unit runs inside its own SAVEPOINT, so units stay independent as if each had its own
transaction:

- a unit that raises is rolled back to its savepoint (nothing it wrote remains) and its caller
  gets the exception; the other units of the group are not affected;
- a refused unit (a ``GatewayError``) may record its refusal with ``on_refusal``,
  which runs after the rollback, in the same group transaction (e.g. burn the challenge and
  append the refusal's audit event);
- a caller gets its result, or its refusal, only once the group has COMMITTED: what it returns
  (a SAD, a challenge) and its audit events are durable before the response;
- if the group transaction itself fails (commit, a broken connection, an ``on_refusal`` that
  raises), nothing of it is committed and every caller of the group gets the error.

Units run in arrival order under SQLite's one write lock (``BEGIN IMMEDIATE`` and the
process's write lock), so a unit sees the rows of the units before it in its group as a
following transaction would (a challenge taken by one unit is found used by the next).

On PostgreSQL every unit is its own transaction, run concurrently as before (same savepoint,
same ``on_refusal``, same code): there, writers lock rows, and every write transaction takes
the ``audit_head`` row last (its audit append). A group would hold ``audit_head`` from its first
unit's append while later units lock other rows (an authenticator's sign count), the reverse
order of e.g. an authenticator's removal (its row, then ``audit_head``) or of another
instance's group: deadlocks that one transaction per unit cannot form. The statements of a
unit run in one ``run_sync`` call either way.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection

from gateway.errors import GatewayError

_T = TypeVar("_T")

#: A group takes at most this many waiting units.
GROUP_MAX_UNITS = 64

Unit = Callable[[Connection], _T]
OnRefusal = Callable[[Connection, GatewayError], None]


@dataclass(eq=False)
class _Pending:
    fn: Callable[[Connection], Any]
    on_refusal: OnRefusal | None
    future: asyncio.Future[Any]


class GroupedWrites:
    """Runs write units in groups (see the module docstring); ``grouped=False`` (PostgreSQL)
    runs each unit as its own transaction."""

    def __init__(
        self,
        run_write: Callable[[Callable[[Connection], Any]], Awaitable[Any]],
        *,
        grouped: bool = True,
    ) -> None:
        self._run_write = run_write
        self._grouped = grouped
        self._queue: deque[_Pending] = deque()
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, fn: Unit[_T], *, on_refusal: OnRefusal | None = None) -> _T:
        """``fn(conn)`` in its own savepoint of the next group transaction; its result once
        the group committed. ``fn`` runs on the database connection's thread: it must only use the
        connection it is given and be quick (no waiting on anything else)."""
        loop = asyncio.get_running_loop()
        pending = _Pending(fn=fn, on_refusal=on_refusal, future=loop.create_future())
        if not self._grouped:
            ((ok, value),) = await self._run_write(functools.partial(_run_group, batch=[pending]))
            if ok:
                alone: _T = value
                return alone
            raise value
        self._queue.append(pending)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        result: _T = await pending.future
        return result

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(GROUP_MAX_UNITS, len(self._queue)))]
            try:
                outcomes = await self._run_write(functools.partial(_run_group, batch=batch))
            except Exception as e:  # noqa: BLE001 - handed to every unit of the group
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, (ok, value) in zip(batch, outcomes, strict=True):
                if p.future.done():  # the caller went away; its unit is committed anyway
                    continue
                if ok:
                    p.future.set_result(value)
                else:
                    p.future.set_exception(value)


def _run_group(conn: Connection, *, batch: Sequence[_Pending]) -> list[tuple[bool, Any]]:
    """One transaction: each unit in a savepoint, refusals recorded after their rollback, then
    the work the units deferred to the end of the group (``defer_to_group``)."""
    outcomes: list[tuple[bool, Any]] = []
    group: dict[GroupBuffer, list[Any]] = {}
    savepoint = _Savepoints(conn)
    info = conn.info  # a property that goes through the pool's connection record: once
    try:
        for p in batch:
            unit: dict[GroupBuffer, list[Any]] = {}
            info[_UNIT_BUFFER] = unit
            savepoint.begin()
            try:
                value = p.fn(conn)
            except Exception as e:  # noqa: BLE001 - this unit's outcome, delivered to its caller
                savepoint.rollback()
                unit.clear()  # what the unit deferred goes with its rollback
                if p.on_refusal is not None and isinstance(e, GatewayError):
                    p.on_refusal(conn, e)  # raising here fails the whole group (nothing commits)
                outcomes.append((False, e))
            else:
                savepoint.release()
                outcomes.append((True, value))
            for owner, items in unit.items():
                group.setdefault(owner, []).extend(items)
        del info[_UNIT_BUFFER]
        for owner, items in group.items():
            owner.flush_group(conn, items)
    finally:
        info.pop(_UNIT_BUFFER, None)  # the connection outlives the transaction
    return outcomes


class _Savepoints:
    """One unit's savepoint at a time. On a SQLite file as plain statements on the driver
    connection: SQLAlchemy names each savepoint anew (``sa_savepoint_<n>``), so it compiled the
    SAVEPOINT and RELEASE statements on every unit (seen in profiles: ~15 % of the write
    thread's time in a ceremony). The name is reused: one unit's savepoint is released before
    the next begins. Elsewhere (PostgreSQL, where a group is one unit; in-memory SQLite through
    aiosqlite) through ``Connection.begin_nested``."""

    def __init__(self, conn: Connection) -> None:
        # pysqlite only: the driver connection is then a plain sqlite3 connection (aiosqlite's,
        # for an in-memory store, is asynchronous: SQLAlchemy's savepoints there).
        self._raw = conn.connection.driver_connection if conn.dialect.driver == "pysqlite" else None
        self._conn = conn
        self._nested: Any = None

    def begin(self) -> None:
        if self._raw is not None:
            self._raw.execute("SAVEPOINT hpki_unit")
        else:
            self._nested = self._conn.begin_nested()

    def release(self) -> None:
        if self._raw is not None:
            self._raw.execute("RELEASE SAVEPOINT hpki_unit")
        else:
            self._nested.commit()

    def rollback(self) -> None:
        if self._raw is not None:
            self._raw.execute("ROLLBACK TO SAVEPOINT hpki_unit")
            self._raw.execute("RELEASE SAVEPOINT hpki_unit")
        else:
            self._nested.rollback()


_UNIT_BUFFER = "hpki_group_unit_buffer"


class GroupBuffer(Protocol):
    """Something that collects items from the units of a group and writes them once at its
    end (the audit log: one append, the head moved once, for the whole group)."""

    def flush_group(self, conn: Connection, items: list[Any]) -> None: ...


def defer_to_group(conn: Connection, owner: GroupBuffer, items: Sequence[Any]) -> bool:
    """Inside a grouped write unit: queue ``items`` for ``owner.flush_group`` at the end of the
    group, in the same transaction (dropped if the unit is rolled back). False outside a unit:
    the caller writes them itself, now."""
    unit: dict[GroupBuffer, list[Any]] | None = conn.info.get(_UNIT_BUFFER)
    if unit is None:
        return False
    unit.setdefault(owner, []).extend(items)
    return True
