"""My Number card (JPKI) ceremony endpoints (``/auth/jpki/...``) and the admin links.

Behind mTLS like every route: a facility relays the doctor's card (begin, enrolment); the
admin API links a card after an identity check. Errors are RFC 9457 problem+json.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web
from pydantic import Field

from gateway.api.admin import AdminRequest
from gateway.api.auth import AuthenticateBeginRequest, begin_args
from gateway.api.decode import caller_of
from gateway.api.keys import DB, JPKI, SETTINGS
from gateway.api.middleware import identity
from gateway.api.schema import CscRequest, Label, parse
from gateway.auth.jpki import AUTH_DATA_ID, parse_auth_data
from gateway.auth.presence import registered_methods
from gateway.errors import InvalidRequest, NotFound

routes = web.RouteTableDef()


class JpkiAbort(CscRequest):
    challenge_id: str = Field(min_length=1, max_length=128)
    reason: str = Field(pattern=r"^[a-z_]{1,40}$")
    """The card client's error code (``pin_blocked``, ``card_removed``, ...)."""


class JpkiRegisterBegin(CscRequest):
    enrollment_code: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=128)


class JpkiRegisterComplete(CscRequest):
    enrollment_code: str = Field(min_length=1, max_length=64)
    certificate: str = Field(min_length=1, max_length=16384)
    signature: str = Field(min_length=1, max_length=2048)
    challenge_id: str = Field(min_length=1, max_length=128)
    label: Label | None = None


class LinkJpki(AdminRequest):
    certificate: str = Field(min_length=1, max_length=24000)
    """base64 DER, or PEM text."""
    label: Label | None = None


def offered_presence_methods(request: web.Request) -> list[str]:
    """Signer presence methods this gateway offers (``/csc/v2/info`` ``presenceMethods``)."""
    return ["webauthn", *(["jpki"] if request.app[SETTINGS].jpki.enabled else [])]


async def presence_methods(request: web.Request, signer_id: str) -> list[str]:
    """Methods a credential of ``signer_id`` accepts now: offered AND registered for the
    signer (a FIDO2 authenticator; a linked My Number card)."""
    registered = await registered_methods(request.app[DB], signer_id)
    return [m for m in offered_presence_methods(request) if registered[m]]


def _enabled(request: web.Request) -> None:
    if not request.app[SETTINGS].jpki.enabled:
        raise NotFound("My Number card presence is disabled (jpki.enabled = false)")


@routes.post("/auth/jpki/authenticate/begin")
async def authenticate_begin(request: web.Request) -> web.Response:
    _enabled(request)
    req = await parse(request, AuthenticateBeginRequest)
    caller, approval = await begin_args(
        request, req, relayed="My Number card authentication is relayed by facility certificates"
    )
    out = await request.app[JPKI].authenticate_begin(caller=caller, approval=approval)
    return web.json_response(out)


@routes.post("/auth/jpki/abort")
async def abort(request: web.Request) -> web.Response:
    _enabled(request)
    req = await parse(request, JpkiAbort)
    await request.app[JPKI].abort(
        caller=caller_of(request), challenge_id=req.challenge_id, reason=f"card: {req.reason}"
    )
    return web.json_response({"status": "aborted"})


@routes.post("/auth/jpki/register/begin")
async def register_begin(request: web.Request) -> web.Response:
    _enabled(request)
    req = await parse(request, JpkiRegisterBegin)
    out = await request.app[JPKI].register_begin(
        code=req.enrollment_code, password=req.password, caller=caller_of(request)
    )
    return web.json_response(out)


@routes.post("/auth/jpki/register/complete")
async def register_complete(request: web.Request) -> web.Response:
    _enabled(request)
    req = await parse(request, JpkiRegisterComplete)
    auth = parse_auth_data(
        [
            {
                "id": AUTH_DATA_ID,
                "value": {
                    "certificate": req.certificate,
                    "signature": req.signature,
                    "challenge_id": req.challenge_id,
                },
            }
        ]
    )
    assert auth is not None
    link = await request.app[JPKI].register_complete(
        code=req.enrollment_code, authorization=auth, caller=caller_of(request), label=req.label
    )
    return web.json_response({"status": "linked", "link": link.to_json_dict()})


def _cert_bytes(text: str) -> bytes:
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode("ascii", "replace")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest("certificate: expected base64 DER or PEM text") from e


@routes.get("/admin/signers/{signer}/jpki")
async def list_links(request: web.Request) -> web.Response:
    links = await request.app[JPKI].list_links(request.match_info["signer"])
    return web.json_response({"links": [link.to_json_dict() for link in links]})


@routes.post("/admin/signers/{signer}/jpki")
async def link(request: web.Request) -> web.Response:
    body: Any = await parse(request, LinkJpki)
    made = await request.app[JPKI].link(
        request.match_info["signer"],
        _cert_bytes(body.certificate),
        actor=identity(request).actor,
        label=body.label,
    )
    return web.json_response({"status": "linked", "link": made.to_json_dict()}, status=201)


@routes.delete("/admin/signers/{signer}/jpki/{link}")
async def unlink(request: web.Request) -> web.Response:
    await request.app[JPKI].unlink(
        request.match_info["signer"], request.match_info["link"], actor=identity(request).actor
    )
    return web.json_response({"status": "unlinked"})
