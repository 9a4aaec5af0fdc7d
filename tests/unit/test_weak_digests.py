"""SHA-1 and MD5 are refused in CMS signatures and in the signing-certificate binding.

The signatures are real (RSA over the DER of the signed attributes) and chain to a TEST HPKI
CA, so only the digest algorithm decides."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib

import pytest
from asn1crypto import tsp
from cryptography.hazmat.primitives import hashes, serialization

from gateway.verify import VerificationReport, verify_document
from tests.support import cms_forge
from tests.support.softkey import World, make_world

CONTENT = b"1,Rx,Loxonin 60mg,3 tablets\r\n"
_HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}  # noqa: S303 - the refused case


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def _cms(world: World, *, digest: str = "sha256", binding: str = "v2-sha256") -> bytes:
    """An attached CMS SignedData over CONTENT with the given digest and certificate binding."""
    attrs = [
        cms_forge.attribute("content_type", ["data"]),
        cms_forge.attribute("message_digest", [hashlib.new(digest, CONTENT).digest()]),
    ]
    if binding.startswith("v2-"):
        attrs.append(cms_forge.signing_certificate_v2(world, binding.removeprefix("v2-")))
    else:  # ESS signingCertificate (v1): SHA-1 by definition
        der = world.signer_cert.public_bytes(serialization.Encoding.DER)
        cert_hash = hashlib.sha1(der).digest()  # noqa: S324 - the refused binding
        attrs.append(
            cms_forge.attribute(
                "signing_certificate",
                [tsp.SigningCertificate({"certs": [{"cert_hash": cert_hash}]})],
            )
        )
    return cms_forge.signed_cms(world, attrs, content=CONTENT, digest=digest)


def _verify(world: World, data: bytes) -> VerificationReport:
    trust = world.trust()
    return asyncio.run(verify_document(data, trust=trust, now=dt.datetime.now(dt.UTC)))


def test_sha256_everywhere_passes(world: World) -> None:
    rep = _verify(world, _cms(world))
    assert rep.indication == "TOTAL-PASSED", rep.reason


def test_sha1_signature_digest_is_refused(world: World) -> None:
    rep = _verify(world, _cms(world, digest="sha1"))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), rep.reason
    assert "sha1" in rep.reason


@pytest.mark.parametrize("binding", ["v2-sha1", "v2-md5", "v1"])
def test_weak_signing_certificate_binding_is_refused(world: World, binding: str) -> None:
    rep = _verify(world, _cms(world, binding=binding))
    assert (rep.indication, rep.sub_indication) == (
        "INDETERMINATE",
        "NO_SIGNING_CERTIFICATE_FOUND",
    ), rep.reason
    assert "SHA-256/384/512" in rep.reason
