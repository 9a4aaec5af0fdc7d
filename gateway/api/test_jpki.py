"""Sandbox only: the TEST JPKI CA's OCSP responder (``POST /ocsp``) and CRL (``GET /crl``).

Runs in the TEST TSA's process (``serve`` starts it; alone: ``hpki-gateway sandbox tsa``).
The CRL file is read on every request, so revoking a sandbox card (rewriting the CRL) shows at
once in both answers.
"""

from __future__ import annotations

import logging

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.api.test_ocsp import OCSP_PATH, RESPONDER, SandboxOcspResponder
from gateway.config import Settings
from gateway.errors import ConfigError

log = logging.getLogger("gateway.test_jpki")
CRL_PATH = "/crl"
_CRL_FILE = web.AppKey("crl_file", str)


async def _ocsp(request: web.Request) -> web.Response:
    if request.content_type != "application/ocsp-request":
        return web.Response(status=415, text="expected application/ocsp-request")
    der = request.app[RESPONDER].respond(await request.read())
    return web.Response(body=der, content_type="application/ocsp-response")


async def _crl(request: web.Request) -> web.Response:
    with open(request.app[_CRL_FILE], "rb") as f:  # noqa: ASYNC230 - a few KiB, test only
        body = f.read()
    return web.Response(body=body, content_type="application/pkix-crl")


def create_test_jpki_app(settings: Settings) -> web.Application:
    t = settings.test_jpki
    if t.ca_cert is None or t.ocsp_cert is None or t.ocsp_key is None or t.crl_file is None:
        raise ConfigError("test_jpki needs ca_cert, ocsp_cert, ocsp_key and crl_file")
    key = load_pem_private_key(t.ocsp_key.read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("test_jpki.ocsp_key must be an RSA key")
    responder = SandboxOcspResponder(
        ca_cert=x509.load_pem_x509_certificate(t.ca_cert.read_bytes()),
        signer_cert=x509.load_pem_x509_certificate(t.ocsp_cert.read_bytes()),
        signer_key=key,
        crl_files=[t.crl_file],
    )
    app = web.Application(client_max_size=16 * 1024)
    app[RESPONDER] = responder
    app[_CRL_FILE] = str(t.crl_file)
    app.router.add_post(OCSP_PATH, _ocsp)
    app.router.add_get(CRL_PATH, _crl)
    return app


async def start_test_jpki(settings: Settings) -> web.AppRunner:
    runner = web.AppRunner(create_test_jpki_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, settings.test_jpki.host, settings.test_jpki.port).start()
    log.info("TEST JPKI OCSP/CRL on http://%s:%d", settings.test_jpki.host, settings.test_jpki.port)
    return runner
