"""JPKI (My Number card) user-authentication certificates: the real roots and a TEST CA.

The real roots of every generation share one subject name (HPKI.md §4), so nothing here or
in :mod:`gateway.auth.jpki` ever picks an issuer by name alone. The TEST CA made here carries
that same name on purpose: the sandbox then has the real-world situation of several anchors
with one DN, and a rogue CA with that DN is a meaningful attack in the tests. It is a trust
anchor only where a configuration names it (the sandbox's ``jpki.trust_anchors``).
"""

from __future__ import annotations

import datetime as dt
import secrets
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from gateway.pki.testworld import CertAndKey, random_serial

JPKI_AUTH_ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "JPKI"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "JPKI for user authentication"),
        x509.NameAttribute(
            NameOID.ORGANIZATIONAL_UNIT_NAME,
            "Japan Agency for Local Authority Information Systems",
        ),
    ]
)
#: Certificate policy of JPKI user-authentication certificates (利用者証明用電子証明書).
JPKI_AUTH_POLICY = x509.ObjectIdentifier("1.2.392.200149.8.5.1.3.30")


def load_auth_roots() -> list[x509.Certificate]:
    """The real JPKI user-authentication roots bundled in ``anchors/jpki_auth`` (public data)."""
    directory = resources.files("gateway.pki").joinpath("anchors/jpki_auth")
    return [
        x509.load_pem_x509_certificate(e.read_bytes())
        for e in sorted(directory.iterdir(), key=lambda e: e.name)
        if e.name.endswith(".pem")
    ]


def _aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("timezone-aware datetimes only")
    return now.astimezone(dt.UTC).replace(microsecond=0)


def make_test_jpki_ca(
    *, now: dt.datetime, validity: dt.timedelta = dt.timedelta(days=10 * 365)
) -> CertAndKey:
    """A self-signed TEST root with the real JPKI authentication root's subject name."""
    now = _aware(now)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(JPKI_AUTH_ROOT_NAME)
        .issuer_name(JPKI_AUTH_ROOT_NAME)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


def issue_auth_cert(
    ca: CertAndKey,
    public_key: rsa.RSAPublicKey,
    *,
    now: dt.datetime,
    validity: dt.timedelta = dt.timedelta(days=5 * 365),
    not_before: dt.datetime | None = None,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
) -> x509.Certificate:
    """A user-authentication certificate as on a My Number card: no name, an opaque CN."""
    now = _aware(now)
    start = _aware(not_before) if not_before is not None else now - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "TEST" + secrets.token_hex(12).upper()),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(start)
        .not_valid_after(start + validity)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.CertificatePolicies([x509.PolicyInformation(JPKI_AUTH_POLICY, None)]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ocsp_url:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
                    )
                ]
            ),
            critical=False,
        )
    if crl_url:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier(crl_url)], None, None, None
                    )
                ]
            ),
            critical=False,
        )
    return builder.sign(ca.key, hashes.SHA256())
