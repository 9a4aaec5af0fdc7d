"""Reads of the signer aggregate (signer, the facilities it serves, its credentials and what
it proves presence with) that more than one service or handler needs: one query each.

Only rows come back; the rules they are checked against are ``gateway.signing.rules``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.fast import FastStatement
from gateway.store.schema import credential, fido_credential, jpki_binding, signer, signer_facility


async def signer_status(conn: AsyncConnection, signer_id: str) -> str | None:
    """The signer's status, None when there is no such signer."""
    return (
        await conn.execute(select(signer.c.status).where(signer.c.id == signer_id))
    ).scalar_one_or_none()


# Built once with bind parameters (hot path of every ceremony): SQLAlchemy reuses their cache
# keys and compiled forms instead of rebuilding the expressions per request.
_SERVED_CREDENTIAL = (
    select(
        credential.c.signer_id,
        credential.c.status,
        signer.c.status.label("signer_status"),
    )
    .select_from(
        credential.join(signer, signer.c.id == credential.c.signer_id).join(
            signer_facility, signer_facility.c.signer_id == signer.c.id
        )
    )
    .where(
        credential.c.id == bindparam("credential_id"),
        signer_facility.c.facility_id == bindparam("facility_id"),
    )
)


async def served_credential(conn: AsyncConnection, *, credential_id: str, facility_id: int) -> Any:
    """``(signer_id, status, signer_status)`` of a credential whose signer serves the facility;
    None when there is none (unknown, or of a signer of another facility)."""
    params = {"credential_id": credential_id, "facility_id": facility_id}
    return (await conn.execute(_SERVED_CREDENTIAL, params)).one_or_none()


_MAY_SIGN = (
    select(
        credential.c.signer_id,
        credential.c.status,
        credential.c.certificate_der,
        signer.c.status.label("signer_status"),
        signer_facility.c.facility_id,
    )
    .select_from(
        credential.join(signer, signer.c.id == credential.c.signer_id).outerjoin(
            signer_facility,
            (signer_facility.c.signer_id == signer.c.id)
            & (signer_facility.c.facility_id == bindparam("facility_id")),
        )
    )
    .where(credential.c.id == bindparam("credential_id"))
)


_MAY_SIGN_FAST = FastStatement(_MAY_SIGN)  # on the SQLite write connection


async def may_sign_row(conn: AsyncConnection, *, credential_id: str, facility_id: int) -> Any:
    """What the may-sign rule needs: the credential's signer, status and certificate, the
    signer's status and whether it serves the facility (``facility_id`` NULL when not); None
    for an unknown credential."""
    params = {"credential_id": credential_id, "facility_id": facility_id}
    return (await conn.execute(_MAY_SIGN, params)).one_or_none()


def may_sign_row_sync(conn: Connection, *, credential_id: str, facility_id: int) -> Any:
    """:func:`may_sign_row` on a synchronous connection (grouped writes)."""
    params = {"credential_id": credential_id, "facility_id": facility_id}
    return _MAY_SIGN_FAST.one_or_none(conn, params)


async def facility_credentials(
    conn: AsyncConnection,
    facility_id: int,
    *,
    user_id: str | None = None,
    credential_id: str | None = None,
) -> list[Any]:
    """The credential rows offered to a facility (those of the signers serving it that have a
    certificate), oldest first; narrowed to one signer or one credential when asked."""
    q = (
        select(credential)
        .select_from(
            credential.join(signer, credential.c.signer_id == signer.c.id).join(
                signer_facility, signer_facility.c.signer_id == signer.c.id
            )
        )
        .where(signer_facility.c.facility_id == facility_id)
        # A credential still waiting for its certificate cannot sign: not offered to systems.
        .where(credential.c.certificate_der.is_not(None))
        .order_by(credential.c.created_at)
    )
    if user_id is not None:
        q = q.where(signer.c.id == user_id)
    if credential_id is not None:
        q = q.where(credential.c.id == credential_id)
    return list((await conn.execute(q)).all())


async def registered_presence(conn: AsyncConnection, signer_id: str) -> dict[str, bool]:
    """Which presence methods the signer has registered: a FIDO2 authenticator (``webauthn``),
    a linked My Number card (``jpki``)."""
    fido = (
        await conn.execute(
            select(fido_credential.c.id).where(fido_credential.c.signer_id == signer_id)
        )
    ).first()
    card = (
        await conn.execute(select(jpki_binding.c.id).where(jpki_binding.c.signer_id == signer_id))
    ).first()
    return {"webauthn": fido is not None, "jpki": card is not None}
