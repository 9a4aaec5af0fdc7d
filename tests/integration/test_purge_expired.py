"""The scheduler purges expired SADs and WebAuthn challenges after a retention period.

Real store (SQLite, migrated), real scheduler, an injected clock (FakeClock). Rows are written
with the store's own tables; the audit chain is checked after the purge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from gateway.audit import AuditLog
from gateway.store.db import Database
from gateway.store.schema import (
    audit_event,
    credential,
    facility,
    sad,
    sad_hash,
    signer,
    webauthn_challenge,
)
from tests.support.lifecycle import FakeClock, make_settings, services

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def _seed(db: Database, audit: AuditLog) -> None:
    async with db.write() as conn:
        fid = (
            await conn.execute(
                insert(facility).values(
                    institution_code="0110000001",
                    name="TEST 医院",
                    kind="hospital",
                    provisional=False,
                    status="active",
                    policy="{}",
                    created_at=T0,
                )
            )
        ).inserted_primary_key[0]  # type: ignore[index]
        await conn.execute(
            insert(signer).values(
                id="sgn-purge", name="Purge Taro", role="Medical Doctor", created_at=T0
            )
        )
        await conn.execute(
            insert(credential).values(
                id="cred-purge",
                signer_id="sgn-purge",
                key_id="k-purge",
                key_bits=2048,
                status="active",
                created_at=T0,
                updated_at=T0,
            )
        )
        # name -> expires_at relative to T0
        for name, expires in {
            "old": T0 - timedelta(hours=30),  # expired 30 h before T0
            "recent": T0 - timedelta(hours=2),  # expired, but within the retention
            "live": T0 + timedelta(hours=10),  # a signing session still running
        }.items():
            sid = (
                await conn.execute(
                    insert(sad).values(
                        token_hash=secrets.token_hex(32),
                        facility_id=fid,
                        signer_id="sgn-purge",
                        credential_id="cred-purge",
                        hash_algorithm="2.16.840.1.101.3.4.2.1",
                        scal="2",
                        num_signatures=1,
                        remaining=1,
                        created_at=expires - timedelta(minutes=5),
                        expires_at=expires,
                    )
                )
            ).inserted_primary_key[0]  # type: ignore[index]
            await conn.execute(
                insert(sad_hash).values(
                    sad_id=sid, hash=name.encode().ljust(32, b"\0"), authorized=1, remaining=1
                )
            )
            await conn.execute(
                insert(webauthn_challenge).values(
                    id=f"challenge-{name}",
                    kind="authenticate",
                    signer_id="sgn-purge",
                    facility_id=fid,
                    binding="{}",
                    created_at=expires - timedelta(minutes=2),
                    expires_at=expires,
                )
            )
            await audit.append(
                conn,
                action="signature.authorize",
                actor="facility:0110000001",
                signer_id="sgn-purge",
                detail={"sad": int(sid), "name": name},
                now=expires - timedelta(minutes=5),
            )


async def _left(db: Database) -> tuple[set[str], set[str], int, int]:
    async with db.read() as conn:
        challenges = set((await conn.execute(select(webauthn_challenge.c.id))).scalars())
        sads = {
            r.hash.rstrip(b"\0").decode()
            for r in (await conn.execute(select(sad_hash.c.hash))).all()
        }
        n_sad = (await conn.execute(select(func.count()).select_from(sad))).scalar_one()
        n_audit = (await conn.execute(select(func.count()).select_from(audit_event))).scalar_one()
    return challenges, sads, int(n_sad), int(n_audit)


async def test_expired_rows_are_purged_after_the_retention(tmp_path: Path, store_url: str) -> None:
    settings = make_settings(
        tmp_path, store_url=store_url
    )  # activation.purge_after_hours = 24 (default)
    assert settings.activation.purge_after_hours == 24
    clock = FakeClock(T0)
    async with services(settings, clock) as svc:
        await _seed(svc.db, svc.certs.audit)
        _, _, _, audited = await _left(svc.db)
        report = await svc.scheduler.run_once()
        assert report.purged == {"sads": 1, "challenges": 1}
        challenges, hashes, n_sad, n_audit = await _left(svc.db)
        assert challenges == {"challenge-recent", "challenge-live"}
        assert hashes == {"recent", "live"}
        assert n_sad == 2
        # The issuance records stay; the purge itself is recorded once.
        assert n_audit == audited + 1
        async with svc.db.read() as conn:
            assert (await svc.certs.audit.verify(conn)).ok
            purge = (
                await conn.execute(
                    select(audit_event.c.detail).where(
                        audit_event.c.action == "maintenance.purge_expired"
                    )
                )
            ).scalar_one()
        assert json.loads(purge) == {
            "sads": 1,
            "challenges": 1,
            "expired_before": (T0 - timedelta(hours=24)).isoformat(),
        }

        # Again at the same time: nothing to do, nothing audited.
        assert (await svc.scheduler.run_once()).purged == {"sads": 0, "challenges": 0}
        assert (await _left(svc.db))[3] == n_audit

        # 23 h later "recent" (expired 25 h before) goes; the live session (expires T0 + 10 h,
        # i.e. only 13 h ago by then) stays.
        clock.advance(hours=23)
        assert (await svc.scheduler.run_once()).purged == {"sads": 1, "challenges": 1}
        challenges, hashes, n_sad, _ = await _left(svc.db)
        assert (challenges, hashes, n_sad) == ({"challenge-live"}, {"live"}, 1)


async def test_a_live_sad_is_never_purged_even_with_the_shortest_retention(
    tmp_path: Path, store_url: str
) -> None:
    settings = make_settings(
        tmp_path, store_url=store_url, extra="[activation]\npurge_after_hours = 1\n"
    )
    clock = FakeClock(T0 + timedelta(hours=9, minutes=59))  # "live" expires at T0 + 10 h
    async with services(settings, clock) as svc:
        await _seed(svc.db, svc.certs.audit)
        await svc.scheduler.run_once()
        assert (await _left(svc.db))[1] == {"live"}
        clock.set(T0 + timedelta(hours=10, minutes=59))  # expired 59 min ago: kept
        await svc.scheduler.run_once()
        assert (await _left(svc.db))[1] == {"live"}
        clock.set(T0 + timedelta(hours=11, minutes=1))
        await svc.scheduler.run_once()
        assert (await _left(svc.db))[1] == set()


async def test_several_schedulers_purge_once(tmp_path: Path, store_url: str) -> None:
    settings = make_settings(tmp_path, store_url=store_url)
    clock = FakeClock(T0 + timedelta(days=3))
    async with services(settings, clock) as svc:
        await _seed(svc.db, svc.certs.audit)
    # Four "workers" (each its own engine over the same store), all at once.
    runners = [services(settings, clock) for _ in range(4)]
    entered = [await r.__aenter__() for r in runners]
    try:
        reports = await asyncio.gather(*(s.scheduler.purge_expired() for s in entered))
    finally:
        for r in runners:
            await r.__aexit__(None, None, None)
    assert sum(r["sads"] for r in reports) == 3
    assert sum(r["challenges"] for r in reports) == 3
    async with services(settings, clock) as svc:
        challenges, hashes, n_sad, _ = await _left(svc.db)
        assert (challenges, hashes, n_sad) == (set(), set(), 0)
        async with svc.db.read() as conn:
            assert (await svc.certs.audit.verify(conn)).ok
            n_purges = (
                await conn.execute(
                    select(func.count())
                    .select_from(audit_event)
                    .where(audit_event.c.action == "maintenance.purge_expired")
                )
            ).scalar_one()
        assert 1 <= n_purges <= 4


async def test_a_store_locked_past_the_busy_timeout_is_one_warning_and_the_next_round_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the SQLite write lock through a scheduler round: the round fails
    with one warning line naming the cause (no stack trace: an operating condition, which the
    fault tests check no log shows), and the next round, the lock gone, runs."""
    settings = make_settings(tmp_path)
    outcomes: list[str] = []
    stop = asyncio.Event()
    async with services(settings, FakeClock(T0), busy_timeout_ms=100) as svc:
        holder = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")

        def on_run(outcome: str) -> None:
            outcomes.append(outcome)
            if len(outcomes) == 1:
                holder.execute("ROLLBACK")
            else:
                stop.set()

        try:
            with caplog.at_level(logging.WARNING, logger="gateway.scheduler"):
                await asyncio.wait_for(svc.scheduler.loop(0.05, stop, on_run), 30)
        finally:
            holder.close()
    assert outcomes == ["failed", "ok"]
    lines = [r for r in caplog.records if r.name == "gateway.scheduler"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "database unavailable (cause: OperationalError)" in lines[0].getMessage()
    assert lines[0].exc_info is None
