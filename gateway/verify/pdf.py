"""PAdES: PDF structure (ByteRange, coverage) from pyHanko, the CMS inside through
:mod:`gateway.verify.cms`."""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from gateway.errors import InvalidRequest
from gateway.verify.cms import verify_cms_signed_data
from gateway.verify.report import TOTAL_FAILED, SignatureReport
from gateway.verify.trust import TimestampEvidence, TrustConfig

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
        if coverage != SignatureCoverageLevel.ENTIRE_FILE:
            rep.notes.append("the file was updated after this signature (incremental update)")
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
        reports[-1] = sub
    return reports
