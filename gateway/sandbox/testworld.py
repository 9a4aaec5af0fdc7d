"""A complete, self-made PKI for tests, demos and the sandbox: HPKI, TSA, OCSP, TLS.

The real HPKI CAs will never sign for us, yet every code path (signing, chain checks, mTLS,
revocation) needs certificates that look like the real ones. This module makes the TEST CAs: an
HPKI root and signing CA with the real profile, a facility client CA (the "one .p12 per
facility" world of HPKI.md §6), a TLS server CA, a TSA and an OCSP responder. The issuance,
CRL and PKCS#12 helpers the gateway itself uses live in :mod:`gateway.pki.issue` and are
re-exported here for the tests.

CA keys here are software RSA keys. That is acceptable only because every name says TEST and
nothing here is a trust anchor of the production configuration; the doctors' signing keys
stay in the HSM: :func:`issue_hpki_signer_cert` takes just a public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import PkiError
from gateway.pki import issue
from gateway.pki.hpki import SIGNING_CA_POLICY
from gateway.pki.issue import (
    CA_KEY_USAGE,
    TEST_SIGN_CRL_URL,
    CertAndKey,
    aki,
    authority_information_access,
    aware,
    crl_distribution_points,
    issue_client_cert,
    key_usage,
    leaf_builder,
    make_crl,
    new_key,
    pkcs12_bytes,
    random_serial,
    self_signed_ca,
    ski,
)

__all__ = [
    "HPKI_TEST_ORGANIZATION",
    "TEST_ROOT_ARL_URL",
    "TEST_SIGN_CRL_URL",
    "CertAndKey",
    "issue_client_cert",
    "issue_hpki_signer_cert",
    "issue_ocsp_responder_cert",
    "issue_server_cert",
    "issue_tsa_cert",
    "make_client_ca",
    "make_crl",
    "make_hpki_root",
    "make_hpki_signing_ca",
    "make_server_ca",
    "make_tsa_ca",
    "new_key",
    "pkcs12_bytes",
    "random_serial",
]

HPKI_TEST_ORGANIZATION = "HPKI TEST - hpki-gateway sandbox"
# ".invalid" (RFC 2606) can never resolve: a test certificate cannot make anything fetch the
# real internet. Tests that serve CRLs themselves pass their own URL.
TEST_ROOT_ARL_URL = "http://hpki-test.invalid/rlist/sarl.crl"

_ROOT_VALIDITY = dt.timedelta(days=20 * 365)
_CA_VALIDITY = dt.timedelta(days=10 * 365)


def issue_hpki_signer_cert(
    ca: CertAndKey, *, crl_url: str | None = None, **profile: Any
) -> x509.Certificate:
    """:func:`gateway.pki.issue.issue_hpki_signer_cert` with the test world's CRL URL by default."""
    return issue.issue_hpki_signer_cert(ca, crl_url=crl_url or TEST_SIGN_CRL_URL, **profile)


# --------------------------------------------------------------------------------------------
# HPKI
# --------------------------------------------------------------------------------------------


