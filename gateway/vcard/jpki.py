"""A virtual My Number card: the JPKI application, user-authentication side.

Behaviour follows the real card as read by OpenSC ``card-jpki.c`` and the jpki/myna clients
(HPKI.md §4): SELECT the JPKI AP by name, SELECT EFs by id, READ BINARY in chunks of at most
256 bytes, VERIFY the 4-digit authentication PIN on EF 0018 (3 tries, ``63 Cx``, then blocked:
``69 84``), and ``80 2A 00 80`` on EF 0017 signs a DigestInfo that the card pads itself
(PKCS#1 v1.5). A reset or a new SELECT of the AP forgets the PIN. The signature side (EF 0001,
001A, 001B) is not present: the gateway never uses it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from asn1crypto.algos import DigestInfo
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.card.apdu import (
    SW_CLA_NOT_SUPPORTED,
    SW_FILE_NOT_FOUND,
    SW_INCOMPATIBLE_FILE,
    SW_INS_NOT_SUPPORTED,
    SW_NO_CURRENT_EF,
    SW_OK,
    SW_REFERENCE_DATA_UNUSABLE,
    SW_SECURITY_NOT_SATISFIED,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    Command,
    Response,
)
from gateway.vcard.applet import BinaryFile, make_atr

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
class JpkiApplet:
    """The card's state lives here (PIN counter included) for as long as the object lives."""

    auth_key: rsa.RSAPrivateKey
    auth_cert_der: bytes
    auth_ca_der: bytes
    pin: str
    token: str = TOKEN_MY_NUMBER_CARD
    tries_left: int = AUTH_PIN_TRIES
    _ap_selected: bool = field(default=False, init=False)
    _ef: int | None = field(default=None, init=False)
    _verified: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not (len(self.pin) == 4 and self.pin.isdigit()):
            raise ValueError("the JPKI authentication PIN is 4 digits")
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

    @property
    def blocked(self) -> bool:
        return self.tries_left <= 0

    def power_on(self) -> None:
        self._forget()

    def power_off(self) -> None:
        self._forget()

    def reset(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self._ap_selected, self._ef, self._verified = False, None, False

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

    def _select(self, c: Command) -> Response:
        if c.p1 == 0x04:
            if c.data != JPKI_AID:
                return Response.status(SW_FILE_NOT_FOUND)
            self._ap_selected, self._ef, self._verified = True, None, False
            return Response.status(SW_OK)
        if c.p1 == 0x02:
            if len(c.data) != 2:
                return Response.status(SW_WRONG_LENGTH)
            fid = int.from_bytes(c.data, "big")
            if not self._ap_selected or fid not in (*self._files, EF_AUTH_KEY, EF_AUTH_PIN):
                return Response.status(SW_FILE_NOT_FOUND)
            self._ef = fid
            return Response.status(SW_OK)
        return Response.status(SW_WRONG_P1P2)

    def _read_binary(self, c: Command) -> Response:
        if self._ef is None:
            return Response.status(SW_NO_CURRENT_EF)
        f = self._files.get(self._ef)
        if f is None:  # the key and the PIN are not readable
            return Response.status(SW_INCOMPATIBLE_FILE)
        return f.read(c)

    def _verify(self, c: Command) -> Response:
        if c.p1 != 0x00 or c.p2 != 0x80:
            return Response.status(SW_WRONG_P1P2)
        if self._ef != EF_AUTH_PIN:
            return Response.status(SW_NO_CURRENT_EF)
        if self.blocked:
            return Response.status(SW_REFERENCE_DATA_UNUSABLE)
        if not c.data:  # how many tries are left, without spending one
            return Response.status(SW_OK if self._verified else 0x63C0 | self.tries_left)
        if hmac.compare_digest(c.data, self.pin.encode("ascii")):
            self.tries_left, self._verified = AUTH_PIN_TRIES, True
            return Response.status(SW_OK)
        self.tries_left -= 1
        self._verified = False
        return Response.status(0x63C0 | self.tries_left)

    def _sign(self, c: Command) -> Response:
        if c.p1 != 0x00 or c.p2 != 0x80:
            return Response.status(SW_WRONG_P1P2)
        if self._ef != EF_AUTH_KEY:
            return Response.status(SW_NO_CURRENT_EF)
        if not self._verified:
            return Response.status(SW_SECURITY_NOT_SATISFIED)
        try:
            info = DigestInfo.load(c.data, strict=True)
            algorithm = _HASHES[info["digest_algorithm"]["algorithm"].native]
            digest = bytes(info["digest"].native)
        except (ValueError, KeyError, TypeError):
            return Response.status(SW_WRONG_DATA)
        if len(digest) != algorithm.digest_size:
            return Response.status(SW_WRONG_DATA)
        # The card pads (PKCS#1 v1.5 type 1) and signs; cryptography rebuilds the very same
        # DigestInfo from the algorithm and digest it was given, so nothing is padded by hand.
        sig = self.auth_key.sign(digest, padding.PKCS1v15(), Prehashed(algorithm))
        return Response(sig, SW_OK)
