"""``POST /verify``: verify a signed document (CAdES, XAdES incl. the e-prescription, PAdES).

Behind mTLS like every route. Body: JSON ``{"document": base64, "content": base64?}``
(``content`` for detached signatures). Answer: 200 with the ETSI EN 319 102-1 report whatever
the indication; 400 only for a malformed request, 413 over the size limit. Garbage to verify is
a TOTAL-FAILED / FORMAT_FAILURE report, never a 500.

The work runs in worker processes (``gateway.verify.pool``), never on the event loop: 503 with
Retry-After when all verification slots of this worker are busy or the wall-clock limit passed.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web
from pydantic import Field, field_validator

from gateway.api.keys import SETTINGS, VERIFY_POOL
from gateway.api.middleware import identity
from gateway.api.schema import CscRequest, parse
from gateway.errors import PayloadTooLarge

routes = web.RouteTableDef()


def _decode(v: str, what: str) -> bytes:
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not valid base64") from e


class VerifyRequest(CscRequest):
    document: str = Field(min_length=1)
    content: str | None = None

    @field_validator("document", "content")
    @classmethod
    def _base64(cls, v: str | None) -> str | None:
        if v is not None:
            _decode(v, "value")
        return v


@routes.post("/verify")
async def verify(request: web.Request) -> web.Response:
    identity(request)
    body = await parse(request, VerifyRequest)
    limit = request.app[SETTINGS].signing.max_document_bytes
    document = _decode(body.document, "document")
    content = _decode(body.content, "content") if body.content is not None else None
    for what, data in (("document", document), ("content", content or b"")):
        if len(data) > limit:
            raise PayloadTooLarge(f"{what} of {len(data)} bytes is over the limit of {limit}")
    report = await request.app[VERIFY_POOL].verify(document, content)
    return web.json_response(report.to_json_dict())
