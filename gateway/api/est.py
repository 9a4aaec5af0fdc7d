"""EST (RFC 7030) on the mTLS listener: a facility's own system renews its client certificate.

- ``GET /.well-known/est/cacerts``: the facility CA as a certs-only PKCS#7, base64 (§4.1.3);
- ``POST /.well-known/est/simplereenroll``: a base64 PKCS#10 request (``application/pkcs10``)
  made at the facility, authenticated by the facility's current, still valid certificate (the
  TLS client certificate, §3.3.2); the answer is the new certificate as a certs-only PKCS#7,
  base64 (§4.2.3).
The identity middleware already refused anything but an active facility certificate; the
lifecycle (``ClientCertificateService.renew_from_request``) decides the renewal window, the
request's checks and the overlap of the old certificate. Errors are problem+json like every
other route (RFC 7030 leaves the error body to the server, §4.2.3).
"""

from __future__ import annotations

import base64

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.api.keys import CERTIFICATES
from gateway.api.middleware import identity
from gateway.errors import AccessDenied, UnsupportedMediaType

routes = web.RouteTableDef()

PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"


def _certs_only(certs: list[x509.Certificate]) -> web.Response:
    der = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
    return web.Response(
        body=base64.encodebytes(der),
        headers={
            "Content-Type": PKCS7_CERTS_ONLY,
            "Content-Transfer-Encoding": "base64",
            "Cache-Control": "no-store",
        },
    )


@routes.get("/.well-known/est/cacerts")
async def cacerts(request: web.Request) -> web.Response:
    return _certs_only([request.app[CERTIFICATES].ca.cert])


@routes.post("/.well-known/est/simplereenroll")
async def simplereenroll(request: web.Request) -> web.Response:
    ident = identity(request)
    if ident.kind != "facility":
        raise AccessDenied("EST renewal is for facility client certificates")
    if request.content_type != "application/pkcs10":
        raise UnsupportedMediaType(
            "simplereenroll takes a base64 PKCS#10 request as Content-Type: application/pkcs10"
        )
    body = await request.read()
    cert, _ = await request.app[CERTIFICATES].renew_from_request(
        ident.certificate_serial,
        body,
        actor=ident.actor,
        facility_code=ident.institution_code,
    )
    return _certs_only([cert])
