"""Verification results: an ETSI EN 319 102-1 indication per signature and for the document.

Indications are TOTAL-PASSED, TOTAL-FAILED and INDETERMINATE with a sub-indication from that
standard and a readable reason; the document's result is its worst signature's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "INDETERMINATE",
    "TOTAL_FAILED",
    "TOTAL_PASSED",
    "SignatureReport",
    "VerificationReport",
    "render_text",
]

TOTAL_PASSED = "TOTAL-PASSED"
TOTAL_FAILED = "TOTAL-FAILED"
INDETERMINATE = "INDETERMINATE"
_RANK = {TOTAL_PASSED: 0, INDETERMINATE: 1, TOTAL_FAILED: 2}


@dataclass
class SignatureReport:
    format: str
    indication: str = TOTAL_PASSED
    sub_indication: str | None = None
    reason: str = "the signature is valid"
    #: Baseline level reached (B-B, B-T, B-LT, B-LTA); XAdES also names the ES- form.
    level: str | None = None
    xades_level: str | None = None
    signer: dict[str, Any] | None = None
    signing_time: str | None = None
    #: The earliest time the signature is proven to have existed, and what proved it.
    best_signature_time: str | None = None
    proven_by: str | None = None
    timestamp: dict[str, Any] | None = None
    archive_timestamps: list[dict[str, Any]] = field(default_factory=list)
    chain: dict[str, Any] = field(default_factory=lambda: {"status": "not checked"})
    revocation: dict[str, Any] = field(default_factory=lambda: {"status": "not checked"})
    document_type: str | None = None
    role_permitted: bool | None = None
    #: Where the signature sits (XML: its path), e.g. the prescription inside a dispensing result.
    location: str | None = None
    notes: list[str] = field(default_factory=list)
    #: What the signature's references cover (element paths, "the whole document", ...).
    signed_elements: list[str] = field(default_factory=list)
    #: PAdES: what the revisions after the signature changed (pyHanko's difference analysis):
    #: NONE, LTA_UPDATES (DSS, document timestamps), FORM_FILLING (incl. further signatures),
    #: ANNOTATIONS, OTHER (anything else: the page content, ...); None for other formats.
    modification_level: str | None = None

    def fail(self, indication: str, sub: str, reason: str) -> SignatureReport:
        if self.indication == TOTAL_PASSED:
            self.indication, self.sub_indication, self.reason = indication, sub, reason
        return self

    @property
    def decided(self) -> bool:
        return self.indication != TOTAL_PASSED

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "level": self.level,
            "xades_level": self.xades_level,
            "indication": self.indication,
            "sub_indication": self.sub_indication,
            "reason": self.reason,
            "signer": self.signer,
            "signing_time": self.signing_time,
            "best_signature_time": self.best_signature_time,
            "proven_by": self.proven_by,
            "timestamp": self.timestamp,
            "archive_timestamps": self.archive_timestamps,
            "chain": self.chain,
            "revocation": self.revocation,
            "document_type": self.document_type,
            "role_permitted": self.role_permitted,
            "location": self.location,
            "notes": self.notes,
            "signed_elements": self.signed_elements,
            "modification_level": self.modification_level,
        }


@dataclass
class VerificationReport:
    format: str
    signatures: list[SignatureReport]
    indication: str = TOTAL_PASSED
    sub_indication: str | None = None
    reason: str = ""
    validation_time: str | None = None

    @classmethod
    def of(cls, fmt: str, sigs: list[SignatureReport]) -> VerificationReport:
        if not sigs:
            return cls(fmt, [], TOTAL_FAILED, "FORMAT_FAILURE", "no signature found")
        worst = max(sigs, key=lambda s: _RANK[s.indication])
        if len(sigs) == 1:
            reason = worst.reason
        elif worst.indication == TOTAL_PASSED:
            # Every signature named (a dispensing result: the doctor's and the pharmacist's),
            # not the first one alone as if it were the document's.
            reason = f"{len(sigs)} signatures, all valid: " + "; ".join(s.reason for s in sigs)
        else:
            reason = f"{len(sigs)} signatures; {worst.reason}"
        return cls(fmt, sigs, worst.indication, worst.sub_indication, reason)

    @property
    def passed(self) -> bool:
        return self.indication == TOTAL_PASSED

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "indication": self.indication,
            "sub_indication": self.sub_indication,
            "reason": self.reason,
            "validation_time": self.validation_time,
            "signatures": [s.to_json_dict() for s in self.signatures],
        }


def _indication(indication: str, sub: str | None) -> str:
    return indication + (f" / {sub}" if sub else "")


def render_text(report: VerificationReport) -> str:
    """The readable report of ``hpki-gateway verify`` (``--json`` prints the dict instead)."""
    lines = [f"{_indication(report.indication, report.sub_indication)}: {report.reason}"]
    if report.validation_time:
        lines.append(f"  validated at: {report.validation_time}")
    for i, sig in enumerate(report.signatures, 1):
        level = " ".join(
            x for x in (sig.level, f"({sig.xades_level})" if sig.xades_level else "") if x
        )
        lines.append(
            f"  signature {i}: {sig.format} {level} "
            + _indication(sig.indication, sig.sub_indication)
        )
        if sig.location:
            lines.append(f"    at:         {sig.location}")
        if sig.decided:
            lines.append(f"    reason:     {sig.reason}")
        if sig.signer:
            lines.append(f"    signer:     {sig.signer['subject']}")
            lines.append(f"    hcRole:     {', '.join(sig.signer['hc_roles']) or '-'}")
        if sig.document_type:
            lines.append(
                f"    document:   {sig.document_type} (role may sign: {sig.role_permitted})"
            )
        if sig.signing_time:
            lines.append(f"    signed at:  {sig.signing_time} (claimed)")
        if sig.best_signature_time:
            lines.append(f"    proven at:  {sig.best_signature_time} ({sig.proven_by})")
        if sig.timestamp:
            lines.append(f"    timestamp:  {sig.timestamp['time']} ({sig.timestamp['status']})")
        for ats in sig.archive_timestamps:
            lines.append(f"    archive ts: {ats['time']} ({ats['status']})")
        if sig.modification_level:
            lines.append(f"    changed:    {sig.modification_level} (after the signature)")
        lines.append(
            f"    chain:      {sig.chain.get('status')}"
            + (f" at {sig.chain['checked_at']}" if sig.chain.get("checked_at") else "")
        )
        lines.append(
            f"    revocation: {sig.revocation.get('status')}"
            + (f" ({sig.revocation['reason']})" if sig.revocation.get("reason") else "")
        )
        for note in sig.notes:
            lines.append(f"    note:       {note}")
    return "\n".join(lines)
