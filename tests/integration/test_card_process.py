"""CardProcessStore: the HPKI card's PC/SC connection in a child process, over real pcscd + vpcd.

The child runs ``CardKeyStore``, and test_hpki_card.py runs every card test against both stores
(PIN countdown and lock, wipe, pulled and replaced cards); the KeyStore contract runs against
both in test_keystore_contract.py, and the local agent and ``sign-batch`` tests use the card
process (the default). These tests check what the process boundary adds: a child that dies
ends the card session (every SAD with it) and the next open starts a new one; the child dies
with its parent; signatures in flight are answered in order; nothing secret in the logs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.card.errors import CardError, CardErrorCode
from gateway.errors import HsmUnavailable
from gateway.hsm.api import DigestAlgorithm
from gateway.hsm.card_process import CardProcessStore
from gateway.pki.issue import CertAndKey
from gateway.sandbox import testworld
from gateway.sandbox.hpki_cards import HpkiTestCard, make_hpki_card
from tests.support.pcsc import PcscWorld

PIN = "975310"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hpki_ca() -> CertAndKey:
    now = dt.datetime.now(dt.UTC)
    return testworld.make_hpki_signing_ca(testworld.make_hpki_root(now=now), now=now)


@pytest.fixture
def card(pcsc: PcscWorld, hpki_ca: CertAndKey) -> HpkiTestCard:
    inserted = make_hpki_card(hpki_ca, pin=PIN)
    pcsc.readers[0].insert(inserted.applet)
    yield inserted  # type: ignore[misc]
    pcsc.readers[0].remove()


def _verify(card: HpkiTestCard, digest: bytes, signature: bytes) -> None:
    pub = card.key.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie still answers kill(0): count it as gone
        return f.read().split(") ", 1)[1][0] != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


async def open_when_free(store: CardProcessStore, seconds: float = 10.0) -> None:
    """``store.open()``, retried while pcscd still holds the exclusive connection of a client
    that just died (it lets go when it notices the closed socket: asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await store.open()
            return
        except HsmUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_pipelined_signatures_come_back_in_order_and_verify(
    pcsc: PcscWorld, card: HpkiTestCard
) -> None:
    store = CardProcessStore(pcsc.readers[0].name)
    await store.open()
    try:
        await store.unlock(bytearray(PIN.encode()))
        assert store.key_id is not None
        digests = [hashlib.sha256(str(i).encode()).digest() for i in range(60)]
        # 60 calls in flight at once, one signature each: answered in order, each its own.
        results = await asyncio.gather(
            *(store.sign_digests(store.key_id, [d], DigestAlgorithm.SHA256) for d in digests)
        )
        for d, (signature,) in zip(digests, results, strict=True):
            _verify(card, d, signature)
        assert card.applet.signatures == 60
        assert store.queue_depth == 0
    finally:
        await store.close()
    assert store.child_pid is None


async def test_a_killed_card_process_ends_the_session_and_open_starts_a_new_one(
    pcsc: PcscWorld, card: HpkiTestCard, caplog: pytest.LogCaptureFixture
) -> None:
    store = CardProcessStore(pcsc.readers[0].name, reconnect_interval=0.2)
    await store.open()
    try:
        await store.unlock(bytearray(PIN.encode()))
        key_id = store.key_id
        assert key_id is not None and store.connected
        generation = store.generation
        pid = store.child_pid
        assert pid is not None
        digest = hashlib.sha256(b"before the kill").digest()
        pending = [
            asyncio.ensure_future(store.sign_digests(key_id, [digest], DigestAlgorithm.SHA256))
            for _ in range(200)
        ]
        await asyncio.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert failed and all(isinstance(o, HsmUnavailable) for o in failed)
        assert "the card process is not running" in str(failed[0])
        for o in outcomes:
            if not isinstance(o, BaseException):
                _verify(card, digest, o[0])
        # The session ended with the process: SADs bound to it are dead.
        assert store.generation == generation + 1
        assert not store.connected
        assert "HPKI card process" in caplog.text and "exited" in caplog.text
        assert await asyncio.to_thread(gone_within, pid, 5.0)
        # open() starts a new process; the card wants its PIN again (pcscd reset the card
        # when it dropped the dead process's connection).
        await open_when_free(store)
        assert store.connected and store.key_id == key_id
        assert store.child_pid not in (None, pid)
        with pytest.raises(CardError) as info:
            await store.sign_digests(key_id, [digest], DigestAlgorithm.SHA256)
        assert info.value.code is CardErrorCode.CARD_ERROR, info.value
        await store.unlock(bytearray(PIN.encode()))
        (after,) = await store.sign_digests(key_id, [digest], DigestAlgorithm.SHA256)
        _verify(card, digest, after)
    finally:
        await store.close()


async def test_wrong_pin_crosses_with_tries_left_and_no_pin_in_the_logs(
    pcsc: PcscWorld, card: HpkiTestCard, caplog: pytest.LogCaptureFixture
) -> None:
    store = CardProcessStore(pcsc.readers[0].name)
    await store.open()
    try:
        wrong = bytearray(b"864200")
        with pytest.raises(CardError) as info:
            await store.unlock(wrong)
        assert info.value.code is CardErrorCode.WRONG_PIN and info.value.tries_left == 14
        assert wrong == bytearray(6)  # wiped once sent
        right = bytearray(PIN.encode())
        await store.unlock(right)
        assert right == bytearray(len(PIN))
        assert await store.pin_tries_left() == 15
    finally:
        await store.close()
    assert PIN not in caplog.text and "864200" not in caplog.text


def test_the_card_process_dies_with_its_parent(pcsc: PcscWorld, card: HpkiTestCard) -> None:
    """SIGKILL of the process that started it (the agent, a batch): the card process goes too
    (pipe EOF / PR_SET_PDEATHSIG), and with it the card's exclusive connection."""
    script = f"""
import asyncio, os, signal
from gateway.hsm.card_process import CardProcessStore

async def main():
    store = CardProcessStore({pcsc.readers[0].name!r})
    await store.open()
    print(store.child_pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=pcsc.env(),
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    pid = int(result.stdout.split()[0])
    assert gone_within(pid, 5.0)


async def test_the_card_is_free_again_after_the_parent_died(
    pcsc: PcscWorld, card: HpkiTestCard
) -> None:
    """The exclusive connection died with the killed child: a new store opens the card."""
    test_the_card_process_dies_with_its_parent(pcsc, card)
    store = CardProcessStore(pcsc.readers[0].name)
    await open_when_free(store)
    try:
        await store.unlock(bytearray(PIN.encode()))
        assert store.key_id is not None
        digest = hashlib.sha256(b"after").digest()
        (signature,) = await store.sign_digests(store.key_id, [digest], DigestAlgorithm.SHA256)
        _verify(card, digest, signature)
    finally:
        await store.close()
