"""The store on SQLite and on a real PostgreSQL: same migrations, same behaviour."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from gateway.audit import AuditLog
from gateway.auth.mtls import identify
from gateway.clock import system_clock
from gateway.errors import AccessDenied, Conflict
from gateway.hsm.api import DigestAlgorithm
from gateway.lifecycle.facilities import FacilityRegistry
from gateway.sandbox import testworld
from gateway.signing.ledger import SadLedger, SignRequest, token_hash
from gateway.store.db import Database
from gateway.store.schema import metadata
from tests.support.postgres import (
    Databases,
    lock_waiters,
    lock_waiting,
    postgres_cluster,
    stopped,
)


@pytest.fixture(scope="module")
def pg_url(pg_databases: Databases) -> str:
    """A database of the session's cluster of its own (the tests here drop its schema)."""
    return pg_databases.fresh()


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
                ca,
                common_name="H",
                institution_code="1310000011",
                now=now,
                validity=timedelta(days=30),
            )
            from cryptography.hazmat.primitives import serialization

            der = leaf.cert.public_bytes(serialization.Encoding.DER)
            serial = await reg.register_certificate(
                leaf.cert, institution_code="1310000011", actor="t"
            )
            ident = await identify(db, der, now=system_clock())
            assert ident.institution_code == "1310000011"
            # The registry's part of a revocation (ClientCertificateService.revoke adds the CRL).
            async with db.write() as conn:
                await reg.revoke_in(conn, serial, reason="test", actor="t", now=now)
            with pytest.raises(AccessDenied, match="revoked on"):
                await identify(db, der, now=system_clock())
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


# -- grouped SAD consumption (SignatureActivation.consume_and_audit) on both backends ---------


async def _active_enrollment(db: Database, code_hash: str, now: datetime) -> int:
    """An active enrolment code of the signing world's signer (expiring in a day): its id."""
    from sqlalchemy import insert

    from gateway.store.schema import enrollment

    async with db.write() as conn:
        res = await conn.execute(
            insert(enrollment).values(
                signer_id="sgn-1", code_hash=code_hash, password_hash="x", failed_tries=0,
                status="active", expires_at=now + timedelta(days=1), created_at=now,
            )
        )  # fmt: skip
        return int(res.inserted_primary_key[0])  # type: ignore[index]


async def _signing_world(db: Database, *, sads: int, hashes: list[bytes]) -> tuple[int, list[str]]:
    """A facility, an active signer serving it with an active credential (valid certificate),
    and ``sads`` hash-bound SADs, each authorizing the multiset ``hashes``. Returns the
    facility id and the SAD tokens."""
    from collections import Counter

    from cryptography.hazmat.primitives import serialization
    from sqlalchemy import insert, select

    from gateway.store.schema import credential, facility, sad, sad_hash, signer, signer_facility

    now = datetime.now(UTC)
    reg = FacilityRegistry(db=db, audit=AuditLog())
    await reg.add(institution_code="1310000011", name="H", kind="hospital", actor="t")
    ca = testworld.make_client_ca(now=now)
    cert = testworld.issue_client_cert(
        ca, common_name="D", institution_code=None, now=now, validity=timedelta(days=30)
    ).cert.public_bytes(serialization.Encoding.DER)
    tokens = [f"sad-token-{i}" for i in range(sads)]
    async with db.write() as conn:
        fid = (
            await conn.execute(
                select(facility.c.id).where(facility.c.institution_code == "1310000011")
            )
        ).scalar_one()
        await conn.execute(
            insert(signer).values(id="sgn-1", name="D", role="Medical Doctor", created_at=now)
        )
        await conn.execute(
            insert(signer_facility).values(signer_id="sgn-1", facility_id=fid, created_at=now)
        )
        await conn.execute(
            insert(credential).values(
                id="cred-1",
                signer_id="sgn-1",
                key_id="00" * 16,
                key_bits=2048,
                status="active",
                certificate_der=cert,
                created_at=now,
                updated_at=now,
            )
        )
        for t in tokens:
            res = await conn.execute(
                insert(sad).values(
                    token_hash=token_hash(t),
                    facility_id=fid,
                    signer_id="sgn-1",
                    credential_id="cred-1",
                    hash_algorithm="2.16.840.1.101.3.4.2.1",
                    scal="2",
                    num_signatures=len(hashes),
                    remaining=len(hashes),
                    created_at=now,
                    expires_at=now + timedelta(minutes=5),
                )
            )
            sad_id = res.inserted_primary_key[0]  # type: ignore[index]
            await conn.execute(
                insert(sad_hash),
                [
                    {"sad_id": sad_id, "hash": h, "authorized": k, "remaining": k}
                    for h, k in Counter(hashes).items()
                ],
            )
    return fid, tokens


def _sign_request(token: str, fid: int, h: bytes, credential_id: str = "cred-1") -> SignRequest:
    return SignRequest(
        sad=token,
        facility_id=fid,
        credential_id=credential_id,
        hashes=[h],
        algorithm=DigestAlgorithm.SHA256,
        now=datetime.now(UTC),
        actor="facility:1310000011",
        facility_code="1310000011",
        action="signature.sign_hash",
        detail=lambda g: {"hashes": [x.hex() for x in g.hashes]},
        refused_detail={"credential": "cred-1"},
    )


