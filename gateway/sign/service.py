"""The HTTP-free signDoc service: one call per document, whatever the format.

The signDoc endpoint (after the SAD check) and the CLI call :func:`sign_document`; the SAD must
authorize exactly :func:`document_digests` of the request (SHA-256 of each decoded document
as sent, or the given documentDigests), so the caller checks those before anything is signed.
Validation happens before the key is touched: a refused request signs nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509

from gateway.clock import Clock, system_clock
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.hsm.api import KeyHandle
from gateway.sign import cades, eprescription
from gateway.sign.eprescription import (
    PROFILES,
    EPrescriptionInput,
    EPrescriptionProfile,
    RolePolicy,
)
from gateway.sign.timestamp import Rfc3161Client, TimestampClient
from gateway.sign.xades import XadesBuilder
from gateway.sign.xades_ltv import LongTerm, LongTermSource, prepare_long_term

T = TypeVar("T")

__all__ = [
    "CONFORMANCE_LEVELS",
    "ENVELOPES",
    "SignedDocument",
    "SigningPolicy",
    "all_or_none",
    "document_digests",
    "sign_document",
]

#: signature_format -> valid signed_envelope_property values (CSC v2 §11.11).
ENVELOPES: dict[str, tuple[str, ...]] = {
    "C": ("Detached", "Attached"),
    "X": ("Enveloped", "Enveloping", "Detached"),
    "P": ("Certification", "Revision"),
}
DEFAULT_ENVELOPE = {"C": "Attached", "X": "Enveloped", "P": "Certification"}
CONFORMANCE_LEVELS = ("AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA")
#: Levels each format reaches (XAdES: ES-BES, ES-T, ES-XL, ES-A).
FORMAT_LEVELS = {"C": CONFORMANCE_LEVELS, "X": CONFORMANCE_LEVELS, "P": CONFORMANCE_LEVELS}
MIME_TYPES = {"C": "application/pkcs7-signature", "X": "application/xml", "P": "application/pdf"}


@dataclass(frozen=True, kw_only=True)
class SigningPolicy:
    """Settings that shape signing: size limit, XML depth, profiles, the role mapping."""

    roles: RolePolicy = field(
        default_factory=lambda: RolePolicy(
            {"prescription": ["Medical Doctor", "Dentist"], "dispensing": ["Pharmacist"]}
        )
    )
    profiles: Mapping[str, EPrescriptionProfile] = field(default_factory=lambda: dict(PROFILES))
    max_document_bytes: int = 5 * 1024 * 1024
    max_xml_depth: int = 64
    #: IssuerSerialV2 beside CertDigest in the e-prescription's SigningCertificateV2.
    eprescription_issuer_serial_v2: bool = False
    #: Validation data for B-LT / B-LTA (CRL files and downloads, TSA anchors).
    long_term: LongTermSource = field(default_factory=LongTermSource)
    #: Documents of one request built at once (:func:`all_or_none`): their TSA round trips
    #: overlap instead of queueing; 1 builds them one after the other.
    parallel_documents: int = 8


@dataclass(frozen=True, kw_only=True)
class SignedDocument:
    """The result for one document.

    ``document_with_signature`` is the signed document (attached CAdES, XAdES enveloped or
    enveloping, PAdES, the e-prescription XML); ``signature_object`` the detached signature
    (detached CAdES / XAdES). ``document_digest`` is what the audit record names.
    """

    document_with_signature: bytes | None
    signature_object: bytes | None
    mime_type: str
    signature_format: str
    conformance_level: str
    envelope: str
    profile: str | None
    document_digest: bytes


def check_request(
    signature_format: str, conformance_level: str, envelope: str | None, profile: str | None
) -> str:
    if signature_format not in ENVELOPES:
        raise InvalidRequest(
            f"unsupported signature_format {signature_format!r}; valid: C (CAdES), X (XAdES), "
            "P (PAdES)"
        )
    if conformance_level not in CONFORMANCE_LEVELS:
        raise InvalidRequest(
            f"unsupported conformance_level {conformance_level!r}; valid: "
            + ", ".join(CONFORMANCE_LEVELS)
        )
    if conformance_level not in FORMAT_LEVELS[signature_format]:
        raise InvalidRequest(
            f"conformance_level {conformance_level} is not available for signature_format "
            f"{signature_format}; valid: {', '.join(FORMAT_LEVELS[signature_format])}"
        )
    env = envelope or DEFAULT_ENVELOPE[signature_format]
    if env not in ENVELOPES[signature_format]:
        raise InvalidRequest(
            f"signed_envelope_property {env!r} is not valid for signature_format "
            f"{signature_format}; valid: {', '.join(ENVELOPES[signature_format])}"
        )
    if profile is not None:
        if signature_format != "X":
            raise InvalidRequest(f"profile {profile!r} needs signature_format X")
        if env != "Enveloped":
            raise InvalidRequest(f"profile {profile!r} makes an enveloped signature")
    return env


def document_digests(
    *, documents: Sequence[bytes] = (), document_digests: Sequence[bytes] = ()
) -> list[bytes]:
    """What the SAD must authorize: SHA-256 of each decoded document as sent, then the
    documentDigests given for detached CAdES, in request order."""
    return [hashlib.sha256(d).digest() for d in documents] + list(document_digests)


async def sign_document(
    *,
    key: KeyHandle,
    chain: Sequence[x509.Certificate],
    signature_format: str,
    conformance_level: str,
    envelope: str | None,
    document: bytes | None,
    document_digest: bytes | None = None,
    profile: str | None = None,
    csv_encoding: str = "utf-8",
    eprescription_input: EPrescriptionInput | None = None,
    tsa: TimestampClient | None,
    now: dt.datetime | None = None,
    policy: SigningPolicy | None = None,
    clock: Clock = system_clock,
) -> SignedDocument:
    """Sign one document. ``chain[0]`` is the signer's certificate, then its issuers.

    ``document_digest`` (SHA-256) replaces ``document`` only for detached CAdES. AdES-B-T
    needs ``tsa``; the timestamp is fetched before anything is returned, so a TSA failure
    (TsaUnavailable / TsaTimeout, 503 with Retry-After) leaves nothing signed behind. A signer
    whose hcRole may not sign the profile's document type gets RoleNotPermitted (403) first.
    """
    policy = policy or SigningPolicy()
    now = clock() if now is None else now
    if not chain:
        raise InvalidRequest("the credential has no certificate")
    env = check_request(signature_format, conformance_level, envelope, profile)
    stamp = _timestamp_client(conformance_level, tsa)
    digest = _checked_digest(document, document_digest, signature_format, env, policy)
    # Validation data is gathered before the key is used: a CRL server that is down refuses
    # the request (503) with nothing signed.
    long_term = await prepare_long_term(conformance_level, chain, policy.long_term, now)
    if signature_format == "C":
        signed = await cades.template_for(chain[0], list(chain[1:])).sign(
            key,
            content=document,
            message_digest=digest,
            attached=env == "Attached",
            signing_time=now,
            tsa=stamp,
            long_term=long_term,
        )
    elif signature_format == "X":
        assert document is not None  # _checked_digest: only detached CAdES goes without
        signed = await _sign_xml(
            key,
            chain,
            document=document,
            envelope=env,
            profile=profile,
            extra=dataclasses.replace(
                eprescription_input or EPrescriptionInput(), encoding=csv_encoding
            ),
            tsa=stamp,
            now=now,
            policy=policy,
            long_term=long_term,
        )
    else:
        assert document is not None
        signed = await _sign_pdf(key, chain, document, env, now, stamp, long_term)
    # Only detached CAdES / XAdES come back as a signature object (a profile is enveloped).
    detached = env == "Detached"
    return SignedDocument(
        document_with_signature=None if detached else signed,
        signature_object=signed if detached else None,
        mime_type=MIME_TYPES[signature_format],
        signature_format=signature_format,
        conformance_level=conformance_level,
        envelope=env,
        profile=profile,
        document_digest=digest,
    )


def _timestamp_client(
    conformance_level: str, tsa: TimestampClient | None
) -> TimestampClient | None:
    """The TSA a level needs (None at B-B); a timestamped level without one is refused."""
    if conformance_level == "AdES-B-B":
        return None
    if tsa is None:
        raise InvalidRequest(
            f"{conformance_level} needs a timestamp authority, and none is configured"
        )
    return tsa


async def _sign_pdf(
    key: KeyHandle,
    chain: Sequence[x509.Certificate],
    pdf: bytes,
    envelope: str,
    now: dt.datetime,
    stamp: TimestampClient | None,
    long_term: LongTerm | None,
) -> bytes:
    # pyHanko (~8 MB) is loaded on the first PDF, not in every worker at start-up.
    from gateway.sign import pades

    if stamp is not None and not isinstance(stamp, Rfc3161Client):
        raise InvalidRequest("PAdES timestamps need the RFC 3161 HTTP timestamp authority")
    return await pades.sign_pdf(
        key,
        certificate=chain[0],
        chain=list(chain[1:]),
        pdf=pdf,
        envelope=envelope,
        signing_time=now,
        tsa=stamp,
        long_term=long_term,
    )


async def all_or_none(work: Sequence[Callable[[], Awaitable[T]]], *, limit: int = 8) -> list[T]:
    """Run ``work`` concurrently, at most ``limit`` at once; the results in order.

    The documents of one signDoc request each wait for the TSA (and, at B-LT, for the cached
    revocation data): one after the other, a request of N documents takes N round trips. All
    or none: the first failure cancels the rest and is raised as it is (the caller refunds the
    SAD and answers with that error).
    """
    if limit <= 1 or len(work) <= 1:
        return [await w() for w in work]
    gate = asyncio.Semaphore(limit)

    async def one(w: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await w()

    tasks = [asyncio.ensure_future(one(w)) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _checked_digest(
    document: bytes | None,
    document_digest: bytes | None,
    signature_format: str,
    envelope: str,
    policy: SigningPolicy,
) -> bytes:
    """SHA-256 of the document (what the SAD authorizes), after the size and shape checks."""
    if document is None:
        if document_digest is None:
            raise InvalidRequest("a document (or, for detached CAdES, its digest) is required")
        if signature_format != "C" or envelope != "Detached":
            raise InvalidRequest("documentDigests are accepted for detached CAdES only")
        if len(document_digest) != 32:
            raise InvalidRequest("documentDigests must be SHA-256 (32 bytes)")
        return document_digest
    if len(document) > policy.max_document_bytes:
        raise PayloadTooLarge(
            f"document of {len(document)} bytes is over the limit of "
            f"{policy.max_document_bytes} bytes"
        )
    if not document:
        raise InvalidRequest("the document is empty")
    return hashlib.sha256(document).digest()


async def _sign_xml(
    key: KeyHandle,
    chain: Sequence[x509.Certificate],
    *,
    document: bytes,
    envelope: str,
    profile: str | None,
    extra: EPrescriptionInput,
    tsa: TimestampClient | None,
    now: dt.datetime,
    policy: SigningPolicy,
    long_term: LongTerm | None,
) -> bytes:
    """XAdES: an e-prescription / dispensing profile, or one of the generic envelopes."""
    cert, issuers = chain[0], list(chain[1:])
    if profile is None:
        return await _xades_builder(cert, issuers).sign(
            key,
            document=document,
            envelope=envelope,
            signing_time=now,
            tsa=tsa,
            max_depth=policy.max_xml_depth,
            long_term=long_term,
        )
    prof = policy.profiles.get(profile)
    if prof is None:
        raise InvalidRequest(
            f"unknown profile {profile!r}; valid: {', '.join(sorted(policy.profiles))}"
        )
    return await eprescription.sign_eprescription(
        key=key,
        certificate=cert,
        chain=issuers,
        document=document,
        profile=prof,
        roles=policy.roles,
        signing_time=now,
        tsa=tsa,
        extra=extra,
        builder=_xades_builder(cert, issuers),
        max_depth=policy.max_xml_depth,
        long_term=long_term,
        issuer_serial_v2=policy.eprescription_issuer_serial_v2,
    )


_builders: dict[bytes, XadesBuilder] = {}
#: The last certificate object and its builder: a batch signs with the same object every time,
#: and its fingerprint (DER, SHA-256) costs more than building half a document.
_last: tuple[x509.Certificate, XadesBuilder] | None = None


def _xades_builder(cert: x509.Certificate, issuers: list[x509.Certificate]) -> XadesBuilder:
    """One builder per certificate: its base64 and digests are computed once."""
    global _last
    from cryptography.hazmat.primitives import hashes

    last = _last
    if last is not None and last[0] is cert:
        return last[1]
    fp = cert.fingerprint(hashes.SHA256())
    b = _builders.get(fp)
    if b is None:
        if len(_builders) > 4096:
            _builders.clear()
        b = _builders[fp] = XadesBuilder(certificate=cert, chain=issuers)
    _last = (cert, b)
    return b
