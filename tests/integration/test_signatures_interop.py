"""Signatures made on a real SoftHSM key, checked by verifiers nobody here wrote.

CAdES: ``openssl cms -verify``; timestamps: ``openssl ts -verify``; XAdES and the e-prescription:
``xmlsec1 --verify`` and signxml's XAdESVerifier; PAdES: ``pdfsig`` (NSS trust store made with
``certutil``) and pyHanko's validator. A one-byte change, a swapped certificate and a moved
signature must fail each of them AND the gateway's own verifier. The -T levels use the TEST
TSA that ``hpki-gateway serve`` runs for the sandbox (the ``gateway`` fixture).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import io
import json
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from gateway.errors import RoleNotPermitted, TsaTimeout, TsaUnavailable
from gateway.pki.crl import CrlSource, load_crl_files
from gateway.sign import cades
from gateway.sign.eprescription import RolePolicy
from gateway.sign.service import SignedDocument, sign_document
from gateway.sign.timestamp import Rfc3161Client, parse_token
from gateway.sign.xades import DS, XADES, c14n
from gateway.verify import TrustConfig, verify_document
from tests.support.gateway import Server, client_context, request, run_cli
from tests.support.signworld import SignWorld, make_sign_world
from tests.support.softhsm import SOFTHSM_MODULE, process_token

pytestmark = pytest.mark.hsm

CSV = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,3錠,分3毎食後\r\n".encode()
OTHER_CSV = "1,医療機関コード,1310000011\r\n2,処方,オキシコドン錠,30錠\r\n".encode()
NS = {"ds": DS, "xades": XADES}


def _require(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            raise RuntimeError(f"{t} is not installed: run scripts/bootstrap.sh")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SignWorld:
    token = process_token(tmp_path_factory, "issue4-interop")
    return make_sign_world(
        module_path=SOFTHSM_MODULE,
        token_label=token.label,
        pin=token.pin,
        conf=token.conf,
        directory=tmp_path_factory.mktemp("signworld"),
    )


@pytest.fixture(scope="module")
def tsa(sandbox: dict[str, Any], gateway: Server) -> dict[str, Any]:
    """The sandbox TEST TSA (served by the running gateway) and its root."""
    anchors = [
        x509.load_pem_x509_certificate(Path(p).read_bytes()) for p in sandbox["tsa_trust_anchors"]
    ]
    return {"url": sandbox["tsa_url"], "anchors": anchors, "ca": sandbox["tsa_trust_anchors"][0]}


def _trust(world: SignWorld, tsa_anchors: list[x509.Certificate] | None = None) -> TrustConfig:
    return TrustConfig(
        anchors=[world.root.cert],
        intermediates=[world.ca.cert],
        tsa_anchors=tsa_anchors or [],
        crls=CrlSource(load_crl_files([world.dir / "root.crl", world.dir / "ca.crl"])),
    )


def _sign(world: SignWorld, tsa_url: str | None = None, **kw: Any) -> SignedDocument:
    async def go() -> SignedDocument:
        client = Rfc3161Client(url=tsa_url, timeout=10) if tsa_url else None
        try:
            return await sign_document(
                key=world.key,
                chain=kw.pop("chain", world.chain),
                tsa=client,
                **kw,
            )
        finally:
            if client:
                await client.close()

    return asyncio.run(go())


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _verify(
    world: SignWorld,
    data: bytes,
    content: bytes | None = None,
    tsa_anchors: list[x509.Certificate] | None = None,
) -> Any:
    return asyncio.run(verify_document(data, trust=_trust(world, tsa_anchors), content=content))


# -- CAdES --------------------------------------------------------------------------------------


def _openssl_cms(world: SignWorld, sig: Path, content: Path | None = None) -> int:
    _require("openssl")
    args = [
        "openssl",
        "cms",
        "-verify",
        "-binary",
        "-inform",
        "DER",
        "-in",
        str(sig),
        "-CAfile",
        str(world.dir / "root.pem"),
        "-purpose",
        "any",
        "-out",
        "/dev/null",
    ]
    if content is not None:
        args += ["-content", str(content)]
    return subprocess.run(args, capture_output=True, check=False).returncode


@pytest.mark.parametrize("envelope", ["Attached", "Detached"])
def test_cades_bb_verifies_with_openssl_and_ours(world: SignWorld, envelope: str) -> None:
    doc = b"prescription bytes \x00\x01 as sent"
    res = _sign(
        world, signature_format="C", conformance_level="AdES-B-B", envelope=envelope, document=doc
    )
    sig = res.document_with_signature or res.signature_object
    assert sig is not None
    assert (res.signature_object is not None) == (envelope == "Detached")
    p = world.write(f"c-{envelope}.p7s", sig)
    content = world.write("c-content.bin", doc) if envelope == "Detached" else None
    assert _openssl_cms(world, p, content) == 0
    rep = _verify(world, sig, content=doc if content else None)
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == "B-B"
    assert rep.signatures[0].signer["hc_roles"] == ["Medical Doctor"]
    # the fast encoder's output is strict DER that asn1crypto reads back identically
    from asn1crypto import cms

    assert cms.ContentInfo.load(sig, strict=True).dump() == sig
    attrs = cms.ContentInfo.load(sig)["content"]["signer_infos"][0]["signed_attrs"]
    assert [a["type"].native for a in attrs] == [
        "content_type",
        "signing_time",
        "message_digest",
        "signing_certificate_v2",
    ]


def _swap_certificate(sig: bytes, old: x509.Certificate, new: x509.Certificate) -> bytes:
    """The CMS ``sig`` with certificate ``old`` replaced by ``new`` (re-encoded, any length)."""
    old_der = old.public_bytes(serialization.Encoding.DER)
    new_der = new.public_bytes(serialization.Encoding.DER)
    info = cms.ContentInfo.load(sig)
    signed = info["content"]
    choices = [c for c in signed["certificates"]]
    assert [c.chosen.dump() for c in choices].count(old_der) == 1
    signed["certificates"] = cms.CertificateSet(
        [
            cms.CertificateChoices(name="certificate", value=asn1_x509.Certificate.load(new_der))
            if c.chosen.dump() == old_der
            else c
            for c in choices
        ]
    )
    out = info.dump()
    assert out != sig
    return out


def test_cades_tampering_fails_openssl_and_ours(world: SignWorld) -> None:
    doc = b"the prescription content"
    sig = _sign(
        world, signature_format="C", conformance_level="AdES-B-B", envelope="Attached", document=doc
    ).document_with_signature
    assert sig is not None
    # one byte of the embedded content
    bad = _flip(sig, sig.index(doc) + 3)
    assert _openssl_cms(world, world.write("c-bad.p7s", bad)) != 0
    rep = _verify(world, bad)
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE")
    # a swapped certificate: the signer's certificate replaced by another doctor's
    swapped = _swap_certificate(sig, world.cert, world.other_cert)
    # Still well-formed CMS carrying the other doctor's certificate: what fails below is the
    # signature check, not the parsing.
    certs = cms.ContentInfo.load(swapped, strict=True)["content"]["certificates"]
    other_der = world.other_cert.public_bytes(serialization.Encoding.DER)
    assert [c.chosen.dump() for c in certs].count(other_der) == 1
    assert _openssl_cms(world, world.write("c-swap.p7s", swapped)) != 0
    assert _verify(world, swapped).indication != "TOTAL-PASSED"
    # a moved signature: the detached signature of this document presented for another one
    det = _sign(
        world, signature_format="C", conformance_level="AdES-B-B", envelope="Detached", document=doc
    ).signature_object
    assert det is not None
    other_doc = world.write("c-other.bin", b"another prescription")
    assert _openssl_cms(world, world.write("c-det.p7s", det), other_doc) != 0
    assert _verify(world, det, content=b"another prescription").sub_indication == "HASH_FAILURE"


def test_cades_bt_timestamp_verifies_with_openssl_ts(world: SignWorld, tsa: dict[str, Any]) -> None:
    _require("openssl")
    doc = b"B-T content"
    sig = _sign(
        world,
        tsa["url"],
        signature_format="C",
        conformance_level="AdES-B-T",
        envelope="Attached",
        document=doc,
    ).document_with_signature
    assert sig is not None
    assert _openssl_cms(world, world.write("c-bt.p7s", sig)) == 0
    from asn1crypto import cms

    si = cms.ContentInfo.load(sig)["content"]["signer_infos"][0]
    token = si["unsigned_attrs"][0]["values"][0].dump()
    tok = world.write("c-bt.tst", token)
    digest = hashlib.sha256(si["signature"].native).hexdigest()
    res = subprocess.run(
        [
            "openssl",
            "ts",
            "-verify",
            "-digest",
            digest,
            "-in",
            str(tok),
            "-token_in",
            "-CAfile",
            tsa["ca"],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert "Verification: OK" in res.stdout
    rep = _verify(world, sig, tsa_anchors=tsa["anchors"])
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == "B-T"
    assert rep.signatures[0].timestamp["status"] == "valid"
    # a timestamp from a TSA we do not trust is not accepted
    assert _verify(world, sig).sub_indication == "NO_CERTIFICATE_CHAIN_FOUND"


# -- e-prescription (XAdES) ------------------------------------------------------------------------


def _xmlsec(world: SignWorld, path: Path) -> subprocess.CompletedProcess[str]:
    _require("xmlsec1")
    return subprocess.run(
        [
            "xmlsec1",
            "--verify",
            "--id-attr:Id",
            "Signature",
            "--id-attr:Id",
            "SignedProperties",
            "--id-attr:Id",
            "KeyInfo",
            "--id-attr:Id",
            "Object",
            "--id-attr:id",
            "PrescriptionDocument",
            "--id-attr:id",
            "DispensingDocument",
            "--trusted-pem",
            str(world.dir / "root.pem"),
            "--untrusted-pem",
            str(world.dir / "ca.pem"),
            "--verification-time",
            dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def _signxml(data: bytes, cert: x509.Certificate) -> None:
    from signxml import SignatureConfiguration
    from signxml.xades import XAdESVerifier

    XAdESVerifier().verify(
        data, x509_cert=cert, expect_config=SignatureConfiguration(expect_references=3)
    )


def _eprescription(world: SignWorld, csv: bytes = CSV, **kw: Any) -> bytes:
    res = _sign(
        world,
        kw.pop("tsa_url", None),
        signature_format="X",
        conformance_level=kw.pop("level", "AdES-B-B"),
        envelope="Enveloped",
        document=csv,
        profile=kw.pop("profile", "jp-eprescription"),
        **kw,
    )
    assert res.document_with_signature is not None
    return res.document_with_signature


def test_eprescription_structure_is_hpki_section_3(world: SignWorld) -> None:
    xml = _eprescription(world)
    root = etree.fromstring(xml)
    assert root.tag == "Document" and root.get("id") == "Document"
    xsi = "{http://www.w3.org/2001/XMLSchema-instance}noNamespaceSchemaLocation"
    assert root.get(xsi) == "EP.xsd"
    pres = root.find("Prescription")
    assert [c.tag for c in pres] == [
        "PrescriptionManagement",
        "PrescriptionDocument",
        "AdditionalPrescriptionInformation",
        "PrescriptionSign",
    ]
    assert pres.find("PrescriptionManagement/Version").get("Value") == "EPS1.0"
    uuid.UUID(pres.find("PrescriptionManagement/PrescriptionId").get("Value"))
    assert base64.b64decode(pres.find("PrescriptionDocument").text) == CSV
    sig = pres.find("PrescriptionSign/ds:Signature", NS)
    assert sig.get("Id") == "PrescriptionSign"
    si = sig.find("ds:SignedInfo", NS)
    assert si.find("ds:CanonicalizationMethod", NS).get("Algorithm") == (
        "http://www.w3.org/2001/10/xml-exc-c14n#"
    )
    assert si.find("ds:SignatureMethod", NS).get("Algorithm") == (
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
    )
    refs = si.findall("ds:Reference", NS)
    assert len(refs) == 3
    assert refs[0].get("Id").endswith("-Reference1-Detached")
    assert refs[0].get("URI") == "#PrescriptionDocument"
    ki = sig.find("ds:KeyInfo", NS)
    sp = sig.find("ds:Object/xades:QualifyingProperties/xades:SignedProperties", NS)
    assert refs[1].get("URI") == f"#{ki.get('Id')}" and refs[1].get("Type") is None
    assert refs[2].get("URI") == f"#{sp.get('Id')}"
    assert refs[2].get("Type") == "http://uri.etsi.org/01903#SignedProperties"
    exc = ["http://www.w3.org/2001/10/xml-exc-c14n#"]
    assert [
        [t.get("Algorithm") for t in r.findall("ds:Transforms/ds:Transform", NS)] for r in refs
    ] == [
        [],
        exc,
        exc,
    ]
    for r in refs:
        assert r.find("ds:DigestMethod", NS).get("Algorithm") == (
            "http://www.w3.org/2001/04/xmlenc#sha256"
        )
    cert_der = base64.b64decode(ki.find("ds:X509Data/ds:X509Certificate", NS).text)
    assert cert_der == world.cert.public_bytes(serialization.Encoding.DER)
    qp = sig.find("ds:Object/xades:QualifyingProperties", NS)
    assert qp.get("Target") == "#PrescriptionSign"
    st = sp.find("xades:SignedSignatureProperties/xades:SigningTime", NS).text
    assert st.endswith("+00:00") and dt.datetime.fromisoformat(st).utcoffset() == dt.timedelta(0)
    cert_el = sp.find("xades:SignedSignatureProperties/xades:SigningCertificateV2/xades:Cert", NS)
    assert base64.b64decode(cert_el.find("xades:CertDigest/ds:DigestValue", NS).text) == (
        hashlib.sha256(cert_der).digest()
    )
    assert [etree.QName(c).localname for c in cert_el] == ["CertDigest"]


def test_eprescription_verifies_with_xmlsec1_signxml_and_ours(world: SignWorld) -> None:
    xml = _eprescription(world)
    res = _xmlsec(world, world.write("ep.xml", xml))
    assert res.returncode == 0, res.stderr
    _signxml(xml, world.cert)
    rep = _verify(world, xml)
    assert rep.indication == "TOTAL-PASSED", rep.reason
    sig = rep.signatures[0]
    assert sig.document_type == "prescription" and sig.role_permitted is True
    assert sig.revocation["status"] == "good"


def _tampered_cases(world: SignWorld, xml: bytes) -> dict[str, bytes]:
    b64 = base64.b64encode(CSV)
    i = xml.index(b64) + 10
    one_byte = xml[:i] + (b"A" if xml[i : i + 1] != b"A" else b"B") + xml[i + 1 :]
    der = base64.b64encode(world.cert.public_bytes(serialization.Encoding.DER))
    other = base64.b64encode(world.other_cert.public_bytes(serialization.Encoding.DER))
    swapped = xml.replace(der, other)
    # moved: this signature transplanted into another prescription
    other_doc = etree.fromstring(_eprescription(world, OTHER_CSV))
    this_sig = etree.fromstring(xml).find("Prescription/PrescriptionSign/ds:Signature", NS)
    slot = other_doc.find("Prescription/PrescriptionSign")
    slot.remove(slot[0])
    slot.append(this_sig)
    moved = etree.tostring(other_doc, xml_declaration=True, encoding="UTF-8")
    return {"one_byte": one_byte, "swapped_certificate": swapped, "moved_signature": moved}


@pytest.mark.parametrize("case", ["one_byte", "swapped_certificate", "moved_signature"])
def test_eprescription_tampering_fails_every_verifier(world: SignWorld, case: str) -> None:
    bad = _tampered_cases(world, _eprescription(world))[case]
    assert _xmlsec(world, world.write(f"ep-{case}.xml", bad)).returncode != 0
    signer_cert = world.other_cert if case == "swapped_certificate" else world.cert
    with pytest.raises(Exception):  # noqa: B017 - signxml raises InvalidDigest/InvalidSignature
        _signxml(bad, signer_cert)
    rep = _verify(world, bad)
    assert rep.indication == "TOTAL-FAILED", rep.reason
    assert rep.sub_indication in ("HASH_FAILURE", "SIG_CRYPTO_FAILURE")


def test_moving_the_signature_inside_the_document_fails_ours(world: SignWorld) -> None:
    root = etree.fromstring(_eprescription(world))
    sig = root.find("Prescription/PrescriptionSign/ds:Signature", NS)
    root.append(sig)  # out of PrescriptionSign: the digests still match, the profile does not
    rep = _verify(world, etree.tostring(root))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE")
    assert "not at Document/Prescription/PrescriptionSign" in rep.reason


def _wrapped(xml: bytes) -> bytes:
    """Signature wrapping: the signed PrescriptionDocument moved into another element (where the
    reference still finds it by Id) and a forged, unsigned one put at the profile's path."""
    root = etree.fromstring(xml)
    pres = root.find("Prescription")
    signed = pres.find("PrescriptionDocument")
    pres.remove(signed)
    etree.SubElement(root, "Attachment").append(signed)
    forged = etree.Element("PrescriptionDocument")
    forged.text = base64.b64encode(OTHER_CSV).decode()
    pres.insert(1, forged)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def test_signature_wrapping_fails_ours(world: SignWorld) -> None:
    xml = _eprescription(world)
    ok = _verify(world, xml)
    assert ok.indication == "TOTAL-PASSED", ok.reason
    assert "/Document/Prescription/PrescriptionDocument" in ok.signatures[0].signed_elements
    rep = _verify(world, _wrapped(xml))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), rep.reason
    assert "PrescriptionDocument" in rep.reason
    # the same with the forged element carrying the Id too: duplicate Id
    root = etree.fromstring(_wrapped(xml))
    root.find("Prescription/PrescriptionDocument").set("id", "PrescriptionDocument")
    rep = _verify(world, etree.tostring(root))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), rep.reason
    # a second Prescription container in front, holding the forged document and the signature
    root = etree.fromstring(xml)
    real = root.find("Prescription")
    fake = etree.Element("Prescription")
    fake.append(etree.fromstring(b"<PrescriptionDocument>AAAA</PrescriptionDocument>"))
    fake.append(real.find("PrescriptionSign"))
    root.insert(0, fake)
    rep = _verify(world, etree.tostring(root))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), rep.reason
    # a forged SignedProperties next to the signed one
    root = etree.fromstring(xml)
    obj = root.find("Prescription/PrescriptionSign/ds:Signature/ds:Object", NS)
    sig = obj.getparent()
    extra = etree.SubElement(sig, f"{{{DS}}}Object")
    extra.append(
        etree.fromstring(
            f'<xades:QualifyingProperties xmlns:xades="{XADES}">'
            "<xades:SignedProperties/></xades:QualifyingProperties>"
        )
    )
    rep = _verify(world, etree.tostring(root))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "FORMAT_FAILURE"), rep.reason


