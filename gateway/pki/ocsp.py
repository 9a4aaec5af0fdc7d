"""OCSP (RFC 6960) for certificates that name a responder in their AIA extension.

HPKI publishes CRLs and its certificates carry no AIA, so for them nothing here runs; a
certificate that does name an OCSP responder is asked there first (when OCSP is enabled), and
CRLs are the fallback (:func:`gateway.pki.revocation.revocation_status`).

The AIA URL comes from a certificate inside an untrusted document, so fetching is opt-in
(``[pki] ocsp``, CLI ``--ocsp``), happens only for certificates on a path already validated to a
trust anchor, and is restricted: ``http``/``https`` only, one POST with a total time-out, no
redirects followed, the response read up to :data:`MAX_RESPONSE_BYTES`.

A response counts only if:
- its status is ``successful`` and it holds a SingleResponse for exactly this certificate
  (serial, issuer name hash and issuer key hash);
- it is signed (SHA-256/384/512) by the issuing CA itself, or by a delegated responder
  certificate that the issuing CA signed directly, with the id-kp-OCSPSigning EKU, valid now,
  and named by the response's ResponderID;
- it echoes our nonce when it carries one (a responder may omit it: RFC 8954);
- thisUpdate is not in the future (5 minutes of skew) and nextUpdate not in the past; without
  nextUpdate, thisUpdate must be within :data:`MAX_AGE_WITHOUT_NEXT_UPDATE`.
Anything else is "unavailable", and the caller falls back to CRLs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

__all__ = [
    "MAX_AGE_WITHOUT_NEXT_UPDATE",
    "MAX_RESPONSE_BYTES",
    "OcspClient",
    "OcspResult",
    "build_request",
    "check_embedded",
    "check_response",
    "ocsp_urls",
]

_log = logging.getLogger("gateway.pki.ocsp")

MAX_RESPONSE_BYTES = 64 * 1024
CLOCK_SKEW = dt.timedelta(minutes=5)
MAX_AGE_WITHOUT_NEXT_UPDATE = dt.timedelta(hours=1)
NONCE_BYTES = 16
_STRONG = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


@dataclass(frozen=True)
class OcspResult:
    status: str  # "good" | "revoked" | "unknown" | "unavailable"
    reason: str
    revocation_time: dt.datetime | None = None
    url: str | None = None
    #: The response itself (DER) and its SingleResponse's times, for a usable answer: what a
    #: long-term signature embeds as revocation evidence.
    der: bytes | None = None
    this_update: dt.datetime | None = None
    next_update: dt.datetime | None = None


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    """The OCSP responder URLs of the certificate's AIA extension (any scheme, as written)."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]


def _cert_id_request(
    cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> ocsp.OCSPRequestBuilder:
    return ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm)