def _activation(db: Database, audit: AuditLog) -> SadLedger:
    return SadLedger(db=db, audit=audit)


def test_grouped_consumption_checks_each_request_and_audits_each(url: str) -> None:
    """Concurrent requests share write transactions; each is checked against what the requests
    before it spent, a refused one fails alone, and every one leaves its audit event."""
    from sqlalchemy import func, select

    from gateway.errors import InvalidRequest
    from gateway.store.schema import audit_event, sad, sad_hash

    h1, h2, h3 = (bytes([i]) * 32 for i in (1, 2, 3))

    async def go() -> None:
        db = await _fresh(url)
        audit = AuditLog()
        act = _activation(db, audit)
        try:
            fid, (t1, t2) = await _signing_world(db, sads=2, hashes=[h1, h2, h2])
            reqs = [_sign_request(t, fid, h) for t in (t1, t2) for h in (h1, h2, h3) * 4]
            reqs += [_sign_request("no-such-sad", fid, h1), _sign_request(t1, fid + 99, h1)]
            outcomes = await asyncio.gather(
                *(act.consume_and_audit(r) for r in reqs), return_exceptions=True
            )
            granted = [
                (r.sad, r.hashes[0])
                for r, o in zip(reqs, outcomes, strict=True)
                if not isinstance(o, BaseException)
            ]
            assert sorted(granted) == sorted([(t, h) for t in (t1, t2) for h in (h1, h2, h2)])
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            assert all(isinstance(e, InvalidRequest) for e in errors), errors
            refusals = sorted(e.description for e in errors if isinstance(e, InvalidRequest))
            assert (
                refusals.count("Hash is not authorized by the SAD")
                + refusals.count("Number of signatures exceeds those authorized by the SAD")
                == len(reqs) - 2 - 6
            )
            assert "Invalid parameter SAD" in refusals
            assert "SAD was not issued to this facility" in refusals
            async with db.read() as conn:
                assert (await conn.execute(select(func.sum(sad.c.remaining)))).scalar() == 0
                assert (await conn.execute(select(func.sum(sad_hash.c.remaining)))).scalar() == 0
                actions = [
                    a
                    for (a,) in await conn.execute(
                        select(audit_event.c.action).where(audit_event.c.action.like("signature.%"))
                    )
                ]
                assert actions.count("signature.sign_hash") == 6
                assert actions.count("signature.refused") == len(reqs) - 6
                report = await audit.verify(conn)
            assert report.ok, report.message
            # The transaction-scoped API sees the same state: nothing left to spend.
            with pytest.raises(InvalidRequest, match="Number of signatures exceeds"):
                async with db.write() as conn:
                    await act.consume(
                        conn,
                        sad=t1,
                        facility_id=fid,
                        credential_id="cred-1",
                        hashes=[h1],
                        algorithm=reqs[0].algorithm,
                        now=datetime.now(UTC),
                    )
        finally:
            await db.close()

    asyncio.run(go())


def test_grouped_consumption_an_unexpected_error_fails_only_its_request(url: str) -> None:
    """A credential whose stored certificate cannot be parsed breaks its own request (a 500, as
    before grouping), not the other requests of its group."""
    from sqlalchemy import insert, select

    from gateway.store.schema import credential, sad, sad_hash

    h = bytes([7]) * 32

    async def go() -> None:
        db = await _fresh(url)
        act = _activation(db, AuditLog())
        try:
            fid, (good,) = await _signing_world(db, sads=1, hashes=[h])
            now = datetime.now(UTC)
            async with db.write() as conn:
                await conn.execute(
                    insert(credential).values(
                        id="cred-bad",
                        signer_id="sgn-1",
                        key_id="11" * 16,
                        key_bits=2048,
                        status="active",
                        certificate_der=b"not a certificate",
                        created_at=now,
                        updated_at=now,
                    )
                )
                row = (
                    await conn.execute(select(sad).where(sad.c.token_hash == token_hash(good)))
                ).one()
                res = await conn.execute(
                    insert(sad).values(
                        token_hash=token_hash("bad-sad"),
                        facility_id=fid,
                        signer_id="sgn-1",
                        credential_id="cred-bad",
                        hash_algorithm=row.hash_algorithm,
                        scal="2",
                        num_signatures=1,
                        remaining=1,
                        created_at=now,
                        expires_at=row.expires_at,
                    )
                )
                await conn.execute(
                    insert(sad_hash).values(
                        sad_id=res.inserted_primary_key[0],  # type: ignore[index]
                        hash=h,
                        authorized=1,
                        remaining=1,
                    )
                )
            ok, broken = await asyncio.gather(
                act.consume_and_audit(_sign_request(good, fid, h)),
                act.consume_and_audit(_sign_request("bad-sad", fid, h, "cred-bad")),
                return_exceptions=True,
            )
            assert not isinstance(ok, BaseException) and ok.hashes == (h,)
            assert isinstance(broken, ValueError), broken
        finally:
            await db.close()

    asyncio.run(go())


