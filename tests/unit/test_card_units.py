"""APDUs, the JPKI applet and card client without PC/SC, card messages, authData parsing."""

from __future__ import annotations

import base64
import datetime as dt
import json
from functools import reduce

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.auth.jpki import parse_auth_data, verify_card_signature
from gateway.card.apdu import ApduFormatError, Command, Response, der_length
from gateway.card.errors import CardError, CardErrorCode
from gateway.card.jpki import JpkiCard, digest_info_sha256
from gateway.errors import InvalidRequest
from gateway.pki.jpki import JPKI_AUTH_ROOT_NAME, load_auth_roots
from gateway.sandbox.jpki import issue_auth_cert, make_test_jpki_ca
from gateway.vcard.applet import make_atr
from gateway.vcard.jpki import JpkiApplet

NOW = dt.datetime.now(dt.UTC)
CA = make_test_jpki_ca(now=NOW)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CERT = issue_auth_cert(CA, KEY.public_key(), now=NOW)
DER = CERT.public_bytes(serialization.Encoding.DER)


class Direct:
    """The applet as a transport: the card client without pcscd (unit level only)."""

    def __init__(self, applet: JpkiApplet) -> None:
        self.applet = applet
        self.sent: list[bytes] = []

    def transmit(self, command: Command) -> Response:
        raw = command.encode()
        self.sent.append(raw)
        return self.applet.process(Command.parse(raw))


def _card(pin: str = "1234") -> tuple[JpkiCard, Direct, JpkiApplet]:
    applet = JpkiApplet(auth_key=KEY, auth_cert_der=DER, auth_ca_der=b"\x30\x00", pin=pin)
    t = Direct(applet)
    return JpkiCard(t), t, applet


@pytest.mark.parametrize(
    ("cmd", "raw"),
    [
        (Command(0, 0xA4, 4, 0x0C, bytes(10)), "00A4040C0A" + "00" * 10),
        (Command(0, 0xB0, 1, 2, le=256), "00B0010200"),
        (Command(0, 0x20, 0, 0x80), "00200080"),
        (Command(0x80, 0x2A, 0, 0x80, b"\x01\x02", le=256), "802A0080020102" + "00"),
        (Command(0, 0x2A, 0x9E, 0x9A, bytes(256), le=256), "002A9E9A000100" + "00" * 256 + "0100"),
        (Command(0, 0xB0, 0, 0, le=65536), "00B00000000000"),
    ],
)
def test_apdu_roundtrip(cmd: Command, raw: str) -> None:
    assert cmd.encode().hex().upper() == raw.upper()
    assert Command.parse(bytes.fromhex(raw)) == cmd


@pytest.mark.parametrize("raw", ["00A4", "00A4040C0500", "00A4040C000002AA"])
def test_apdu_malformed(raw: str) -> None:
    with pytest.raises(ApduFormatError):
        Command.parse(bytes.fromhex(raw))


def test_der_length_and_atr() -> None:
    assert der_length(DER[:8]) == len(DER)
    assert der_length(b"\x30\x05") == 7
    atr = make_atr(b"HPKIGW-JPKI")
    assert atr[0] == 0x3B and reduce(lambda a, b: a ^ b, atr[1:], 0) == 0  # TCK


def test_client_reads_in_chunks_and_signs() -> None:
    card, t, _ = _card()
    assert card.require_my_number_card() == "JPKIAPICCTOKEN2"
    assert card.read_auth_certificate() == DER
    reads = [Command.parse(r) for r in t.sent if r[1] == 0xB0]
    assert all((c.le or 0) <= 256 for c in reads) and len(reads) >= len(DER) // 256
    assert card.auth_pin_tries() == 3
    card.verify_auth_pin("1234")
    sig = card.sign(b"x" * 48)
    KEY.public_key().verify(sig, b"x" * 48, padding.PKCS1v15(), hashes.SHA256())
    verify_card_signature(CERT, b"x" * 48, sig)
    with pytest.raises(InvalidRequest, match="does not verify"):
        verify_card_signature(CERT, b"y" * 48, sig)


