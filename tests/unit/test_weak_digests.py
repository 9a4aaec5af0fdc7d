"""SHA-1 and MD5 are refused in CMS signatures and in the signing-certificate binding.

The signatures are real (RSA over the DER of the signed attributes) and chain to a TEST HPKI
CA, so only the digest algorithm decides."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib

import pytest
from asn1crypto import algos, cms, core, tsp
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from gateway.verify import TrustConfig, VerificationReport, verify_document
from tests.support.softkey import World, make_world

CONTENT = b"1,Rx,Loxonin 60mg,3 tablets\r\n"
_HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}  # noqa: S303 - the refused case


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def _cms(world: World, *, digest: str = "sha256", binding: str = "v2-sha256") -> bytes:
    """An attached CMS SignedData over CONTENT with the given digest and certificate binding."""
    der = world.signer_cert.public_bytes(serialization.Encoding.DER)
    cert = asn1_x509.Certificate.load(der)
    attrs = [
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute(
            {"type": "message_digest", "values": [hashlib.new(digest, CONTENT).digest()]}
        ),
    ]
    if binding.startswith("v2-"):
        alg = binding.removeprefix("v2-")
        attrs.append(
            cms.CMSAttribute(
                {
                    "type": "signing_certificate_v2",
                    "values": [
                        {
                            "certs": [
                                {
                                    "hash_algorithm": {"algorithm": alg},
                                    "cert_hash": hashlib.new(alg, der).digest(),
                                }
                            ]
                        }
                    ],
                }
            )
        )
    else:  # ESS signingCertificate (v1): SHA-1 by definition
        attrs.append(
            cms.CMSAttribute(
                {
                    "type": "signing_certificate",
                    "values": [
                        tsp.SigningCertificate(
                            {"certs": [{"cert_hash": hashlib.sha1(der).digest()}]}  # noqa: S324
                        )
                    ],
                }
            )
        )
    signed_attrs = cms.CMSAttributes(attrs)
    signature = world.signer_key.sign(signed_attrs.dump(), padding.PKCS1v15(), _HASHES[digest])
    si = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": {
                        "issuer": cert.issuer,
                        "serial_number": cert.serial_number,
                    }
                }
            ),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": digest}),
            "signed_attrs": signed_attrs,
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}),
            "signature": signature,
        }
    )
    sd = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": digest})],
            "encap_content_info": {"content_type": "data", "content": core.OctetString(CONTENT)},
            "certificates": [cert],
            "signer_infos": [si],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()


def _verify(world: World, data: bytes) -> VerificationReport:
    trust = TrustConfig(
        anchors=[world.root.cert], intermediates=[world.ca.cert], check_revocation=False
    )
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