def test_grouped_consumption_from_two_processes(url: str) -> None:
    """Two processes, each with 40 concurrent one-hash requests on the same two SADs (4 hashes
    each): exactly 8 signatures in total, and the audit chain intact."""
    hashes = [bytes([i]) * 32 for i in range(4)]

    async def create() -> tuple[int, list[str]]:
        db = await _fresh(url)
        try:
            return await _signing_world(db, sads=2, hashes=hashes)
        finally:
            await db.close()

    fid, tokens = asyncio.run(create())
    script = textwrap.dedent(
        f"""
        import asyncio, json
        from gateway.audit import AuditLog
        from gateway.store.db import Database
        from tests.integration.test_store_portable import _activation, _sign_request

        async def main():
            db = Database({url!r})
            act = _activation(db, AuditLog())
            reqs = [_sign_request(t, {fid}, h) for t in {tokens!r} for h in {hashes!r} * 5]
            out = await asyncio.gather(*(act.consume_and_audit(r) for r in reqs),
                                       return_exceptions=True)
            await db.close()
            print(json.dumps(sum(not isinstance(o, BaseException) for o in out)))

        asyncio.run(main())
        """
    )
    repo = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    granted = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(granted) == 8, granted

    async def check() -> None:
        db = Database(url)
        try:
            async with db.read() as conn:
                report = await AuditLog().verify(conn)
        finally:
            await db.close()
        assert report.ok, report.message

    asyncio.run(check())


def test_append_many_moves_the_head_once(url: str) -> None:
    from gateway.audit import AuditRecord

    async def go() -> None:
        db = await _fresh(url)
        audit = AuditLog()
        try:
            async with db.write() as conn:
                await audit.append(conn, action="one", actor="t")
                events = await audit.append_many(
                    conn, [AuditRecord(action="many", actor="t", detail={"i": i}) for i in range(5)]
                )
                assert [e.seq for e in events] == [2, 3, 4, 5, 6]
                assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
                assert await audit.append_many(conn, []) == []
            events = await db.run_write(
                lambda c: audit.append_many_sync(c, [AuditRecord(action="sync", actor="t")])
            )
            assert events[0].seq == 7
            async with db.read() as conn:
                report = await audit.verify(conn)
            assert report.ok and report.events == 7, report.message
        finally:
            await db.close()

    asyncio.run(go())


def test_head_revision_constant_is_alembics_head() -> None:
    """Workers check the schema against HEAD_REVISION without importing Alembic."""
    from alembic.script import ScriptDirectory

    from gateway.store.db import HEAD_REVISION, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION


def test_a_worker_imports_neither_alembic_nor_pyhanko_nor_pkcs11() -> None:
    """Memory per worker: these load only where needed (migrations, PDFs, the signing child)."""
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "import gateway.api.sign_doc, gateway.sign.service\n"
        "print(sorted(m for m in ('alembic', 'pyhanko', 'pkcs11') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_grant_from_another_presence_method_is_issued_and_spent_the_same_way(url: str) -> None:
    """The seam a My Number card authenticator plugs into: a Grant with presence "jpki" and
    SCAL 2, issued by the ledger, spends exactly like a FIDO2 one and says how presence was
    proved; a hash outside it is refused."""
    from gateway.errors import InvalidRequest
    from gateway.signing.grant import PRESENCE_JPKI, Grant

    h1, h2 = bytes([7]) * 32, bytes([8]) * 32

    async def go() -> None:
        db = await _fresh(url)
        ledger = SadLedger(db=db, audit=AuditLog())
        try:
            fid, _ = await _signing_world(db, sads=0, hashes=[])
            now = datetime.now(UTC)
            grant = Grant(
                facility_id=fid,
                signer_id="sgn-1",
                credential_id="cred-1",
                hashes=(h1,),
                hash_algorithm=DigestAlgorithm.SHA256,
                count=1,
                scal="2",
                presence=PRESENCE_JPKI,
                presence_ref=None,
                ttl=timedelta(minutes=5),
                evidence={"card": "test"},
            )
            async with db.write() as conn:
                issued = await ledger.issue(
                    conn, grant, actor="facility:1310000011", facility_code="1310000011", now=now
                )
            assert (issued.scal, issued.num_signatures, issued.expires_in) == ("2", 1, 300)
            with pytest.raises(InvalidRequest, match="Hash is not authorized by the SAD"):
                await ledger.consume_and_audit(_sign_request(issued.token, fid, h2))
            spent = await ledger.consume_and_audit(_sign_request(issued.token, fid, h1))
            assert (spent.presence, spent.scal, spent.hashes) == ("jpki", "2", (h1,))
            with pytest.raises(InvalidRequest, match="Number of signatures exceeds"):
                await ledger.consume_and_audit(_sign_request(issued.token, fid, h1))
        finally:
            await db.close()

    asyncio.run(go())


