"""Append-only, hash-chained audit log.

Each event carries the hash of the previous one; the newest (seq, hash) is kept in the single
``audit_head`` row. An append runs inside the caller's write transaction (so the event commits
with the action or not at all) and starts by updating the head row, which serialises appenders:
SQLite's ``BEGIN IMMEDIATE`` write lock, PostgreSQL's row lock.

Hash of event n: ``H(prev_hash || canonical JSON of the event fields)`` where H is SHA-256, or
HMAC-SHA-256 under ``audit.hmac_key_file`` when configured. ``verify`` walks the chain and
reports the first gap in the sequence, broken link, modified row or truncated tail.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.schema import audit_event, audit_head

GENESIS = "0" * 64


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    seq: int
    ts: str
    actor: str
    facility_code: str | None
    signer_id: str | None
    action: str
    detail: str  # canonical JSON text
    prev_hash: str
    hash: str


def _canonical(detail: Mapping[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(
    *,
    key: bytes | None,
    seq: int,
    ts: str,
    actor: str,
    facility_code: str | None,
    signer_id: str | None,
    action: str,
    detail: str,
    prev_hash: str,
) -> str:
    body = json.dumps(
        [seq, ts, actor, facility_code, signer_id, action, detail],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    msg = prev_hash.encode() + b"|" + body
    if key is not None:
        return hmac.new(key, msg, hashlib.sha256).hexdigest()
    return hashlib.sha256(msg).hexdigest()


class AuditLog:
    """Writes and verifies the chain; holds the optional HMAC key."""

    def __init__(self, *, key: bytes | None = None) -> None:
        self._key = key

    async def append(
        self,
        conn: AsyncConnection,
        *,
        action: str,
        actor: str,
        facility_code: str | None = None,
        signer_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> AuditEvent:
        """Append one event in the caller's transaction; never logs secrets (callers' duty)."""
        row = (
            await conn.execute(
                update(audit_head)
                .where(audit_head.c.id == 1)
                .values(seq=audit_head.c.seq + 1)
                .returning(audit_head.c.seq, audit_head.c.hash)
            )
        ).one()
        seq, prev_hash = int(row.seq), str(row.hash)
        ts = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
        detail_text = _canonical(detail or {})
        h = event_hash(
            key=self._key,
            seq=seq,
            ts=ts,
            actor=actor,
            facility_code=facility_code,
            signer_id=signer_id,
            action=action,
            detail=detail_text,
            prev_hash=prev_hash,
        )
        ev = AuditEvent(
            seq=seq,
            ts=ts,
            actor=actor,
            facility_code=facility_code,
            signer_id=signer_id,
            action=action,
            detail=detail_text,
            prev_hash=prev_hash,
            hash=h,
        )
        await conn.execute(insert(audit_event).values(**asdict(ev)))
        await conn.execute(update(audit_head).where(audit_head.c.id == 1).values(hash=h))
        return ev

    async def verify(self, conn: AsyncConnection) -> AuditReport:
        """Walk the whole chain; stop at the first problem."""
        expected_seq = 1
        prev = GENESIS
        count = 0
        result = await conn.stream(select(audit_event).order_by(audit_event.c.seq))
        async for r in result:
            seq = int(r.seq)
            if seq != expected_seq:
                return AuditReport.fail(
                    count,
                    seq,
                    "gap",
                    f"gap in the sequence: expected event {expected_seq}, found {seq}",
                )
            if r.prev_hash != prev:
                return AuditReport.fail(
                    count,
                    seq,
                    "broken_link",
                    f"broken link at event {seq}: prev_hash does not match event {seq - 1}",
                )
            recomputed = event_hash(
                key=self._key,
                seq=seq,
                ts=r.ts,
                actor=r.actor,
                facility_code=r.facility_code,
                signer_id=r.signer_id,
                action=r.action,
                detail=r.detail,
                prev_hash=r.prev_hash,
            )
            if not hmac.compare_digest(recomputed, r.hash):
                return AuditReport.fail(
                    count, seq, "modified", f"event {seq} was modified: its hash does not match"
                )
            prev = r.hash
            expected_seq += 1
            count += 1
        head = (await conn.execute(select(audit_head).where(audit_head.c.id == 1))).one_or_none()
        if head is None:
            return AuditReport.fail(count, None, "head_missing", "the audit head row is missing")
        if int(head.seq) != count or head.hash != prev:
            return AuditReport.fail(
                count,
                int(head.seq),
                "truncated",
                f"the chain ends at event {count} but the head records event {head.seq}: "
                "events were removed from the end or the head was altered",
            )
        return AuditReport(ok=True, events=count, seq=None, problem=None, message="chain intact")


@dataclass(frozen=True, kw_only=True)
class AuditReport:
    ok: bool
    events: int  # events verified before the first problem (all of them when ok)
    seq: int | None  # the event at fault
    problem: str | None  # gap | broken_link | modified | truncated | head_missing
    message: str

    @classmethod
    def fail(cls, events: int, seq: int | None, problem: str, message: str) -> AuditReport:
        return cls(ok=False, events=events, seq=seq, problem=problem, message=message)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)
