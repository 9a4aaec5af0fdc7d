"""CAdES verification against crafted SignedData that carries a correct signature: a content
given beside an attached one, and content-type signed attributes that do not say what was
signed (RFC 5652 §11.1). Each signature here is made with the signer's real key, so only the
checks named fail."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from asn1crypto import cms

from gateway.verify import verify_document
from tests.support import cms_forge
from tests.support.softkey import World, make_world

CONTENT = b"Rx: 1 tablet"


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


_attr = cms_forge.attribute


def _signed(world: World, attrs: list[cms.CMSAttribute], *, content: bytes = CONTENT) -> bytes:
    """An attached CAdES-style SignedData over ``content`` with exactly ``attrs`` signed."""
    return cms_forge.signed_cms(world, attrs, content=content)


def _verify(world: World, data: bytes, content: bytes | None = None) -> Any:
    trust = world.trust()
    return asyncio.run(verify_document(data, trust=trust, content=content))


def _good_attrs(world: World, content_type: str = "data") -> list[cms.CMSAttribute]:
    return [
        _attr("content_type", [content_type]),
        _attr("message_digest", [hashlib.sha256(CONTENT).digest()]),
        cms_forge.signing_certificate_v2(world),
    ]


def test_the_crafted_signature_itself_passes(world: World) -> None:
    report = _verify(world, _signed(world, _good_attrs(world)))
    assert report.indication == "TOTAL-PASSED", report.to_json_dict()
    assert _verify(world, _signed(world, _good_attrs(world)), CONTENT).indication == "TOTAL-PASSED"


def test_a_content_given_beside_an_attached_one_must_be_it(world: World) -> None:
    """Before, the given content was ignored: "Rx: 50 tablets" verified as TOTAL-PASSED
    against a signature over "Rx: 1 tablet"."""
    report = _verify(world, _signed(world, _good_attrs(world)), b"Rx: 50 tablets")
    sig = report.signatures[0]
    assert (report.indication, sig.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE")
    assert "differs from the content the signature carries" in sig.reason


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        (lambda w: _good_attrs(w)[1:], "no content-type signed attribute"),
        (lambda w: _good_attrs(w, "tst_info"), "is not the encapsulated content's type"),
        (
            lambda w: [_attr("content_type", ["tst_info"]), *_good_attrs(w)],
            "more than one content-type",
        ),
    ],
    ids=["missing", "tst_info-for-data", "two"],
)
def test_the_content_type_attribute_must_say_what_was_signed(
    world: World, attrs: Any, reason: str
) -> None:
    """RFC 5652 §11.1; before, each of these was TOTAL-PASSED."""
    report = _verify(world, _signed(world, attrs(world)))
    sig = report.signatures[0]
    assert (report.indication, sig.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), sig
    assert reason in sig.reason
