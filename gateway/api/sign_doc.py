"""CSC v2 ``signatures/signDoc``: the gateway builds CAdES / XAdES (incl. the e-prescription
profile) / PAdES signatures over documents the signer approved.

The SAD authorizes the SHA-256 digests of the decoded documents as sent (and, for detached
CAdES, the ``documentDigests`` given): the same hash-bound challenge as signHash, so the doctor's
authenticator signed a commitment to exactly these documents. Every request is checked and
validated before the SAD is spent; the SAD is then consumed and the audit event (one per
request, naming each document's digest, format and level) committed in one transaction before
the key is used. If building a signature then fails (TSA down, role not permitted, malformed
document), the count is given back, the failure audited, and nothing is returned.
"""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from cryptography import x509
from sqlalchemy import select

from gateway.api.auth import caller_of
from gateway.api.keys import ACTIVATION, CLOCK, DB, KEYSTORE, SETTINGS
from gateway.api.schema import parse
from gateway.api.sign_doc_schema import DocumentDigestsEntry, DocumentEntry, SignDocRequest
from gateway.api.signing import RSA_ENCRYPTION, SHA_RSA, refund_failed, refused
from gateway.auth.activation import SignatureGrant, SignRequest
from gateway.errors import AccessDenied, GatewayError, InvalidRequest, PayloadTooLarge
from gateway.hsm.api import DigestAlgorithm
from gateway.lifecycle.signers import Credential
from gateway.sign import service
from gateway.sign.setup import signing_policy, tsa_client
from gateway.sign.timestamp import Rfc3161Client
from gateway.store.schema import credential

log = logging.getLogger("gateway.api")
routes = web.RouteTableDef()

_POLICY = web.AppKey("sign_doc_policy", service.SigningPolicy)
_TSA: web.AppKey[Rfc3161Client | None] = web.AppKey("sign_doc_tsa")


def _check_entry(
    entry: DocumentEntry | DocumentDigestsEntry, *, policy: service.SigningPolicy, has_tsa: bool
) -> None:
    """Refuse what cannot be signed before the SAD is spent."""
    if entry.signAlgo not in (SHA_RSA_256, RSA_ENCRYPTION):
        raise InvalidRequest(
            f"Invalid parameter signAlgo: {entry.signAlgo!r}; signDoc signs RSA PKCS#1 v1.5 "
            f"with SHA-256: sha256WithRSAEncryption ({SHA_RSA_256}) or rsaEncryption "
            f"({RSA_ENCRYPTION})"
        )
    if getattr(entry, "signAlgoParams", None):
        raise InvalidRequest("Invalid parameter signAlgoParams: RSA PKCS#1 v1.5 takes none")
    if entry.conformance_level == "AdES-B-T" and not has_tsa:
        raise InvalidRequest("AdES-B-T needs a timestamp authority, and none is configured")
    if isinstance(entry, DocumentEntry):
        size = len(entry.decoded())
        if size > policy.max_document_bytes:
            raise PayloadTooLarge(
                f"document of {size} bytes is over the limit of {policy.max_document_bytes} bytes"
            )
    profile = entry.profile if isinstance(entry, DocumentEntry) else None
    service.check_request(
        entry.signature_format,
        entry.conformance_level,
        entry.signed_envelope_property,
        profile,
    )


SHA_RSA_256 = next(oid for oid, alg in SHA_RSA.items() if alg is DigestAlgorithm.SHA256)


async def _chain(request: web.Request, credential_id: str) -> list[x509.Certificate]:
    async with request.app[DB].read() as conn:
        row = (await conn.execute(select(credential).where(credential.c.id == credential_id))).one()
    cred = Credential.from_row(row)
    if cred.certificate is None:
        raise InvalidRequest("Invalid parameter credentialID")
    return [cred.certificate, *cred.chain]


def _detail(grant: SignatureGrant, req: SignDocRequest) -> dict[str, Any]:
    docs: list[dict[str, Any]] = []
    digests = iter(grant.hashes)
    for d in req.documents or []:
        docs.append(
            {
                "digest": next(digests).hex(),
                "format": d.signature_format,
                "level": d.conformance_level,
                "envelope": d.signed_envelope_property,
                "profile": d.profile,
            }
        )
    for e in req.documentDigests or []:
        for _ in e.hashes:
            docs.append(
                {
                    "digest": next(digests).hex(),
                    "format": "C",
                    "level": e.conformance_level,
                    "envelope": "Detached",
                    "profile": None,
                }
            )
    return {
        "credential": grant.credential_id,
        "key_id": grant.key_id,
        "scal": grant.scal,
        "documents": docs,
    }


