"""``POST /extend``: raise a signed XAdES document (e-prescription, dispensing result, generic
XAdES) to ES-T / ES-XL / ES-A, or renew its ES-A, without touching the signer's signature.

Behind mTLS like every route. Body: ``{"document": base64, "level": "AdES-B-LTA",
"renew": false}``. Answer: ``{"document": base64, "changes": [{"signature", "from", "to"}]}``.
Audited as ``signature.extend`` (digests before and after). A TSA or CRL server that is down
gives 503 with Retry-After: nothing is returned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import AsyncIterator

from aiohttp import web
from pydantic import Field, field_validator

from gateway.api.keys import AUDIT, DB, SETTINGS
from gateway.api.middleware import identity
from gateway.api.schema import CscRequest, parse
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.sign.extend import TARGETS, extend_document
from gateway.sign.setup import signing_policy, tsa_client
from gateway.sign.timestamp import Rfc3161Client
from gateway.sign.xades_ltv import LongTermSource

__all__ = ["setup"]

routes = web.RouteTableDef()
_TSA = web.AppKey("extend_tsa", Rfc3161Client)
_SOURCE = web.AppKey("extend_source", LongTermSource)


class ExtendRequest(CscRequest):
    document: str = Field(min_length=1)
    level: str = Field(min_length=1, max_length=20)
    renew: bool = False

    @field_validator("document")
    @classmethod
    def _base64(cls, v: str) -> str:
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError("document is not valid base64") from e
        return v

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v not in TARGETS:
            raise ValueError("level must be AdES-B-T, AdES-B-LT or AdES-B-LTA")
        return v


@routes.post("/extend")
async def extend(request: web.Request) -> web.Response:
    caller = identity(request)
    body = await parse(request, ExtendRequest)
    settings = request.app[SETTINGS]
    document = base64.b64decode(body.document)
    limit = settings.signing.max_document_bytes
    if len(document) > limit:
        raise PayloadTooLarge(f"document of {len(document)} bytes is over the limit of {limit}")
    tsa = request.app.get(_TSA)
    if tsa is None:
        raise InvalidRequest("extending needs a timestamp authority, and none is configured")
    result = await extend_document(
        document,
        body.level,
        tsa=tsa,
        source=request.app[_SOURCE],
        renew=body.renew,
        max_depth=settings.signing.max_xml_depth,
    )
    async with request.app[DB].write() as conn:
        await request.app[AUDIT].append(
            conn,
            action="signature.extend",
            actor=caller.actor,
            facility_code=caller.institution_code,
            detail={
                "level": body.level,
                "renew": body.renew,
                "document_sha256": hashlib.sha256(document).hexdigest(),
                "extended_sha256": hashlib.sha256(result.document).hexdigest(),
                "changes": [list(c) for c in result.changes],
            },
        )
    return web.json_response(
        {
            "document": base64.b64encode(result.document).decode("ascii"),
            "changes": [{"signature": s, "from": a, "to": b} for s, a, b in result.changes],
        }
    )


def setup(app: web.Application) -> None:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        client = tsa_client(settings)
        if client is not None:
            app[_TSA] = client
        app[_SOURCE] = signing_policy(settings).long_term
        yield
        if client is not None:
            await client.close()

    app.cleanup_ctx.append(ctx)
    app.add_routes(routes)
