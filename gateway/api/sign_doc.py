"""CSC v2 ``signatures/signDoc``: the gateway builds CAdES / XAdES (incl. the e-prescription
profile) / PAdES signatures over documents the signer approved.

The SAD authorizes the SHA-256 digests of the decoded documents as sent (and, for detached
CAdES, the ``documentDigests`` given): the same hash-bound challenge as signHash, so the doctor's
authenticator signed a commitment to exactly these documents. This handler decodes and
validates every entry before the SAD is spent, then hands one ``DocumentJob`` per digest to
``signing.core.SigningService.sign_documents`` (which spends, audits, signs, and refunds if a
signature cannot be built) and renders the result.
"""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from gateway.api.decode import RSA_ENCRYPTION, SHA_RSA_256, caller_of
from gateway.api.keys import SIGNING
from gateway.api.schema import parse
from gateway.api.sign_doc_schema import DocumentDigestsEntry, DocumentEntry, SignDocRequest
from gateway.errors import AccessDenied, GatewayError, InvalidRequest
from gateway.signing.core import DocumentJob, SigningService

routes = web.RouteTableDef()


def _check_entry(entry: DocumentEntry | DocumentDigestsEntry, signing: SigningService) -> None:
    """Refuse what cannot be signed before the SAD is spent."""
    if entry.signAlgo not in (SHA_RSA_256, RSA_ENCRYPTION):
        raise InvalidRequest(
            f"Invalid parameter signAlgo: {entry.signAlgo!r}; signDoc signs RSA PKCS#1 v1.5 "
            f"with SHA-256: sha256WithRSAEncryption ({SHA_RSA_256}) or rsaEncryption "
            f"({RSA_ENCRYPTION})"
        )
    if getattr(entry, "signAlgoParams", None):
        raise InvalidRequest("Invalid parameter signAlgoParams: RSA PKCS#1 v1.5 takes none")
    document = entry if isinstance(entry, DocumentEntry) else None
    signing.check_document(
        signature_format=entry.signature_format,
        conformance_level=entry.conformance_level,
        envelope=entry.signed_envelope_property,
        profile=document.profile if document else None,
        size=len(document.decoded()) if document else None,
    )


def _jobs(req: SignDocRequest) -> list[DocumentJob]:
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


@routes.post("/csc/v2/signatures/signDoc")
async def sign_doc(request: web.Request) -> web.Response:
    caller = caller_of(request)
    if caller.facility_id is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    signing = request.app[SIGNING]
    credential_id: str | None = None
    try:
        req = await parse(request, SignDocRequest)
        credential_id = req.credentialID
        entries: list[DocumentEntry | DocumentDigestsEntry] = [
            *(req.documents or []),
            *(req.documentDigests or []),
        ]
        for entry in entries:
            _check_entry(entry, signing)
        jobs = _jobs(req)
    except GatewayError as e:
        if e.status < 500:
            await signing.refused(
                caller,
                action="signature.refused",
                reason=e.description,
                detail={"credential": credential_id, "method": "signDoc"},
            )
        raise
    results = await signing.sign_documents(
        caller,
        sad=req.SAD,
        credential_id=req.credentialID,
        jobs=jobs,
        refused_detail={"credential": credential_id, "method": "signDoc"},
    )
    b64 = base64.b64encode
    body: dict[str, Any] = {}
    with_signature = [
        b64(r.document_with_signature).decode("ascii")
        for r in results
        if r.document_with_signature is not None
    ]
    signature_objects = [
        b64(r.signature_object).decode("ascii") for r in results if r.signature_object is not None
    ]
    if with_signature:
        body["DocumentWithSignature"] = with_signature
    if signature_objects:
        body["SignatureObject"] = signature_objects
    return web.json_response(body)
