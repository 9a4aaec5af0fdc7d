"""A virtual My Number card: the JPKI application, user-authentication side.

Behaviour follows the real card as read by OpenSC ``card-jpki.c`` and the jpki/myna clients
(HPKI.md §4): SELECT the JPKI AP by name, SELECT EFs by id, READ BINARY in chunks of at most
256 bytes, VERIFY the 4-digit authentication PIN on EF 0018 (3 tries, ``63 Cx``, then blocked:
``69 84``), and ``80 2A 00 80`` on EF 0017 signs a DigestInfo that the card pads itself
(PKCS#1 v1.5). A reset or a new SELECT of the AP forgets the PIN. The signature side (EF 0001,
001A, 001B) is not present: the gateway never uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.card.apdu import (
    SW_CLA_NOT_SUPPORTED,
    SW_INS_NOT_SUPPORTED,
    SW_NO_CURRENT_EF,
    SW_OK,
    SW_SECURITY_NOT_SATISFIED,
    SW_WRONG_DATA,
    SW_WRONG_P1P2,
    Command,
    Response,
)
from gateway.vcard.applet import BinaryFile, FileApplet, make_atr, parse_digest_info

JPKI_AID = bytes.fromhex("D392F000260100000001")
EF_TOKEN = 0x0006
EF_AUTH_CERT = 0x000A
EF_AUTH_CA_CERT = 0x000B
EF_AUTH_KEY = 0x0017
EF_AUTH_PIN = 0x0018
TOKEN_MY_NUMBER_CARD = "JPKIAPICCTOKEN2"  # noqa: S105 - a medium name, not a secret
AUTH_PIN_TRIES = 3

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - the card signs whatever DigestInfo it is given
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


@dataclass
class JpkiApplet(FileApplet):
    """The card's state lives here (PIN counter included) for as long as the object lives."""

    auth_key: rsa.RSAPrivateKey
    auth_cert_der: bytes
    auth_ca_der: bytes
    pin: str
    token: str = TOKEN_MY_NUMBER_CARD
    tries_left: int = AUTH_PIN_TRIES
    aid = JPKI_AID
    _hidden = frozenset({EF_AUTH_KEY, EF_AUTH_PIN})  # selectable, never readable

    def __post_init__(self) -> None:
        if not (len(self.pin) == 4 and self.pin.isdigit()):
            raise ValueError("the JPKI authentication PIN is 4 digits")
        self._forget()
        self._files = {
            EF_TOKEN: BinaryFile(self.token.encode("ascii").ljust(32, b" ")),
            EF_AUTH_CERT: BinaryFile(self.auth_cert_der),
            EF_AUTH_CA_CERT: BinaryFile(self.auth_ca_der),
        }

    def __repr__(self) -> str:  # never the PIN or the key
        return f"JpkiApplet(token={self.token!r}, tries_left={self.tries_left})"

    @property
    def atr(self) -> bytes:
        return make_atr(b"HPKIGW-JPKI")

    def process(self, command: Command) -> Response:
        if command.cla not in (0x00, 0x80):
            return Response.status(SW_CLA_NOT_SUPPORTED)
        if command.ins == 0xA4:
            return self._select(command)
        if command.ins == 0xB0 and command.cla == 0x00:
            return self._read_binary(command)
        if command.ins == 0x20 and command.cla == 0x00:
            return self._verify(command)
        if command.ins == 0x2A and command.cla == 0x80:
            return self._sign(command)
        return Response.status(SW_INS_NOT_SUPPORTED)

    def _verify(self, c: Command) -> Response:
        if c.p1 != 0x00 or c.p2 != 0x80:
            return Response.status(SW_WRONG_P1P2)
        if self._ef != EF_AUTH_PIN:
            return Response.status(SW_NO_CURRENT_EF)
        return self._check_pin(c.data, self.pin.encode("ascii"), AUTH_PIN_TRIES)

    def _sign(self, c: Command) -> Response:
        if c.p1 != 0x00 or c.p2 != 0x80:
            return Response.status(SW_WRONG_P1P2)
        if self._ef != EF_AUTH_KEY:
            return Response.status(SW_NO_CURRENT_EF)
        if not self._verified:
            return Response.status(SW_SECURITY_NOT_SATISFIED)
        info = parse_digest_info(c.data, _HASHES)
        if info is None:
            return Response.status(SW_WRONG_DATA)
        algorithm, digest = info
        # The card pads (PKCS#1 v1.5 type 1) and signs; cryptography rebuilds the very same
        # DigestInfo from the algorithm and digest it was given, so nothing is padded by hand.
        sig = self.auth_key.sign(digest, padding.PKCS1v15(), Prehashed(algorithm))
        return Response(sig, SW_OK)
