"""Append-only, hash-chained audit log.

Each event carries the hash of the previous one; the newest (seq, hash) is kept in the single
``audit_head`` row. An append runs inside the caller's write transaction (so the event commits
with the action or not at all) and starts by updating the head row, which serialises appenders:
SQLite's ``BEGIN IMMEDIATE`` write lock, PostgreSQL's row lock.

Hash of event n: ``H(prev_hash || canonical JSON of the event fields)`` where H is SHA-256, or
HMAC-SHA-256 under ``audit.hmac_key_file`` when configured. ``verify`` walks the chain and
reports the first gap in the sequence, broken link, modified row or truncated tail.

``append_many`` (and its synchronous twin ``append_many_sync``, for ``Database.run_write``)
appends several events with the head moved once: one UPDATE ... RETURNING reserves ``n`` sequence
numbers, one multi-row INSERT, one UPDATE of the head hash, whatever ``n`` is. The chain is the
same as ``n`` single appends: event k links to event k-1.

Deleting the newest events and setting the head to the last one kept needs no HMAC key (the head
holds an existing event's seq and hash): ``verify(since=...)`` finds it against a head kept
elsewhere, and each process watches for it while it runs (``_watch``: ``audit.head_rolled_back``).

A string UTF-8 cannot encode (a lone surrogate, from a header byte that is not UTF-8 or a JSON
``\\udcff`` escape) is stored and hashed backslash-escaped (``_escaped``); every other string,
and so every existing event's hash, is unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.clock import Clock, system_clock
from gateway.store.fast import FastStatement
from gateway.store.grouped import defer_to_group
from gateway.store.schema import audit_event, audit_head

if TYPE_CHECKING:
    from gateway.store.db import Database

GENESIS = "0" * 64
#: The event a process appends when it finds the head behind an event it saw committed.
ROLLED_BACK = "audit.head_rolled_back"

log = logging.getLogger("gateway.audit")


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


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """An event to append: what ``AuditLog.append`` takes, as a value (for ``append_many``)."""

    action: str
    actor: str
    facility_code: str | None = None
    signer_id: str | None = None
    detail: Mapping[str, Any] | None = None
    now: datetime | None = None


def _canonical(detail: Mapping[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _escaped(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates: what a byte that is not UTF-8
    becomes in a string decoded with ``surrogateescape``, e.g. an HTTP header, or a JSON
    ``\\udcff`` escape) written as backslash escapes (``\\udcff``); everything else as it is.

    Only for a string that fails to encode: every other string is hashed and stored unchanged,
    so the hashes of existing events (and of every event such a string is not in) are the
    same bytes as before. In the canonical detail JSON a surrogate can only stand inside a
    string, where ``\\udcff`` is the JSON escape of the same character: the detail stays
    valid JSON with the same meaning. The escaped text is what is hashed and stored, so
    ``verify`` recomputes the same hash from the row."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _escaped_or_none(text: str | None) -> str | None:
    return None if text is None else _escaped(text)


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


# Built once (bind parameters only): SQLAlchemy reuses their cache keys and compiled forms.
# On a SQLite file they run on the SQLite write connection (``store/fast.py``).
_RESERVE = FastStatement(
    update(audit_head)
    .where(audit_head.c.id == 1)
    .values(seq=audit_head.c.seq + bindparam("n"))
    .returning(audit_head.c.seq, audit_head.c.hash)
)
_INSERT = FastStatement(
    insert(audit_event),
    column_keys=[f.name for f in fields(AuditEvent)],
)
_ADVANCE = FastStatement(update(audit_head).where(audit_head.c.id == 1).values(hash=bindparam("h")))
#: The hashes of the events this process remembers (at most two: see ``_watch``).
_HASHES_AT = FastStatement(
    select(audit_event.c.seq, audit_event.c.hash).where(
        audit_event.c.seq.in_(bindparam("seqs", expanding=True))
    )
)


class AuditLog:
    """Writes and verifies the chain; holds the optional HMAC key."""

    def __init__(self, *, key: bytes | None = None, clock: Clock = system_clock) -> None:
        self._key = key
        self._clock = clock  # stamps events whose caller gave no ``now``
        #: Per store (``_store_of``): the newest event this process appended, (seq, hash),
        #: committed or not (its transaction may still roll back), and the newest one it has
        #: since found committed (see ``_watch``).
        self._pending: dict[Hashable, tuple[int, str]] = {}
        self._seen: dict[Hashable, tuple[int, str]] = {}

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
        record = AuditRecord(
            action=action,
            actor=actor,
            facility_code=facility_code,
            signer_id=signer_id,
            detail=detail,
            now=now,
        )
        return (await self.append_many(conn, [record]))[0]

    async def append_alone(
        self,
        db: Database,
        *,
        action: str,
        actor: str,
        facility_code: str | None = None,
        signer_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> AuditEvent:
        """Append one event in a write transaction of its own: a refusal whose work was rolled
        back, or an event about work done outside the store (a mail sent, a CSR built)."""
        async with db.write() as conn:
            return await self.append(
                conn,
                action=action,
                actor=actor,
                facility_code=facility_code,
                signer_id=signer_id,
                detail=detail,
                now=now,
            )

    def record_sync(self, conn: Connection, records: Sequence[AuditRecord]) -> None:
        """Append ``records`` in the caller's transaction: inside a grouped write unit
        (``store/grouped.py``) with the events of the group's other units, in unit order, at
        the end of the group (one head move per group, in the same transaction; dropped with
        the unit if it is rolled back); anywhere else now (``append_many_sync``)."""
        if not defer_to_group(conn, self, records):
            self.append_many_sync(conn, records)

    def flush_group(self, conn: Connection, items: list[Any]) -> None:
        """The events a group's units deferred (``record_sync``), appended at once."""
        self.append_many_sync(conn, items)

    async def append_many(
        self, conn: AsyncConnection, records: Sequence[AuditRecord]
    ) -> list[AuditEvent]:
        """Append ``records`` in order, in the caller's transaction, moving the head once."""
        return await conn.run_sync(self.append_many_sync, records)

    def append_many_sync(
        self, conn: Connection, records: Sequence[AuditRecord]
    ) -> list[AuditEvent]:
        """``append_many`` on a synchronous connection (inside ``Database.run_write``)."""
        if not records:
            return []
        n = len(records)
        row = _RESERVE.one(conn, {"n": n})
        seq, prev_hash = int(row.seq) - n, str(row.hash)
        alarm = self._watch(conn, seq, prev_hash)
        if alarm is not None:
            _RESERVE.one(conn, {"n": 1})
            records = [alarm, *records]
        events: list[AuditEvent] = []
        wall = self._clock()
        for rec in records:
            seq += 1
            ts = (rec.now or wall).astimezone(UTC).isoformat(timespec="microseconds")
            actor, facility_code, signer_id, action = (
                rec.actor, rec.facility_code, rec.signer_id, rec.action,
            )  # fmt: skip
            detail_text = _canonical(rec.detail or {})
            try:
                h = event_hash(
                    key=self._key, seq=seq, ts=ts, actor=actor, facility_code=facility_code,
                    signer_id=signer_id, action=action, detail=detail_text, prev_hash=prev_hash,
                )  # fmt: skip
            except UnicodeEncodeError:
                # A string UTF-8 cannot encode (see _escaped): neither hashed nor stored
                # (SQLite and PostgreSQL refuse it too), and the refusal it came with was a
                # 500. Escaped, only then: strings that encode are hashed as they always were.
                actor, action, detail_text = (
                    _escaped(actor),
                    _escaped(action),
                    _escaped(detail_text),
                )
                facility_code = _escaped_or_none(facility_code)
                signer_id = _escaped_or_none(signer_id)
                h = event_hash(
                    key=self._key, seq=seq, ts=ts, actor=actor, facility_code=facility_code,
                    signer_id=signer_id, action=action, detail=detail_text, prev_hash=prev_hash,
                )  # fmt: skip
            events.append(
                AuditEvent(
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
            )
            prev_hash = h
        # vars(): the flat fields as they are (asdict copies recursively: ~5 % of a group).
        _INSERT.run_many(conn, [vars(ev) for ev in events])
        _ADVANCE.run(conn, {"h": prev_hash})
        self._pending[_store_of(conn)] = (events[-1].seq, events[-1].hash)
        return events[1:] if alarm is not None else events

    def _watch(self, conn: Connection, head_seq: int, head_hash: str) -> AuditRecord | None:
        """Whether the head went back behind an event this process saw committed: the newest
        events deleted and the head set to the last one kept (which needs no HMAC key), or the
        database replaced by an older copy under a running gateway. Returns the
        ``audit.head_rolled_back`` event to append first, naming what was seen, if so.

        Runs under the head row lock (right after ``_RESERVE``): every transaction that
        appended before has committed or rolled back. The event this process appended last
        (``_pending``) is taken as seen once it is in the chain with its hash (one indexed
        read of at most two rows per append); one missing (its transaction rolled back, or
        it was deleted) cannot be told apart and is dropped. Each worker process watches the
        events it appended; ``audit verify --since`` is the check that survives a restart."""
        store = _store_of(conn)
        pending, seen = self._pending.pop(store, None), self._seen.get(store)
        if pending is not None and pending == (head_seq, head_hash):
            # The head is this process's last event (one worker, or no other append since):
            # committed, and nothing is behind it; no read on the signing path.
            self._seen[store] = pending
            return None
        wanted = {m[0] for m in (pending, seen) if m is not None and m[0] <= head_seq}
        found: dict[int, str] = {}
        if wanted:
            found = {
                int(r.seq): str(r.hash) for r in _HASHES_AT.all(conn, {"seqs": sorted(wanted)})
            }
        if pending is not None and found.get(pending[0]) == pending[1]:
            self._seen[store] = seen = pending
        if seen is None or (seen[0] <= head_seq and found.get(seen[0]) == seen[1]):
            return None
        del self._seen[store]  # one alarm per rollback; the next events are watched anew
        log.error(
            "audit head rolled back: event %d (%s) was committed, the head is at event %d (%s); "
            "run 'hpki-gateway audit verify --since' with the last report kept elsewhere",
            seen[0], seen[1], head_seq, head_hash,
        )  # fmt: skip
        return AuditRecord(
            action=ROLLED_BACK,
            actor="gateway",
            detail={
                "instance": f"{socket.gethostname()}:{os.getpid()}",
                "seen_seq": seen[0],
                "seen_hash": seen[1],
                "head_seq": head_seq,
                "head_hash": head_hash,
            },
        )

    async def verify(
        self, conn: AsyncConnection, *, since: tuple[int, str] | None = None
    ) -> AuditReport:
        """Walk the whole chain; stop at the first problem.

        ``since``: an earlier report's ``(events, head_hash)``, kept off the database host.
        The chain must still hold that event with that hash: deleting the newest events and
        setting the head back to the last one kept is a consistent chain (no key needed: the
        head holds only an existing event's seq and hash), which only a head recorded
        elsewhere tells apart (``rolled_back``; ``diverged`` when that event differs).

        The events and the head are read in one snapshot: on PostgreSQL the transaction is
        REPEATABLE READ (under READ COMMITTED each statement has its own, so an event appended
        while the walk ran put the head ahead of the walked events: a live, intact chain read
        'truncated'); a SQLite read transaction is one snapshot already."""
        if conn.dialect.name == "postgresql" and not conn.in_transaction():
            await conn.execution_options(isolation_level="REPEATABLE READ")
        expected_seq = 1
        prev = GENESIS
        count = 0
        sads = _SadReplay()
        since_hash = GENESIS if since is not None and since[0] == 0 else None
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
            unapproved = sads.see(r.action, r.ts, r.facility_code, r.detail)
            if unapproved is not None:
                return AuditReport.fail(
                    count, seq, "unapproved_signature", f"event {seq}: {unapproved}"
                )
            prev = r.hash
            if since is not None and seq == since[0]:
                since_hash = r.hash
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
        if since is not None:
            if count < since[0]:
                return AuditReport.fail(
                    count,
                    since[0],
                    "rolled_back",
                    f"the chain ends at event {count} but event {since[0]} was recorded "
                    "earlier: the newest events were removed and the head set back, or the "
                    "database was restored from an older copy",
                )
            if since_hash is None or not hmac.compare_digest(since_hash, since[1]):
                return AuditReport.fail(
                    count,
                    since[0],
                    "diverged",
                    f"event {since[0]} is not the one recorded earlier: its hash differs",
                )
        return AuditReport(
            ok=True, events=count, seq=None, problem=None, message="chain intact", head_hash=prev
        )


_SPENDS = frozenset({"signature.sign_hash", "signature.sign_doc"})


@dataclass(kw_only=True)
class _Issued:
    credential: Any
    facility_code: str | None
    scal: Any
    left: int
    hashes: Counter[str]
    expires: datetime | None


def _utc(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class _SadReplay:
    """The SAD ledger replayed from the chain, for ``verify``: every signature event that
    names its SAD (``"sad"``: the row id, since 2026-11-28) must spend a SAD a ``sad.issue``
    event issued, for its credential and facility, before it expired, within its count and
    (SCAL 2) its hashes, less what earlier signatures spent and plus what ``signature.failed``
    refunded.
    Someone who can write the database but not the HMAC key can insert a SAD row and sign
    with it; its signature is audited but has no approval in the chain, and this finds it."""

    def __init__(self) -> None:
        self.sads: dict[int, _Issued] = {}

    def see(self, action: str, ts: str, facility_code: str | None, detail_text: str) -> str | None:
        if action != "sad.issue" and action not in _SPENDS and action != "signature.failed":
            return None
        try:
            d = json.loads(detail_text)
        except ValueError:
            return None
        sad = d.get("sad") if isinstance(d, dict) else None
        if not isinstance(sad, int) or isinstance(sad, bool):
            return None  # an event from before SAD ids were recorded, or not about a SAD
        if action == "sad.issue":
            expires = d.get("expires_at")
            self.sads[sad] = _Issued(
                credential=d.get("credential"),
                facility_code=facility_code,
                scal=d.get("scal"),
                left=int(d.get("num_signatures") or 0),
                hashes=Counter(d.get("hashes") or []),
                expires=_utc(expires) if isinstance(expires, str) else None,
            )
            return None
        if action == "signature.sign_doc":
            hashes = [str(x.get("digest")) for x in d.get("documents") or []]
        else:
            hashes = [str(h) for h in d.get("hashes") or []]
        issued = self.sads.get(sad)
        if action == "signature.failed":
            if issued is not None and d.get("refunded") is True:
                issued.left += len(hashes)
                if issued.scal == "2":
                    issued.hashes.update(hashes)
            return None
        if issued is None:
            return f"a signature spent SAD {sad}, which no sad.issue event issued"
        if d.get("credential") != issued.credential:
            return f"a signature spent SAD {sad} with another credential than it was issued for"
        if facility_code != issued.facility_code:
            return f"a signature spent SAD {sad} at another facility than it was issued to"
        if issued.expires is not None and _utc(ts) >= issued.expires:
            return f"a signature spent SAD {sad} after it expired"
        if len(hashes) > issued.left:
            return f"a signature spent SAD {sad} beyond the number of signatures it authorized"
        if issued.scal == "2":
            need = Counter(hashes)
            if any(issued.hashes[h] < k for h, k in need.items()):
                return f"a signature spent SAD {sad} on a hash it was not issued for"
            issued.hashes.subtract(need)
        issued.left -= len(hashes)
        return None


def _store_of(conn: Connection) -> Hashable:
    """Which database ``conn`` is on, the same for a Database's async, write-thread and inline
    connections (one process may open several stores: the CLI, tests)."""
    url = conn.engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return id(conn.engine)
    return (url.get_backend_name(), url.host, url.port, url.database)


@dataclass(frozen=True, kw_only=True)
class AuditReport:
    ok: bool
    events: int  # events verified before the first problem (all of them when ok)
    seq: int | None  # the event at fault
    #: gap | broken_link | modified | truncated | head_missing | unapproved_signature |
    #: rolled_back | diverged
    problem: str | None
    message: str
    #: The newest event's hash (the head's) when the chain is intact: with ``events`` (its
    #: seq), what to keep off the database host to tell a restore's losses later
    #: (docs/deployment.md). The genesis value for an empty chain; None when broken.
    head_hash: str | None = None

    @classmethod
    def fail(cls, events: int, seq: int | None, problem: str, message: str) -> AuditReport:
        return cls(ok=False, events=events, seq=seq, problem=problem, message=message)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)
