"""SignerProcessKeyStore: the PKCS#11 session in a child process, against a real SoftHSM2 token.

The child runs ``Pkcs11KeyStore``, whose own behaviour ``test_hsm.py`` covers in depth, and the
KeyStore contract runs against both stores in ``test_keystore_contract.py``; these tests check
what the process boundary adds: the same results, errors, texts and log lines on the
worker side, a child that dies with its worker, and a new child when it dies.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.errors import HsmUnavailable
from gateway.hsm.api import DigestAlgorithm, GeneratedKey
from gateway.hsm.signer_process import SignerProcessKeyStore
from tests.support.softhsm import SOFTHSM_MODULE, SoftHsmToken, failed_connects, process_token

pytestmark = pytest.mark.hsm

LABEL = "hpki-test-hsm"
RETRY_AFTER = 3
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    return process_token(tmp_path_factory, LABEL)


def make_store(token: SoftHsmToken, **kw: object) -> SignerProcessKeyStore:
    options: dict[str, object] = {
        "module_path": SOFTHSM_MODULE,
        "token_label": token.label,
        "pin": token.pin,
        "softhsm_conf": token.conf,
        "retry_after": RETRY_AFTER,
        "reconnect_interval": 0.2,
    } | kw
    return SignerProcessKeyStore(**options)  # type: ignore[arg-type]


@pytest.fixture
async def store(token: SoftHsmToken) -> AsyncIterator[SignerProcessKeyStore]:
    ks = make_store(token)
    await ks.open()
    yield ks
    await ks.close()


@pytest.fixture
async def generated(store: SignerProcessKeyStore) -> GeneratedKey:
    return await store.generate_rsa_key(label="test-signing-process-key")


def verify(der: bytes, signature: bytes, digest: bytes, algorithm: DigestAlgorithm) -> None:
    key = serialization.load_der_public_key(der)
    assert isinstance(key, rsa.RSAPublicKey)
    alg = {"SHA256": hashes.SHA256(), "SHA384": hashes.SHA384(), "SHA512": hashes.SHA512()}
    key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(alg[algorithm.name]))


def outside_tokendir(token: SoftHsmToken) -> Path:
    return token.token_dir.parent.parent / f"{token.token_dir.name}.away"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): count it as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


async def test_token_outage_and_recovery(
    store: SignerProcessKeyStore,
    generated: GeneratedKey,
    token: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.hsm")
    handle = await store.get_key(generated.key_id)
    digest = hashlib.sha256(b"outage").digest()
    await handle.sign_digest(digest, DigestAlgorithm.SHA256)
    away = outside_tokendir(token)
    token.token_dir.rename(away)
    try:
        with pytest.raises(HsmUnavailable) as info:
            await handle.sign_digest(digest, DigestAlgorithm.SHA256)
        assert info.value.retry_after == RETRY_AFTER
        assert info.value.headers == {"Retry-After": str(RETRY_AFTER)}
        assert info.value.description == "HSM token unavailable"
        with pytest.raises(HsmUnavailable):
            await store.check()
        with pytest.raises(HsmUnavailable):
            await store.get_key(generated.key_id)  # not KeyNotFound: the token is gone
        attempts = failed_connects(caplog.records, token.label)
        await asyncio.sleep(0.25)  # past reconnect_interval: a real attempt (in the child)
        with pytest.raises(HsmUnavailable):
            await store.check()
        assert failed_connects(caplog.records, token.label) == attempts + 1, caplog.text
    finally:
        away.rename(token.token_dir)
    deadline = time.perf_counter() + 5
    while True:
        try:
            signature = await handle.sign_digest(digest, DigestAlgorithm.SHA256)
            break
        except HsmUnavailable:
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.05)
    verify(generated.public_key_der, signature, digest, DigestAlgorithm.SHA256)
    # The child's log lines reach the worker's loggers.
    assert "HSM token 'hpki-test-hsm' unavailable" in caplog.text
    assert "reconnected to HSM token" in caplog.text
    assert token.pin not in caplog.text


async def test_a_dead_signing_process_is_replaced(
    store: SignerProcessKeyStore, generated: GeneratedKey, caplog: pytest.LogCaptureFixture
) -> None:
    digest = hashlib.sha256(b"restart").digest()
    (before,) = await store.sign_digests(generated.key_id, [digest], DigestAlgorithm.SHA256)
    pid = store.child_pid
    assert pid is not None
    pending = asyncio.ensure_future(
        store.sign_digests(generated.key_id, [digest] * 2000, DigestAlgorithm.SHA256)
    )
    await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(HsmUnavailable, match="HSM token unavailable"):
        await pending
    assert "HSM signing process" in caplog.text
    deadline = time.perf_counter() + 5
    while True:
        try:
            (after,) = await store.sign_digests(generated.key_id, [digest], DigestAlgorithm.SHA256)
            break
        except HsmUnavailable:  # within reconnect_interval of the previous start
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert after == before
    assert store.child_pid not in (None, pid)
    assert not alive(pid)


def test_the_signing_process_dies_with_its_worker(token: SoftHsmToken) -> None:
    """SIGKILL of the worker: its child goes too (pipe EOF / PR_SET_PDEATHSIG); and the worker
    itself never loaded the PKCS#11 module."""
    script = f"""
import asyncio, hashlib, os, signal
from pathlib import Path
from gateway.hsm.api import DigestAlgorithm
from gateway.hsm.signer_process import SignerProcessKeyStore

async def main():
    ks = SignerProcessKeyStore(module_path={SOFTHSM_MODULE!r}, token_label={token.label!r},
                               pin={token.pin!r}, softhsm_conf=Path({str(token.conf)!r}))
    await ks.open()
    key = await ks.generate_rsa_key(label="orphan-check")
    await ks.sign_digests(key.key_id, [hashlib.sha256(b"x").digest()], DigestAlgorithm.SHA256)
    with open("/proc/self/maps") as f:
        loaded = "softhsm" in f.read()
    print(ks.child_pid, loaded, flush=True)
    await ks.destroy_key(key.key_id)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    pid_text, loaded = result.stdout.split()
    assert loaded == "False"
    pid = int(pid_text)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_wrong_pin_is_reported_without_the_pin(token: SoftHsmToken) -> None:
    script = f"""
import asyncio, logging, sys
from pathlib import Path
from gateway.errors import HsmUnavailable
from gateway.hsm.signer_process import SignerProcessKeyStore
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
ks = SignerProcessKeyStore(module_path={SOFTHSM_MODULE!r}, token_label={token.label!r},
                           pin="99999999", softhsm_conf=Path({str(token.conf)!r}), retry_after=7)
try:
    asyncio.run(ks.open())
except HsmUnavailable as e:
    print("unavailable", e.retry_after, e.description)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    assert result.stdout.strip() == "unavailable 7 HSM token unavailable"
    assert "refused the PIN" in result.stderr
    assert "99999999" not in result.stderr
