"""Rendering errors: CSC JSON under /csc/, RFC 9457 problem+json elsewhere.

The one place errors become responses. Descriptions are the errors' own safe texts; causes and
stack traces go to the server log only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError

#: The request's id (set by api/middleware.py:request_context; echoed in every error body).
REQUEST_ID = web.RequestKey("request_id", str)

log = logging.getLogger("gateway.api")

_TITLES = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    423: "Locked",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

# HTTP errors raised by aiohttp itself, mapped to stable codes.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def render(
    request: web.Request,
    *,
    status: int,
    code: str,
    description: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    request_id = request.get(REQUEST_ID, "")
    hdrs = dict(headers or {})
    if request.path.startswith("/csc/"):
        body: dict[str, Any] = {"error": code, "error_description": description}
        content_type = "application/json"
    else:
        body = {
            "type": f"urn:hpki-gateway:error:{code}",
            "title": _TITLES.get(status, "Error"),
            "status": status,
            "detail": description,
            "instance": request.path,
            "code": code,
        }
        content_type = "application/problem+json"
    if request_id:
        body["request_id"] = request_id
    # A description may quote a header, where aiohttp decodes a byte that is not UTF-8 as a lone
    # surrogate (Content-Type: text/\xff -> 'text/\udcff'): UTF-8 cannot encode it, and the
    # error's own rendering was a 500. Such characters go out as their JSON escapes (\udcff);
    # every other text is the same bytes as before.
    return web.Response(
        status=status,
        body=json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace"),
        content_type=content_type,
        charset="utf-8",
        headers=hdrs,
    )


def from_gateway_error(request: web.Request, e: GatewayError) -> web.Response:
    return render(
        request, status=e.status, code=e.code, description=e.client_description, headers=e.headers
    )


def from_http_exception(request: web.Request, e: web.HTTPException) -> web.Response:
    status = e.status
    if status == 413:
        description = "request body is larger than the limit of this gateway"
    elif status == 404:
        description = f"no such endpoint: {request.method} {request.path}"
    elif status == 405:
        description = f"method {request.method} is not allowed on {request.path}"
    else:
        description = e.reason
    code = _HTTP_CODES.get(status, "invalid_request" if status < 500 else "server_error")
    if request.path.startswith("/csc/") and 400 <= status < 500 and status not in (403, 413):
        code = "invalid_request"
    headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
    return render(request, status=status, code=code, description=description, headers=headers)


def internal(request: web.Request) -> web.Response:
    return render(
        request,
        status=500,
        code="server_error",
        description="internal error; quote the request id to the operator",
    )