def make_hpki_root(*, now: dt.datetime) -> CertAndKey:
    """A stand-in for the MHLW HPKI Root CA, valid 20 years from ``now``."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "HPKI TEST Root CA - hpki-gateway sandbox"),
        ]
    )
    return self_signed_ca(name, now=now, validity=_ROOT_VALIDITY)


def make_hpki_signing_ca(
    root: CertAndKey,
    *,
    now: dt.datetime,
    crl_url: str = TEST_ROOT_ARL_URL,
    ca_issuers_url: str | None = None,
) -> CertAndKey:
    """A stand-in for HPKI-01-MedisSignCA2-forNonRepudiation, 10 years, issued by ``root``;
    ``ca_issuers_url`` adds an AIA entry naming where the root's certificate is served."""
    now = aware(now)
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "HPKI TEST CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, "HPKI TEST Signing CA - hpki-gateway sandbox"),
        ]
    )
    not_after = min(now + _CA_VALIDITY, root.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(aki(root.cert), critical=False)
        .add_extension(ski(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.CertificatePolicies(
                [x509.PolicyInformation(x509.ObjectIdentifier(SIGNING_CA_POLICY), None)]
            ),
            critical=True,
        )
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(crl_distribution_points(crl_url), critical=False)
    )
    aia = authority_information_access(ca_issuers_url=ca_issuers_url)
    if aia is not None:
        builder = builder.add_extension(aia, critical=False)
    return CertAndKey(cert=builder.sign(root.key, hashes.SHA256()), key=key)


def issue_ocsp_responder_cert(
    ca: CertAndKey, *, now: dt.datetime, validity: dt.timedelta = dt.timedelta(days=365)
) -> CertAndKey:
    """A delegated OCSP responder of ``ca`` (RFC 6960 §4.2.2.2): EKU id-kp-OCSPSigning."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "TEST OCSP responder - hpki-gateway sandbox"),
        ]
    )
    key = new_key()
    cert = (
        leaf_builder(ca, subject, key, now=now, validity=validity)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


# --------------------------------------------------------------------------------------------
# Facility client certificates (mTLS) and TLS server certificates
# --------------------------------------------------------------------------------------------


def make_client_ca(
    *, now: dt.datetime, name: str = "Facility Client TEST CA - hpki-gateway sandbox"
) -> CertAndKey:
    """The CA that issues facility client certificates (self-signed, 20 years)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    return self_signed_ca(subject, now=now, validity=_ROOT_VALIDITY)


def make_server_ca(*, now: dt.datetime) -> CertAndKey:
    """The CA of the gateway's own TLS server certificates in tests (self-signed, 20 years)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "TLS Server TEST CA - hpki-gateway sandbox"),
        ]
    )
    return self_signed_ca(subject, now=now, validity=_ROOT_VALIDITY)


def issue_server_cert(
    ca: CertAndKey,
    *,
    hostnames: list[str],
    ips: list[str],
    now: dt.datetime,
    validity: dt.timedelta,
) -> CertAndKey:
    """A TLS server certificate that Python's ssl and cryptography's web-PKI verifier accept."""
    if not hostnames and not ips:
        raise PkiError("a server certificate needs at least one hostname or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hostnames or ips)[0])])
    key = new_key()
    cert = (
        leaf_builder(ca, subject, key, now=now, validity=validity)
        .add_extension(key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


# --------------------------------------------------------------------------------------------
# CRLs and PKCS#12
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Timestamp authority (the sandbox's test TSA)
# --------------------------------------------------------------------------------------------


def make_tsa_ca(*, now: dt.datetime) -> CertAndKey:
    """The root of the sandbox's TEST TSA (self-signed, 20 years).

    Separate from the HPKI test root on purpose: real deployments trust a commercial TSA whose
    root has nothing to do with HPKI, and verification keeps the two trust lists apart.
    """
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "TSA TEST Root CA - hpki-gateway sandbox"),
        ]
    )
    return self_signed_ca(subject, now=now, validity=_ROOT_VALIDITY)


def issue_tsa_cert(
    ca: CertAndKey,
    *,
    now: dt.datetime,
    validity: dt.timedelta = _CA_VALIDITY,
    ocsp_url: str | None = None,
) -> CertAndKey:
    """A TSA certificate as RFC 3161 §2.3 requires: critical EKU with only timeStamping;
    ``ocsp_url`` names an OCSP responder for it in the AIA (the sandbox's own TSA has none)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "TEST TSA - hpki-gateway sandbox"),
        ]
    )
    key = new_key()
    builder = (
        leaf_builder(ca, subject, key, now=now, validity=validity)
        .add_extension(key_usage(digital_signature=True, non_repudiation=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
    )
    aia = issue.authority_information_access(ocsp_url=ocsp_url)
    if aia is not None:
        builder = builder.add_extension(aia, critical=False)
    return CertAndKey(cert=builder.sign(ca.key, hashes.SHA256()), key=key)
