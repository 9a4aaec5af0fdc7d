"""CardKeyStore: the HPKI IC card in a PC/SC reader behind the KeyStore protocol.

One card, one key: ``key_id`` is the hex of the first 16 bytes of SHA-256 over the card
certificate's SubjectPublicKeyInfo, so a handle names exactly that key and a replaced card
(another key) answers KeyNotFound. The connection is exclusive and resets the card on close,
so a verified PIN never outlives the store's session. Every card call runs on one worker
thread (pyscard blocks); the card is a serial device anyway.

The PIN is never kept: ``unlock`` sends it to the card and drops it. Cards cannot generate or
destroy keys here: those calls raise ``KeyGenerationUnsupported``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.card.errors import CardError, CardErrorCode
from gateway.card.hpki import DEFAULT_SIGN_AIDS, HPKI_PIN_TRIES, JMA_PROFILE, CardProfile, HpkiCard
from gateway.card.pcsc import CardTransport, PcscConnection
from gateway.errors import HsmUnavailable, KeyNotFound
from gateway.hsm.api import DigestAlgorithm, GeneratedKey, KeyHandle, KeyStore, StoreKeyHandle
from gateway.hsm.encoding import check_key_request, digest_info

T = TypeVar("T")


class KeyGenerationUnsupported(Exception):
    """An IC card's key was generated at issuance; the store cannot make or delete keys."""


class CardStore(KeyStore, Protocol):
    """One HPKI card's key as the local agent drives it: raw APDUs (:class:`CardKeyStore`) or
    the card vendor's PKCS#11 module (``gateway/hsm/card_pkcs11.py``).

    ``open`` reads the certificate without the PIN; ``unlock`` gives the PIN to the card and
    wipes the caller's buffer (CardError for a wrong, blocked or malformed PIN); ``relock``
    ends the card's verified state; ``generation`` grows whenever the card session ends
    (pulled, replaced, closed). A card pulled mid-call raises CardError CARD_REMOVED (or
    HsmUnavailable from ``sign_digests`` / ``check``).
    """

    reader: str
    generation: int

    @property
    def connected(self) -> bool: ...

    @property
    def key_id(self) -> str | None: ...

    async def certificate(self) -> x509.Certificate: ...

    async def pin_tries_left(self) -> int | None:
        """Tries left before the card locks, without spending one; None when unknown."""
        ...

    async def unlock(self, pin: bytearray) -> None: ...

    async def relock(self) -> None: ...

    async def start(self) -> None:
        """Get ready without touching the card (the card process starts): callers overlap
        it with other work before ``open``."""
        ...


def card_key_id(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:16].hex()