def test_dispensing_needs_a_pharmacist(world: SignWorld) -> None:
    prescription = _eprescription(world)
    with pytest.raises(RoleNotPermitted, match="Medical Doctor may not sign a dispensing"):
        _eprescription(world, profile="jp-dispensing", eprescription_input=_rx(prescription))
    xml = _eprescription(
        world,
        profile="jp-dispensing",
        chain=[world.pharmacist_cert, world.ca.cert],
        eprescription_input=_rx(prescription),
    )
    root = etree.fromstring(xml)
    assert root.find("DispensingSign/ds:Signature", NS).get("Id") == "DispensingSign"
    assert root.find("DispensingManagement/Version").get("Value") == "EPD1.0"
    assert _xmlsec(world, world.write("disp.xml", xml)).returncode == 0
    rep = _verify(world, xml)
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert [(s.document_type, s.indication) for s in rep.signatures] == [
        ("prescription", "TOTAL-PASSED"),
        ("dispensing", "TOTAL-PASSED"),
    ]
    with pytest.raises(RoleNotPermitted, match="Pharmacist may not sign a prescription"):
        _eprescription(world, chain=[world.pharmacist_cert, world.ca.cert])


def _rx(prescription: bytes) -> Any:
    from gateway.sign.eprescription import EPrescriptionInput

    return EPrescriptionInput(prescription=prescription)


