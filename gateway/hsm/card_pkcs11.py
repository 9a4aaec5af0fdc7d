"""The HPKI card through its vendor's PKCS#11 module (``--pkcs11-module PATH``), instead of
raw APDUs: the same card store as :class:`gateway.hsm.card.CardKeyStore` for the local agent.

Card vendors ship a PKCS#11 module for their HPKI card (one slot per reader); where a facility
has one installed, the agent can drive the card through it. The module then does what
``gateway/card/hpki.py`` does by hand: it finds the key and the certificate, VERIFYs the PIN
(``C_Login``) and pads and signs (``CKM_RSA_PKCS`` over the DigestInfo built here).

The certificate is a public object: it is read, and checked by the agent, without the PIN. The
key is found after ``C_Login`` by the certificate's ``CKA_ID``. A PKCS#11 module does not say
how many PIN tries are left, only "low", "final try" and "locked" (token flags), so
``pin_tries_left`` is 1 on the final try, 0 when locked, and None (unknown) otherwise.

One worker thread makes every call into the module (python-pkcs11 initialises modules without
OS locking); the module is a process singleton, so one process drives one module. The PIN goes
to ``C_Login`` (python-pkcs11 takes it as a ``str``, which cannot be wiped: the caller's buffer
is) and is never kept; ``relock`` closes the session, which logs the token out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
from cryptography import x509
from pkcs11 import Attribute, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11x

from gateway.card.errors import CardError, CardErrorCode
from gateway.card.hpki import HPKI_PIN_TRIES
from gateway.errors import HsmUnavailable
from gateway.hsm.card import CardKeyBase, card_key_id

T = TypeVar("T")

#: The card (token) left the reader, or the session with it ended.
_REMOVED: tuple[type[Exception], ...] = (
    p11x.TokenNotPresent,
    p11x.TokenNotRecognised,
    p11x.DeviceRemoved,
    p11x.DeviceError,
    p11x.SessionClosed,
    p11x.SessionHandleInvalid,
    p11x.ObjectHandleInvalid,
    p11x.KeyHandleInvalid,
    p11x.UserNotLoggedIn,
)


def _pick_certificate(
    certs: list[tuple[bytes, x509.Certificate]],
) -> tuple[bytes, x509.Certificate]:
    """The signing certificate among the token's: an end-entity certificate, preferring one
    for non-repudiation (an HPKI card may also carry its CA's certificate)."""

    def end_entity(c: x509.Certificate) -> bool:
        try:
            return not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            return True

    def non_repudiation(c: x509.Certificate) -> bool:
        try:
            usage = c.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return False
        return bool(usage.content_commitment)

    leaves = [(i, c) for i, c in certs if end_entity(c)]
    if not leaves:
        raise CardError(CardErrorCode.NOT_HPKI_CARD, detail="no end-entity certificate")
    return next(((i, c) for i, c in leaves if non_repudiation(c)), leaves[0])


class Pkcs11CardStore(CardKeyBase):
    """The signing key of the HPKI card behind a vendor PKCS#11 module."""

    def __init__(
        self,
        module_path: str,
        *,
        token_label: str | None = None,
        load: Callable[[str], Any] = pkcs11.lib,
    ) -> None:
        super().__init__(token_label or module_path, thread_name="hpki-p11")
        self.module_path = module_path
        self.token_label = token_label
        self._load = load
        self._lib: Any = None
        self._token: Any = None
        self._session: Any = None
        self._logged_in = False
        self._key: Any = None
        self._cert_id: bytes | None = None

    # -- session ---------------------------------------------------------------------------

    def _find_token(self) -> Any:
        if self._lib is None:
            try:
                self._lib = self._load(self.module_path)
            except (OSError, RuntimeError, p11x.PKCS11Error) as e:
                raise HsmUnavailable(
                    f"cannot load the PKCS#11 module {self.module_path}: {type(e).__name__}",
                    retry_after=5,
                ) from e
        for slot in self._lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except p11x.PKCS11Error:
                continue
            if not token.flags & TokenFlag.TOKEN_INITIALIZED:
                continue
            if self.token_label is None or token.label == self.token_label:
                return token
        raise CardError(CardErrorCode.NO_CARD)

    def _open_blocking(self) -> None:
        with self._lock:
            self._drop_blocking()
            try:
                token = self._find_token()
                session = token.open()
            except _REMOVED as e:
                raise CardError(CardErrorCode.NO_CARD, detail=type(e).__name__) from e
            except p11x.PKCS11Error as e:
                raise CardError(CardErrorCode.CARD_ERROR, detail=type(e).__name__) from e
            try:
                certs = [
                    (bytes(o[Attribute.ID]), x509.load_der_x509_certificate(o[Attribute.VALUE]))
                    for o in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})
                ]
                if not certs:
                    raise CardError(CardErrorCode.NOT_HPKI_CARD, detail="no certificate")
                self._cert_id, self._cert = _pick_certificate(certs)
            except BaseException as e:
                with contextlib.suppress(p11x.PKCS11Error):
                    session.close()
                if isinstance(e, _REMOVED):
                    raise CardError(CardErrorCode.NO_CARD, detail=type(e).__name__) from e
                if isinstance(e, p11x.PKCS11Error):
                    raise CardError(CardErrorCode.CARD_ERROR, detail=type(e).__name__) from e
                if isinstance(e, ValueError):
                    raise CardError(
                        CardErrorCode.CARD_ERROR, detail="unreadable certificate"
                    ) from e
                raise
            self._token, self._session = token, session
            self._key_id = card_key_id(self._cert)

    def _drop_blocking(self) -> None:
        session, self._session, self._key = self._session, None, None
        self._logged_in = False
        if session is not None:
            self.generation += 1
            with contextlib.suppress(p11x.PKCS11Error):  # the card may already be gone
                session.close()  # the last session closed: the token is logged out

    @property
    def connected(self) -> bool:
        return self._session is not None

    def _call(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._session is None:
                raise HsmUnavailable(f"no HPKI card session in {self.reader}", retry_after=5)
            try:
                return fn()
            except _REMOVED as e:
                self._drop_blocking()  # every grant on this card ends with it
                raise CardError(CardErrorCode.CARD_REMOVED, detail=type(e).__name__) from e
            except p11x.PKCS11Error as e:
                raise CardError(CardErrorCode.CARD_ERROR, detail=type(e).__name__) from e

    def _flags(self) -> TokenFlag:
        assert self._token is not None
        return TokenFlag(self._token.slot.get_token().flags)

    async def pin_tries_left(self) -> int | None:
        """0 locked, 1 final try, the full count while logged in, None when the module does
        not say."""

        def ask() -> int | None:
            flags = self._flags()
            if flags & TokenFlag.USER_PIN_LOCKED:
                return 0
            if self._logged_in:
                return HPKI_PIN_TRIES
            if flags & TokenFlag.USER_PIN_FINAL_TRY:
                return 1
            return None

        return await self._run(lambda: self._call(ask))

    async def unlock(self, pin: bytearray) -> None:
        """``C_Login`` with ``pin``, then overwrite the caller's buffer."""

        def login() -> None:
            try:
                text = bytes(pin).decode("utf-8")
            except UnicodeDecodeError as e:
                raise CardError(CardErrorCode.PIN_FORMAT) from e
            finally:
                pin[:] = b"\x00" * len(pin)
            assert self._token is not None and self._cert_id is not None
            if self._logged_in:  # every authorization proves the PIN anew: log out first
                old, self._session = self._session, self._token.open()
                self._key, self._logged_in = None, False
                old.close()
            try:
                session = self._token.open(user_pin=text)
            except p11x.PinIncorrect as e:
                flags = self._flags()
                if flags & TokenFlag.USER_PIN_LOCKED:
                    raise CardError(CardErrorCode.PIN_BLOCKED) from e
                left = 1 if flags & TokenFlag.USER_PIN_FINAL_TRY else None
                raise CardError(CardErrorCode.WRONG_PIN, tries_left=left) from e
            except p11x.PinLocked as e:
                raise CardError(CardErrorCode.PIN_BLOCKED) from e
            except (p11x.PinLenRange, p11x.PinInvalid) as e:
                raise CardError(CardErrorCode.PIN_FORMAT) from e
            finally:
                text = ""
            old, self._session = self._session, session
            old.close()
            self._logged_in = True
            try:
                self._key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=self._cert_id)
            except (p11x.NoSuchKey, p11x.MultipleObjectsReturned) as e:
                raise CardError(
                    CardErrorCode.NOT_HPKI_CARD, detail="no private key for the certificate"
                ) from e

        await self._run(lambda: self._call(login))

    # -- KeyStore --------------------------------------------------------------------------

    def _sign_blocking(self, infos: list[bytes]) -> list[bytes]:
        def sign() -> list[bytes]:
            if self._key is None:
                raise CardError(CardErrorCode.CARD_ERROR, detail="PIN not verified")
            return [bytes(self._key.sign(i, mechanism=Mechanism.RSA_PKCS)) for i in infos]

        return self._call(sign)

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        """The module's own word on the key (known once the PIN opened the private objects)."""
        self._require(key_id)

        def read() -> dict[str, bool]:
            if self._key is None:
                raise CardError(CardErrorCode.CARD_ERROR, detail="PIN not verified")
            names = {
                "SENSITIVE": Attribute.SENSITIVE,
                "EXTRACTABLE": Attribute.EXTRACTABLE,
                "NEVER_EXTRACTABLE": Attribute.NEVER_EXTRACTABLE,
                "ALWAYS_SENSITIVE": Attribute.ALWAYS_SENSITIVE,
            }
            return {k: bool(self._key[a]) for k, a in names.items()}

        return await self._run(lambda: self._call(read))

    async def check(self) -> None:
        """Probe the card (``C_GetTokenInfo``: the module answers TokenNotPresent once the
        card has left the reader)."""
        try:
            await self._run(lambda: self._call(self._flags))
        except CardError as e:
            raise self._unavailable(e) from e
