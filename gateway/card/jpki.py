"""The JPKI application of a My Number card, user-authentication side (HPKI.md §4).

APDUs as read by OpenSC ``card-jpki.c`` and the jpki/myna clients. Only the authentication key
is used: its certificate (EF 000A, readable without PIN), its 4-digit PIN (EF 0018, 3 tries)
and the key (EF 0017, ``80 2A 00 80``: the card pads PKCS#1 v1.5 itself). The card is detected
by SELECT + the token in EF 0006, not by ATR (contactless readers make ATRs up).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509

from gateway.card.apdu import (
    SW_END_OF_FILE,
    SW_OK,
    SW_PIN_BLOCKED,
    SW_REFERENCE_DATA_UNUSABLE,
    Command,
    Response,
    der_length,
)
from gateway.card.errors import CardError, CardErrorCode
from gateway.card.pcsc import CardTransport, PcscConnection, list_readers

JPKI_AID = bytes.fromhex("D392F000260100000001")
EF_TOKEN, EF_AUTH_CERT, EF_AUTH_CA_CERT, EF_AUTH_KEY, EF_AUTH_PIN = 0x06, 0x0A, 0x0B, 0x17, 0x18
#: Tokens (EF 0006, first 32 bytes, space padded) that name the medium.
MY_NUMBER_CARD_TOKENS = {
    "JPKIAPICCTOKEN2": "My Number card",
    "JPKIAPICCTOKEN": "My Number card (old)",
}
OTHER_JPKI_TOKENS = {"JPKIAPGPSETOKEN": "Android (JPKI)", "JPKIAPIOSTOKEN": "iPhone (JPKI)"}
SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")
MAX_CERT_BYTES = 8192


def digest_info_sha256(data: bytes) -> bytes:
    """DER DigestInfo of SHA-256(``data``): what ``80 2A`` pads and signs."""
    return SHA256_DIGEST_INFO_PREFIX + hashlib.sha256(data).digest()


def _blocked(sw: int) -> bool:
    return sw in (SW_REFERENCE_DATA_UNUSABLE, SW_PIN_BLOCKED)


@dataclass(frozen=True)
class CardStatus:
    reader: str
    kind: str  # "jpki" for a My Number card, "none", or "other"
    token: str | None
    pin_tries_left: int | None

    def to_json_dict(self) -> dict[str, object]:
        return {
            "reader": self.reader,
            "kind": self.kind,
            "token": self.token,
            "pin_tries_left": self.pin_tries_left,
        }


class JpkiCard:
    """The JPKI AP over any :class:`CardTransport`. Methods raise :class:`CardError`."""

    def __init__(self, transport: CardTransport) -> None:
        self.transport = transport

    def _tx(self, command: Command) -> Response:
        return self.transport.transmit(command)

    def _check(self, resp: Response) -> Response:
        if resp.sw not in (SW_OK, SW_END_OF_FILE):
            raise CardError(CardErrorCode.CARD_ERROR, detail=f"SW {resp.sw:04X}")
        return resp

    def select_ap(self) -> None:
        resp = self._tx(Command(0x00, 0xA4, 0x04, 0x0C, JPKI_AID))
        if resp.sw != SW_OK:
            raise CardError(CardErrorCode.NOT_MY_NUMBER_CARD)

    def _select_ef(self, fid: int) -> None:
        resp = self._tx(Command(0x00, 0xA4, 0x02, 0x0C, fid.to_bytes(2, "big")))
        if resp.sw != SW_OK:
            raise CardError(CardErrorCode.NOT_MY_NUMBER_CARD)

    def _read(self, offset: int, n: int) -> bytes:
        return self._check(self._tx(Command(0x00, 0xB0, offset >> 8, offset & 0xFF, le=n))).data

    def token(self) -> str:
        self.select_ap()
        self._select_ef(EF_TOKEN)
        return self._read(0, 32).decode("ascii", "replace").rstrip(" \x00")

    def require_my_number_card(self) -> str:
        token = self.token()
        if token not in MY_NUMBER_CARD_TOKENS:
            raise CardError(CardErrorCode.NOT_MY_NUMBER_CARD)
        return token

    def read_auth_certificate(self) -> bytes:
        """DER of the authentication certificate: read the DER header, then <=256-byte chunks."""
        self.select_ap()
        self._select_ef(EF_AUTH_CERT)
        head = self._read(0, 8)
        try:
            total = der_length(head)
        except ValueError as e:
            raise CardError(CardErrorCode.CARD_ERROR, detail="no certificate") from e
        if total > MAX_CERT_BYTES:
            raise CardError(CardErrorCode.CARD_ERROR, detail="certificate too large")
        data = head[:total]
        while len(data) < total:
            chunk = self._read(len(data), min(256, total - len(data)))
            if not chunk:
                raise CardError(CardErrorCode.CARD_ERROR, detail="short certificate")
            data += chunk
        try:
            x509.load_der_x509_certificate(data)
        except ValueError as e:
            raise CardError(CardErrorCode.CARD_ERROR, detail="unreadable certificate") from e
        return data

    def auth_pin_tries(self) -> int:
        """Tries left on the authentication PIN, without spending one (0 = blocked)."""
        self.select_ap()
        self._select_ef(EF_AUTH_PIN)
        sw = self._tx(Command(0x00, 0x20, 0x00, 0x80)).sw
        if sw & 0xFFF0 == 0x63C0:
            return sw & 0x0F
        if _blocked(sw):
            return 0
        if sw == SW_OK:  # already verified in this session: the counter is full
            return 3
        raise CardError(CardErrorCode.CARD_ERROR, detail=f"SW {sw:04X}")

    def verify_auth_pin(self, pin: str) -> None:
        if not (len(pin) == 4 and pin.isascii() and pin.isdigit()):
            raise CardError(CardErrorCode.PIN_FORMAT)
        self.select_ap()
        self._select_ef(EF_AUTH_PIN)
        sw = self._tx(Command(0x00, 0x20, 0x00, 0x80, pin.encode("ascii"))).sw
        if sw == SW_OK:
            return
        if _blocked(sw) or sw == 0x63C0:
            raise CardError(CardErrorCode.PIN_BLOCKED)
        if sw & 0xFFF0 == 0x63C0:
            raise CardError(CardErrorCode.WRONG_PIN, tries_left=sw & 0x0F)
        raise CardError(CardErrorCode.CARD_ERROR, detail=f"SW {sw:04X}")

    def sign_digest_info(self, digest_info: bytes) -> bytes:
        """``80 2A 00 80`` on EF 0017 (after :meth:`verify_auth_pin`): RSA PKCS#1 v1.5."""
        self._select_ef(EF_AUTH_KEY)
        resp = self._tx(Command(0x80, 0x2A, 0x00, 0x80, digest_info, le=0x100))
        if resp.sw == 0x6982:
            raise CardError(CardErrorCode.CARD_ERROR, detail="PIN not verified")
        signature = self._check(resp).data
        if len(signature) != 256:  # RSA-2048, the card's only key size
            raise CardError(CardErrorCode.CARD_ERROR, detail="signature of the wrong length")
        return signature

    def sign(self, data: bytes) -> bytes:
        """The signature over SHA-256(``data``), e.g. the 48 challenge bytes."""
        return self.sign_digest_info(digest_info_sha256(data))


