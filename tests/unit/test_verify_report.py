"""The document's verdict over its signatures (``VerificationReport.of``)."""

from __future__ import annotations

from gateway.verify.report import TOTAL_FAILED, SignatureReport, VerificationReport


def _sig(reason: str) -> SignatureReport:
    return SignatureReport(format="XAdES (jp-dispensing)", reason=reason)


def test_a_document_whose_signatures_all_pass_names_each() -> None:
    """A dispensing result: the summary names the doctor's and the pharmacist's signatures.
    Before, it named the first (the doctor's) alone, under the document's profile label."""
    doctor = _sig("valid XAdES signature by CN=Taro (Medical Doctor)")
    pharmacist = _sig("valid XAdES signature by CN=Hanako (Pharmacist)")
    report = VerificationReport.of("XAdES", [doctor, pharmacist])
    assert report.indication == "TOTAL-PASSED"
    assert report.reason == (
        "2 signatures, all valid: valid XAdES signature by CN=Taro (Medical Doctor); "
        "valid XAdES signature by CN=Hanako (Pharmacist)"
    )


def test_a_failed_signature_decides_the_summary() -> None:
    good = _sig("valid XAdES signature by CN=Taro (Medical Doctor)")
    bad = _sig("")
    bad.fail(TOTAL_FAILED, "HASH_FAILURE", "the document was changed")
    report = VerificationReport.of("XAdES", [good, bad])
    assert (report.indication, report.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE")
    assert report.reason == "2 signatures; the document was changed"
    assert VerificationReport.of("XAdES", [good]).reason == good.reason
