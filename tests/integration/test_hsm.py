"""Pkcs11KeyStore against a real SoftHSM2 token: what only the in-process store does (its
PKCS#11 thread, outages and reconnects, raw attacks on the key). The KeyStore contract itself is
tests/integration/test_keystore_contract.py, run against every store.

The whole pytest process shares ONE SoftHSM configuration (python-pkcs11 loads the module once
per process, and SoftHSM reads SOFTHSM2_CONF only at C_Initialize): the token comes from
``tests.support.softhsm.process_token``, under ``$HPKI_TEST_SOFTHSM_DIR`` when set, and
SOFTHSM2_CONF stays set for the rest of the run on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11x

from gateway.errors import ConfigError, HsmUnavailable
from gateway.hsm.api import DigestAlgorithm, GeneratedKey
from gateway.hsm.pkcs11 import Pkcs11KeyStore
from tests.support.softhsm import (
    SOFTHSM_MODULE,
    SoftHsmToken,
    failed_connects,
    make_token,
    process_token,
)

pytestmark = pytest.mark.hsm

T = TypeVar("T")
LABEL = "hpki-test-hsm"
RETRY_AFTER = 3
HASHES = {
    DigestAlgorithm.SHA256: hashes.SHA256(),
    DigestAlgorithm.SHA384: hashes.SHA384(),
    DigestAlgorithm.SHA512: hashes.SHA512(),
}


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    return process_token(tmp_path_factory, LABEL)


@pytest.fixture(scope="module")
def store(token: SoftHsmToken) -> Iterator[Pkcs11KeyStore]:
    # Module-scoped although the event loops are per test: the store binds to no loop (all
    # PKCS#11 work happens on its executor thread), so one store can serve every test.
    ks = Pkcs11KeyStore(
        module_path=SOFTHSM_MODULE,
        token_label=token.label,
        pin=token.pin,
        softhsm_conf=token.conf,
        retry_after=RETRY_AFTER,
        reconnect_interval=0.2,
    )
    asyncio.run(ks.open())
    yield ks
    asyncio.run(ks.close())


@pytest.fixture(scope="module")
def generated(store: Pkcs11KeyStore) -> GeneratedKey:
    return asyncio.run(store.generate_rsa_key(label="test-signing-key"))


def public_key(der: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(der)
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def verify(der: bytes, signature: bytes, digest: bytes, algorithm: DigestAlgorithm) -> None:
    alg = HASHES[algorithm]
    public_key(der).verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(alg))


def outside_tokendir(token: SoftHsmToken) -> Path:
    # Out of the token directory altogether: SoftHSM would adopt a renamed sibling as a token.
    return token.token_dir.parent.parent / f"{token.token_dir.name}.away"


async def on_pkcs11_thread(store: Pkcs11KeyStore, fn: Callable[[Any], T]) -> T:
    """Run raw python-pkcs11 code the only safe way: on the store's thread, on its session."""
    return await store._run(lambda: fn(store._ensure_session()))


async def test_generated_key_is_sensitive_and_never_extractable(
    store: Pkcs11KeyStore, generated: GeneratedKey
) -> None:
    assert len(bytes.fromhex(generated.key_id)) == 16
    assert generated.key_size == 2048
    assert public_key(generated.public_key_der).key_size == 2048
    assert await store.public_key_der(generated.key_id) == generated.public_key_der

    attrs = await store.key_attributes(generated.key_id)
    assert attrs == {
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "NEVER_EXTRACTABLE": True,
        "ALWAYS_SENSITIVE": True,
    }

    def try_to_extract(session: Any) -> dict[str, str]:
        key = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(generated.key_id)
        )
        outcome: dict[str, str] = {}
        for attr in (Attribute.VALUE, Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1):
            try:
                key[attr]
                outcome[attr.name] = "READ"
            except p11x.PKCS11Error as e:
                outcome[attr.name] = type(e).__name__
        for name, change in (
            ("make_extractable", lambda: key.__setitem__(Attribute.EXTRACTABLE, True)),
            ("make_insensitive", lambda: key.__setitem__(Attribute.SENSITIVE, False)),
            ("copy_extractable", lambda: key.copy({Attribute.EXTRACTABLE: True})),
        ):
            try:
                change()
                outcome[name] = "ALLOWED"
            except p11x.PKCS11Error as e:
                outcome[name] = type(e).__name__
        return outcome

    outcome = await on_pkcs11_thread(store, try_to_extract)
    assert "READ" not in outcome.values(), outcome
    assert "ALLOWED" not in outcome.values(), outcome
    assert outcome["PRIVATE_EXPONENT"] == "AttributeSensitive"


