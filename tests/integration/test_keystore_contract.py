"""The KeyStore / KeyHandle contract (gateway/hsm/api.py), run against every key store.

One suite, parametrized over the stores (as pyHanko's tests/test_pkcs11.py runs one suite per
token platform): the in-process PKCS#11 store, the signing process, and the HPKI card in a real
pcscd + vpcd reader, driven from a thread or from the card process (its key was made at card
issuance: the "generated" key is the card's). What only one store does (the PKCS#11 thread, the
child processes' life, outages, the card's PIN and removal) stays in test_hsm.py /
test_hsm_signer_process.py / test_hpki_card.py / test_card_process.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.errors import HsmUnavailable, KeyNotFound
from gateway.hsm.api import DigestAlgorithm, GeneratedKey, KeyHandle, KeyStore, StoreKeyHandle
from gateway.hsm.card import CardKeyStore, KeyGenerationUnsupported
from gateway.hsm.card_process import CardProcessStore
from gateway.hsm.pkcs11 import Pkcs11KeyStore
from gateway.hsm.signer_process import SignerProcessKeyStore
from gateway.sandbox import testworld
from gateway.sandbox.hpki_cards import make_hpki_card
from tests.support.pcsc import PcscWorld
from tests.support.softhsm import SOFTHSM_MODULE, SoftHsmToken, failed_connects, process_token

pytestmark = pytest.mark.hsm

LABEL = "hpki-test-hsm"

#: Every key store, by name: a factory taking the token and extra constructor options.
STORES: dict[str, Callable[..., KeyStore]] = {
    "pkcs11": Pkcs11KeyStore,
    "signing-process": SignerProcessKeyStore,
    "card": lambda *, card_reader, **_: CardKeyStore(card_reader),
    "card-process": lambda *, card_reader, **_: CardProcessStore(card_reader),
}
CARDS = ("card", "card-process")
#: Stores that make and delete keys (a card's key is made when the card is issued).
GENERATING = ("pkcs11", "signing-process")
CARD_PIN = "135790"
#: Where KeyNotFound says the key was looked for.
WHERE = {
    "pkcs11": f"token {LABEL}",
    "signing-process": f"token {LABEL}",
    "card": "the HPKI card",
    "card-process": "the HPKI card",
}


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    return process_token(tmp_path_factory, LABEL)


def make_store(kind: str, token: SoftHsmToken, **kw: object) -> KeyStore:
    options: dict[str, object] = {
        "module_path": SOFTHSM_MODULE,
        "token_label": token.label,
        "pin": token.pin,
        "softhsm_conf": token.conf,
        "retry_after": 3,
        "reconnect_interval": 0.2,
    } | kw
    return STORES[kind](**options)


@pytest.fixture(params=sorted(STORES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(
    kind: str, token: SoftHsmToken, request: pytest.FixtureRequest
) -> AsyncIterator[KeyStore]:
    if kind not in CARDS:
        ks = make_store(kind, token)
        await ks.open()
        yield ks
        await ks.close()
        return
    pcsc: PcscWorld = request.getfixturevalue("pcsc")
    now = dt.datetime.now(dt.UTC)
    ca = testworld.make_hpki_signing_ca(testworld.make_hpki_root(now=now), now=now)
    reader = pcsc.readers[1]
    reader.insert(make_hpki_card(ca, pin=CARD_PIN).applet)
    card = make_store(kind, token, card_reader=reader.name)
    try:
        await card.open()
        await card.unlock(bytearray(CARD_PIN.encode()))
        yield card
        await card.close()
    finally:
        reader.remove()


@pytest.fixture
async def generated(store: KeyStore) -> GeneratedKey:
    if isinstance(store, CardKeyStore | CardProcessStore):
        assert store.key_id is not None
        der = await store.public_key_der(store.key_id)
        return GeneratedKey(key_id=store.key_id, public_key_der=der, key_size=2048)
    return await store.generate_rsa_key(label="contract-signing-key")


def verify(der: bytes, signature: bytes, digest: bytes, algorithm: DigestAlgorithm) -> None:
    key = serialization.load_der_public_key(der)
    assert isinstance(key, rsa.RSAPublicKey)
    alg = {"SHA256": hashes.SHA256(), "SHA384": hashes.SHA384(), "SHA512": hashes.SHA512()}
    key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(alg[algorithm.name]))


async def test_implements_the_protocols(store: KeyStore, generated: GeneratedKey) -> None:
    assert isinstance(store, KeyStore)
    handle = await store.get_key(generated.key_id)
    assert isinstance(handle, KeyHandle) and isinstance(handle, StoreKeyHandle)
    assert handle.key_id == generated.key_id
    assert await store.get_key(generated.key_id) is handle  # one handle per key id


async def test_generated_key_never_leaves_the_store(
    store: KeyStore, generated: GeneratedKey
) -> None:
    assert len(bytes.fromhex(generated.key_id)) == 16
    assert generated.key_size == 2048
    assert await store.public_key_der(generated.key_id) == generated.public_key_der
    assert await store.key_attributes(generated.key_id) == {
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "NEVER_EXTRACTABLE": True,
        "ALWAYS_SENSITIVE": True,
    }
    with pytest.raises(ValueError, match="unsupported RSA key size"):
        await store.generate_rsa_key(label="x", bits=1024)


@pytest.mark.parametrize("algorithm", list(DigestAlgorithm))
async def test_signatures_verify(
    store: KeyStore, generated: GeneratedKey, algorithm: DigestAlgorithm
) -> None:
    handle = await store.get_key(generated.key_id)
    digest = hashlib.new(algorithm.hashlib_name, b"prescription 42").digest()
    signature = await handle.sign_digest(digest, algorithm)
    assert len(signature) == 256
    verify(generated.public_key_der, signature, digest, algorithm)
    batch = [hashlib.new(algorithm.hashlib_name, bytes([i])).digest() for i in range(50)]
    for d, s in zip(batch, await handle.sign_digests(batch, algorithm), strict=True):
        verify(generated.public_key_der, s, d, algorithm)
    for d, s in zip(
        batch, await store.sign_digests(generated.key_id, batch, algorithm), strict=True
    ):
        verify(generated.public_key_der, s, d, algorithm)


async def test_wrong_digest_length_is_value_error_and_signs_nothing(
    store: KeyStore, generated: GeneratedKey
) -> None:
    handle = await store.get_key(generated.key_id)
    with pytest.raises(ValueError, match="SHA384"):
        await handle.sign_digest(b"\x00" * 32, DigestAlgorithm.SHA384)
    with pytest.raises(ValueError):
        await handle.sign_digest(b"", DigestAlgorithm.SHA256)
    with pytest.raises(ValueError):
        await handle.sign_digests([b"\x00" * 32, b"\x00" * 31], DigestAlgorithm.SHA256)
    assert await handle.sign_digests([], DigestAlgorithm.SHA512) == []
    assert await store.sign_digests(generated.key_id, [], DigestAlgorithm.SHA256) == []


async def test_concurrent_callers_get_their_own_results_and_errors(
    store: KeyStore, generated: GeneratedKey
) -> None:
    jobs = [
        [hashlib.sha256(f"{i}/{j}".encode()).digest() for j in range(1 + i % 3)] for i in range(150)
    ]
    results = await asyncio.gather(
        *(store.sign_digests(generated.key_id, d, DigestAlgorithm.SHA256) for d in jobs),
        store.sign_digests(os.urandom(16).hex(), [jobs[0][0]], DigestAlgorithm.SHA256),
        store.sign_digests(generated.key_id, [b"\x00" * 31], DigestAlgorithm.SHA256),
        return_exceptions=True,
    )
    *signed, missing, short = results
    assert isinstance(missing, KeyNotFound)
    assert isinstance(short, ValueError)
    for digests, signatures in zip(jobs, signed, strict=True):
        assert isinstance(signatures, list) and len(signatures) == len(digests)
        for digest, signature in zip(digests, signatures, strict=True):
            verify(generated.public_key_der, signature, digest, DigestAlgorithm.SHA256)


async def test_unknown_key_is_key_not_found(kind: str, store: KeyStore) -> None:
    unknown = os.urandom(16).hex()
    with pytest.raises(KeyNotFound, match=f"signing key {unknown} not found on {WHERE[kind]}"):
        await store.get_key(unknown)
    with pytest.raises(KeyNotFound):
        await store.get_key("not-hex")
    with pytest.raises(KeyNotFound):
        await store.public_key_der(unknown)
    # signDoc signs through a handle of the key id alone (no get_key first): the lookup
    # that goes with the signature must say it the same way.
    with pytest.raises(KeyNotFound, match=f"signing key {unknown} not found on {WHERE[kind]}"):
        await store.sign_digests(unknown, [bytes(32)], DigestAlgorithm.SHA256)
    with pytest.raises(KeyNotFound):
        await StoreKeyHandle(store, unknown).sign_digest(bytes(32), DigestAlgorithm.SHA256)
    await store.check()  # a missing key says nothing about the store's health


async def test_destroy_key_removes_both_halves(
    kind: str, store: KeyStore, generated: GeneratedKey
) -> None:
    if kind not in GENERATING:  # the card refuses, and its key stays
        with pytest.raises(KeyGenerationUnsupported):
            await store.generate_rsa_key(label="to-destroy")
        with pytest.raises(KeyGenerationUnsupported):
            await store.destroy_key(generated.key_id)
        assert await store.public_key_der(generated.key_id) == generated.public_key_der
        return
    key = await store.generate_rsa_key(label="to-destroy")
    await store.get_key(key.key_id)
    await store.destroy_key(key.key_id)
    with pytest.raises(KeyNotFound):
        await store.get_key(key.key_id)
    with pytest.raises(KeyNotFound):
        await store.public_key_der(key.key_id)


@pytest.mark.parametrize("kind", CARDS)
async def test_unknown_reader_is_unavailable(
    kind: str, pcsc: PcscWorld, token: SoftHsmToken
) -> None:
    ks = make_store(kind, token, card_reader="no such reader 00 00")
    with pytest.raises(HsmUnavailable):
        await ks.open()
    with pytest.raises(HsmUnavailable):
        await ks.check()
    await ks.close()


@pytest.mark.parametrize("kind", GENERATING)
async def test_unknown_token_label_fails_fast(
    kind: str, token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.hsm")
    ks = make_store(kind, token, token_label="no-such-token", retry_after=9, reconnect_interval=60)
    with pytest.raises(HsmUnavailable) as info:
        await ks.open()
    assert info.value.retry_after == 9
    assert failed_connects(caplog.records, "no-such-token") == 1, caplog.text  # open's attempt
    with pytest.raises(HsmUnavailable):
        await ks.check()  # within reconnect_interval: fails fast, no new attempt
    assert failed_connects(caplog.records, "no-such-token") == 1, caplog.text
    await ks.close()
