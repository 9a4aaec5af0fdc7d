"""The HPKI card's signing application, host side (JAHIS 24-002, HPKI.md §5).

SELECT the application from a list of AIDs (one per issuing body), find the key and the
certificate through ISO 7816-15 (EF.OD -> PrKDF/CDF, the PIN's reference from the AODF) or, on
cards without those files (or with files this reader cannot parse), through a card profile
(file ids from settings); read the certificate without a PIN; VERIFY; MSE SET DST
(``84 02 <key EF>`` as HPKI.md §5 gives it, after selecting the key EF, or ``84 01 <ref>`` for
a key reference a PrKD names); PSO COMPUTE DIGITAL SIGNATURE over a block the host pads
(PKCS#1 v1.5 type 1), sent with extended length or, when the card or the reader refuses it,
by command chaining.

Blocking: callers run it in a thread. Nothing here keeps the PIN: it goes to the card and the
bytes are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from gateway.card.apdu import SW_OK, Command, Response, der_length
from gateway.card.errors import CardError, CardErrorCode
from gateway.card.pcsc import CardTransport
from gateway.card.pkcs15 import find_signing_key, parse_aodf, parse_od

log = logging.getLogger(__name__)

#: The signing application of the JMA card; other issuers' AIDs go into settings.
DEFAULT_SIGN_AIDS: tuple[bytes, ...] = (bytes.fromhex("E828BD080FA000000391000000000001"),)
HPKI_PIN_TRIES = 15
RSA_BYTES = 256
EF_OD = 0x5031
_SW_WRONG_LENGTH = 0x6700
_BLOCKED = (0x6983, 0x6984)


@dataclass(frozen=True)
class CardProfile:
    """File ids of a card without ISO 7816-15 directory files."""

    name: str
    pin_ref: int
    key_fid: int
    cert_fid: int


#: A real JMA card: PIN EF 0002 (VERIFY P2 0x88), key EF 000C, certificate EF 0016.
JMA_PROFILE = CardProfile("jma", pin_ref=0x88, key_fid=0x000C, cert_fid=0x0016)


@dataclass(frozen=True)
class CardLayoutFound:
    aid: bytes
    pin_ref: int
    key_fid: int
    key_ref: int | None  # a key reference the PrKD names; None: MSE names the key EF
    cert_fid: int
    source: str  # "pkcs15" or the profile's name
    access: dict[str, bool]

    @property
    def mse_dst(self) -> bytes:
        """The MSE SET DST data: ``84 01 <ref>`` for a key reference, else the key EF as
        HPKI.md §5 gives it for the JMA card, ``84 02 <file id>``."""
        if self.key_ref is not None:
            return bytes((0x84, 0x01, self.key_ref))
        return b"\x84\x02" + self.key_fid.to_bytes(2, "big")


def pad_pkcs1_type1(digest_info: bytes, size: int = RSA_BYTES) -> bytes:
    """``00 01 FF.. 00 DigestInfo`` (RFC 8017 §9.2 step 5), built on the host: the HPKI card
    signs the block as it is. cryptography offers no public API that returns this block."""
    if len(digest_info) > size - 11:
        raise ValueError("DigestInfo too long for the key")
    return b"\x00\x01" + b"\xff" * (size - 3 - len(digest_info)) + b"\x00" + digest_info


class HpkiCard:
    """One HPKI card in one exclusive connection."""

    def __init__(
        self,
        transport: CardTransport,
        *,
        aids: Sequence[bytes] = DEFAULT_SIGN_AIDS,
        profiles: Sequence[CardProfile] = (JMA_PROFILE,),
    ) -> None:
        self._t = transport
        self._aids = tuple(aids)
        self._profiles = tuple(profiles)
        self.layout: CardLayoutFound | None = None
        self.extended: bool | None = None  # None: not yet known

    def _tx(self, command: Command) -> Response:
        return self._t.transmit(command)

    def _check(self, r: Response, what: str) -> Response:
        if not r.ok:
            raise CardError(CardErrorCode.CARD_ERROR, detail=f"{what}: {r.sw:04X}")
        return r

    def select(self) -> CardLayoutFound:
        """SELECT the signing application and find the key and certificate files."""
        for aid in self._aids:
            if self._tx(Command(0x00, 0xA4, 0x04, 0x00, aid, le=256)).ok:
                self.layout = self._find(aid)
                return self.layout
        raise CardError(CardErrorCode.NOT_HPKI_CARD)

    def _select_ef(self, fid: int) -> bool:
        return self._tx(Command(0x00, 0xA4, 0x02, 0x0C, fid.to_bytes(2, "big"))).ok

    def _find(self, aid: bytes) -> CardLayoutFound:
        if self._select_ef(EF_OD):
            try:
                found = self._from_directory(aid)
            except ValueError as e:  # files this reader cannot parse: try the profiles
                log.warning("the card's ISO 7816-15 files were not usable: %s", e)
                found = None
            if found is not None:
                return found
        for p in self._profiles:
            if self._select_ef(p.cert_fid):
                return CardLayoutFound(
                    aid=aid,
                    pin_ref=p.pin_ref,
                    key_fid=p.key_fid,
                    key_ref=None,
                    cert_fid=p.cert_fid,
                    source=p.name,
                    access={},  # a profile says nothing about the key's flags
                )
        raise CardError(CardErrorCode.NOT_HPKI_CARD, detail="no certificate file")

    def _from_directory(self, aid: bytes) -> CardLayoutFound | None:
        """The layout the ISO 7816-15 files give; None when they name no key or certificate
        directory. The PIN's reference comes from the AODF entry of the key's authId; a card
        without an AODF is taken to use the authId as the reference."""
        od = parse_od(self.read_ef(EF_OD, der=False))
        if "private_keys" not in od or "certificates" not in od:
            return None
        info = find_signing_key(
            self.read_ef(od["private_keys"], der=False),
            self.read_ef(od["certificates"], der=False),
        )
        if info.auth_id is None:
            raise CardError(CardErrorCode.CARD_ERROR, detail="PrKD names no PIN")
        if "auth_objects" in od:
            pins = parse_aodf(self.read_ef(od["auth_objects"], der=False))
            if info.auth_id not in pins:
                raise CardError(CardErrorCode.CARD_ERROR, detail="AODF lacks the key's PIN")
            pin_ref = pins[info.auth_id]
        else:
            pin_ref = info.auth_id[-1]
        return CardLayoutFound(
            aid=aid,
            pin_ref=pin_ref,
            key_fid=info.key_fid,
            key_ref=info.key_ref,
            cert_fid=info.cert_fid,
            source="pkcs15",
            access=info.access,
        )

    def read_ef(self, fid: int, *, der: bool = True) -> bytes:
        """The content of a transparent EF; ``der``: stop at the end of its first DER object."""
        if not self._select_ef(fid):
            raise CardError(CardErrorCode.CARD_ERROR, detail=f"EF {fid:04X} not found")
        out = b""
        total: int | None = None
        while total is None or len(out) < total:
            want = 256 if total is None else min(256, total - len(out))
            r = self._tx(Command(0x00, 0xB0, len(out) >> 8, len(out) & 0xFF, le=want))
            if r.sw not in (SW_OK, 0x6282) and not (r.sw == 0x6B00 and out):
                self._check(r, f"READ BINARY {fid:04X}")
            if r.sw == 0x6B00 or not r.data:
                break
            out += r.data
            if der and total is None and len(out) >= 6:
                total = der_length(out[:6])
            # A card may answer fewer bytes than asked (ISO 7816-4): with the length known from
            # the DER header, read on; without it, a short answer is the end of the file.
            if r.sw == 0x6282 or (total is None and len(r.data) < want):
                break
        return out[:total] if total is not None else out

    def certificate(self) -> x509.Certificate:
        layout = self.layout or self.select()
        try:
            return x509.load_der_x509_certificate(self.read_ef(layout.cert_fid))
        except ValueError as e:
            raise CardError(CardErrorCode.CARD_ERROR, detail="unreadable certificate") from e

    def tries_left(self) -> int | None:
        """Tries left without spending one; None when the PIN is already verified."""
        layout = self.layout or self.select()
        r = self._tx(Command(0x00, 0x20, 0x00, layout.pin_ref))
        if r.ok:
            return None
        if r.sw in _BLOCKED:
            return 0
        if r.sw1 == 0x63 and r.sw2 & 0xF0 == 0xC0:
            return r.sw2 & 0x0F
        raise CardError(CardErrorCode.CARD_ERROR, detail=f"VERIFY: {r.sw:04X}")

    def verify_pin(self, pin: bytes) -> None:
        """VERIFY; CardError WRONG_PIN with the tries left, or PIN_BLOCKED."""
        layout = self.layout or self.select()
        if not 4 <= len(pin) <= 16:
            raise CardError(CardErrorCode.PIN_FORMAT)
        r = self._tx(Command(0x00, 0x20, 0x00, layout.pin_ref, pin))
        if r.ok:
            return
        if r.sw in _BLOCKED:
            raise CardError(CardErrorCode.PIN_BLOCKED)
        if r.sw1 == 0x63 and r.sw2 & 0xF0 == 0xC0:
            left = r.sw2 & 0x0F
            if left == 0:
                raise CardError(CardErrorCode.PIN_BLOCKED)
            raise CardError(CardErrorCode.WRONG_PIN, tries_left=left)
        raise CardError(CardErrorCode.CARD_ERROR, detail=f"VERIFY: {r.sw:04X}")

    def sign_digest_info(self, digest_info: bytes) -> bytes:
        """MSE SET DST + PSO CDS over the host-padded block; the raw 256-byte signature."""
        layout = self.layout or self.select()
        block = pad_pkcs1_type1(digest_info)
        if layout.key_ref is None:
            # The key EF selected first, as a public client of the JMA card does; a card that
            # does not let its key EF be selected still takes the MSE that names it.
            self._select_ef(layout.key_fid)
        mse = Command(0x00, 0x22, 0x41, 0xB6, layout.mse_dst)
        self._check(self._tx(mse), "MSE SET DST")
        r: Response | None = None
        if self.extended is not False:
            try:
                # Extended Le 00 00 (HPKI.md §5): the card answers its 256 bytes.
                r = self._tx(Command(0x00, 0x2A, 0x9E, 0x9A, block, le=0x10000))
            except CardError as e:
                # A reader without extended length refuses the APDU itself (the card never
                # sees it): pcsc-lite says "transaction failed". Chain instead, once known.
                if e.code is not CardErrorCode.READER_ERROR or self.extended is not None:
                    raise
                log.info("the reader refused an extended APDU (%s): chaining", e.detail)
                self.extended = False
                r = None
            if r is not None and r.sw == _SW_WRONG_LENGTH and self.extended is None:
                self.extended = False  # neither card nor reader takes extended APDUs: chain
                r = None
            elif r is not None and r.ok:
                self.extended = True
        if r is None:
            half = len(block) // 2
            first = self._tx(Command(0x10, 0x2A, 0x9E, 0x9A, block[:half]))
            self._check(first, "PSO (chained)")
            r = self._tx(Command(0x00, 0x2A, 0x9E, 0x9A, block[half:], le=RSA_BYTES))
        if r.sw == 0x6982:
            raise CardError(CardErrorCode.CARD_ERROR, detail="PIN not verified")
        self._check(r, "PSO COMPUTE DIGITAL SIGNATURE")
        if len(r.data) != RSA_BYTES:
            raise CardError(CardErrorCode.CARD_ERROR, detail="signature of the wrong length")
        return r.data
