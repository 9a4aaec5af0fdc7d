"""PAdES: PDF structure (ByteRange, coverage, what later revisions changed) from pyHanko, the
CMS inside through :mod:`gateway.verify.cms`.

A signature covers its own revision; incremental updates may follow. pyHanko's difference
analysis (``DEFAULT_DIFF_POLICY``) compares every later revision with the signed one and grades
the changes: LTA updates (DSS, document timestamps) are always allowed; form filling, which
includes further signatures, unless the signature's DocMDP (or its field's /Lock) says "no
changes"; annotations only under DocMDP P=3; anything else (a page's content swapped, an object
rewritten) fails the signature, TOTAL-FAILED / HASH_FAILURE: what the file shows is not what was
signed. A document timestamp proves the existence only of the signatures in earlier revisions
that it covers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from gateway.errors import InvalidRequest
from gateway.verify.cms import verify_cms_signed_data
from gateway.verify.report import TOTAL_FAILED, SignatureReport
from gateway.verify.trust import TimestampEvidence, TrustConfig, signer_info

__all__ = ["verify_pdf"]


def _dss(
    reader: Any,
) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList], list[bytes]]:
    """The certificates, CRLs and OCSP responses of the document security store (PAdES B-LT)."""
    from pyhanko.sign.validation.dss import DocumentSecurityStore
    from pyhanko.sign.validation.errors import NoDSSFoundError

    try:
        dss = DocumentSecurityStore.read_dss(reader)
    except NoDSSFoundError:
        return [], [], []
    certs = [x509.load_der_x509_certificate(c.dump()) for c in dss.load_certs()]
    crls = [x509.load_der_x509_crl(ref.get_object().data) for ref in dss.crls]
    ocsps = [bytes(ref.get_object().data) for ref in dss.ocsps]
    return certs, crls, ocsps


@dataclass
class _DocumentTimestamp:
    """A document timestamp and what it covers."""

    field: str
    #: The revision that added it (pyHanko's ``signed_revision``).
    revision: int
    #: Where its ByteRange ends; None when unusable (then ``evidence`` carries the error).
    covered_to: int | None
    evidence: TimestampEvidence


def _covered_to(emb: Any) -> int:
    """The offset where a signature's (standard, two-part) ByteRange ends."""
    return int(emb.byte_range[2]) + int(emb.byte_range[3])


def _document_timestamps(reader: Any) -> list[_DocumentTimestamp]:
    """Document timestamps (PAdES B-LTA): each archives the revisions it covers, and only those:
    its ByteRange must cover the whole revision that added it, as a signature's must."""
    from asn1crypto import cms
    from pyhanko.sign.validation import SignatureCoverageLevel

    out = []
    for emb in reader.embedded_timestamp_signatures:
        name = emb.field_name
        token = cms.ContentInfo({"content_type": "signed_data", "content": emb.signed_data})
        try:
            coverage = emb.evaluate_signature_coverage()
            digest = emb.compute_digest()
            end = _covered_to(emb)
        except Exception as e:  # noqa: BLE001 - pyHanko raises many types on broken PDFs
            error = f"document timestamp {name!r}: ByteRange unusable: {e}"
            out.append(
                _DocumentTimestamp(
                    name,
                    emb.signed_revision,
                    None,
                    TimestampEvidence("archive", None, b"", error=error),
                )
            )
            continue
        if coverage < SignatureCoverageLevel.ENTIRE_REVISION:
            problem = f"document timestamp {name!r} does not cover its whole revision"
            evidence = TimestampEvidence("archive", None, b"", structure_problem=problem)
            out.append(_DocumentTimestamp(name, emb.signed_revision, None, evidence))
            continue
        evidence = TimestampEvidence("archive", token.dump(), b"", imprint_digest=digest)
        out.append(_DocumentTimestamp(name, emb.signed_revision, end, evidence))
    return out


def _archives_for(
    emb: Any, stamps: list[_DocumentTimestamp], notes: list[str]
) -> list[TimestampEvidence]:
    """The document timestamps that prove ``emb`` existed: added in a later revision than the
    signature, with a ByteRange reaching past the signature's. One added before (or in the same
    revision) stamped a file without this signature and proves nothing about it; a later one
    whose ByteRange is unusable fails the signature (FORMAT_FAILURE)."""
    out = []
    end = _covered_to(emb)
    for ts in stamps:
        if ts.revision <= emb.signed_revision:
            notes.append(
                f"document timestamp {ts.field!r} (revision {ts.revision}) was added before this "
                f"signature (revision {emb.signed_revision}): not a proof of existence for it"
            )
        elif ts.covered_to is not None and ts.covered_to < end:
            notes.append(
                f"document timestamp {ts.field!r} does not cover this signature: not a proof "
                "of existence for it"
            )
        else:
            out.append(ts.evidence)
    return out


_ALLOWED_CHANGES = {
    "LTA_UPDATES": "validation data and document timestamps only (LTA_UPDATES)",
    "FORM_FILLING": "form fields filled or further signatures (FORM_FILLING)",
    "ANNOTATIONS": "annotations (ANNOTATIONS), which its DocMDP permits",
}


