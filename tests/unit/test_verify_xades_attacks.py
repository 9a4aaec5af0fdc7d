"""XAdES verification under the attacks of a review, each built in the test from the real signed
e-prescription (../shared/fixtures/e-prescription, MediSignVerifier's public test data) and
verified offline: with the real MHLW HPKI root and the CRLs the document carries, or (D, where
the signature must be remade) in the sample's tree signed anew by a software TEST world.

The tests of each attack failed before its fix (the others check that what must pass passes):
- A: thousands of ArchiveTimeStamps, each re-canonicalising every property before it;
- B: a namespaced look-alike of the signed element before it, the signed document wrapped after a
  forged one (or its root renamed), read as a plain XAdES signature;
- C: a comment inside the signed Base64 text (left out by C14N, cutting the text a reader gets);
- D: no SigningCertificate(V2), and an unsigned KeyInfo whose X509IssuerSerial (wrong issuer, right
  serial) or certificate (another of the same key) named the signer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from lxml import etree

from gateway.sandbox import testworld
from gateway.sign.xades import DS, XADES, c14n
from gateway.verify import TrustConfig, VerificationReport, verify_document
from gateway.verify.xml_refs import XADES141, id_index, reference_octets
from tests.support import softkey

FIX = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
SAMPLE = FIX / "e-prescription" / "Prescription-004_01.xml"
MHLW_ROOT = FIX / "real-hpki" / "mhlw_hpki_root_ca_v2.cer"
_DS = f"{{{DS}}}"
_XA = f"{{{XADES}}}"
_USP = (
    f"{_DS}Object/{_XA}QualifyingProperties/{_XA}UnsignedProperties/"
    f"{_XA}UnsignedSignatureProperties"
)


def _real_trust(**kw: Any) -> TrustConfig:
    """The MHLW root and the sample's own test TSA root (what the sample passes with)."""
    tsa_root = None
    for el in etree.parse(str(SAMPLE)).iter(f"{_XA}EncapsulatedX509Certificate"):
        c = x509.load_der_x509_certificate(base64.b64decode(el.text or ""))
        if c.subject == c.issuer and "TimeStampServer" in c.subject.rfc4514_string():
            tsa_root = c
    assert tsa_root is not None
    root = x509.load_der_x509_certificate(MHLW_ROOT.read_bytes())
    return TrustConfig(anchors=[root], tsa_anchors=[tsa_root], **kw)


def _limited(max_timestamps: int) -> TrustConfig:
    trust = _real_trust()
    trust.max_timestamps = max_timestamps  # set, not passed: the attribute is new
    return trust


def _sample() -> etree._Element:
    return etree.fromstring(SAMPLE.read_bytes())


def _signature(root: etree._Element) -> etree._Element:
    sig = root.find(f".//{_DS}Signature")
    assert sig is not None
    return sig


def _verify(doc: etree._Element | bytes, trust: TrustConfig | None = None) -> VerificationReport:
    data = doc if isinstance(doc, bytes) else etree.tostring(doc, xml_declaration=True)
    return asyncio.run(verify_document(data, trust=trust or _real_trust()))


def test_the_untouched_sample_passes() -> None:
    rep = _verify(_sample())
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].document_type == "prescription"


# -- A: archive timestamps -----------------------------------------------------------------------


def _with_archive_timestamps(n: int) -> etree._Element:
    """The sample plus ``n`` XAdES 1.4.1 ArchiveTimeStamps with junk tokens (of different
    lengths, so that each is unreadable in its own words)."""
    root = _sample()
    usp = _signature(root).find(_USP)
    assert usp is not None
    for i in range(n):
        ats = etree.SubElement(usp, f"{{{XADES141}}}ArchiveTimeStamp", Id=f"ats{i}")
        etree.SubElement(ats, f"{_XA}EncapsulatedTimeStamp").text = "A" * (40 + 4 * i)
    return root


def test_more_archive_timestamps_than_the_limit_are_refused_before_any_work() -> None:
    rep = _verify(_with_archive_timestamps(400))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE")
    assert rep.reason.startswith(
        "the signature has 401 timestamps; at most 10 are verified (signing.verify_max_timestamps)"
    ), rep.reason[:300]
    # The other faults are still named, but not one per timestamp: before, 35 KB here.
    assert len(rep.reason) < 1500, len(rep.reason)


def test_the_timestamp_limit_is_a_setting() -> None:
    rep = _verify(_with_archive_timestamps(3), _limited(3))
    assert "the signature has 4 timestamps; at most 3 are verified" in rep.reason