def test_one_enrolment_code_registers_one_authenticator_when_two_complete_at_once(
    url: str,
) -> None:
    """Two registrations completed at once with one code (the facility relaying the ceremony
    knows code and password): on PostgreSQL (READ COMMITTED) both read the code active and
    both authenticators were stored. ``use_enrollment`` now uses up only an active code: the
    second waits for the first, matches no row, and its transaction rolls back (Conflict)."""
    from sqlalchemy import func, insert, select

    from gateway.auth.fido2 import use_enrollment
    from gateway.store.schema import enrollment, fido_credential

    async def go() -> None:
        db = await _fresh(url)
        try:
            await _signing_world(db, sads=0, hashes=[])
            now = datetime.now(UTC)
            eid = await _active_enrollment(db, "c" * 64, now)
            # On PostgreSQL both transactions store their authenticator before either uses the
            # code up (the race); SQLite serializes write transactions, so the second begins
            # after the first committed.
            both_stored = asyncio.Barrier(2) if url.startswith("postgresql") else None

            async def register(i: int) -> str:
                try:
                    async with db.write() as conn:
                        await conn.execute(
                            insert(fido_credential).values(
                                id=f"fido-{i}",
                                signer_id="sgn-1",
                                credential_id=f"cred{i}",
                                credential_data=b"x",
                                sign_count=0,
                                aaguid="0" * 36,
                                created_at=now,
                            )
                        )
                        if both_stored is not None:
                            await both_stored.wait()
                        await use_enrollment(conn, eid, now=now)
                    return "registered"
                except Conflict as e:
                    return str(e)

            got = sorted(await asyncio.gather(register(1), register(2)))
            assert got == [
                "enrollment code was already used: ask for a new one",
                "registered",
            ], got
            async with db.read() as conn:
                stored = await conn.execute(select(func.count()).select_from(fido_credential))
                status = (
                    await conn.execute(select(enrollment.c.status).where(enrollment.c.id == eid))
                ).scalar_one()
            assert (stored.scalar_one(), status) == (1, "used")
        finally:
            await db.close()

    asyncio.run(go())


@pytest.mark.parametrize("idle", ["used-just-now", "idle"])
def test_a_pooled_connection_the_database_closed(pg_databases: Databases, idle: str) -> None:
    """PostgreSQL closes the gateway's pooled connections (a restart, a failover, a firewall's
    idle time-out; here ``pg_terminate_backend``). A connection idle longer than the ping
    threshold is pinged and replaced before use: no request notices. One used within the
    threshold is not pinged (no ping round trips under load): its request gets 503
    ``database unavailable`` (not a 500), and SQLAlchemy's invalidation of the whole pool
    means that is the only one; the next writes succeed on new connections."""
    from sqlalchemy import text

    from gateway.errors import TemporarilyUnavailable

    url = pg_databases.fresh()
    # Wide apart, so that a slow machine cannot blur them: 30 s is "just now" for a psql run.
    threshold = 0.2 if idle == "idle" else 30.0

    async def write(db: Database) -> None:
        async with db.write() as conn:
            await conn.execute(text("SELECT pg_sleep(0.05)"))

    async def go() -> list[str]:
        db = Database(url, ping_after_idle_s=threshold)
        try:
            await asyncio.gather(*(write(db) for _ in range(3)))  # three pooled connections
            assert db.engine.sync_engine.pool.checkedin() == 3
            pg_databases.close_connections(url)
            if idle == "idle":
                await asyncio.sleep(threshold * 2)
            outcomes = []
            for _ in range(4):
                try:
                    await write(db)
                    outcomes.append("ok")
                except TemporarilyUnavailable as e:
                    assert e.description == "database unavailable"
                    outcomes.append("503")
            return outcomes
        finally:
            await db.close()

    outcomes = asyncio.run(go())
    if idle == "idle":
        assert outcomes == ["ok"] * 4
    else:
        assert outcomes == ["503", "ok", "ok", "ok"]


def test_postgresql_down_is_503_on_every_path_then_served_again() -> None:
    """With the PostgreSQL server stopped, every way into the store (``read``, ``write``,
    ``run_read``, ``run_write``, ``exclusive``) is 503 ``database unavailable`` with
    Retry-After 2, not a 500: asyncpg raises a refused connect as a plain OSError, which
    SQLAlchemy passes on unwrapped. Started again, the same ``Database`` serves at once."""
    from sqlalchemy import text

    from gateway.errors import TemporarilyUnavailable

    def one(conn: Connection) -> int:
        return int(conn.execute(text("SELECT 1")).scalar_one())

    async def read(db: Database) -> None:
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))

    async def write(db: Database) -> None:
        async with db.write() as conn:
            await conn.execute(text("SELECT 1"))

    async def exclusive(db: Database) -> None:
        async with db.exclusive("test") as got:
            assert got

    async def run_read(db: Database) -> None:
        assert await db.run_read(one) == 1

    async def run_write(db: Database) -> None:
        assert await db.run_write(one) == 1

    paths = [read, write, run_read, run_write, exclusive]

    async def each(db: Database) -> list[str]:
        out = []
        for path in paths:
            try:
                await path(db)
                out.append("ok")
            except TemporarilyUnavailable as e:
                assert (e.description, e.retry_after) == ("database unavailable", 2)
                out.append("503")
        return out

    async def go(url: str) -> None:
        db = Database(url)
        try:
            assert await each(db) == ["ok"] * len(paths)
            with stopped(url):  # blocks the loop while pg_ctl runs: nothing else is on it
                assert await each(db) == ["503"] * len(paths)
            assert await each(db) == ["ok"] * len(paths)
        finally:
            await db.close()

    with postgres_cluster() as url:
        asyncio.run(go(url))