async def test_200_concurrent_signatures(store: Pkcs11KeyStore, generated: GeneratedKey) -> None:
    handle = await store.get_key(generated.key_id)
    digests = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(200)]
    started = time.perf_counter()
    signatures = await asyncio.gather(
        *(handle.sign_digest(d, DigestAlgorithm.SHA256) for d in digests)
    )
    elapsed = time.perf_counter() - started
    for digest, signature in zip(digests, signatures, strict=True):
        verify(generated.public_key_der, signature, digest, DigestAlgorithm.SHA256)
    thread_name = await store._run(lambda: threading.current_thread().name)
    assert thread_name.startswith("pkcs11")
    print(f"200 concurrent sign_digest: {elapsed * 1000:.0f} ms ({200 / elapsed:.0f}/s)")


async def test_token_outage_and_recovery_with_the_same_store(
    store: Pkcs11KeyStore,
    generated: GeneratedKey,
    token: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.hsm")
    handle = await store.get_key(generated.key_id)
    digest = hashlib.sha256(b"outage").digest()
    await handle.sign_digest(digest, DigestAlgorithm.SHA256)  # handle cached and warm
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
        with pytest.raises(HsmUnavailable):
            await store.sign_digests(generated.key_id, [digest], DigestAlgorithm.SHA256)
        attempts = failed_connects(caplog.records, token.label)
        await asyncio.sleep(0.25)  # past reconnect_interval: a real attempt, still failing
        with pytest.raises(HsmUnavailable):
            await store.check()
        assert failed_connects(caplog.records, token.label) == attempts + 1, caplog.text
    finally:
        away.rename(token.token_dir)

    back = time.perf_counter()
    deadline = back + 5
    while True:
        try:
            signature = await handle.sign_digest(digest, DigestAlgorithm.SHA256)
            break
        except HsmUnavailable:
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.05)
    print(f"signing again {1000 * (time.perf_counter() - back):.0f} ms after the token came back")
    verify(generated.public_key_der, signature, digest, DigestAlgorithm.SHA256)
    (again,) = await store.sign_digests(generated.key_id, [digest], DigestAlgorithm.SHA256)
    assert again == signature
    await store.check()
    assert "reconnected to HSM token" in caplog.text
    assert token.pin not in caplog.text


async def test_stale_handle_is_retried_transparently(
    store: Pkcs11KeyStore, generated: GeneratedKey, token: SoftHsmToken
) -> None:
    """Token away and back between two requests: the next signature just works."""
    handle = await store.get_key(generated.key_id)
    digest = hashlib.sha256(b"blip").digest()
    await handle.sign_digest(digest, DigestAlgorithm.SHA256)
    away = outside_tokendir(token)
    token.token_dir.rename(away)
    away.rename(token.token_dir)
    signature = await handle.sign_digest(digest, DigestAlgorithm.SHA256)
    verify(generated.public_key_der, signature, digest, DigestAlgorithm.SHA256)


async def test_other_conf_in_same_process_is_refused(token: SoftHsmToken, tmp_path: Path) -> None:
    other = tmp_path / "other.conf"
    other.write_text("directories.tokendir = /nonexistent\n")
    ks = Pkcs11KeyStore(
        module_path=SOFTHSM_MODULE, token_label=token.label, pin=token.pin, softhsm_conf=other
    )
    with pytest.raises(ConfigError, match="already initialised"):
        await ks.open()


def test_wrong_pin_is_reported_without_the_pin(token: SoftHsmToken) -> None:
    # A fresh process: in this one the application is already logged in to the token.
    script = f"""
import asyncio, logging, sys
from pathlib import Path
from gateway.errors import HsmUnavailable
from gateway.hsm.pkcs11 import Pkcs11KeyStore
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
ks = Pkcs11KeyStore(module_path={SOFTHSM_MODULE!r}, token_label={token.label!r},
                    pin="99999999", softhsm_conf=Path({str(token.conf)!r}), retry_after=7)
try:
    asyncio.run(ks.open())
except HsmUnavailable as e:
    print("unavailable", e.retry_after)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == "unavailable 7"
    assert "refused the PIN" in result.stderr
    assert "99999999" not in result.stderr


async def test_init_token_is_idempotent(
    store: Pkcs11KeyStore, generated: GeneratedKey, token: SoftHsmToken
) -> None:
    again = make_token(token.conf.parent, token.label)
    assert again == token  # same conf, same token directory (serial), same PINs
    handle = await store.get_key(generated.key_id)
    digest = hashlib.sha256(b"still here").digest()
    verify(
        generated.public_key_der,
        await handle.sign_digest(digest, DigestAlgorithm.SHA256),
        digest,
        DigestAlgorithm.SHA256,
    )