def test_each_property_is_canonicalised_once_for_all_archive_timestamps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within the limit, the input of each ArchiveTimeStamp is built on the one before it:
    the canonicalisations grow with the number of properties, not with its square."""
    from gateway.verify import xml_refs

    calls = 0
    real = xml_refs.c14n

    def counting(node: Any, *, exclusive: bool) -> bytes:
        nonlocal calls
        calls += 1
        return real(node, exclusive=exclusive)

    monkeypatch.setattr(xml_refs, "c14n", counting)
    n = 60
    rep = _verify(_with_archive_timestamps(n), _limited(100))
    assert rep.indication != "TOTAL-PASSED"
    assert "ArchiveTimeStamp" in rep.reason or "archive timestamp" in rep.reason
    # The references, SignedInfo, SignatureValue, KeyInfo and each of the 5 + 60 properties
    # once (72 here); before, everything again for every timestamp (2,373).
    assert calls < 3 * n, calls


def test_the_list_of_further_faults_is_cut_short() -> None:
    rep = _verify(_with_archive_timestamps(60), _limited(100))
    assert rep.indication == "TOTAL-FAILED"
    assert "also: " in rep.reason and " more" in rep.reason, rep.reason[:2000]
    assert len(rep.reason) < 1500, len(rep.reason)


# -- B: look-alike elements and an unknown root --------------------------------------------------

FORGED = base64.b64encode(b"1,forged\n").decode()


def _prescription(root: etree._Element) -> etree._Element:
    el = root.find("Prescription")
    assert el is not None
    return el


def _refused(rep: VerificationReport, *words: str) -> None:
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), rep.reason
    for w in words:
        assert w in rep.reason, rep.reason


def test_a_namespaced_look_alike_before_the_signed_document_is_refused() -> None:
    """A reader that ignores namespaces takes the first <PrescriptionDocument>: the forged one."""
    root = _sample()
    evil = etree.Element("{urn:evil}PrescriptionDocument", nsmap={None: "urn:evil"})
    evil.text = FORGED
    _prescription(root).insert(1, evil)
    data = etree.tostring(root)
    assert b'<PrescriptionDocument xmlns="urn:evil">' in data
    _refused(_verify(data), "urn:evil", "PrescriptionDocument")


def test_a_prefixed_look_alike_with_an_id_is_refused() -> None:
    root = _sample()
    evil = etree.Element("{urn:evil}PrescriptionDocument", nsmap={"p": "urn:evil"}, id="PD2")
    evil.text = FORGED
    _prescription(root).insert(1, evil)
    _refused(_verify(root), "urn:evil")


def test_an_element_in_a_foreign_namespace_anywhere_in_the_body_is_refused() -> None:
    root = _sample()
    extra = root.find("Prescription/AdditionalPrescriptionInformation")
    assert extra is not None
    etree.SubElement(extra, "{urn:evil}Note").text = "take 30 instead"
    _refused(_verify(root), "urn:evil", "no namespace")


def test_the_signed_document_wrapped_after_a_forged_one_is_refused() -> None:
    """<Envelope><Document>forged</Document><Document>the real one</Document></Envelope>: the
    root is no e-prescription, yet the signature is one (it sits in PrescriptionSign); before,
    TOTAL-PASSED as a plain XAdES signature, without the profile, placement and role checks."""
    real = _sample()
    envelope = etree.Element("Envelope")
    forged = etree.SubElement(etree.SubElement(envelope, "Document"), "Prescription")
    etree.SubElement(forged, "PrescriptionDocument").text = FORGED
    envelope.append(real)
    rep = _verify(envelope)
    _refused(rep, "<Envelope>", "PrescriptionSign")
    assert rep.signatures[0].document_type == "prescription"


def test_a_renamed_root_does_not_make_the_signature_a_plain_xades_one() -> None:
    root = _sample()
    root.tag = "Dokument"  # the references do not cover the root element itself
    rep = _verify(root)
    _refused(rep, "<Dokument>")
    assert rep.signatures[0].format == "XAdES (jp-eprescription)"


# -- C: the signed Base64 text split by a comment ------------------------------------------------


def _split(node: Any, at: int) -> etree._Element:
    """The sample with ``node`` (a comment or processing instruction) inside the signed
    PrescriptionDocument, ``at`` characters into its Base64 text."""
    root = _sample()
    el = root.find("Prescription/PrescriptionDocument")
    assert el is not None and el.text
    text = el.text
    el.text = text[:at] or None
    el.append(node)
    node.tail = text[at:]
    return root


@pytest.mark.parametrize("at", [0, 400])
def test_a_comment_inside_the_signed_document_text_is_refused(at: int) -> None:
    """C14N leaves comments out, so the digest still matches; a reader taking the element's
    text gets the part before the comment (a truncated CSV, or nothing)."""
    root = _split(etree.Comment("x"), at)
    read = root.find("Prescription/PrescriptionDocument")
    assert read is not None and len(read.text or "") == at
    rep = _verify(root)
    _refused(rep, "<PrescriptionDocument>", "comment")


def test_the_signed_document_element_must_hold_its_text_alone() -> None:
    """Whatever the child node: the fixed-path check refuses it itself (a processing
    instruction also changes the digest, so the whole verification fails earlier)."""
    from gateway.sign.eprescription import DISPENSING, PRESCRIPTION
    from gateway.verify.xml_profile import placement_problem

    root = _split(etree.PI("x"), 400)
    target = root.find("Prescription/PrescriptionDocument")
    assert target is not None
    problem = placement_problem(PRESCRIPTION, PRESCRIPTION.slots[0], root, [target])
    assert problem is not None and "processing instruction" in problem, problem
    # a dispensing result: the signed element is <Dispensing>, its Base64 in DispensingDocument
    doc = etree.fromstring(
        "<Document><DispensingManagement/><Dispensing id='Dispensing'><ReferencePrescription/>"
        "<DispensingDocument>MSxh<!--x-->Cg==</DispensingDocument></Dispensing>"
        "<DispensingSign/></Document>"
    )
    dispensing = doc.find("Dispensing")
    assert dispensing is not None
    problem = placement_problem(DISPENSING, DISPENSING.slots[0], doc, [dispensing])
    assert problem is not None and "<DispensingDocument>" in problem, problem


def test_signing_refuses_what_verification_would() -> None:
    """An unsigned prescription given for signing with a comment in its Base64 text."""
    from gateway.errors import InvalidRequest
    from gateway.sign.eprescription import PRESCRIPTION, check_document

    def unsigned(root: etree._Element) -> etree._ElementTree:
        slot = root.find("Prescription/PrescriptionSign")
        assert slot is not None
        for child in list(slot):
            slot.remove(child)
        slot.text = None
        return root.getroottree()

    check_document(unsigned(_sample()), PRESCRIPTION)
    with pytest.raises(InvalidRequest, match="Base64 text alone"):
        check_document(unsigned(_split(etree.Comment("x"), 400)), PRESCRIPTION)


# -- D: the signing-certificate binding ----------------------------------------------------------
# The sample's doctor key is not at hand: its signature is remade, in the sample's own tree,
# with a software test world's key (a TEST HPKI CA, role Medical Doctor).


@pytest.fixture(scope="module")
def world() -> softkey.World:
    return softkey.make_world()


def _world_trust(w: softkey.World) -> TrustConfig:
    return w.trust()


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _resigned(
    w: softkey.World,
    *,
    signing_certificate: bool = True,
    sign_key_info: bool = True,
    issuer_serial: tuple[str, int] | None = None,
) -> etree._Element:
    """The sample's tree signed anew by ``w``'s doctor: ES-BES (the unsigned properties of the
    real signature dropped), with or without SigningCertificateV2, the KeyInfo reference, and an
    X509IssuerSerial (issuer name, serial) in KeyInfo."""
    root = _sample()
    sig = _signature(root)
    qp = sig.find(f"{_DS}Object/{_XA}QualifyingProperties")
    assert qp is not None
    for el in qp.findall(f"{_XA}UnsignedProperties"):
        qp.remove(el)
    ssp = qp.find(f"{_XA}SignedProperties/{_XA}SignedSignatureProperties")
    scv2 = ssp.find(f"{_XA}SigningCertificateV2") if ssp is not None else None
    assert ssp is not None and scv2 is not None
    if signing_certificate:
        dv = scv2.find(f"{_XA}Cert/{_XA}CertDigest/{_DS}DigestValue")
        assert dv is not None
        dv.text = base64.b64encode(hashlib.sha256(_der(w.signer_cert)).digest()).decode()
    else:
        ssp.remove(scv2)
    x509data = sig.find(f"{_DS}KeyInfo/{_DS}X509Data")
    assert x509data is not None
    x509data[0].text = base64.b64encode(_der(w.signer_cert)).decode()
    if issuer_serial is not None:
        iss = etree.SubElement(x509data, f"{_DS}X509IssuerSerial")
        etree.SubElement(iss, f"{_DS}X509IssuerName").text = issuer_serial[0]
        etree.SubElement(iss, f"{_DS}X509SerialNumber").text = str(issuer_serial[1])
    si = sig.find(f"{_DS}SignedInfo")
    assert si is not None
    refs = si.findall(f"{_DS}Reference")
    if not sign_key_info:
        (ki_ref,) = [r for r in refs if "KeyInfo" in (r.get("Id") or "")]
        si.remove(ki_ref)
    index, _ = id_index(root)
    for ref in si.iterfind(f"{_DS}Reference"):
        octets, _target = reference_octets(ref, sig, root.getroottree(), index, None)
        dv = ref.find(f"{_DS}DigestValue")
        assert octets is not None and dv is not None
        dv.text = base64.b64encode(hashlib.sha256(octets).digest()).decode()
    value = w.signer_key.sign(c14n(si, exclusive=True), padding.PKCS1v15(), hashes.SHA256())
    sv = sig.find(f"{_DS}SignatureValue")
    assert sv is not None
    sv.text = base64.b64encode(value).decode()
    return root


def _issuer(w: softkey.World) -> str:
    return w.ca.cert.subject.rfc4514_string()


def test_the_resigned_sample_passes(world: softkey.World) -> None:
    rep = _verify(_resigned(world), _world_trust(world))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert "CN=Taro Test" in rep.signatures[0].signer["subject"]


def test_a_signed_key_info_with_issuer_and_serial_still_names_the_signer(
    world: softkey.World,
) -> None:
    """The reference verifier's third form (no SigningCertificate(V2)) keeps working when the
    KeyInfo is signed and its X509IssuerSerial names the certificate."""
    serial = world.signer_cert.serial_number
    for issuer in (_issuer(world), _issuer(world).replace(",", ", ")):
        doc = _resigned(world, signing_certificate=False, issuer_serial=(issuer, serial))
        rep = _verify(doc, _world_trust(world))
        assert rep.indication == "TOTAL-PASSED", rep.reason


def test_an_unsigned_key_info_binds_no_signer(world: softkey.World) -> None:
    """No SigningCertificateV2, the KeyInfo outside the references, its X509IssuerSerial with
    the right serial under another issuer's name: before, TOTAL-PASSED."""
    doc = _resigned(
        world,
        signing_certificate=False,
        sign_key_info=False,
        issuer_serial=("CN=Somebody Else", world.signer_cert.serial_number),
    )
    rep = _verify(doc, _world_trust(world))
    assert (rep.indication, rep.sub_indication) == (
        "INDETERMINATE",
        "NO_SIGNING_CERTIFICATE_FOUND",
    ), rep.reason
    assert "no reference signs the KeyInfo" in rep.reason, rep.reason


