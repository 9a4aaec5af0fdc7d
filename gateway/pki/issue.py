"""X.509 issuance the gateway itself performs: facility client certificates, CRLs, PKCS#12.

The facility CA (:mod:`gateway.pki.facility_ca`) issues each facility's mTLS client certificate
and publishes its CRL with these helpers; the signer service issues HPKI-profile signing
certificates with them when a sandbox test issuer is configured. The TEST CAs that stand in for
HPKI, the TSA and the OCSP responder are made in :mod:`gateway.sandbox.testworld`, on top of this.

Keys made here are software RSA keys: CA keys of the gateway's own facility CA, and the keys of
facility client certificates that travel to the facility in a PKCS#12. Doctors' signing keys stay
in the HSM: :func:`issue_hpki_signer_cert` takes just a public key.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from gateway.errors import PkiError
from gateway.files import write_private
from gateway.pki.hpki import (
    HPKI_SIGNING_EE_POLICY,
    SUBJECT_DIRECTORY_ATTRIBUTES_OID,
    build_hcrole_extension_value,
)

__all__ = [
    "CA_KEY_USAGE",
    "TEST_SIGN_CRL_URL",
    "CertAndKey",
    "aki",
    "aware",
    "client_cert_for_key",
    "client_subject",
    "crl_distribution_points",
    "issue_client_cert",
    "issue_hpki_signer_cert",
    "key_usage",
    "leaf_builder",
    "make_crl",
    "new_key",
    "pkcs12_bytes",
    "random_serial",
    "self_signed_ca",
    "ski",
]

# The CRL distribution point of signer certificates from a sandbox test issuer: ".invalid"
# (RFC 2606) can never resolve, so a test certificate cannot make anything fetch the internet.
TEST_SIGN_CRL_URL = "http://hpki-test.invalid/sign/crl-sign.crl"

_CA_KEY_BITS = 2048
_PKCS12_KDF_ROUNDS = 200_000


@dataclass
class CertAndKey:
    """A certificate with its software private key (a CA of this gateway, or a test-world key)."""

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
        write_private(key_path, self.key_pem())


def random_serial() -> int:
    """A random positive 128-bit serial: unguessable, and at most 17 DER octets (limit 20)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def new_key(bits: int = _CA_KEY_BITS) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise PkiError("certificate issuance needs timezone-aware datetimes")
    return now.astimezone(dt.UTC).replace(microsecond=0)


def ski(public_key: rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        issuer_key = issuer.public_key()
        if not isinstance(issuer_key, rsa.RSAPublicKey):
            raise PkiError("issuers are RSA") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def crl_distribution_points(url: str) -> x509.CRLDistributionPoints:
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


CA_KEY_USAGE = x509.KeyUsage(
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


def key_usage(
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


def self_signed_ca(name: x509.Name, *, now: dt.datetime, validity: dt.timedelta) -> CertAndKey:
    now = aware(now)
    key = new_key()
    key_id = ski(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert=cert, key=key)


def leaf_builder(
    ca: CertAndKey,
    subject: x509.Name,
    key: rsa.RSAPrivateKey | CertificatePublicKeyTypes,
    *,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateBuilder:
    """A leaf for ``key`` (a private key here, or only the public key of a request), valid
    for ``validity`` but never past its CA's own expiry (RFC 5280 §6.1.3: a path is only
    valid while every certificate in it is; a longer leaf would state a validity it never
    has)."""
    now = aware(now)
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(min(now + validity, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(aki(ca.cert), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def client_subject(
    *,
    common_name: str,
    institution_code: str | None,
    organization: str | None = None,
    terminal_label: str | None = None,
) -> x509.Name:
    """The facility client certificate's subject: C=JP, [O], [OU=terminal], CN, serialNumber."""
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "JP")]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if terminal_label:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, terminal_label))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if institution_code:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, institution_code))
    return x509.Name(attrs)


def client_cert_for_key(
    ca: CertAndKey,
    public_key: CertificatePublicKeyTypes,
    *,
    subject: x509.Name,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.Certificate:
    """A facility client certificate for a key the facility holds (a renewal request's key)."""
    return (
        leaf_builder(ca, subject, public_key, now=now, validity=validity)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
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
    subject = client_subject(
        common_name=common_name,
        institution_code=institution_code,
        organization=organization,
        terminal_label=terminal_label,
    )
    key = new_key(key_size)
    cert = client_cert_for_key(ca, key.public_key(), subject=subject, now=now, validity=validity)
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
    crl_url: str,
    organization_kanji: str | None = None,
    ocsp_url: str | None = None,
    ca_issuers_url: str | None = None,
) -> x509.Certificate:
    """A doctor's signing certificate with the real MEDIS profile, for a key held elsewhere.

    Subject in romaji, kanji in a SAN directoryName (``organization_kanji`` defaults to
    ``organization``), hcRole ``role``, critical policy and keyUsage as in HPKI.md §2.
    ``crl_url`` is the CRL distribution point: real HPKI certificates always carry one.
    ``ocsp_url`` adds an AIA extension naming that OCSP responder (real HPKI certificates have
    none; it exercises the OCSP path of verification); ``ca_issuers_url`` adds the AIA entry
    naming where the issuing CA's certificate (DER) can be fetched.
    """
    now = aware(now)
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
        .add_extension(aki(ca.cert), critical=False)
        .add_extension(ski(public_key), critical=False)
        .add_extension(key_usage(non_repudiation=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DirectoryName(kanji_name)]), critical=False
        )
        .add_extension(crl_distribution_points(crl_url), critical=False)
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
    aia = authority_information_access(ocsp_url=ocsp_url, ca_issuers_url=ca_issuers_url)
    if aia is not None:
        builder = builder.add_extension(aia, critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def authority_information_access(
    *, ocsp_url: str | None = None, ca_issuers_url: str | None = None
) -> x509.AuthorityInformationAccess | None:
    """The AIA extension naming an OCSP responder and/or the issuer's certificate (None: no
    URL given, no extension)."""
    access = [
        x509.AccessDescription(method, x509.UniformResourceIdentifier(url))
        for method, url in (
            (AuthorityInformationAccessOID.OCSP, ocsp_url),
            (AuthorityInformationAccessOID.CA_ISSUERS, ca_issuers_url),
        )
        if url is not None
    ]
    return x509.AuthorityInformationAccess(access) if access else None


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
    now = aware(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(aki(ca.cert), critical=False)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for serial, when, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(aware(when))
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
