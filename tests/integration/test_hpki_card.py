"""The virtual HPKI card behind real pcscd + vpcd, driven over pyscard by CardKeyStore (a thread of
this process) and by CardProcessStore (the card process): each test runs with both."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.card.errors import CardError, CardErrorCode
from gateway.card.hpki import JMA_PROFILE, CardProfile, HpkiCard
from gateway.card.jpki import digest_info_sha256
from gateway.errors import HsmUnavailable, KeyNotFound
from gateway.hsm.api import DigestAlgorithm
from gateway.hsm.card import CardKeyStore, KeyGenerationUnsupported
from gateway.hsm.card_process import CardProcessStore
from gateway.pki.issue import CertAndKey
from gateway.sandbox import testworld
from gateway.sandbox.hpki_cards import HpkiTestCard, make_hpki_card
from gateway.vcard.hpki import HPKI_PIN_TRIES, PROFILE_FIXED, PROFILE_PKCS15
from tests.support.pcsc import PcscWorld

PIN = "246810"
LAYOUTS = {"pkcs15": PROFILE_PKCS15, "jma": PROFILE_FIXED}


@pytest.fixture(scope="module")
def hpki_ca() -> CertAndKey:
    now = dt.datetime.now(dt.UTC)
    return testworld.make_hpki_signing_ca(testworld.make_hpki_root(now=now), now=now)


#: Either card store (both take the same arguments).
CardStoreClass = type[CardKeyStore] | type[CardProcessStore]


@pytest.fixture(params=[CardKeyStore, CardProcessStore], ids=["thread", "process"])
def Store(request: pytest.FixtureRequest) -> CardStoreClass:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def reader(pcsc: PcscWorld) -> Iterator[str]:
    yield pcsc.readers[0].name
    pcsc.readers[0].remove()


def _verify(card: HpkiTestCard, digest: bytes, signature: bytes) -> None:
    pub = card.key.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@pytest.mark.parametrize("extended", [True, False], ids=["extended", "chaining"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_card_signs_host_padded_blocks(
    pcsc: PcscWorld,
    hpki_ca: CertAndKey,
    reader: str,
    Store: CardStoreClass,
    layout: str,
    extended: bool,
) -> None:
    card = make_hpki_card(hpki_ca, pin=PIN, layout=LAYOUTS[layout], extended_length=extended)
    pcsc.readers[0].insert(card.applet)
    store = Store(reader, profiles=[JMA_PROFILE])
    await store.open()
    try:
        assert await store.certificate() == card.cert
        assert store.key_id is not None
        assert await store.tries_left() == HPKI_PIN_TRIES
        with pytest.raises(CardError):  # no PIN yet: the card refuses
            await store.sign_digests(store.key_id, [b"\x01" * 32], DigestAlgorithm.SHA256)
        assert card.applet.signatures == 0
        await store.unlock(bytearray(PIN.encode()))
        assert await store.tries_left() is None  # verified
        digests = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
        handle = await store.get_key(store.key_id)
        signatures = await handle.sign_digests(digests, DigestAlgorithm.SHA256)
        for d, s in zip(digests, signatures, strict=True):
            _verify(card, d, s)
        assert card.applet.signatures == 5
        assert await store.key_attributes(store.key_id) == {
            "SENSITIVE": True,
            "EXTRACTABLE": False,
            "NEVER_EXTRACTABLE": True,
            "ALWAYS_SENSITIVE": True,
        }
        if isinstance(store, CardKeyStore):  # the session object lives in this process
            assert store._card is not None and store._card.layout is not None
            assert store._card.layout.source == layout
            assert store._card.extended is extended
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _inserted(
    pcsc: PcscWorld, hpki_ca: CertAndKey, reader: str, Store: CardStoreClass
) -> AsyncIterator[tuple[HpkiTestCard, CardKeyStore | CardProcessStore]]:
    """A doctor's card in the reader and a key store opened on it (closed afterwards)."""
    card = make_hpki_card(hpki_ca, pin=PIN)
    pcsc.readers[0].insert(card.applet)
    store = Store(reader)
    await store.open()
    try:
        yield card, store
    finally:
        await store.close()


