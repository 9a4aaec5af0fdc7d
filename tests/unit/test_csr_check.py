"""The checks on a renewal request (gateway/pki/csr_check.py), one refusal reason each."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import InvalidRequest
from gateway.pki import csr_check
from gateway.pki.issue import client_subject, issue_client_cert
from gateway.sandbox import testworld

NOW = datetime(2026, 11, 1, tzinfo=UTC)
CODE = "1310000011"


@pytest.fixture(scope="module")
def current() -> x509.Certificate:
    ca = testworld.make_client_ca(now=NOW - timedelta(days=1))
    return issue_client_cert(
        ca,
        common_name="TEST clinic",
        institution_code=CODE,
        terminal_label="受付 端末01",
        now=NOW,
        validity=timedelta(days=90),
    ).cert


def build(
    subject: x509.Name,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    *,
    extensions: list[x509.ExtensionType] = (),  # type: ignore[assignment]
    digest: hashes.HashAlgorithm | None = None,
) -> x509.CertificateSigningRequest:
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    b = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for e in extensions:
        b = b.add_extension(e, critical=False)
    return b.sign(key, digest or hashes.SHA256())


def same(current: x509.Certificate) -> x509.Name:
    return current.subject


def check(csr: x509.CertificateSigningRequest, current: x509.Certificate) -> None:
    csr_check.check_request(csr, current=current, min_rsa_bits=2048)


def test_good_requests_pass(current: x509.Certificate) -> None:
    check(build(same(current)), current)
    check(build(x509.Name([])), current)  # the gateway writes the subject
    check(build(same(current), ec.generate_private_key(ec.SECP384R1())), current)
    check(
        build(
            same(current),
            extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
        ),
        current,
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda c: build(
                same(c),
                rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - the weak key under test
            ),
            "1024 bits",
        ),
        (lambda c: build(same(c), ec.generate_private_key(ec.SECP256K1())), "secp256k1"),
        (lambda c: build(same(c), digest=hashes.SHA224()), "sha224"),
        (
            lambda c: build(
                client_subject(
                    common_name="TEST clinic",
                    institution_code="1319999999",
                    terminal_label="受付 端末01",
                )
            ),
            "1319999999",
        ),
        (
            lambda c: build(
                client_subject(
                    common_name="TEST clinic", institution_code=CODE, terminal_label="薬局 端末02"
                )
            ),
            "terminal (OU)",
        ),
        (
            lambda c: build(x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@b.jp")])),
            "emailAddress",
        ),
        (
            lambda c: build(
                same(c), extensions=[x509.SubjectAlternativeName([x509.DNSName("evil.example")])]
            ),
            "subjectAltName",
        ),
        (
            lambda c: build(
                same(c), extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])]
            ),
            "beyond clientAuth",
        ),
        (
            lambda c: build(same(c), extensions=[x509.BasicConstraints(ca=True, path_length=None)]),
            "CA certificate",
        ),
        (
            lambda c: build(
                same(c),
                extensions=[
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    )
                ],
            ),
            "key_cert_sign",
        ),
    ],
)
def test_bad_requests_are_refused_with_the_reason(
    current: x509.Certificate, make: object, reason: str
) -> None:
    csr = make(current)  # type: ignore[operator]
    with pytest.raises(InvalidRequest, match=re.escape(reason)):
        check(csr, current)


def test_body_encodings(current: x509.Certificate) -> None:
    csr = build(same(current))
    der = csr.public_bytes(serialization.Encoding.DER)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    for body in (base64.encodebytes(der), der, pem):
        assert csr_check.decode_request(body).public_bytes(serialization.Encoding.DER) == der
    for bad in (b"not base64 !!", base64.b64encode(b"\x30\x03abc"), b"x" * 20000):
        with pytest.raises(InvalidRequest):
            csr_check.decode_request(bad)
