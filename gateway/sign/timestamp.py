"""RFC 3161 timestamps: a client for the -T levels and the token checks verification needs.

The client returns a token only after checking that it answers *our* request (message imprint
and nonce), so a signature is never finished with someone else's timestamp. Network failures
become :class:`TsaUnavailable` (502) and time-outs :class:`TsaTimeout` (504); callers add the
token last, so a failing TSA leaves nothing half-signed to return.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from asn1crypto import cms, core, tsp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import PkiError, TsaTimeout, TsaUnavailable
from gateway.hsm.api import DigestAlgorithm

__all__ = [
    "Rfc3161Client",
    "TimestampClient",
    "TimestampToken",
    "TokenProblem",
    "check_token",
    "parse_token",
]

_log = logging.getLogger("gateway.sign.timestamp")

_HASH_NAMES = {
    DigestAlgorithm.SHA256: "sha256",
    DigestAlgorithm.SHA384: "sha384",
    DigestAlgorithm.SHA512: "sha512",
}
#: The only digests accepted in signatures and certificate bindings (no SHA-1, no MD5).
_CRYPTO_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
MAX_RESPONSE_BYTES = 256 * 1024


class TimestampClient(Protocol):
    """What a signature builder needs from a TSA: a token over one digest."""

    async def timestamp(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        """DER of a TimeStampToken (a CMS ContentInfo) whose imprint is ``digest``."""
        ...


class Rfc3161Client:
    """RFC 3161 over HTTP POST (``application/timestamp-query``) with a hard time-out.

    One aiohttp session is kept per client and closed with :meth:`close`; the loop that first
    uses the client owns it (the gateway makes one per worker in ``cleanup_ctx``).
    """

    def __init__(self, *, url: str, timeout: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"TSA URL must be http(s): {url!r}")
        self.url = url
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Rfc3161Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def post(self, request_der: bytes) -> bytes:
        """Send a DER TimeStampReq, return the raw DER TimeStampResp (pyHanko reuses this)."""
        try:
            async with self._session_().post(
                self.url,
                data=request_der,
                headers={"Content-Type": "application/timestamp-query"},
            ) as resp:
                if resp.status != 200:
                    raise TsaUnavailable(
                        f"timestamp authority {self.url} answered HTTP {resp.status}; "
                        "nothing was signed"
                    )
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
        except TimeoutError as e:
            raise TsaTimeout(
                f"timestamp authority {self.url} did not answer within {self.timeout:g} s; "
                "nothing was signed"
            ) from e
        except aiohttp.ClientError as e:
            raise TsaUnavailable(
                f"timestamp authority {self.url} is unreachable ({type(e).__name__}); "
                "nothing was signed"
            ) from e
        if len(body) > MAX_RESPONSE_BYTES:
            raise TsaUnavailable(f"timestamp authority {self.url} sent an oversized response")
        return body

    async def timestamp(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        nonce = secrets.randbits(63) | 1
        req = tsp.TimeStampReq(
            {
                "version": "v1",
                "message_imprint": {
                    "hash_algorithm": {"algorithm": _HASH_NAMES[algorithm]},
                    "hashed_message": digest,
                },
                "nonce": nonce,
                "cert_req": True,
            }
        )
        body = await self.post(req.dump())
        return token_from_response(
            body, digest=digest, algorithm=algorithm, nonce=nonce, source=self.url
        )


def token_from_response(
    body: bytes, *, digest: bytes, algorithm: DigestAlgorithm, nonce: int | None, source: str
) -> bytes:
    """The token of a granted response that answers exactly this imprint and nonce."""
    try:
        resp = tsp.TimeStampResp.load(body, strict=True)
        status = resp["status"]["status"].native
        if status not in ("granted", "granted_with_mods"):
            texts = resp["status"]["status_string"].native or []
            raise TsaUnavailable(
                f"timestamp authority {source} refused the request ({status}"
                + (f": {'; '.join(texts)}" if texts else "")
                + "); nothing was signed"
            )
        token = resp["time_stamp_token"]
        if isinstance(token, core.Void):
            raise TsaUnavailable(f"timestamp authority {source} granted but sent no token")
        info = parse_token(token.dump()).info
    except TsaUnavailable:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise TsaUnavailable(
            f"timestamp authority {source} sent a malformed response; nothing was signed"
        ) from e
    imprint = info["message_imprint"]
    if (
        imprint["hash_algorithm"]["algorithm"].native != _HASH_NAMES[algorithm]
        or imprint["hashed_message"].native != digest
    ):
        raise TsaUnavailable(f"timestamp authority {source} stamped a different digest")
    if nonce is not None and info["nonce"].native != nonce:
        raise TsaUnavailable(f"timestamp authority {source} answered with a wrong nonce")
    der: bytes = token.dump()
    return der


# --------------------------------------------------------------------------------------------
# Token parsing and checking (verification side)


@dataclass
class TimestampToken:
    """A parsed TimeStampToken: the CMS SignedData and the TSTInfo it carries."""

    content_info: Any  # cms.ContentInfo
    signed_data: Any  # cms.SignedData
    info: Any  # tsp.TSTInfo
    certificates: list[x509.Certificate] = field(default_factory=list)

    @property
    def gen_time(self) -> dt.datetime:
        value: dt.datetime = self.info["gen_time"].native
        return value


@dataclass
class TokenProblem:
    """Why a token does not verify; ``kind`` maps to an ETSI sub-indication."""

    kind: str  # "hash" | "signature" | "chain" | "format"
    reason: str


def parse_token(der: bytes) -> TimestampToken:
    """Parse a TimeStampToken; ValueError when it is not one."""
    ci = cms.ContentInfo.load(der, strict=True)
    if ci["content_type"].native != "signed_data":
        raise ValueError("timestamp token is not CMS SignedData")
    sd = ci["content"]
    eci = sd["encap_content_info"]
    if eci["content_type"].native != "tst_info":
        raise ValueError("timestamp token does not carry a TSTInfo")
    content = eci["content"]
    info = tsp.TSTInfo.load(content.contents if hasattr(content, "contents") else content)
    info.native  # noqa: B018 - force a full parse so that malformed content raises here
    certs: list[x509.Certificate] = []
    for c in sd["certificates"] or []:
        if c.name == "certificate":
            certs.append(x509.load_der_x509_certificate(c.chosen.dump()))
    return TimestampToken(content_info=ci, signed_data=sd, info=info, certificates=certs)


def _hash(name: str, data: bytes) -> bytes:
    return hashlib.new(name, data).digest()


def check_token(
    token: TimestampToken,
    *,
    imprint_data: bytes,
    trust_anchors: list[x509.Certificate],
    moment: dt.datetime | None = None,
    extra_certs: Sequence[x509.Certificate] = (),
    imprint_digest: bytes | None = None,
) -> TokenProblem | None:
    """Check the imprint, the TSA's signature, its timeStamping EKU and its chain.

    ``imprint_data`` is what was stamped (a CMS signature value, the canonical XAdES
    SignatureValue); the check hashes it with the token's own algorithm.
    """
    from gateway.pki import hpki

    imprint = token.info["message_imprint"]
    alg = imprint["hash_algorithm"]["algorithm"].native
    if alg not in _CRYPTO_HASHES:
        return TokenProblem("format", f"timestamp uses unsupported hash {alg}")
    expected = imprint_digest if imprint_digest is not None else _hash(alg, imprint_data)
    if expected != imprint["hashed_message"].native:
        return TokenProblem("hash", "the timestamp does not cover this signature value")
    signer_infos = token.signed_data["signer_infos"]
    if len(signer_infos) != 1:
        return TokenProblem("format", "timestamp token must have exactly one SignerInfo")
    si = signer_infos[0]
    tsa_cert = _find_signer_cert(si, token.certificates)
    if tsa_cert is None:
        return TokenProblem("chain", "the TSA certificate is not in the timestamp token")
    content = token.signed_data["encap_content_info"]["content"]
    tst_der = content.contents if hasattr(content, "contents") else bytes(content)
    problem = verify_signer_info(si, tsa_cert, content_digest_of=tst_der)
    if problem is not None:
        return TokenProblem("signature", f"timestamp token signature: {problem}")
    try:
        eku = tsa_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.TIME_STAMPING not in eku:
            return TokenProblem("chain", "the TSA certificate lacks the timeStamping EKU")
    except x509.ExtensionNotFound:
        return TokenProblem("chain", "the TSA certificate lacks the timeStamping EKU")
    if not trust_anchors:
        return TokenProblem("chain", "no trust anchors configured for timestamps")
    pool = [*token.certificates, *extra_certs]
    at = moment or token.gen_time
    try:
        hpki.verify_chain(tsa_cert, intermediates=pool, trust_anchors=trust_anchors, moment=at)
    except PkiError as e:
        why = simple_path_problem(tsa_cert, pool, trust_anchors, at)
        if why is not None:
            return TokenProblem("chain", f"TSA certificate: {e.description}; {why}")
    return None


def _can_issue(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


#: The most certificates a TSA path is searched through (the token's and its validation
#: data's): beyond it the token is refused, not searched.
MAX_PATH_POOL = 64


def simple_path_problem(
    cert: x509.Certificate,
    pool: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    moment: dt.datetime,
    depth: int = 5,
) -> str | None:
    """None when ``cert`` chains to one of ``anchors`` by signatures, each certificate valid at
    ``moment`` and each issuer allowed to sign certificates; else why not.

    Why by hand: cryptography's verifier applies the Web-PKI profile, which TSA roots of test
    and national services often do not meet (no basicConstraints on a self-signed root,
    issuer and serial in its authority key identifier), while a TSA path needs no more than
    this; the timeStamping EKU is checked by the caller.

    Breadth first, each certificate of the pool taken into the search once: a pool of many
    certificates with the same name (all issuers of each other) costs at most pool² signature
    checks, not pool^depth (a depth-first search without that took 7 s for 12 of them).
    """
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        return f"{cert.subject.rfc4514_string()} is not valid at {moment.isoformat()}"
    if len(pool) > MAX_PATH_POOL:
        return f"more than {MAX_PATH_POOL} certificates to search for a TSA path"
    seen = {cert.fingerprint(hashes.SHA256())}
    frontier = [cert]
    for level in range(depth + 1):
        found: list[x509.Certificate] = []
        for c in frontier:
            for anchor in anchors:
                if anchor.subject == c.issuer and _issued_by(c, anchor):
                    return None
            if level == depth:
                continue
            for issuer in pool:
                if issuer.subject != c.issuer or not _can_issue(issuer):
                    continue
                fp = issuer.fingerprint(hashes.SHA256())
                if fp in seen or not _issued_by(c, issuer):
                    continue
                if not issuer.not_valid_before_utc <= moment <= issuer.not_valid_after_utc:
                    continue
                seen.add(fp)
                found.append(issuer)
        if not found:
            break
        frontier = found
    return f"no path from {cert.subject.rfc4514_string()} to a TSA trust anchor"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _find_signer_cert(si: Any, certs: list[x509.Certificate]) -> x509.Certificate | None:
    sid = si["sid"]
    if sid.name == "issuer_and_serial_number":
        serial = sid.chosen["serial_number"].native
        issuer_der = sid.chosen["issuer"].dump()
        for c in certs:
            if c.serial_number == serial and c.issuer.public_bytes() == issuer_der:
                return c
        # Name encodings may differ (PrintableString vs UTF8String); compare parsed names too.
        for c in certs:
            if c.serial_number == serial:
                return c
        return None
    ski = sid.chosen.native
    for c in certs:
        try:
            if c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == ski:
                return c
        except x509.ExtensionNotFound:
            continue
    return None


def verify_signer_info(
    si: Any,
    cert: x509.Certificate,
    *,
    content_digest_of: bytes | None = None,
    content_digest: bytes | None = None,
) -> str | None:
    """Check a SignerInfo's messageDigest and RSA signature; the reason text when it fails.

    Shared by timestamp tokens and CAdES: both are RFC 5652 SignerInfos with signed attributes.
    """
    digest_name = si["digest_algorithm"]["algorithm"].native
    if digest_name not in _CRYPTO_HASHES:
        return f"unsupported digest algorithm {digest_name}"
    signed_attrs = si["signed_attrs"]
    if isinstance(signed_attrs, core.Void) or not len(signed_attrs):
        return "no signed attributes"
    md = None
    for attr in signed_attrs:
        if attr["type"].native == "message_digest":
            md = attr["values"][0].native
    if md is None:
        return "messageDigest attribute missing"
    expected = content_digest
    if expected is None and content_digest_of is not None:
        expected = _hash(digest_name, content_digest_of)
    if expected is not None and md != expected:
        return "content digest does not match messageDigest"
    # The signature covers the DER of the attributes as a SET OF (tag 0x31), not as [0].
    der = signed_attrs.dump()
    to_verify = b"\x31" + der[1:]
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        return "only RSA signatures are supported"
    sig_alg = si["signature_algorithm"]["algorithm"].native
    if sig_alg not in ("rsassa_pkcs1v15", "sha256_rsa", "sha384_rsa", "sha512_rsa"):
        return f"unsupported signature algorithm {sig_alg}"
    hash_name = digest_name if sig_alg == "rsassa_pkcs1v15" else sig_alg.split("_")[0]
    try:
        public.verify(
            si["signature"].native, to_verify, padding.PKCS1v15(), _CRYPTO_HASHES[hash_name]()
        )
    except InvalidSignature:
        return "signature value does not verify with the signer's public key"
    return None
