"""PAdES: PDF structure (ByteRange, coverage) from pyHanko, the CMS inside through
:mod:`gateway.verify.cms`."""

from __future__ import annotations

import datetime as dt
import io

from gateway.errors import InvalidRequest
from gateway.verify.cms import verify_cms_signed_data
from gateway.verify.report import TOTAL_FAILED, SignatureReport
from gateway.verify.trust import TrustConfig

__all__ = ["verify_pdf"]


async def verify_pdf(data: bytes, *, trust: TrustConfig, now: dt.datetime) -> list[SignatureReport]:
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import SignatureCoverageLevel

    reader = PdfFileReader(io.BytesIO(data), strict=False)
    reports = []
    embedded = reader.embedded_signatures
    if len(embedded) > trust.max_signatures:
        raise InvalidRequest(
            f"the PDF has {len(embedded)} signatures; at most {trust.max_signatures} are "
            "verified (signing.verify_max_signatures)"
        )
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
            emb.signed_data, fmt="PAdES", content=None, content_digest=digest, trust=trust, now=now
        )
        sub = subs[0] if subs else rep.fail(TOTAL_FAILED, "FORMAT_FAILURE", "no SignerInfo")
        sub.notes = rep.notes + sub.notes
        reports[-1] = sub
    return reports
