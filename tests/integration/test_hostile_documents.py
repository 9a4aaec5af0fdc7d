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
from tests.support.hostile import HOSTILE_PDFS
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
    # Every signature.sign_doc for this digest is followed by its signature.failed.
    rows = [
        r
        for r in _audit(sandbox["config"])
        if r.action in ("signature.sign_doc", "signature.failed")
        and (digest in r.detail or json.loads(r.detail).get("method") == "signDoc")
    ]
    signed = [r for r in rows if r.action == "signature.sign_doc" and digest in r.detail]
    for s in signed:
        following = [r for r in rows if r.seq > s.seq and r.action == "signature.failed"]
        assert following, f"signature.sign_doc #{s.seq} for a document nobody received"
        assert json.loads(following[0].detail)["refunded"] is True
    assert "Traceback" not in gateway.logs()
