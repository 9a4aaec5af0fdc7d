"""A virtual HPKI IC card: the signing application (JAHIS 24-002, HPKI.md §5).

SELECT the signing application by AID (``00 A4 04 00``), EFs by file id (``00 A4 02 0C``),
READ BINARY in chunks of at most 256 bytes; VERIFY the PIN (``63 Cx`` tries left, blocked
``69 84`` after 15 consecutive wrong ones); MSE SET DST names the key; PSO COMPUTE DIGITAL
SIGNATURE (``00 2A 9E 9A``) signs a 256-byte block the host has already padded
(``00 01 FF.. 00 DigestInfo``: unlike JPKI, the HPKI card does not pad).

Two layouts: ``PROFILE_PKCS15`` carries ISO 7816-15 files (EF.OD naming a PrKDF, a CDF and an
AODF whose entries give the key and certificate file ids and the PIN's reference) so a host
finds everything by parsing;
``PROFILE_FIXED`` is a real JMA card's layout (PIN EF 0002 with reference 0x88, key EF 000C,
certificate EF 0016, no directory files) that a host only knows from a card profile.
``extended_length`` False makes the card refuse extended APDUs, so the host must chain
(CLA bit 0x10) the PSO block instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.card.apdu import (
    SW_CLA_NOT_SUPPORTED,
    SW_CONDITIONS_NOT_SATISFIED,
    SW_INS_NOT_SUPPORTED,
    SW_OK,
    SW_SECURITY_NOT_SATISFIED,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    Command,
    Response,
)
from gateway.card.pkcs15 import build_aodf, build_cdf, build_od, build_prkdf
from gateway.vcard.applet import BinaryFile, FileApplet, make_atr, parse_digest_info

#: The signing application of a real JMA card (RID E8 28 BD 08 0F + PIX).
HPKI_SIGN_AID = bytes.fromhex("E828BD080FA000000391000000000001")
HPKI_PIN_TRIES = 15
SW_CHAINING_NOT_SUPPORTED = 0x6884
SW_LAST_COMMAND_EXPECTED = 0x6883

EF_OD = 0x5031
EF_PRKDF = 0x5001
EF_CDF = 0x5002
EF_AODF = 0x5003
PIN_AUTH_ID = bytes.fromhex("01")  # the PrKD's authId: names the PIN in the AODF


@dataclass(frozen=True)
class CardLayout:
    """Where a card keeps its PIN, key and certificate, and whether it has ISO 7816-15 files."""

    name: str
    pin_ref: int  # VERIFY P2
    key_fid: int
    cert_fid: int
    pkcs15: bool


PROFILE_PKCS15 = CardLayout("pkcs15", pin_ref=0x81, key_fid=0x0031, cert_fid=0x0032, pkcs15=True)
PROFILE_FIXED = CardLayout("jma", pin_ref=0x88, key_fid=0x000C, cert_fid=0x0016, pkcs15=False)
KEY_ID = bytes.fromhex("01")  # the PrKD/CD iD that ties the key to its certificate

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


@dataclass
class HpkiApplet(FileApplet):
    """One card; its state (the PIN counter included) lives as long as the object."""

    key: rsa.RSAPrivateKey
    cert_der: bytes
    pin: str
    layout: CardLayout = PROFILE_PKCS15
    extended_length: bool = True
    aid: bytes = HPKI_SIGN_AID
    tries_left: int = HPKI_PIN_TRIES
    #: Simulated time the card takes per signature (a real card: ~0.3-1 s), for the bench.
    sign_delay: float = 0.0
    #: The most one READ BINARY answers (a card may answer less than asked).
    read_chunk: int = 256
    signatures: int = field(default=0, init=False)
    _dst_key: int | None = field(default=None, init=False)
    _chain: bytes | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not (4 <= len(self.pin) <= 16):
            raise ValueError("an HPKI card PIN has 4 to 16 characters")
        if self.key.key_size != 2048:
            raise ValueError("HPKI cards hold RSA-2048 keys")
        self._forget()
        lay = self.layout
        self._files = {lay.cert_fid: BinaryFile(self.cert_der, max_read=self.read_chunk)}
        if lay.pkcs15:
            self._files[EF_OD] = BinaryFile(
                build_od(prkdf_fid=EF_PRKDF, cdf_fid=EF_CDF, aodf_fid=EF_AODF)
            )
            self._files[EF_PRKDF] = BinaryFile(
                build_prkdf(
                    label="HPKI signing key",
                    key_id=KEY_ID,
                    key_fid=lay.key_fid,
                    key_ref=lay.key_fid & 0xFF,
                    modulus_bits=2048,
                    auth_id=PIN_AUTH_ID,
                )
            )
            # The PIN's reference is in the AODF, under the authId the PrKD names (as on a
            # JAHIS card: authId 08, reference 0x88); the two differ here, so a host that
            # took the authId for the reference is refused.
            self._files[EF_AODF] = BinaryFile(
                build_aodf(label="HPKI PIN", auth_id=PIN_AUTH_ID, reference=lay.pin_ref)
            )
            self._files[EF_CDF] = BinaryFile(
                build_cdf(label="HPKI signing certificate", key_id=KEY_ID, cert_fid=lay.cert_fid)
            )

    def __repr__(self) -> str:  # never the PIN or the key
        return f"HpkiApplet(layout={self.layout.name!r}, tries_left={self.tries_left})"

    @property
    def atr(self) -> bytes:
        return make_atr(b"HPKIGW-HPKI")

    def _forget(self) -> None:
        super()._forget()
        self._dst_key, self._chain = None, None

    def accepts(self, raw_length: int) -> bool:
        """Whether the card takes an APDU of this encoded length (no extended length: <= 261)."""
        return self.extended_length or raw_length <= 5 + 255 + 1

    def process(self, command: Command) -> Response:
        chained = bool(command.cla & 0x10)
        cla = command.cla & ~0x10
        if cla != 0x00:
            return Response.status(SW_CLA_NOT_SUPPORTED)
        if not self.accepts(len(command.encode())):
            return Response.status(SW_WRONG_LENGTH)
        if command.ins == 0x2A:
            return self._pso(command, chained)
        self._chain = None  # any other command ends a chain
        if chained:
            return Response.status(SW_CHAINING_NOT_SUPPORTED)
        if command.ins == 0xA4:
            return self._select(command)
        if command.ins == 0xB0:
            return self._read_binary(command)
        if command.ins == 0x20:
            return self._verify(command)
        if command.ins == 0x22:
            return self._mse(command)
        return Response.status(SW_INS_NOT_SUPPORTED)

    def _verify(self, c: Command) -> Response:
        if c.p1 != 0x00 or c.p2 != self.layout.pin_ref:
            return Response.status(SW_WRONG_P1P2)
        if not self._selected:
            return Response.status(SW_CONDITIONS_NOT_SATISFIED)
        return self._check_pin(c.data, self.pin.encode("utf-8"), HPKI_PIN_TRIES)

    def _mse(self, c: Command) -> Response:
        if (c.p1, c.p2) != (0x41, 0xB6):
            return Response.status(SW_WRONG_P1P2)
        d = c.data
        if len(d) < 3 or d[0] not in (0x81, 0x84) or d[1] != len(d) - 2:
            return Response.status(SW_WRONG_DATA)
        key_fid = self.layout.key_fid
        # The key's file id in two bytes, tag 84 or 81 (HPKI.md §5: 84 02 00 0C on the JMA
        # card); with ISO 7816-15 files, also the key reference their PrKD gives (84 01).
        accepted = {bytes((t, 2)) + key_fid.to_bytes(2, "big") for t in (0x81, 0x84)}
        if self.layout.pkcs15:
            accepted.add(bytes((0x84, 1, key_fid & 0xFF)))
        if d not in accepted:
            return Response.status(0x6A88)  # referenced data not found
        self._dst_key = key_fid
        return Response.status(SW_OK)

    def _pso(self, c: Command, chained: bool) -> Response:
        if (c.p1, c.p2) != (0x9E, 0x9A):
            self._chain = None
            return Response.status(SW_WRONG_P1P2)
        if chained:
            self._chain = (self._chain or b"") + c.data
            if len(self._chain) > 256:
                self._chain = None
                return Response.status(SW_WRONG_LENGTH)
            return Response.status(SW_OK)
        block = (self._chain or b"") + c.data
        self._chain = None
        if not self._verified:
            return Response.status(SW_SECURITY_NOT_SATISFIED)
        if self._dst_key is None:
            return Response.status(SW_CONDITIONS_NOT_SATISFIED)
        if len(block) != 256:
            return Response.status(SW_WRONG_LENGTH)
        info = _unpad(block)
        if info is None:
            return Response.status(SW_WRONG_DATA)
        algorithm, digest = info
        if self.sign_delay:
            time.sleep(self.sign_delay)
        # The card's raw RSA over a type-1 block equals a PKCS#1 v1.5 signature of the
        # DigestInfo it carries; cryptography rebuilds that very block, so no hand-made RSA.
        sig = self.key.sign(digest, padding.PKCS1v15(), Prehashed(algorithm))
        self.signatures += 1
        return Response(sig, SW_OK)


def _unpad(block: bytes) -> tuple[hashes.HashAlgorithm, bytes] | None:
    """The DigestInfo of a PKCS#1 v1.5 type-1 block, or None when the block is not one."""
    if block[:2] != b"\x00\x01":
        return None
    end = block.find(b"\x00", 2)
    if end < 10 or block[2:end] != b"\xff" * (end - 2):
        return None
    return parse_digest_info(block[end + 1 :], _HASHES)
