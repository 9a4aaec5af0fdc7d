"""PAdES verification against PDFs crafted by an attacker (offline: a software signer, pyHanko's
dummy timestamper with a chosen time, incremental updates written by hand).

1. A document timestamp proves the existence of the signatures in the revisions it covers, and
   of no others: one added *before* a signature must not date it (it would turn a signature by
   a since-revoked or expired certificate into a passed one).
2. What is changed after a signature counts: an incremental update that swaps the page content
   fails the signature; DSS and document timestamps (LTA updates) and, unless the signature's
   DocMDP forbids it, further signatures do not.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyhanko.sign import fields, signers

from gateway.pki.crl import CrlSource
from gateway.pki.issue import make_crl
from gateway.sandbox import testworld
from gateway.verify import TrustConfig, VerificationReport, verify_document
from tests.support import pdf_forge
from tests.support.softkey import World, make_world

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def world() -> World:
    """A TEST HPKI world whose certificates were issued 30 days ago."""
    return make_world(now=NOW - dt.timedelta(days=30))


def _trust(
    world: World, crls: Sequence[x509.CertificateRevocationList] = (), *, revocation: bool = False
) -> TrustConfig:
    return world.trust(
        tsa_anchors=[world.tsa_ca.cert], crls=CrlSource(list(crls)), check_revocation=revocation
    )


def _verify(pdf: bytes, trust: TrustConfig) -> VerificationReport:
    return asyncio.run(verify_document(pdf, trust=trust, now=NOW))


def _revoked_10_days_ago(world: World) -> list[x509.CertificateRevocationList]:
    """The signing CA's CRL revoking the signer 10 days ago, and the root's empty ARL."""
    revoked: list[tuple[int, dt.datetime, x509.ReasonFlags | None]] = [
        (world.signer_cert.serial_number, NOW - dt.timedelta(days=10), None)
    ]
    week = dt.timedelta(days=7)
    return [
        make_crl(world.ca, revoked=revoked, now=NOW - dt.timedelta(hours=1), next_update=week),
        make_crl(world.root, revoked=[], now=NOW - dt.timedelta(hours=1), next_update=week),
    ]


# -- 1. a document timestamp counts only for the signatures it covers -----------------------------


def test_an_older_document_timestamp_does_not_date_a_later_signature(world: World) -> None:
    old = NOW - dt.timedelta(days=20)
    stamped_first = pdf_forge.document_timestamp(world, pdf_forge.one_page_pdf(), old, field="TS")
    pdf = pdf_forge.sign(world, stamped_first)  # signed now, by a certificate revoked 10 days ago
    trust = _trust(world, _revoked_10_days_ago(world), revocation=True)

    rep = _verify(pdf, trust)
    # Before the fix: TOTAL-PASSED B-T, best time 20 days ago "proven by archive timestamp",
    # "revoked after the timestamp".
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "REVOKED_NO_POE"), rep.reason
    sig = rep.signatures[0]
    assert sig.proven_by == "validation time" and sig.best_signature_time == NOW.isoformat()
    assert sig.archive_timestamps == [] and sig.level == "B-B"
    assert any("'TS'" in n and "before this signature" in n for n in sig.notes), sig.notes
    # exactly what the same signature gets without the old timestamp
    control = _verify(pdf_forge.sign(world, pdf_forge.one_page_pdf()), trust)
    assert (control.indication, control.sub_indication) == (rep.indication, rep.sub_indication)


def test_older_document_timestamps_do_not_archive_an_expired_signature(world: World) -> None:
    spki = world.signer_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expired = testworld.issue_hpki_signer_cert(
        world.ca,
        public_key_der=spki,
        name_romaji="Expired Doctor",
        name_kanji="期限　切子",
        role="Medical Doctor",
        organization="HPKI TEST FACILITY",
        serial_number_attr="TEST0002",
        now=NOW - dt.timedelta(days=30),
        validity_days=20,  # expired 10 days ago
    )
    pdf = pdf_forge.one_page_pdf()
    pdf = pdf_forge.document_timestamp(world, pdf, NOW - dt.timedelta(days=25), field="TS1")
    pdf = pdf_forge.document_timestamp(world, pdf, NOW - dt.timedelta(days=22), field="TS2")
    pdf = pdf_forge.sign(world, pdf, cert=expired)  # signed now, after the expiry
    crl = make_crl(
        world.ca, revoked=[], now=NOW - dt.timedelta(days=21), next_update=dt.timedelta(days=7)
    )
    pdf = pdf_forge.add_dss(pdf, [crl])

    rep = _verify(pdf, _trust(world))
    # Before the fix: TOTAL-PASSED B-LTA, best time 25 days ago.
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "OUT_OF_BOUNDS_NO_POE")
    assert rep.signatures[0].archive_timestamps == []
    assert rep.signatures[0].proven_by == "validation time"


def test_a_later_document_timestamp_still_proves_the_signature(world: World) -> None:
    """The legitimate order: the document timestamp is added after the signature (B-T by a
    document timestamp, EN 319 142-1 §5.3); the revocation after its time does not count."""
    pdf = pdf_forge.sign(world, pdf_forge.one_page_pdf())
    at = NOW - dt.timedelta(days=20)  # the TEST TSA says so; the verifier trusts that TSA
    pdf = pdf_forge.document_timestamp(world, pdf, at, field="TS")
    rep = _verify(pdf, _trust(world, _revoked_10_days_ago(world), revocation=True))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    sig = rep.signatures[0]
    assert (sig.level, sig.proven_by) == ("B-T", "archive timestamp")
    assert sig.best_signature_time == at.isoformat()
    assert sig.modification_level == "LTA_UPDATES"


def test_a_document_timestamp_that_does_not_cover_its_revision_fails(world: World) -> None:
    """A document timestamp object rewritten in a later revision: pyHanko dates it to that
    revision, but its ByteRange still ends where it was first written."""
    import io

    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.pdf_utils.reader import PdfFileReader

    pdf = pdf_forge.sign(world, pdf_forge.one_page_pdf())
    pdf = pdf_forge.document_timestamp(world, pdf, NOW - dt.timedelta(days=1), field="TS")
    w = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    ts_field = next(
        f.get_object() for f in w.root["/AcroForm"]["/Fields"] if f.get_object()["/T"] == "TS"
    )
    w.update_container(ts_field["/V"].get_object())  # the same object again, in revision 3
    out = io.BytesIO()
    w.write(out)
    rewritten = out.getvalue()
    ts = PdfFileReader(io.BytesIO(rewritten), strict=False).embedded_timestamp_signatures[0]
    assert ts.signed_revision == 3

    rep = _verify(rewritten, _trust(world))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), rep.reason
    assert "document timestamp 'TS' does not cover its whole revision" in rep.reason


# -- 2. changes after signing ---------------------------------------------------------------------


def test_page_content_replaced_after_signing_fails(world: World) -> None:
    signed = pdf_forge.sign(world, pdf_forge.one_page_pdf("Take 1 tablet"))
    assert _verify(signed, _trust(world)).indication == "TOTAL-PASSED"
    changed = pdf_forge.replace_page_text(signed, "Take 50 tablets")

    rep = _verify(changed, _trust(world))
    # Before the fix: TOTAL-PASSED B-B with the note "the file was updated after this signature".
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE"), rep.reason
    assert "modified after this signature" in rep.reason
    sig = rep.signatures[0]
    assert sig.modification_level == "OTHER"
    assert sig.signer is not None and "Taro Test" in sig.signer["subject"]


def test_content_replaced_after_a_document_timestamp_fails(world: World) -> None:
    """The change comes after a legitimate B-LTA update: still caught (every revision after
    the signature is compared with the signed one)."""
    pdf = pdf_forge.sign(world, pdf_forge.one_page_pdf("Take 1 tablet"))
    pdf = pdf_forge.document_timestamp(world, pdf, NOW - dt.timedelta(minutes=1), field="TS")
    pdf = pdf_forge.replace_page_text(pdf, "Take 50 tablets")
    rep = _verify(pdf, _trust(world))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE"), rep.reason


def test_a_later_signature_breaks_a_no_changes_certification(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certification signature with DocMDP P=1 (no changes) followed by an approval
    signature (pyHanko refuses to write it; an attacker's tool need not)."""
    certified = pdf_forge.sign(
        world,
        pdf_forge.one_page_pdf(),
        field="Author",
        certify=True,
        docmdp=fields.MDPPerm.NO_CHANGES,
    )
    monkeypatch.setattr(
        signers.PdfSigner, "_enforce_certification_constraints", lambda self, reader: None
    )
    pdf = pdf_forge.sign(world, certified, field="Second")
    rep = _verify(pdf, _trust(world))
    author, second = rep.signatures
    assert (author.indication, author.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE")
    assert author.modification_level == "FORM_FILLING"
    assert "no changes" in author.reason
    assert second.indication == "TOTAL-PASSED" and second.modification_level == "NONE"
    assert rep.indication == "TOTAL-FAILED"


def test_lta_updates_and_further_signatures_pass(world: World) -> None:
    """What legitimate documents add after a signature: a DSS and document timestamps (B-LT,
    B-LTA), another approval signature; a certification allowing form filling permits those."""
    crl = make_crl(
        world.ca, revoked=[], now=NOW - dt.timedelta(hours=1), next_update=dt.timedelta(days=7)
    )
    pdf = pdf_forge.sign(world, pdf_forge.one_page_pdf())
    pdf = pdf_forge.document_timestamp(world, pdf, NOW - dt.timedelta(minutes=2), field="TS1")
    pdf = pdf_forge.add_dss(pdf, [crl])
    pdf = pdf_forge.document_timestamp(world, pdf, NOW - dt.timedelta(minutes=1), field="TS2")
    rep = _verify(pdf, _trust(world))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert (rep.signatures[0].level, rep.signatures[0].modification_level) == (
        "B-LTA",
        "LTA_UPDATES",
    )

    two = pdf_forge.sign(world, pdf_forge.sign(world, pdf_forge.one_page_pdf()), field="S2")
    rep = _verify(two, _trust(world))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert [s.modification_level for s in rep.signatures] == ["FORM_FILLING", "NONE"]

    certified = pdf_forge.sign(world, pdf_forge.one_page_pdf(), field="Author", certify=True)
    rep = _verify(pdf_forge.sign(world, certified, field="S2"), _trust(world))
    assert rep.indication == "TOTAL-PASSED", rep.reason
