"""The sandbox's TEST timestamp authority: RFC 3161 over plain HTTP on 127.0.0.1.

``hpki-gateway serve`` starts it next to the gateway when ``[test_tsa] enabled = true`` (the
sandbox sets that up), and ``hpki-gateway sandbox tsa`` runs it alone. Tokens are made by
pyHanko's ``DummyTimeStamper`` (a library TSA core) with the TEST TSA key from the test world:
nothing here is fit for production, and ``create_tsa_app`` refuses to run outside a sandbox.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from asn1crypto import keys, tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pyhanko.sign.timestamps.dummy_client import DummyTimeStamper

from gateway.clock import Clock, system_clock
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.scenario_file import ocsp_scenario

log = logging.getLogger("gateway.test_tsa")
MAX_REQUEST_BYTES = 16 * 1024
TSA_PATH = "/tsa"
#: The sandbox's CRLs, published by file name (the distribution points of its certificates).
CRL_PATH = "/crl"


class _KeptKeyTimeStamper(DummyTimeStamper):
    """pyHanko's DummyTimeStamper with its key parsed once.

    Why the override: DummyTimeStamper parses (and so validates, ~47 ms for RSA-2048) its
    private key again for every token, which made the TEST TSA, not the network, the limit of
    every ES-T benchmark. The signed attributes are pyHanko's own (same helpers, same order).
    """

    def __init__(self, *, key: rsa.RSAPrivateKey, **kw: Any) -> None:
        super().__init__(**kw)
        self._key = key

    def _sign_tst_info(
        self, tst_info_data: bytes, md_algorithm: str, dt: datetime.datetime
    ) -> tuple[bytes, Any]:
        from asn1crypto import cms, core
        from pyhanko.sign import general

        algorithm = _HASHES[md_algorithm.lower()]()
        md = hashes.Hash(algorithm)
        md.update(tst_info_data)

        def attr(kind: str, value: Any) -> Any:
            return cms.CMSAttribute({"type": kind, "values": [value]})

        signed_attrs = cms.CMSAttributes(
            [
                attr("content_type", "tst_info"),
                attr("signing_time", cms.Time({"utc_time": core.UTCTime(dt)})),
                attr("signing_certificate", general.as_signing_certificate(self.tsa_cert)),
                attr("message_digest", md.finalize()),
            ]
        )
        signature = self._key.sign(signed_attrs.dump(), padding.PKCS1v15(), algorithm)
        return signature, signed_attrs


#: The imprint algorithms pyHanko's stamper answers with (it signs with the request's own).
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,  # a client's choice in a TEST TSA, as pyHanko allows it
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


STAMPER = web.AppKey("stamper", DummyTimeStamper)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")


def _load(settings: Settings) -> DummyTimeStamper:
    t = settings.test_tsa
    if not settings.service.sandbox:
        raise ConfigError("test_tsa is only allowed when service.sandbox = true")
    if t.cert is None or t.key is None:
        raise ConfigError("test_tsa.cert and test_tsa.key are required")
    try:
        cert = x509.load_pem_x509_certificate(t.cert.read_bytes())
        key = serialization.load_pem_private_key(t.key.read_bytes(), password=None)
        chain = [c for p in t.chain for c in x509.load_pem_x509_certificates(Path(p).read_bytes())]
    except (OSError, ValueError) as e:
        raise ConfigError(f"test_tsa: cannot load the TSA certificate or key: {e}") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("test_tsa.key must be an RSA key")
    return make_stamper(cert, key, chain)


def make_stamper(
    cert: x509.Certificate, key: rsa.RSAPrivateKey, chain: Sequence[x509.Certificate] = ()
) -> DummyTimeStamper:
    """A TEST TSA signer: ``cert`` (EKU timeStamping) and its key, ``chain`` embedded."""
    der_key = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    def a(c: x509.Certificate) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER))

    return _KeptKeyTimeStamper(
        key=key,
        tsa_cert=a(cert),
        tsa_key=keys.PrivateKeyInfo.load(der_key),
        certs_to_embed=[a(c) for c in chain],
    )


def add_stamp_route(
    app: web.Application, stamper: DummyTimeStamper, *, clock: Clock = system_clock
) -> None:
    """POST /tsa: RFC 3161 time-stamp requests answered by ``stamper``."""
    app[STAMPER] = stamper
    app[CLOCK] = clock
    app.router.add_post(TSA_PATH, _stamp)


async def _stamp(request: web.Request) -> web.Response:
    if request.content_type != "application/timestamp-query":
        return web.Response(status=415, text="expected application/timestamp-query")
    body = await request.read()
    try:
        req = tsp.TimeStampReq.load(body, strict=True)
        req.native  # noqa: B018 - parse fully: a malformed request fails here
    except (ValueError, TypeError, KeyError):
        status = tsp.PKIStatusInfo({"status": "rejection", "fail_info": {"bad_data_format"}})
        return _reply(tsp.TimeStampResp({"status": status}).dump())
    stamper = request.app[STAMPER]
    # DummyTimeStamper stamps with its fixed_dt or the local time; give it UTC now.
    stamper.fixed_dt = request.app[CLOCK]()
    resp = await stamper.async_request_tsa_response(req)
    return _reply(resp.dump())


def _reply(der: bytes) -> web.Response:
    return web.Response(body=der, content_type="application/timestamp-reply")


CRL_FILES: web.AppKey[dict[str, Path]] = web.AppKey("crl_files")


async def _crl(request: web.Request) -> web.Response:
    path = request.app[CRL_FILES].get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    # Read on every request: the sandbox rewrites a CRL when it revokes.
    return web.Response(body=path.read_bytes(), content_type="application/pkix-crl")


def create_tsa_app(settings: Settings, *, clock: Clock = system_clock) -> web.Application:
    """The TEST TSA; in a sandbox also its CRLs (GET /crl/<file>) and the TEST OCSP responder
    of the HPKI signing CA (POST /ocsp), the URLs its certificates name."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    add_stamp_route(app, _load(settings), clock=clock)
    pki = settings.pki
    crls = [*pki.crl_files, *([pki.facility_crl] if pki.facility_crl else [])]
    if settings.service.sandbox and pki.test_ca_cert is not None:
        crls += sorted(pki.test_ca_cert.parent.glob("*.crl"))  # every CRL of the test world
    app[CRL_FILES] = {p.name: p for p in crls}
    app.router.add_get(CRL_PATH + "/{name}", _crl)
    if settings.service.sandbox and pki.test_ca_cert is not None and pki.test_ca_key is not None:
        from gateway.sandbox.ocsp import OCSP_PATH, SandboxOcspResponder, add_ocsp_route

        ca = x509.load_pem_x509_certificate(pki.test_ca_cert.read_bytes())
        key = serialization.load_pem_private_key(pki.test_ca_key.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError("pki.test_ca_key must be an RSA key")
        responder = SandboxOcspResponder(
            ca_cert=ca,
            signer_cert=ca,
            signer_key=key,
            crl_files=[p for p in pki.crl_files if p.stem == pki.test_ca_cert.stem],
            clock=clock,
            override=lambda serial: ocsp_scenario(settings, serial),
        )
        add_ocsp_route(app, responder)
        log.info("TEST OCSP responder at %s, CRLs at %s/", OCSP_PATH, CRL_PATH)
        from gateway.sandbox.publish import add_ca_routes

        add_ca_routes(app, settings)
    return app


async def start_test_tsa(settings: Settings, *, reuse_port: bool = False) -> web.AppRunner:
    """Start the test TSA listener; the caller cleans the runner up."""
    runner = web.AppRunner(create_tsa_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.test_tsa.host, settings.test_tsa.port, reuse_port=reuse_port
    )
    await site.start()
    log.info(
        "TEST TSA listening on http://%s:%d%s",
        settings.test_tsa.host,
        settings.test_tsa.port,
        TSA_PATH,
    )
    return runner


#: How long a starting TSA waits for its port to be free (a predecessor that is dying with its
#: parent releases it within moments).
BIND_WAIT_SECONDS = 5.0


async def run_forever(settings: Settings, *, ready: Callable[[], None] | None = None) -> int:
    """Serve until cancelled. A port held by someone else past ``BIND_WAIT_SECONDS`` is one
    error line and exit 1, not a traceback."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BIND_WAIT_SECONDS
    from gateway.sandbox.jpki import start_test_jpki

    while True:
        try:
            runner = await start_test_tsa(settings)
            break
        except OSError as e:
            if loop.time() >= deadline:
                log.error(
                    "TEST TSA cannot listen on %s:%d: %s",
                    settings.test_tsa.host,
                    settings.test_tsa.port,
                    e.strerror or e,
                )
                return 1
            await asyncio.sleep(0.2)
    jpki = await start_test_jpki(settings) if settings.test_jpki.enabled else None
    if ready is not None:
        ready()
    try:
        await asyncio.Event().wait()
    finally:
        if jpki is not None:
            await jpki.cleanup()
        await runner.cleanup()
    return 0
