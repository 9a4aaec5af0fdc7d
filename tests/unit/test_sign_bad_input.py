"""Bad input to signing and verification: a clear 4xx error, nothing signed, never a 500."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.api.sign_doc_schema import SignDocRequest
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.hsm.api import DigestAlgorithm
from gateway.sign.cades import der_length, der_tlv
from gateway.sign.eprescription import decode_csv
from gateway.sign.service import SigningPolicy, document_digests, sign_document
from gateway.sign.xades import parse_untrusted
from gateway.verify import TrustConfig, verify_document
from tests.support.softkey import make_world


class RecordingKey:
    """A KeyHandle that must never be used by a refused request."""

    calls = 0

    @property
    def key_id(self) -> str:
        return "recording"

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        self.calls += 1
        return b"\x00" * 256

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        self.calls += len(digests)
        return [b"\x00" * 256 for _ in digests]


@pytest.fixture(scope="module")
def world() -> Any:
    return make_world()


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">]>
<lolz>&lol2;</lolz>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><foo>&xxe;</foo>"""
DEEP = b"<a>" * 5000 + b"</a>" * 5000
# UTF-16LE without a BOM: "<!DOCTYPE" is not in the bytes, so only the parsed tree shows it.
XXE_UTF16 = (
    '<?xml version="1.0" encoding="UTF-16"?>'
    '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/hostname">]><d id="a"><e>&x;</e></d>'
).encode("utf-16-le")
INTERNAL_UTF16 = (
    '<?xml version="1.0" encoding="UTF-16"?>'
    '<!DOCTYPE d [<!ENTITY x "INTERNAL">]><d id="a"><e>&x;</e></d>'
).encode("utf-16-le")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not xml at all", "is not XML"),
        (b"<a><b></a>", "not well-formed"),
        (BOMB, "DTD or entity"),
        (XXE, "DTD or entity"),
        (DEEP, "nested deeper than 64"),
        (XXE_UTF16, "DTD or entity"),
        (INTERNAL_UTF16, "DTD or entity"),
    ],
    ids=[
        "not-xml",
        "malformed",
        "entity-bomb",
        "external-entity",
        "deep-nesting",
        "utf16le-external-entity",
        "utf16le-internal-entity",
    ],
)
def test_untrusted_xml_is_refused_before_it_costs(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_untrusted(data, max_depth=64)


@pytest.mark.parametrize(
    ("data", "encoding", "message"),
    [
        ("処方".encode("cp932"), "utf-8", "not valid utf-8"),
        ("処方\u2603".encode(), "shift_jis", "not valid shift_jis"),
        (b"", "utf-8", "empty"),
        (b"1,a\x00b", "utf-8", "NUL"),
        (b"1,a", "latin-9", "unknown CSV encoding"),
    ],
)
def test_csv_must_be_what_it_says(data: bytes, encoding: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_csv(data, encoding)


def test_shift_jis_csv_is_accepted() -> None:
    assert decode_csv("1,処方\r\n".encode("cp932"), "shift_jis") == [["1", "処方"]]


CASES: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"signature_format": "J"}, InvalidRequest, "unsupported signature_format 'J'"),
    ({"conformance_level": "AdES-B-LTX"}, InvalidRequest, "unsupported conformance_level"),
    ({"conformance_level": "ES-A"}, InvalidRequest, "unsupported conformance_level 'ES-A'"),
    ({"envelope": "Enveloped"}, InvalidRequest, "not valid for signature_format C"),
    ({"conformance_level": "AdES-B-T"}, InvalidRequest, "no"),
    ({"document": b"x" * 2048}, PayloadTooLarge, "over the limit of 1024"),
    ({"document": b""}, InvalidRequest, "empty"),
    (
        {"signature_format": "P", "envelope": None, "document": b"GIF89a"},
        InvalidRequest,
        "not a PDF",
    ),
    (
        {"signature_format": "P", "envelope": None, "document": b"%PDF-1.7\n%%EOF"},
        InvalidRequest,
        "not a readable PDF",
    ),
    ({"signature_format": "X", "envelope": "Enveloped", "document": BOMB}, InvalidRequest, "DTD"),
    (
        {
            "signature_format": "X",
            "envelope": "Enveloped",
            "document": b"<a>",
            "profile": "jp-unknown",
        },
        InvalidRequest,
        "unknown profile",
    ),
    (
        {
            "signature_format": "X",
            "envelope": "Enveloped",
            "profile": "jp-eprescription",
            "document": "処方".encode("cp932"),
        },
        InvalidRequest,
        "not valid utf-8",
    ),
    ({"document": None, "document_digest": b"short"}, InvalidRequest, "detached CAdES only"),
    (
        {"document": None, "envelope": "Detached", "document_digest": b"short"},
        InvalidRequest,
        "SHA-256",
    ),
]