async def test_wrong_pin_counts_down_and_locks_at_15(
    pcsc: PcscWorld, hpki_ca: CertAndKey, reader: str, Store: CardStoreClass
) -> None:
    async with _inserted(pcsc, hpki_ca, reader, Store) as (card, store):
        with pytest.raises(CardError) as info:
            await store.unlock(bytearray(b"000000"))
        assert info.value.code is CardErrorCode.WRONG_PIN and info.value.tries_left == 14
        await store.unlock(bytearray(PIN.encode()))  # a right PIN resets the counter
        assert card.applet.tries_left == HPKI_PIN_TRIES
        for left in range(HPKI_PIN_TRIES - 1, 0, -1):
            with pytest.raises(CardError) as info:
                await store.unlock(bytearray(b"999999"))
            assert info.value.tries_left == left
        with pytest.raises(CardError) as info:
            await store.unlock(bytearray(b"999999"))
        assert info.value.code is CardErrorCode.PIN_BLOCKED
        with pytest.raises(CardError) as info:  # blocked: even the right PIN is refused
            await store.unlock(bytearray(PIN.encode()))
        assert info.value.code is CardErrorCode.PIN_BLOCKED
        assert await store.tries_left() == 0


async def test_unlock_wipes_the_callers_pin_buffer(
    pcsc: PcscWorld, hpki_ca: CertAndKey, reader: str, Store: CardStoreClass
) -> None:
    async with _inserted(pcsc, hpki_ca, reader, Store) as (_, store):
        buf = bytearray(PIN.encode())
        await store.unlock(buf)
        assert buf == bytearray(len(PIN))
        assert PIN not in repr(store)


async def test_pulled_card_ends_the_session_and_replaced_card_is_another_key(
    pcsc: PcscWorld, hpki_ca: CertAndKey, reader: str, Store: CardStoreClass
) -> None:
    first = make_hpki_card(hpki_ca, pin=PIN)
    pcsc.readers[0].insert(first.applet)
    store = Store(reader)
    await store.open()
    try:
        await store.unlock(bytearray(PIN.encode()))
        key_id = store.key_id
        assert key_id is not None
        generation = store.generation
        pcsc.readers[0].remove()
        with pytest.raises(HsmUnavailable):
            await store.sign_digests(key_id, [b"\x02" * 32], DigestAlgorithm.SHA256)
        assert store.generation == generation + 1
        second = make_hpki_card(hpki_ca, pin=PIN)
        pcsc.readers[0].insert(second.applet)
        await store.open()
        with pytest.raises(KeyNotFound):  # the old handle's key is not on this card
            await store.sign_digests(key_id, [b"\x02" * 32], DigestAlgorithm.SHA256)
        assert store.key_id != key_id
        with pytest.raises(CardError):  # and the new card wants its PIN again
            await store.sign_digests(store.key_id or "", [b"\x02" * 32], DigestAlgorithm.SHA256)
        assert second.applet.signatures == 0
    finally:
        await store.close()


async def test_unknown_card_layouts_and_key_generation(
    pcsc: PcscWorld, hpki_ca: CertAndKey, reader: str, Store: CardStoreClass
) -> None:
    card = make_hpki_card(hpki_ca, pin=PIN, layout=PROFILE_FIXED)
    pcsc.readers[0].insert(card.applet)
    other = CardProfile("other", pin_ref=0x81, key_fid=0x0101, cert_fid=0x0102)
    store = Store(reader, profiles=[other])
    with pytest.raises(CardError) as info:
        await store.open()
    assert info.value.code is CardErrorCode.NOT_HPKI_CARD
    await store.close()
    store = Store(reader, aids=[bytes.fromhex("E828BD080F00")])
    with pytest.raises(CardError) as info:
        await store.open()
    assert info.value.code is CardErrorCode.NOT_HPKI_CARD
    await store.close()
    store = Store(reader)
    await store.open()
    try:
        with pytest.raises(KeyGenerationUnsupported):
            await store.generate_rsa_key(label="x")
        with pytest.raises(ValueError, match="unsupported RSA key size"):
            await store.generate_rsa_key(label="x", bits=1024)
    finally:
        await store.close()


