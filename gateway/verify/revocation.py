"""Revocation of a certificate at a past time, from CRLs the document carries (or local ones).

Long-term validation (EN 319 102-1 §5.6.2, past signature validation) judges the signer's
certificate at the best signature time ``T`` that a timestamp proves. A CRL of the issuer is
evidence for ``T`` when its signature verifies with the issuer's key, it was issued while the
certificate was still valid (entries of expired certificates may be dropped from later CRLs,
RFC 5280 §3.3; unless the CRL says it keeps them, ExpiredCertsOnCRL), and either it was current
at ``T`` (thisUpdate <= T <= nextUpdate) or it was issued after ``T`` (it then lists any
revocation before its own date). A CRL dated after the validation time is refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["CrlEvidence", "carried_status_at", "crl_status_at", "ocsp_status_at"]

CLOCK_SKEW = dt.timedelta(minutes=5)
_EXPIRED_CERTS_ON_CRL = x509.ObjectIdentifier("2.5.29.60")


@dataclass(frozen=True)
class CrlEvidence:
    status: str  # "good" | "revoked" | "unknown"
    reason: str
    revocation_time: dt.datetime | None = None
    crl_issued: dt.datetime | None = None
    #: What the evidence is: "crl" or "ocsp" (responses carried in the document).
    kind: str = "crl"


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    public = issuer.public_key()
    if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return False
    return crl.is_signature_valid(public)


def _keeps_expired(crl: x509.CertificateRevocationList) -> bool:
    return any(ext.oid == _EXPIRED_CERTS_ON_CRL for ext in crl.extensions)


def crl_status_at(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    at: dt.datetime,
    crls: Sequence[x509.CertificateRevocationList],
    *,
    now: dt.datetime,
) -> CrlEvidence:
    """Whether ``cert`` was revoked at ``at`` by the evidence in ``crls``."""
    problems: list[str] = []
    usable: list[x509.CertificateRevocationList] = []
    name = issuer.subject.rfc4514_string()
    for crl in crls:
        if crl.issuer != issuer.subject:
            continue
        if not _signed_by(crl, issuer):
            problems.append(f"a CRL of {name} has an invalid signature")
            continue
        issued = crl.last_update_utc
        if issued > now + CLOCK_SKEW:
            problems.append(f"a CRL of {name} is dated in the future ({issued.isoformat()})")
            continue
        if issued > cert.not_valid_after_utc and not _keeps_expired(crl):
            problems.append(f"a CRL of {name} was issued after the certificate expired")
            continue
        next_update = crl.next_update_utc
        current_at = issued <= at + CLOCK_SKEW and (next_update is None or at <= next_update)
        if not current_at and issued < at:
            problems.append(
                f"the CRL of {name} issued {issued.isoformat()} expired before "
                f"{at.isoformat()} (nextUpdate {next_update.isoformat() if next_update else '-'})"
            )
            continue
        usable.append(crl)
    entries = [
        (crl, e)
        for crl in usable
        if (e := crl.get_revoked_certificate_by_serial_number(cert.serial_number)) is not None
    ]
    before = [(c, e) for c, e in entries if e.revocation_date_utc <= at]
    if before:
        crl, entry = min(before, key=lambda ce: ce[1].revocation_date_utc)
        return CrlEvidence(
            "revoked",
            f"certificate {cert.serial_number:X} was revoked by {name} at "
            f"{entry.revocation_date_utc.isoformat()}, before {at.isoformat()}",
            entry.revocation_date_utc,
            crl.last_update_utc,
        )
    if usable:
        newest = max(usable, key=lambda c: c.last_update_utc)
        later = (
            f"; revoked later, at {entries[0][1].revocation_date_utc.isoformat()}"
            if entries
            else ""
        )
        return CrlEvidence(
            "good",
            f"not revoked at {at.isoformat()} (CRL of {name} issued "
            f"{newest.last_update_utc.isoformat()}){later}",
            entries[0][1].revocation_date_utc if entries else None,
            newest.last_update_utc,
        )
    detail = "; ".join(problems) if problems else f"no CRL of {name} in the document"
    return CrlEvidence(
        "unknown", f"revocation of {cert.subject.rfc4514_string()} unknown: {detail}"
    )


def ocsp_status_at(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    at: dt.datetime,
    responses: Sequence[bytes],
    *,
    now: dt.datetime,
) -> CrlEvidence:
    """Whether ``cert`` was revoked at ``at`` by the OCSP responses a document carries.

    A response counts when it is signed by the issuer or a delegate the issuer certified
    (valid when the response was produced), names this certificate, is not dated after the
    validation time, and was current at ``at`` (thisUpdate <= at <= nextUpdate) or produced
    after ``at`` (a later "good" or a later revocation date speaks for ``at`` as a later CRL
    does).
    """
    from gateway.pki.ocsp import check_embedded

    name = issuer.subject.rfc4514_string()
    problems: list[str] = []
    usable: list[tuple[str, dt.datetime, dt.datetime | None]] = []
    for der in responses:
        r = check_embedded(der, cert, issuer)
        if r.status not in ("good", "revoked") or r.this_update is None:
            if "another certificate" not in r.reason:
                problems.append(r.reason)
            continue
        if r.this_update > now + CLOCK_SKEW:
            problems.append(f"an OCSP response of {name} is dated in the future")
            continue
        current_at = r.this_update <= at + CLOCK_SKEW and (
            r.next_update is None or at <= r.next_update
        )
        if not current_at and r.this_update < at:
            problems.append(
                f"the OCSP response of {name} of {r.this_update.isoformat()} expired before "
                f"{at.isoformat()}"
            )
            continue
        if r.status == "revoked" and r.revocation_time is not None and r.revocation_time <= at:
            return CrlEvidence(
                "revoked",
                f"certificate {cert.serial_number:X} was revoked by {name} at "
                f"{r.revocation_time.isoformat()}, before {at.isoformat()} (OCSP)",
                r.revocation_time,
                r.this_update,
                kind="ocsp",
            )
        usable.append((r.status, r.this_update, r.revocation_time))
    if usable:
        newest = max(usable, key=lambda u: u[1])
        later = [u[2] for u in usable if u[0] == "revoked" and u[2] is not None]
        return CrlEvidence(
            "good",
            f"not revoked at {at.isoformat()} (OCSP response of {name} of "
            f"{newest[1].isoformat()})"
            + (f"; revoked later, at {later[0].isoformat()}" if later else ""),
            later[0] if later else None,
            newest[1],
            kind="ocsp",
        )
    detail = "; ".join(problems) if problems else f"no OCSP response of {name} in the document"
    return CrlEvidence(
        "unknown", f"revocation of {cert.subject.rfc4514_string()} unknown: {detail}"
    )


def carried_status_at(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    at: dt.datetime,
    crls: Sequence[x509.CertificateRevocationList],
    ocsps: Sequence[bytes],
    *,
    now: dt.datetime,
) -> CrlEvidence | None:
    """The document's own revocation evidence for ``cert`` at ``at``: CRLs and OCSP responses
    together ("revoked" from either wins); None when it carries neither."""
    if not crls and not ocsps:
        return None
    found = [
        e
        for e in (
            crl_status_at(cert, issuer, at, crls, now=now) if crls else None,
            ocsp_status_at(cert, issuer, at, ocsps, now=now) if ocsps else None,
        )
        if e is not None
    ]
    for status in ("revoked", "good"):
        for e in found:
            if e.status == status:
                return e
    return CrlEvidence("unknown", "; ".join(e.reason for e in found))