def test_a_lock_held_elsewhere_on_postgresql_is_503_after_the_busy_time_out(
    pg_databases: Databases,
) -> None:
    """Another session holds the audit head's row lock (an administrator's open transaction, a
    stuck instance): an audit append waits ``busy_timeout_ms`` (PostgreSQL's ``lock_timeout``
    for the gateway's sessions), then gets 503 ``database unavailable``, as on SQLite, instead
    of hanging for as long as the lock is held; released, the next append goes through."""
    import time

    from sqlalchemy import text

    from gateway.audit import AuditRecord
    from gateway.errors import TemporarilyUnavailable

    url = pg_databases.fresh()
    record = AuditRecord(action="test.lock", actor="test", detail={}, now=datetime.now(UTC))

    async def go() -> tuple[float, str]:
        db = Database(url, busy_timeout_ms=300)
        other = Database(url)
        audit = AuditLog()
        try:
            async with other.write() as holder:
                await holder.execute(text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE"))
                started = time.monotonic()
                with pytest.raises(TemporarilyUnavailable, match="database unavailable"):
                    await db.run_write(lambda conn: audit.append_many_sync(conn, [record]))
                waited = time.monotonic() - started
            await db.run_write(lambda conn: audit.append_many_sync(conn, [record]))
            async with db.read() as conn:
                return waited, (await audit.verify(conn)).message
        finally:
            await db.close()
            await other.close()

    waited, message = asyncio.run(go())
    assert waited >= 0.3, waited  # it waited busy_timeout_ms before giving up
    assert message == "chain intact", message


def test_ending_sessions_locks_sads_in_id_order_on_postgresql(pg_url: str) -> None:
    """A facility's sessions ended (a policy change) lock their SADs in id order, as a consume
    group does, whatever order PostgreSQL scans them in. Before, the bulk UPDATE locked them in
    scan order: with S2 found first (expiring first, and last rewritten after S1 here) it held
    S2 while waiting for S1, which a group holding S1 and waiting for S2 made a deadlock (503).

    A third session holds S1; while the ending waits for it, S2 must still be free."""
    from sqlalchemy import text, update

    from gateway.signing.ledger import end_sessions
    from gateway.store.schema import sad

    async def go() -> tuple[str, int]:
        db = await _fresh(pg_url)
        holder, probe = Database(pg_url), Database(pg_url)
        try:
            fid, _ = await _signing_world(db, sads=2, hashes=[b"\x01" * 32])
            now = datetime.now(UTC)
            async with db.write() as conn:
                s1, s2 = sorted((await conn.execute(text("SELECT id FROM sad"))).scalars())
                await conn.execute(update(sad).values(scal="1"))
                await conn.execute(
                    update(sad).where(sad.c.id == s2).values(expires_at=now + timedelta(hours=1))
                )
                await conn.execute(
                    update(sad).where(sad.c.id == s1).values(expires_at=now + timedelta(hours=2))
                )
            async with holder.write() as h:
                await h.execute(text("SELECT id FROM sad WHERE id = :i FOR UPDATE"), {"i": s1})

                async def end() -> int:
                    async with db.write() as conn:
                        return await end_sessions(conn, fid, now=now)

                ending = asyncio.ensure_future(end())
                await lock_waiters(pg_url, 1)
                try:
                    async with probe.write() as p:
                        await p.execute(
                            text("SELECT id FROM sad WHERE id = :i FOR UPDATE NOWAIT"), {"i": s2}
                        )
                    s2_state = "free"
                except Exception as e:  # noqa: BLE001 - the lock error, whatever its wrapping
                    s2_state = f"locked ({type(e).__name__})"
            return s2_state, await ending
        finally:
            for d in (db, holder, probe):
                await d.close()

    s2_state, ended = asyncio.run(go())
    assert s2_state == "free", s2_state
    assert ended == 2


def test_a_card_unlinked_while_its_authorization_is_checked_gets_no_sad(pg_url: str) -> None:
    """PostgreSQL: the card's link is read, then its ``last_used_at`` written. An unlink that
    commits in between (here: a third session's DELETE, committed while the check's UPDATE
    waits for it) leaves the UPDATE with no row: refused. Before, the row count was not
    checked and the check passed, so a SAD was issued that the unlink, which ends the card's
    live SADs, never saw."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from sqlalchemy import insert, text

    from gateway.auth.challenges import Approval
    from gateway.auth.jpki import (
        CheckedCertificate,
        JpkiAuthenticator,
        JpkiAuthorization,
        spki_sha256,
    )
    from gateway.sandbox.jpki import issue_auth_cert, make_test_jpki_ca
    from gateway.signing.grant import Caller
    from gateway.store.schema import jpki_binding

    now = datetime.now(UTC)
    ca = make_test_jpki_ca(now=now)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_auth_cert(ca, key.public_key(), now=now)
    der = cert.public_bytes(serialization.Encoding.DER)

    async def go() -> object:
        db = await _fresh(pg_url)
        holder = Database(pg_url)
        try:
            fid, _ = await _signing_world(db, sads=0, hashes=[])
            async with db.write() as conn:
                await conn.execute(
                    insert(jpki_binding).values(
                        id="jb-1", signer_id="sgn-1", spki_sha256=spki_sha256(cert),
                        issuer=cert.issuer.rfc4514_string(), serial=f"{cert.serial_number:x}",
                        certificate_der=der, not_after=cert.not_valid_after_utc, created_at=now,
                    )
                )  # fmt: skip
            audit = AuditLog()
            card = JpkiAuthenticator(
                db=db, audit=audit, fido2=None, ledger=SadLedger(db=db, audit=audit),  # type: ignore[arg-type]
                trust_anchors=[ca.cert], revocation=None,  # type: ignore[arg-type]
            )  # fmt: skip
            approval = Approval(
                credential_id="cred-1",
                hashes=[hashlib.sha256(b"rx").digest()],
                hash_algorithm_oid="2.16.840.1.101.3.4.2.1",
                num_signatures=1,
            )
            caller = Caller(
                actor="facility:1310000011", facility_id=fid, institution_code="1310000011"
            )
            begun = await card.authenticate_begin(caller=caller, approval=approval)
            authorization = JpkiAuthorization(
                certificate=cert,
                certificate_der=der,
                signature=b"",
                challenge_id=begun["challenge_id"],
            )
            checked = CheckedCertificate(
                cert=cert, der=der, anchor=ca.cert, spki_sha256=spki_sha256(cert), revocation="good"
            )

            async def check() -> object:
                async with db.write() as conn:
                    return await card.verify(
                        conn, authorization, checked, facility_id=fid, credential_id="cred-1",
                        binding=approval.binding(), now=datetime.now(UTC),
                    )  # fmt: skip

            async with holder.write() as h:  # the unlink, committed while the check waits
                await h.execute(text("DELETE FROM jpki_binding WHERE id = 'jb-1'"))
                checking = asyncio.ensure_future(check())
                await lock_waiters(pg_url, 1)
            return (await asyncio.gather(checking, return_exceptions=True))[0]
        finally:
            await db.close()
            await holder.close()

    outcome = asyncio.run(go())
    assert isinstance(outcome, AccessDenied), outcome
    assert "not linked" in outcome.description


def test_a_session_opened_while_the_policy_changes_waits_for_the_change(pg_url: str) -> None:
    """PostgreSQL: ``authorize`` without hashes reads the facility's signing-session policy
    under a share lock. A policy change in progress (here: a third session's UPDATE, not yet
    committed) makes it wait, and it then reads the new policy: no session. Before, it read
    the old policy at once and opened a session that the change's end of sessions never saw."""
    from sqlalchemy import text

    from gateway.auth.activation import SignatureActivation, SigningSessionPolicy
    from gateway.errors import InvalidRequest

    async def go() -> tuple[bool, object]:
        db = await _fresh(pg_url)
        holder = Database(pg_url)
        try:
            fid, _ = await _signing_world(db, sads=0, hashes=[])
            audit = AuditLog()
            act = SignatureActivation(
                db=db, audit=audit, fido2=None, ledger=SadLedger(db=db, audit=audit),  # type: ignore[arg-type]
            )  # fmt: skip
            await act.set_session_policy(
                "1310000011",
                SigningSessionPolicy(enabled=True, max_signatures=10, hours=1),
                actor="officer",
            )

            async def level() -> object:
                async with db.write() as conn:
                    return await conn.run_sync(lambda c: act._level_sync(c, fid, [], None, 1))

            async with holder.write() as h:  # the officer's change, not yet committed
                await h.execute(text("UPDATE facility SET policy = '{}' WHERE id = :f"), {"f": fid})
                checking = asyncio.ensure_future(level())
                waited = False
                for _ in range(600):  # until it waits for the lock, or is done without waiting
                    if checking.done():
                        break
                    if await lock_waiting(pg_url) >= 1:
                        waited = True
                        break
                    await asyncio.sleep(0.05)
            return waited, (await asyncio.gather(checking, return_exceptions=True))[0]
        finally:
            await db.close()
            await holder.close()

    waited, outcome = asyncio.run(go())
    assert waited, outcome  # it waited for the change
    assert isinstance(outcome, InvalidRequest), outcome
    assert "no signing-session policy" in outcome.description


def test_enrolment_password_attempts_are_reserved_once_each_under_concurrency(url: str) -> None:
    """30 reservations of one enrolment code's password attempts at once, each in its own
    write transaction: exactly ``limit`` succeed on both stores (on PostgreSQL, READ
    COMMITTED re-checks ``failed + checking < limit`` on the row a blocked UPDATE gets)."""
    from sqlalchemy import select

    from gateway.auth.fido2 import _ATTEMPTS, _open_enrollment
    from gateway.store.schema import enrollment

    async def go() -> None:
        db = await _fresh(url)
        try:
            await _signing_world(db, sads=0, hashes=[])
            now = datetime.now(UTC)
            eid = await _active_enrollment(db, "d" * 64, now)

            async def reserve() -> bool:
                async with db.write() as conn:
                    return await _ATTEMPTS.reserve(conn, _open_enrollment(eid), 5)

            got = await asyncio.gather(*(reserve() for _ in range(30)))
            assert sum(got) == 5, got
            async with db.read() as conn:
                row = (await conn.execute(select(enrollment).where(enrollment.c.id == eid))).one()
            assert (row.failed_tries, row.checking_tries) == (0, 5)
        finally:
            await db.close()

    asyncio.run(go())


def test_two_enrolment_codes_issued_at_once_leave_one_active(url: str) -> None:
    """A new enrolment code revokes the signer's earlier unused ones: also when two are
    issued at once (two officers, or a repeated command), one of them stays active."""
    from sqlalchemy import func, select

    from gateway.audit import AuditLog
    from gateway.auth.fido2 import Fido2Authenticator
    from gateway.store.schema import enrollment

    async def go() -> None:
        db = await _fresh(url)
        try:
            await _signing_world(db, sads=0, hashes=[])
            fido2 = Fido2Authenticator(
                db=db, audit=AuditLog(), rp_id="localhost", rp_name="t",
                origins=frozenset({"https://localhost"}),
            )  # fmt: skip
            for _ in range(5):
                await asyncio.gather(
                    *(fido2.issue_enrollment("sgn-1", actor="officer") for _ in range(4))
                )
                async with db.read() as conn:
                    active = (
                        await conn.execute(
                            select(func.count())
                            .select_from(enrollment)
                            .where(
                                enrollment.c.signer_id == "sgn-1", enrollment.c.status == "active"
                            )
                        )
                    ).scalar_one()
                assert active == 1, active
        finally:
            await db.close()

    asyncio.run(go())


@pytest.mark.parametrize("method", ["signHash", "signDoc"])
def test_a_request_cancelled_while_its_spend_is_queued_is_refunded(url: str, method: str) -> None:
    """A signing request that goes away (client gone at shutdown, a cancelled task) while its
    spend waits in the group queue: the group commits the spend and its signature event anyway.
    Before, nobody refunded it: the SAD lost the count and the audit held a signature that was
    never made, with no failure after it. Now the count comes back once the group committed,
    with ``signature.failed`` ("request cancelled", refunded) after the event."""
    import json

    from sqlalchemy import select

    from gateway.sign import service
    from gateway.signing.core import DocumentJob, SigningService
    from gateway.signing.grant import Caller
    from gateway.store.schema import audit_event, sad

    h = bytes([9]) * 32

    async def go() -> tuple[list[tuple[str, str]], int]:
        db = await _fresh(url)
        audit = AuditLog()
        signing = SigningService(
            db=db,
            audit=audit,
            ledger=SadLedger(db=db, audit=audit),
            keystore=None,  # type: ignore[arg-type]  # never reached: cancelled before the key
            clock=system_clock,
            policy=service.SigningPolicy(),
            tsa=None,
        )
        try:
            fid, (token,) = await _signing_world(db, sads=1, hashes=[h])
            caller = Caller(actor="facility:1310000011", facility_id=fid, institution_code="1")
            if method == "signHash":
                work = signing.sign_hashes(
                    caller, sad=token, credential_id="cred-1", hashes=[h],
                    algorithm=DigestAlgorithm.SHA256, refused_detail={},
                )  # fmt: skip
            else:
                job = DocumentJob(
                    digest=h, signature_format="C", conformance_level="AdES-B-B",
                    envelope="Detached", document=None, document_digest=h,
                )  # fmt: skip
                work = signing.sign_documents(
                    caller, sad=token, credential_id="cred-1", jobs=[job], refused_detail={}
                )
            task = asyncio.ensure_future(work)
            for _ in range(3):  # queued: the group's drainer is scheduled, not yet run
                await asyncio.sleep(0)
                if signing.ledger._queue:
                    break
            assert signing.ledger._queue
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):  # the group commits, then the refund
                async with db.read() as conn:
                    events = (
                        await conn.execute(
                            select(audit_event.c.action, audit_event.c.detail).order_by(
                                audit_event.c.seq
                            )
                        )
                    ).all()
                    left = (await conn.execute(select(sad.c.remaining))).scalar_one()
                if events[-1][0] == "signature.failed":
                    break
                await asyncio.sleep(0.02)
            return [(str(a), str(d)) for a, d in events], int(left)
        finally:
            await db.close()

    events, left = asyncio.run(go())
    actions = [a for a, _ in events if a.startswith("signature.")]
    spend = "signature.sign_hash" if method == "signHash" else "signature.sign_doc"
    assert actions == [spend, "signature.failed"], events
    failed = json.loads(events[-1][1])
    assert (failed["reason"], failed["refunded"]) == ("request cancelled", True)
    assert left == 1


