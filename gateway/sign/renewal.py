"""The ES-A renewal job: a new archive timestamp for every archived XAdES document whose last
archive timestamp's TSA certificate expires within the window.

Run by the scheduler over ``[signing] archive_renewal_paths`` (files or folders, every ``*.xml``
below a folder) and by ``hpki-gateway extend --renew-within DAYS``. Idempotent: a document is
rewritten only when due, and only when the new archive timestamp's own TSA certificate lasts
beyond the window (else each run would stack timestamps that prove nothing more). Each rewrite
is atomic (a temporary file renamed over the original) and audited (``signature.extend``).
Workers and runs exclude each other with an exclusive lock file per path, so a document is never
renewed twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.clock import Clock, system_clock
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.files import replace_atomically
from gateway.sign.extend import extend_xml, needs_renewal
from gateway.sign.timestamp import TimestampClient
from gateway.sign.xades_ltv import LongTermSource

__all__ = ["renew_configured", "renew_paths", "xml_files"]

LOCK_NAME = ".hpki-gateway-renewal.lock"


def xml_files(paths: Sequence[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*.xml") if q.is_file())
        elif p.is_file():
            yield p


def _list_xml(root: Path) -> list[Path]:
    return list(xml_files([root]))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock beside ``path``; yields False when another holds it."""
    where = path if path.is_dir() else path.parent
    fd = os.open(where / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def renew_paths(
    paths: Sequence[Path],
    *,
    within: dt.timedelta,
    tsa: TimestampClient,
    source: LongTermSource,
    db: Any,
    audit: Any,
    actor: str,
    now: dt.datetime | None = None,
    clock: Clock = system_clock,
) -> list[dict[str, Any]]:
    """One entry per document looked at: ``{"file", "result"}``; result is ``renewed``,
    ``not due``, ``busy`` (another run holds the lock), ``not renewed: ...`` or ``refused: ...``."""
    now = clock() if now is None else now
    out: list[dict[str, Any]] = []
    for root in paths:
        with _locked(root) as mine:
            if not mine:
                out.append({"file": str(root), "result": "busy"})
                continue
            files = await asyncio.to_thread(_list_xml, root)
            for path in files:
                out.append(await _renew_one(path, within, tsa, source, db, audit, actor, now))
    return out


def extension_detail(
    path: Path, level: str, renew: bool, before: bytes, after: bytes
) -> dict[str, Any]:
    """The ``signature.extend`` audit detail: the file, the level, and both documents' digests."""
    return {
        "file": str(path),
        "level": level,
        "renew": renew,
        "document_sha256": hashlib.sha256(before).hexdigest(),
        "extended_sha256": hashlib.sha256(after).hexdigest(),
    }


async def _renew_one(
    path: Path,
    within: dt.timedelta,
    tsa: TimestampClient,
    source: LongTermSource,
    db: Any,
    audit: Any,
    actor: str,
    now: dt.datetime,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": str(path)}
    data = await asyncio.to_thread(path.read_bytes)
    try:
        if not needs_renewal(data, within=within, now=now):
            entry["result"] = "not due"
            return entry
        result = await extend_xml(data, "AdES-B-LTA", tsa=tsa, source=source, renew=True, now=now)
    except GatewayError as e:
        entry["result"] = f"refused: {e.description}"
        return entry
    if needs_renewal(result.document, within=within, now=now):
        entry["result"] = "not renewed: the TSA's own certificate expires within the window"
        return entry
    await asyncio.to_thread(replace_atomically, path, result.document)
    await audit.append_alone(
        db,
        action="signature.extend",
        actor=actor,
        detail=extension_detail(path, "AdES-B-LTA", True, data, result.document),
    )
    entry["result"] = "renewed"
    return entry


async def renew_configured(
    settings: Settings, *, db: Any, audit: Any, clock: Clock = system_clock
) -> list[dict[str, Any]]:
    """The scheduler's run over ``[signing] archive_renewal_paths`` (nothing when unset)."""
    s = settings.signing
    if not s.archive_renewal_paths:
        return []
    from gateway.sign.setup import signing_policy, tsa_client

    tsa = tsa_client(settings)
    if tsa is None:
        return [{"file": "-", "result": "refused: no timestamp authority ([timestamp] url)"}]
    try:
        return await renew_paths(
            s.archive_renewal_paths,
            within=dt.timedelta(days=s.archive_renewal_days),
            tsa=tsa,
            source=signing_policy(settings).long_term,
            db=db,
            audit=audit,
            actor="scheduler",
            clock=clock,
        )
    finally:
        await tsa.close()
