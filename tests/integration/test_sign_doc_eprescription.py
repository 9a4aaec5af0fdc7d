"""The e-prescription inputs of signDoc end to end: a dispensing result made by the sandbox
pharmacist around the real signed prescription (both signatures verified, the prescription's as
ES-XL from the real MHLW chain), a prescription from a CSV with its id and additional lines at
ES-XL, and /info listing the levels."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from lxml import etree
from sqlalchemy import select

from gateway.store.schema import audit_event
from gateway.verify import TrustConfig, verify_document
from tests.integration.test_signatures_eprescription import SAMPLE, _mhlw_root, _sample_tsa_root
from tests.support.gateway import Server, client_context
from tests.support.signing import Csc, b64, services
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

DISPENSING_CSV = "1,薬局コード,1340000019\n2,調剤,ミニリンメルトＯＤ錠２５μｇ,2\n".encode()


def _trust(sandbox: dict[str, Any]) -> TrustConfig:
    def pem(p: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(Path(p).read_bytes())

    return TrustConfig(
        anchors=[pem(sandbox["hpki_trust_anchors"][0]), _mhlw_root()],
        intermediates=[pem(p) for p in sandbox["hpki_intermediates"]],
        tsa_anchors=[pem(sandbox["tsa_trust_anchors"][0]), _sample_tsa_root()],
    )


@pytest.fixture(scope="module")
def pharmacist(
    sandbox: dict[str, Any], gateway: Server, pharmacy: dict[str, Any]
) -> tuple[dict[str, Any], SoftAuthenticator, Csc]:
    ctx = client_context(sandbox["server_ca"], pharmacy["client_cert"], pharmacy["client_key"])
    csc = Csc(gateway.port, ctx)
    who: dict[str, Any] = next(s for s in sandbox["signers"] if s["role"] == "Pharmacist")
    auth = SoftAuthenticator(origin=f"https://localhost:{gateway.port}")
    r = csc.enroll(who["enrollment_code"], who["enrollment_password"], auth)
    assert r.status == 200, r.body
    return who, auth, csc


def test_dispensing_by_the_sandbox_pharmacist_around_the_real_prescription(
    sandbox: dict[str, Any], pharmacist: Any
) -> None:
    who, auth, csc = pharmacist
    sad = csc.authorize(who["credential_id"], [hashlib.sha256(DISPENSING_CSV).digest()], auth)
    entry = {
        "document": b64(DISPENSING_CSV),
        "signature_format": "X",
        "profile": "jp-dispensing",
        "conformance_level": "AdES-B-LT",
        "prescription": b64(SAMPLE.read_bytes()),
        "dispensing_id": "6c1d2f0e-3a4b-4c5d-8e9f-0a1b2c3d4e5f",
        "additional_information": [
            {
                "re_code": "201,1,1,1,2,622688101",
                "csv_line_no": "2",
                "dispensing_document_code": "1",
            }
        ],
    }
    r = csc.post(
        "/csc/v2/signatures/signDoc",
        {"credentialID": who["credential_id"], "SAD": sad, "documents": [entry]},
    )
    assert r.status == 200, r.body
    xml = base64.b64decode(r.json()["DocumentWithSignature"][0])
    root = etree.fromstring(xml)
    assert root.find("DispensingManagement/DispensingId").get("Value") == entry["dispensing_id"]
    assert (
        root.find("AdditionalDispensedInformation/ConversionPharmaceuticalCode").get("CsvLineNo")
        == "2"
    )
    rep = asyncio.run(verify_document(xml, trust=_trust(sandbox)))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    by_type = {s.document_type: s for s in rep.signatures}
    assert by_type["prescription"].xades_level == "ES-XL"
    assert by_type["prescription"].chain["path"][-1].startswith("OU=MHLW HPKI Root CA V2")
    assert by_type["dispensing"].xades_level == "ES-XL"
    assert "Jiro Chozai" in by_type["dispensing"].signer["subject"]
    # The SAD approved SHA-256 of the CSV only; what the facility system put beside it (the
    # id, the additional lines, the embedded prescription) is named in the audit record.
    digest = hashlib.sha256(DISPENSING_CSV).hexdigest()
    (detail,) = [
        d
        for r in _audit(sandbox["config"])
        if r.action == "signature.sign_doc"
        for d in json.loads(r.detail)["documents"]
        if d["digest"] == digest
    ]
    lines = [{"re_code": "201,1,1,1,2,622688101", "yj_code": None, "csv_line_no": "2",
              "dispensing_document_code": "1"}]  # fmt: skip
    canonical = json.dumps(lines, sort_keys=True, separators=(",", ":")).encode()
    assert detail["document_id"] == entry["dispensing_id"]
    assert detail["additional_information_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert detail["prescription_sha256"] == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()


def _audit(config: str) -> list[Any]:
    async def rows() -> list[Any]:
        async with services(config) as svc, svc.db.read() as conn:
            return list((await conn.execute(select(audit_event))).all())

    return asyncio.run(rows())


def test_a_broken_embedded_prescription_is_refused_and_the_sad_kept(
    sandbox: dict[str, Any], pharmacist: Any
) -> None:
    who, auth, csc = pharmacist
    sad = csc.authorize(who["credential_id"], [hashlib.sha256(DISPENSING_CSV).digest()], auth)
    broken = SAMPLE.read_bytes().replace(b"d2AViR1mbbTGkOUKs3", b"d2AViR1mbbTGkOUKs4")
    entry = {
        "document": b64(DISPENSING_CSV),
        "signature_format": "X",
        "profile": "jp-dispensing",
        "prescription": b64(broken),
    }
    body = {"credentialID": who["credential_id"], "SAD": sad, "documents": [entry]}
    r = csc.post("/csc/v2/signatures/signDoc", body)
    assert r.status == 400, r.body
    assert b"embedded prescription's signature is broken" in r.body
    # the SAD was not spent: the same request with the intact prescription goes through
    entry["prescription"] = b64(SAMPLE.read_bytes())
    r = csc.post("/csc/v2/signatures/signDoc", body)
    assert r.status == 200, r.body


def test_info_lists_the_levels(pharmacist: Any) -> None:
    _, _, csc = pharmacist
    r = csc.post("/csc/v2/info", {})
    assert r.status == 200, r.body
    assert r.json()["conformance_levels"] == ["AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA"]


def test_sandbox_manifest_lists_samples_at_every_level(sandbox: dict[str, Any]) -> None:
    from tests.support.gateway import run_cli

    levels = ["AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA"]
    forms = {"AdES-B-B": "ES-BES", "AdES-B-T": "ES-T", "AdES-B-LT": "ES-XL", "AdES-B-LTA": "ES-A"}
    for kind in ("prescription", "dispensing"):
        assert sorted(sandbox["samples"][kind]) == sorted(levels)
        for level, path in sandbox["samples"][kind].items():
            res = run_cli("verify", "-c", sandbox["config"], path, "--json")
            report = json.loads(res.stdout)
            assert report["indication"] == "TOTAL-PASSED", report["reason"]
            sigs = report["signatures"]
            assert len(sigs) == (2 if kind == "dispensing" else 1)
            assert sigs[-1]["xades_level"] == forms[level]


def test_the_scheduler_runs_the_es_a_renewal(sandbox: dict[str, Any], tmp_path: Path) -> None:
    from tests.support.gateway import run_cli

    folder = tmp_path / "archive"
    folder.mkdir()
    es_a = Path(sandbox["samples"]["prescription"]["AdES-B-LTA"])
    (folder / "rx.xml").write_bytes(es_a.read_bytes())
    base = Path(sandbox["config"])
    config = base.with_name("gateway-renewal.toml")
    config.write_text(
        base.read_text(encoding="utf-8")
        + f'\n[signing]\narchive_renewal_paths = ["{folder}"]\narchive_renewal_days = 30\n',
        encoding="utf-8",
    )
    report = json.loads(run_cli("scheduler", "run-once", "-c", str(config), "--json").stdout)
    assert report["archives"] == [{"file": str(folder / "rx.xml"), "result": "not due"}]
    assert (folder / "rx.xml").read_bytes() == es_a.read_bytes()
