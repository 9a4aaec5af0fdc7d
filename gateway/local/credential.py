"""The card's certificate, checked like a remote credential's before the PIN is asked for:
the HPKI signing profile, a path to a configured HPKI anchor, validity now, and (when the
document type is known) an hcRole allowed to sign it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509

from gateway.errors import GatewayError, PkiError
from gateway.pki import hpki
from gateway.sign.eprescription import RolePolicy


class CardCertificateRejected(GatewayError):
    """The certificate on the card may not sign (profile, path, validity)."""

    status = 403
    code = "certificate_rejected"


class CardCertificateExpired(CardCertificateRejected):
    code = "certificate_expired"


def check_card_certificate(
    cert: x509.Certificate,
    *,
    trust_anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    roles: RolePolicy,
    document_type: str | None,
    now: dt.datetime,
) -> list[x509.Certificate]:
    """The validated path (leaf first); raises CardCertificateRejected, CardCertificateExpired
    or RoleNotPermitted (403) saying why the card may not sign."""
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CardCertificateExpired(
            f"the card's certificate is valid from {cert.not_valid_before_utc.isoformat()} "
            f"to {cert.not_valid_after_utc.isoformat()}, not now"
        )
    problems = hpki.check_signing_profile(cert)
    if problems:
        raise CardCertificateRejected(
            "the card's certificate is not an HPKI signing certificate: " + "; ".join(problems)
        )
    try:
        path = hpki.verify_chain(
            cert,
            intermediates=list(intermediates),
            trust_anchors=list(trust_anchors),
            moment=now,
        )
    except PkiError as e:
        raise CardCertificateRejected(f"the card's certificate: {e.description}") from e
    if document_type is not None:
        roles.check(cert, document_type)
    return path