def build_request(
    cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes
) -> ocsp.OCSPRequest:
    """One CertID (SHA-1 name/key hashes: the identifier every responder understands, RFC 5019
    §2.1.1; it is an identifier, not a security function) and a nonce extension."""
    return (
        _cert_id_request(cert, issuer, hashes.SHA1())  # noqa: S303 - CertID, not security
        .add_extension(x509.OCSPNonce(nonce), critical=False)
        .build()
    )


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey bits: the ResponderID byKey form (RFC 6960 §4.2.1)."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _names_responder(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def _signature_ok(resp: ocsp.OCSPResponse, signer: x509.Certificate) -> bool:
    alg = resp.signature_hash_algorithm
    if not isinstance(alg, _STRONG):
        return False
    public = signer.public_key()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), alg)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(alg))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _delegated_problem(
    cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
) -> str | None:
    """None when ``cert`` is a responder certificate the issuer delegated OCSP to."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return "the responder certificate is not issued by the certificate's issuer"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "the responder certificate has no id-kp-OCSPSigning EKU"
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        return "the responder certificate has no id-kp-OCSPSigning EKU"
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return "the responder certificate is not valid now"
    return None


def check_response(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes | None,
    now: dt.datetime,
) -> OcspResult:
    """Parse and check one OCSP response for ``cert``; never raises on bad input."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        return OcspResult("unavailable", f"OCSP response unreadable: {e}")
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return OcspResult("unavailable", f"OCSP responder answered {resp.response_status.name}")
    try:
        # The responder: the issuing CA itself, or a certificate it delegated OCSP signing to.
        signer: x509.Certificate | None = None
        problems: list[str] = []
        if _names_responder(resp, issuer):
            signer = issuer
        else:
            for c in resp.certificates:
                if not _names_responder(resp, c):
                    continue
                why = _delegated_problem(c, issuer, now)
                if why is None:
                    signer = c
                    break
                problems.append(why)
        if signer is None:
            detail = "; ".join(problems) or "signed neither by the issuer nor by a delegate"
            return OcspResult("unavailable", f"OCSP response not trusted: {detail}")
        if not _signature_ok(resp, signer):
            return OcspResult("unavailable", "OCSP response signature is invalid")
        if nonce is not None:
            try:
                echoed = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            except x509.ExtensionNotFound:
                echoed = None
            if echoed is not None and echoed != nonce:
                return OcspResult("unavailable", "OCSP response nonce does not match the request")
        single = None
        for r in resp.responses:
            want = _cert_id_request(cert, issuer, r.hash_algorithm).build()
            if (
                r.serial_number == cert.serial_number
                and r.issuer_name_hash == want.issuer_name_hash
                and r.issuer_key_hash == want.issuer_key_hash
            ):
                single = r
                break
        if single is None:
            return OcspResult("unavailable", "OCSP response is about another certificate")
        this_update = single.this_update_utc
        next_update = single.next_update_utc
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType) as e:
        return OcspResult("unavailable", f"OCSP response unreadable: {e}")
    if this_update > now + CLOCK_SKEW:
        return OcspResult(
            "unavailable", f"OCSP response is dated in the future ({this_update.isoformat()})"
        )
    if next_update is not None and next_update < now - CLOCK_SKEW:
        return OcspResult(
            "unavailable", f"OCSP response is stale (nextUpdate {next_update.isoformat()})"
        )
    if next_update is None and this_update < now - MAX_AGE_WITHOUT_NEXT_UPDATE:
        return OcspResult(
            "unavailable", f"OCSP response is stale (thisUpdate {this_update.isoformat()})"
        )
    who = issuer.subject.rfc4514_string()
    status = single.certificate_status
    if status == ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        return OcspResult(
            "revoked",
            f"certificate {cert.serial_number:X} is revoked by {who} since "
            f"{when.isoformat() if when else 'an unknown time'} (OCSP)",
            when,
            der=der,
            this_update=this_update,
            next_update=next_update,
        )
    if status == ocsp.OCSPCertStatus.GOOD:
        return OcspResult(
            "good",
            f"OCSP: good (thisUpdate {this_update.isoformat()})",
            der=der,
            this_update=this_update,
            next_update=next_update,
        )
    return OcspResult("unknown", "OCSP responder does not know the certificate")


def check_embedded(der: bytes, cert: x509.Certificate, issuer: x509.Certificate) -> OcspResult:
    """An OCSP response carried in a signed document (XAdES OCSPValues, CMS revocation info,
    PDF DSS), checked as of its own production time: issuer or delegate signature, the
    delegate valid then, this certificate's SingleResponse. Whether it speaks for the time the
    signature must be proven at is the caller's decision (``gateway.verify.revocation``)."""
    try:
        produced = ocsp.load_der_ocsp_response(der).produced_at_utc
    except ValueError as e:
        return OcspResult("unavailable", f"OCSP response unreadable: {e}")
    return check_response(der, cert, issuer, nonce=None, now=produced)


class OcspClient:
    """Asks the AIA responders of a certificate; a fresh HTTP session per query."""

    def __init__(self, *, timeout: float = 5.0, max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes

    async def _post(self, url: str, body: bytes) -> bytes | str:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s,
                s.post(
                    url,
                    data=body,
                    headers={"Content-Type": "application/ocsp-request"},
                    allow_redirects=False,
                ) as resp,
            ):
                if resp.status != 200:
                    return f"OCSP responder {url} answered HTTP {resp.status}"
                data = await resp.content.read(self.max_bytes + 1)
        except TimeoutError:
            return f"OCSP responder {url} did not answer within {self.timeout:g} s"
        except (aiohttp.ClientError, ValueError, OSError) as e:
            return f"OCSP responder {url} unreachable ({type(e).__name__})"
        if len(data) > self.max_bytes:
            return f"OCSP response from {url} exceeds {self.max_bytes} bytes"
        return data

    async def status(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        now: dt.datetime,
        urls: Sequence[str] | None = None,
    ) -> OcspResult:
        """The first usable answer among the responders; else "unavailable" with the reasons."""
        urls = ocsp_urls(cert) if urls is None else list(urls)
        problems: list[str] = []
        unknown = False
        for url in urls:
            if not url.lower().startswith(("http://", "https://")):
                problems.append(f"OCSP URL {url!r} is not http(s)")
                continue
            nonce = secrets.token_bytes(NONCE_BYTES)
            body = build_request(cert, issuer, nonce).public_bytes(serialization.Encoding.DER)
            got = await self._post(url, body)
            if isinstance(got, str):
                _log.info("%s", got)
                problems.append(got)
                continue
            result = check_response(got, cert, issuer, nonce=nonce, now=now)
            if result.status in ("good", "revoked"):
                return dataclasses.replace(result, url=url)
            unknown = unknown or result.status == "unknown"
            problems.append(f"{result.reason} [{url}]")
        return OcspResult(
            "unknown" if unknown else "unavailable", "; ".join(problems) or "no OCSP URL"
        )
