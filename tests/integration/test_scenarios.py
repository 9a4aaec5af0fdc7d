"""Failure scenarios of the sandbox: each switched on through the admin API answers the error
docs/sandbox.md documents, nothing else changes, and a reset brings the facility back."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.auth.fido2 import LOCKED_TEXT
from gateway.sign.samples import PRESCRIPTION_CSV
from tests.support.gateway import Server, client_context, request
from tests.support.signing import Csc

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


@pytest.fixture(scope="module")
def admin_ctx(sandbox: dict[str, Any]) -> Any:
    a = sandbox["admin"]
    return client_context(sandbox["server_ca"], a["client_cert"], a["client_key"])


@pytest.fixture
def switch(gateway: Server, admin_ctx: Any) -> Iterator[Any]:
    def on(scenario: str, **target: str) -> None:
        r = request(
            gateway.port, "POST", "/admin/scenarios", ctx=admin_ctx,
            json_body={"scenario": scenario, **target},
        )  # fmt: skip
        assert r.status == 200, r.body

    yield on
    r = request(gateway.port, "POST", "/admin/scenarios/reset", ctx=admin_ctx, json_body={})
    assert r.status == 200 and r.json()["active"] == {}


def _sign_doc(level: str, credential: str) -> dict[str, Any]:
    doc = base64.b64encode(b"1,1,1310000011,13,1,TEST\r\n").decode()
    return {
        "credentialID": credential,
        "SAD": "not-a-sad",
        "documents": [
            {"document": doc, "signature_format": "X", "profile": "jp-eprescription",
             "conformance_level": level}
        ],
    }  # fmt: skip


def test_the_catalog_and_production_refusal(gateway: Server, admin_ctx: Any) -> None:
    r = request(gateway.port, "GET", "/admin/scenarios", ctx=admin_ctx)
    names = {s["scenario"] for s in r.json()["scenarios"]}
    assert {
        "facility_certificate_revoked", "facility_certificate_expired", "facility_suspended",
        "enrolment_locked", "signer_without_role", "tsa_down", "tsa_slow", "hsm_unavailable",
        "ocsp_revoked", "ocsp_unknown",
    } <= names  # fmt: skip
    bad = request(
        gateway.port, "POST", "/admin/scenarios", ctx=admin_ctx,
        json_body={"scenario": "no_such", "facility": "1310000011"},
    )  # fmt: skip
    assert bad.status == 400


def test_facility_scenarios_answer_their_documented_errors(
    gateway: Server, hospital_ctx: Any, hospital: dict[str, Any], switch: Any
) -> None:
    code = hospital["institution_code"]
    cases = {
        "facility_certificate_revoked": "was revoked on",
        "facility_certificate_expired": None,  # a new connection: closed, no HTTP answer
        "facility_suspended": f"facility {code} is suspended since",
    }
    for scenario, text in cases.items():
        switch(scenario, facility=code)
        if text is None:
            with pytest.raises(
                (http.client.RemoteDisconnected, ConnectionResetError, ssl.SSLError)
            ):
                request(gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
        else:
            r = request(gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
            assert r.status == 403, r.body
            assert r.json()["error"] == "access_denied" and text in r.json()["error_description"]
        # The portal stays reachable, so that the tester can reset.
        page = request(gateway.port, "GET", "/portal/status", ctx=hospital_ctx)
        assert page.status == 200 and scenario in page.body.decode()
        # A facility cannot switch through the admin API (the /admin path rule).
        r = request(gateway.port, "POST", "/admin/scenarios/reset", ctx=hospital_ctx, json_body={})
        assert r.status == 403
        switch_off_all(gateway)
        r = request(gateway.port, "POST", "/csc/v2/info", ctx=hospital_ctx, json_body={})
        assert r.status == 200


_ADMIN: dict[str, Any] = {}


def switch_off_all(gateway: Server) -> None:
    r = request(gateway.port, "POST", "/admin/scenarios/reset", ctx=_ADMIN["ctx"], json_body={})
    assert r.status == 200


@pytest.fixture(autouse=True)
def _admin(admin_ctx: Any) -> None:
    _ADMIN["ctx"] = admin_ctx


def _prescription(level: str, credential: str, sad: str) -> dict[str, Any]:
    return {
        "credentialID": credential,
        "SAD": sad,
        "documents": [
            {"document": base64.b64encode(PRESCRIPTION_CSV).decode(), "signature_format": "X",
             "profile": "jp-eprescription", "conformance_level": level}
        ],
    }  # fmt: skip


async def _refunds(config: str, credential: str) -> int:
    from sqlalchemy import select

    from gateway.store.schema import audit_event
    from tests.support.signing import services

    async with services(config) as svc, svc.db.read() as conn:
        q = select(audit_event.c.detail).where(audit_event.c.action == "signature.failed")
        details = [json.loads(d) for d in (await conn.execute(q)).scalars()]
    return sum(d.get("credential") == credential and d.get("refunded") is True for d in details)


def test_tsa_and_hsm_scenarios_fail_on_the_signing_path(
    gateway: Server, hospital_ctx: Any, hospital: dict[str, Any], sandbox: dict[str, Any],
    doctor: Any, switch: Any,
) -> None:  # fmt: skip
    """A real SAD goes through the handler: it is spent, the TSA (or the key store) fails as
    a dead one does, the SAD is given back, and after the reset the same SAD signs."""
    code = hospital["institution_code"]
    doc, auth = doctor
    cred = doc["credential_id"]
    csc = Csc(gateway.port, hospital_ctx)
    digest = hashlib.sha256(PRESCRIPTION_CSV).digest()

    sad = csc.authorize(cred, [digest], auth)
    refunds = asyncio.run(_refunds(sandbox["config"], cred))
    switch("tsa_down", facility=code)
    r = csc.post("/csc/v2/signatures/signDoc", _prescription("AdES-B-T", cred, sad))
    assert r.status == 503 and r.json()["error"] == "tsa_unavailable", r.body
    assert r.headers["retry-after"] == "30"
    text = r.json()["error_description"]
    # The real client's words about a refused connection, to the stand-in's address.
    assert "/sandbox-scenario/tsa_down is unreachable (ClientConnectorError" in text, text
    assert text.endswith("nothing was signed"), text
    assert asyncio.run(_refunds(sandbox["config"], cred)) == refunds + 1  # the SAD came back
    # B-B needs no TSA: with the scenario still on, it signs with the SAD given back.
    r = csc.post("/csc/v2/signatures/signDoc", _prescription("AdES-B-B", cred, sad))
    assert r.status == 200, r.body
    switch_off_all(gateway)
    sad = csc.authorize(cred, [digest], auth)
    r = csc.post("/csc/v2/signatures/signDoc", _prescription("AdES-B-T", cred, sad))
    assert r.status == 200, r.body  # the TSA is back for this facility

    hashes = [hashlib.sha256(b"hsm scenario").digest()]
    sad = csc.authorize(cred, hashes, auth)
    switch("hsm_unavailable", facility=code)
    r = csc.sign_hash(cred, sad, hashes)
    assert r.status == 503, r.body
    assert r.json() | {"request_id": ""} == {
        "error": "temporarily_unavailable",
        "error_description": "HSM token unavailable",
        "request_id": "",
    }
    assert r.headers["retry-after"]
    switch_off_all(gateway)
    r = csc.sign_hash(cred, sad, hashes)  # the same SAD: it was given back
    assert r.status == 200 and len(r.json()["signatures"]) == 1, r.body


def test_role_and_enrolment_scenarios_check_what_the_real_path_checks_first(
    gateway: Server, hospital_ctx: Any, hospital: dict[str, Any], sandbox: dict[str, Any],
    switch: Any,
) -> None:  # fmt: skip
    """The refusal itself is compared with the real one in test_scenarios_as_real.py; here,
    what comes before it: a made-up SAD and an unknown enrolment code answer as always."""
    code = hospital["institution_code"]
    doctor = next(s for s in sandbox["signers"] if s["role"] == "Medical Doctor")
    cred = doctor["credential_id"]
    switch("signer_without_role", credential=cred)
    r = request(gateway.port, "POST", "/csc/v2/signatures/signDoc", ctx=hospital_ctx,
                json_body=_sign_doc("AdES-B-B", cred))  # fmt: skip
    assert r.status == 400 and r.json()["error_description"] == "Invalid parameter SAD", r.body
    switch_off_all(gateway)

    switch("enrolment_locked", facility=code)
    r = request(gateway.port, "POST", "/auth/fido2/register/begin", ctx=hospital_ctx,
                json_body={"enrollment_code": "AAAA-BBBB-CCCC-DDDD", "password": "x"})  # fmt: skip
    assert r.status == 400 and r.json()["detail"] == "enrollment code is not valid", r.body
    assert LOCKED_TEXT not in r.body.decode()


def test_a_slow_tsa_times_out(
    gateway: Server, hospital_ctx: Any, hospital: dict[str, Any], sandbox: dict[str, Any],
    doctor: Any, switch: Any,
) -> None:  # fmt: skip
    doc, auth = doctor
    cred = doc["credential_id"]
    csc = Csc(gateway.port, hospital_ctx)
    sad = csc.authorize(cred, [hashlib.sha256(PRESCRIPTION_CSV).digest()], auth)
    switch("tsa_slow", facility=hospital["institution_code"])
    r = csc.post("/csc/v2/signatures/signDoc", _prescription("AdES-B-LT", cred, sad))
    assert r.status == 503 and r.json()["error"] == "tsa_timeout", r.body
    text = r.json()["error_description"]
    assert "/sandbox-scenario/tsa_slow did not answer within" in text, text
    switch_off_all(gateway)
    r = csc.post("/csc/v2/signatures/signDoc", _prescription("AdES-B-LT", cred, sad))
    assert r.status == 200, r.body  # the SAD was given back


def test_ocsp_scenarios_change_what_the_test_responder_answers(
    gateway: Server, sandbox: dict[str, Any], switch: Any
) -> None:
    from tests.integration.test_sandbox_serves_pki import ocsp_status

    # The samples are signed by the first doctor.
    cred = next(s for s in sandbox["signers"] if s["role"] == "Medical Doctor")["credential_id"]
    switch("ocsp_revoked", credential=cred)
    assert ocsp_status(sandbox) == "revoked"
    switch_off_all(gateway)
    switch("ocsp_unknown", credential=cred)
    assert ocsp_status(sandbox) == "unknown"
    switch_off_all(gateway)
    assert ocsp_status(sandbox) == "good"