def test_pin_tries_and_block_and_format() -> None:
    card, _, applet = _card()
    with pytest.raises(CardError) as e:
        card.verify_auth_pin("12345")
    assert e.value.code is CardErrorCode.PIN_FORMAT and applet.tries_left == 3
    for left in (2, 1):
        with pytest.raises(CardError) as e:
            card.verify_auth_pin("0000")
        assert (e.value.code, e.value.tries_left) == (CardErrorCode.WRONG_PIN, left)
    assert card.auth_pin_tries() == 1  # asking spends nothing
    with pytest.raises(CardError) as e:
        card.verify_auth_pin("0000")
    assert e.value.code is CardErrorCode.PIN_BLOCKED
    assert card.auth_pin_tries() == 0
    with pytest.raises(CardError) as e:
        card.verify_auth_pin("1234")
    assert e.value.code is CardErrorCode.PIN_BLOCKED
    assert "1234" not in repr(applet) and "0000" not in str(e.value)


def test_sign_needs_pin_and_reset_forgets_it() -> None:
    card, _, applet = _card()
    card.select_ap()
    with pytest.raises(CardError, match="PIN not verified"):
        card.sign_digest_info(digest_info_sha256(b"a"))
    card.verify_auth_pin("1234")
    applet.reset()
    card.select_ap()
    with pytest.raises(CardError, match="PIN not verified"):
        card.sign_digest_info(digest_info_sha256(b"a"))


def test_not_a_my_number_card() -> None:
    applet = JpkiApplet(auth_key=KEY, auth_cert_der=DER, auth_ca_der=b"", pin="1234",
                        token="JPKIAPGPSETOKEN")  # fmt: skip
    with pytest.raises(CardError) as e:
        JpkiCard(Direct(applet)).require_my_number_card()
    assert e.value.code is CardErrorCode.NOT_MY_NUMBER_CARD


@pytest.mark.parametrize("code", list(CardErrorCode))
def test_every_card_error_has_both_languages(code: CardErrorCode) -> None:
    e = CardError(code, tries_left=2, detail="SW 6A82")
    ja, en = e.message("ja"), e.message("en")
    assert ja and en and ja != en
    assert any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in ja)
    assert "{" not in ja + en
    assert e.to_json_dict()["error"] == code.value


def test_parse_auth_data() -> None:
    value = {"certificate": base64.b64encode(DER).decode(), "signature": "AAAA",
             "challenge_id": "ab" * 32}  # fmt: skip
    got = parse_auth_data([{"id": "jpki", "value": json.dumps(value)}])
    assert got is not None and got.certificate == CERT and got.signature == b"\0\0\0"
    assert parse_auth_data([{"id": "webauthn", "value": "{}"}]) is None
    for bad in ("not json", json.dumps({**value, "certificate": "%%%"}),
                json.dumps({**value, "certificate": "AAAA"}), json.dumps({"x": 1})):  # fmt: skip
        with pytest.raises(InvalidRequest, match="authData"):
            parse_auth_data([{"id": "jpki", "value": bad}])


def test_real_roots_share_the_dn_of_the_test_ca() -> None:
    roots = load_auth_roots()
    assert len(roots) == 2
    assert {r.subject for r in roots} == {JPKI_AUTH_ROOT_NAME} == {CA.cert.subject}
    keys = {r.public_key().public_numbers().n for r in roots}  # type: ignore[union-attr]
    assert len(keys) == 2
    # A leaf names its issuer only by DN, which fits both real roots: only the key decides.
    assert CERT.issuer == roots[0].subject == roots[1].subject
    for root in roots:
        with pytest.raises(InvalidSignature):
            CERT.verify_directly_issued_by(root)
    CERT.verify_directly_issued_by(CA.cert)