def _modifications(emb: Any) -> tuple[str, str | None, str | None]:
    """What the revisions after ``emb``'s changed: (pyHanko's modification level, the failure's
    sub-indication and reason, or None when the changes are allowed after this signature)."""
    from pyhanko.sign.diff_analysis import (
        DEFAULT_DIFF_POLICY,
        ModificationLevel,
        SuspiciousModification,
    )
    from pyhanko.sign.fields import MDPPerm

    try:
        docmdp = emb.docmdp_level
        result = emb.evaluate_modifications(DEFAULT_DIFF_POLICY)
    except Exception as e:  # noqa: BLE001 - pyHanko raises many types on broken PDFs
        why = f"the changes made after this signature cannot be analysed: {type(e).__name__}"
        return ModificationLevel.OTHER.name, "FORMAT_FAILURE", why
    if isinstance(result, SuspiciousModification):
        detail = str(result).strip().splitlines()[0][:300] if str(result).strip() else ""
        why = "the document was modified after this signature" + (
            f" (pyHanko: {detail})" if detail else ""
        )
        return ModificationLevel.OTHER.name, "HASH_FAILURE", why
    level = result.modification_level
    allowed = {
        None: ModificationLevel.FORM_FILLING,  # an approval signature: further signatures, forms
        MDPPerm.NO_CHANGES: ModificationLevel.LTA_UPDATES,
        MDPPerm.FILL_FORMS: ModificationLevel.FORM_FILLING,
        MDPPerm.ANNOTATE: ModificationLevel.ANNOTATIONS,
    }.get(docmdp, ModificationLevel.LTA_UPDATES)
    if level > allowed:
        permits = {
            ModificationLevel.LTA_UPDATES: "no changes (DSS and document timestamps only)",
            ModificationLevel.FORM_FILLING: "form filling and signing only",
            ModificationLevel.ANNOTATIONS: "form filling, signing and annotations only",
        }[allowed]
        why = (
            f"the document was modified after this signature beyond what it permits: "
            f"{level.name} after a signature that allows {permits}"
            + (f" (DocMDP P={docmdp.value})" if docmdp is not None else "")
        )
        return level.name, "HASH_FAILURE", why
    return level.name, None, None


def _signer_of(rep: SignatureReport, emb: Any) -> None:
    """The signer in a report that fails before its CMS is verified (who signed, at least)."""
    # Only for the report (the failure is decided): no signer certificate, an unreadable one.
    with contextlib.suppress(Exception):
        rep.signer = signer_info(x509.load_der_x509_certificate(emb.signer_cert.dump()))


async def verify_pdf(data: bytes, *, trust: TrustConfig, now: dt.datetime) -> list[SignatureReport]:
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import SignatureCoverageLevel

    reader = PdfFileReader(io.BytesIO(data), strict=False)
    reports = []
    embedded = reader.embedded_regular_signatures
    if len(embedded) > trust.max_signatures:
        raise InvalidRequest(
            f"the PDF has {len(embedded)} signatures; at most {trust.max_signatures} are "
            "verified (signing.verify_max_signatures)"
        )
    dss_certs, dss_crls, dss_ocsps = _dss(reader)
    stamps = _document_timestamps(reader)
    for t in stamps:  # the DSS is also the document timestamps' validation data
        t.evidence.certs, t.evidence.crls, t.evidence.ocsps = dss_certs, dss_crls, dss_ocsps
    for emb in embedded:
        rep = SignatureReport(format="PAdES")
        reports.append(rep)
        try:
            coverage = emb.evaluate_signature_coverage()
            digest = emb.compute_digest()
        except Exception as e:  # noqa: BLE001 - pyHanko raises many types on broken PDFs
            rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", f"signature ByteRange unusable: {e}")
            continue
        if coverage < SignatureCoverageLevel.ENTIRE_REVISION:
            rep.fail(
                TOTAL_FAILED, "FORMAT_FAILURE", "the signature does not cover its whole revision"
            )
            continue
        emb.coverage = coverage  # what pyHanko's evaluate_modifications reads
        level, sub_indication, problem = _modifications(emb)
        rep.modification_level = level
        if sub_indication is not None and problem is not None:
            _signer_of(rep, emb)
            rep.fail(TOTAL_FAILED, sub_indication, problem)
            continue
        if coverage != SignatureCoverageLevel.ENTIRE_FILE:
            changes = _ALLOWED_CHANGES.get(level, f"no change pyHanko can see ({level})")
            rep.notes.append(f"the file was updated after this signature: {changes}")
        subs = await verify_cms_signed_data(
            emb.signed_data,
            fmt="PAdES",
            content=None,
            content_digest=digest,
            trust=trust,
            now=now,
            extra_certs=dss_certs,
            extra_crls=dss_crls,
            extra_ocsps=dss_ocsps,
            archive=_archives_for(emb, stamps, rep.notes),
        )
        sub = subs[0] if subs else rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "no SignerInfo")
        sub.notes = rep.notes + sub.notes
        sub.modification_level = rep.modification_level
        reports[-1] = sub
    return reports
