"""``hpki-gateway extend``: raise signed documents to ES-T / ES-XL / ES-A, and the ES-A renewal
job (``--renew-within DAYS`` over files or folders: a new archive timestamp for each document
whose last archive timestamp's TSA certificate expires within that many days).

The renewal is idempotent: a document is rewritten only when it is due, and only if the new
archive timestamp's own TSA certificate lasts beyond the window (else renewing again tomorrow
would stack timestamps that prove nothing more); each rewrite is audited. Run it from cron or
a systemd timer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.errors import InvalidRequest
from gateway.sign.extend import TARGETS, extend_xml, needs_renewal
from gateway.sign.setup import signing_policy, tsa_client

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="signed XML files (or folders, with --renew-within)")
    p.add_argument("--level", choices=sorted(TARGETS), default="AdES-B-LTA")
    p.add_argument("-o", "--out", default=None, help="output file (one input; default: stdout)")
    p.add_argument("--renew", action="store_true", help="add an archive timestamp to an ES-A")
    p.add_argument(
        "--renew-within",
        type=int,
        default=None,
        metavar="DAYS",
        help="renewal job: renew, in place, every ES-A whose last archive timestamp's TSA "
        "certificate expires within DAYS",
    )


def _inputs(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*.xml") if q.is_file())
        else:
            yield p


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.extend-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def run(
    args: argparse.Namespace, settings: Settings, db: Any, audit: Any, actor: str
) -> tuple[int, list[dict[str, Any]]]:
    """(exit code, one line per file)."""
    tsa = tsa_client(settings)
    if tsa is None:
        raise InvalidRequest("extending needs a timestamp authority ([timestamp] url)")
    source = signing_policy(settings).long_term
    now = dt.datetime.now(dt.UTC)
    lines: list[dict[str, Any]] = []
    worst = 0
    try:
        files = list(_inputs(args.files))
        if args.renew_within is None and len(files) != 1:
            raise InvalidRequest("give one file to extend (or --renew-within for a folder)")
        for path in files:
            data = path.read_bytes()
            entry: dict[str, Any] = {"file": str(path)}
            lines.append(entry)
            within = dt.timedelta(days=args.renew_within or 0)
            if args.renew_within is not None and not needs_renewal(data, within=within, now=now):
                entry["result"] = "not due"
                continue
            renew = args.renew or args.renew_within is not None
            level = "AdES-B-LTA" if args.renew_within is not None else args.level
            try:
                result = await extend_xml(data, level, tsa=tsa, source=source, renew=renew, now=now)
            except InvalidRequest as e:
                entry["result"], worst = f"refused: {e.description}", 1
                continue
            if args.renew_within is not None and needs_renewal(
                result.document, within=within, now=now
            ):
                entry["result"], worst = (
                    "not renewed: the TSA's own certificate expires within the window",
                    1,
                )
                continue
            entry["result"] = "extended"
            entry["changes"] = [list(c) for c in result.changes]
            async with db.write() as conn:
                await audit.append(
                    conn,
                    action="signature.extend",
                    actor=actor,
                    detail={
                        "file": str(path),
                        "level": level,
                        "renew": renew,
                        "document_sha256": hashlib.sha256(data).hexdigest(),
                        "extended_sha256": hashlib.sha256(result.document).hexdigest(),
                    },
                )
            if args.renew_within is not None:
                _replace(path, result.document)
            elif args.out:
                _replace(Path(args.out), result.document)
            else:
                entry["document"] = result.document
    finally:
        await tsa.close()
    return worst, lines
