"""Facility client certificates: key + certificate + PKCS#12 from the facility CA, and its CRL.

Pure PKI (no store, no HTTP): :func:`issue_material` makes everything a facility needs in memory,
so the lifecycle service (gateway/lifecycle/certificates.py) decides what is written where: the
PKCS#12 wrapped in the store until it is downloaded, the password only on the printed notice.
:func:`issue` writes the files to a directory instead, for a hand-over in person (administrator
certificates, the sandbox's facilities), where no download link is involved.
:func:`publish_crl` writes the CA's CRL for a TLS terminator in front of the gateway (the
gateway itself checks the store on every call).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from gateway.clock import add_months
from gateway.errors import ConfigError
from gateway.files import replace_atomically, write_private
from gateway.pki.issue import (
    CertAndKey,
    client_cert_for_key,
    client_subject,
    issue_client_cert,
    make_crl,
    pkcs12_bytes,
)

DEFAULT_VALIDITY_MONTHS = 39  # 3 years 3 months, as the source rules

# Passwords that are printed on paper and typed by a person: no 0/O, 1/I/l look-alikes.
_PASSWORD_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"  # noqa: S105


def random_password(length: int = 16) -> str:
    """A random password (~5.8 bits per character) safe to print and type."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(length))


@dataclass(frozen=True, kw_only=True)
class ClientMaterial:
    """What one issuance produces, in memory. ``p12_password`` exists only here and on paper."""

    cert: x509.Certificate
    cert_pem: bytes
    key_pem: bytes
    p12: bytes
    p12_password: str

    @property
    def serial_hex(self) -> str:
        return format(self.cert.serial_number, "x")


@dataclass(frozen=True, kw_only=True)
class IssuedClientCertificate:
    cert: x509.Certificate
    cert_path: Path
    key_path: Path
    p12_path: Path
    p12_password: str


def load_ca(cert_path: Path | None, key_path: Path | None) -> CertAndKey:
    if cert_path is None or key_path is None:
        raise ConfigError("pki.facility_ca_cert and pki.facility_ca_key must be set to issue")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the facility CA from {cert_path}: {e}") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("the facility CA key must be RSA")
    return CertAndKey(cert=cert, key=key)


def issue_material(
    ca: CertAndKey,
    *,
    common_name: str,
    institution_code: str | None,
    organization: str | None = None,
    terminal_label: str | None = None,
    now: datetime,
    validity_months: int = DEFAULT_VALIDITY_MONTHS,
    validity: timedelta | None = None,
) -> ClientMaterial:
    """Key, certificate and password-protected PKCS#12 (with the CA certificate).

    The validity runs ``validity_months`` calendar months from ``now`` (see
    :func:`gateway.clock.add_months` for the 31st); ``validity`` overrides it for tests.
    """
    span = validity if validity is not None else add_months(now, validity_months) - now
    leaf = issue_client_cert(
        ca,
        common_name=common_name,
        institution_code=institution_code,
        organization=organization,
        terminal_label=terminal_label,
        now=now,
        validity=span,
    )
    password = random_password()
    p12 = pkcs12_bytes(
        leaf,
        chain=[ca.cert],
        password=password.encode(),
        friendly_name=(
            f"{common_name} {terminal_label}" if terminal_label else common_name
        ).encode(),
    )
    return ClientMaterial(
        cert=leaf.cert,
        cert_pem=leaf.cert_pem(),
        key_pem=leaf.key_pem(),
        p12=p12,
        p12_password=password,
    )


def certify_key(
    ca: CertAndKey,
    public_key: CertificatePublicKeyTypes,
    *,
    common_name: str,
    institution_code: str,
    terminal_label: str | None,
    now: datetime,
    validity_months: int = DEFAULT_VALIDITY_MONTHS,
) -> x509.Certificate:
    """A facility certificate for a key the facility made itself (EST renewal): the same
    profile and validity as :func:`issue_material`, no private key or PKCS#12 here."""
    return client_cert_for_key(
        ca,
        public_key,
        subject=client_subject(
            common_name=common_name,
            institution_code=institution_code,
            terminal_label=terminal_label,
        ),
        now=now,
        validity=add_months(now, validity_months) - now,
    )


def write_material(
    material: ClientMaterial, out_dir: Path, p12_name: str
) -> IssuedClientCertificate:
    """Write client.pem, client.key (0600) and the PKCS#12 (0600) for a hand-over in person."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = out_dir / "client.pem"
    key_path = out_dir / "client.key"
    p12_path = out_dir / p12_name
    cert_path.write_bytes(material.cert_pem)
    write_private(key_path, material.key_pem)
    write_private(p12_path, material.p12)
    return IssuedClientCertificate(
        cert=material.cert,
        cert_path=cert_path,
        key_path=key_path,
        p12_path=p12_path,
        p12_password=material.p12_password,
    )


def issue(
    ca: CertAndKey,
    *,
    out_dir: Path,
    common_name: str,
    institution_code: str | None,
    organization: str | None = None,
    terminal_label: str | None = None,
    service_name: str = "hpki-gateway",
    validity: timedelta | None = None,
    now: datetime,
) -> IssuedClientCertificate:
    """Issue a client certificate and write client.pem, client.key and client.<service>.p12."""
    material = issue_material(
        ca,
        common_name=common_name,
        institution_code=institution_code,
        organization=organization,
        terminal_label=terminal_label,
        now=now,
        validity=validity,
    )
    return write_material(material, out_dir, f"client.{service_name}.p12")


def publish_crl(
    ca: CertAndKey,
    path: Path,
    *,
    revoked: Sequence[tuple[int, datetime, x509.ReasonFlags | None]],
    now: datetime,
    validity: timedelta,
) -> x509.CertificateRevocationList:
    """Write the CA's CRL (DER) atomically: a reader never sees half a file.

    Several workers may publish at the same moment; each writes a complete file and renames it
    over the old one, so the last rename wins and every version is whole and valid.
    """
    crl = make_crl(ca, revoked=list(revoked), now=now, next_update=validity)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, crl.public_bytes(serialization.Encoding.DER), mode=0o644)  # public
    return crl


@dataclass(frozen=True, kw_only=True)
class PublishedCrl:
    next_update: datetime
    serials: frozenset[int]


def crl_contents(path: Path, ca: CertAndKey | None) -> PublishedCrl | None:
    """nextUpdate and revoked serials of the published CRL; None when there is none, it is
    unreadable, has no nextUpdate, or is not a valid CRL of ``ca`` (then it is rewritten;
    ``ca`` None: not checked)."""
    try:
        crl = x509.load_der_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None
    next_update = crl.next_update_utc
    if next_update is None or (
        ca is not None
        and (crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()))
    ):
        return None
    return PublishedCrl(next_update=next_update, serials=frozenset(r.serial_number for r in crl))
