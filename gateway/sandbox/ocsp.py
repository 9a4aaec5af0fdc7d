"""A TEST OCSP responder for the test world: RFC 6960 over plain HTTP, loopback only.

It answers for one TEST HPKI signing CA from that CA's revocation state, its CRL file(s), read
again on every request (the sandbox rewrites them): a serial the CA lists is ``revoked``, any
other serial of this CA is ``good``, a certificate of another issuer is ``unknown``. The
response is signed by the CA itself or by a delegated responder certificate
(:func:`gateway.sandbox.testworld.issue_ocsp_responder_cert`) and echoes the request's nonce.
Nothing here is fit for production: the keys are software keys of the test world.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp

from gateway.clock import Clock, system_clock
from gateway.pki.crl import load_crl

__all__ = ["OCSP_PATH", "SandboxOcspResponder", "add_ocsp_route", "create_ocsp_app"]

log = logging.getLogger("gateway.test_ocsp")
MAX_REQUEST_BYTES = 16 * 1024
OCSP_PATH = "/ocsp"


class SandboxOcspResponder:
    """Builds OCSP responses for ``ca_cert`` from the CRL files of that CA."""

    def __init__(
        self,
        *,
        ca_cert: x509.Certificate,
        signer_cert: x509.Certificate,
        signer_key: rsa.RSAPrivateKey,
        crl_files: Sequence[Path],
        validity: dt.timedelta = dt.timedelta(hours=1),
        clock: Clock = system_clock,
        override: Callable[[int], str | None] | None = None,
    ) -> None:
        self.ca_cert = ca_cert
        self.signer_cert = signer_cert
        self.signer_key = signer_key
        self.crl_files = list(crl_files)
        self.validity = validity
        self.clock = clock
        #: The sandbox's failure scenarios: a serial answered "revoked" or "unknown" whatever
        #: the CRL says (None: the CRL decides).
        self.override = override

    def _ca_hashes(self, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
        h = hashes.Hash(algorithm)
        h.update(self.ca_cert.subject.public_bytes())
        name_hash = h.finalize()
        # The key hash is over the CA's subjectPublicKey bits: let the library compute it.
        probe = ocsp.OCSPRequestBuilder().add_certificate(self.ca_cert, self.ca_cert, algorithm)
        return name_hash, probe.build().issuer_key_hash

    def _revoked(self, serial: int) -> x509.RevokedCertificate | None:
        public = self.ca_cert.public_key()
        for path in self.crl_files:
            try:
                crl = load_crl(path.read_bytes())
            except (OSError, ValueError) as e:
                log.warning("TEST OCSP: cannot read CRL %s: %s", path, type(e).__name__)
                continue
            if crl.issuer != self.ca_cert.subject:
                continue
            if not isinstance(public, rsa.RSAPublicKey) or not crl.is_signature_valid(public):
                continue
            entry = crl.get_revoked_certificate_by_serial_number(serial)
            if entry is not None:
                return entry
        return None

    def respond(self, der: bytes) -> bytes:
        try:
            req = ocsp.load_der_ocsp_request(der)
            algorithm = req.hash_algorithm
            serial = req.serial_number
            name_hash, key_hash = req.issuer_name_hash, req.issuer_key_hash
        except (ValueError, TypeError, NotImplementedError):
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.MALFORMED_REQUEST
            ).public_bytes(serialization.Encoding.DER)
        now = self.clock().replace(microsecond=0)
        status = ocsp.OCSPCertStatus.UNKNOWN
        revoked_at: dt.datetime | None = None
        reason: x509.ReasonFlags | None = None
        forced = self.override(serial) if self.override is not None else None
        if forced == "revoked" and (name_hash, key_hash) == self._ca_hashes(algorithm):
            status = ocsp.OCSPCertStatus.REVOKED
            revoked_at = now - dt.timedelta(minutes=1)
            reason = x509.ReasonFlags.key_compromise
        elif forced == "unknown":
            pass  # stays UNKNOWN
        elif (name_hash, key_hash) == self._ca_hashes(algorithm):
            entry = self._revoked(serial)
            if entry is None:
                status = ocsp.OCSPCertStatus.GOOD
            else:
                status = ocsp.OCSPCertStatus.REVOKED
                revoked_at = entry.revocation_date_utc
                try:
                    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
                except x509.ExtensionNotFound:
                    reason = None
        # One line per answer: a tester (and the tests) can see which verifier asked what.
        log.info("TEST OCSP: serial %X answered %s", serial, status.name.lower())
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=name_hash,
                issuer_key_hash=key_hash,
                serial_number=serial,
                algorithm=algorithm,
                cert_status=status,
                this_update=now,
                next_update=now + self.validity,
                revocation_time=revoked_at,
                revocation_reason=reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, self.signer_cert)
        )
        if self.signer_cert != self.ca_cert:
            builder = builder.certificates([self.signer_cert])
        try:
            nonce = req.extensions.get_extension_for_class(x509.OCSPNonce).value
            builder = builder.add_extension(nonce, critical=False)
        except x509.ExtensionNotFound:
            pass
        return builder.sign(self.signer_key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER
        )


RESPONDER = web.AppKey("responder", SandboxOcspResponder)


async def _answer(request: web.Request) -> web.Response:
    if request.content_type != "application/ocsp-request":
        return web.Response(status=415, text="expected application/ocsp-request")
    body = await request.read()
    der = request.app[RESPONDER].respond(body)
    return web.Response(body=der, content_type="application/ocsp-response")


def create_ocsp_app(responder: SandboxOcspResponder) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    add_ocsp_route(app, responder)
    return app


async def _answer_get(request: web.Request) -> web.Response:
    """RFC 6960 A.1.1: GET {url}/{url-encoded base64 of the DER request} (NSS, e.g. pdfsig,
    asks this way for small requests)."""
    import base64
    import binascii
    from urllib.parse import unquote

    try:
        body = base64.b64decode(unquote(request.match_info["request"]), validate=True)
    except (binascii.Error, ValueError):
        return web.Response(status=400, text="not a base64 OCSP request")
    der = request.app[RESPONDER].respond(body)
    return web.Response(body=der, content_type="application/ocsp-response")


def add_ocsp_route(app: web.Application, responder: SandboxOcspResponder) -> None:
    """Answer OCSP at ``OCSP_PATH`` of ``app`` (the TEST TSA's listener in a sandbox)."""
    app[RESPONDER] = responder
    app.router.add_post(OCSP_PATH, _answer)
    app.router.add_get(OCSP_PATH + "/{request:.+}", _answer_get)