@contextmanager
def open_jpki_card(reader: str | None = None) -> Iterator[JpkiCard]:
    """The My Number card in ``reader`` (default: the first reader holding one)."""
    names = list_readers()
    if not names:
        raise CardError(CardErrorCode.NO_READER)
    if reader is not None:
        if reader not in names:
            raise CardError(CardErrorCode.NO_READER)
        candidates = [reader]
    else:
        candidates = names
    last: CardError = CardError(CardErrorCode.NO_CARD)
    for name in candidates:
        try:
            conn = PcscConnection(name)
        except CardError as e:
            last = e
            continue
        try:
            card = JpkiCard(conn)
            try:
                card.require_my_number_card()
            except CardError as e:
                last = e
                continue
            yield card
            return
        finally:
            conn.close()
    raise last


def card_status() -> list[CardStatus]:
    """Each reader with the kind of card in it and its PIN tries (none spent)."""
    out: list[CardStatus] = []
    for name in list_readers():
        try:
            conn = PcscConnection(name)
        except CardError:
            out.append(CardStatus(reader=name, kind="none", token=None, pin_tries_left=None))
            continue
        try:
            card = JpkiCard(conn)
            try:
                token = card.token()
            except CardError:
                out.append(CardStatus(reader=name, kind="other", token=None, pin_tries_left=None))
                continue
            kind = "jpki" if token in MY_NUMBER_CARD_TOKENS else "other"
            tries = card.auth_pin_tries() if kind == "jpki" else None
            out.append(CardStatus(reader=name, kind=kind, token=token, pin_tries_left=tries))
        finally:
            conn.close()
    return out