def test_audit_verify_ties_each_signature_to_an_issued_sad(url: str) -> None:
    """Someone who can write the database but not the HMAC key inserts a SAD row (or raises a
    SAD's count) and signs with it: the signature is audited, but before, nothing in the chain
    told it from an approved one (its event did not even name the SAD) and ``audit verify``
    passed. Each signature event now names its SAD, and verify replays the ledger from the
    chain: a spend of a SAD no ``sad.issue`` issued, or beyond its count, is
    ``unapproved_signature``; refunds (``signature.failed``) give the count back."""
    from sqlalchemy import update

    from gateway.signing.core import _hash_detail
    from gateway.signing.grant import Grant
    from gateway.store.schema import sad, sad_hash

    h1, h2 = bytes([5]) * 32, bytes([6]) * 32
    key = None  # _signing_world audits without a key

    def spend(token: str, fid: int, h: bytes) -> SignRequest:
        return SignRequest(
            sad=token, facility_id=fid, credential_id="cred-1", hashes=[h],
            algorithm=DigestAlgorithm.SHA256, now=datetime.now(UTC),
            actor="facility:1310000011", facility_code="1310000011",
            action="signature.sign_hash", detail=_hash_detail,
        )  # fmt: skip

    async def verify(db: Database) -> Any:
        async with db.read() as conn:
            return await AuditLog(key=key).verify(conn)

    async def go() -> list[Any]:
        db = await _fresh(url)
        audit = AuditLog(key=key)
        ledger = SadLedger(db=db, audit=audit)
        reports = []
        try:
            fid, (forged,) = await _signing_world(db, sads=1, hashes=[h2])  # no sad.issue
            grant = Grant(
                facility_id=fid, signer_id="sgn-1", credential_id="cred-1", hashes=(h1,),
                hash_algorithm=DigestAlgorithm.SHA256, count=1, scal="2", presence="fido2",
                presence_ref=None, ttl=timedelta(minutes=5),
            )  # fmt: skip
            async with db.write() as conn:
                issued = await ledger.issue(
                    conn, grant, actor="t", facility_code="1310000011", now=datetime.now(UTC)
                )
            spent = await ledger.consume_and_audit(spend(issued.token, fid, h1))
            async with db.write() as conn:  # what SigningService._write_refund does
                await ledger.refund(conn, sad=issued.token, grant=spent)
                await audit.append(
                    conn, action="signature.failed", actor="t",
                    detail={**_hash_detail(spent), "reason": "x", "refunded": True},
                )  # fmt: skip
            await ledger.consume_and_audit(spend(issued.token, fid, h1))
            reports.append(await verify(db))  # approved, refunded once, spent again: intact
            async with db.write() as conn:  # the insider gives the SAD its count back
                await conn.execute(update(sad).values(remaining=1))
                await conn.execute(update(sad_hash).values(remaining=1))
            await ledger.consume_and_audit(spend(issued.token, fid, h1))
            reports.append(await verify(db))
            await ledger.consume_and_audit(spend(forged, fid, h2))
            async with db.read() as conn:
                reports.append(await AuditLog(key=key).verify(conn, since=None))
        finally:
            await db.close()
        return reports

    intact, over, _ = asyncio.run(go())
    assert intact.ok, intact.message
    assert (over.ok, over.problem) == (False, "unapproved_signature"), over
    assert "beyond the number of signatures" in over.message