def test_a_card_another_program_holds_is_in_use_not_absent(
    pcsc: PcscWorld, hpki_ca: CertAndKey, reader: str
) -> None:
    """Another program's exclusive connection (the JPKI user software, a browser's PKCS#11
    module): pcscd answers "sharing violation", which the doctor must hear as "close the other
    card software", not "place your card" (before: NO_CARD)."""
    from smartcard import scard

    from gateway.card.pcsc import PcscConnection

    card = make_hpki_card(hpki_ca, pin=PIN)
    pcsc.readers[0].insert(card.applet)
    # The other program: PC/SC's own calls (pyscard's connection objects release their
    # context again when collected, after pcscd has gone).
    rc, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert rc == scard.SCARD_S_SUCCESS
    rc, handle, _ = scard.SCardConnect(
        ctx, reader, scard.SCARD_SHARE_EXCLUSIVE, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    )
    assert rc == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(rc)
    try:
        with pytest.raises(CardError) as e:
            PcscConnection(reader)
        assert e.value.code is CardErrorCode.CARD_IN_USE
        assert "Another program" in e.value.message("en")
    finally:
        scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(ctx)
    with PcscConnection(reader) as conn:  # free again
        assert conn.atr


def test_cards_answering_as_t0_cards_through_pcscd(
    pcsc: PcscWorld, hpki_ca: CertAndKey, reader: str
) -> None:
    """Through pcscd, cards that announce their data (``61 xx`` + GET RESPONSE) and correct a
    READ BINARY's length (``6C xx``), as T=0 cards do: the certificate reads whole and the
    signature verifies, for the HPKI card and the My Number card."""
    from gateway.card.jpki import JpkiCard
    from gateway.card.pcsc import PcscConnection
    from gateway.sandbox.jpki import issue_auth_cert, make_test_jpki_ca
    from gateway.vcard.applet import T0Answers
    from gateway.vcard.jpki import JpkiApplet

    card = make_hpki_card(hpki_ca, pin=PIN, layout=PROFILE_FIXED)
    t0 = T0Answers(card.applet)
    pcsc.readers[0].insert(t0)
    with PcscConnection(reader) as conn:
        hpki = HpkiCard(conn, profiles=[JMA_PROFILE])
        assert hpki.certificate() == card.cert
        hpki.verify_pin(PIN.encode())
        digest = hashlib.sha256(b"rx").digest()
        _verify(card, digest, hpki.sign_digest_info(digest_info_sha256(b"rx")))
    assert t0.gets >= 3  # the certificate's chunks and the signature came by GET RESPONSE
    pcsc.readers[0].remove()

    now = dt.datetime.now(dt.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_auth_cert(make_test_jpki_ca(now=now), key.public_key(), now=now)
    der = cert.public_bytes(serialization.Encoding.DER)
    mnc = T0Answers(JpkiApplet(auth_key=key, auth_cert_der=der, auth_ca_der=b"", pin="1234"))
    pcsc.readers[0].insert(mnc)
    with PcscConnection(reader) as conn:
        jpki = JpkiCard(conn)
        assert jpki.read_auth_certificate() == der
        jpki.verify_auth_pin("1234")
        sig = jpki.sign(b"challenge")
        key.public_key().verify(sig, b"challenge", padding.PKCS1v15(), hashes.SHA256())
    assert mnc.gets >= 2
