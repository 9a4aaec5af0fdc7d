"""CSC API v2 handlers: info, credentials/list, credentials/info.

Thin: decode -> validate -> authorize (the facility from mTLS) -> act -> respond. Only methods that
are implemented are advertised in ``info``.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from pydantic import Field

from gateway.api.jpki import offered_presence_methods, presence_methods
from gateway.api.keys import CLOCK, KEYSTORE, SETTINGS, SIGNERS
from gateway.api.middleware import identity
from gateway.api.schema import CscRequest, parse
from gateway.errors import AccessDenied, InvalidRequest
from gateway.lifecycle.signers import Credential

SPECS = "2.0.0.2"
METHODS = [
    "info",
    "credentials/list",
    "credentials/info",
    "credentials/authorize",
    "signatures/signHash",
    "signatures/signDoc",
]
# CSC v2 info: the signDoc formats, their envelopes and levels (gateway/sign/service.py).
SIGNATURE_FORMATS = {
    "formats": ["C", "X", "P"],
    "envelope_properties": [
        ["Detached", "Attached"],
        ["Enveloped", "Enveloping", "Detached"],
        ["Certification", "Revision"],
    ],
}
CONFORMANCE_LEVELS = ["AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA"]
RSA_SIGN_ALGOS = [
    "1.2.840.113549.1.1.11",  # sha256WithRSAEncryption
    "1.2.840.113549.1.1.12",  # sha384WithRSAEncryption
    "1.2.840.113549.1.1.13",  # sha512WithRSAEncryption
    "1.2.840.113549.1.1.1",  # rsaEncryption (signHash over a DigestInfo)
]

routes = web.RouteTableDef()


class InfoRequest(CscRequest):
    lang: str | None = None


class ListRequest(CscRequest):
    userID: str | None = Field(default=None, max_length=200)
    credentialInfo: bool = False
    certificates: Literal["none", "single", "chain"] = "single"
    certInfo: bool = False
    authInfo: bool = False
    onlyValid: bool = False
    lang: str | None = None
    maxResults: int | None = Field(default=None, ge=1, le=1000)


class InfoCredentialRequest(CscRequest):
    credentialID: str = Field(min_length=1, max_length=200)
    certificates: Literal["none", "single", "chain"] = "single"
    certInfo: bool = False
    authInfo: bool = False
    lang: str | None = None


def _facility(request: web.Request) -> int:
    """The calling facility; CSC methods are for facility systems, not administrators."""
    ident = identity(request)
    if ident.kind != "facility" or ident.facility_id is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    return ident.facility_id


@routes.post("/csc/v2/info")
async def info(request: web.Request) -> web.Response:
    _facility(request)
    await parse(request, InfoRequest)
    s = request.app[SETTINGS].service
    return web.json_response(
        {
            "specs": SPECS,
            "name": s.name,
            "region": s.region,
            "lang": s.lang,
            "description": s.description,
            "authType": ["TLS"],
            "methods": METHODS,
            "signAlgorithms": {"algos": RSA_SIGN_ALGOS},
            "signature_formats": SIGNATURE_FORMATS,
            "conformance_levels": CONFORMANCE_LEVELS,
            "presenceMethods": offered_presence_methods(request),
        }
    )


def _cert_status(cred: Credential, now: datetime) -> str:
    """CSC certificate status: "valid" or "expired" (revocation checks come with verification)."""
    assert cred.certificate is not None  # only credentials with a certificate are served
    c = cred.certificate
    return "valid" if c.not_valid_before_utc <= now < c.not_valid_after_utc else "expired"


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode()


def credential_info(
    cred: Credential,
    *,
    certificates: str,
    cert_info: bool,
    auth_info: bool,
    lang: str,
    multisign: int,
    now: datetime,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": f"HPKI signing credential ({cred.key_algorithm}-{cred.key_bits})",
        "key": {
            "status": "enabled" if cred.status == "active" else "disabled",
            "algo": RSA_SIGN_ALGOS,
            "len": cred.key_bits,
        },
        "cert": {"status": _cert_status(cred, now)},
        "auth": {"mode": "explicit"},
        "authMode": "explicit",  # CSC v1 field, still read by v1 clients
        "SCAL": "2",
        "multisign": multisign,
        "lang": lang,
    }
    cert = out["cert"]
    leaf = cred.certificate
    assert leaf is not None
    if certificates in ("single", "chain"):
        ders = [leaf.public_bytes(serialization.Encoding.DER)]
        if certificates == "chain":
            ders += [c.public_bytes(serialization.Encoding.DER) for c in cred.chain]
        cert["certificates"] = [_b64(d) for d in ders]
    if cert_info:
        cert.update(
            issuerDN=leaf.issuer.rfc4514_string(),
            serialNumber=format(leaf.serial_number, "x"),
            subjectDN=leaf.subject.rfc4514_string(),
            validFrom=leaf.not_valid_before_utc.strftime("%Y%m%d%H%M%SZ"),
            validTo=leaf.not_valid_after_utc.strftime("%Y%m%d%H%M%SZ"),
        )
    if auth_info:
        out["auth"]["objects"] = []
    return out


async def _facility_credentials(
    request: web.Request, *, user_id: str | None = None, credential_id: str | None = None
) -> list[Credential]:
    return await request.app[SIGNERS].facility_credentials(
        _facility(request), user_id=user_id, credential_id=credential_id
    )


@routes.post("/csc/v2/credentials/list")
async def credentials_list(request: web.Request) -> web.Response:
    req = await parse(request, ListRequest)
    creds = await _facility_credentials(request, user_id=req.userID)
    now = request.app[CLOCK]()
    if req.onlyValid:
        creds = [c for c in creds if c.status == "active" and _cert_status(c, now) == "valid"]
    if req.maxResults is not None:
        creds = creds[: req.maxResults]
    body: dict[str, Any] = {"credentialIDs": [c.id for c in creds]}
    if req.onlyValid:
        body["onlyValid"] = True
    if req.credentialInfo:
        lang = req.lang or request.app[SETTINGS].service.lang
        body["credentialInfos"] = [
            {
                "credentialID": c.id,
                **credential_info(
                    c,
                    certificates=req.certificates,
                    cert_info=req.certInfo,
                    auth_info=req.authInfo,
                    lang=lang,
                    multisign=request.app[SETTINGS].activation.max_hashes_per_request,
                    now=now,
                ),
            }
            for c in creds
        ]
    return web.json_response(body)


@routes.post("/csc/v2/credentials/info")
async def credentials_info(request: web.Request) -> web.Response:
    req = await parse(request, InfoCredentialRequest)
    creds = await _facility_credentials(request, credential_id=req.credentialID)
    if not creds:
        # Same answer for "does not exist" and "not linked to your facility": no probing.
        raise InvalidRequest("Invalid parameter credentialID")
    cred = creds[0]
    # Ask the HSM: a credential whose key is gone (or a token that is down) is not usable.
    await request.app[KEYSTORE].get_key(cred.key_id)
    out = credential_info(
        cred,
        certificates=req.certificates,
        cert_info=req.certInfo,
        auth_info=req.authInfo,
        lang=req.lang or request.app[SETTINGS].service.lang,
        multisign=request.app[SETTINGS].activation.max_hashes_per_request,
        now=request.app[CLOCK](),
    )
    out["presenceMethods"] = await presence_methods(request, cred.signer_id)
    return web.json_response(out)
