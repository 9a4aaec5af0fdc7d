"""E-prescriptions and dispensing results against the real signed samples (../shared/fixtures/
e-prescription, from MediSignVerifier's public test resources) and the real MHLW HPKI root.

- the real ES-XL prescription reaches TOTAL-PASSED by long-term validation;
- every negative sample is refused with a reason naming its fault;
- our own documents have exactly the samples' element tree at every level, validate against
  the XAdES schemas, pass ``xmlsec1 --verify`` and our verifier; a signature whose certificate
  expired after its ES-A still passes, one without ES-A does not;
- a dispensing result made around the real signed prescription verifies both signatures.
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
from gateway.pki import testworld
from gateway.pki.crl import CrlSource, load_crl_files
from gateway.sign.eprescription import AdditionalLine, EPrescriptionInput
from gateway.sign.service import SignedDocument, SigningPolicy, sign_document
from gateway.sign.timestamp import Rfc3161Client
from gateway.sign.xades import DS, XADES
from gateway.sign.xades_ltv import LongTermSource
from gateway.verify import TrustConfig, verify_document
from gateway.verify.schema import schema_problem
from tests.support.gateway import Server, run_cli
from tests.support.signworld import SignWorld, make_sign_world
from tests.support.softhsm import SOFTHSM_MODULE, process_token

pytestmark = pytest.mark.hsm

FIX = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
SAMPLE = FIX / "e-prescription" / "Prescription-004_01.xml"
NEGATIVE = FIX / "e-prescription" / "negative"
MHLW_ROOT = FIX / "real-hpki" / "mhlw_hpki_root_ca_v2.cer"
NS = {"ds": DS, "xades": XADES}
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
