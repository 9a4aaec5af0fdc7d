"""Middlewares: request id + error rendering (outermost), then mTLS identity (every route).

Order matters: the error middleware wraps everything so that even an identity failure or an
unknown route answers in the right error format; the identity middleware runs before routing
results are used, so no route, not even a 404, is reachable without an active client
certificate.

Who may call what is decided here, by path, for every route at once: ``/admin/`` needs an
administrator's certificate, ``/csc/``, ``/facility/`` and EST (``/.well-known/est/``) a
facility's, and ``/vendor/`` a vendor's (which reaches nothing else). Every response to a
facility whose certificate expires within ``certificates.expiry_header_days`` carries
``X-Client-Certificate-Expires: <JST date>; days-left=<n>``, so a facility system can warn its
users long before the certificate stops prescriptions.
"""

from __future__ import annotations

import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.api import errors, schema
from gateway.api.keys import ALLOWED_ORIGINS, CLOCK, DB, METRICS, REFUSALS, SETTINGS
from gateway.api.limits import RateLimited
from gateway.api.schema import UnreadableBody
from gateway.auth.mtls import ClientIdentity, identify
from gateway.clock import days_left, jst_date
from gateway.errors import AccessDenied, GatewayError, PayloadTooLarge, UnsupportedMediaType
from gateway.logs import request_id_var, where_raised

log = logging.getLogger("gateway.api")
access_log = logging.getLogger("gateway.access")

