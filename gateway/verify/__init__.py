"""Verification of CAdES, XAdES (incl. the e-prescription and dispensing result) and PAdES.

Result: an ETSI EN 319 102-1 indication per signature and for the document (the worst
signature wins); see :mod:`gateway.verify.report`. Format parts: :mod:`.cms`, :mod:`.xml`,
:mod:`.pdf`; what all share (timestamps as proofs of existence, the path, revocation at the
proven time, the HPKI profile and role): :mod:`.trust`. Nothing here raises on bad input:
garbage yields TOTAL-FAILED / FORMAT_FAILURE.
"""

from __future__ import annotations

import datetime as dt
import logging

from gateway.clock import Clock, system_clock
from gateway.errors import InvalidRequest
from gateway.verify.report import TOTAL_FAILED, SignatureReport, VerificationReport
from gateway.verify.trust import TrustConfig

__all__ = [
    "SignatureReport",
    "TrustConfig",
    "VerificationReport",
    "detect_format",
    "verify_document",
]

_log = logging.getLogger("gateway.verify")


def detect_format(data: bytes) -> str:
    head = data[:1024].lstrip()
    if head.startswith(b"%PDF-"):
        return "PAdES"
    if head.startswith((b"<", b"\xef\xbb\xbf<")):
        return "XAdES"
    return "CAdES"


async def _verify(
    fmt: str, data: bytes, trust: TrustConfig, content: bytes | None, now: dt.datetime
) -> VerificationReport:
    if fmt == "PAdES":
        from gateway.verify.pdf import verify_pdf

        return VerificationReport.of(fmt, await verify_pdf(data, trust=trust, now=now))
    if fmt == "XAdES":
        from gateway.verify.xml import verify_xml

        return VerificationReport.of(
            fmt, await verify_xml(data, content=content, trust=trust, now=now)
        )
    from gateway.verify.cms import load_cms, verify_cms_signed_data

    try:
        sd = load_cms(data)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        return VerificationReport(
            fmt, [], TOTAL_FAILED, "FORMAT_FAILURE", f"not a PDF, XML or CMS signature ({e})"
        )
    sigs = await verify_cms_signed_data(
        sd, fmt="CAdES", content=content, content_digest=None, trust=trust, now=now
    )
    return VerificationReport.of(fmt, sigs)


async def verify_document(
    data: bytes,
    *,
    trust: TrustConfig,
    content: bytes | None = None,
    now: dt.datetime | None = None,
    clock: Clock = system_clock,
) -> VerificationReport:
    """Verify every signature in ``data`` (a signed PDF, signed XML or CMS in DER/PEM).

    ``now`` is the validation time (``verify --at``). Never raises for bad input: anything
    unreadable is TOTAL-FAILED / FORMAT_FAILURE.
    """
    now = clock() if now is None else now
    fmt = detect_format(data)
    try:
        report = await _verify(fmt, data, trust, content, now)
    except InvalidRequest as e:
        report = VerificationReport(fmt, [], TOTAL_FAILED, "FORMAT_FAILURE", e.description)
    except Exception as e:  # noqa: BLE001 - garbage must give a report, never an error
        _log.info("verification of a %s input failed to parse: %r", fmt, e)
        report = VerificationReport(
            fmt,
            [],
            TOTAL_FAILED,
            "FORMAT_FAILURE",
            f"unreadable {fmt} signature: {type(e).__name__}",
        )
    report.validation_time = now.isoformat()
    return report
