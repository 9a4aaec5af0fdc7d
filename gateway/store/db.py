"""Engine, transactions and migrations.

Write transactions on SQLite start with ``BEGIN IMMEDIATE``: the write lock is taken up front, so
two processes cannot both read the audit head and then both fail (or worse) when upgrading to a
write lock. On PostgreSQL the row lock on ``audit_head`` serialises appends the same way.

Within one process, SQLite write transactions also queue on an ``asyncio.Lock``: SQLite admits one
writer anyway, and without the lock concurrent requests on pooled connections each wait in
SQLite's busy handler, which sleeps in steps of up to 100 ms (measured: p99 of a one-hash
signHash at 16 clients went from ~1.2 s to milliseconds).

Hot paths (the mTLS identity read, grouped SAD consumption, the presence ceremonies through
``run_grouped``: ``store/grouped.py``) use ``run_read`` / ``run_write``: the
caller passes a *synchronous* function of a SQLAlchemy ``Connection`` and the whole transaction
runs in one go. On a SQLite file it runs on plain ``sqlite3`` connections (same pragmas, same
``BEGIN IMMEDIATE``, same in-process write lock): on the event loop's own thread when SQLite
answers at once (``_InlineSqlite``: busy time-out zero), else, when another process holds the
write lock or a checkpoint is in the way, on a dedicated thread that waits up to
``busy_timeout_ms`` (``_SyncSqlite``). Either way not through aiosqlite's thread, one hop per
statement, cursor and commit (measured: ~4 hops per statement). On PostgreSQL (and in-memory
SQLite) the same function runs through ``AsyncConnection.run_sync`` in an ordinary ``read()`` /
``write()`` transaction, so the code and its SQL are the same on both backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from pathlib import Path
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

if TYPE_CHECKING:
    from alembic.config import Config

from gateway.errors import TemporarilyUnavailable
from gateway.store.fast import as_sqlalchemy_error
from gateway.store.grouped import GroupedWrites, OnRefusal

log = logging.getLogger("gateway.store")

MIGRATIONS = Path(__file__).with_name("migrations")
_WRITE = "hpki_write"
_T = TypeVar("_T")


def _down() -> TemporarilyUnavailable:
    """The store cannot be used now: 503 ``database unavailable``, Retry-After 2."""
    return TemporarilyUnavailable("database unavailable", retry_after=2)


def _sqlite_hooks(engine: Engine, busy_timeout_ms: int = 15000) -> None:
    _sqlite_pragmas(engine, busy_timeout_ms)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_pragmas(engine: Engine, busy_timeout_ms: int, *, autocheckpoint: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy (not the sqlite3 module) emit BEGIN, so we can choose IMMEDIATE.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        if not autocheckpoint:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()


class _Transactions:
    """A plain ``sqlite3`` connection and whole transactions on it, for one thread (sqlite3
    connections belong to the thread that opened them).

    The connection stays open between transactions (no pool checkout per transaction) and
    holds no transaction between them (no WAL snapshot is kept)."""

    def __init__(
        self,
        url: URL,
        *,
        echo: bool,
        write: bool,
        busy_timeout_ms: int,
        autocheckpoint: bool = True,
    ) -> None:
        engine = create_engine(url, echo=echo, poolclass=NullPool)
        # The pragmas only: txn emits BEGIN itself. A "begin" listener on this engine would
        # make SQLAlchemy dispatch its (empty) execute events around every statement of every
        # transaction (measured: a fifth of SQLAlchemy's time per statement on this thread).
        _sqlite_pragmas(engine, busy_timeout_ms, autocheckpoint=autocheckpoint)
        self._engine = engine
        self._write = write
        self._begin = "BEGIN IMMEDIATE" if write else "BEGIN"
        self._conn: Connection | None = None

    def txn(
        self,
        fn: Callable[[Connection], _T],
        *,
        busy_is_final: bool = True,
        read_only: bool = False,
    ) -> _T:
        """``fn(conn)`` between a BEGIN and a COMMIT (write) or ROLLBACK (read), sent on the
        driver connection: SQLAlchemy's transaction object and ``exec_driver_sql`` around
        every hop cost more than the statements they send (the hot statements themselves run
        on the driver connection too: ``store/fast.py``). ``fn``'s own ``conn.execute`` calls
        begin SQLAlchemy's bookkeeping of a transaction (no statement on pysqlite: BEGIN is
        ours), ended here with the driver's.

        ``busy_is_final=False``: raise :class:`_Busy` (nothing done) if SQLite is busy when a
        write transaction begins, or anywhere in a read (which changes nothing), instead of the
        error the caller would get.

        ``read_only``: a read transaction (``BEGIN``, then ROLLBACK) on this connection, even
        the writer's (see ``Database.run_read``)."""
        write = self._write and not read_only
        begin = self._begin if write else "BEGIN"
        conn = self._conn
        if conn is None:
            conn = self._conn = self._engine.connect()
        raw: Any = None
        try:
            raw = conn.connection.driver_connection
            if busy_is_final:
                _driver(raw.execute, begin)
            else:
                try:
                    raw.execute(begin)
                except sqlite3.OperationalError as e:
                    if _is_busy(e):
                        raise _Busy from e
                    raise as_sqlalchemy_error(e, (begin, ())) from e
            try:
                result = fn(conn)
            except BaseException as e:
                conn.rollback()
                _driver(raw.rollback)
                if not busy_is_final and not write and _is_busy(e):
                    raise _Busy from e
                raise
            if write:
                conn.commit()  # SQLAlchemy's bookkeeping: COMMITs when fn's execute began it
                _driver(raw.commit)  # committed if fn returns
            else:
                conn.rollback()
                _driver(raw.rollback)  # a read commits nothing
            return result
        except _Busy:
            raise
        except BaseException:
            if raw is None or raw.in_transaction or conn.in_transaction() or conn.invalidated:
                # The rollback itself failed: start over with a fresh connection.
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()
            raise

    def checkpoint(self) -> None:
        """A passive WAL checkpoint, outside any transaction: copies what it can of the WAL
        into the database file without waiting for, or blocking, readers and the writer."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._engine.connect()
        raw: Any = conn.connection.driver_connection
        _driver(raw.execute, "PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self._engine.dispose()


class _Busy(Exception):
    """SQLite was busy (another process holds the write lock, or a checkpoint is running):
    nothing was done, the transaction is for the thread that can wait (``_SyncSqlite``)."""


def _is_busy(e: BaseException) -> bool:
    orig = e.orig if isinstance(e, OperationalError) else e
    code = getattr(orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _InlineSqlite:
    """Transactions on the event loop's own thread, when SQLite answers at once.

    A hop to a database thread and back costs two thread switches and two hand-overs of the
    GIL (measured: a third of the worker's CPU per ceremony went to the kernel's task
    switching, most of it from such hops), while the transactions of the hot paths take tens
    of microseconds: a write of a few rows (WAL, ``synchronous=NORMAL``: no fsync at commit),
    or one indexed read. Run here with a busy time-out of zero, a transaction either runs at
    once or meets SQLite busy before it did anything: a write lock held by another process
    (another worker, the CLI), a checkpoint. Then :class:`_Busy` sends it to the thread
    (``_SyncSqlite``), which waits up to ``busy_timeout_ms`` as before. So the loop never waits
    for a lock, nor for an fsync: its writer leaves WAL checkpoints (and their fsyncs) to the
    write thread, every CHECKPOINT_EVERY transactions (``Database.run_write``).

    Only on the thread that first used it (the worker's loop): from any other thread the
    transaction takes the hop as before.
    """

    #: Write transactions between two WAL checkpoints on the write thread.
    CHECKPOINT_EVERY = 200

    def __init__(self, url: URL, *, echo: bool, write: bool) -> None:
        # The writer here does not checkpoint the WAL itself (SQLite's automatic checkpoint,
        # every ~1,000 pages, would run in whichever commit crosses the mark, with its fsyncs,
        # on the loop): ``Database.run_write`` has the write thread do it every
        # CHECKPOINT_EVERY transactions committed here.
        self._txns = _Transactions(
            url, echo=echo, write=write, busy_timeout_ms=0, autocheckpoint=not write
        )
        self._thread: int | None = None
        self.commits = 0

    def usable(self) -> bool:
        me = threading.get_ident()
        if self._thread is None:
            self._thread = me
        return self._thread == me

    def run(self, fn: Callable[[Connection], _T]) -> _T:
        """``fn``'s result, or :class:`_Busy`; a database error is the caller's 503."""
        try:
            result = self._txns.txn(fn, busy_is_final=False)
        except OperationalError as e:
            raise _down() from e
        self.commits += 1
        return result

    def run_read(self, fn: Callable[[Connection], _T]) -> _T:
        """``fn`` in a read transaction on this connection (the writer's too), or
        :class:`_Busy`."""
        try:
            return self._txns.txn(fn, busy_is_final=False, read_only=True)
        except OperationalError as e:
            raise _down() from e

    def close(self) -> None:
        if self._thread == threading.get_ident():
            self._txns.close()


class _SyncSqlite:
    """A synchronous SQLite connection owned by one dedicated thread, running a whole
    transaction per hop: for the transactions that must wait for SQLite (see
    ``_InlineSqlite``). Jobs reach the thread through a queue and come back with
    ``call_soon_threadsafe``: lighter than an executor round trip."""

    def __init__(self, url: URL, *, echo: bool, write: bool, busy_timeout_ms: int) -> None:
        self._args = (url, echo, write, busy_timeout_ms)
        self._write = write
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[[Connection], _T]) -> _T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        if self._thread is None:
            name = "sqlite-write" if self._write else "sqlite-read"
            self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
            self._thread.start()
        self._jobs.put((loop, future, fn))
        try:
            return await future
        except OperationalError as e:
            raise _down() from e

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    def _serve(self) -> None:
        url, echo, write, busy_timeout_ms = self._args
        txns = _Transactions(url, echo=echo, write=write, busy_timeout_ms=busy_timeout_ms)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            loop, future, fn = job
            try:
                if fn is _checkpoint_job:
                    txns.checkpoint()
                    result, error = None, None
                else:
                    result, error = txns.txn(fn), None
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(_settle, future, result, error)
        txns.close()


def _checkpoint_job(conn: Connection) -> None:
    """The job that makes the write thread checkpoint the WAL (``_Transactions.checkpoint``)."""
    raise AssertionError("a marker")  # pragma: no cover


def _driver(call: Callable[..., Any], *args: Any) -> None:
    """A call on the sqlite3 connection, its errors raised as SQLAlchemy raises them (a locked
    or full database is SQLAlchemy's OperationalError: 503 in ``run``)."""
    try:
        call(*args)
    except sqlite3.Error as e:
        raise as_sqlalchemy_error(e, (str(args[0]) if args else call.__name__, ())) from e


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[Connection], Any]]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


#: A pooled PostgreSQL connection idle longer than this is pinged before use (see
#: ``_ping_when_idle``).
PING_AFTER_IDLE_S = 1.0
_USED_AT = "hpki_used_at"


def _ping_when_idle(engine: AsyncEngine, after_s: float) -> None:
    """Ping a pooled connection before use only when it has been idle longer than ``after_s``.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout; on asyncpg a ping outside a
    transaction is three round trips (BEGIN, an empty query, ROLLBACK), measured at ~7 % of a
    worker's CPU per signature at 16 clients. A connection broken by a database restart, a
    failover or a firewall's idle time-out has been idle; one used a moment ago is ordinarily
    alive. If such a one was broken all the same, its statement fails with a disconnect,
    which SQLAlchemy answers by invalidating every connection of the pool (so one request,
    answered 503 ``database unavailable`` by the callers below, not one per connection).
    This is SQLAlchemy's documented checkout-event recipe for custom pessimistic handling.
    """
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect

    def used(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info[_USED_AT] = time.monotonic()

    def checkout(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, proxy: Any) -> None:
        if time.monotonic() - record.info.get(_USED_AT, float("-inf")) <= after_s:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as e:
            # The driver's error, as SQLAlchemy's own pre-ping passes it.
            if dialect.is_disconnect(cast(Any, e), dbapi_conn, None):
                # The pool discards it and checks out another (a new one if need be).
                raise DisconnectionError("stale pooled connection") from e
            raise

    event.listen(pool, "connect", used)
    event.listen(pool, "checkin", used)
    event.listen(pool, "checkout", checkout)


#: How long a new PostgreSQL connection may take to open.
CONNECT_TIMEOUT_S = 10.0
#: PostgreSQL errors that mean "try again": lock_not_available (``lock_timeout``),
#: deadlock_detected, serialization_failure. asyncpg's errors reach SQLAlchemy as a plain
#: ``DBAPIError`` carrying the SQLSTATE, not as ``OperationalError``.
_RETRYABLE_SQLSTATES = frozenset({"55P03", "40P01", "40001"})


def _unavailable(e: DBAPIError) -> bool:
    """A database error that means "try again later": the store is down, locked or full
    (OperationalError; on PostgreSQL a lock wait past ``lock_timeout``, a deadlock or a
    serialization failure), or a pooled connection turned out to be broken (a disconnect,
    after which SQLAlchemy has invalidated the pool)."""
    return (
        isinstance(e, OperationalError)
        or e.connection_invalidated
        or getattr(e.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES
    )


@asynccontextmanager
async def _session(engine: AsyncEngine, *, begin: bool = False) -> AsyncIterator[AsyncConnection]:
    """A pooled connection of ``engine`` for the block (in a transaction if ``begin``:
    committed when the block exits cleanly, rolled back otherwise), with the store's failures
    as 503 ``database unavailable`` (``_unavailable``).

    That includes a connection that cannot be opened at all: asyncpg raises a refused or
    timed-out TCP connect as the plain ``OSError`` it is (``ConnectionRefusedError``,
    ``TimeoutError``), which SQLAlchemy passes through unwrapped, so with PostgreSQL down every
    request would otherwise be a 500.
    """
    conn: AsyncConnection | None = None
    try:
        try:
            conn = await engine.connect()
        except OSError as e:  # only the connect: an OSError of the block is the block's own
            raise _down() from e
        if begin:
            async with conn.begin():
                yield conn
        else:
            yield conn
    except DBAPIError as e:
        if _unavailable(e):
            raise _down() from e
        raise
    finally:
        if conn is not None:
            await conn.close()


class Database:
    """The store: one async engine, read and write transactions, migrations."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        busy_timeout_ms: int = 15000,
        ping_after_idle_s: float = PING_AFTER_IDLE_S,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(
                pool_size=5,
                max_overflow=5,
                connect_args={
                    # A row or table lock held elsewhere (an administrator's open transaction,
                    # a stuck instance) is waited for as long as a SQLite write waits for the
                    # file lock, then the request gets 503: not a request hung for ever.
                    "server_settings": {"lock_timeout": str(int(busy_timeout_ms))},
                    # A database host that does not answer: refused after this, not after
                    # asyncpg's default minute.
                    "timeout": CONNECT_TIMEOUT_S,
                },
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if not self.is_sqlite:
            _ping_when_idle(self.engine, ping_after_idle_s)
        # The SQLite file again, through plain sqlite3 (run_read / run_write): connections on
        # the loop's thread for what runs at once, and a thread for reads and one for writes
        # for what must wait, so a read (the identity of every request) never queues behind a
        # write transaction (WAL: readers and the writer do not block each other).
        self._sync_read: _SyncSqlite | None = None
        self._sync_write: _SyncSqlite | None = None
        self._inline_read: _InlineSqlite | None = None
        self._inline_write: _InlineSqlite | None = None
        if self.is_sqlite:
            _sqlite_hooks(self.engine.sync_engine, busy_timeout_ms)
            sync_url = make_url(url).set(drivername="sqlite")
            if sync_url.database and sync_url.database != ":memory:":
                self._sync_read = _SyncSqlite(
                    sync_url, echo=echo, write=False, busy_timeout_ms=busy_timeout_ms
                )
                self._sync_write = _SyncSqlite(
                    sync_url, echo=echo, write=True, busy_timeout_ms=busy_timeout_ms
                )
                self._inline_read = _InlineSqlite(sync_url, echo=echo, write=False)
                self._inline_write = _InlineSqlite(sync_url, echo=echo, write=True)
        self._write_engine = self.engine.execution_options(**{_WRITE: True})
        # run_read on PostgreSQL: no BEGIN / ROLLBACK round trips around the read. Under READ
        # COMMITTED every statement takes its own snapshot inside a transaction anyway, so a
        # read-only function sees the same rows either way.
        self._read_engine = (
            self.engine
            if self.is_sqlite
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._background: dict[Hashable, asyncio.Task[None]] = {}
        self._grouped = GroupedWrites(self.run_write, grouped=self.is_sqlite)

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """Whether this process holds ``name`` among every process sharing the database.

        PostgreSQL: a session advisory lock (``pg_try_advisory_lock``), held on one pooled
        connection for the block and released after it, so that of several gateway instances
        only one runs the block at a time; the others get False at once and skip. SQLite (one
        host): always True; the work the block does must be idempotent in the store anyway
        (a process may die half-way), which makes a second run a no-op.
        """
        if self.is_sqlite:
            yield True
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        async with _session(self.engine) as conn:
            got = bool(
                (
                    await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
                ).scalar_one()
            )
            await conn.commit()
            try:
                yield got
            finally:
                if got:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background.values(), return_exceptions=True)
        await self.engine.dispose()
        for sync in (self._sync_read, self._sync_write):
            if sync is not None:
                await sync.close()
        for inline in (self._inline_read, self._inline_write):
            if inline is not None:
                inline.close()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with _session(self.engine) as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed when the block exits cleanly, rolled back otherwise."""
        if self._write_lock is None:
            async with self._write_txn() as conn:
                yield conn
            return
        async with self._write_lock, self._write_txn() as conn:
            yield conn

    @asynccontextmanager
    async def _write_txn(self) -> AsyncIterator[AsyncConnection]:
        async with _session(self._write_engine, begin=True) as conn:
            yield conn

    async def run_read(self, fn: Callable[[Connection], _T]) -> _T:
        """``fn(conn)`` in one read transaction, in one hop on SQLite (see the module doc).

        ``fn`` must only use the connection it is given, and must not block on anything else.
        """
        if self._sync_read is None:
            async with _session(self._read_engine) as conn:
                return await conn.run_sync(fn)
        # On the loop's thread, on the writer's connection: its page cache holds what this
        # process wrote, while another connection's cache is dropped whole when SQLite sees
        # the database changed since its last transaction (after every write of a
        # ceremony). Measured in a loop, an indexed two-table join: 18.3 µs on a second
        # connection after each write, 10.4 µs on the writer's (8.0 µs with no writes).
        # The writer is never inside a transaction here (its transactions run from BEGIN to
        # COMMIT without yielding the loop), and a read takes no write lock.
        for inline in (self._inline_write, self._inline_read):
            if inline is not None and inline.usable():
                with contextlib.suppress(_Busy):
                    return inline.run_read(fn)
        return await self._sync_read.run(fn)

    async def run_write(self, fn: Callable[[Connection], _T]) -> _T:
        """``fn(conn)`` in one write transaction: committed if it returns, rolled back if it
        raises. Same locking as ``write()``: the in-process lock and ``BEGIN IMMEDIATE`` on
        SQLite, row locks on PostgreSQL."""
        if self._sync_write is None:
            async with self.write() as conn:
                return await conn.run_sync(fn)
        assert self._write_lock is not None
        async with self._write_lock:
            inline = self._inline_write
            if inline is not None and inline.usable():
                with contextlib.suppress(_Busy):
                    result = inline.run(fn)
                    if inline.commits % _InlineSqlite.CHECKPOINT_EVERY == 0:
                        self._checkpoint_later()
                    return result
            return await self._sync_write.run(fn)

    def _checkpoint_later(self) -> None:
        """A passive WAL checkpoint on the write thread, in the background (none if one is
        still pending), holding the process's write lock: a checkpoint that writes of this
        process overtake never catches up with the end of the WAL, and the WAL only starts
        over after one that did (measured: 5.3 MB of WAL after 1,000 commits of 4 KB with the
        lock free, under 3 MB with it). Reads go on meanwhile, and so does the loop. Its
        failure is logged: the next one, or any other process's automatic checkpoint, copies
        the same pages."""
        key = ("wal_checkpoint",)
        if key in self._background or self._sync_write is None or self._write_lock is None:
            return
        sync, lock = self._sync_write, self._write_lock

        async def run() -> None:
            try:
                async with lock:
                    await sync.run(_checkpoint_job)
            except Exception as e:  # noqa: BLE001 - bookkeeping: log, never crash the caller
                log.warning("WAL checkpoint failed: %s", type(e).__name__)
            finally:
                self._background.pop(key, None)

        self._background[key] = asyncio.get_running_loop().create_task(run())

    async def run_grouped(
        self, fn: Callable[[Connection], _T], *, on_refusal: OnRefusal | None = None
    ) -> _T:
        """``fn(conn)`` as a unit of the next grouped write transaction, in its own savepoint
        (``store/grouped.py``): committed with the concurrent units of its group, rolled back
        alone if it raises (after which ``on_refusal`` may record the refusal). On PostgreSQL
        each unit is its own transaction (row-lock order; see ``store/grouped.py``)."""
        return await self._grouped.run(fn, on_refusal=on_refusal)

    def write_later(self, key: Hashable, fn: Callable[[Connection], object]) -> None:
        """``run_write(fn)`` in the background, for bookkeeping no response depends on (e.g. a
        certificate's last use). Skipped while a write with the same ``key`` is pending; a
        failure is logged; ``close()`` waits for what is pending."""
        if key in self._background:
            return

        async def run() -> None:
            try:
                await self.run_write(fn)
            except Exception as e:  # noqa: BLE001 - bookkeeping: log, never crash the caller
                log.warning("background write %r failed: %s", key, type(e).__name__)
            finally:
                self._background.pop(key, None)

        self._background[key] = asyncio.get_running_loop().create_task(run())

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade)

    async def current_revision(self) -> str | None:
        """The schema revision in the store (plain SQL: workers need not import Alembic)."""
        async with self.engine.connect() as conn:
            try:
                rows = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).all()
            except (OperationalError, ProgrammingError):
                return None  # no alembic_version table: an empty store
        return str(rows[0][0]) if len(rows) == 1 else None


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(sync_conn: Connection) -> None:
    from alembic import command

    command.upgrade(alembic_config(sync_conn), "head")


# The newest migration. Workers compare the store against it without importing Alembic (11 MB
# per process); tests/integration/test_store_portable.py checks it is Alembic's own head.
HEAD_REVISION = "0006_jpki"


def head_revision() -> str:
    return HEAD_REVISION
