"""``hpki-gateway verify``: a readable report by default, ``--json`` for machines; exit 0 only
for TOTAL-PASSED. ``--tsa-trust`` adds TSA trust anchors, ``--at`` sets the validation time."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from gateway.errors import InvalidRequest
from gateway.verify import TrustConfig, verify_document
from gateway.verify.report import VerificationReport, render_text

__all__ = ["add_arguments", "parse_at", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tsa-trust",
        action="append",
        default=None,
        metavar="PEM",
        help="a timestamp authority's trust anchor (PEM or DER; repeatable)",
    )
    p.add_argument(
        "--at",
        default=None,
        metavar="TIME",
        help="validate at this time (ISO 8601, e.g. 2030-01-01T00:00:00Z; default: now)",
    )


def parse_at(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        at = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise InvalidRequest(f"--at {value!r} is not an ISO 8601 time") from e
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()  # a one-shot command: nothing else waits on the loop


async def run(args: argparse.Namespace, trust: TrustConfig) -> tuple[VerificationReport, str]:
    """The report and its readable text."""
    data = _read(args.file)
    content = _read(args.content) if args.content else None
    report = await verify_document(data, trust=trust, content=content, now=parse_at(args.at))
    return report, render_text(report)