def test_audit_verify_finds_a_signature_of_a_sad_inserted_behind_the_gateway(url: str) -> None:
    """A SAD row written into the database (no ``sad.issue`` event, which needs the key) signs
    once: its audited signature names a SAD the chain never issued."""
    from gateway.signing.core import _hash_detail

    h = bytes([6]) * 32

    async def go() -> Any:
        db = await _fresh(url)
        ledger = SadLedger(db=db, audit=AuditLog())
        try:
            fid, (forged,) = await _signing_world(db, sads=1, hashes=[h])
            async with db.read() as conn:
                assert (await AuditLog().verify(conn)).ok
            await ledger.consume_and_audit(
                SignRequest(
                    sad=forged,
                    facility_id=fid,
                    credential_id="cred-1",
                    hashes=[h],
                    algorithm=DigestAlgorithm.SHA256,
                    now=datetime.now(UTC),
                    actor="facility:1310000011",
                    facility_code="1310000011",
                    action="signature.sign_hash",
                    detail=_hash_detail,
                )
            )
            async with db.read() as conn:
                return await AuditLog().verify(conn)
        finally:
            await db.close()

    r = asyncio.run(go())
    assert (r.ok, r.problem) == (False, "unapproved_signature"), r
    assert "which no sad.issue event issued" in r.message
