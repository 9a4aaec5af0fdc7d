"""CMS SignedData built by hand for verification tests: real RSA signatures by the software
world's signer key over exactly the signed attributes a test gives, so that only the property a
test changes decides the verdict."""

from __future__ import annotations

import hashlib

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from tests.support.softkey import World

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - the refused case of the weak-digest tests
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def attribute(kind: str, values: list[object]) -> cms.CMSAttribute:
    return cms.CMSAttribute({"type": kind, "values": values})


def signing_certificate_v2(world: World, alg: str = "sha256") -> cms.CMSAttribute:
    """The signer certificate bound by its ``alg`` digest (RFC 5035)."""
    der = world.signer_cert.public_bytes(serialization.Encoding.DER)
    cert_id = {"hash_algorithm": {"algorithm": alg}, "cert_hash": hashlib.new(alg, der).digest()}
    return attribute("signing_certificate_v2", [{"certs": [cert_id]}])


def signed_cms(
    world: World, attrs: list[cms.CMSAttribute], *, content: bytes, digest: str = "sha256"
) -> bytes:
    """An attached SignedData over ``content`` whose one SignerInfo signs exactly ``attrs``
    (DER, as a SET) with the signer's key, ``digest`` its digest algorithm."""
    signed_attrs = cms.CMSAttributes(attrs)
    signature = world.signer_key.sign(signed_attrs.dump(), padding.PKCS1v15(), _HASHES[digest])
    cert = asn1_x509.Certificate.load(world.signer_cert.public_bytes(serialization.Encoding.DER))
    ca = asn1_x509.Certificate.load(world.ca.cert.public_bytes(serialization.Encoding.DER))
    sid = {"issuer_and_serial_number": {"issuer": cert.issuer, "serial_number": cert.serial_number}}
    si = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(sid),
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
            "encap_content_info": {"content_type": "data", "content": core.OctetString(content)},
            "certificates": [cert, ca],
            "signer_infos": [si],
        }
    )
    der: bytes = cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()
    return der