class CardKeyCommon:
    """What every card store does alike: the key named by its certificate, no key generation,
    sessions (``generation``) that end with the card. Subclasses set ``_cert`` and ``_key_id``
    when they open the card and define ``open``."""

    reader: str
    generation: int
    _cert: x509.Certificate | None
    _key_id: str | None
    _handles: dict[str, StoreKeyHandle]

    async def open(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Nothing to start in this process."""

    async def certificate(self) -> x509.Certificate:
        if self._cert is None:
            await self.open()
        assert self._cert is not None
        return self._cert

    @property
    def key_id(self) -> str | None:
        return self._key_id

    @property
    def cached_certificate(self) -> x509.Certificate | None:
        """The certificate read when the card was last opened (None before)."""
        return self._cert

    async def generate_rsa_key(self, *, label: str, bits: int = 2048) -> GeneratedKey:
        check_key_request(label, bits)
        raise KeyGenerationUnsupported("an HPKI card's key is generated at card issuance")

    async def destroy_key(self, key_id: str) -> None:
        raise KeyGenerationUnsupported("an HPKI card's key cannot be deleted from the host")

    def _require(self, key_id: str) -> None:
        if self._key_id is None or key_id != self._key_id:
            raise KeyNotFound(f"signing key {key_id} not found on the HPKI card in {self.reader}")

    async def get_key(self, key_id: str) -> KeyHandle:
        self._require(key_id)
        handle = self._handles.get(key_id)
        if handle is None:
            handle = self._handles[key_id] = StoreKeyHandle(self, key_id)  # type: ignore[arg-type]
        return handle

    async def sign_digests(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        infos = [digest_info(d, algorithm) for d in digests]  # all checked before any signs
        self._require(key_id)
        if not infos:
            return []
        return await self._sign_infos(infos)

    async def _sign_infos(self, infos: list[bytes]) -> list[bytes]:
        """Sign checked DigestInfos with the card's key (a card that left: HsmUnavailable)."""
        raise NotImplementedError

    async def public_key_der(self, key_id: str) -> bytes:
        self._require(key_id)
        assert self._cert is not None
        return self._cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def key_attributes_of(access: dict[str, bool]) -> dict[str, bool]:
    """The KeyStore attributes of a card key from its PrKD access flags; a card without one
    (profile) is described by the HPKI card specification: the key never leaves the card."""
    if not access:
        access = {"sensitive": True, "extractable": False}
        access |= {"alwaysSensitive": True, "neverExtractable": True}
    return {
        "SENSITIVE": access["sensitive"],
        "EXTRACTABLE": access["extractable"],
        "NEVER_EXTRACTABLE": access["neverExtractable"],
        "ALWAYS_SENSITIVE": access["alwaysSensitive"],
    }


class CardKeyBase(CardKeyCommon):
    """The in-process card stores: one worker thread for every card call.

    Subclasses open and drop the card session (``_open_blocking``, ``_drop_blocking``, run on
    the worker under ``_lock``), sign DigestInfos there (``_sign_blocking``), and translate a
    card that left into CardError CARD_REMOVED / NO_CARD.
    """

    def __init__(self, reader: str, *, thread_name: str, retry_after: int = 5) -> None:
        self.reader = reader
        self._retry_after = retry_after
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._cert: x509.Certificate | None = None
        self._key_id: str | None = None
        self._handles: dict[str, StoreKeyHandle] = {}
        self._lock = threading.Lock()
        #: Bumped whenever the card session ends (removed, replaced, closed): SADs bound to an
        #: older generation are dead.
        self.generation = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reader={self.reader!r}, key_id={self._key_id!r})"

    async def _run(self, fn: Callable[[], T]) -> T:
        import asyncio  # here, not at the top: the card process imports this module and starts
        # faster without asyncio

        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _open_blocking(self) -> None:
        raise NotImplementedError

    def _drop_blocking(self) -> None:
        raise NotImplementedError

    def _sign_blocking(self, infos: list[bytes]) -> list[bytes]:
        raise NotImplementedError

    async def check(self) -> None:
        raise NotImplementedError

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        raise NotImplementedError

    def _unavailable(self, e: CardError) -> HsmUnavailable:
        return HsmUnavailable(
            f"HPKI card in {self.reader}: {e.code.value}", retry_after=self._retry_after
        )

    async def open(self) -> None:
        """Find the card, read its certificate (no PIN)."""
        await self._run(self._open_blocking)

    def close_blocking(self) -> None:
        with self._lock:
            self._drop_blocking()

    async def close(self) -> None:
        await self._run(self.close_blocking)
        self._pool.shutdown(wait=False)

    async def relock(self) -> None:
        """End the card's verified state (a new session: the PIN must be given again)."""
        await self._run(self._open_blocking)

    def sign_infos_blocking(self, infos: list[bytes]) -> list[bytes]:
        """Sign checked DigestInfos; a card that left is HsmUnavailable."""
        try:
            return self._sign_blocking(infos)
        except CardError as e:
            if e.code in (CardErrorCode.CARD_REMOVED, CardErrorCode.NO_CARD):
                raise self._unavailable(e) from e
            raise

    async def _sign_infos(self, infos: list[bytes]) -> list[bytes]:
        return await self._run(lambda: self.sign_infos_blocking(infos))


