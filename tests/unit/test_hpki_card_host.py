"""The host side of the HPKI card (``card/hpki.py``) against the virtual card's applet, APDU by
APDU: what a real card or reader does that the PC/SC tests cannot stage (a reader without
extended length, short READ BINARY answers, ISO 7816-15 files with optional parts, an AODF
whose reference is not the authId). The end-to-end tests through pcscd are in
``tests/integration/test_hpki_card.py``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

import pytest
from asn1crypto import parser
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.card.apdu import Command, Response
from gateway.card.errors import CardError, CardErrorCode
from gateway.card.hpki import JMA_PROFILE, HpkiCard
from gateway.card.jpki import digest_info_sha256
from gateway.card.pkcs15 import (
    build_aodf,
    build_cdf,
    build_prkdf,
    find_signing_key,
    parse_aodf,
)
from gateway.sandbox import testworld
from gateway.sandbox.hpki_cards import make_hpki_card
from gateway.vcard.hpki import EF_AODF, PROFILE_FIXED, PROFILE_PKCS15, HpkiApplet
from gateway.vcard.jpki import JpkiApplet

PIN = "246813"


@pytest.fixture(scope="module")
def hpki_ca() -> testworld.CertAndKey:
    now = dt.datetime.now(dt.UTC)
    return testworld.make_hpki_signing_ca(testworld.make_hpki_root(now=now), now=now)


class Recording:
    """The applet as a transport, keeping every command APDU sent."""

    def __init__(self, applet: HpkiApplet | JpkiApplet, *, reader_max: int | None = None) -> None:
        self.applet = applet
        self.sent: list[bytes] = []
        self.reader_max = reader_max  # a reader without extended length: longer APDUs refused

    def transmit(self, command: Command) -> Response:
        raw = command.encode()
        if self.reader_max is not None and len(raw) > self.reader_max:
            # What PcscConnection raises for pcsc-lite's SCARD_E_NOT_TRANSACTED.
            raise CardError(CardErrorCode.READER_ERROR, detail="Transaction failed.")
        self.sent.append(raw)
        return self.applet.process(Command.parse(raw))


def _sign_and_check(card: HpkiCard, applet: HpkiApplet) -> None:
    card.verify_pin(PIN.encode())
    digest = hashlib.sha256(b"prescription").digest()
    sig = card.sign_digest_info(digest_info_sha256(b"prescription"))
    applet.key.public_key().verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_jma_card_mse_names_the_key_ef_as_hpki_md_gives_it(hpki_ca: testworld.CertAndKey) -> None:
    """HPKI.md §5: MSE SET DST ``00 22 41 B6 04 84 02 00 0C`` after selecting the key EF, and
    the extended PSO ends with Le ``00 00``. Before, the host sent ``84 01 0C``, which the
    virtual card took but the design document (and a public client of the card) do not."""
    test_card = make_hpki_card(hpki_ca, pin=PIN, layout=PROFILE_FIXED)
    t = Recording(test_card.applet)
    card = HpkiCard(t, profiles=[JMA_PROFILE])
    assert card.select().source == "jma"
    _sign_and_check(card, test_card.applet)
    mse = next(i for i, a in enumerate(t.sent) if a[1] == 0x22)
    assert t.sent[mse] == bytes.fromhex("002241B6048402000C")
    assert t.sent[mse - 1] == bytes.fromhex("00A4020C02000C")  # the key EF, selected first
    pso = t.sent[mse + 1]
    assert pso[:7] == bytes.fromhex("002A9E9A000100") and pso[-2:] == b"\x00\x00"
    assert len(pso) == 7 + 256 + 2


def test_pkcs15_card_takes_the_pin_reference_from_the_aodf(hpki_ca: testworld.CertAndKey) -> None:
    """The PrKD's authId (01 here) names the PIN; its reference (the VERIFY P2, 81 here) is in
    the AODF. Before, the host sent the authId as P2 and the card refused the PIN."""
    test_card = make_hpki_card(hpki_ca, pin=PIN, layout=PROFILE_PKCS15)
    t = Recording(test_card.applet)
    card = HpkiCard(t, profiles=[JMA_PROFILE])
    layout = card.select()
    assert (layout.source, layout.pin_ref) == ("pkcs15", PROFILE_PKCS15.pin_ref)
    assert parse_aodf(test_card.applet._files[EF_AODF].content) == {b"\x01": 0x81}
    _sign_and_check(card, test_card.applet)
    verify = [a for a in t.sent if a[1] == 0x20 and len(a) > 5]
    assert [a[3] for a in verify] == [0x81]
    assert bytes.fromhex("002241B603840131") in t.sent  # the PrKD's key reference


@pytest.mark.parametrize("layout", [PROFILE_FIXED, PROFILE_PKCS15], ids=["jma", "pkcs15"])
def test_a_reader_without_extended_length_gets_a_chained_pso(
    hpki_ca: testworld.CertAndKey, layout: object
) -> None:
    """A short-APDU reader refuses the 265-byte PSO itself (pcsc-lite: "Transaction failed.")
    and the card never sees it. The host chains instead, and remembers. Before, that refusal
    was "card removed" and the session was dropped."""
    test_card = make_hpki_card(hpki_ca, pin=PIN, layout=layout)  # type: ignore[arg-type]
    t = Recording(test_card.applet, reader_max=5 + 255 + 1)
    card = HpkiCard(t, profiles=[JMA_PROFILE])
    card.select()
    _sign_and_check(card, test_card.applet)
    assert card.extended is False
    chained = [a for a in t.sent if a[:4] == bytes.fromhex("102A9E9A")]
    assert len(chained) == 1
    _sign_and_check(card, test_card.applet)  # the second signature chains at once
    assert test_card.applet.signatures == 2


def test_the_reader_failing_after_extended_length_worked_is_not_hidden(
    hpki_ca: testworld.CertAndKey,
) -> None:
    test_card = make_hpki_card(hpki_ca, pin=PIN, layout=PROFILE_FIXED)
    t = Recording(test_card.applet)
    card = HpkiCard(t, profiles=[JMA_PROFILE])
    card.select()
    _sign_and_check(card, test_card.applet)
    assert card.extended is True
    t.reader_max = 261
    with pytest.raises(CardError) as e:
        card.sign_digest_info(digest_info_sha256(b"x"))
    assert e.value.code is CardErrorCode.READER_ERROR


def test_a_certificate_read_in_answers_shorter_than_asked(hpki_ca: testworld.CertAndKey) -> None:
    """READ BINARY answers may be shorter than Le with 9000 before the end of the file (ISO
    7816-4): with the length known from the DER header, the host reads on. Before, it stopped
    at the first short answer and the certificate was cut."""
    test_card = make_hpki_card(hpki_ca, pin=PIN, layout=PROFILE_FIXED)
    applet = dataclasses.replace(test_card.applet, read_chunk=200)
    card = HpkiCard(Recording(applet), profiles=[JMA_PROFILE])
    assert card.certificate() == test_card.cert


def _with_sub_class(der: bytes) -> bytes:
    """``der`` (a PKCS#15 object) with subClassAttributes ``[0]`` inserted before ``[1]``."""
    head = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    body, parts, i = der[head:], [], 0
    while i < len(body):
        n = parser.parse(body[i:])
        size = len(n[3]) + len(n[4]) + len(n[5])
        parts.append(body[i : i + size])
        i += size
    sub = bytes.fromhex("A0053003020105")
    new = b"".join(parts[:-1]) + sub + parts[-1]
    length = bytes([len(new)]) if len(new) < 0x80 else bytes([0x81, len(new)])
    return b"\x30" + length + new


def test_directory_entries_with_sub_class_attributes_parse() -> None:
    """ISO 7816-15 lets a PrKD, CD or AOD entry carry subClassAttributes ``[0]`` (a key's
    subject name, a certificate's identifiers); before, such an entry was a ValueError and the
    card was not usable."""
    prkdf = build_prkdf(
        label="k", key_id=b"\x01", key_fid=0x31, key_ref=None, modulus_bits=2048, auth_id=b"\x08"
    )
    cdf = build_cdf(label="c", key_id=b"\x01", cert_fid=0x32)
    info = find_signing_key(_with_sub_class(prkdf), _with_sub_class(cdf))
    assert (info.key_fid, info.cert_fid, info.auth_id, info.key_ref) == (0x31, 0x32, b"\x08", None)
    aodf = build_aodf(label="PIN", auth_id=b"\x08", reference=0x88)
    assert parse_aodf(_with_sub_class(aodf)) == {b"\x08": 0x88}


def test_unparsable_directory_files_fall_back_to_the_profiles(
    hpki_ca: testworld.CertAndKey,
) -> None:
    test_card = make_hpki_card(hpki_ca, pin=PIN, layout=PROFILE_FIXED)
    applet = test_card.applet
    from gateway.vcard.applet import BinaryFile
    from gateway.vcard.hpki import EF_OD

    applet._files[EF_OD] = BinaryFile(bytes.fromhex("A0063004040250"))  # an OD, a broken path
    applet._files[0x5001] = BinaryFile(b"\x30\x03\x02\x01")  # a truncated PrKD
    card = HpkiCard(Recording(applet), profiles=[JMA_PROFILE])
    assert card.select().source == "jma"


def test_a_my_number_card_with_garbage_for_a_certificate_is_a_card_error() -> None:
    """An EF holding no certificate (zeros) is CardError "unreadable"/"no certificate", not a
    ValueError escaping from the x509 parser."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.card.jpki import JpkiCard

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for garbage in (b"\x00" * 2048, b"\x30\x03\x02\x01\x05" + b"\x00" * 100):
        applet = JpkiApplet(auth_key=key, auth_cert_der=garbage, auth_ca_der=b"", pin="1234")
        with pytest.raises(CardError) as e:
            JpkiCard(Recording(applet)).read_auth_certificate()
        assert e.value.code is CardErrorCode.CARD_ERROR, garbage[:8]
