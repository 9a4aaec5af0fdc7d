"""Decoding shared by the CSC and FIDO2 handlers: who calls, base64 hashes, algorithm OIDs,
the WebAuthn assertion inside ``authData``. Each raises ``InvalidRequest`` with the CSC text."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web

from gateway.api import schema
from gateway.api.middleware import identity
from gateway.errors import InvalidRequest
from gateway.hsm.api import DigestAlgorithm
from gateway.signing.grant import Caller

SHA_RSA = {
    "1.2.840.113549.1.1.11": DigestAlgorithm.SHA256,
    "1.2.840.113549.1.1.12": DigestAlgorithm.SHA384,
    "1.2.840.113549.1.1.13": DigestAlgorithm.SHA512,
}
SHA_RSA_256 = "1.2.840.113549.1.1.11"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"


def caller_of(request: web.Request) -> Caller:
    ident = identity(request)
    return Caller(
        actor=ident.actor, facility_id=ident.facility_id, institution_code=ident.institution_code
    )


def decode_hashes(values: list[str], *, field: str, max_count: int) -> list[bytes]:
    """Strict standard base64 (CSC); the array length is limited, never truncated."""
    if len(values) > max_count:
        raise InvalidRequest(
            f"Invalid parameter {field}: at most {max_count} hashes per request "
            "(activation.max_hashes_per_request)"
        )
    out: list[bytes] = []
    for i, v in enumerate(values):
        try:
            out.append(base64.b64decode(v, validate=True))
        except (binascii.Error, ValueError) as e:
            raise InvalidRequest(f"Invalid parameter {field}: item {i} is not base64") from e
    return out


def check_lengths(hashes: list[bytes], algorithm: DigestAlgorithm, *, field: str) -> None:
    for i, h in enumerate(hashes):
        if len(h) != algorithm.digest_size:
            raise InvalidRequest(
                f"Invalid parameter {field}: item {i} is {len(h)} bytes, {algorithm.name} "
                f"digests are {algorithm.digest_size} bytes"
            )


def digest_algorithm(oid: str, *, field: str = "hashAlgorithmOID") -> DigestAlgorithm:
    try:
        return DigestAlgorithm.from_oid(oid)
    except ValueError as e:
        raise InvalidRequest(f"Invalid parameter {field}: {e}") from e


def assertion_from_auth_data(auth_data: list[dict[str, Any]]) -> dict[str, Any]:
    """``authData: [{"id": "webauthn", "value": "<AuthenticationResponse JSON string>"}]``."""
    for item in auth_data:
        if item.get("id") == "webauthn":
            value = item.get("value")
            if isinstance(value, dict):
                return value
            if not isinstance(value, str):
                break
            try:
                parsed = schema.loads(value, what="the webauthn value")
            except InvalidRequest as e:
                raise InvalidRequest(f"Invalid parameter authData: {e.description}") from e
            if not isinstance(parsed, dict):
                break
            return parsed
    raise InvalidRequest(
        'Missing (or invalid type) parameter authData: expected [{"id": "webauthn", '
        '"value": "<AuthenticationResponse JSON>"}]'
    )
