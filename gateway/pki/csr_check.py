"""Checks on a PKCS#10 request a facility sends to renew its own client certificate (EST).

The facility makes its key and the request; the gateway certifies the key, never the request's
wishes: the subject and the extensions of the new certificate are the profile's
(:func:`gateway.pki.issue.client_cert_for_key`). A request is refused, with the reason, when its
signature does not verify (no proof of possession), its key is weak, it names a subject other
than the current certificate's (another facility, another terminal), or it asks for extensions
beyond the profile (a CA flag, other usages, alternative names). A part cryptography cannot
read (an extension given twice, a malformed value, an unknown algorithm) is refused naming it.
Reuse of a key is checked by the caller against the store (every certified key's SHA-256 is
recorded).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import InvalidRequest

_T = TypeVar("_T")

MAX_CSR_BYTES = 16 * 1024
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
WEAK_HASHES = (hashes.MD5, hashes.SHA1, hashes.SHA224)
_PEM = re.compile(rb"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----(.*?)-----END", re.S)
# The subject attributes the profile writes; any other one in a request is beyond it.
_PROFILE_ATTRIBUTES = {
    NameOID.COUNTRY_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.COMMON_NAME,
    NameOID.SERIAL_NUMBER,
}


def decode_request(body: bytes) -> x509.CertificateSigningRequest:
    """An EST body (RFC 7030 §4.2.1: base64 of the DER request); PEM and raw DER are taken
    too, since ``openssl req`` writes PEM and some clients skip the base64 step."""
    if len(body) > MAX_CSR_BYTES:
        raise InvalidRequest(f"the certificate request is over {MAX_CSR_BYTES} bytes")
    m = _PEM.search(body)
    if m is not None:
        der = _b64(m.group(1))
    elif body[:1] == b"\x30":
        der = body
    else:
        der = _b64(body)
    try:
        return x509.load_der_x509_csr(der)
    except ValueError as e:
        raise InvalidRequest(f"the body is not a PKCS#10 certificate request: {e}") from None


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "the body is not a base64-encoded PKCS#10 request (RFC 7030 §4.2.1)"
        ) from None


def spki_sha256(csr: x509.CertificateSigningRequest) -> str:
    der = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


#: What cryptography raises when a part of a loaded request, parsed on first access, cannot
#: be read: a malformed value (ValueError), an algorithm it does not know (UnsupportedAlgorithm),
#: an extension given twice (DuplicateExtension), a general name type it does not know.
_UNREADABLE = (
    ValueError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def _read(what: str, read: Callable[[], _T]) -> _T:
    """A part of the request, or :class:`InvalidRequest` naming the part that cannot be read
    (before, a correctly signed request with e.g. keyUsage twice was a 500, not audited)."""
    try:
        return read()
    except _UNREADABLE as e:
        raise InvalidRequest(f"the request's {what} cannot be read ({e})") from None


def check_request(
    csr: x509.CertificateSigningRequest, *, current: x509.Certificate, min_rsa_bits: int
) -> None:
    """Raise :class:`InvalidRequest` with the reason when ``csr`` cannot renew ``current``."""
    if not _read("signature", lambda: csr.is_signature_valid):
        raise InvalidRequest("the request's signature does not verify (proof of possession)")
    algo = _read("signature algorithm", lambda: csr.signature_hash_algorithm)
    if algo is None or isinstance(algo, WEAK_HASHES):
        raise InvalidRequest(
            f"the request is signed with {algo.name if algo else 'no digest'}: use SHA-256 "
            "or stronger"
        )
    _check_key(csr, min_rsa_bits)
    _check_subject(_read("subject", lambda: csr.subject), current.subject)
    _check_extensions(csr)


def _check_key(csr: x509.CertificateSigningRequest, min_rsa_bits: int) -> None:
    key = _read("key", csr.public_key)
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < min_rsa_bits:
            raise InvalidRequest(
                f"the request's RSA key has {key.key_size} bits; at least {min_rsa_bits} "
                "are required"
            )
        if key.key_size > 8192:
            raise InvalidRequest("the request's RSA key is over 8192 bits")
        if key.public_numbers().e < 65537:
            raise InvalidRequest("the request's RSA key has a public exponent below 65537")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise InvalidRequest(
                f"the request's EC key is on curve {key.curve.name}: use P-256, P-384 or P-521"
            )
        return
    raise InvalidRequest(f"the request's key type {type(key).__name__} is not RSA or EC")


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def _check_subject(subject: x509.Name, current: x509.Name) -> None:
    """An empty subject is fine (the gateway writes it); a given one must be the current one."""
    for attr in subject:
        if attr.oid not in _PROFILE_ATTRIBUTES:
            raise InvalidRequest(
                f"the request's subject carries {attr.oid.dotted_string} "
                f"({attr.oid._name}), which the client certificate profile does not have"
            )
    code = _values(current, NameOID.SERIAL_NUMBER)
    asked = _values(subject, NameOID.SERIAL_NUMBER)
    if asked and asked != code:
        raise InvalidRequest(
            f"the request names institution code {asked[0]}, but this certificate belongs to "
            f"{code[0] if code else 'another owner'}: a facility renews only its own certificate"
        )
    for oid, what in (
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "terminal (OU)"),
        (NameOID.COMMON_NAME, "name (CN)"),
        (NameOID.ORGANIZATION_NAME, "organisation (O)"),
    ):
        asked = _values(subject, oid)
        if asked and asked != _values(current, oid):
            raise InvalidRequest(
                f"the request's {what} {asked[0]!r} is not the current certificate's "
                f"{(_values(current, oid) or ['(none)'])[0]!r}"
            )
    if _values(subject, NameOID.COUNTRY_NAME) not in ([], ["JP"]):
        raise InvalidRequest("the request's country (C) must be JP")


def _check_extensions(csr: x509.CertificateSigningRequest) -> None:
    for ext in _read("extensions", lambda: csr.extensions):
        v = ext.value
        if isinstance(v, x509.KeyUsage):
            wanted = {
                name
                for name in (
                    "digital_signature",
                    "content_commitment",
                    "key_encipherment",
                    "data_encipherment",
                    "key_agreement",
                    "key_cert_sign",
                    "crl_sign",
                )
                if getattr(v, name)
            }
            if wanted - {"digital_signature", "key_encipherment"}:
                raise InvalidRequest(
                    f"the request asks for key usages {sorted(wanted)}; the profile has "
                    "digitalSignature only"
                )
        elif isinstance(v, x509.ExtendedKeyUsage):
            if list(v) != [ExtendedKeyUsageOID.CLIENT_AUTH]:
                raise InvalidRequest(
                    "the request asks for extended key usages beyond clientAuth: "
                    + ", ".join(o.dotted_string for o in v)
                )
        elif isinstance(v, x509.BasicConstraints):
            if v.ca:
                raise InvalidRequest("the request asks for a CA certificate (basicConstraints)")
        else:
            raise InvalidRequest(
                f"the request asks for the extension {ext.oid.dotted_string} "
                f"({ext.oid._name}), which the client certificate profile does not have"
            )
