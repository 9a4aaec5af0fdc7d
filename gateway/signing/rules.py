"""Who may sign: the one rule, checked when a SAD is issued and again when it is spent.

Its parts are checked alone where less is known: enrolment knows only the signer,
``authenticate/begin`` the signer and the credential (the certificate's validity is checked when
the SAD is issued, at the time of the assertion).

"The signer is active, serves this facility, the credential is active and its certificate is
valid now" is read in the transaction that issues or spends, never cached.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from gateway.errors import AccessDenied


def require_signer_active(signer_id: str, status: str) -> None:
    if status != "active":
        raise AccessDenied(f"signer {signer_id} is {status}")


def require_credential_active(credential_id: str, status: str, *, certified: bool = True) -> None:
    if status != "active" or not certified:
        raise AccessDenied(f"credential {credential_id} is {status}")


def require_may_sign(
    *,
    signer_id: str,
    signer_status: str,
    serves_facility: bool,
    credential_id: str,
    credential_status: str,
    certificate_der: bytes | None,
    now: datetime,
) -> None:
    """Raise ``AccessDenied`` saying why this signer may not sign with this credential now."""
    require_signer_active(signer_id, signer_status)
    if not serves_facility:
        raise AccessDenied(f"signer {signer_id} does not serve this facility")
    require_credential_active(
        credential_id, credential_status, certified=certificate_der is not None
    )
    assert certificate_der is not None
    cert = certificate(certificate_der)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise AccessDenied(f"the certificate of credential {credential_id} is not valid now")


_cert_cache: dict[bytes, x509.Certificate] = {}


def certificate(der: bytes) -> x509.Certificate:
    """Parse once per process: the hot path checks the validity period on every signature."""
    cert = _cert_cache.get(der)
    if cert is None:
        if len(_cert_cache) > 10_000:
            _cert_cache.clear()
        cert = _cert_cache[der] = x509.load_der_x509_certificate(der)
    return cert
