"""The pieces of the signing core that decide alone: the attempt limit and the granted key."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from sqlalchemy import and_, insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.hsm.api import DigestAlgorithm
from gateway.passwords import AttemptLimit
from gateway.signing.core import GrantedKey, OutsideGrant
from gateway.store.schema import enrollment
from tests.support.softkey import SoftwareKeyHandle

LIMIT = AttemptLimit(enrollment, failed="failed_tries", checking="checking_tries")


def test_lock_comes_after_exactly_n_wrong_passwords_while_the_right_one_is_checked() -> None:
    """The order that once locked a code after 4 wrong passwords: four wrong guesses and the
    right one hold reservations, the right one gives its slot back before the wrong ones are
    counted. Four recorded failures leave the code open; the fifth locks it."""

    async def go() -> tuple[list[tuple[int, bool]], bool, tuple[int, str, int]]:
        engine = create_async_engine("sqlite+aiosqlite://")
        try:
            async with engine.begin() as conn:
                await conn.run_sync(lambda c: enrollment.create(c))
                now = datetime.now(UTC)
                await conn.execute(
                    insert(enrollment).values(
                        id=1,
                        signer_id="s1",
                        code_hash="c",
                        password_hash="p",
                        failed_tries=0,
                        checking_tries=0,
                        status="active",
                        expires_at=now + timedelta(days=1),
                        created_at=now,
                    )
                )
                row = enrollment.c.id == 1
                open_row = and_(row, enrollment.c.status == "active")
                assert all([await LIMIT.reserve(conn, open_row, 5) for _ in range(5)])
                assert not await LIMIT.reserve(conn, open_row, 5)  # all five being checked
                assert await LIMIT.give_back(conn, open_row)  # the right password
                lock = {"status": "locked"}
                outcomes = [
                    await LIMIT.failed_check(conn, row, open_row, 5, lock) for _ in range(4)
                ]
                assert await LIMIT.reserve(conn, open_row, 5)  # one attempt left, and taken
                outcomes.append(await LIMIT.failed_check(conn, row, open_row, 5, lock))
                after = await LIMIT.reserve(conn, open_row, 5)
                final = (
                    await conn.execute(
                        select(
                            enrollment.c.failed_tries,
                            enrollment.c.status,
                            enrollment.c.checking_tries,
                        )
                    )
                ).one()
                return outcomes, after, (int(final[0]), str(final[1]), int(final[2]))
        finally:
            await engine.dispose()

    outcomes, reserved_after_lock, final = asyncio.run(go())
    assert outcomes == [(1, False), (2, False), (3, False), (4, False), (5, True)]
    assert not reserved_after_lock
    assert final == (5, "locked", 0)


@pytest.fixture(scope="module")
def key() -> SoftwareKeyHandle:
    return SoftwareKeyHandle(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def test_granted_key_signs_exactly_the_spent_digests(key: SoftwareKeyHandle) -> None:
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    alg = DigestAlgorithm.SHA256

    async def go() -> None:
        granted = GrantedKey(key, budget=3, digests=[a, a, b])
        with pytest.raises(OutsideGrant, match="outside"):
            await granted.sign_digest(hashlib.sha256(b"c").digest(), alg)
        with pytest.raises(OutsideGrant, match="outside"):
            await granted.sign_digests([b, b], alg)  # b only once
        signatures = await granted.sign_digests([a, b, a], alg)
        for d, s in zip([a, b, a], signatures, strict=True):
            key.key.public_key().verify(s, d, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        with pytest.raises(OutsideGrant):
            await granted.sign_digest(a, alg)  # all spent

    asyncio.run(go())


def test_granted_key_for_documents_counts_signatures(key: SoftwareKeyHandle) -> None:
    """signDoc: the format code signs digests it derives, at most one per spent document."""
    alg = DigestAlgorithm.SHA256

    async def go() -> None:
        granted = GrantedKey(key, budget=2)
        await granted.sign_digest(hashlib.sha256(b"signed attributes 1").digest(), alg)
        await granted.sign_digest(hashlib.sha256(b"signed attributes 2").digest(), alg)
        with pytest.raises(OutsideGrant, match="more signatures"):
            await granted.sign_digest(hashlib.sha256(b"a third").digest(), alg)

    asyncio.run(go())
