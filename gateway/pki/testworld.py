"""A complete, self-made PKI for tests, demos and the sandbox: HPKI, facility clients, TLS.

The real HPKI CAs will never sign for us, yet every code path (signing, chain checks, mTLS,
revocation) needs certificates that look like the real ones. This module makes them: an HPKI
root and signing CA with the real profile, a facility client CA (the "one .p12 per facility"
world of HPKI.md §6), a TLS server CA, CRLs and PKCS#12 bundles.

CA keys here are software RSA keys. That is acceptable only because every name says TEST and
nothing here is a trust anchor of the production configuration; the doctors' signing keys
stay in the HSM: :func:`issue_hpki_signer_cert` takes just a public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from gateway.errors import PkiError
from gateway.pki.hpki import (
    HPKI_SIGNING_EE_POLICY,
    SIGNING_CA_POLICY,
    SUBJECT_DIRECTORY_ATTRIBUTES_OID,
    build_hcrole_extension_value,
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
    "pkcs12_bytes",
    "random_serial",
]

HPKI_TEST_ORGANIZATION = "HPKI TEST - hpki-gateway sandbox"
# ".invalid" (RFC 2606) can never resolve: a test certificate cannot make anything fetch the
# real internet. Tests that serve CRLs themselves pass their own URL.
TEST_ROOT_ARL_URL = "http://hpki-test.invalid/rlist/sarl.crl"
TEST_SIGN_CRL_URL = "http://hpki-test.invalid/sign/crl-sign.crl"

_CA_KEY_BITS = 2048
_ROOT_VALIDITY = dt.timedelta(days=20 * 365)
_CA_VALIDITY = dt.timedelta(days=10 * 365)
_PKCS12_KDF_ROUNDS = 200_000


@dataclass
class CertAndKey:
    """A certificate with its software private key (test world only)."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8: what ssl.SSLContext.load_cert_chain and openssl read directly."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files; the key is created 0600 so it is never readable by others."""
        cert_path.write_bytes(self.cert_pem())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            # An existing file keeps its old mode through O_CREAT: tighten it before writing.
            os.fchmod(f.fileno(), 0o600)
            f.write(self.key_pem())


def random_serial() -> int:
    """A random positive 128-bit serial: unguessable, and at most 17 DER octets (limit 20)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _new_key(bits: int = _CA_KEY_BITS) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise PkiError("the test world needs timezone-aware datetimes")
    return now.astimezone(dt.UTC).replace(microsecond=0)


def _ski(public_key: rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        issuer_key = issuer.public_key()
        if not isinstance(issuer_key, rsa.RSAPublicKey):
            raise PkiError("test-world issuers are RSA") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _crl_dp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _key_usage(
    *,
    digital_signature: bool = False,
    non_repudiation: bool = False,
    key_encipherment: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=non_repudiation,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _self_signed_ca(name: x509.Name, *, now: dt.datetime, validity: dt.timedelta) -> CertAndKey:
    now = _aware(now)
    key = _new_key()
    ski = _ski(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


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
    return _self_signed_ca(name, now=now, validity=_ROOT_VALIDITY)


def make_hpki_signing_ca(
    root: CertAndKey, *, now: dt.datetime, crl_url: str = TEST_ROOT_ARL_URL
) -> CertAndKey:
    """A stand-in for HPKI-01-MedisSignCA2-forNonRepudiation, 10 years, issued by ``root``."""
    now = _aware(now)
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "HPKI TEST CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, "HPKI TEST Signing CA - hpki-gateway sandbox"),
        ]
    )
    not_after = min(now + _CA_VALIDITY, root.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(_aki(root.cert), critical=False)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.CertificatePolicies(
                [x509.PolicyInformation(x509.ObjectIdentifier(SIGNING_CA_POLICY), None)]
            ),
            critical=True,
        )
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(_crl_dp(crl_url), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


def issue_hpki_signer_cert(
    ca: CertAndKey,
    *,
    public_key_der: bytes,
    name_romaji: str,
    name_kanji: str,
    role: str,
    organization: str,
    serial_number_attr: str,
    now: dt.datetime,
    validity_days: int = 5 * 365,
    crl_url: str | None = None,
    organization_kanji: str | None = None,
    ocsp_url: str | None = None,
) -> x509.Certificate:
    """A doctor's signing certificate with the real MEDIS profile, for a key held elsewhere.

    Subject in romaji, kanji in a SAN directoryName (``organization_kanji`` defaults to
    ``organization``), hcRole ``role``, critical policy and keyUsage as in HPKI.md §2.
    ``crl_url=None`` means the test-world CRL URL: real HPKI certificates always carry one.
    ``ocsp_url`` adds an AIA extension naming that OCSP responder (real HPKI certificates have
    none; it exercises the OCSP path of verification).
    """
    now = _aware(now)
    try:
        public_key = serialization.load_der_public_key(public_key_der)
    except ValueError as e:
        raise PkiError(f"public key is not a valid SubjectPublicKeyInfo: {e}") from e
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise PkiError(f"HPKI signing keys are RSA, got {type(public_key).__name__}")

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, name_romaji),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number_attr),
        ]
    )
    kanji_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization_kanji or organization),
            x509.NameAttribute(NameOID.COMMON_NAME, name_kanji),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number_attr),
        ]
    )
    not_after = min(now + dt.timedelta(days=validity_days), ca.cert.not_valid_after_utc)
    # Extension order and criticality copied from the real MEDIS certificate.
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(_aki(ca.cert), critical=False)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_key_usage(non_repudiation=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DirectoryName(kanji_name)]), critical=False
        )
        .add_extension(_crl_dp(crl_url or TEST_SIGN_CRL_URL), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(
                SUBJECT_DIRECTORY_ATTRIBUTES_OID, build_hcrole_extension_value(role)
            ),
            critical=False,
        )
        .add_extension(
            x509.CertificatePolicies(
                [x509.PolicyInformation(x509.ObjectIdentifier(HPKI_SIGNING_EE_POLICY), None)]
            ),
            critical=True,
        )
    )
    if ocsp_url is not None:
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
    return builder.sign(ca.key, hashes.SHA256())


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
    key = _new_key()
    cert = (
        _leaf_builder(ca, subject, key, now=now, validity=validity)
        .add_extension(_key_usage(digital_signature=True), critical=True)
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
    return _self_signed_ca(subject, now=now, validity=_ROOT_VALIDITY)


def _leaf_builder(
    ca: CertAndKey,
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    *,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateBuilder:
    now = _aware(now)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_aki(ca.cert), critical=False)
        .add_extension(_ski(key.public_key()), critical=False)
    )


