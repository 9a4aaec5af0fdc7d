"""A facility system's signing code, written once against the CSC-shaped API and run against
both the remote gateway and the local agent: only how presence is proven differs (FIDO2 or
the card's PIN), which the endpoint's ``authorize`` hides."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.verify import TrustConfig, verify_document

SHA256 = "2.16.840.1.101.3.4.2.1"
SHA256_RSA = "1.2.840.113549.1.1.11"
CSV = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,3錠,分3毎食後\r\n".encode()


class CscEndpoint(Protocol):
    def post(self, path: str, body: Any) -> tuple[int, Any]: ...

    def authorize(self, credential_id: str, hashes: list[bytes]) -> str: ...


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def sign_prescriptions(
    ep: CscEndpoint, *, trust: TrustConfig, credential_id: str | None = None
) -> list[bytes]:
    """info -> list -> info -> authorize -> signHash (checked) -> signDoc (verified)."""
    status, info = ep.post("/csc/v2/info", {})
    assert status == 200 and "signatures/signDoc" in info["methods"], info
    status, listing = ep.post("/csc/v2/credentials/list", {})
    assert status == 200, listing
    cid = credential_id or listing["credentialIDs"][0]
    assert cid in listing["credentialIDs"]
    status, cred = ep.post("/csc/v2/credentials/info", {"credentialID": cid})
    assert status == 200 and cred["cert"]["status"] == "valid", cred
    cert = x509.load_der_x509_certificate(base64.b64decode(cred["cert"]["certificates"][0]))
    digests = [hashlib.sha256(f"order {i}".encode()).digest() for i in range(3)]
    sad = ep.authorize(cid, digests)
    status, body = ep.post(
        "/csc/v2/signatures/signHash",
        {"credentialID": cid, "SAD": sad, "hashes": [_b64(d) for d in digests],
         "hashAlgorithmOID": SHA256, "signAlgo": SHA256_RSA},
    )  # fmt: skip
    assert status == 200, body
    pub = cert.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    for d, s in zip(digests, body["signatures"], strict=True):
        pub.verify(base64.b64decode(s), d, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    sad = ep.authorize(cid, [hashlib.sha256(CSV).digest()])
    status, body = ep.post(
        "/csc/v2/signatures/signDoc",
        {"credentialID": cid, "SAD": sad,
         "documents": [{"document": _b64(CSV), "signature_format": "X",
                        "conformance_level": "AdES-B-B", "signAlgo": SHA256_RSA,
                        "signed_envelope_property": "Enveloped",
                        "profile": "jp-eprescription"}]},
    )  # fmt: skip
    assert status == 200, body
    signed = [base64.b64decode(d) for d in body["DocumentWithSignature"]]
    for xml in signed:
        report = asyncio.run(verify_document(xml, trust=trust))
        assert report.indication == "TOTAL-PASSED", report.reason
    return signed
