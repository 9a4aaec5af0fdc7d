"""pyHanko's CSCSigner (unmodified, CSC v1 field names) signs a PDF through the gateway.

Its authorization manager performs the FIDO2 ceremony with the software authenticator: the
challenge commits to the very hash pyHanko is about to have signed. The PDF then validates with
poppler's ``pdfsig`` (NSS database trusting the sandbox HPKI root) and with pyHanko's validator.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pyhanko.keys import load_cert_from_pemder
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import signers
from pyhanko.sign.signers.csc_signer import (
    CSCAuthorizationInfo,
    CSCAuthorizationManager,
    CSCServiceSessionInfo,
    CSCSigner,
    fetch_certs_in_csc_credential,
)
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko_certvalidator import ValidationContext
from reportlab.pdfgen import canvas

from tests.support.gateway import Server
from tests.support.signing import SHA256
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


class FidoAuthorizationManager(CSCAuthorizationManager):
    """authenticate/begin -> authenticator -> credentials/authorize, per batch of hashes."""

    def __init__(
        self,
        info: CSCServiceSessionInfo,
        credential_info: Any,
        *,
        session: aiohttp.ClientSession,
        authenticator: SoftAuthenticator,
    ) -> None:
        super().__init__(info, credential_info)
        self.session = session
        self.authenticator = authenticator

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        url = f"{self.csc_session_info.service_url}{path}"
        async with self.session.post(url, json=body) as r:
            data = await r.json()
            assert r.status == 200, data
            return data

    async def authorize_signature(self, hash_b64s: list[str]) -> CSCAuthorizationInfo:
        assert self.credential_info.hash_pinning_required  # SCAL 2 advertised
        cred = self.csc_session_info.credential_id
        begin = await self._post(
            "/auth/fido2/authenticate/begin",
            {
                "credentialID": cred,
                "hashes": hash_b64s,
                "hashAlgorithmOID": SHA256,
                "numSignatures": len(hash_b64s),
            },
        )
        assertion = self.authenticator.get(begin["publicKey"])
        req = self.format_csc_auth_request(hash_b64s=hash_b64s)  # v1 field `hash`
        req["hashAlgorithmOID"] = SHA256
        req["authData"] = [{"id": "webauthn", "value": json.dumps(assertion)}]
        resp = await self._post("/csc/v2/credentials/authorize", req)
        return self.parse_csc_auth_response(resp)


def _blank_pdf() -> bytes:
    buf = BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 720, "hpki-gateway: PDF signed through CSC signHash")
    c.showPage()
    c.save()
    return buf.getvalue()


async def test_pyhanko_csc_signer_signs_pdf(
    gateway: Server,
    sandbox: dict[str, Any],
    hospital: dict[str, Any],
    doctor: Any,
    tmp_path: Path,
) -> None:
    doc, auth = doctor
    ctx = ssl.create_default_context(cafile=sandbox["server_ca"])
    ctx.load_cert_chain(hospital["client_cert"], hospital["client_key"])
    info = CSCServiceSessionInfo(
        service_url=f"https://localhost:{gateway.port}",
        credential_id=doc["credential_id"],
        api_ver="v2",
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        cred_info = await fetch_certs_in_csc_credential(session, info)
        manager = FidoAuthorizationManager(info, cred_info, session=session, authenticator=auth)
        signer = CSCSigner(session, auth_manager=manager)
        out = await signers.async_sign_pdf(
            IncrementalPdfFileWriter(BytesIO(_blank_pdf())),
            signers.PdfSignatureMetadata(field_name="Signature1", md_algorithm="sha256"),
            signer=signer,
        )
    pdf = tmp_path / "signed.pdf"
    pdf.write_bytes(out.getvalue())

    # pyHanko's validator against the sandbox HPKI root.
    root = load_cert_from_pemder(sandbox["hpki_trust_anchors"][0])
    vc = ValidationContext(trust_roots=[root], allow_fetching=False, revocation_mode="soft-fail")
    with pdf.open("rb") as f:
        sig = PdfFileReader(f).embedded_signatures[0]
        status = await async_validate_pdf_signature(sig, signer_validation_context=vc)
    assert status.intact and status.valid, status.pretty_print_details()
    assert status.trusted, status.pretty_print_details()
    assert doc["name"] in status.signing_cert.subject.human_friendly

    # poppler's pdfsig with an NSS database that trusts the same root; it asks the TEST OCSP
    # responder the signer certificate names (docs/sandbox.md).
    asked = gateway.logs().count("TEST OCSP: serial")
    out_text = _pdfsig(pdf, Path(sandbox["hpki_trust_anchors"][0]), tmp_path / "nss")
    assert "Signature Validation: Signature is Valid." in out_text, out_text
    assert "Certificate Validation: Certificate is Trusted." in out_text, out_text
    assert gateway.logs().count("TEST OCSP: serial") > asked, out_text


def _pdfsig(pdf: Path, root: Path, nss: Path) -> str:
    if shutil.which("pdfsig") is None or shutil.which("certutil") is None:
        raise RuntimeError("pdfsig/certutil missing: run `make test` (scripts/bootstrap.sh)")
    nss.mkdir()
    subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-A", "-d", f"sql:{nss}", "-n", "hpki-test-root", "-t", "CT,C,C",
         "-i", str(root)],
        check=True,
    )  # fmt: skip
    # As docs/sandbox.md runs it: NSS checks the OCSP responder's path with libpkix.
    res = subprocess.run(
        ["pdfsig", "-nssdir", f"sql:{nss}", str(pdf)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "NSS_ENABLE_PKIX_VERIFY": "1"},
    )  # fmt: skip
    return res.stdout + res.stderr
