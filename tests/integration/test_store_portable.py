"""The store on SQLite and on a real PostgreSQL: same migrations, same behaviour."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from gateway.audit import AuditLog
from gateway.auth.mtls import identify
from gateway.errors import AccessDenied, Conflict
from gateway.facilities import FacilityRegistry
from gateway.pki import testworld
from gateway.store.db import Database
from gateway.store.schema import metadata
from tests.support.postgres import postgres_cluster


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/s.db"
    base: str = request.getfixturevalue("pg_url")
    return base


async def _fresh(url: str) -> Database:
    db = Database(url)
    if not db.is_sqlite:
        # Each test starts from an empty schema on the shared cluster.
        async with db.engine.begin() as conn:
            await conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            await conn.exec_driver_sql("CREATE SCHEMA public")
    await db.migrate()
    return db


def test_migrations_match_the_schema(url: str) -> None:
    async def go() -> list[object]:
        db = await _fresh(url)
        try:

            def diff(sync: Connection) -> list[object]:
                return list(compare_metadata(MigrationContext.configure(sync), metadata))

            async with db.engine.connect() as conn:
                return await conn.run_sync(diff)
        finally:
            await db.close()

    assert asyncio.run(go()) == []


def test_registry_identity_and_audit(url: str) -> None:
    async def go() -> None:
        db = await _fresh(url)
        audit = AuditLog()
        reg = FacilityRegistry(db=db, audit=audit)
        try:
            await reg.add(institution_code="1310000011", name="H", kind="hospital", actor="t")
            with pytest.raises(Conflict):
                await reg.add(institution_code="1310000011", name="H", kind="hospital", actor="t")
            now = datetime.now(UTC)
            ca = testworld.make_client_ca(now=now)
            leaf = testworld.issue_client_cert(
                ca, common_name="H", institution_code="1310000011", now=now,
                validity=timedelta(days=30),
            )
            from cryptography.hazmat.primitives import serialization

            der = leaf.cert.public_bytes(serialization.Encoding.DER)
            serial = await reg.register_certificate(
                leaf.cert, institution_code="1310000011", actor="t"
            )
            ident = await identify(db, der)
            assert ident.institution_code == "1310000011"
            await reg.revoke_certificate(serial, reason="test", actor="t")
            with pytest.raises(AccessDenied, match="revoked on"):
                await identify(db, der)
            async with db.read() as conn:
                report = await audit.verify(conn)
            assert report.ok and report.events == 3
        finally:
            await db.close()

    asyncio.run(go())


def test_concurrent_appends_from_two_processes(url: str) -> None:
    async def create() -> None:
        await (await _fresh(url)).close()

    asyncio.run(create())
    script = textwrap.dedent(
        f"""
        import asyncio
        from gateway.audit import AuditLog
        from gateway.store.db import Database

        async def main():
            db = Database({url!r})
            audit = AuditLog()
            for i in range(100):
                async with db.write() as conn:
                    await audit.append(conn, action="race", actor="p", detail={{"i": i}})
            await db.close()

        asyncio.run(main())
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]

    async def check() -> None:
        db = Database(url)
        try:
            async with db.read() as conn:
                report = await AuditLog().verify(conn)
        finally:
            await db.close()
        assert report.ok, report.message
        assert report.events == 200

    asyncio.run(check())
