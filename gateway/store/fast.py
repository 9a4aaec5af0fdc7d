"""Hot statements run on the plain ``sqlite3`` connection, with SQLAlchemy's own SQL and types.

Each SQLAlchemy ``Connection.execute`` builds an execution context, processes parameters
through the compiled statement and wraps the cursor in a ``CursorResult`` (measured ~15-18 µs
per statement on the SQLite write thread, most of the Python around each statement of a
ceremony). A :class:`FastStatement` compiles its statement once per dialect with SQLAlchemy
(the same SQL text), keeps the bind and result processors SQLAlchemy's types give for that
dialect (so values are converted exactly as ``Connection.execute`` converts them: e.g. aware
datetimes stored as naive UTC text on SQLite, read back aware), and on a pysqlite connection
runs that SQL on the driver connection itself. On any other driver (asyncpg, aiosqlite for an
in-memory store) it is an ordinary ``Connection.execute``: same statement, same results,
except for a statement SQLAlchemy never caches (its cache-key visitor refuses one with a
VALUES list, e.g. the ledger's multi-row spends): ``Connection.execute`` would compile that
one on every call (~0.35 ms for 8 rows), so ``all`` and ``run`` compile it once per dialect
here too and run it with ``exec_driver_sql``, through the same type processors (``insert``
and ``run_many`` of such a statement on another driver still go through
``Connection.execute``: nothing uses them that way).

An expanding IN list (``bindparam(..., expanding=True)``) is rendered as one ``?`` per item,
as SQLAlchemy renders it; an empty list, and inserts whose columns have Python-side defaults
that SQLAlchemy computes per execution (``insert_prefetch``), go through ``Connection.execute``.

It runs inside the caller's transaction: the driver connection is the one SQLAlchemy's
``Connection`` holds, in the transaction the caller began (SQLAlchemy's own savepoints on
SQLite are plain statements on that connection too, see ``store/grouped.py``).
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql.expression import Executable

_Processor = Callable[[Any], Any] | None
# Rows with attribute access by column name, as SQLAlchemy's Row (built from names known at
# run time, hence untyped).
_row_class: Any = namedtuple


class _Plan:
    """A statement compiled for one dialect: SQL, parameter order and processors."""

    __slots__ = ("binds", "defaults", "expanded", "expanding", "names", "results", "row", "sql")

    def __init__(
        self,
        sql: str,
        names: Sequence[str],
        defaults: Sequence[Any],
        binds: Sequence[_Processor],
        expanding: Sequence[bool],
        row: Any,
        results: Sequence[_Processor] | None,
    ) -> None:
        self.sql = sql
        self.names = tuple(names)
        self.defaults = tuple(defaults)
        self.binds = tuple(binds)
        self.expanding = tuple(expanding) if any(expanding) else None
        self.expanded: dict[tuple[int, ...], str] = {}  # SQL per length of each IN list
        self.row = row  # a namedtuple class for the rows it returns, or None
        self.results = tuple(results) if results is not None else None

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, default, proc in zip(self.names, self.defaults, self.binds, strict=True):
            v = values.get(name, default)
            out.append(proc(v) if proc is not None else v)
        return tuple(out)

    def statement(self, values: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]] | None:
        """The SQL and its parameters for ``values``; None for an empty IN list (SQLAlchemy
        renders those as an empty set: its job)."""
        if self.expanding is None:
            return self.sql, self.params(values)
        out: list[Any] = []
        lengths: list[int] = []
        for name, default, proc, expanding in zip(
            self.names, self.defaults, self.binds, self.expanding, strict=True
        ):
            v = values.get(name, default)
            if not expanding:
                out.append(proc(v) if proc is not None else v)
                continue
            items = list(v)
            if not items:
                return None
            lengths.append(len(items))
            out.extend(items if proc is None else [proc(x) for x in items])
        key = tuple(lengths)
        sql = self.expanded.get(key)
        if sql is None:
            sql = self.sql
            it = iter(lengths)
            for name, expanding in zip(self.names, self.expanding, strict=True):
                if expanding:
                    sql = sql.replace(f"__[POSTCOMPILE_{name}]", ", ".join("?" * next(it)), 1)
            if len(self.expanded) < 256:  # lengths vary with the group: keep a bounded few
                self.expanded[key] = sql
        return sql, tuple(out)

    def rows(self, raw: list[tuple[Any, ...]]) -> list[Any]:
        procs = self.results
        assert procs is not None and self.row is not None
        make = self.row._make
        if not any(procs):
            return [make(r) for r in raw]
        return [
            make([p(v) if p is not None else v for p, v in zip(procs, r, strict=True)]) for r in raw
        ]


class FastStatement:
    """One hot statement (see the module docstring). ``column_keys``: for an INSERT, the
    columns it is given (compiled for exactly those, as ``Connection.execute`` would)."""

    def __init__(self, stmt: Executable, *, column_keys: Sequence[str] | None = None) -> None:
        self.stmt = stmt
        self._column_keys = list(column_keys) if column_keys is not None else None
        self._plans: dict[Dialect, _Plan | None] = {}
        # SQLAlchemy's cache key: None for a statement it compiles on every execution.
        key = getattr(stmt, "_generate_cache_key", None)
        self.uncached = key is not None and key() is None

    def _plan(self, conn: Connection) -> tuple[Any, _Plan] | None:
        """The driver connection (pysqlite; None for another driver, an uncached statement:
        ``exec_driver_sql``) and the plan; or None: run through SQLAlchemy."""
        dialect = conn.dialect
        sqlite = dialect.driver == "pysqlite"
        if not sqlite and not self.uncached:
            return None
        try:
            plan = self._plans[dialect]
        except KeyError:
            plan = self._plans[dialect] = _compile(self.stmt, dialect, self._column_keys)
        if plan is None:
            return None
        return (conn.connection.driver_connection if sqlite else None), plan

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """The rows it returns (a SELECT, or a statement with RETURNING)."""
        fast = self._plan(conn)
        stmt = fast[1].statement(params) if fast is not None else None
        if fast is None or stmt is None:
            return list(conn.execute(self.stmt, dict(params)).all())
        raw, plan = fast
        if raw is None:
            return plan.rows(list(conn.exec_driver_sql(*stmt).all()))
        try:
            return plan.rows(raw.execute(*stmt).fetchall())
        except sqlite3.Error as e:
            raise as_sqlalchemy_error(e, stmt) from e

    def one_or_none(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        rows = self.all(conn, params)
        if len(rows) > 1:
            raise ValueError("more than one row where one or none was expected")
        return rows[0] if rows else None

    def one(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        rows = self.all(conn, params)
        if len(rows) != 1:
            raise ValueError(f"{len(rows)} rows where exactly one was expected")
        return rows[0]

    def run(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Execute once; the row count."""
        fast = self._plan(conn)
        stmt = fast[1].statement(params) if fast is not None else None
        if fast is None or stmt is None:
            return int(conn.execute(self.stmt, dict(params)).rowcount)
        if fast[0] is None:
            return int(conn.exec_driver_sql(*stmt).rowcount)
        try:
            return int(fast[0].execute(*stmt).rowcount)
        except sqlite3.Error as e:
            raise as_sqlalchemy_error(e, stmt) from e

    def run_many(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> int:
        """Execute once per parameter set (executemany); the total row count, or -1 where
        the driver reports none (asyncpg, as through SQLAlchemy)."""
        fast = self._plan(conn)
        if fast is None or fast[0] is None or fast[1].expanding is not None:
            return int(conn.execute(self.stmt, [dict(p) for p in params]).rowcount)
        raw, plan = fast
        many = [plan.params(p) for p in params]
        try:
            return int(raw.executemany(plan.sql, many).rowcount)
        except sqlite3.Error as e:
            raise as_sqlalchemy_error(e, (plan.sql, many)) from e

    def insert(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Execute an INSERT of one row; its integer primary key."""
        fast = self._plan(conn)
        if fast is None or fast[0] is None:
            res = conn.execute(self.stmt, dict(params))
            return int(res.inserted_primary_key[0])  # type: ignore[index]
        raw, plan = fast
        one = plan.params(params)
        try:
            return int(raw.execute(plan.sql, one).lastrowid)
        except sqlite3.Error as e:
            raise as_sqlalchemy_error(e, (plan.sql, one)) from e


def as_sqlalchemy_error(e: sqlite3.Error, stmt: tuple[str, Any]) -> StatementError:
    """The driver's error as SQLAlchemy raises it (``OperationalError`` for a locked or full
    database, ``IntegrityError``, ...): what callers catch, e.g. ``Database.run_write``'s 503.
    Also for the SQLite threads' own BEGIN / COMMIT / ROLLBACK (``store/db.py``)."""
    return DBAPIError.instance(stmt[0], stmt[1], e, sqlite3.Error)


def _compile(stmt: Any, dialect: Dialect, column_keys: list[str] | None) -> _Plan | None:
    compiled: Any = stmt.compile(dialect=dialect, column_keys=column_keys)
    if compiled.positiontup is None:
        return None  # a named paramstyle: SQLAlchemy's job (pysqlite's and asyncpg's are not)
    if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
        return None  # Python-side defaults computed per execution: SQLAlchemy's job
    names: list[str] = list(compiled.positiontup)
    binds = compiled.binds
    defaults: list[Any] = []
    processors: list[_Processor] = []
    expanding: list[bool] = []
    for name in names:
        bp = binds[name]
        if bp.expanding and (
            dialect.paramstyle != "qmark" or f"__[POSTCOMPILE_{name}]" not in compiled.string
        ):
            return None  # an IN list rendered for another paramstyle: SQLAlchemy's job
        expanding.append(bool(bp.expanding))
        defaults.append(None if bp.required else bp.effective_value)
        processors.append(bp.type.dialect_impl(dialect).bind_processor(dialect))
    row: Any = None
    results: list[_Processor] | None = None
    exported = getattr(stmt, "exported_columns", None)
    returns = compiled.isinsert or compiled.isupdate or compiled.isdelete
    if exported is not None and (not returns or compiled.effective_returning):
        cols = list(exported)
        keys = list(exported.keys())
        try:
            row = _row_class("Row", keys)
        except ValueError:  # a column name that is no Python identifier: SQLAlchemy's Row
            return None
        results = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in cols]
    return _Plan(compiled.string, names, defaults, processors, expanding, row, results)
