"""E-prescriptions and dispensing results against the real signed samples (../shared/fixtures/
e-prescription, from MediSignVerifier's public test resources) and the real MHLW HPKI root.

- the real ES-XL prescription reaches TOTAL-PASSED by long-term validation;
- every negative sample is refused with a reason naming its fault;
- our own documents have exactly the samples' element tree at every level, validate against
  the XAdES schemas, pass ``xmlsec1 --verify`` and our verifier; a signature whose certificate
  expired after its ES-A still passes, one without ES-A does not;
- a dispensing result made around the real signed prescription verifies both signatures;
- extending (code, CLI, ``POST /extend``) raises the level without touching the signature, and
  the ES-A renewal job renews only what is due.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from gateway.errors import InvalidRequest, RevocationUnavailable
from gateway.pki.crl import CrlSource, load_crl_files
from gateway.sandbox import testworld
from gateway.sign.eprescription import AdditionalLine, EPrescriptionInput, build_dispensing
from gateway.sign.extend import extend_document
from gateway.sign.service import SignedDocument, SigningPolicy, sign_document
from gateway.sign.timestamp import Rfc3161Client
from gateway.sign.xades import DS, XADES
from gateway.sign.xades_ltv import LongTermSource
from gateway.verify import TrustConfig, verify_document
from gateway.verify.schema import schema_problem
from tests.support.gateway import Server, request, run_cli
from tests.support.signworld import SignWorld, make_sign_world
from tests.support.softhsm import SOFTHSM_MODULE, process_token

pytestmark = pytest.mark.hsm

FIX = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
SAMPLE = FIX / "e-prescription" / "Prescription-004_01.xml"
NEGATIVE = FIX / "e-prescription" / "negative"
MHLW_ROOT = FIX / "real-hpki" / "mhlw_hpki_root_ca_v2.cer"
NS = {"ds": DS, "xades": XADES}
XSI = "http://www.w3.org/2001/XMLSchema-instance"
CSV = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,3錠,分3毎食後\r\n".encode()
DISPENSING_CSV = "1,薬局コード,1310000022\r\n2,調剤,ロキソニン錠60mg,3錠\r\n".encode()


def _mhlw_root() -> x509.Certificate:
    return x509.load_der_x509_certificate(MHLW_ROOT.read_bytes())


def _sample_tsa_root() -> x509.Certificate:
    """The test TSA's self-signed root, as the sample carries it in TimeStampValidationData."""
    tree = etree.parse(str(SAMPLE))
    for el in tree.iter(f"{{{XADES}}}EncapsulatedX509Certificate"):
        c = x509.load_der_x509_certificate(base64.b64decode(el.text))
        if c.subject == c.issuer and "TimeStampServer" in c.subject.rfc4514_string():
            return c
    raise AssertionError("the sample carries no TSA root")


def _real_trust(**kw: Any) -> TrustConfig:
    return TrustConfig(anchors=[_mhlw_root()], tsa_anchors=[_sample_tsa_root()], **kw)


# -- the real prescription -----------------------------------------------------------------------


def test_real_prescription_passes_long_term_validation() -> None:
    rep = asyncio.run(verify_document(SAMPLE.read_bytes(), trust=_real_trust()))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    (sig,) = rep.signatures
    assert (sig.level, sig.xades_level) == ("B-LT", "ES-XL")
    assert "CN=Sanjushi Kagurazaka" in sig.signer["subject"]
    assert sig.signer["hc_roles"] == ["Medical Doctor"]
    assert sig.document_type == "prescription" and sig.role_permitted is True
    best = dt.datetime.fromisoformat(sig.best_signature_time)
    assert best.replace(microsecond=0) == dt.datetime(2022, 9, 7, 8, 18, 25, tzinfo=dt.UTC)
    assert sig.proven_by == "signature timestamp"
    # judged with the CRLs the document carries, long past their nextUpdate
    assert sig.revocation["source"] == "document" and sig.revocation["status"] == "good"
    assert sig.chain["path"][-1].startswith("OU=MHLW HPKI Root CA V2")


def test_real_prescription_needs_the_tsa_anchor() -> None:
    trust = TrustConfig(anchors=[_mhlw_root()])
    rep = asyncio.run(verify_document(SAMPLE.read_bytes(), trust=trust))
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "NO_CERTIFICATE_CHAIN_FOUND")
    assert "timestamp" in rep.reason


def test_real_prescription_signer_expired_without_archive_timestamp() -> None:
    at = dt.datetime(2027, 3, 1, tzinfo=dt.UTC)  # after the doctor's certificate expired
    rep = asyncio.run(verify_document(SAMPLE.read_bytes(), trust=_real_trust(), now=at))
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "OUT_OF_BOUNDS_NO_POE")
    assert "archive timestamp" in rep.reason


def test_cli_verify_real_prescription(tmp_path: Path) -> None:
    tsa_root = tmp_path / "tsa-root.pem"
    tsa_root.write_bytes(_sample_tsa_root().public_bytes(serialization.Encoding.PEM))
    args = ["verify", str(SAMPLE), "--trust", str(MHLW_ROOT), "--tsa-trust", str(tsa_root)]
    text = run_cli(*args).stdout
    assert text.startswith("TOTAL-PASSED"), text
    assert "proven at:  2022-09-07T08:18:25" in text and "B-LT (ES-XL)" in text
    report = json.loads(run_cli(*args, "--json").stdout)
    assert report["signatures"][0]["xades_level"] == "ES-XL"
    late = run_cli(*args, "--at", "2027-03-01T00:00:00Z", check=False)
    assert late.returncode == 1
    assert late.stdout.startswith("INDETERMINATE / OUT_OF_BOUNDS_NO_POE"), late


