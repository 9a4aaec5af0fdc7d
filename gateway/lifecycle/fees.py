"""Fees: one ledger entry per chargeable event, written in the event's own transaction.

The source documents charge 1,500 yen for every certificate issued or renewed, and 753 yen
postage when a new certificate is needed because the old one expired or its password notice
was lost; a renewal in time or a re-send costs no postage. Amounts come from ``[fees]`` at the
moment of the event and are stored with it, so a later change of the fee table never alters a
past statement. An entry is unique per (certificate, kind): an event is never charged twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.config import Settings
from gateway.errors import InvalidRequest
from gateway.store.schema import fee_entry

#: Why a new certificate costs postage (the notice travels by post again).
POSTAGE_REASONS = {
    "expired": "有効期限切れ後の新規発行",
    "notice_lost": "パスワード通知書紛失による再発行",
}

EVENT_TEXT = {
    "issue": "クライアント証明書発行",
    "renewal": "クライアント証明書更新",
    "reissue": "クライアント証明書再発行",
    "est_renewal": "クライアント証明書更新（自動更新）",
    "code_change": "医療機関等コード変更による発行",
    "provisional_to_real": "仮コードから正式コードへの発行",
}


async def charge_issuance_in(
    conn: AsyncConnection,
    settings: Settings,
    *,
    facility_id: int,
    institution_code: str,
    serial: str,
    event: str,
    postage: str | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """The entries of one issued certificate: the licence fee, and postage when due."""
    if postage is not None and postage not in POSTAGE_REASONS:
        raise InvalidRequest(f"postage reason {postage!r} is not one of {sorted(POSTAGE_REASONS)}")
    fees = settings.fees
    entries = [
        {
            "kind": "issuance",
            "amount_yen": fees.issuance_yen,
            "description": EVENT_TEXT.get(event, EVENT_TEXT["issue"]),
        }
    ]
    if postage is not None:
        entries.append(
            {
                "kind": "postage",
                "amount_yen": fees.postage_yen,
                "description": f"郵送手数料（{POSTAGE_REASONS[postage]}）",
            }
        )
    for e in entries:
        await conn.execute(
            insert(fee_entry).values(
                facility_id=facility_id,
                institution_code=institution_code,
                occurred_at=now,
                certificate_serial=serial,
                event=event if e["kind"] == "issuance" else f"postage:{postage}",
                **e,
            )
        )
    return [{**e, "serial": serial} for e in entries]


async def entries_in(
    conn: AsyncConnection, facility_id: int, start: datetime, end: datetime
) -> list[Any]:
    """A facility's entries with ``start <= occurred_at < end``, in order."""
    rows = await conn.execute(
        select(fee_entry)
        .where(
            and_(
                fee_entry.c.facility_id == facility_id,
                fee_entry.c.occurred_at >= start,
                fee_entry.c.occurred_at < end,
            )
        )
        .order_by(fee_entry.c.occurred_at, fee_entry.c.id)
    )
    return list(rows.all())