class CardKeyStore(CardKeyBase):
    """The signing key of the HPKI card in ``reader``."""

    def __init__(
        self,
        reader: str,
        *,
        aids: Sequence[bytes] = DEFAULT_SIGN_AIDS,
        profiles: Sequence[CardProfile] = (JMA_PROFILE,),
        connect: Callable[[str], CardTransport] = PcscConnection,
        retry_after: int = 5,
    ) -> None:
        super().__init__(reader, thread_name="hpki-card", retry_after=retry_after)
        self._aids = tuple(aids)
        self._profiles = tuple(profiles)
        self._connect = connect
        self._conn: CardTransport | None = None
        self._card: HpkiCard | None = None

    # -- session ---------------------------------------------------------------------------

    def _open_blocking(self) -> None:
        with self._lock:
            self._drop_blocking()
            try:
                conn = self._connect(self.reader)
            except CardError as e:
                raise self._unavailable(e) from e
            card = HpkiCard(conn, aids=self._aids, profiles=self._profiles)
            try:
                card.select()
                cert = card.certificate()
            except BaseException:  # whatever went wrong, the exclusive connection ends
                close = getattr(conn, "close", None)
                if close is not None:
                    close()
                raise
            self._conn, self._card, self._cert = conn, card, cert
            self._key_id = card_key_id(cert)

    def _drop_blocking(self) -> None:
        conn, self._conn, self._card = self._conn, None, None
        if conn is not None:
            self.generation += 1
            close = getattr(conn, "close", None)
            if close is not None:
                close()

    @property
    def connected(self) -> bool:
        return self._card is not None

    def _session(self) -> HpkiCard:
        if self._card is None:
            raise HsmUnavailable(f"no HPKI card session in {self.reader}", retry_after=5)
        return self._card

    def _card_call(self, fn: Callable[[HpkiCard], T]) -> T:
        with self._lock:
            card = self._session()
            try:
                return fn(card)
            except CardError as e:
                if e.code in (CardErrorCode.CARD_REMOVED, CardErrorCode.NO_CARD):
                    self._drop_blocking()  # every grant on this card ends with it
                raise

    # The blocking API: what the async methods run on the worker thread, and what the card
    # process (``hsm/card_process.py``) calls on its only thread.

    def open_blocking(self) -> None:
        self._open_blocking()

    def tries_left_blocking(self) -> int | None:
        return self._card_call(lambda c: c.tries_left())

    def unlock_blocking(self, pin: bytearray) -> None:
        """VERIFY ``pin`` on the card, then overwrite the buffer."""

        try:
            self._card_call(lambda c: c.verify_pin(bytes(pin)))
        finally:
            pin[:] = b"\x00" * len(pin)  # also when there was no session to call

    def check_blocking(self) -> None:
        """Probe the card (tries-left VERIFY, which spends nothing)."""
        try:
            self.tries_left_blocking()
        except CardError as e:
            raise self._unavailable(e) from e

    @property
    def access(self) -> dict[str, bool]:
        """The key's PrKD access flags ({} for a card described by a profile)."""
        return dict(self._card.layout.access) if self._card and self._card.layout else {}

    async def tries_left(self) -> int | None:
        """Tries left without spending one; None when the PIN is verified."""
        return await self._run(self.tries_left_blocking)

    async def pin_tries_left(self) -> int | None:
        left = await self.tries_left()
        return HPKI_PIN_TRIES if left is None else left  # verified: the counter is full

    async def unlock(self, pin: bytearray) -> None:
        """VERIFY ``pin`` on the card, then overwrite the caller's buffer."""
        await self._run(lambda: self.unlock_blocking(pin))

    # -- KeyStore --------------------------------------------------------------------------

    def _sign_blocking(self, infos: list[bytes]) -> list[bytes]:
        return self._card_call(lambda c: [c.sign_digest_info(i) for i in infos])

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        """The card's PrKD access flags (``key_attributes_of``)."""
        self._require(key_id)
        return key_attributes_of(self.access)

    async def check(self) -> None:
        await self._run(self.check_blocking)