IDENTITY = web.RequestKey("identity", ClientIdentity)  # the caller, set by client_identity
EXPIRY_HEADER = "X-Client-Certificate-Expires"
EST_PREFIX = "/.well-known/est/"
_CLIENT_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = secrets.token_hex(8)
    request[errors.REQUEST_ID] = rid
    token = request_id_var.set(rid)
    started = time.perf_counter()
    status = 500
    try:
        try:
            max_size = request.app[SETTINGS].server.max_body_bytes
            if request.content_length is not None and request.content_length > max_size:
                raise PayloadTooLarge(
                    f"request body of {request.content_length} bytes is over the limit "
                    f"of {max_size} bytes"
                )
            response = await handler(request)
        except GatewayError as e:
            if isinstance(e, RateLimited | UnreadableBody) and REFUSALS in request.app:
                ident_ = request.get(IDENTITY)
                request.app[REFUSALS].count(
                    e.code if isinstance(e, RateLimited) else "unreadable_body",
                    actor=ident_.actor if ident_ else f"ip:{request.remote}",
                    facility_code=ident_.institution_code if ident_ else None,
                )
            if isinstance(e, RateLimited) and METRICS in request.app:
                request.app[METRICS].rate_limited.labels(e.limit).inc()
            if e.status >= 500:
                log.warning("%s: %s", e.code, e.logged)
            response = errors.from_gateway_error(request, e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = errors.from_http_exception(request, e)
        except Exception as e:  # noqa: BLE001 - the last resort: a 500, never a crash
            # No stack trace in the log (it may carry request data): the type, the message's
            # first line and where it was raised are enough to find the fault.
            where = where_raised(e.__traceback__)
            log.error(
                "unhandled %s on %s %s at %s: %s",
                type(e).__name__,
                request.method,
                request.path,
                where,
                str(e).splitlines()[0][:200] if str(e) else "",
            )
            response = errors.internal(request)
        response.headers["X-Request-ID"] = rid
        _hardening_headers(response)
        _expiry_header(request, response)
        client_rid = request.headers.get("X-Request-ID", "")
        if client_rid and _CLIENT_RID.match(client_rid):
            response.headers["X-Client-Request-ID"] = client_rid
        status = response.status
        return response
    finally:
        ident: ClientIdentity | None = request.get(IDENTITY)
        access_log.info(
            "%s %s %s",
            request.method,
            request.path,
            status,
            extra={
                "status": status,
                "client": ident.actor if ident else None,
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        request_id_var.reset(token)


#: Every answer of the mTLS listener: browsers do not guess a type other than the one
#: declared (an error's JSON that repeats a path is never run as HTML), and keep no copy of
#: an error (it may name a certificate or a facility). No HSTS here: a sandbox on
#: ``localhost`` would pin every other local service of the tester's browser to HTTPS.
_ALWAYS = {"X-Content-Type-Options": "nosniff"}


def _hardening_headers(response: web.StreamResponse) -> None:
    if response.prepared:  # a streamed answer sent its headers already (set by its handler)
        return
    for name, value in _ALWAYS.items():
        response.headers.setdefault(name, value)
    if response.status >= 400:
        response.headers.setdefault("Cache-Control", "no-store")


def _expiry_header(request: web.Request, response: web.StreamResponse) -> None:
    ident = request.get(IDENTITY)
    if not isinstance(ident, ClientIdentity) or ident.kind != "facility":
        return
    if CLOCK not in request.app or response.prepared:
        return
    now = request.app[CLOCK]()
    left = days_left(ident.not_after, now)
    if left <= request.app[SETTINGS].certificates.expiry_header_days:
        response.headers[EXPIRY_HEADER] = (
            f"{jst_date(ident.not_after).isoformat()}; days-left={left}"
        )


def peer_certificate(request: web.Request) -> bytes | None:
    transport = request.transport
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der or None


@web.middleware
async def client_identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    der = peer_certificate(request)
    if der is None:
        # Unreachable behind the TLS listener (CERT_REQUIRED); refuse rather than trust.
        raise AccessDenied("a client certificate is required")
    ident = await identify(request.app[DB], der, now=request.app[CLOCK]())
    request[IDENTITY] = ident
    path = request.path
    if (path == "/admin" or path.startswith("/admin/")) and ident.kind != "admin":
        raise AccessDenied("the admin API needs an administrator's client certificate")
    if path.startswith("/csc/") and ident.kind != "facility":
        raise AccessDenied(
            "CSC methods are for facility client certificates; administrators use /admin/"
        )
    if path.startswith(("/facility/", EST_PREFIX)) and ident.kind != "facility":
        raise AccessDenied(
            "/facility/ and EST (/.well-known/est/) are for facility client certificates"
        )
    if (path == "/vendor" or path.startswith("/vendor/")) != (ident.kind == "vendor"):
        raise AccessDenied(
            "a vendor's client certificate is for the vendor API (/vendor/) only"
            if ident.kind == "vendor"
            else "the vendor API needs a vendor's client certificate"
        )
    return await handler(request)


_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def own_origins(request: web.Request) -> frozenset[str]:
    """The origins a browser request to this listener may come from: the request's own
    (scheme://Host, which the browser sets), ``server.public_url`` and the WebAuthn origins."""
    allowed = request.app.get(ALLOWED_ORIGINS)
    if allowed is None:
        allowed = request.app[SETTINGS].webauthn_origins()
    return frozenset({*allowed, f"{request.scheme}://{request.host}"})


@web.middleware
async def browser_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Cross-site request forgery guard for every state-changing request on the main listener.

    A browser holding a facility or admin certificate presents it to any site that makes it
    send a request here; such a request is refused when the browser marks it cross-site
    (``Sec-Fetch-Site``) or names a foreign ``Origin`` (403), and a body in any other type than
    ``application/json`` (which a cross-site form or no-cors fetch cannot send) is 415. Under
    ``/admin/`` a request the browser marks cross-site is 403 whatever its method: GETs there
    are audited (a password notice fetched, a statement made), and a cross-site ``<img>`` or
    link must not write records in the administrator's name. Any other cross-site request that
    is not a navigation (a subresource or fetch of another site's page) is 403 too.
    """
    cross_site = request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site"
    if cross_site and (request.path == "/admin" or request.path.startswith("/admin/")):
        # Some admin GETs write an audit record (a password notice fetched, a statement made):
        # an <img> on any page must not make an administrator's browser write one.
        raise AccessDenied("cross-site requests are refused")
    if cross_site and request.headers.get("Sec-Fetch-Mode", "").lower() not in ("", "navigate"):
        # A cross-site page's <script>, <img>, <link> or fetch: nothing here is a resource for
        # other sites, and its load/error events would tell that page the status (which
        # client-<code>.p12 the browser's certificate may download, whether it is an admin's).
        # A link or a typed address (mode navigate) still opens the portal.
        raise AccessDenied("cross-site requests are refused")
    if request.method in _UNSAFE:
        if cross_site:
            raise AccessDenied("cross-site requests are refused")
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in own_origins(request):
            raise AccessDenied(f"requests from origin {origin[:100]!r} are refused")
        if _portal_form(request, origin):
            return await handler(request)
        if request.content_type != "application/json" and not (
            # EST (RFC 7030) takes a PKCS#10 body: a type no cross-site form or no-cors fetch
            # can send, so the guard's reason for insisting on JSON holds for it too.
            request.path.startswith(EST_PREFIX) and request.content_type == "application/pkcs10"
        ):
            # Quoted (repr): the header may hold anything, even bytes that are not UTF-8
            # (aiohttp hands them over as surrogates, which no response body can carry).
            given = request.headers.get("Content-Type")
            shown = "none" if given is None else repr(given[:100])
            raise UnsupportedMediaType(
                f"request bodies must be JSON sent as Content-Type: application/json (got {shown})"
            )
        # Every JSON body is parsed here, once, whether or not the route reads it: one that no
        # parser should take (too deep, a number too long, not JSON) is 400 on every route.
        if request.content_type == "application/json":
            await schema.read_json(request)
    return await handler(request)


def _portal_form(request: web.Request, origin: str | None) -> bool:
    """A portal form (file uploads need multipart) is accepted only when the browser names
    this listener as its Origin: every browser sends Origin on a form POST, and a cross-site
    page cannot forge it."""
    return (
        request.path.startswith("/portal/")
        and request.content_type == "multipart/form-data"
        and origin is not None
        and origin.rstrip("/") in own_origins(request)
    )


def identity(request: web.Request) -> ClientIdentity:
    ident = request.get(IDENTITY)
    if not isinstance(ident, ClientIdentity):
        raise AccessDenied("a client certificate is required")
    return ident
