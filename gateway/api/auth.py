"""FIDO2 ceremony endpoints (``/auth/fido2/...``) and the gateway's own pages (``/enroll``,
``/approve``).

Behind mTLS like every route: the registration page is opened on a facility PC whose browser
presents the facility certificate, and the facility system relays authentication ceremonies.
Errors are RFC 9457 problem+json (these paths are not under ``/csc/``).
"""

from __future__ import annotations

import base64
import binascii
import json
from importlib import resources
from typing import Any

from aiohttp import web
from pydantic import Field

from gateway.api.keys import FIDO2, SETTINGS
from gateway.api.middleware import identity
from gateway.api.schema import CscRequest, parse
from gateway.auth.fido2 import Caller
from gateway.errors import AccessDenied, InvalidRequest
from gateway.hsm.api import DigestAlgorithm

routes = web.RouteTableDef()

_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


def caller_of(request: web.Request) -> Caller:
    ident = identity(request)
    return Caller(
        actor=ident.actor, facility_id=ident.facility_id, institution_code=ident.institution_code
    )


def decode_hashes(values: list[str], *, field: str, max_count: int) -> list[bytes]:
    """Strict standard base64 (CSC); the array length is limited, never truncated."""
    if len(values) > max_count:
        raise InvalidRequest(
            f"Invalid parameter {field}: at most {max_count} hashes per request "
            "(activation.max_hashes_per_request)"
        )
    out: list[bytes] = []
    for i, v in enumerate(values):
        try:
            out.append(base64.b64decode(v, validate=True))
        except (binascii.Error, ValueError) as e:
            raise InvalidRequest(f"Invalid parameter {field}: item {i} is not base64") from e
    return out


def check_lengths(hashes: list[bytes], algorithm: DigestAlgorithm, *, field: str) -> None:
    for i, h in enumerate(hashes):
        if len(h) != algorithm.digest_size:
            raise InvalidRequest(
                f"Invalid parameter {field}: item {i} is {len(h)} bytes, {algorithm.name} "
                f"digests are {algorithm.digest_size} bytes"
            )


def digest_algorithm(oid: str, *, field: str = "hashAlgorithmOID") -> DigestAlgorithm:
    try:
        return DigestAlgorithm.from_oid(oid)
    except ValueError as e:
        raise InvalidRequest(f"Invalid parameter {field}: {e}") from e


class RegisterBeginRequest(CscRequest):
    enrollment_code: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=128)


class RegisterCompleteRequest(CscRequest):
    enrollment_code: str = Field(min_length=1, max_length=64)
    credential: dict[str, Any]
    label: str | None = Field(default=None, max_length=200)


class AuthenticateBeginRequest(CscRequest):
    credentialID: str = Field(min_length=1, max_length=200)
    hashes: list[str] = Field(default_factory=list)
    hashAlgorithmOID: str | None = Field(default=None, max_length=64)
    numSignatures: int = Field(ge=1, le=100_000)
    description: str | None = Field(default=None, max_length=500)


@routes.post("/auth/fido2/register/begin")
async def register_begin(request: web.Request) -> web.Response:
    req = await parse(request, RegisterBeginRequest)
    options = await request.app[FIDO2].register_begin(
        code=req.enrollment_code, password=req.password, caller=caller_of(request)
    )
    return web.json_response(options)


@routes.post("/auth/fido2/register/complete")
async def register_complete(request: web.Request) -> web.Response:
    req = await parse(request, RegisterCompleteRequest)
    reg = await request.app[FIDO2].register_complete(
        code=req.enrollment_code,
        response=req.credential,
        caller=caller_of(request),
        label=req.label,
    )
    return web.json_response(
        {"status": "registered", "credential_id": reg.credential_id, "authenticator": reg.id}
    )


@routes.post("/auth/fido2/authenticate/begin")
async def authenticate_begin(request: web.Request) -> web.Response:
    req = await parse(request, AuthenticateBeginRequest)
    caller = caller_of(request)
    if caller.facility_id is None:
        raise AccessDenied("FIDO2 authentication is relayed by facility client certificates")
    limit = request.app[SETTINGS].activation.max_hashes_per_request
    hashes = decode_hashes(req.hashes, field="hashes", max_count=limit)
    if hashes:
        if req.hashAlgorithmOID is None:
            raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
        check_lengths(hashes, digest_algorithm(req.hashAlgorithmOID), field="hashes")
        if req.numSignatures != len(hashes):
            raise InvalidRequest("Invalid parameter numSignatures: must equal the number of hashes")
    elif req.hashAlgorithmOID is not None:
        digest_algorithm(req.hashAlgorithmOID)
    options = await request.app[FIDO2].authenticate_begin(
        caller=caller,
        credential_id=req.credentialID,
        hashes=hashes,
        hash_algorithm_oid=req.hashAlgorithmOID,
        num_signatures=req.numSignatures,
    )
    return web.json_response(options)


def _page(name: str) -> web.Response:
    html = resources.files("gateway.api").joinpath(f"static/{name}").read_text(encoding="utf-8")
    return web.Response(
        text=html,
        content_type="text/html",
        headers={
            "Content-Security-Policy": _CSP,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@routes.get("/enroll")
async def enroll_page(request: web.Request) -> web.Response:
    return _page("enroll.html")


@routes.get("/approve")
async def approve_page(request: web.Request) -> web.Response:
    return _page("approve.html")


def assertion_from_auth_data(auth_data: list[dict[str, Any]]) -> dict[str, Any]:
    """``authData: [{"id": "webauthn", "value": "<AuthenticationResponse JSON string>"}]``."""
    for item in auth_data:
        if item.get("id") == "webauthn":
            value = item.get("value")
            if isinstance(value, dict):
                return value
            if not isinstance(value, str):
                break
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequest(
                    "Invalid parameter authData: the webauthn value is not JSON"
                ) from e
            if not isinstance(parsed, dict):
                break
            return parsed
    raise InvalidRequest(
        'Missing (or invalid type) parameter authData: expected [{"id": "webauthn", '
        '"value": "<AuthenticationResponse JSON>"}]'
    )
