"""CSC credentials/list and credentials/info against the sandbox world."""

from __future__ import annotations

import base64
import ssl
from typing import Any

import pytest
from cryptography import x509

from gateway.pki import hpki
from tests.support.gateway import Server, client_context, request

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _signers_of(sandbox: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [s for s in sandbox["signers"] if code in s["facilities"]]


def test_list_shows_only_this_facilitys_signers(
    gateway: Server, sandbox: dict[str, Any], hospital: dict[str, Any], pharmacy: dict[str, Any]
) -> None:
    for fac in (hospital, pharmacy):
        ctx = client_context(sandbox["server_ca"], fac["client_cert"], fac["client_key"])
        r = request(gateway.port, "POST", "/csc/v2/credentials/list", ctx=ctx, json_body={})
        assert r.status == 200, r.body
        expected = {s["credential_id"] for s in _signers_of(sandbox, fac["institution_code"])}
        assert set(r.json()["credentialIDs"]) == expected
        assert expected


def test_list_user_filter_and_infos(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    doc = _signers_of(sandbox, "1310000011")[0]
    r = request(
        gateway.port,
        "POST",
        "/csc/v2/credentials/list",
        ctx=hospital_ctx,
        json_body={"userID": doc["id"], "credentialInfo": True, "certInfo": True},
    )
    assert r.status == 200
    body = r.json()
    assert body["credentialIDs"] == [doc["credential_id"]]
    info = body["credentialInfos"][0]
    assert info["credentialID"] == doc["credential_id"]
    assert info["key"]["len"] == 2048
    assert info["cert"]["status"] == "valid"
    # A pharmacist from the other facility is not visible here, even by userID.
    pharmacist = _signers_of(sandbox, "1340000019")[0]
    r = request(
        gateway.port,
        "POST",
        "/csc/v2/credentials/list",
        ctx=hospital_ctx,
        json_body={"userID": pharmacist["id"]},
    )
    assert r.json()["credentialIDs"] == []


def test_info_returns_hpki_chain(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    doc = _signers_of(sandbox, "1310000011")[0]
    r = request(
        gateway.port,
        "POST",
        "/csc/v2/credentials/info",
        ctx=hospital_ctx,
        json_body={"credentialID": doc["credential_id"], "certificates": "chain", "certInfo": True},
    )
    assert r.status == 200, r.body
    info = r.json()
    assert info["key"]["status"] == "enabled"
    assert "1.2.840.113549.1.1.11" in info["key"]["algo"]
    assert info["SCAL"] == "2"
    certs = [
        x509.load_der_x509_certificate(base64.b64decode(c)) for c in info["cert"]["certificates"]
    ]
    assert len(certs) == 3  # signer, TEST signing CA, TEST root
    assert hpki.parse_hcroles(certs[0]) == ["Medical Doctor"]
    assert hpki.check_signing_profile(certs[0]) == []
    assert info["cert"]["serialNumber"] == format(certs[0].serial_number, "x")
    assert doc["name"] in info["cert"]["subjectDN"]


def test_info_for_another_facilitys_credential_is_refused(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: ssl.SSLContext
) -> None:
    pharmacist = _signers_of(sandbox, "1340000019")[0]
    r = request(
        gateway.port,
        "POST",
        "/csc/v2/credentials/info",
        ctx=hospital_ctx,
        json_body={"credentialID": pharmacist["credential_id"]},
    )
    assert r.status == 400
    assert r.json() == {
        "error": "invalid_request",
        "error_description": "Invalid parameter credentialID",
        "request_id": r.headers["x-request-id"],
    }