@routes.post("/csc/v2/signatures/signDoc")
async def sign_doc(request: web.Request) -> web.Response:
    caller = caller_of(request)
    if caller.facility_id is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    app = request.app
    credential_id: str | None = None
    try:
        req = await parse(request, SignDocRequest)
        credential_id = req.credentialID
        has_tsa = app[_TSA] is not None
        entries: list[DocumentEntry | DocumentDigestsEntry] = [
            *(req.documents or []),
            *(req.documentDigests or []),
        ]
        for entry in entries:
            _check_entry(entry, policy=app[_POLICY], has_tsa=has_tsa)
        digests = req.authorized_digests()
    except GatewayError as e:
        if e.status < 500:
            await refused(
                request,
                caller,
                action="signature.refused",
                reason=e.description,
                detail={"credential": credential_id, "method": "signDoc"},
            )
        raise
    now = app[CLOCK]()
    # Consumption and its audit event are committed in groups with concurrent requests (one
    # transaction for all waiting signHash/signDoc calls), still before any response leaves;
    # a refusal comes back already audited.
    grant = await app[ACTIVATION].consume_and_audit(
        SignRequest(
            sad=req.SAD,
            facility_id=caller.facility_id,
            credential_id=req.credentialID,
            hashes=digests,
            algorithm=DigestAlgorithm.SHA256,
            now=now,
            actor=caller.actor,
            facility_code=caller.institution_code,
            action="signature.sign_doc",
            detail=functools.partial(_detail, req=req),
            refused_detail={"credential": credential_id, "method": "signDoc"},
        )
    )
    try:
        key = await app[KEYSTORE].get_key(grant.key_id)
        chain = await _chain(request, grant.credential_id)
        tsa = app[_TSA]
        with_signature: list[str] = []
        signature_objects: list[str] = []
        results: list[service.SignedDocument] = []
        for doc in req.documents or []:
            results.append(
                await service.sign_document(
                    key=key,
                    chain=chain,
                    signature_format=doc.signature_format,
                    conformance_level=doc.conformance_level,
                    envelope=doc.signed_envelope_property,
                    document=doc.decoded(),
                    profile=doc.profile,
                    csv_encoding=doc.csv_encoding,
                    tsa=tsa,
                    now=now,
                    policy=app[_POLICY],
                )
            )
        for entry in req.documentDigests or []:
            for digest in entry.decoded():
                results.append(
                    await service.sign_document(
                        key=key,
                        chain=chain,
                        signature_format="C",
                        conformance_level=entry.conformance_level,
                        envelope="Detached",
                        document=None,
                        document_digest=digest,
                        tsa=tsa,
                        now=now,
                        policy=app[_POLICY],
                    )
                )
    except (GatewayError, ValueError) as e:
        await refund_failed(
            request,
            caller,
            sad=req.SAD,
            grant=grant,
            error=e,
            detail={"credential": grant.credential_id, "method": "signDoc"},
        )
        raise
    for r in results:
        if r.document_with_signature is not None:
            with_signature.append(base64.b64encode(r.document_with_signature).decode("ascii"))
        if r.signature_object is not None:
            signature_objects.append(base64.b64encode(r.signature_object).decode("ascii"))
    body: dict[str, Any] = {}
    if with_signature:
        body["DocumentWithSignature"] = with_signature
    if signature_objects:
        body["SignatureObject"] = signature_objects
    return web.json_response(body)


def setup(app: web.Application) -> None:
    """Register the route; the TSA client (one HTTP session per worker) lives with the app."""
    app[_POLICY] = signing_policy(app[SETTINGS])
    app[_TSA] = tsa_client(app[SETTINGS])

    async def tsa_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        client = app[_TSA]
        if client is not None:
            await client.close()

    app.cleanup_ctx.append(tsa_ctx)
    app.add_routes(routes)
