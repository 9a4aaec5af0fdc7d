"""Facility client certificates: issue key + certificate + PKCS#12 from the facility CA.

Issue 5 grows this into the full lifecycle (delivery, rotation, reminders); here it issues and
writes the files a facility system needs to reach the gateway.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.errors import ConfigError
from gateway.pki import testworld

DEFAULT_VALIDITY = timedelta(days=365 * 3 + 90)  # 3 years 3 months, as the source rules


@dataclass(frozen=True, kw_only=True)
class IssuedClientCertificate:
    cert: x509.Certificate
    cert_path: Path
    key_path: Path
    p12_path: Path
    p12_password: str


def load_ca(cert_path: Path | None, key_path: Path | None) -> testworld.CertAndKey:
    if cert_path is None or key_path is None:
        raise ConfigError("pki.facility_ca_cert and pki.facility_ca_key must be set to issue")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the facility CA from {cert_path}: {e}") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("the facility CA key must be RSA")
    return testworld.CertAndKey(cert=cert, key=key)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def issue(
    ca: testworld.CertAndKey,
    *,
    out_dir: Path,
    common_name: str,
    institution_code: str | None,
    organization: str | None = None,
    terminal_label: str | None = None,
    service_name: str = "hpki-gateway",
    validity: timedelta = DEFAULT_VALIDITY,
    now: datetime | None = None,
) -> IssuedClientCertificate:
    """Issue a client certificate and write client.pem, client.key and client.<service>.p12."""
    now = now or datetime.now(UTC)
    leaf = testworld.issue_client_cert(
        ca,
        common_name=common_name,
        institution_code=institution_code,
        organization=organization,
        terminal_label=terminal_label,
        now=now,
        validity=validity,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = out_dir / "client.pem"
    key_path = out_dir / "client.key"
    p12_path = out_dir / f"client.{service_name}.p12"
    password = secrets.token_urlsafe(12)
    cert_path.write_bytes(leaf.cert_pem())
    _write_private(key_path, leaf.key_pem())
    _write_private(
        p12_path,
        testworld.pkcs12_bytes(
            leaf,
            chain=[ca.cert],
            password=password.encode(),
            friendly_name=common_name.encode(),
        ),
    )
    return IssuedClientCertificate(
        cert=leaf.cert,
        cert_path=cert_path,
        key_path=key_path,
        p12_path=p12_path,
        p12_password=password,
    )
