"""Real browser: Debian Chromium driven by Playwright, CDP virtual authenticator, facility mTLS.

The doctor enrols on the gateway's ``/enroll`` page (the portal's enrolment page and its
script: navigator.credentials.create with
``parseCreationOptionsFromJSON`` / ``toJSON``) and approves a signature on ``/approve``
(navigator.credentials.get; the page checks the challenge commits to its hashes, then calls
credentials/authorize and signatures/signHash). The browser presents the facility client
certificate through Playwright's ``client_certificates``. Chromium missing = failure, not skip.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes as h
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.api.portal.i18n import MESSAGES
from tests.support.browser import chromium, facility_context, virtual_authenticator
from tests.support.gateway import Server
from tests.support.signing import b64, random_hashes, services

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _code(sandbox: dict[str, Any], signer_id: str) -> tuple[str, str]:
    async def issue() -> tuple[str, str]:
        async with services(sandbox["config"]) as svc:
            issued = await svc.fido2.issue_enrollment(signer_id, actor="test")
            return issued.code, issued.password

    return asyncio.run(issue())


def test_enrol_and_approve_in_chromium(
    gateway: Server, sandbox: dict[str, Any], hospital: dict[str, Any]
) -> None:
    signer = [s for s in sandbox["signers"] if s["role"] == "Medical Doctor"][1]
    code, password = _code(sandbox, signer["id"])
    origin = f"https://localhost:{gateway.port}"
    digests = random_hashes(2)
    with chromium(sandbox["server_ca"]) as browser:
        context = facility_context(browser, gateway.port, hospital)
        page = context.new_page()
        cdp, authenticator_id = virtual_authenticator(context, page)
        page.goto(f"{origin}/enroll")
        page.fill("#code", code)
        page.fill("#password", password)
        page.fill("#label", "Chromium virtual authenticator")
        page.click("#submit")
        page.wait_for_selector("#status.ok, #status.error", timeout=15_000)
        status = page.text_content("#status") or ""
        assert status.startswith(MESSAGES["ja"]["enrol_done"]), status  # Japanese first
        creds = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator_id})[
            "credentials"
        ]
        assert len(creds) == 1

        page.goto(f"{origin}/approve")
        page.fill("#credential", signer["credential_id"])
        page.fill("#hashes", "\n".join(b64(d) for d in digests))
        page.click("#submit")
        page.wait_for_selector("#result[data-done]", timeout=15_000)
        text = page.text_content("#result") or ""
        assert not text.startswith("error"), text
        result = json.loads(text)

    assert result["expiresIn"] == 300
    assert "SAD" not in result
    # The signatures verify with the signer's HPKI certificate.
    from tests.support.gateway import client_context, request

    ctx = client_context(sandbox["server_ca"], hospital["client_cert"], hospital["client_key"])
    r = request(
        gateway.port,
        "POST",
        "/csc/v2/credentials/info",
        ctx=ctx,
        json_body={"credentialID": signer["credential_id"]},
    )
    cert = x509.load_der_x509_certificate(base64.b64decode(r.json()["cert"]["certificates"][0]))
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    for digest, sig in zip(digests, result["signatures"], strict=True):
        key.verify(base64.b64decode(sig), digest, padding.PKCS1v15(), Prehashed(h.SHA256()))
