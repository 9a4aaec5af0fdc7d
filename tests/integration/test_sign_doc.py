"""CSC signDoc end to end: FIDO2-approved documents, signed by the gateway in every format,
checked by verifiers nobody here wrote and by /verify; refusals spend nothing."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support.gateway import Server
from tests.support.signing import Csc, b64

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

CSV = (
    "1,医療機関コード,1310000011\n2,患者氏名,試験　花子\n3,処方,ロキソプロフェン錠60mg 3錠 分3\n"
).encode()


@pytest.fixture(scope="module")
def csc(gateway: Server, hospital_ctx: Any) -> Csc:
    return Csc(gateway.port, hospital_ctx)


def _sign_doc(csc: Csc, cred: str, sad: str, documents: list[dict[str, Any]]) -> Any:
    return csc.post(
        "/csc/v2/signatures/signDoc", {"credentialID": cred, "SAD": sad, "documents": documents}
    )


def _approve(csc: Csc, doctor: Any, docs: list[bytes]) -> str:
    doc, auth = doctor
    return csc.authorize(doc["credential_id"], [hashlib.sha256(d).digest() for d in docs], auth)


def _verify(csc: Csc, signed: bytes, content: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"document": b64(signed)}
    if content is not None:
        body["content"] = b64(content)
    r = csc.post("/verify", body)
    assert r.status == 200, r.body
    result: dict[str, Any] = r.json()
    return result


def test_eprescription_through_sign_doc(
    csc: Csc, doctor: Any, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    doc, _ = doctor
    sad = _approve(csc, doctor, [CSV])
    r = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [
            {
                "document": b64(CSV),
                "signature_format": "X",
                "profile": "jp-eprescription",
                "conformance_level": "AdES-B-T",
            }
        ],
    )
    assert r.status == 200, r.body
    xml = base64.b64decode(r.json()["DocumentWithSignature"][0])
    assert b'<ds:Signature Id="PrescriptionSign"' in xml or b'Id="PrescriptionSign"' in xml
    assert base64.b64encode(CSV) in xml
    report = _verify(csc, xml)
    assert report["indication"] == "TOTAL-PASSED", report
    assert report["signatures"][0]["level"] == "B-T"
    assert report["signatures"][0]["role_permitted"] is True
    # xmlsec1, registering both id spellings, against the sandbox HPKI root.
    path = tmp_path / "rx.xml"
    path.write_bytes(xml)
    pki = Path(sandbox["dir"]) / "pki"
    out = subprocess.run(
        [
            "xmlsec1",
            "--verify",
            "--id-attr:Id",
            "Signature",
            "--id-attr:Id",
            "SignedProperties",
            "--id-attr:Id",
            "KeyInfo",
            "--id-attr:id",
            "PrescriptionDocument",
            "--trusted-pem",
            str(pki / "hpki-root.pem"),
            "--untrusted-pem",
            str(pki / "hpki-signing-ca.pem"),
            "--verification-time",
            dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    # The SAD was for one document: it is spent.
    again = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [{"document": b64(CSV), "signature_format": "X", "profile": "jp-eprescription"}],
    )
    assert again.status == 400


def test_cades_attached_and_detached_verify_with_openssl(
    csc: Csc, doctor: Any, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    doc, _ = doctor
    content = b"dispensing note " * 50
    digest_only = hashlib.sha256(b"a document the system keeps to itself").digest()
    hashes = [hashlib.sha256(content).digest(), digest_only]
    sad = csc.authorize(doc["credential_id"], hashes, doctor[1])
    r = csc.post(
        "/csc/v2/signatures/signDoc",
        {
            "credentialID": doc["credential_id"],
            "SAD": sad,
            "documents": [
                {
                    "document": b64(content),
                    "signature_format": "C",
                    "signed_envelope_property": "Attached",
                }
            ],
            "documentDigests": [{"hashes": [b64(digest_only)], "signature_format": "C"}],
        },
    )
    assert r.status == 200, r.body
    attached = base64.b64decode(r.json()["DocumentWithSignature"][0])
    detached = base64.b64decode(r.json()["SignatureObject"][0])
    pki = Path(sandbox["dir"]) / "pki"
    (tmp_path / "a.p7m").write_bytes(attached)
    out = subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-inform",
            "DER",
            "-in",
            str(tmp_path / "a.p7m"),
            "-CAfile",
            str(pki / "hpki-root.pem"),
            "-certfile",
            str(pki / "hpki-signing-ca.pem"),
            "-purpose",
            "any",
            "-out",
            str(tmp_path / "out.bin"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.bin").read_bytes() == content
    assert _verify(csc, attached)["indication"] == "TOTAL-PASSED"
    # The detached signature covers the digest the system sent.
    report = _verify(csc, detached, b"a document the system keeps to itself")
    assert report["indication"] == "TOTAL-PASSED", report


@pytest.mark.parametrize(("level", "reached"), [("AdES-B-LT", "B-LT"), ("AdES-B-LTA", "B-LTA")])
def test_detached_cades_from_a_digest_at_the_long_term_levels(
    csc: Csc, doctor: Any, level: str, reached: str
) -> None:
    """A system that keeps its document sends only its digest: the detached signature still
    reaches B-LT (validation data) and B-LTA (archive timestamp over the digest)."""
    doc, _ = doctor
    content = f"a document kept by the system, {level}".encode()
    digest = hashlib.sha256(content).digest()
    sad = csc.authorize(doc["credential_id"], [digest], doctor[1])
    r = csc.post(
        "/csc/v2/signatures/signDoc",
        {
            "credentialID": doc["credential_id"],
            "SAD": sad,
            "documentDigests": [
                {"hashes": [b64(digest)], "signature_format": "C", "conformance_level": level}
            ],
        },
    )
    assert r.status == 200, r.body
    detached = base64.b64decode(r.json()["SignatureObject"][0])
    report = _verify(csc, detached, content)
    assert report["indication"] == "TOTAL-PASSED", report
    assert report["signatures"][0]["level"] == reached, report
    # Another document under the same signature is a hash failure, not a pass.
    assert _verify(csc, detached, content + b"!")["indication"] != "TOTAL-PASSED"


def test_pades_bt_with_the_sandbox_tsa(csc: Csc, doctor: Any) -> None:
    from io import BytesIO

    from reportlab.pdfgen import canvas

    buf = BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(100, 750, "TEST prescription PDF")
    c.save()
    pdf = buf.getvalue()
    doc, _ = doctor
    sad = _approve(csc, doctor, [pdf])
    r = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [{"document": b64(pdf), "signature_format": "P", "conformance_level": "AdES-B-T"}],
    )
    assert r.status == 200, r.body
    signed = base64.b64decode(r.json()["DocumentWithSignature"][0])
    report = _verify(csc, signed)
    assert report["indication"] == "TOTAL-PASSED", report
    assert report["signatures"][0]["timestamp"]["status"] == "valid"


def test_a_document_the_doctor_did_not_approve_is_refused(csc: Csc, doctor: Any) -> None:
    doc, _ = doctor
    sad = _approve(csc, doctor, [CSV])
    other = CSV.replace("3錠".encode(), "30錠".encode())
    r = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [{"document": b64(other), "signature_format": "X", "profile": "jp-eprescription"}],
    )
    assert r.status == 400
    assert r.json()["error_description"] == "Hash is not authorized by the SAD"
    # Nothing was spent: the approved document still signs.
    r = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [{"document": b64(CSV), "signature_format": "X", "profile": "jp-eprescription"}],
    )
    assert r.status == 200, r.body


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"signature_format": "Z"}, "signature_format"),
        ({"signature_format": "C", "conformance_level": "AdES-B-LTX"}, "conformance_level"),
        ({"signature_format": "P", "signed_envelope_property": "Attached"}, "not valid for"),
        ({"signature_format": "C", "profile": "jp-eprescription"}, "needs signature_format X"),
        ({"signature_format": "C", "signAlgo": "1.2.840.10045.4.3.2"}, "signAlgo"),
    ],
)
def test_bad_requests_spend_nothing(
    csc: Csc, doctor: Any, entry: dict[str, Any], needle: str
) -> None:
    doc, _ = doctor
    sad = _approve(csc, doctor, [CSV])
    r = _sign_doc(csc, doc["credential_id"], sad, [{"document": b64(CSV), **entry}])
    assert r.status == 400, r.body
    assert needle in r.json()["error_description"]
    ok = _sign_doc(
        csc, doc["credential_id"], sad, [{"document": b64(CSV), "signature_format": "C"}]
    )
    assert ok.status == 200, ok.body


def test_role_not_permitted_gives_the_signature_back(csc: Csc, doctor: Any) -> None:
    """A doctor may not sign a dispensing result: 403, and the SAD is refunded."""
    doc, _ = doctor
    sad = _approve(csc, doctor, [CSV])
    r = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [{"document": b64(CSV), "signature_format": "X", "profile": "jp-dispensing"}],
    )
    assert r.status == 403, r.body
    assert r.json()["error"] == "role_not_permitted"
    r = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [{"document": b64(CSV), "signature_format": "X", "profile": "jp-eprescription"}],
    )
    assert r.status == 200, r.body
    xml = base64.b64decode(r.json()["DocumentWithSignature"][0])
    cert_b64 = xml.split(b"X509Certificate>")[1].split(b"<")[0]
    cert = x509.load_der_x509_certificate(base64.b64decode(cert_b64))
    assert doc["name"] in cert.subject.rfc4514_string()


def test_size_limit_and_b_t_checks_before_the_sad_is_spent(csc: Csc, doctor: Any) -> None:
    doc, _ = doctor
    sad = _approve(csc, doctor, [CSV])
    r = _sign_doc(
        csc,
        doc["credential_id"],
        sad,
        [{"document": b64(CSV), "signature_format": "C", "signAlgoParams": "AA=="}],
    )
    assert r.status == 400 and "signAlgoParams" in r.json()["error_description"]
    big = b"x" * (5 * 1024 * 1024 + 1)
    r = _sign_doc(csc, doc["credential_id"], sad, [{"document": b64(big), "signature_format": "C"}])
    assert r.status == 413, r.body
    assert "over the limit of 5242880 bytes" in r.json()["error_description"]
    ok = _sign_doc(
        csc, doc["credential_id"], sad, [{"document": b64(CSV), "signature_format": "C"}]
    )
    assert ok.status == 200, ok.body


def test_multisign_follows_the_setting(csc: Csc, doctor: Any) -> None:
    doc, _ = doctor
    r = csc.post("/csc/v2/credentials/info", {"credentialID": doc["credential_id"]})
    assert r.status == 200
    assert r.json()["multisign"] == 100  # activation.max_hashes_per_request default
