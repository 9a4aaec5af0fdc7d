"""The sandbox's CA certificates over HTTP, at the URLs its certificates' AIA names.

RFC 5280 §4.2.2.1: an ``id-ad-caIssuers`` HTTP URI points at the issuer's certificate in DER
(``application/pkix-cert``). ``serve`` publishes each CA certificate of the test world's
``pki/`` directory at ``GET /ca/<name>.cer`` on the TEST TSA's listener, beside the CRLs and the
OCSP responder, so an outside verifier given only a signer certificate can build its path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import Settings

__all__ = ["CA_PATH", "add_ca_routes", "ca_certificates", "ca_issuers_url"]

log = logging.getLogger("gateway.sandbox.publish")
CA_PATH = "/ca"
_CA_FILES: web.AppKey[dict[str, bytes]] = web.AppKey("ca_files")


def ca_issuers_url(base_url: str, name: str) -> str:
    """Where ``serve`` publishes the CA certificate ``pki/<name>.pem``."""
    return f"{base_url}{CA_PATH}/{name}.cer"


def ca_certificates(pki_dir: Path) -> dict[str, bytes]:
    """``{"<name>.cer": DER}`` for every CA certificate (basicConstraints cA) in ``pki_dir``."""
    out: dict[str, bytes] = {}
    for path in sorted(pki_dir.glob("*.pem")):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (OSError, ValueError, x509.ExtensionNotFound):
            continue  # a key, a chain file, a leaf: not published
        if is_ca:
            out[f"{path.stem}.cer"] = cert.public_bytes(serialization.Encoding.DER)
    return out


async def _ca(request: web.Request) -> web.Response:
    der = request.app[_CA_FILES].get(request.match_info["name"])
    if der is None:
        raise web.HTTPNotFound()
    return web.Response(body=der, content_type="application/pkix-cert")


def add_ca_routes(app: web.Application, settings: Settings) -> None:
    """``GET /ca/<name>.cer`` on ``app`` (the TEST TSA's listener), in a sandbox only."""
    pki = settings.pki
    if not settings.service.sandbox or pki.test_ca_cert is None:
        return
    files = ca_certificates(pki.test_ca_cert.parent)
    app[_CA_FILES] = files
    app.router.add_get(CA_PATH + "/{name}", _ca)
    log.info("TEST CA certificates at %s/: %s", CA_PATH, ", ".join(files))
