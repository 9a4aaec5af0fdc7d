"""CSC ``credentials/authorize`` (FIDO2 assertion or My Number card signature -> SAD) and
``signatures/signHash``.

Decode, validate, call, render: the SAD is issued by ``auth.activation`` and spent by
``signing.core.SigningService``. signHash accepts the v2 field names (``hashes``,
``hashAlgorithmOID``) and the CSC v1 names that pyHanko's ``CSCSigner`` sends (``hash``,
``hashAlgo``); ``signAlgo`` is the same in both. Every attempt is audited: a refusal of bad
input here in its own transaction, everything else by the service. The SAD is never logged or
audited.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from aiohttp import web
from pydantic import Field

from gateway.api.decode import (
    RSA_ENCRYPTION,
    SHA_RSA,
    assertion_from_auth_data,
    caller_of,
    check_lengths,
    decode_hashes,
    digest_algorithm,
)
from gateway.api.keys import ACTIVATION, CLOCK, JPKI, SETTINGS, SIGNING
from gateway.api.schema import CscRequest, parse
from gateway.auth.challenges import Approval
from gateway.auth.jpki import parse_auth_data
from gateway.errors import AccessDenied, GatewayError, InvalidRequest
from gateway.hsm.api import DigestAlgorithm

log = logging.getLogger("gateway.api")
routes = web.RouteTableDef()


class AuthDataItem(CscRequest):
    id: str = Field(max_length=64)
    value: str | dict[str, Any]


class AuthorizeRequest(CscRequest):
    credentialID: str = Field(min_length=1, max_length=200)
    numSignatures: int = Field(ge=1, le=100_000)
    hashes: list[str] | None = None
    hash: list[str] | None = None  # CSC v1 name
    hashAlgorithmOID: str | None = Field(default=None, max_length=64)
    authData: list[AuthDataItem] = Field(min_length=1, max_length=8)
    description: str | None = Field(default=None, max_length=500)


class SignHashRequest(CscRequest):
    credentialID: str = Field(min_length=1, max_length=200)
    SAD: str = Field(min_length=1, max_length=200)
    hashes: list[str] | None = None
    hash: list[str] | None = None  # CSC v1 name (pyHanko)
    hashAlgorithmOID: str | None = Field(default=None, max_length=64)
    hashAlgo: str | None = Field(default=None, max_length=64)  # CSC v1 name (pyHanko)
    signAlgo: str = Field(min_length=1, max_length=64)
    signAlgoParams: str | None = None
    operationMode: str | None = None


def _pick(v2: list[str] | None, v1: list[str] | None, field: str) -> list[str]:
    if v2 is not None and v1 is not None and v2 != v1:
        raise InvalidRequest(f"Invalid parameter {field}: 'hashes' and 'hash' differ")
    value = v2 if v2 is not None else v1
    if value is None:
        raise InvalidRequest(f"Missing (or invalid type) parameter {field}")
    return value


@routes.post("/csc/v2/credentials/authorize")
async def authorize(request: web.Request) -> web.Response:
    caller = caller_of(request)
    if caller.facility_id is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    limit = request.app[SETTINGS].activation.max_hashes_per_request
    try:
        req = await parse(request, AuthorizeRequest)
        raw = req.hashes if req.hashes is not None else (req.hash or [])
        hashes = decode_hashes(raw, field="hashes", max_count=limit)
        if hashes and req.hashAlgorithmOID is not None:
            check_lengths(hashes, digest_algorithm(req.hashAlgorithmOID), field="hashes")
        items = [item.model_dump() for item in req.authData]  # plain dicts
        card = parse_auth_data(items)
        if card is not None and not request.app[SETTINGS].jpki.enabled:
            raise InvalidRequest("Invalid parameter authData: My Number card presence is disabled")
        assertion = assertion_from_auth_data(items) if card is None else {}
    except GatewayError as e:
        # Bad input before a challenge is identified: audited here (the service audits the rest).
        await request.app[SIGNING].refused(
            caller, action="sad.refused", reason=e.description, detail={}
        )
        raise
    approval = Approval(
        credential_id=req.credentialID,
        hashes=hashes,
        hash_algorithm_oid=req.hashAlgorithmOID,
        num_signatures=req.numSignatures,
    )
    if card is not None:  # My Number card: same grant, same ledger, presence "jpki"
        issued = await request.app[JPKI].authorize(
            caller=caller, approval=approval, authorization=card, now=request.app[CLOCK]()
        )
        return web.json_response({"SAD": issued.token, "expiresIn": issued.expires_in})
    issued = await request.app[ACTIVATION].authorize(
        caller=caller, approval=approval, assertion=assertion, now=request.app[CLOCK]()
    )
    return web.json_response({"SAD": issued.token, "expiresIn": issued.expires_in})


def _algorithm(req: SignHashRequest) -> DigestAlgorithm:
    if req.signAlgo not in SHA_RSA and req.signAlgo != RSA_ENCRYPTION:
        raise InvalidRequest(
            f"Invalid parameter signAlgo: {req.signAlgo!r} is not supported; valid: "
            + ", ".join([*SHA_RSA, RSA_ENCRYPTION])
        )
    if req.signAlgoParams:
        raise InvalidRequest("Invalid parameter signAlgoParams: RSA PKCS#1 v1.5 takes none")
    if req.operationMode not in (None, "S"):
        raise InvalidRequest("Invalid parameter operationMode: only 'S' (synchronous)")
    if req.hashAlgorithmOID and req.hashAlgo and req.hashAlgorithmOID != req.hashAlgo:
        raise InvalidRequest("Invalid parameter hashAlgorithmOID: 'hashAlgo' differs")
    oid = req.hashAlgorithmOID or req.hashAlgo
    implied = SHA_RSA.get(req.signAlgo)
    if oid is None:
        if implied is None:
            raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
        return implied
    alg = digest_algorithm(oid)
    if implied is not None and implied is not alg:
        raise InvalidRequest("Invalid parameter hashAlgorithmOID: does not match signAlgo")
    return alg


@routes.post("/csc/v2/signatures/signHash")
async def sign_hash(request: web.Request) -> web.Response:
    caller = caller_of(request)
    if caller.facility_id is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    app = request.app
    limit = app[SETTINGS].activation.max_hashes_per_request
    credential_id: str | None = None
    count = 0
    try:
        req = await parse(request, SignHashRequest)
        credential_id = req.credentialID
        raw = _pick(req.hashes, req.hash, "hashes")
        count = len(raw)
        if not raw:
            raise InvalidRequest("Missing (or invalid type) parameter hashes")
        hashes = decode_hashes(raw, field="hashes", max_count=limit)
        alg = _algorithm(req)
        check_lengths(hashes, alg, field="hashes")
    except GatewayError as e:
        if e.status < 500:
            await app[SIGNING].refused(
                caller,
                action="signature.refused",
                reason=e.description,
                detail={"credential": credential_id, "hashes_in_request": count},
            )
        raise
    signatures = await app[SIGNING].sign_hashes(
        caller,
        sad=req.SAD,
        credential_id=req.credentialID,
        hashes=hashes,
        algorithm=alg,
        refused_detail={"credential": credential_id, "hashes_in_request": count},
    )
    b64 = base64.b64encode
    return web.json_response({"signatures": [b64(s).decode("ascii") for s in signatures]})
