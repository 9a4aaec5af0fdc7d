"""What a CSC ``signatures/signDoc`` request asks for and how the answer is rendered: shared by
the remote gateway (``gateway/api/sign_doc.py``) and the local agent (``gateway/local/server.py``)
so that one facility integration behaves the same on both paths.

``check_entry`` refuses what cannot be signed before the SAD is spent; ``jobs_of`` turns the
request into one :class:`DocumentJob` per authorized digest (the order of
``SignDocRequest.authorized_digests``); ``response_body`` renders the signed results.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from gateway.api.decode import RSA_ENCRYPTION, SHA_RSA_256
from gateway.api.sign_doc_schema import DocumentDigestsEntry, DocumentEntry, SignDocRequest
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.sign.service import SignedDocument, SigningPolicy, check_request
from gateway.sign.timestamp import TimestampClient
from gateway.signing.core import DocumentJob

__all__ = ["check_entries", "check_entry", "jobs_of", "response_body"]


def check_entry(
    entry: DocumentEntry | DocumentDigestsEntry,
    *,
    policy: SigningPolicy,
    tsa: TimestampClient | None,
) -> None:
    """Refuse (InvalidRequest, PayloadTooLarge) what cannot be signed before the SAD is spent:
    the signature algorithm, a level that needs a timestamp authority when none is set, the
    document's size, the format / envelope / profile combination."""
    if entry.signAlgo not in (SHA_RSA_256, RSA_ENCRYPTION):
        raise InvalidRequest(
            f"Invalid parameter signAlgo: {entry.signAlgo!r}; signDoc signs RSA PKCS#1 v1.5 "
            f"with SHA-256: sha256WithRSAEncryption ({SHA_RSA_256}) or rsaEncryption "
            f"({RSA_ENCRYPTION})"
        )
    if getattr(entry, "signAlgoParams", None):
        raise InvalidRequest("Invalid parameter signAlgoParams: RSA PKCS#1 v1.5 takes none")
    if entry.conformance_level != "AdES-B-B" and tsa is None:
        raise InvalidRequest(
            f"{entry.conformance_level} needs a timestamp authority, and none is configured"
        )
    document = entry if isinstance(entry, DocumentEntry) else None
    if document is not None and len(document.decoded()) > policy.max_document_bytes:
        raise PayloadTooLarge(
            f"document of {len(document.decoded())} bytes is over the limit of "
            f"{policy.max_document_bytes} bytes"
        )
    check_request(
        entry.signature_format,
        entry.conformance_level,
        entry.signed_envelope_property,
        document.profile if document else None,
    )


def check_entries(
    req: SignDocRequest, *, policy: SigningPolicy, tsa: TimestampClient | None
) -> None:
    entries: list[DocumentEntry | DocumentDigestsEntry] = [
        *(req.documents or []),
        *(req.documentDigests or []),
    ]
    for entry in entries:
        check_entry(entry, policy=policy, tsa=tsa)


def jobs_of(req: SignDocRequest) -> list[DocumentJob]:
    """One job per authorized digest, in the order of ``req.authorized_digests()``."""
    digests = iter(req.authorized_digests())
    jobs = [
        DocumentJob(
            digest=next(digests),
            signature_format=d.signature_format,
            conformance_level=d.conformance_level,
            envelope=d.signed_envelope_property,
            document=d.decoded(),
            profile=d.profile,
            csv_encoding=d.csv_encoding,
            eprescription_input=d.eprescription_input(),
        )
        for d in req.documents or []
    ]
    for entry in req.documentDigests or []:
        for digest in entry.decoded():
            jobs.append(
                DocumentJob(
                    digest=next(digests),
                    signature_format="C",
                    conformance_level=entry.conformance_level,
                    envelope="Detached",
                    document=None,
                    document_digest=digest,
                )
            )
    return jobs


def response_body(results: Sequence[SignedDocument]) -> dict[str, Any]:
    """``DocumentWithSignature`` / ``SignatureObject`` (base64, request order); a key only
    when it has entries."""
    body: dict[str, Any] = {}
    with_signature = [
        base64.b64encode(r.document_with_signature).decode("ascii")
        for r in results
        if r.document_with_signature is not None
    ]
    objects = [
        base64.b64encode(r.signature_object).decode("ascii")
        for r in results
        if r.signature_object is not None
    ]
    if with_signature:
        body["DocumentWithSignature"] = with_signature
    if objects:
        body["SignatureObject"] = objects
    return body