def test_verifier_refuses_a_role_the_mapping_does_not_allow(world: SignWorld) -> None:
    xml = _eprescription(world)
    trust = _trust(world)
    trust.roles = RolePolicy({"prescription": ["Dentist"]})
    rep = asyncio.run(verify_document(xml, trust=trust))
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "SIG_CONSTRAINTS_FAILURE")
    assert rep.signatures[0].role_permitted is False


def test_xades_bt_signature_timestamp_over_c14n_signature_value(
    world: SignWorld, tsa: dict[str, Any]
) -> None:
    xml = _eprescription(world, tsa_url=tsa["url"], level="AdES-B-T")
    root = etree.fromstring(xml)
    sv = root.find(".//ds:SignatureValue", NS)
    enc = root.find(".//xades:SignatureTimeStamp/xades:EncapsulatedTimeStamp", NS)
    token = base64.b64decode(enc.text)
    imprint = parse_token(token).info["message_imprint"]["hashed_message"].native
    # As in the national service's samples: no CanonicalizationMethod in the SignatureTimeStamp,
    # so the imprint is over the XAdES default, inclusive C14N 1.0 of the SignatureValue.
    assert root.find(".//xades:SignatureTimeStamp/ds:CanonicalizationMethod", NS) is None
    assert imprint == hashlib.sha256(c14n(sv, exclusive=False)).digest()
    tok = world.write("x-bt.tst", token)
    res = subprocess.run(
        [
            "openssl",
            "ts",
            "-verify",
            "-digest",
            imprint.hex(),
            "-in",
            str(tok),
            "-token_in",
            "-CAfile",
            tsa["ca"],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert _xmlsec(world, world.write("ep-bt.xml", xml)).returncode == 0
    _signxml(xml, world.cert)
    rep = _verify(world, xml, tsa_anchors=tsa["anchors"])
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == "B-T"
    # changing the signature value breaks the timestamp and the signature
    bad = xml.replace(sv.text[:12].encode(), b"AAAAAAAAAAAA")
    assert _verify(world, bad, tsa_anchors=tsa["anchors"]).indication == "TOTAL-FAILED"


@pytest.mark.parametrize("envelope", ["Enveloped", "Enveloping", "Detached"])
def test_xades_envelopes(world: SignWorld, envelope: str) -> None:
    doc = b"<order><item>1</item></order>" if envelope != "Detached" else b"binary \x00 data"
    res = _sign(
        world, signature_format="X", conformance_level="AdES-B-B", envelope=envelope, document=doc
    )
    xml = res.document_with_signature or res.signature_object
    assert xml is not None
    content = doc if envelope == "Detached" else None
    assert _verify(world, xml, content=content).indication == "TOTAL-PASSED"
    if envelope != "Detached":
        assert _xmlsec(world, world.write(f"x-{envelope}.xml", xml)).returncode == 0
        _signxml(xml, world.cert)
        bad = xml.replace(b"<item>1</item>", b"<item>2</item>")
        assert _xmlsec(world, world.write(f"x-{envelope}-bad.xml", bad)).returncode != 0
        assert _verify(world, bad).sub_indication == "HASH_FAILURE"
    else:
        assert _verify(world, xml, content=b"binary \x00 dat4").sub_indication == "HASH_FAILURE"
        assert _verify(world, xml).sub_indication == "SIGNED_DATA_NOT_FOUND"


# -- PAdES -----------------------------------------------------------------------------------------


def _pdf() -> bytes:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 760, "PRESCRIPTION (TEST) - hpki-gateway")
    c.save()
    return buf.getvalue()


@pytest.fixture(scope="module")
def nssdb(world: SignWorld) -> str:
    _require("certutil", "pdfsig")
    d = world.dir / "nss"
    d.mkdir(exist_ok=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{d}", "--empty-password"], check=True)
    subprocess.run(
        [
            "certutil",
            "-A",
            "-d",
            f"sql:{d}",
            "-n",
            "hpki-test-root",
            "-t",
            "CT,C,C",
            "-i",
            str(world.dir / "root.pem"),
        ],
        check=True,
    )
    return f"sql:{d}"


def _pdfsig(path: Path, nssdb: str) -> str:
    return subprocess.run(
        ["pdfsig", "-nssdir", nssdb, str(path)], capture_output=True, text=True, check=False
    ).stdout


def _pyhanko_validate(world: SignWorld, pdf: bytes) -> Any:
    from asn1crypto import x509 as ax
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    root = ax.Certificate.load(world.root.cert.public_bytes(serialization.Encoding.DER))
    ca = ax.Certificate.load(world.ca.cert.public_bytes(serialization.Encoding.DER))
    vc = ValidationContext(
        trust_roots=[root], other_certs=[ca], allow_fetching=False, revocation_mode="soft-fail"
    )
    sig = PdfFileReader(io.BytesIO(pdf)).embedded_signatures[0]
    return validate_pdf_signature(sig, vc)


@pytest.mark.parametrize("envelope", ["Certification", "Revision"])
def test_pades_verifies_with_pdfsig_pyhanko_and_ours(
    world: SignWorld, nssdb: str, envelope: str
) -> None:
    pdf = _sign(
        world,
        signature_format="P",
        conformance_level="AdES-B-B",
        envelope=envelope,
        document=_pdf(),
    ).document_with_signature
    assert pdf is not None
    out = _pdfsig(world.write(f"p-{envelope}.pdf", pdf), nssdb)
    assert "Signature is Valid" in out and "Certificate is Trusted" in out, out
    assert "ETSI.CAdES.detached" in out
    status = _pyhanko_validate(world, pdf)
    assert status.intact and status.valid and status.trusted
    if envelope == "Certification":
        assert b"/DocMDP" in pdf  # a certification signature carries the DocMDP transform
    rep = _verify(world, pdf)
    assert rep.indication == "TOTAL-PASSED", rep.reason
    # one byte of the signed page content
    i = pdf.index(b"PRESCRIPTION") if b"PRESCRIPTION" in pdf else pdf.index(b"stream") + 10
    bad = _flip(pdf, i)
    out = _pdfsig(world.write(f"p-{envelope}-bad.pdf", bad), nssdb)
    assert "Signature is Valid" not in out
    assert not _pyhanko_validate(world, bad).intact
    assert _verify(world, bad).indication == "TOTAL-FAILED"


def test_pades_bt_with_the_test_tsa(world: SignWorld, tsa: dict[str, Any], nssdb: str) -> None:
    pdf = _sign(
        world,
        tsa["url"],
        signature_format="P",
        conformance_level="AdES-B-T",
        envelope="Revision",
        document=_pdf(),
    ).document_with_signature
    assert pdf is not None
    assert "Signature is Valid" in _pdfsig(world.write("p-bt.pdf", pdf), nssdb)
    rep = _verify(world, pdf, tsa_anchors=tsa["anchors"])
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == "B-T"


# -- TSA failures: clear error, nothing returned -------------------------------------------------


@pytest.fixture
def silent_tsa() -> Iterator[str]:
    """A TCP server that accepts and never answers (a hung TSA)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/tsa"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


@pytest.mark.parametrize("fmt", ["C", "X", "P"])
def test_tsa_down_or_slow_gives_503_and_no_signature(
    world: SignWorld, silent_tsa: str, fmt: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/tsa"  # nothing listens after close
    doc = {"C": b"data", "X": CSV, "P": _pdf()}[fmt]
    kw: dict[str, Any] = {
        "signature_format": fmt,
        "conformance_level": "AdES-B-T",
        "envelope": None,
        "document": doc,
        "profile": "jp-eprescription" if fmt == "X" else None,
    }

    async def run(url: str, limit: float) -> SignedDocument:
        async with Rfc3161Client(url=url, timeout=limit) as client:
            return await sign_document(key=world.key, chain=world.chain, tsa=client, **kw)

    with pytest.raises(TsaUnavailable) as down:
        asyncio.run(run(dead, 5))
    assert down.value.status == 503 and "unreachable" in down.value.description
    assert down.value.code == "tsa_unavailable" and down.value.headers["Retry-After"] == "30"
    with pytest.raises(TsaTimeout) as slow:
        asyncio.run(run(silent_tsa, 0.5))
    assert slow.value.status == 503 and "did not answer within 0.5 s" in slow.value.description
    assert slow.value.code == "tsa_timeout" and slow.value.headers["Retry-After"] == "30"


# -- the CMS template stays correct under concurrency --------------------------------------------


def test_cades_template_is_built_once_per_credential(world: SignWorld) -> None:
    a = cades.template_for(world.cert, world.chain[1:])
    b = cades.template_for(world.cert, world.chain[1:])
    assert a is b

    async def many() -> list[bytes]:
        now = dt.datetime.now(dt.UTC)
        return await asyncio.gather(
            *(
                a.sign(world.key, content=f"doc {i}".encode(), attached=True, signing_time=now)
                for i in range(20)
            )
        )

    sigs = asyncio.run(many())
    for i, sig in enumerate(sigs):
        rep = _verify(world, sig)
        assert rep.indication == "TOTAL-PASSED"
        assert f"doc {i}".encode() in sig


# -- /verify over mTLS and the CLI, on the sandbox -------------------------------------------------


@pytest.fixture(scope="module")
def sandbox_rx(
    sandbox: dict[str, Any], gateway: Server, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    d = tmp_path_factory.mktemp("rx")
    (d / "rx.csv").write_bytes(CSV)
    doctor = next(s for s in sandbox["signers"] if s["role"] == "Medical Doctor")
    run_cli(
        "eprescription",
        "sign",
        "-c",
        sandbox["config"],
        str(d / "rx.csv"),
        "--signer",
        doctor["id"],
        "--level",
        "AdES-B-T",
        "-o",
        str(d / "rx.xml"),
    )
    return d / "rx.xml"


def test_cli_eprescription_sign_and_verify(sandbox: dict[str, Any], sandbox_rx: Path) -> None:
    res = run_cli("verify", "-c", sandbox["config"], str(sandbox_rx), "--json")
    rep = json.loads(res.stdout)
    assert rep["indication"] == "TOTAL-PASSED", rep
    assert rep["signatures"][0]["level"] == "B-T"
    assert rep["signatures"][0]["timestamp"]["status"] == "valid"
    bad = sandbox_rx.with_name("rx-bad.xml")
    bad.write_bytes(
        sandbox_rx.read_bytes().replace(
            b'<PrescriptionDocument id="PrescriptionDocument">MS',
            b'<PrescriptionDocument id="PrescriptionDocument">MT',
        )
    )
    res = run_cli("verify", "-c", sandbox["config"], str(bad), check=False)
    assert res.returncode == 1 and res.stdout.startswith("TOTAL-FAILED / HASH_FAILURE")
    wrapped = sandbox_rx.with_name("rx-wrapped.xml")
    wrapped.write_bytes(_wrapped(sandbox_rx.read_bytes()))
    res = run_cli("verify", "-c", sandbox["config"], str(wrapped), check=False)
    assert res.returncode == 1, res.stdout
    assert res.stdout.startswith("TOTAL-FAILED / FORMAT_FAILURE"), res.stdout
    assert "does not cover Document/Prescription/PrescriptionDocument" in res.stdout
    pharmacist = next(s for s in sandbox["signers"] if s["role"] == "Pharmacist")
    res = run_cli(
        "eprescription",
        "sign",
        "-c",
        sandbox["config"],
        str(sandbox_rx),
        "--signer",
        pharmacist["id"],
        check=False,
    )
    assert res.returncode == 1
    assert "hcRole Pharmacist may not sign a prescription" in res.stderr


def test_verify_endpoint_over_mtls(
    sandbox: dict[str, Any], gateway: Server, hospital_ctx: Any, sandbox_rx: Path
) -> None:
    body = {"document": base64.b64encode(sandbox_rx.read_bytes()).decode()}
    r = request(gateway.port, "POST", "/verify", ctx=hospital_ctx, json_body=body)
    assert r.status == 200, r.body
    assert r.json()["indication"] == "TOTAL-PASSED"
    assert r.json()["signatures"][0]["document_type"] == "prescription"
    wrapped = {"document": base64.b64encode(_wrapped(sandbox_rx.read_bytes())).decode()}
    r = request(gateway.port, "POST", "/verify", ctx=hospital_ctx, json_body=wrapped)
    assert r.status == 200, r.body
    assert (r.json()["indication"], r.json()["sub_indication"]) == (
        "TOTAL-FAILED",
        "FORMAT_FAILURE",
    )
    assert "signature wrapping" in r.json()["reason"]
    for garbage in (b"", b"\x00" * 50, b"<a>", b"%PDF-1.7 nothing", b"0\x82\xff\xff"):
        r = request(
            gateway.port,
            "POST",
            "/verify",
            ctx=hospital_ctx,
            json_body={"document": base64.b64encode(garbage or b"x").decode()},
        )
        assert r.status == 200, r.body
        assert r.json()["indication"] == "TOTAL-FAILED"
        assert r.json()["sub_indication"] == "FORMAT_FAILURE"
    r = request(
        gateway.port,
        "POST",
        "/verify",
        ctx=hospital_ctx,
        body=b"not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 400 and r.json()["code"] == "invalid_request"
    r = request(gateway.port, "POST", "/verify", ctx=hospital_ctx, json_body={"document": "!!"})
    assert r.status == 400
    no_cert = client_context(sandbox["server_ca"])
    with pytest.raises(OSError):
        request(gateway.port, "POST", "/verify", ctx=no_cert, json_body=body)


def test_cert_inspect_real_medis_doctor() -> None:
    fixture = "/work/shared/fixtures/real-hpki/medis_test_doctor.der"
    res = run_cli("cert", "inspect", fixture, "--json")
    data = json.loads(res.stdout)
    assert data["hc_roles"] == ["Medical Doctor"]
    assert data["conforms_to_signing_profile"] is True
    assert data["chain"]["status"] == "valid"
    assert "MHLW HPKI Root CA V2" in data["chain"]["path"][-1]
    # offline: the MEDIS CRL is on the internet and fetching is off -> unknown, never fetched
    assert data["chain"]["revocation"]["status"] == "unknown"
    assert "http://cert.medis.or.jp/sign/crl-sign2.crl" in data["chain"]["revocation"]["reason"]
    assert data["chain"]["may_sign"] == {"prescription": True, "dispensing": False}
    res = run_cli("cert", "inspect", fixture, "--no-revocation", "--json")
    assert json.loads(res.stdout)["chain"]["revocation"]["status"] == "not checked"
    res = run_cli("cert", "inspect", fixture)
    assert "hcRole:    Medical Doctor" in res.stdout and "chain:     valid" in res.stdout
