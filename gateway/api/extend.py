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

from aiohttp import web
from pydantic import Field, field_validator

from gateway.api.keys import AUDIT, DB, SETTINGS, SIGNING
from gateway.api.middleware import identity
from gateway.api.schema import CscRequest, parse
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.sign.extend import TARGETS, extend_document

__all__ = ["routes"]

routes = web.RouteTableDef()


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
    signing = request.app[SIGNING]
    tsa = signing.tsa
    if tsa is None:
        raise InvalidRequest("extending needs a timestamp authority, and none is configured")
    result = await extend_document(
        document,
        body.level,
        tsa=tsa,
        source=signing.policy.long_term,
        renew=body.renew,
        max_depth=settings.signing.max_xml_depth,
        clock=signing.clock,
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
