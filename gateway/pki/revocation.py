"""Revocation of one certificate: OCSP first where the certificate names a responder, CRLs else.

Policy (HPKI publishes CRLs; OCSP is asked only where a certificate names a responder in AIA):
- without an OCSP client (``[pki] ocsp = false``, the default) or without an AIA OCSP URL in
  the certificate: CRLs only (``CrlSource``);
- OCSP ``revoked``: revoked (source ``ocsp``);
- OCSP ``good``: good (source ``ocsp``), unless a local CRL lists the certificate: ``revoked``
  from either source wins (no CRL is downloaded for an OCSP-good certificate);
- OCSP unreachable, not trusted, stale or ``unknown``: the CRLs decide (source ``crl``), and the
  OCSP problem is named in the reason.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from gateway.pki.crl import CrlSource, RevocationStatus
from gateway.pki.ocsp import OcspClient, ocsp_urls

__all__ = ["revocation_status"]


async def revocation_status(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: dt.datetime,
    *,
    crls: CrlSource,
    ocsp: OcspClient | None,
) -> RevocationStatus:
    urls = ocsp_urls(cert) if ocsp is not None else []
    if ocsp is None or not urls:
        return await crls.status(cert, issuer, now)
    answer = await ocsp.status(cert, issuer, now, urls)
    if answer.status == "revoked":
        return RevocationStatus("revoked", answer.reason, answer.revocation_time, source="ocsp")
    if answer.status == "good":
        local = await crls.status(cert, issuer, now, fetch=False)
        if local.status == "revoked":
            return local
        return RevocationStatus("good", f"{answer.reason} [{answer.url}]", source="ocsp")
    fallback = await crls.status(cert, issuer, now)
    return RevocationStatus(
        fallback.status,
        f"{fallback.reason} (OCSP not used: {answer.reason})",
        fallback.revocation_time,
        source="crl",
    )