def test_issuer_serial_must_match_the_issuer_as_well(world: softkey.World) -> None:
    doc = _resigned(
        world,
        signing_certificate=False,
        issuer_serial=("CN=Somebody Else", world.signer_cert.serial_number),
    )
    rep = _verify(doc, _world_trust(world))
    assert (rep.indication, rep.sub_indication) == (
        "INDETERMINATE",
        "NO_SIGNING_CERTIFICATE_FOUND",
    ), rep.reason


def test_another_certificate_of_the_same_key_cannot_be_swapped_in(world: softkey.World) -> None:
    """Signed with the KeyInfo unsigned; afterwards KeyInfo swapped for another certificate
    of the same key (another doctor's name): before, TOTAL-PASSED under that identity."""
    spki = world.signer_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other = testworld.issue_hpki_signer_cert(
        world.ca, public_key_der=spki, name_romaji="Hanako Other", name_kanji="他",
        role="Medical Doctor", organization="OTHER HOSPITAL", serial_number_attr="OTHER0002",
        now=world.signer_cert.not_valid_before_utc,
    )  # fmt: skip
    doc = _resigned(
        world,
        signing_certificate=False,
        sign_key_info=False,
        issuer_serial=(_issuer(world), world.signer_cert.serial_number),
    )
    x509data = _signature(doc).find(f"{_DS}KeyInfo/{_DS}X509Data")
    assert x509data is not None
    x509data[0].text = base64.b64encode(_der(other)).decode()
    serial = x509data.find(f"{_DS}X509IssuerSerial/{_DS}X509SerialNumber")
    assert serial is not None
    serial.text = str(other.serial_number)
    rep = _verify(doc, _world_trust(world))
    assert rep.indication != "TOTAL-PASSED", rep.signatures[0].signer
    assert rep.sub_indication == "NO_SIGNING_CERTIFICATE_FOUND", rep.reason
