"""PKCS#10 requests for keys that live in the HSM.

An HPKI CA (or the test world) certifies a doctor's key from a CSR, and the CSR must be signed
by that key to prove possession. cryptography's CertificateSigningRequestBuilder can only sign
with a private key object it holds, and the HSM never hands the key out, so the request is
assembled with asn1crypto and the signature comes from :meth:`KeyHandle.sign_digest`.
"""

from __future__ import annotations

import hashlib

from asn1crypto import algos, keys, pem
from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.errors import PkiError
from gateway.hsm.api import DigestAlgorithm, KeyHandle

__all__ = ["build_csr", "csr_pem", "public_key_matches"]

_SIGNATURE_ALGORITHMS = {
    DigestAlgorithm.SHA256: "sha256_rsa",
    DigestAlgorithm.SHA384: "sha384_rsa",
    DigestAlgorithm.SHA512: "sha512_rsa",
}
_HASHES: dict[DigestAlgorithm, hashes.HashAlgorithm] = {
    DigestAlgorithm.SHA256: hashes.SHA256(),
    DigestAlgorithm.SHA384: hashes.SHA384(),
    DigestAlgorithm.SHA512: hashes.SHA512(),
}


def _load_rsa_public_key(public_key_der: bytes) -> rsa.RSAPublicKey:
    try:
        public_key = serialization.load_der_public_key(public_key_der)
    except ValueError as e:
        raise PkiError(f"public key is not a valid SubjectPublicKeyInfo: {e}") from e
    if not isinstance(public_key, rsa.RSAPublicKey):
        # KeyHandle.sign_digest is RSA PKCS#1 v1.5 by contract.
        raise PkiError(f"only RSA keys can be certified, got {type(public_key).__name__}")
    return public_key


async def build_csr(
    *,
    public_key_der: bytes,
    subject: x509.Name,
    key: KeyHandle,
    digest: DigestAlgorithm = DigestAlgorithm.SHA256,
) -> bytes:
    """DER of a PKCS#10 request for ``public_key_der``, signed by ``key``.

    The signature is checked against ``public_key_der`` before returning: a key handle and a
    public key that do not belong together (wrong CKA_ID, wrong token) fail here, not later
    at the CA.
    """
    public_key = _load_rsa_public_key(public_key_der)
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": asn1_x509.Name.load(subject.public_bytes()),
            "subject_pk_info": keys.PublicKeyInfo.load(public_key_der),
            "attributes": asn1_csr.CRIAttributes([]),
        }
    )
    tbs: bytes = info.dump()
    signature = await key.sign_digest(hashlib.new(digest.hashlib_name, tbs).digest(), digest)
    try:
        public_key.verify(signature, tbs, padding.PKCS1v15(), _HASHES[digest])
    except InvalidSignature:
        raise PkiError(
            f"the signature of key {key.key_id} does not verify with the given public key: "
            "the key handle and the public key are not a pair"
        ) from None
    request = asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": algos.SignedDigestAlgorithm(
                {"algorithm": _SIGNATURE_ALGORITHMS[digest]}
            ),
            "signature": signature,
        }
    )
    der: bytes = request.dump()
    return der


def public_key_matches(cert: x509.Certificate, public_key_der: bytes) -> bool:
    """Whether ``cert`` certifies ``public_key_der``, compared on the canonical DER encoding.

    Re-encoding both sides makes the comparison immune to BER or parameter-encoding
    differences between what the HSM reports and what the CA wrote.
    """
    try:
        theirs = serialization.load_der_public_key(public_key_der)
    except ValueError as e:
        raise PkiError(f"public key is not a valid SubjectPublicKeyInfo: {e}") from e
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == theirs.public_bytes(*fmt)


def csr_pem(der: bytes) -> str:
    """PEM armour ("CERTIFICATE REQUEST"), the form CAs' upload pages and openssl expect."""
    armored: bytes = pem.armor("CERTIFICATE REQUEST", der)
    return armored.decode("ascii")
