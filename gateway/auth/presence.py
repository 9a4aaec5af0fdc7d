"""What every presence method (FIDO2, My Number card) does alike around its own proof.

Begin: the caller is a facility, the credential's signer serves it and both are active.
Authorize: the request is well formed for what it asks (hash-bound or not), the may-sign rule
holds in the issuing transaction, and a refusal is audited in its own transaction with its
challenge burnt. The proofs themselves stay in ``fido2.py`` and ``jpki.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog
from gateway.auth.challenges import ChallengeStore
from gateway.errors import AccessDenied, InvalidRequest, NotFound
from gateway.hsm.api import DigestAlgorithm
from gateway.signing.grant import Caller
from gateway.signing.rules import require_credential_active, require_may_sign, require_signer_active
from gateway.store import signers as store
from gateway.store.db import Database


def facility_of(caller: Caller) -> tuple[int, str]:
    """The caller's facility (id, institution code): CSC methods are relayed by facilities."""
    if caller.facility_id is None or caller.institution_code is None:
        raise AccessDenied("CSC methods are for facility client certificates")
    return caller.facility_id, caller.institution_code


def hash_algorithm(oid: str | None) -> DigestAlgorithm | None:
    try:
        return DigestAlgorithm.from_oid(oid) if oid else None
    except ValueError as e:
        raise InvalidRequest(f"Invalid parameter hashAlgorithmOID: {e}") from e


def check_bound_request(
    hashes: Sequence[bytes], algorithm: DigestAlgorithm | None, num_signatures: int
) -> DigestAlgorithm:
    """A hash-bound request names its algorithm and one signature per hash."""
    if algorithm is None:
        raise InvalidRequest("Missing (or invalid type) parameter hashAlgorithmOID")
    if num_signatures != len(hashes):
        raise InvalidRequest("Invalid parameter numSignatures: must equal the number of hashes")
    return algorithm


async def require_active_signer(conn: AsyncConnection, signer_id: str) -> None:
    status = await store.signer_status(conn, signer_id)
    if status is None:
        raise NotFound(f"signer {signer_id} does not exist")
    require_signer_active(signer_id, status)


async def signer_of_credential(
    conn: AsyncConnection, *, credential_id: str, facility_id: int
) -> str:
    """At begin: the signer of a credential offered to this facility, both active."""
    row = await store.served_credential(conn, credential_id=credential_id, facility_id=facility_id)
    if row is None:
        raise InvalidRequest("Invalid parameter credentialID")
    require_signer_active(row.signer_id, row.signer_status)
    require_credential_active(credential_id, row.status)
    return str(row.signer_id)


async def check_may_sign(
    conn: AsyncConnection, *, facility_id: int, credential_id: str, now: datetime
) -> None:
    """The one rule, read in the issuing transaction: active signer serving the facility,
    active credential with a certificate valid now (``signing/rules.py``)."""
    row = await store.may_sign_row(conn, credential_id=credential_id, facility_id=facility_id)
    if row is None:
        raise InvalidRequest("Invalid parameter credentialID")
    require_may_sign(
        signer_id=row.signer_id,
        signer_status=row.signer_status,
        serves_facility=row.facility_id is not None,
        credential_id=credential_id,
        credential_status=row.status,
        certificate_der=row.certificate_der,
        now=now,
    )


async def registered_methods(db: Database, signer_id: str) -> dict[str, bool]:
    """Which presence methods ``signer_id`` has registered (``webauthn``, ``jpki``)."""
    async with db.read() as conn:
        return await store.registered_presence(conn, signer_id)


async def record_refusal(
    db: Database,
    audit: AuditLog,
    challenges: ChallengeStore,
    *,
    action: str,
    caller: Caller,
    signer_id: str | None,
    reason: str,
    challenge: str | None,
    detail: Mapping[str, Any] | None,
    now: datetime,
) -> None:
    """Record a refused ceremony in its own transaction and burn its challenge."""
    async with db.write() as conn:
        if challenge is not None:
            await challenges.burn(conn, challenge, now=now)
        await audit.append(
            conn,
            action=action,
            actor=caller.actor,
            facility_code=caller.institution_code,
            signer_id=signer_id,
            detail={"reason": reason, **(detail or {})},
            now=now,
        )
