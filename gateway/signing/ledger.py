"""The SAD ledger: a ``Grant`` stored behind an opaque token, spent atomically, refunded.

The SAD is an opaque random token (``secrets.token_urlsafe(32)``) stored only as its SHA-256.
It is bound to the facility that asked for it, the signer, the CSC credential, the presence
method, the hash algorithm, the MULTISET of hashes the signer approved and a remaining count,
and it expires.

``consume`` (inside the caller's write transaction) raises ``InvalidRequest`` with the CSC
texts ("Invalid parameter SAD", "SAD expired", "SAD was not issued to this facility", "SAD is
not valid for this credential", "Hash algorithm does not match the SAD", "Number of signatures
exceeds those authorized by the SAD", "Hash is not authorized by the SAD") or ``AccessDenied``
(``rules.require_may_sign``). If signing then fails, ``refund`` gives the consumed count back.

Atomicity: ``consume`` first reads the SAD (joined with its signer, credential and
certificate; ``FOR UPDATE OF sad`` on PostgreSQL) and the remaining count of each requested hash,
refuses with the texts above if anything is short, and only then writes conditional UPDATEs,
``sad.remaining -= n WHERE remaining >= n`` and, for hash-bound SADs, ``sad_hash.remaining -= k
WHERE hash = h AND remaining >= k`` per distinct hash, with every row count checked anyway. On
SQLite the write transaction is ``BEGIN IMMEDIATE`` (one writer across all worker processes); on
PostgreSQL the SAD row lock taken by the read is held to commit, and the UPDATEs re-check their
WHERE clause regardless. Either way two requests can never both spend the last signature, and a
request that fails part-way rolls back whole.

**The fast path: ``consume_and_audit(SignRequest(...))``** does the same check, consumption and
audit event, but groups concurrently waiting requests into ONE write transaction (one lock, one
``BEGIN IMMEDIATE``, one COMMIT, one audit-head update for the whole group, all in one
transaction: ``Database.run_write``). Each request is still checked on its own, in order,
against what the requests before it in the group spent; a refused request writes nothing but its
``refused_action`` audit event, so it never fails the others. It returns once the group has
committed, i.e. with the audit event durable before the caller signs or answers. Both paths are
the same ``_Spender`` (read, check, write), so their rules cannot drift apart.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Integer,
    LargeBinary,
    bindparam,
    column,
    delete,
    insert,
    select,
    update,
    values,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import AuditLog, AuditRecord
from gateway.errors import GatewayError, InvalidRequest, TemporarilyUnavailable
from gateway.hsm.api import DigestAlgorithm
from gateway.signing.grant import Grant, IssuedSad, SignatureGrant
from gateway.signing.rules import require_may_sign
from gateway.store.db import Database
from gateway.store.fast import FastStatement
from gateway.store.schema import credential, facility, sad, sad_hash, signer, signer_facility

if TYPE_CHECKING:
    from gateway.metrics import Metrics


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SignRequest:
    """One signing request for ``SadLedger.consume_and_audit``.

    The consumption is ``consume(sad=..., facility_id=..., credential_id=..., hashes=...,
    algorithm=..., now=...)``; on success the event ``action`` (actor, facility_code, the
    grant's signer, ``detail(grant)``) is appended, on refusal ``refused_action`` with
    ``{"reason": <the CSC text>, **refused_detail}``; both stamped ``now``. ``detail`` runs on
    the database connection's thread inside the transaction: it must be a quick, pure
    function of the grant.
    """

    sad: str
    facility_id: int
    credential_id: str
    hashes: Sequence[bytes]
    algorithm: DigestAlgorithm
    now: datetime
    actor: str
    facility_code: str | None
    action: str
    detail: Callable[[SignatureGrant], Mapping[str, Any]]
    refused_action: str = "signature.refused"
    refused_detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class _Pending:
    req: SignRequest
    token: str  # token_hash(req.sad), computed on the event loop
    future: asyncio.Future[SignatureGrant]


#: A group transaction takes at most this many waiting requests / hashes (the first always).
_PG_GROUPS_IN_FLIGHT = 2
GROUP_MAX_REQUESTS = 64
GROUP_MAX_HASHES = 1000


class SadLedger:
    """Stores grants as SADs and spends them (see the module docstring)."""

    def __init__(self, *, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        # consume_and_audit: requests waiting for the next group transaction, and its runner.
        self._queue: deque[_Pending] = deque()
        self._drainers: set[asyncio.Task[None]] = set()
        #: Group transactions in flight at once: one on SQLite (one writer anyway); on
        #: PostgreSQL a second group reads and locks its SADs while the first appends to the
        #: audit log and commits (row locks keep them apart, as between two instances).
        self._in_flight = 1 if db.is_sqlite else _PG_GROUPS_IN_FLIGHT
        #: Set by the app (gateway/metrics.py); counts SADs issued.
        self.metrics: Metrics | None = None

    async def issue(
        self,
        conn: AsyncConnection,
        grant: Grant,
        *,
        actor: str,
        facility_code: str | None,
        now: datetime,
    ) -> IssuedSad:
        """Store ``grant`` as a new SAD in the caller's transaction, with its audit event."""
        issued = await conn.run_sync(
            lambda c: self.issue_sync(c, grant, actor=actor, facility_code=facility_code, now=now)
        )
        self.count_issued()
        return issued

    def count_issued(self) -> None:
        """Count an issued SAD (after ``issue_sync``, once its transaction committed)."""
        if self.metrics is not None:
            self.metrics.sad.labels("issued").inc()

    def issue_sync(
        self,
        conn: Connection,
        grant: Grant,
        *,
        actor: str,
        facility_code: str | None,
        now: datetime,
    ) -> IssuedSad:
        """:meth:`issue` on a synchronous connection (grouped writes); the caller counts it
        (:meth:`count_issued`) once committed."""
        token = secrets.token_urlsafe(32)
        bound = grant.scal == "2"
        alg = grant.hash_algorithm
        expires = now + grant.ttl
        sad_id = _ISSUE.insert(
            conn,
            {
                "token_hash": token_hash(token),
                "facility_id": grant.facility_id,
                "signer_id": grant.signer_id,
                "credential_id": grant.credential_id,
                "fido_credential_id": grant.presence_ref,
                "presence": grant.presence,
                "hash_algorithm": alg.value if (alg and bound) else None,
                "scal": grant.scal,
                "num_signatures": grant.count,
                "remaining": grant.count,
                "created_at": now,
                "expires_at": expires,
            },
        )
        if bound:
            multiset = Counter(bytes(h) for h in grant.hashes)
            _ISSUE_HASHES.run_many(
                conn,
                [
                    {"sad_id": sad_id, "hash": h, "authorized": k, "remaining": k}
                    for h, k in multiset.items()
                ],
            )
        self.audit.record_sync(
            conn,
            [
                AuditRecord(
                    action="sad.issue",
                    actor=actor,
                    facility_code=facility_code,
                    signer_id=grant.signer_id,
                    detail={
                        "sad": sad_id,
                        "credential": grant.credential_id,
                        **grant.evidence,
                        "scal": grant.scal,
                        "num_signatures": grant.count,
                        "hash_algorithm": alg.value if alg else None,
                        "hashes": [h.hex() for h in grant.hashes],
                        "expires_at": expires.isoformat(),
                    },
                    now=now,
                )
            ],
        )
        return IssuedSad(
            token=token,
            expires_in=int(grant.ttl.total_seconds()),
            scal=grant.scal,
            num_signatures=grant.count,
        )

    async def consume(
        self,
        conn: AsyncConnection,
        *,
        sad: str,
        facility_id: int,
        credential_id: str,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm,
        now: datetime,
    ) -> SignatureGrant:
        """Spend the SAD on ``hashes`` inside the caller's write transaction (see module doc)."""

        token = token_hash(sad)

        def spend(sync_conn: Connection) -> SignatureGrant:
            spender = _Spender(sync_conn, [token], hashes)
            grant = spender.check(
                token=token,
                facility_id=facility_id,
                credential_id=credential_id,
                hashes=hashes,
                algorithm=algorithm,
                now=now,
            )
            spender.write()
            return grant

        return await conn.run_sync(spend)

    async def consume_and_audit(self, req: SignRequest) -> SignatureGrant:
        """``consume`` + the audit event, grouped with concurrent callers into one transaction.

        Returns the grant once the consumption and its ``req.action`` event are committed;
        raises the refusal (``InvalidRequest``/``AccessDenied``) once a ``req.refused_action``
        event saying why is committed, so callers must not audit it again. See the module doc.
        """
        return await self.submit(req)

    def submit(self, req: SignRequest) -> asyncio.Future[SignatureGrant]:
        """Queue ``req`` for the next group; its outcome as a future (``consume_and_audit``
        awaits it). Cancelling the future after the request joined a group cannot stop the
        spend: the caller that goes away shields the future and refunds what it resolves to
        (``SigningService._spend``)."""
        loop = asyncio.get_running_loop()
        pending = _Pending(req=req, token=token_hash(req.sad), future=loop.create_future())
        self._queue.append(pending)
        # A finished drainer leaves the set only in a later callback: count the running ones.
        if sum(not t.done() for t in self._drainers) < self._in_flight:
            task = loop.create_task(self._drain())
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        return pending.future

    async def _drain(self) -> None:
        """Run the queue as batches, one write transaction each, until it is empty.

        Requests that arrive while a batch is in the database wait for the next one: under
        load a batch holds every request that queued during the previous one.
        """
        while self._queue:
            batch: list[_Pending] = []
            n_hashes = 0
            while self._queue and len(batch) < GROUP_MAX_REQUESTS:
                nxt = len(self._queue[0].req.hashes)
                if batch and n_hashes + nxt > GROUP_MAX_HASHES:
                    break
                batch.append(self._queue.popleft())
                n_hashes += nxt
            try:
                outcomes = await self.db.run_write(functools.partial(self._run_group, batch=batch))
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, out in zip(batch, outcomes, strict=True):
                if p.future.done():  # the request went away; its outcome is committed anyway
                    continue
                if isinstance(out, SignatureGrant):
                    p.future.set_result(out)
                else:
                    p.future.set_exception(out)

    def _run_group(
        self, conn: Connection, *, batch: Sequence[_Pending]
    ) -> list[SignatureGrant | Exception]:
        """One write transaction for a batch (runs in ``Database.run_write``).

        Each request is checked on its own, in arrival order, against what its predecessors in
        the batch spent (``_Spender``: two requests spending the last signature of one SAD
        cannot both pass). A refused request spends nothing, so it fails alone and is audited
        as refused; a failure in the writes (which cannot fail after the checks under the
        write lock) or in the audit append aborts the whole transaction, and every request of
        the batch gets the error. Statements per batch: BEGIN (IMMEDIATE on SQLite), two
        reads, two UPDATEs (executemany with row counts on SQLite; on asyncpg, which reports
        no executemany row count, one ``UPDATE ... FROM (VALUES ...) RETURNING`` each), three
        for the audit chain, COMMIT, whatever its size.
        """
        spender = _Spender(conn, [p.token for p in batch], (h for p in batch for h in p.req.hashes))
        outcomes: list[SignatureGrant | Exception] = []
        for p in batch:
            r = p.req
            try:
                outcomes.append(
                    spender.check(
                        token=p.token,
                        facility_id=r.facility_id,
                        credential_id=r.credential_id,
                        hashes=r.hashes,
                        algorithm=r.algorithm,
                        now=r.now,
                    )
                )
            except GatewayError as e:
                if e.status >= 500:
                    raise
                outcomes.append(e)
            except DBAPIError:
                raise  # the transaction may be unusable: the whole batch fails
            except Exception as e:  # noqa: BLE001 - e.g. an unparsable certificate: this
                outcomes.append(e)  # request fails (500, not audited, as before), not the batch
        try:
            spender.write()
        except GatewayError as e:
            raise TemporarilyUnavailable(
                "signature activation changed during the transaction; retry", retry_after=1
            ) from e
        records: list[AuditRecord] = []
        for p, out in zip(batch, outcomes, strict=True):
            r = p.req
            if isinstance(out, SignatureGrant):
                action, signer_id, detail = r.action, out.signer_id, r.detail(out)
            elif isinstance(out, GatewayError):
                action, signer_id = r.refused_action, None
                detail = {"reason": out.description, **r.refused_detail}
            else:
                continue
            records.append(
                AuditRecord(
                    action=action,
                    actor=r.actor,
                    facility_code=r.facility_code,
                    signer_id=signer_id,
                    detail=detail,
                    now=r.now,
                )
            )
        self.audit.append_many_sync(conn, records)
        return outcomes

    async def refund(self, conn: AsyncConnection, *, sad: str, grant: SignatureGrant) -> None:
        """Give back what ``consume`` took when the signature could not be produced."""
        row = (
            await conn.execute(
                select(_sad.c.id, _sad.c.scal).where(_sad.c.token_hash == token_hash(sad))
            )
        ).one_or_none()
        if row is None:
            return
        await conn.execute(
            update(_sad)
            .where(_sad.c.id == row.id)
            .values(remaining=_sad.c.remaining + len(grant.hashes))
        )
        if row.scal == "2":
            for h, k in Counter(grant.hashes).items():
                await conn.execute(
                    update(sad_hash)
                    .where(sad_hash.c.sad_id == row.id, sad_hash.c.hash == h)
                    .values(remaining=sad_hash.c.remaining + k)
                )


_sad = sad  # the module-level name is shadowed by the ``sad`` parameters
#: The columns ``issue_sync`` gives a new SAD.
_SAD_COLUMNS = (
    "token_hash", "facility_id", "signer_id", "credential_id", "fido_credential_id",
    "presence", "hash_algorithm", "scal", "num_signatures", "remaining", "created_at",
    "expires_at",
)  # fmt: skip
#: A new SAD (bind parameters only: compiled once).
#: On the SQLite write connection (``store/fast.py``).
_ISSUE = FastStatement(insert(_sad), column_keys=_SAD_COLUMNS)
_ISSUE_HASHES = FastStatement(
    insert(sad_hash), column_keys=("sad_id", "hash", "authorized", "remaining")
)


async def _lock_in_id_order(conn: AsyncConnection, *where: Any) -> list[int]:
    """Lock the SADs matching ``where`` in id order, the order a consume group locks them in
    (``_SADS``): a bulk UPDATE or DELETE would lock them in whatever order PostgreSQL scans
    (heap or expiry index), and deadlock with a group holding one of them and waiting for
    another. SQLite: one writer, the clause renders empty."""
    rows = await conn.execute(select(_sad.c.id).where(*where).order_by(_sad.c.id).with_for_update())
    return [int(r[0]) for r in rows]


async def end_sads_of(conn: AsyncConnection, presence_ref: str, *, now: datetime) -> int:
    """End every live SAD that ``presence_ref`` (an authenticator, a card link) approved: a
    lost key or card must not keep signing through what it opened. Returns how many."""
    ids = await _lock_in_id_order(
        conn, _sad.c.fido_credential_id == presence_ref, _sad.c.expires_at > now
    )
    if ids:
        await conn.execute(update(_sad).where(_sad.c.id.in_(ids)).values(expires_at=now))
    return len(ids)


async def end_sessions(conn: AsyncConnection, facility_id: int, *, now: datetime) -> int:
    """End the facility's live signing sessions (SCAL 1 SADs). Returns how many."""
    ids = await _lock_in_id_order(
        conn, _sad.c.facility_id == facility_id, _sad.c.scal == "1", _sad.c.expires_at > now
    )
    if ids:
        await conn.execute(update(_sad).where(_sad.c.id.in_(ids)).values(expires_at=now))
    return len(ids)


async def purge_expired(conn: AsyncConnection, *, before: datetime) -> int:
    """Delete the SADs that expired before ``before``, with their hashes; returns how many.
    Rows a consume group holds are skipped (``SKIP LOCKED``, PostgreSQL; the next run takes
    them): the purge never waits for signing, and locks in id order, SAD before hashes, as a
    group does. Subqueries, not id lists: a day of SADs is more ids than a statement takes
    bind parameters."""
    old = (
        select(_sad.c.id)
        .where(_sad.c.expires_at < before)
        .order_by(_sad.c.id)
        .with_for_update(skip_locked=True)
    )
    # sad_hash rows go with their SAD (ON DELETE CASCADE); deleted explicitly too, so the purge
    # does not depend on the database enforcing foreign keys.
    await conn.execute(delete(sad_hash).where(sad_hash.c.sad_id.in_(old)))
    res = await conn.execute(delete(_sad).where(_sad.c.id.in_(old)))
    return int(res.rowcount)


# Statements of the hot path, built once: with bind parameters only, SQLAlchemy reuses their
# memoized cache keys and compiled forms instead of rebuilding expressions per request.

#: The SADs with everything ``consume`` checks about their signer, credential and certificate,
#: in one indexed read (token_hash is unique). FOR UPDATE OF sad on PostgreSQL, in id order (a
#: fixed lock order: two workers' groups cannot deadlock): the rows stay locked until commit,
#: so the remaining counts read here are the ones the UPDATEs change. SQLite: BEGIN IMMEDIATE
#: already excludes every other writer; the clause renders empty.
_SADS = FastStatement(
    select(
        _sad.c.id,
        _sad.c.token_hash,
        _sad.c.facility_id,
        _sad.c.signer_id,
        _sad.c.credential_id,
        _sad.c.hash_algorithm,
        _sad.c.scal,
        _sad.c.presence,
        _sad.c.expires_at,
        _sad.c.remaining,
        credential.c.key_id,
        credential.c.status.label("credential_status"),
        credential.c.certificate_der,
        credential.c.chain_pem,
        signer.c.status.label("signer_status"),
        signer_facility.c.facility_id.label("serves_facility"),
        facility.c.institution_code,
    )
    .select_from(
        _sad.join(credential, credential.c.id == _sad.c.credential_id)
        .join(signer, signer.c.id == credential.c.signer_id)
        .outerjoin(
            signer_facility,
            (signer_facility.c.signer_id == signer.c.id)
            & (signer_facility.c.facility_id == _sad.c.facility_id),
        )
        .outerjoin(facility, facility.c.id == signer_facility.c.facility_id)
    )
    .where(_sad.c.token_hash.in_(bindparam("tokens", expanding=True)))
    .order_by(_sad.c.id)
    .with_for_update(of=_sad)
)
#: Remaining counts of the requested hashes (a superset when several SADs are read at once).
_HASHES_LEFT = FastStatement(
    select(sad_hash.c.sad_id, sad_hash.c.hash, sad_hash.c.remaining).where(
        sad_hash.c.sad_id.in_(bindparam("sad_ids", expanding=True)),
        sad_hash.c.hash.in_(bindparam("hashes", expanding=True)),
    )
)
_SPEND_SAD = FastStatement(
    update(_sad)
    .where(_sad.c.id == bindparam("b_id"), _sad.c.remaining >= bindparam("b_n"))
    .values(remaining=_sad.c.remaining - bindparam("b_n"))
)
_SPEND_HASH = FastStatement(
    update(sad_hash)
    .where(
        sad_hash.c.sad_id == bindparam("b_sad"),
        sad_hash.c.hash == bindparam("b_hash"),
        sad_hash.c.remaining >= bindparam("b_k"),
    )
    .values(remaining=sad_hash.c.remaining - bindparam("b_k"))
)


class _Spender:
    """Consumption of one or more SADs in one transaction: read once, check in Python, write once.

    ``__init__`` reads (and on PostgreSQL locks) every SAD named by ``tokens`` and the counts
    left of the requested ``hashes`` (two statements whatever the number of requests); ``check``
    validates one request against what is left after the requests checked before it and
    records what it spends, or raises the CSC refusal having recorded nothing; ``write`` applies
    the totals with conditional UPDATEs (``remaining >= spent``) whose row counts are verified,
    so even a check that was wrong could not make a count negative or over-sign.
    """

    def __init__(self, conn: Connection, tokens: Sequence[str], hashes: Iterable[bytes]) -> None:
        self.conn = conn
        self.rows = {r.token_hash: r for r in _SADS.all(conn, {"tokens": sorted(set(tokens))})}
        self.sad_left = {int(r.id): int(r.remaining) for r in self.rows.values()}
        self.hash_left: dict[tuple[int, bytes], int] = {}
        bound = sorted(int(r.id) for r in self.rows.values() if r.scal == "2")
        wanted = sorted({bytes(h) for h in hashes})
        if bound and wanted:
            res = _HASHES_LEFT.all(conn, {"sad_ids": bound, "hashes": wanted})
            self.hash_left = {(int(r.sad_id), bytes(r.hash)): int(r.remaining) for r in res}
        self.sad_spent: Counter[int] = Counter()
        self.hash_spent: Counter[tuple[int, bytes]] = Counter()

    def check(
        self,
        *,
        token: str,
        facility_id: int,
        credential_id: str,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm,
        now: datetime,
    ) -> SignatureGrant:
        if not hashes:
            raise InvalidRequest("Missing (or invalid type) parameter hashes")
        row = self.rows.get(token)
        if row is None:
            raise InvalidRequest("Invalid parameter SAD")
        if row.facility_id != facility_id:
            raise InvalidRequest("SAD was not issued to this facility")
        if row.credential_id != credential_id:
            raise InvalidRequest("SAD is not valid for this credential")
        if row.expires_at <= now:
            raise InvalidRequest("SAD expired")
        if row.scal == "2" and row.hash_algorithm != algorithm.value:
            raise InvalidRequest("Hash algorithm does not match the SAD")
        require_may_sign(
            signer_id=row.signer_id,
            signer_status=row.signer_status,
            serves_facility=row.serves_facility is not None,
            credential_id=credential_id,
            credential_status=row.credential_status,
            certificate_der=row.certificate_der,
            now=now,
        )
        sad_id, n = int(row.id), len(hashes)
        if self.sad_left[sad_id] - self.sad_spent[sad_id] < n:
            raise InvalidRequest("Number of signatures exceeds those authorized by the SAD")
        multiset = Counter((sad_id, bytes(h)) for h in hashes)
        if row.scal == "2":
            left = self.hash_left
            if any(left.get(key, 0) - self.hash_spent[key] < k for key, k in multiset.items()):
                raise InvalidRequest("Hash is not authorized by the SAD")
            self.hash_spent.update(multiset)
        self.sad_spent[sad_id] += n
        return SignatureGrant(
            facility_id=facility_id,
            institution_code=str(row.institution_code),
            signer_id=row.signer_id,
            credential_id=credential_id,
            key_id=row.key_id,
            hashes=tuple(bytes(h) for h in hashes),
            algorithm=algorithm,
            scal=row.scal,
            presence=row.presence,
            sad=sad_id,
            certificate_der=row.certificate_der,
            chain_pem=row.chain_pem,
        )

    def write(self) -> None:
        sads = sorted(self.sad_spent.items())
        hashes = sorted(self.hash_spent.items())
        refusal = "Number of signatures exceeds those authorized by the SAD"
        if len(sads) > 1 and not self.conn.dialect.supports_sane_multi_rowcount:
            # asyncpg reports no row count for executemany: one UPDATE ... FROM (VALUES ...)
            # RETURNING for the whole group instead of a round trip per SAD.
            _returning_checked(self.conn, _spend_sads(sads), len(sads), refusal)
        else:
            _update_checked(
                self.conn, _SPEND_SAD, [{"b_id": i, "b_n": n} for i, n in sads], refusal
            )
        refusal = "Hash is not authorized by the SAD"
        if len(hashes) > 1 and not self.conn.dialect.supports_sane_multi_rowcount:
            _returning_checked(self.conn, _spend_hashes(hashes), len(hashes), refusal)
        else:
            _update_checked(
                self.conn,
                _SPEND_HASH,
                [{"b_sad": i, "b_hash": h, "b_k": k} for (i, h), k in hashes],
                refusal,
            )


@functools.lru_cache(maxsize=GROUP_MAX_REQUESTS)
def _spend_sads_stmt(n: int) -> FastStatement:
    """``_SPEND_SAD`` for ``n`` distinct SADs in one statement, bind parameters only, built
    once per ``n``. SQLAlchemy never caches a statement with a VALUES list; FastStatement
    compiles it once per dialect (``store/fast.py``)."""
    rows = [
        (bindparam(f"i{j}", type_=Integer), bindparam(f"n{j}", type_=Integer)) for j in range(n)
    ]
    v = values(column("id", Integer), column("n", Integer), name="spend").data(rows)
    return FastStatement(
        update(_sad)
        .where(_sad.c.id == v.c.id, _sad.c.remaining >= v.c.n)
        .values(remaining=_sad.c.remaining - v.c.n)
        .returning(_sad.c.id)
    )


@functools.lru_cache(maxsize=256)
def _spend_hashes_stmt(n: int) -> FastStatement:
    """``_SPEND_HASH`` for ``n`` distinct (SAD, hash) rows in one statement."""
    rows = [
        (
            bindparam(f"s{j}", type_=Integer),
            bindparam(f"h{j}", type_=LargeBinary),
            bindparam(f"k{j}", type_=Integer),
        )
        for j in range(n)
    ]
    v = values(
        column("sad_id", Integer), column("hash", LargeBinary), column("k", Integer), name="spend"
    ).data(rows)
    return FastStatement(
        update(sad_hash)
        .where(sad_hash.c.sad_id == v.c.sad_id, sad_hash.c.hash == v.c.hash)
        .where(sad_hash.c.remaining >= v.c.k)
        .values(remaining=sad_hash.c.remaining - v.c.k)
        .returning(sad_hash.c.sad_id)
    )


def _spend_sads(spent: list[tuple[int, int]]) -> tuple[FastStatement, dict[str, Any]]:
    params: dict[str, Any] = {}
    for j, (i, n) in enumerate(spent):
        params[f"i{j}"], params[f"n{j}"] = i, n
    return _spend_sads_stmt(len(spent)), params


def _spend_hashes(
    spent: list[tuple[tuple[int, bytes], int]],
) -> tuple[FastStatement, dict[str, Any]]:
    params: dict[str, Any] = {}
    for j, ((i, h), k) in enumerate(spent):
        params[f"s{j}"], params[f"h{j}"], params[f"k{j}"] = i, h, k
    return _spend_hashes_stmt(len(spent)), params


def _returning_checked(
    conn: Connection, stmt: tuple[FastStatement, dict[str, Any]], expected: int, refusal: str
) -> None:
    """Run a conditional multi-row UPDATE ... RETURNING; refuse unless every row matched."""
    if len(stmt[0].all(conn, stmt[1])) != expected:
        raise InvalidRequest(refusal)


def _update_checked(
    conn: Connection, stmt: FastStatement, params: list[dict[str, Any]], refusal: str
) -> None:
    """Run a one-row conditional UPDATE per parameter set; refuse unless every one matched."""
    if not params:
        return
    if len(params) > 1 and conn.dialect.supports_sane_multi_rowcount:
        if stmt.run_many(conn, params) != len(params):
            raise InvalidRequest(refusal)
        return
    for one in params:
        if stmt.run(conn, one) != 1:
            raise InvalidRequest(refusal)
