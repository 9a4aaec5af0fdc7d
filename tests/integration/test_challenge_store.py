"""The one challenge store of every presence method, on a real migrated SQLite store.

FIDO2 (``webauthn_challenge``) and My Number card (``jpki_challenge``) challenges are stored,
taken once, burnt and purged by the same code; each table keeps its own answer for an unknown
challenge (the texts the API documents).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from gateway.auth.challenges import (
    JPKI_CHALLENGES,
    NONCE_BYTES,
    WEBAUTHN_CHALLENGES,
    ChallengeStore,
    approves,
    canonical_binding,
    challenge_id,
    new_bound_challenge,
    purge_expired,
)
from gateway.errors import InvalidRequest
from gateway.store.db import Database
from gateway.store.schema import facility, jpki_challenge, signer

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=120)
STORES = {"webauthn": WEBAUTHN_CHALLENGES, "jpki": JPKI_CHALLENGES}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    async def open_() -> Database:
        store = Database(f"sqlite+aiosqlite:///{tmp_path / 'challenges.db'}")
        await store.migrate()
        async with store.write() as conn:
            await conn.execute(
                insert(facility).values(
                    id=1,
                    institution_code="0110000001",
                    name="TEST 医院",
                    kind="hospital",
                    provisional=False,
                    status="active",
                    policy="{}",
                    created_at=T0,
                )
            )
            await conn.execute(
                insert(signer).values(
                    id="sgn-c", name="Challenge Taro", role="Medical Doctor", created_at=T0
                )
            )
        return store

    store = asyncio.run(open_())
    yield store
    asyncio.run(store.close())


def _binding(hashes: list[bytes]) -> bytes:
    return canonical_binding(
        credential_id="cred-c",
        hash_algorithm_oid="2.16.840.1.101.3.4.2.1",
        hashes=hashes,
        num_signatures=len(hashes),
    )


async def _put(
    db: Database, store: ChallengeStore, *, now: datetime = T0, fido2_state: bool = True
) -> tuple[str, bytes]:
    binding = _binding([b"\x01" * 32])
    challenge = new_bound_challenge(binding)
    webauthn = store is WEBAUTHN_CHALLENGES and fido2_state
    extra = {"fido2_state": json.dumps({"challenge": "x"})} if webauthn else {}
    async with db.write() as conn:
        cid = await store.put(
            conn,
            challenge,
            kind="authenticate",
            signer_id="sgn-c",
            facility_id=1,
            binding=binding,
            now=now,
            ttl=TTL,
            credential_id="cred-c",
            **extra,
        )
    return cid, challenge


async def _take(db: Database, store: ChallengeStore, cid: str, *, kind: str, now: datetime) -> str:
    try:
        async with db.write() as conn:
            row = await store.take(conn, cid, kind=kind, now=now)
            return f"taken {row.signer_id}"
    except InvalidRequest as e:
        return e.description


@pytest.mark.parametrize("method", sorted(STORES))
def test_a_challenge_is_taken_once(db: Database, method: str) -> None:
    store = STORES[method]

    async def go() -> list[str]:
        cid, challenge = await _put(db, store)
        assert cid == challenge_id(challenge)
        async with db.read() as conn:
            row = await store.peek(conn, cid, kind="authenticate", now=T0)
            assert json.loads(row.binding)["credentialID"] == "cred-c"
            assert row.expires_at == T0 + TTL
        later = T0 + timedelta(seconds=5)
        first = await _take(db, store, cid, kind="authenticate", now=later)
        second = await _take(db, store, cid, kind="authenticate", now=later)
        return [first, second]

    assert asyncio.run(go()) == ["taken sgn-c", "challenge was already used"]


@pytest.mark.parametrize("method", sorted(STORES))
def test_concurrent_takes_one_wins(db: Database, method: str) -> None:
    store = STORES[method]

    async def go() -> list[str]:
        cid, _ = await _put(db, store)
        return list(
            await asyncio.gather(
                *(_take(db, store, cid, kind="authenticate", now=T0) for _ in range(4))
            )
        )

    outcomes = asyncio.run(go())
    assert sorted(outcomes) == ["challenge was already used"] * 3 + ["taken sgn-c"]


@pytest.mark.parametrize("method", sorted(STORES))
def test_expired_unknown_and_other_kind_are_refused(db: Database, method: str) -> None:
    store = STORES[method]

    async def go() -> list[str]:
        cid, _ = await _put(db, store)
        return [
            await _take(db, store, cid, kind="authenticate", now=T0 + TTL),
            await _take(db, store, cid, kind="register", now=T0),
            await _take(db, store, "0" * 64, kind="authenticate", now=T0),
        ]

    expired, other_kind, unknown = asyncio.run(go())
    assert expired == "challenge expired"
    assert other_kind == unknown == store.unknown
    assert (
        unknown
        == {
            "webauthn": "unknown challenge: call begin first",
            "jpki": "unknown challenge_id: call begin first",
        }[method]
    )


def test_a_webauthn_challenge_without_python_fido2_state_is_unknown(db: Database) -> None:
    async def go() -> str:
        cid, _ = await _put(db, WEBAUTHN_CHALLENGES, fido2_state=False)
        return await _take(db, WEBAUTHN_CHALLENGES, cid, kind="authenticate", now=T0)

    assert asyncio.run(go()) == "unknown challenge: call begin first"


def test_the_card_challenge_bytes_are_kept(db: Database) -> None:
    # The card signs the challenge bytes: they are stored with the card's challenge only.
    async def go() -> bytes:
        cid, challenge = await _put(db, JPKI_CHALLENGES)
        async with db.read() as conn:
            stored = (
                await conn.execute(
                    select(jpki_challenge.c.challenge).where(jpki_challenge.c.id == cid)
                )
            ).scalar_one()
        assert bytes(stored) == challenge
        return challenge

    assert len(asyncio.run(go())) == NONCE_BYTES + 32


@pytest.mark.parametrize("method", sorted(STORES))
def test_a_burnt_challenge_cannot_be_taken(db: Database, method: str) -> None:
    store = STORES[method]

    async def go() -> str:
        cid, _ = await _put(db, store)
        async with db.write() as conn:
            await store.burn(conn, cid, now=T0)
        return await _take(db, store, cid, kind="authenticate", now=T0)

    assert asyncio.run(go()) == "challenge was already used"


def test_purge_deletes_only_what_expired_before_the_cutoff(db: Database) -> None:
    async def go() -> tuple[int, int, list[str]]:
        old = [await _put(db, s, now=T0 - timedelta(hours=30)) for s in STORES.values()]
        new = [await _put(db, s, now=T0) for s in STORES.values()]
        async with db.write() as conn:
            purged = await purge_expired(conn, before=T0 - timedelta(hours=24))
        async with db.write() as conn:
            again = await purge_expired(conn, before=T0 - timedelta(hours=24))
        left = []
        for store, (cid, _) in zip([*STORES.values(), *STORES.values()], old + new, strict=True):
            async with db.read() as conn:
                if await store.find(conn, cid) is not None:
                    left.append(cid)
        assert left == [cid for cid, _ in new]
        return purged, again, left

    purged, again, left = asyncio.run(go())
    assert (purged, again, len(left)) == (2, 0, 2)


def test_a_challenge_approves_only_its_binding() -> None:
    binding = _binding([b"\x01" * 32, b"\x02" * 32])
    challenge = new_bound_challenge(binding)
    assert approves(challenge, binding)
    # The hashes in another order are the same binding (sorted); other hashes are not.
    assert approves(challenge, _binding([b"\x02" * 32, b"\x01" * 32]))
    assert not approves(challenge, _binding([b"\x01" * 32]))
    assert not approves(challenge[:-1], binding)
    assert not approves(challenge + b"\x00", binding)
