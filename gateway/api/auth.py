"""FIDO2 ceremony endpoints (``/auth/fido2/...``) and the gateway's own pages (``/enroll``:
the portal's enrolment page; ``/approve``).

Behind mTLS like every route: the registration page is opened on a facility PC whose browser
presents the facility certificate, and the facility system relays authentication ceremonies.
Errors are RFC 9457 problem+json (these paths are not under ``/csc/``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web
from pydantic import Field

from gateway.api.decode import caller_of, check_lengths, decode_hashes, digest_algorithm
from gateway.api.keys import ACTIVATION, DB, FIDO2, SETTINGS
from gateway.api.portal import pages as portal_pages
from gateway.api.schema import CscRequest, Label, parse
from gateway.auth.challenges import Approval
from gateway.errors import AccessDenied, InvalidRequest
from gateway.signing.grant import Caller

routes = web.RouteTableDef()

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


class RegisterBeginRequest(CscRequest):
    enrollment_code: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=128)


class RegisterCompleteRequest(CscRequest):
    enrollment_code: str = Field(min_length=1, max_length=64)
    credential: dict[str, Any]
    label: Label | None = None


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


async def begin_args(
    request: web.Request, req: AuthenticateBeginRequest, *, relayed: str
) -> tuple[Caller, Approval]:
    """Check an ``authenticate/begin`` body; ``relayed`` is the refusal for a caller without
    a facility. Without hashes (a signing session, SCAL 1) the facility's policy must allow
    one for ``numSignatures``: refused here (400) rather than after the signer's gesture."""
    caller = caller_of(request)
    if caller.facility_id is None:
        raise AccessDenied(relayed)
    limit = request.app[SETTINGS].activation.max_hashes_per_request
    hashes = decode_hashes(req.hashes, field="hashes", max_count=limit)
    if hashes:
        if req.hashAlgorithmOID is None:
            raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
        check_lengths(hashes, digest_algorithm(req.hashAlgorithmOID), field="hashes")
        if req.numSignatures != len(hashes):
            raise InvalidRequest("Invalid parameter numSignatures: must equal the number of hashes")
    else:
        if req.hashAlgorithmOID is not None:
            digest_algorithm(req.hashAlgorithmOID)
        async with request.app[DB].read() as conn:
            await request.app[ACTIVATION].check_session_begin(
                conn, caller.facility_id, req.numSignatures
            )
    return caller, Approval(
        credential_id=req.credentialID,
        hashes=hashes,
        hash_algorithm_oid=req.hashAlgorithmOID,
        num_signatures=req.numSignatures,
    )


@routes.post("/auth/fido2/authenticate/begin")
async def authenticate_begin(request: web.Request) -> web.Response:
    req = await parse(request, AuthenticateBeginRequest)
    caller, approval = await begin_args(
        request, req, relayed="FIDO2 authentication is relayed by facility client certificates"
    )
    options = await request.app[FIDO2].authenticate_begin(caller=caller, approval=approval)
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
async def enroll_page(request: web.Request) -> web.StreamResponse:
    """The portal's enrolment page (one page, one script), at the address signers are given."""
    return await portal_pages.enrol_page(request)


@routes.get("/approve")
async def approve_page(request: web.Request) -> web.Response:
    return _page("approve.html")
