"""PAdES: PDF structure (ByteRange, coverage) from pyHanko, the CMS inside through
:mod:`gateway.verify.cms`."""

from __future__ import annotations

import datetime as dt
import io
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


def _document_timestamps(reader: Any) -> list[TimestampEvidence]:
    """Document timestamps (PAdES B-LTA): archive timestamps over every earlier revision."""
    from asn1crypto import cms

    out = []
    for emb in reader.embedded_timestamp_signatures:
        token = cms.ContentInfo({"content_type": "signed_data", "content": emb.signed_data})
        try:
            digest = emb.compute_digest()
        except Exception as e:  # noqa: BLE001 - pyHanko raises many types on broken PDFs
            out.append(TimestampEvidence("archive", None, b"", error=f"ByteRange unusable: {e}"))
            continue
        out.append(TimestampEvidence("archive", token.dump(), b"", imprint_digest=digest))
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
    archives = _document_timestamps(reader)
    for a in archives:  # the DSS is also the document timestamps' validation data
        a.certs, a.crls, a.ocsps = dss_certs, dss_crls, dss_ocsps
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
            archive=archives,
        )
        sub = subs[0] if subs else rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "no SignerInfo")
        sub.notes = rep.notes + sub.notes
        reports[-1] = sub
    return reports
