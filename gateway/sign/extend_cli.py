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
import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

from gateway.clock import system_clock
from gateway.config import Settings
from gateway.errors import InvalidRequest
from gateway.files import replace_atomically
from gateway.sign.extend import TARGETS, extend_document
from gateway.sign.renewal import extension_detail, renew_paths
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


async def run(
    args: argparse.Namespace, settings: Settings, db: Any, audit: Any, actor: str
) -> tuple[int, list[dict[str, Any]]]:
    """(exit code, one line per file)."""
    tsa = tsa_client(settings)
    if tsa is None:
        raise InvalidRequest("extending needs a timestamp authority ([timestamp] url)")
    source = signing_policy(settings).long_term
    now = system_clock()
    lines: list[dict[str, Any]] = []
    try:
        if args.renew_within is not None:
            lines = await renew_paths(
                [Path(p) for p in args.files],
                within=dt.timedelta(days=args.renew_within),
                tsa=tsa,
                source=source,
                db=db,
                audit=audit,
                actor=actor,
                now=now,
            )
            bad = [x for x in lines if x["result"].startswith(("not renewed", "refused", "busy"))]
            return (1 if bad else 0), lines
        path = Path(args.files[0])
        if len(args.files) != 1 or not await asyncio.to_thread(path.is_file):
            raise InvalidRequest("give one file to extend (or --renew-within for folders)")
        data = await asyncio.to_thread(path.read_bytes)
        entry: dict[str, Any] = {"file": str(path)}
        lines.append(entry)
        result = await extend_document(
            data, args.level, tsa=tsa, source=source, renew=args.renew, now=now
        )
        entry["result"] = "extended"
        await audit.append_alone(
            db,
            action="signature.extend",
            actor=actor,
            detail=extension_detail(path, args.level, args.renew, data, result.document),
        )
        if args.out:
            replace_atomically(Path(args.out), result.document)
        else:
            entry["document"] = result.document
    finally:
        await tsa.close()
    return 0, lines
