"""Documents built to break the PDF library: whatever fails after the SAD is spent gives the
count back and is audited as ``signature.failed``; the audit never holds a signature nobody
received."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import select

from gateway.store.schema import audit_event
from tests.support.gateway import Server
from tests.support.hostile import HOSTILE_PDFS, HOSTILE_XML
from tests.support.signing import Csc, b64, services

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


@pytest.fixture(scope="module")
def csc(gateway: Server, hospital_ctx: Any) -> Csc:
    return Csc(gateway.port, hospital_ctx)


def _audit(config: str) -> list[Any]:
    async def rows() -> list[Any]:
        async with services(config) as svc, svc.db.read() as conn:
            return list((await conn.execute(select(audit_event).order_by(audit_event.c.seq))).all())

    return asyncio.run(rows())


@pytest.mark.parametrize("kind", sorted(HOSTILE_PDFS))
def test_a_hostile_pdf_spends_nothing_and_leaves_no_false_signature(
    csc: Csc, doctor: Any, sandbox: dict[str, Any], gateway: Server, kind: str
) -> None:
    pdf = HOSTILE_PDFS[kind]()
    digest = hashlib.sha256(pdf).hexdigest()
    doc, auth = doctor
    sad = csc.authorize(doc["credential_id"], [hashlib.sha256(pdf).digest()], auth)
    body = {
        "credentialID": doc["credential_id"],
        "SAD": sad,
        "documents": [{"document": b64(pdf), "signature_format": "P"}],
    }
    first = csc.post("/csc/v2/signatures/signDoc", body)
    assert first.status == 400, first.body
    assert first.json()["error"] == "invalid_request"
    # The count is still there: the same request fails the same way, not as a spent SAD.
    again = csc.post("/csc/v2/signatures/signDoc", body)
    assert again.status == 400, again.body
    assert again.json()["error_description"] == first.json()["error_description"]
    assert "not a readable PDF" in first.json()["error_description"]
    # Read before the spend: no signature.sign_doc for it at all, and the refusal audited.
    rows = _audit(sandbox["config"])
    assert [r.seq for r in rows if r.action == "signature.sign_doc" and digest in r.detail] == []
    refused = [r for r in rows if r.action == "signature.refused"]
    assert "not a readable PDF" in json.loads(refused[-1].detail)["reason"]
    assert "Traceback" not in gateway.logs()


@pytest.mark.parametrize("kind", sorted(HOSTILE_XML))
def test_an_xml_bomb_for_xades_is_a_quick_400_and_spends_nothing(
    csc: Csc, doctor: Any, sandbox: dict[str, Any], kind: str
) -> None:
    xml = HOSTILE_XML[kind]()
    digest = hashlib.sha256(xml).hexdigest()
    doc, auth = doctor
    sad = csc.authorize(doc["credential_id"], [hashlib.sha256(xml).digest()], auth)
    body = {
        "credentialID": doc["credential_id"],
        "SAD": sad,
        "documents": [{"document": b64(xml), "signature_format": "X"}],
    }
    r = csc.post("/csc/v2/signatures/signDoc", body)
    assert r.status == 400, r.body
    assert {"attributes": "attributes", "namespaces": "namespace declarations"}[kind] in (
        r.json()["error_description"]
    )
    rows = _audit(sandbox["config"])
    assert not [x for x in rows if x.action == "signature.sign_doc" and digest in x.detail]
    refused = [x for x in rows if x.action == "signature.refused"]
    assert refused and "XML" in json.loads(refused[-1].detail)["reason"]


def _nested_namespaces(levels: int = 8, per_element: int = 60) -> bytes:
    """Within the parse limits (60 namespace declarations per element, 8 levels deep), but
    libxml2's canonicalisation fails on it once the signature is being built."""
    head = "".join(
        "<e " + " ".join(f'xmlns:p{d}x{i}="u{d}{i}"' for i in range(per_element)) + ">"
        for d in range(levels)
    )
    return f"<r>{head}x{'</e>' * levels}</r>".encode()


def test_xml_that_fails_canonicalisation_is_a_400_and_gives_the_count_back(
    csc: Csc, doctor: Any, sandbox: dict[str, Any], gateway: Server
) -> None:
    xml = _nested_namespaces()
    doc, auth = doctor
    sad = csc.authorize(doc["credential_id"], [hashlib.sha256(xml).digest()], auth)
    body = {
        "credentialID": doc["credential_id"],
        "SAD": sad,
        "documents": [
            {"document": b64(xml), "signature_format": "X", "signed_envelope_property": "Enveloped"}
        ],
    }
    first = csc.post("/csc/v2/signatures/signDoc", body)
    assert first.status == 400, first.body
    assert first.json()["error"] == "invalid_request"
    assert "could not be read (C14NError)" in first.json()["error_description"]
    # Refunded: the same SAD fails the same way again instead of being spent.
    again = csc.post("/csc/v2/signatures/signDoc", body)
    assert again.status == 400, again.body
    assert again.json()["error_description"] == first.json()["error_description"]
    failed = [r for r in _audit(sandbox["config"]) if r.action == "signature.failed"]
    assert failed and json.loads(failed[-1].detail)["refunded"] is True
    assert "Traceback" not in gateway.logs()


def test_a_pdf_changed_after_signing_fails_and_logs_no_traceback(csc: Csc, gateway: Server) -> None:
    """/verify on a PDF whose page was swapped after signing: TOTAL-FAILED, and pyHanko's
    warning about it reaches the log as one line (its type and place), not a traceback that
    quotes the client's objects. Before, the verification process had no log set-up and
    Python's last-resort handler printed the traceback."""
    import base64

    from tests.support import pdf_forge
    from tests.support.softkey import make_world

    world = make_world()
    signed = pdf_forge.sign(world, pdf_forge.one_page_pdf("Take 1 tablet"))
    changed = pdf_forge.replace_page_text(signed, "Take 50 tablets")
    mark = len(gateway.logs())
    r = csc.post("/verify", {"document": base64.b64encode(changed).decode()})
    assert r.status == 200, r.body
    report = r.json()
    assert (report["indication"], report["sub_indication"]) == ("TOTAL-FAILED", "HASH_FAILURE")
    logged = gateway.logs()[mark:]
    assert "Error in diff operation" in logged, logged[-2000:]
    assert "Traceback" not in logged, logged[-2000:]