NEGATIVES = {
    "PrescriptionReferenceError.xml": ("HASH_FAILURE", "reference #PrescriptionDocument"),
    "XmlSchemaPrescriptionError.xml": ("FORMAT_FAILURE", "CanonicalizationMethod"),
    "SignatureTimeStampVerifierTests_SignatureValueHashError.xml": (
        None,
        "signature timestamp: its imprint does not match the SignatureValue",
    ),
    "SignatureTimeStampVerifierTests_TimeStampC14nMethodError.xml": (
        "HASH_FAILURE",
        "canonicalized with exclusive C14N",
    ),
    "SignatureTimeStampVerifierTests_TimeStampBase64Error.xml": (None, "SignatureTimeStamp token"),
    "SignatureValueVerifierTests_KeyInfoError.xml": ("HASH_FAILURE", "KeyInfo"),
    "SignatureValueVerifierTests_SignatureBase64Error.xml": (
        "SIG_CRYPTO_FAILURE",
        "SignatureValue",
    ),
    "SignatureValueVerifierTests_SignedInfoError.xml": ("FORMAT_FAILURE", "not well-formed"),
    "XAdESStructureVerifierTests_NotFoundRequiredTagBES.xml": (
        "FORMAT_FAILURE",
        "required element missing (ES-BES): ds:SignedInfo/ds:CanonicalizationMethod",
    ),
    "XAdESStructureVerifierTests_NotFoundSignedPropertiesType.xml": (
        "FORMAT_FAILURE",
        "reference to SignedProperties has Type 'http://errorTest'",
    ),
    "XAdESStructureVerifierTests_UndefinedSigunatureId.xml": ("FORMAT_FAILURE", "no Id attribute"),
    "SigningCertificateSignatureXmlTests_NotFoundAnywhere.xml": (
        "NO_SIGNING_CERTIFICATE_FOUND",
        "no signing certificate",
    ),
    "SigningCertificateSignatureXmlTests_UnmatchReferenceKeyInfo.xml": (
        None,
        "no signing certificate",
    ),
    "ArchiveTimeStampVerifierTests_MultiATSBase64Error.xml": (None, "ArchiveTimeStamp token"),
    "NotFoundSignature.xml": ("FORMAT_FAILURE", "no signature found"),
}


def test_the_negative_table_covers_every_file() -> None:
    assert sorted(p.name for p in NEGATIVE.glob("*.xml")) == sorted(NEGATIVES)


@pytest.mark.parametrize("name", sorted(NEGATIVES))
def test_negative_samples_are_refused_naming_their_fault(name: str) -> None:
    sub, fault = NEGATIVES[name]
    rep = asyncio.run(verify_document((NEGATIVE / name).read_bytes(), trust=_real_trust()))
    assert rep.indication != "TOTAL-PASSED"
    if sub is not None:
        assert rep.sub_indication == sub, rep.reason
    assert fault in rep.reason, rep.reason


def test_the_xades_schemas_accept_the_sample_and_refuse_a_broken_one() -> None:
    sig = etree.parse(str(SAMPLE)).find(".//ds:Signature", NS)
    assert schema_problem(sig) is None
    sts = sig.find(".//xades:SignatureTimeStamp", NS)
    sts.append(etree.Element(f"{{{XADES}}}Unexpected"))
    assert "Unexpected" in (schema_problem(sig) or "")


# -- our own documents ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SignWorld:
    token = process_token(tmp_path_factory, "eprx-real")
    return make_sign_world(
        module_path=SOFTHSM_MODULE,
        token_label=token.label,
        pin=token.pin,
        conf=token.conf,
        directory=tmp_path_factory.mktemp("eprx-world"),
    )


@pytest.fixture(scope="module")
def tsa(sandbox: dict[str, Any], gateway: Server) -> dict[str, Any]:
    """The sandbox TEST TSA, its root, and a CRL of that root (so that TimeStampValidationData
    carries revocation data, as the samples do)."""
    pki = Path(sandbox["dir"]) / "pki"
    ca = testworld.CertAndKey(
        cert=x509.load_pem_x509_certificate((pki / "tsa-ca.pem").read_bytes()),
        key=serialization.load_pem_private_key((pki / "tsa-ca.key").read_bytes(), None),  # type: ignore[arg-type]
    )
    crl = testworld.make_crl(
        ca, revoked=[], now=dt.datetime.now(dt.UTC), next_update=dt.timedelta(days=2)
    )
    return {"url": sandbox["tsa_url"], "ca": ca.cert, "crl": crl}


def _policy(world: SignWorld, tsa: dict[str, Any]) -> SigningPolicy:
    crls = [*load_crl_files([world.dir / "root.crl", world.dir / "ca.crl"]), tsa["crl"]]
    return SigningPolicy(long_term=LongTermSource(CrlSource(crls), tsa_anchors=[tsa["ca"]]))


def _sign(world: SignWorld, tsa: dict[str, Any] | None, level: str, **kw: Any) -> bytes:
    async def go() -> SignedDocument:
        client = Rfc3161Client(url=tsa["url"], timeout=10) if tsa else None
        try:
            return await sign_document(
                key=kw.pop("key", world.key),
                chain=kw.pop("chain", world.chain),
                signature_format="X",
                conformance_level=level,
                envelope="Enveloped",
                document=kw.pop("document", CSV),
                profile=kw.pop("profile", "jp-eprescription"),
                tsa=client,
                policy=kw.pop("policy", None) or (_policy(world, tsa) if tsa else None),
                **kw,
            )
        finally:
            if client:
                await client.close()

    res = asyncio.run(go())
    assert res.document_with_signature is not None
    return res.document_with_signature


