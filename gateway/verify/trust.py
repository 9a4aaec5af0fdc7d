"""What a verifier trusts, and the checks every format shares once the signature value holds:
timestamps (proofs of existence), the certificate path, revocation, the HPKI profile and role.

Long-term validation (EN 319 102-1 past signature validation). A timestamp is trusted when
its imprint and signature verify and its TSA chain leads to a TSA anchor at the time it must
still be valid: the validation time, or the time of a later archive timestamp that covers it
(its proof of existence). The earliest trusted signature timestamp gives the best signature
time ``T``; the signer's path is checked at ``T`` with the certificates the document carries,
and revocation at ``T`` with the CRLs it carries (current at ``T`` or issued after it), else
with the configured sources at the validation time.

A signer certificate that has expired by the validation time needs an archive timestamp
(ES-A / B-LTA) made while it was valid: after expiry its CA no longer publishes its status, and
only an archive timestamp proves that the validation data in the document existed before
(JAHIS e-prescription signature guideline; EN 319 102-1 OUT_OF_BOUNDS_NO_POE).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from gateway.errors import PkiError
from gateway.pki import hpki
from gateway.pki.crl import CrlSource
from gateway.pki.ocsp import OcspClient
from gateway.pki.revocation import revocation_status
from gateway.sign import timestamp as ts
from gateway.sign.eprescription import PROFILES, EPrescriptionProfile, RolePolicy
from gateway.verify.report import INDETERMINATE, TOTAL_FAILED, SignatureReport
from gateway.verify.revocation import carried_status_at

__all__ = ["Evidence", "TimestampEvidence", "TrustConfig", "check_common", "signer_info"]


@dataclass
class TrustConfig:
    """What a verifier trusts and checks; built from settings or CLI flags."""

    anchors: list[x509.Certificate]
    intermediates: list[x509.Certificate] = field(default_factory=list)
    tsa_anchors: list[x509.Certificate] = field(default_factory=list)
    crls: CrlSource = field(default_factory=CrlSource)
    #: Set (``[pki] ocsp = true``, CLI ``--ocsp``): certificates with an AIA OCSP URL are asked
    #: there first; None: CRLs only.
    ocsp: OcspClient | None = None
    check_revocation: bool = True
    roles: RolePolicy = field(
        default_factory=lambda: RolePolicy(
            {"prescription": ["Medical Doctor", "Dentist"], "dispensing": ["Pharmacist"]}
        )
    )
    profiles: Sequence[EPrescriptionProfile] = tuple(PROFILES.values())
    max_xml_depth: int = 64
    #: Refused before any digest is computed: more signatures in a document, more references
    #: in one XML signature (each reference may cost a canonicalisation of the whole document).
    max_signatures: int = 10
    max_references: int = 10
    #: Refused before any timestamp is read: more SignatureTimeStamps and ArchiveTimeStamps in
    #: one XML signature (each archive timestamp stamps everything before it).
    max_timestamps: int = 10
    #: Check the XAdES parts against the ETSI schemas (TS 101 903 1.3.2 / 1.4.1).
    xml_schema: bool = True


@dataclass
class TimestampEvidence:
    """One timestamp of a signature, as the format part found it."""

    kind: str  # "signature" | "archive"
    token_der: bytes | None
    imprint_data: bytes
    #: Why the format part could not even read it (bad Base64, ...): FORMAT_FAILURE.
    error: str | None = None
    #: Validation data carried for this timestamp (XAdES 1.4.1 TimeStampValidationData).
    certs: list[x509.Certificate] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    #: The stamped digest itself where the data is not at hand (a PDF document timestamp).
    imprint_digest: bytes | None = None
    #: What the timestamp covers was changed or removed (CAdES ats-hash-index-v3): HASH_FAILURE.
    hash_problem: str | None = None
    #: It does not sit where it must (a PDF document timestamp whose ByteRange does not cover
    #: the revision that added it): FORMAT_FAILURE.
    structure_problem: str | None = None
    #: OCSP responses (DER) carried for the TSA's certificates.
    ocsps: list[bytes] = field(default_factory=list)


@dataclass
class Evidence:
    """What the format-specific part hands to the common checks."""

    cert: x509.Certificate
    embedded: list[x509.Certificate]
    signing_time: dt.datetime | None
    timestamps: list[TimestampEvidence] = field(default_factory=list)
    #: Revocation data the signature carries for the signer's path (RevocationValues, CMS crls).
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    #: OCSP responses (DER) it carries (XAdES OCSPValues, CMS other revocation info, PDF DSS).
    ocsps: list[bytes] = field(default_factory=list)
    #: The long-term parts (CertificateValues and RevocationValues, or their CMS/PDF forms).
    has_validation_data: bool = False
    format_levels: dict[str, str] = field(default_factory=dict)


def signer_info(cert: x509.Certificate) -> dict[str, Any]:
    return dict(_signer_info(cert))


# Decoding the hcRole extension (asn1crypto) is the costliest step of a verification after the
# signatures themselves; the same few signer certificates come again and again.
@functools.lru_cache(maxsize=512)
def _signer_info(cert: x509.Certificate) -> dict[str, Any]:
    info = hpki.inspect_certificate(cert)
    return {
        "subject": info.subject,
        "issuer": info.issuer,
        "serial_hex": info.serial_hex,
        "hc_roles": info.hc_roles,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
    }


_PROBLEM_SUBS = {
    "hash": (TOTAL_FAILED, "HASH_FAILURE"),
    "signature": (TOTAL_FAILED, "SIG_CRYPTO_FAILURE"),
    "chain": (INDETERMINATE, "NO_CERTIFICATE_CHAIN_FOUND"),
    "revoked": (INDETERMINATE, "REVOKED_NO_POE"),
}


def _tsa_revoked(
    token: ts.TimestampToken, t: TimestampEvidence, trust: TrustConfig, now: dt.datetime
) -> tuple[bool, str]:
    """Whether the TSA's certificate (or a CA above it) was revoked when it stamped, from the
    revocation data carried for the timestamp (TimeStampValidationData, the signature's CMS
    crls, the DSS, the token's own SignedData crls) and the configured CRL files; never
    fetched. (True, reason) names the revoked certificate; without any evidence the timestamp
    stands and the entry says so (test TSAs publish none)."""
    from gateway.sign.xades_ltv import _path
    from gateway.verify.cms import _cms_crls, _cms_ocsps

    si = token.signed_data["signer_infos"][0]
    tsa_cert = ts._find_signer_cert(si, token.certificates)
    if tsa_cert is None:
        return False, "not checked"
    path = _path(tsa_cert, [*token.certificates, *t.certs, *trust.tsa_anchors])
    at = token.gen_time
    crls = [*t.crls, *_cms_crls(token.signed_data), *trust.crls.local_crls()]
    ocsps = [*t.ocsps, *_cms_ocsps(token.signed_data)]
    checked: list[str] = []
    for child, issuer in itertools.pairwise(path):
        evidence = carried_status_at(child, issuer, at, crls, ocsps, now=now)
        if evidence is None or evidence.status == "unknown":
            continue
        if evidence.status == "revoked":
            return True, (
                f"the TSA certificate {child.subject.rfc4514_string()} was revoked: "
                f"{evidence.reason}"
            )
        checked.append(child.subject.rfc4514_string())
    if not checked:
        return False, "no revocation data for the TSA"
    return False, f"not revoked at {at.isoformat()} ({'; '.join(checked)})"


def _check_timestamps(
    rep: SignatureReport, found: Evidence, trust: TrustConfig, now: dt.datetime
) -> list[tuple[TimestampEvidence, dt.datetime]] | None:
    """The trusted timestamps with their times (None: the report failed)."""
    parsed: list[tuple[TimestampEvidence, ts.TimestampToken]] = []
    for t in found.timestamps:
        what = f"{t.kind} timestamp"
        if t.hash_problem is not None:
            rep.fail(TOTAL_FAILED, "HASH_FAILURE", f"{what}: {t.hash_problem}")
            return None
        if t.structure_problem is not None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"{what}: {t.structure_problem}")
            return None
        if t.error is not None or t.token_der is None:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"{what} unreadable: {t.error}")
            return None
        try:
            parsed.append((t, ts.parse_token(t.token_der)))
        except (ValueError, TypeError, KeyError) as e:
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"{what} unreadable: {e}")
            return None
    trusted: list[tuple[TimestampEvidence, dt.datetime]] = []
    # Each timestamp's TSA must hold at the validation time, or at the time of the earliest
    # later archive timestamp (its proof of existence).
    archive_times = [tok.gen_time for t, tok in parsed if t.kind == "archive"]
    for t, token in parsed:
        later = sorted(a for a in archive_times if a > token.gen_time)
        moment = later[0] if later else now
        problem = ts.check_token(
            token,
            imprint_data=t.imprint_data,
            trust_anchors=trust.tsa_anchors,
            moment=moment,
            extra_certs=t.certs,
            imprint_digest=t.imprint_digest,
        )
        entry = {
            "time": token.gen_time.isoformat(),
            "tsa": token.certificates[0].subject.rfc4514_string() if token.certificates else None,
            "status": "valid" if problem is None else problem.reason,
            "tsa_checked_at": moment.isoformat(),
        }
        if t.kind == "signature" and rep.timestamp is None:
            rep.timestamp = entry
        elif t.kind == "archive":
            rep.archive_timestamps.append(entry)
        if problem is None and trust.check_revocation:
            revoked = _tsa_revoked(token, t, trust, now)
            entry["tsa_revocation"] = revoked[1]
            if revoked[0]:
                problem = ts.TokenProblem("revoked", revoked[1])
        if problem is not None:
            indication, sub = _PROBLEM_SUBS.get(problem.kind, (TOTAL_FAILED, "FORMAT_FAILURE"))
            reason = (
                problem.reason
                if problem.kind != "chain"
                else f"{t.kind} timestamp: {problem.reason}"
            )
            if problem.kind in ("hash", "revoked"):
                reason = f"{t.kind} timestamp: {problem.reason}"
            rep.fail(indication, sub, reason)
            return None
        trusted.append((t, token.gen_time))
    return trusted


def _level(found: Evidence, trusted: list[tuple[TimestampEvidence, dt.datetime]]) -> str:
    signature = sum(1 for t, _ in trusted if t.kind == "signature")
    archive = sum(1 for t, _ in trusted if t.kind == "archive")
    if not signature and archive:
        # PAdES: a document timestamp over a signature without its own is its B-T (EN 319
        # 142-1 §5.3); only a later one archives the validation data. (A XAdES archive
        # timestamp without a SignatureTimeStamp is refused as a structure fault before this.)
        signature, archive = 1, archive - 1
    if not signature:
        return "B-B"
    if not found.has_validation_data:
        return "B-T"
    return "B-LTA" if archive else "B-LT"


def _check_chain(
    rep: SignatureReport, found: Evidence, trust: TrustConfig, moment: dt.datetime, poe: bool
) -> list[x509.Certificate] | None:
    cert = found.cert
    intermediates = [*found.embedded, *trust.intermediates]
    try:
        path = hpki.verify_chain(
            cert, intermediates=intermediates, trust_anchors=trust.anchors, moment=moment
        )
    except PkiError as e:
        rep.chain = {"status": "invalid", "reason": e.description, "checked_at": moment.isoformat()}
        if moment < cert.not_valid_before_utc:
            rep.fail(TOTAL_FAILED, "NOT_YET_VALID", e.description)
        elif moment > cert.not_valid_after_utc and not poe:
            rep.fail(INDETERMINATE, "OUT_OF_BOUNDS_NO_POE", e.description)
        else:
            rep.fail(INDETERMINATE, "NO_CERTIFICATE_CHAIN_FOUND", e.description)
        return None
    rep.chain = {
        "status": "valid",
        "checked_at": moment.isoformat(),
        "path": [c.subject.rfc4514_string() for c in path],
    }
    return path


async def _check_revocation(
    rep: SignatureReport,
    found: Evidence,
    trust: TrustConfig,
    path: list[x509.Certificate],
    at: dt.datetime,
    poe: dt.datetime | None,
    now: dt.datetime,
) -> bool:
    """Revocation of every non-anchor certificate of the path at ``at``; False: failed."""
    if not trust.check_revocation:
        rep.revocation = {"status": "not checked", "reason": "revocation checking disabled"}
        return True
    reasons: list[str] = []
    sources: list[str] = []
    for child, issuer in itertools.pairwise(path):
        carried = carried_status_at(child, issuer, at, found.crls, found.ocsps, now=now)
        if carried is not None and carried.status == "revoked":
            rep.revocation = {"status": "revoked", "reason": carried.reason, "source": "document"}
            rep.fail(TOTAL_FAILED, "REVOKED", carried.reason)
            return False
        if carried is not None and carried.status == "good":
            reasons.append(carried.reason)
            sources.append("document-ocsp" if carried.kind == "ocsp" else "document")
            continue
        s = await revocation_status(child, issuer, now, crls=trust.crls, ocsp=trust.ocsp)
        if s.status == "revoked":
            rep.revocation = {"status": "revoked", "reason": s.reason, "source": s.source}
            if poe is not None and s.revocation_time is not None and poe < s.revocation_time:
                rep.notes.append("revoked after the timestamp: the signature predates it")
                reasons.append(s.reason)
                sources.append(s.source)
                continue
            if poe is not None:
                rep.fail(TOTAL_FAILED, "REVOKED", s.reason)
            else:
                rep.fail(INDETERMINATE, "REVOKED_NO_POE", s.reason)
            return False
        if s.status == "unknown":
            why = s.reason + (f"; in the document: {carried.reason}" if carried else "")
            rep.revocation = {"status": "unknown", "reason": why, "source": s.source}
            rep.fail(INDETERMINATE, "TRY_LATER", why)
            return False
        reasons.append(s.reason)
        sources.append(s.source)
    if rep.revocation.get("status") == "revoked":
        return True  # revoked after the proven time: noted above
    names = {
        "document": "CRLs in the document",
        "document-ocsp": "OCSP responses in the document",
        "crl": "CRLs",
        "ocsp": "OCSP",
    }
    checked = " and ".join(names[k] for k in dict.fromkeys(sources))
    rep.revocation = {
        "status": "good",
        "reason": "not revoked"
        + (f" at {at.isoformat()}" if at != now else "")
        + f" ({checked or 'nothing'} checked)",
        "source": sources[0].removesuffix("-ocsp") if sources else None,
        "checked_at": at.isoformat(),
    }
    return True


@functools.lru_cache(maxsize=512)
def _profile_problems(cert: x509.Certificate) -> list[str]:
    return hpki.check_signing_profile(cert)


def _check_constraints(rep: SignatureReport, cert: x509.Certificate, trust: TrustConfig) -> bool:
    problems = _profile_problems(cert)
    if problems:
        rep.fail(
            INDETERMINATE,
            "CHAIN_CONSTRAINTS_FAILURE",
            "not an HPKI signing certificate: " + "; ".join(problems),
        )
        return False
    if rep.document_type is not None and rep.signer is not None:
        roles = rep.signer.get("hc_roles", [])
        rep.role_permitted = trust.roles.permits(roles, rep.document_type)
        if not rep.role_permitted:
            allowed = ", ".join(trust.roles.allowed.get(rep.document_type, ())) or "nobody"
            rep.fail(
                INDETERMINATE,
                "SIG_CONSTRAINTS_FAILURE",
                f"hcRole {', '.join(roles) or 'none'} may not sign a {rep.document_type} "
                f"document (allowed: {allowed})",
            )
            return False
    return True


async def check_common(
    rep: SignatureReport, found: Evidence, trust: TrustConfig, now: dt.datetime
) -> SignatureReport:
    cert = found.cert
    rep.signer = signer_info(cert)
    if found.signing_time is not None:
        rep.signing_time = found.signing_time.isoformat()
    trusted = _check_timestamps(rep, found, trust, now)
    if trusted is None:
        return rep
    rep.level = _level(found, trusted)
    rep.xades_level = found.format_levels.get(rep.level)
    stamps = sorted(t for e, t in trusted if e.kind == "signature")
    archives = sorted(t for e, t in trusted if e.kind == "archive")
    poe = stamps[0] if stamps else (archives[0] if archives else None)
    rep.best_signature_time = (poe or now).isoformat()
    rep.proven_by = (
        "signature timestamp" if stamps else "archive timestamp" if archives else "validation time"
    )
    if now > cert.not_valid_after_utc and rep.level != "B-LTA":
        rep.chain = {
            "status": "expired",
            "reason": f"expired at {cert.not_valid_after_utc.isoformat()}",
        }
        return rep.fail(
            INDETERMINATE,
            "OUT_OF_BOUNDS_NO_POE",
            f"the signer certificate expired at {cert.not_valid_after_utc.isoformat()} and no "
            "archive timestamp (ES-A / B-LTA) proves the signature and its validation data "
            "from before then",
        )
    moment = poe or now
    path = _check_chain(rep, found, trust, moment, poe is not None)
    if path is None:
        return rep
    if poe is not None and found.signing_time is not None and found.signing_time > poe:
        rep.notes.append("claimed signing time is after the timestamp")
    if not await _check_revocation(rep, found, trust, path, moment, poe, now):
        return rep
    if not _check_constraints(rep, cert, trust):
        return rep
    assert rep.signer is not None
    shown = rep.level + (f" ({rep.xades_level})" if rep.xades_level else "")
    rep.reason = f"valid {rep.format}-{shown} signature by {rep.signer['subject']}" + (
        f" ({', '.join(rep.signer['hc_roles'])})" if rep.signer["hc_roles"] else ""
    )
    return rep
