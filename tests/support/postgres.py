"""A throwaway PostgreSQL cluster (Debian's postgresql binaries) for store tests.

Runs as the ``postgres`` system user when the tests run as root (the server refuses root),
listens on 127.0.0.1 on a free port, trust authentication, removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.gateway import free_port


def _bindir() -> Path:
    base = Path("/usr/lib/postgresql")
    versions = sorted(base.glob("*/bin/initdb")) if base.exists() else []
    if not versions:
        raise RuntimeError("PostgreSQL server binaries not found: run `make test` (bootstrap)")
    return versions[-1].parent


def _as_postgres() -> list[str]:
    """The prefix that runs a server command as ``postgres`` (the server refuses root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def psql(url: str, sql: str) -> str:
    """Run ``sql`` with psql on the ``postgres`` database of ``url``'s cluster; its output
    (unaligned, tuples only)."""
    host, port = url.split("@", 1)[1].split("/", 1)[0].split(":")
    return subprocess.run(
        [str(_bindir() / "psql"), "-h", host, "-p", port, "-U", "postgres", "-d", "postgres",
         "-v", "ON_ERROR_STOP=1", "-q", "-At", "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Yield an asyncpg SQLAlchemy URL of a fresh cluster; stop and delete it afterwards."""
    bindir = _bindir()
    # Not under pytest's tmp dir: that is private to root and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="hpki-gateway-pg-"))
    data = base / "pgdata"
    data.mkdir(parents=True)
    prefix = _as_postgres()
    if prefix:
        pw = pwd.getpwnam("postgres")
        for p in (base, data):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = free_port()
    subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    log = base / "pg.log"
    if prefix:
        log.touch()
        os.chown(log, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
    subprocess.run(
        [
            *prefix,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
                check=False,
            )
            if r.returncode == 0:
                break
            time.sleep(0.2)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def stopped(url: str) -> Iterator[None]:
    """The cluster of ``url`` stopped for the block (``pg_ctl stop -m fast``: its connections
    are closed, new ones refused), then started again with the options it had."""
    data = psql(url, "SHOW data_directory")
    # postmaster.opts: the server's command line, quoted; all but the program and its -D.
    opts = shlex.split(Path(data, "postmaster.opts").read_text())[1:]
    i = opts.index("-D")
    del opts[i : i + 2]
    ctl = [*_as_postgres(), str(_bindir() / "pg_ctl"), "-D", data]
    subprocess.run([*ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)
    try:
        yield
    finally:
        log = str(Path(data).parent / "pg.log")
        subprocess.run(
            [*ctl, "-w", "-l", log, "-o", shlex.join(opts), "start"],
            check=True,
            capture_output=True,
        )


class Databases:
    """Fresh, migrated databases on one cluster: the first is migrated with Alembic and kept
    as a template; each further one is a copy of it (``CREATE DATABASE ... TEMPLATE``, tens of
    milliseconds instead of a migration run per test)."""

    TEMPLATE = "hpki_template"

    def __init__(self, url: str) -> None:
        self.url = url  # .../postgres
        self._n = 0
        self._template_ready = False

    def _psql(self, sql: str) -> None:
        psql(self.url, sql)

    def _db_url(self, name: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close_connections(self, url: str) -> None:
        """Close every connection to the database of ``url`` from the server's side, as a
        restart or a failover does (``pg_terminate_backend``, waiting up to 5 s for each
        backend to be gone, so the connections are closed when this returns)."""
        name = url.rsplit("/", 1)[1]
        assert name.isidentifier(), name  # one of this class's databases
        sql = "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = '{}'"
        self._psql(sql.format(name) + " AND pid <> pg_backend_pid()")

    def fresh(self) -> str:
        """The SQLAlchemy URL of a new database holding the migrated, empty schema."""
        if not self._template_ready:
            import asyncio

            from gateway.store.db import Database

            self._psql(f"CREATE DATABASE {self.TEMPLATE}")

            async def migrate() -> None:
                db = Database(self._db_url(self.TEMPLATE))
                try:
                    await db.migrate()
                finally:
                    await db.close()

            asyncio.run(migrate())
            self._template_ready = True
        self._n += 1
        name = f"hpki_test_{self._n}"
        self._psql(f"CREATE DATABASE {name} TEMPLATE {self.TEMPLATE}")
        return self._db_url(name)


async def lock_waiting(url: str) -> int:
    """How many sessions of ``url``'s database wait for a lock now (PostgreSQL)."""
    name = url.rsplit("/", 1)[1].split("?")[0]
    assert name.isidentifier(), name  # a throwaway database's own name, quoted below
    sql = (
        "SELECT count(*) FROM pg_stat_activity "  # noqa: S608 - name checked above
        f"WHERE datname = '{name}' AND wait_event_type = 'Lock'"
    )
    return int(await asyncio.to_thread(psql, url, sql))


async def lock_waiters(url: str, n: int) -> None:
    """Until ``n`` sessions of ``url``'s database wait for a lock (PostgreSQL)."""
    for _ in range(600):
        if await lock_waiting(url) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} sessions waited for a lock within 30 s")