def _trust(world: SignWorld, tsa: dict[str, Any] | None, **kw: Any) -> TrustConfig:
    return TrustConfig(
        anchors=[world.root.cert, _mhlw_root()],
        intermediates=[world.ca.cert],
        tsa_anchors=[tsa["ca"], _sample_tsa_root()] if tsa else [_sample_tsa_root()],
        crls=CrlSource(load_crl_files([world.dir / "root.crl", world.dir / "ca.crl"])),
        **kw,
    )


def _shape(el: etree._Element, path: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """Element paths (namespace + local name, position among siblings) with the names of the
    attributes each carries: what must equal the sample's, level by level."""
    here = f"{path}/{{{etree.QName(el).namespace or ''}}}{etree.QName(el).localname}"
    out = [(here, tuple(sorted(etree.QName(a).text for a in el.attrib)))]
    for child in el.iterchildren("*"):
        out += _shape(child, here)
    return out


def _without(shape: list[tuple[str, tuple[str, ...]]], *names: str) -> list[Any]:
    return [(p, a) for p, a in shape if not any(n in p for n in names)]


def _sample_additional() -> list[AdditionalLine]:
    tree = etree.parse(str(SAMPLE))
    return [
        AdditionalLine(
            re_code=c.findtext("ConversionREcode"), yj_code=c.findtext("ConversionYJcode")
        )
        for c in tree.iter("ConversionPharmaceuticalCode")
    ]


def test_our_es_xl_prescription_has_the_samples_tree(world: SignWorld, tsa: dict[str, Any]) -> None:
    extra = EPrescriptionInput(additional=_sample_additional())
    ours = etree.fromstring(_sign(world, tsa, "AdES-B-LT", eprescription_input=extra))
    sample = etree.parse(str(SAMPLE)).getroot()
    assert _shape(ours) == _shape(sample)


LEVELS = {
    "AdES-B-B": ("B-B", "ES-BES"),
    "AdES-B-T": ("B-T", "ES-T"),
    "AdES-B-LT": ("B-LT", "ES-XL"),
    "AdES-B-LTA": ("B-LTA", "ES-A"),
}


def _xmlsec(world: SignWorld, path: Path, node_id: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("xmlsec1") is None:
        raise RuntimeError("xmlsec1 is not installed: run scripts/bootstrap.sh")
    ids = []
    for name in ("Signature", "SignedProperties", "KeyInfo", "QualifyingProperties"):
        ids += ["--id-attr:Id", name]
    for name in ("PrescriptionDocument", "Dispensing", "DispensingDocument"):
        ids += ["--id-attr:id", name]
    return subprocess.run(
        [
            "xmlsec1",
            "--verify",
            *ids,
            "--node-id",
            node_id,
            "--trusted-pem",
            str(world.dir / "root.pem"),
            "--untrusted-pem",
            str(world.dir / "ca.pem"),
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_our_prescription_at_every_level(world: SignWorld, tsa: dict[str, Any], level: str) -> None:
    xml = _sign(world, tsa if level != "AdES-B-B" else None, level)
    sig = etree.fromstring(xml).find(".//ds:Signature", NS)
    assert schema_problem(sig) is None
    res = _xmlsec(world, world.write(f"rx-{level}.xml", xml), "PrescriptionSign")
    assert res.returncode == 0, res.stderr
    rep = asyncio.run(verify_document(xml, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert (rep.signatures[0].level, rep.signatures[0].xades_level) == LEVELS[level]
    if level in ("AdES-B-LT", "AdES-B-LTA"):
        assert rep.signatures[0].revocation["source"] == "document"


def _short_lived(world: SignWorld) -> list[x509.Certificate]:
    spki = world.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert = testworld.issue_hpki_signer_cert(
        world.ca,
        public_key_der=spki,
        name_romaji="Ichiro Tanki",
        name_kanji="短期一郎",
        role="Medical Doctor",
        organization="HPKI TEST FACILITY",
        serial_number_attr="ICHIROTANKI",
        now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
        validity_days=1,
    )
    return [cert, world.ca.cert, world.root.cert]


def test_expired_signer_passes_with_es_a_only(world: SignWorld, tsa: dict[str, Any]) -> None:
    chain = _short_lived(world)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)  # signer expired, CRLs past nextUpdate
    archived = _sign(world, tsa, "AdES-B-LTA", chain=chain)
    rep = asyncio.run(verify_document(archived, trust=_trust(world, tsa), now=later))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].xades_level == "ES-A"
    assert rep.signatures[0].archive_timestamps[0]["status"] == "valid"
    xl = _sign(world, tsa, "AdES-B-LT", chain=chain)
    rep = asyncio.run(verify_document(xl, trust=_trust(world, tsa), now=later))
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "OUT_OF_BOUNDS_NO_POE")
    # and an ES-A whose archive timestamp was altered no longer proves anything
    root = etree.fromstring(archived)
    sv = root.find(".//ds:SignatureValue", NS)
    crl_el = root.find(".//xades:RevocationValues/xades:CRLValues/xades:EncapsulatedCRLValue", NS)
    crl_el.addprevious(etree.fromstring(etree.tostring(crl_el)))  # an extra CRL after the fact
    assert sv is not None
    rep = asyncio.run(verify_document(etree.tostring(root), trust=_trust(world, tsa), now=later))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE"), rep.reason
    assert "archive timestamp" in rep.reason


class _CountingKey:
    """The real HSM key, counting its signatures (to show a refused request used none)."""

    def __init__(self, key: Any) -> None:
        self.key, self.calls = key, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.key, name)

    async def sign_digest(self, *args: Any, **kw: Any) -> bytes:
        self.calls += 1
        result: bytes = await self.key.sign_digest(*args, **kw)
        return result


def _pharmacist(world: SignWorld) -> list[x509.Certificate]:
    return [world.pharmacist_cert, world.ca.cert, world.root.cert]


def test_dispensing_around_the_real_prescription(world: SignWorld, tsa: dict[str, Any]) -> None:
    xml = _sign(
        world,
        tsa,
        "AdES-B-LTA",
        chain=_pharmacist(world),
        profile="jp-dispensing",
        document=DISPENSING_CSV,
        eprescription_input=EPrescriptionInput(
            prescription=SAMPLE.read_bytes(),
            additional=[AdditionalLine(re_code="1,2", yj_code="1,4", csv_line_no="2")],
        ),
    )
    root = etree.fromstring(xml)
    assert (
        root.get("{http://www.w3.org/2001/XMLSchema-instance}noNamespaceSchemaLocation") == "ED.xsd"
    )
    assert [c.tag for c in root] == [
        "DispensingManagement",
        "Dispensing",
        "AdditionalDispensedInformation",
        "DispensingSign",
    ]
    assert [c.tag for c in root.find("Dispensing")] == [
        "ReferencePrescription",
        "DispensingDocument",
    ]
    # the prescription travels intact: its signature element is byte-identical
    sample_sig = etree.parse(str(SAMPLE)).find(".//ds:Signature", NS)
    embedded = root.find("Dispensing/ReferencePrescription/PrescriptionSign/ds:Signature", NS)
    assert etree.tostring(embedded, method="c14n") == etree.tostring(sample_sig, method="c14n")
    res = _xmlsec(world, world.write("dispensing.xml", xml), "DispensingSign")
    assert res.returncode == 0, res.stderr
    rep = asyncio.run(verify_document(xml, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    by_type = {s.document_type: s for s in rep.signatures}
    assert by_type["prescription"].xades_level == "ES-XL"
    assert "Sanjushi Kagurazaka" in by_type["prescription"].signer["subject"]
    assert by_type["prescription"].chain["path"][-1].startswith("OU=MHLW HPKI Root CA V2")
    assert by_type["dispensing"].xades_level == "ES-A"
    assert by_type["dispensing"].signer["hc_roles"] == ["Pharmacist"]


def test_the_embedded_prescription_keeps_the_real_prescriptions_bytes() -> None:
    """ReferencePrescription holds the signed prescription's content as the real file has it:
    no namespace declaration added to its children (each once gained an xmlns:xsi that the
    signed prescription does not have). The one change left in the real sample is lxml's
    serialization of an empty element (``Value=".." />`` written ``Value=".."/>``): markup
    inside a tag, which C14N does not see."""
    raw = SAMPLE.read_bytes().decode("utf-8")
    built = build_dispensing(DISPENSING_CSV, prescription=etree.parse(str(SAMPLE)))
    out = etree.tostring(built, encoding="unicode")

    def inner(text: str, tag: str) -> str:
        return text[text.index(f"<{tag}>") + len(tag) + 2 : text.index(f"</{tag}>")]

    embedded = inner(out, "ReferencePrescription")
    assert "xmlns:xsi" not in embedded
    assert embedded == inner(raw, "Prescription").replace('" />', '"/>')


def test_dispensing_names_a_prescription_root_without_xsi() -> None:
    """Inside a dispensing result the root declares xsi, which the embedded PrescriptionDocument's
    digest (inclusive C14N) then takes in: a prescription whose root did not declare it cannot
    travel intact, and the reason says so (it was "the embedded prescription's signature is
    broken", as if the prescriber's signature were at fault)."""
    raw = SAMPLE.read_bytes()
    bare = raw.replace(f' xmlns:xsi="{XSI}"'.encode(), b"", 1)
    bare = bare.replace(b' xsi:noNamespaceSchemaLocation="EP.xsd"', b"", 1)
    with pytest.raises(InvalidRequest, match="does not declare xsi"):
        build_dispensing(DISPENSING_CSV, prescription=etree.ElementTree(etree.fromstring(bare)))


def test_dispensing_refuses_a_broken_prescription_before_the_key(
    world: SignWorld, tsa: dict[str, Any]
) -> None:
    broken = (NEGATIVE / "PrescriptionReferenceError.xml").read_bytes()
    key = _CountingKey(world.key)
    with pytest.raises(InvalidRequest, match="embedded prescription's signature is broken"):
        _sign(
            world,
            tsa,
            "AdES-B-T",
            key=key,
            chain=_pharmacist(world),
            profile="jp-dispensing",
            document=DISPENSING_CSV,
            eprescription_input=EPrescriptionInput(prescription=broken),
        )
    assert key.calls == 0


def test_long_term_without_revocation_data_is_503_before_the_key(
    world: SignWorld, tsa: dict[str, Any]
) -> None:
    key = _CountingKey(world.key)
    empty = SigningPolicy(long_term=LongTermSource(CrlSource(fetch=True, timeout=1)))
    with pytest.raises(RevocationUnavailable) as e:
        _sign(world, tsa, "AdES-B-LT", key=key, policy=empty)
    assert e.value.status == 503 and e.value.headers["Retry-After"]
    assert key.calls == 0


def test_unsigned_document_in_signed_out(world: SignWorld) -> None:
    from gateway.sign.eprescription import PRESCRIPTION, build_prescription, check_document

    doc_id = "1439e0c5-7c1d-4512-861d-263de48417bf"
    tree = build_prescription(CSV, prescription_id=doc_id, additional=_sample_additional())
    # Signing from a CSV relies on this: a built prescription is the profile's shape.
    check_document(tree, PRESCRIPTION)
    unsigned = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
    xml = _sign(world, None, "AdES-B-B", document=unsigned)
    root = etree.fromstring(xml)
    assert root.find("Prescription/PrescriptionManagement/PrescriptionId").get("Value") == doc_id
    rep = asyncio.run(verify_document(xml, trust=_trust(world, None)))
    assert rep.indication == "TOTAL-PASSED", rep.reason


def _unsigned(mutate: Any = None) -> bytes:
    from gateway.sign.eprescription import build_prescription

    root = build_prescription(CSV).getroot()
    if mutate is not None:
        mutate(root)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _set_text(path: str, text: str) -> Any:
    def go(root: etree._Element) -> None:
        root.find(path).text = text

    return go


BAD_DOCUMENTS = {
    "dtd": (
        b'<?xml version="1.0"?><!DOCTYPE Document [<!ENTITY x "y">]><Document id="Document"/>',
        "DTD",
    ),
    "wrong root": (b'<Prescription id="Document"/>', "root must be <Document"),
    "duplicate id": (
        _unsigned(
            lambda r: r.find("Prescription/PrescriptionSign").set("id", "PrescriptionDocument")
        ),
        "duplicate ids",
    ),
    "missing id": (
        _unsigned(lambda r: r.find("Prescription/PrescriptionDocument").attrib.pop("id")),
        "PrescriptionDocument element with its id",
    ),
    "not base64": (_unsigned(_set_text("Prescription/PrescriptionDocument", "@@@")), "Base64"),
    "not utf-8": (
        _unsigned(
            _set_text(
                "Prescription/PrescriptionDocument",
                base64.b64encode("処方".encode("cp932")).decode(),
            )
        ),
        "not valid utf-8",
    ),
    # The real prescriptions' root: xsi:noNamespaceSchemaLocation="EP.xsd", xsi alone in scope.
    "no schema location": (
        _unsigned(lambda r: r.attrib.pop(f"{{{XSI}}}noNamespaceSchemaLocation")),
        "schema location must be EP.xsd",
    ),
    "another namespace in scope": (
        _unsigned().replace(b"<Document ", b'<Document xmlns:x="urn:x" ', 1),
        "xsi namespace alone in scope",
    ),
    "already signed": (
        _unsigned(lambda r: etree.SubElement(r.find("Prescription/PrescriptionSign"), "X")),
        "must be present and empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_bad_unsigned_documents_are_refused(world: SignWorld, case: str) -> None:
    document, message = BAD_DOCUMENTS[case]
    key = _CountingKey(world.key)
    with pytest.raises(InvalidRequest, match=message):
        _sign(world, None, "AdES-B-B", key=key, document=document)
    assert key.calls == 0


# -- extend ---------------------------------------------------------------------------------------


def _extend(world: SignWorld, tsa: dict[str, Any], data: bytes, level: str, **kw: Any) -> Any:
    async def go() -> Any:
        client = Rfc3161Client(url=tsa["url"], timeout=10)
        crls = [*load_crl_files([world.dir / "root.crl", world.dir / "ca.crl"]), tsa["crl"]]
        source = LongTermSource(
            CrlSource(crls), tsa_anchors=[tsa["ca"]], certs=[world.ca.cert, world.root.cert]
        )
        try:
            return await extend_document(data, level, tsa=client, source=source, **kw)
        finally:
            await client.close()

    return asyncio.run(go())


def _signed_info(xml: bytes, sign: str) -> list[bytes]:
    sig = etree.fromstring(xml).find(f".//{sign}/ds:Signature", NS)
    return [
        etree.tostring(sig.find(f"ds:{n}", NS), method="c14n")
        for n in ("SignedInfo", "SignatureValue", "KeyInfo")
    ]


@pytest.mark.parametrize("level", ["AdES-B-T", "AdES-B-LT", "AdES-B-LTA"])
def test_extend_our_prescription_keeps_the_signature(
    world: SignWorld, tsa: dict[str, Any], level: str
) -> None:
    bes = _sign(world, None, "AdES-B-B")
    result = _extend(world, tsa, bes, level)
    assert _signed_info(result.document, "PrescriptionSign") == _signed_info(
        bes, "PrescriptionSign"
    )
    rep = asyncio.run(verify_document(result.document, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    expected = {"AdES-B-T": "ES-T", "AdES-B-LT": "ES-XL", "AdES-B-LTA": "ES-A"}[level]
    assert rep.signatures[0].xades_level == expected
    assert result.changes == [("PrescriptionSign", "ES-BES", expected)]


def test_renewed_es_a_has_two_valid_archive_timestamps(
    world: SignWorld, tsa: dict[str, Any]
) -> None:
    archived = _sign(world, tsa, "AdES-B-LTA")
    same = _extend(world, tsa, archived, "AdES-B-LTA")
    assert same.document == etree.tostring(
        etree.fromstring(archived).getroottree(), xml_declaration=True, encoding="UTF-8"
    )  # already ES-A: nothing added without renew
    renewed = _extend(world, tsa, archived, "AdES-B-LTA", renew=True)
    rep = asyncio.run(verify_document(renewed.document, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert [a["status"] for a in rep.signatures[0].archive_timestamps] == ["valid", "valid"]


def test_extend_a_dispensing_result_leaves_the_prescription(
    world: SignWorld, tsa: dict[str, Any]
) -> None:
    disp = _sign(
        world,
        None,
        "AdES-B-B",
        chain=_pharmacist(world),
        profile="jp-dispensing",
        document=DISPENSING_CSV,
        eprescription_input=EPrescriptionInput(prescription=SAMPLE.read_bytes()),
    )
    result = _extend(world, tsa, disp, "AdES-B-LTA")
    assert [c[0] for c in result.changes] == ["DispensingSign"]
    rep = asyncio.run(verify_document(result.document, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert {s.document_type: s.xades_level for s in rep.signatures} == {
        "prescription": "ES-XL",
        "dispensing": "ES-A",
    }


def test_cli_extends_the_real_prescription_and_runs_the_renewal_job(
    sandbox: dict[str, Any], gateway: Server, tmp_path: Path
) -> None:
    src = tmp_path / "rx.xml"
    src.write_bytes(SAMPLE.read_bytes())
    out = tmp_path / "rx-a.xml"
    run_cli("extend", str(src), "--level", "AdES-B-LTA", "-o", str(out), "-c", sandbox["config"])
    sandbox_tsa = x509.load_pem_x509_certificate(Path(sandbox["tsa_trust_anchors"][0]).read_bytes())
    trust = TrustConfig(anchors=[_mhlw_root()], tsa_anchors=[_sample_tsa_root(), sandbox_tsa])
    rep = asyncio.run(verify_document(out.read_bytes(), trust=trust))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].xades_level == "ES-A"
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "a.xml").write_bytes(out.read_bytes())
    (folder / "plain.xml").write_bytes(SAMPLE.read_bytes())
    res = run_cli("extend", str(folder), "--renew-within", "0", "-c", sandbox["config"])
    assert "a.xml: not due" in res.stderr and "plain.xml: not due" in res.stderr
    before = (folder / "a.xml").read_bytes()
    # the sandbox TSA's certificate itself ends within a century: renewing would not help
    res = run_cli(
        "extend", str(folder), "--renew-within", "36500", "-c", sandbox["config"], check=False
    )
    assert res.returncode == 1 and "not renewed" in res.stderr
    assert (folder / "a.xml").read_bytes() == before


def test_extend_route(sandbox: dict[str, Any], gateway: Server, hospital_ctx: Any) -> None:
    body = {"document": base64.b64encode(SAMPLE.read_bytes()).decode(), "level": "AdES-B-LTA"}
    r = request(gateway.port, "POST", "/extend", ctx=hospital_ctx, json_body=body)
    assert r.status == 200, r.body
    answer = json.loads(r.body)
    assert answer["changes"] == [{"signature": "PrescriptionSign", "from": "ES-XL", "to": "ES-A"}]
    extended = base64.b64decode(answer["document"])
    assert (
        etree.fromstring(extended).find(".//{http://uri.etsi.org/01903/v1.4.1#}ArchiveTimeStamp")
        is not None
    )
    bad = request(
        gateway.port, "POST", "/extend", ctx=hospital_ctx, json_body={**body, "level": "ES-Z"}
    )
    assert bad.status == 400 and b"level must be" in bad.body


# -- PAdES B-LT / B-LTA (pyHanko) ---------------------------------------------------------------


def _sign_pdf(world: SignWorld, tsa: dict[str, Any], level: str, **kw: Any) -> bytes:
    import io

    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 760, "PRESCRIPTION (TEST) - long-term PAdES")
    c.save()

    async def go() -> SignedDocument:
        async with Rfc3161Client(url=tsa["url"], timeout=10) as client:
            return await sign_document(
                key=world.key,
                chain=kw.pop("chain", world.chain),
                signature_format="P",
                conformance_level=level,
                envelope="Revision",
                document=buf.getvalue(),
                tsa=client,
                policy=_policy(world, tsa),
            )

    res = asyncio.run(go())
    assert res.document_with_signature is not None
    return res.document_with_signature


@pytest.mark.parametrize(("level", "expected"), [("AdES-B-LT", "B-LT"), ("AdES-B-LTA", "B-LTA")])
def test_pades_long_term(world: SignWorld, tsa: dict[str, Any], level: str, expected: str) -> None:
    import io

    from pyhanko.pdf_utils.reader import PdfFileReader

    pdf = _sign_pdf(world, tsa, level)
    reader = PdfFileReader(io.BytesIO(pdf))
    assert "/DSS" in reader.root  # the validation data pyHanko embedded
    assert len(reader.embedded_timestamp_signatures) == (1 if expected == "B-LTA" else 0)
    rep = asyncio.run(verify_document(pdf, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == expected
    # judged with the CRLs of the DSS, not the configured ones
    assert rep.signatures[0].revocation["source"] == "document"


def test_pades_lta_outlives_the_signer_certificate(world: SignWorld, tsa: dict[str, Any]) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    chain = _short_lived(world)
    lta = _sign_pdf(world, tsa, "AdES-B-LTA", chain=chain)
    rep = asyncio.run(verify_document(lta, trust=_trust(world, tsa), now=later))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    lt = _sign_pdf(world, tsa, "AdES-B-LT", chain=chain)
    rep = asyncio.run(verify_document(lt, trust=_trust(world, tsa), now=later))
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "OUT_OF_BOUNDS_NO_POE")


# -- CAdES B-LT and B-LTA --------------------------------------------------------------------------


def _sign_cades(world: SignWorld, tsa: dict[str, Any], level: str, **kw: Any) -> bytes:
    async def go() -> SignedDocument:
        async with Rfc3161Client(url=tsa["url"], timeout=10) as client:
            return await sign_document(
                key=world.key,
                chain=kw.pop("chain", world.chain),
                signature_format="C",
                conformance_level=level,
                envelope="Attached",
                document=CSV,
                tsa=client,
                policy=_policy(world, tsa),
            )

    signed = asyncio.run(go()).document_with_signature
    assert signed is not None
    return signed


def _openssl_cms_verify(world: SignWorld, name: str, cms: bytes) -> None:
    path = world.write(name, cms)
    res = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(path),
         "-CAfile", str(world.dir / "root.pem"), "-purpose", "any", "-out", "/dev/null"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(("level", "expected"), [("AdES-B-LT", "B-LT"), ("AdES-B-LTA", "B-LTA")])
def test_cades_long_term(world: SignWorld, tsa: dict[str, Any], level: str, expected: str) -> None:
    cms = _sign_cades(world, tsa, level)
    _openssl_cms_verify(world, f"{expected}.p7s", cms)
    rep = asyncio.run(verify_document(cms, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == expected
    assert rep.signatures[0].revocation["source"] == "document"
    assert len(rep.signatures[0].archive_timestamps) == (1 if expected == "B-LTA" else 0)


def _cades_attr(cms: bytes, name: str) -> list[Any]:
    from asn1crypto import cms as asn1_cms

    import gateway.sign.cades_lta  # noqa: F401 - registers the archive attributes

    si = asn1_cms.ContentInfo.load(cms)["content"]["signer_infos"][0]
    return [a for a in si["unsigned_attrs"] if a["type"].native == name]


def test_cades_b_lta_structure(world: SignWorld, tsa: dict[str, Any]) -> None:
    """archive-time-stamp-v3 with its ats-hash-index-v3 in the token's unsigned attributes,
    naming every certificate, CRL and unsigned attribute value the signature held then."""
    from asn1crypto import cms as asn1_cms

    from gateway.sign.cades_lta import _decode_index, archive_imprint_input

    cms = _sign_cades(world, tsa, "AdES-B-LTA")
    [ats] = _cades_attr(cms, "archive_time_stamp_v3")
    token = ats["values"][0]
    tsi = token["content"]["signer_infos"][0]
    [index] = [
        a["values"][0] for a in tsi["unsigned_attrs"] if a["type"].native == "ats_hash_index_v3"
    ]
    alg, certs, crls, attrs = _decode_index(index)
    assert alg == "sha256" and len(list(index)) == 3  # the DEFAULT algorithm is left out
    assert len(certs) >= 4  # signer, CA, root and the TSA's chain
    assert len(crls) >= 2
    assert len(attrs) == 1  # the signature timestamp
    # the imprint is over the EN 319 122-1 §5.5.3 input, computed independently here
    import hashlib

    sd = asn1_cms.ContentInfo.load(cms)["content"]
    si = sd["signer_infos"][0]
    data = archive_imprint_input(sd, si, index.dump(), hashlib.sha256(CSV).digest())
    imprint = token["content"]["encap_content_info"]["content"].parsed["message_imprint"]
    assert imprint["hashed_message"].native == hashlib.sha256(data).digest()


def test_cades_b_lta_outlives_the_signer_certificate(world: SignWorld, tsa: dict[str, Any]) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)  # signer expired, CRLs past nextUpdate
    chain = _short_lived(world)
    lta = _sign_cades(world, tsa, "AdES-B-LTA", chain=chain)
    _openssl_cms_verify(world, "lta-short.p7s", lta)
    rep = asyncio.run(verify_document(lta, trust=_trust(world, tsa), now=later))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == "B-LTA"
    lt = _sign_cades(world, tsa, "AdES-B-LT", chain=chain)
    rep = asyncio.run(verify_document(lt, trust=_trust(world, tsa), now=later))
    assert (rep.indication, rep.sub_indication) == ("INDETERMINATE", "OUT_OF_BOUNDS_NO_POE")
    assert "archive timestamp" in rep.reason
    # and from the command line, at that time
    world.write("tsa-ca.pem", tsa["ca"].public_bytes(serialization.Encoding.PEM))
    path = world.write("lta-short-cli.p7s", lta)
    out = run_cli(
        "verify", str(path), "--trust", str(world.dir / "root.pem"),
        "--intermediate", str(world.dir / "ca.pem"), "--tsa-trust", str(world.dir / "tsa-ca.pem"),
        "--at", later.isoformat(), "--json", check=False,
    )  # fmt: skip
    assert json.loads(out.stdout)["indication"] == "TOTAL-PASSED", out.stdout
    path = world.write("lt-short-cli.p7s", lt)
    out = run_cli(
        "verify", str(path), "--trust", str(world.dir / "root.pem"),
        "--intermediate", str(world.dir / "ca.pem"), "--tsa-trust", str(world.dir / "tsa-ca.pem"),
        "--at", later.isoformat(), "--json", check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert json.loads(out.stdout)["sub_indication"] == "OUT_OF_BOUNDS_NO_POE", out.stdout


def test_cades_b_lta_detects_removed_or_changed_validation_data(
    world: SignWorld, tsa: dict[str, Any]
) -> None:
    from asn1crypto import cms as asn1_cms

    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    lta = _sign_cades(world, tsa, "AdES-B-LTA", chain=_short_lived(world))
    ci = asn1_cms.ContentInfo.load(lta)
    sd = ci["content"]
    sd["crls"] = asn1_cms.RevocationInfoChoices(list(sd["crls"])[1:])  # one CRL dropped
    rep = asyncio.run(verify_document(ci.dump(), trust=_trust(world, tsa), now=later))
    assert (rep.indication, rep.sub_indication) == ("TOTAL-FAILED", "HASH_FAILURE"), rep.reason
    assert "archive timestamp" in rep.reason and "CRLs" in rep.reason
    # the signature timestamp replaced by another: the archive timestamp no longer covers it
    other = _sign_cades(world, tsa, "AdES-B-T")
    [sts] = _cades_attr(other, "signature_time_stamp_token")
    ci = asn1_cms.ContentInfo.load(lta)
    si = ci["content"]["signer_infos"][0]
    kept = [a for a in si["unsigned_attrs"] if a["type"].native != "signature_time_stamp_token"]
    si["unsigned_attrs"] = asn1_cms.CMSAttributes([sts, *kept])
    rep = asyncio.run(verify_document(ci.dump(), trust=_trust(world, tsa), now=later))
    assert rep.indication == "TOTAL-FAILED", rep.reason


# -- extend CMS and PDF -------------------------------------------------------------------------


def _sign_bb(world: SignWorld, fmt: str, csv: bytes = CSV) -> bytes:
    import io

    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 760, "PRESCRIPTION (TEST) - to extend")
    c.save()
    document = buf.getvalue() if fmt == "P" else csv

    async def go() -> SignedDocument:
        return await sign_document(
            key=world.key,
            chain=world.chain,
            signature_format=fmt,
            conformance_level="AdES-B-B",
            envelope="Attached" if fmt == "C" else "Revision",
            document=document,
            tsa=None,
        )

    res = asyncio.run(go())
    assert res.document_with_signature is not None
    return res.document_with_signature


@pytest.mark.parametrize(
    ("fmt", "level", "expected"),
    [
        ("C", "AdES-B-T", "B-T"),
        ("C", "AdES-B-LT", "B-LT"),
        ("C", "AdES-B-LTA", "B-LTA"),
        ("P", "AdES-B-LT", "B-LT"),
        ("P", "AdES-B-LTA", "B-LTA"),
    ],
)
def test_extend_cms_and_pdf(
    world: SignWorld, tsa: dict[str, Any], fmt: str, level: str, expected: str
) -> None:
    signed = _sign_bb(world, fmt)
    result = _extend(world, tsa, signed, level)
    assert [c[1:] for c in result.changes] == [("B-B", expected)]
    rep = asyncio.run(verify_document(result.document, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == expected
    if fmt == "C":  # the signature itself is untouched: openssl still verifies it
        path = world.write(f"ext-{level}.p7s", result.document)
        res = subprocess.run(
            ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(path),
             "-CAfile", str(world.dir / "root.pem"), "-purpose", "any", "-out", "/dev/null"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
    else:
        assert result.document.startswith(signed)  # incremental updates only


@pytest.mark.parametrize("level", ["AdES-B-T", "AdES-B-LT", "AdES-B-LTA"])
def test_extend_cms_whose_length_ends_in_0x80(
    world: SignWorld, tsa: dict[str, Any], level: str
) -> None:
    """asn1crypto takes a DER length whose last byte is 0x80 for a BER indefinite length and
    re-encodes the whole value, certificates included: a signature of such a size (a matter
    of serial-number lengths) must extend like any other."""
    signed = _sign_bb(world, "C")
    assert signed[:2] == b"\x30\x82"  # SEQUENCE, two length bytes
    pad = (0x80 - signed[3]) % 256
    signed = _sign_bb(world, "C", CSV + b"\r\n" * (pad // 2) + b" " * (pad % 2))
    assert signed[3] == 0x80, signed[:4].hex()
    result = _extend(world, tsa, signed, level)
    rep = asyncio.run(verify_document(result.document, trust=_trust(world, tsa)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].level == level.removeprefix("AdES-")


def test_extend_refuses_what_cannot_be_built(world: SignWorld, tsa: dict[str, Any]) -> None:
    from asn1crypto import cms as asn1_cms

    ci = asn1_cms.ContentInfo.load(_sign_bb(world, "C"))
    ci["content"]["encap_content_info"] = {"content_type": "data"}  # detached
    with pytest.raises(InvalidRequest, match="needs its content for B-LTA"):
        _extend(world, tsa, ci.dump(), "AdES-B-LTA")
    with pytest.raises(InvalidRequest, match="extend a PDF to B-LT or B-LTA"):
        _extend(world, tsa, _sign_bb(world, "P"), "AdES-B-T")


@pytest.mark.parametrize("fault", ["signature-value", "content"])
def test_extend_refuses_a_cades_signature_that_does_not_verify(
    world: SignWorld, tsa: dict[str, Any], fault: str
) -> None:
    """/extend asked the TSA to timestamp any well-formed SignerInfo: a signature value nobody
    made, or a content changed after signing, got a B-T timestamp. Now the signer's
    certificate must verify it (and the content carried must match its messageDigest) before
    any timestamp is asked for."""
    from asn1crypto import cms as asn1_cms

    ci = asn1_cms.ContentInfo.load(_sign_bb(world, "C"))
    sd = ci["content"]
    if fault == "signature-value":
        si = sd["signer_infos"][0]
        si["signature"] = bytes(len(si["signature"].native))
        needle = "SignerInfo 1 cannot be extended: "
    else:
        sd["encap_content_info"] = {"content_type": "data", "content": CSV + b"changed"}
        needle = "content digest does not match messageDigest"
    with pytest.raises(InvalidRequest, match=needle):
        _extend(world, tsa, ci.dump(), "AdES-B-T")


def test_issuer_serial_v2_as_an_option(world: SignWorld) -> None:
    from asn1crypto import tsp

    policy = SigningPolicy(eprescription_issuer_serial_v2=True)
    xml = _sign(world, None, "AdES-B-B", policy=policy)
    sig = etree.fromstring(xml).find(".//ds:Signature", NS)
    cert_el = sig.find(".//xades:SigningCertificateV2/xades:Cert", NS)
    assert [etree.QName(c).localname for c in cert_el] == ["CertDigest", "IssuerSerialV2"]
    serial = tsp.IssuerSerial.load(base64.b64decode(cert_el[1].text))["serial_number"].native
    assert serial == world.cert.serial_number
    assert schema_problem(sig) is None
    rep = asyncio.run(verify_document(xml, trust=_trust(world, None)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