@pytest.mark.parametrize(("override", "error", "message"), CASES)
def test_refused_requests_sign_nothing(
    world: Any, override: dict[str, Any], error: type[Exception], message: str
) -> None:
    key = RecordingKey()
    kw: dict[str, Any] = {
        "signature_format": "C",
        "conformance_level": "AdES-B-B",
        "envelope": "Attached",
        "document": b"data",
    }
    kw.update(override)
    with pytest.raises(error, match=message):
        asyncio.run(
            sign_document(
                key=key,
                chain=[world.signer_cert, *world.chain],
                tsa=None,
                policy=SigningPolicy(max_document_bytes=1024),
                **kw,
            )
        )
    assert key.calls == 0


def test_sign_doc_schema_and_authorized_digests() -> None:
    doc = base64.b64encode(b"abc").decode()
    digest = base64.b64encode(b"\x01" * 32).decode()
    req = SignDocRequest.model_validate(
        {
            "credentialID": "cred-1",
            "SAD": "s",
            "documents": [
                {"document": doc, "signature_format": "X", "profile": "jp-eprescription"}
            ],
            "documentDigests": [{"hashes": [digest], "signature_format": "C"}],
        }
    )
    import hashlib

    assert req.authorized_digests() == [hashlib.sha256(b"abc").digest(), b"\x01" * 32]
    assert document_digests(documents=[b"abc"]) == [hashlib.sha256(b"abc").digest()]
    with pytest.raises(ValueError, match="base64"):
        SignDocRequest.model_validate(
            {
                "credentialID": "c",
                "SAD": "s",
                "documents": [{"document": "***", "signature_format": "C"}],
            }
        )
    with pytest.raises(ValueError, match="documents or documentDigests"):
        SignDocRequest.model_validate({"credentialID": "c", "SAD": "s"})
    with pytest.raises(ValueError):
        SignDocRequest.model_validate(
            {
                "credentialID": "c",
                "SAD": "s",
                "documents": [
                    {"document": doc, "signature_format": "C", "conformance_level": "AdES-B-LTX"}
                ],
            }
        )


GARBAGE = [
    b"",
    b"\x00",
    b"0\x80",
    b"0\x82\xff\xff" + b"\x00" * 10,
    b"<a/>",
    b"<a>",
    BOMB,
    b"%PDF-1.4\n",
    b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    b"-----BEGIN PKCS7-----\nAAAA\n-----END PKCS7-----\n",
    bytes(range(256)) * 4,
]


def test_utf16_doctype_is_refused_by_the_verifier(world: Any) -> None:
    assert b"<!DOCTYPE" not in XXE_UTF16
    rep = asyncio.run(verify_document(XXE_UTF16, trust=TrustConfig(anchors=[world.root.cert])))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE")
    assert "DTD or entity" in rep.reason
    # without a DTD, the same encoding (and plain UTF-8) still parses
    plain = '<?xml version="1.0" encoding="UTF-16"?><d id="a"><e>x</e></d>'.encode("utf-16-le")
    assert parse_untrusted(plain, max_depth=64).getroot().findtext("e") == "x"
    assert parse_untrusted(b"<a><b>y</b></a>", max_depth=64).getroot().findtext("b") == "y"


@pytest.mark.parametrize("data", GARBAGE)
def test_verifying_garbage_gives_a_report_not_an_exception(world: Any, data: bytes) -> None:
    rep = asyncio.run(verify_document(data, trust=TrustConfig(anchors=[world.root.cert])))
    assert rep.indication in ("TOTAL-FAILED", "INDETERMINATE")
    assert rep.sub_indication is not None and rep.reason


def test_der_helpers_match_asn1crypto() -> None:
    from asn1crypto import core

    for n in (0, 1, 127, 128, 255, 256, 65535, 65536):
        assert der_tlv(0x04, b"\x00" * n) == core.OctetString(b"\x00" * n).dump()
    assert der_length(0x80) == b"\x81\x80"


def test_cades_signed_attributes_are_der_sorted(world: Any) -> None:
    from asn1crypto import cms

    from gateway.sign.cades import CadesTemplate

    tpl = CadesTemplate(certificate=world.signer_cert, chain=world.chain)
    attrs = tpl.signed_attributes(message_digest=b"\x01" * 32, signing_time=dt.datetime.now(dt.UTC))
    parsed = cms.CMSAttributes.load(attrs)
    assert parsed.dump(force=True) == attrs  # asn1crypto's own DER SET OF ordering agrees