def issue_client_cert(
    ca: CertAndKey,
    *,
    common_name: str,
    institution_code: str | None,
    organization: str | None = None,
    terminal_label: str | None = None,
    now: dt.datetime,
    validity: dt.timedelta,
    key_size: int = 2048,
) -> CertAndKey:
    """A facility (or terminal) client certificate for mTLS.

    The institution code goes into the subject serialNumber because the registry keys
    facilities on it (HPKI.md §6); a terminal label ("総合受付 端末01") goes into OU.
    """
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "JP")]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if terminal_label:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, terminal_label))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if institution_code:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, institution_code))
    key = _new_key(key_size)
    cert = (
        _leaf_builder(ca, x509.Name(attrs), key, now=now, validity=validity)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


def make_server_ca(*, now: dt.datetime) -> CertAndKey:
    """The CA of the gateway's own TLS server certificates in tests (self-signed, 20 years)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "TLS Server TEST CA - hpki-gateway sandbox"),
        ]
    )
    return _self_signed_ca(subject, now=now, validity=_ROOT_VALIDITY)


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
    key = _new_key()
    cert = (
        _leaf_builder(ca, subject, key, now=now, validity=validity)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


# --------------------------------------------------------------------------------------------
# CRLs and PKCS#12
# --------------------------------------------------------------------------------------------


def make_crl(
    ca: CertAndKey,
    *,
    revoked: list[tuple[int, dt.datetime, x509.ReasonFlags | None]],
    now: dt.datetime,
    next_update: dt.timedelta,
) -> x509.CertificateRevocationList:
    """A CRL of ``ca`` listing ``(serial, revocation time, reason)``.

    The CRL number is the issue time in seconds, so a CRL made in a later second numbers higher,
    as RFC 5280 §5.2.3 requires, without keeping a counter anywhere.
    """
    now = _aware(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(_aki(ca.cert), critical=False)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for serial, when, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_aware(when))
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256())


def pkcs12_bytes(
    leaf: CertAndKey,
    *,
    chain: list[x509.Certificate],
    password: bytes,
    friendly_name: bytes,
) -> bytes:
    """The ``client.<service>.p12`` a facility downloads.

    PBES2 (PBKDF2-SHA256, AES-256-CBC) with an HMAC-SHA256 MAC: OpenSSL 3 refuses the legacy
    RC2/3DES PKCS#12 without its legacy provider, and Windows 10 1709+ / macOS read this form.
    """
    if not password:
        raise PkiError("a PKCS#12 bundle must be password-protected")
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(_PKCS12_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(
        friendly_name, leaf.key, leaf.cert, chain or None, encryption
    )


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
    return _self_signed_ca(subject, now=now, validity=_ROOT_VALIDITY)


def issue_tsa_cert(
    ca: CertAndKey, *, now: dt.datetime, validity: dt.timedelta = _CA_VALIDITY
) -> CertAndKey:
    """A TSA certificate as RFC 3161 §2.3 requires: critical EKU with only timeStamping."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, HPKI_TEST_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "TEST TSA - hpki-gateway sandbox"),
        ]
    )
    key = _new_key()
    cert = (
        _leaf_builder(ca, subject, key, now=now, validity=validity)
        .add_extension(_key_usage(digital_signature=True, non_repudiation=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)
