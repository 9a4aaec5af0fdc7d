"""``hpki-gateway local ...``: local signing with the HPKI card on this PC.

``serve`` runs the agent on 127.0.0.1 only; ``sign-batch`` signs a folder with one PIN entry.
The PIN is read without echo, or from standard input with ``--pin-stdin`` (never from an
argument or the environment), and is never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.card.errors import CardError
from gateway.cli.common import config_flags, settings_of

EXIT_FAILED = 1
EXIT_CARD = 3
EXIT_INTERRUPTED = 130
LEVELS = ["AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA"]


def default_secret_file() -> Path:
    base = Path.home() / ".config" / "hpki-gateway"
    return base / "local-agent.secret"


def read_pin(args: argparse.Namespace) -> bytearray:
    if args.pin_stdin:
        line = sys.stdin.buffer.readline()
        pin = bytearray(line.rstrip(b"\r\n"))
        line = b""
        return pin
    return bytearray(getpass.getpass("HPKIカードの暗証番号 / HPKI card PIN: ").encode())


async def cmd_local_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.local.server import LOOPBACK, create_local_app, load_or_create_secret
    from gateway.local.setup import build_local_agent

    settings = settings_of(args)
    secret_path = Path(args.secret_file or settings.local.secret_file or default_secret_file())
    secret = load_or_create_secret(secret_path)
    agent = build_local_agent(settings, args.reader)
    port = args.port or settings.local.port
    runner = web.AppRunner(create_local_app(agent, secret), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(
        json.dumps({"url": f"http://{LOOPBACK}:{bound}", "secret_file": str(secret_path)}),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


async def cmd_local_sign_batch(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from gateway.local.batch import input_names, sign_batch
    from gateway.local.setup import build_local_agent

    settings = settings_of(args)
    src, out = Path(args.input), Path(args.out)
    if not src.is_dir():
        print(f"hpki-gateway local: {src} is not a directory", file=sys.stderr)
        return 2
    agent = build_local_agent(settings, args.reader)
    names = input_names(src)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=None,
        transient=False,
        disable=args.json,
    )
    task = progress.add_task("signing", total=len(names))

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    try:
        with progress:
            result = await sign_batch(
                agent,
                src,
                out,
                pin=lambda: read_pin(args),
                level=args.level,
                progress=advance,
                names=names,
            )
    except CardError as e:
        print(f"hpki-gateway local: {e.message(args.lang)}", file=sys.stderr)
        return EXIT_CARD
    finally:
        await agent.close()
    summary = {
        "files": result.files,
        "signed": result.signed,
        "skipped": result.skipped,
        "failed": result.failed,
        "not_done": result.not_done,
        "stopped": result.stopped,
        "report": str(out / "report.json"),
    }
    print(json.dumps(summary, ensure_ascii=False))
    if result.complete:
        return 0
    return EXIT_CARD if result.stopped else EXIT_FAILED


def register(sub: Any) -> None:
    """Add the ``local`` command group to the CLI parser."""
    local = sub.add_parser(
        "local", help="local signing with the HPKI card on this PC (docs/local-signing.md)"
    ).add_subparsers(dest="sub", required=True)
    p = local.add_parser("serve", help="the local agent: CSC-shaped API on 127.0.0.1")
    config_flags(p, json_flag=False)
    p.add_argument("--reader", default=None, help="PC/SC reader (default: local.reader)")
    p.add_argument("--port", type=int, default=None, help="loopback port (0: any free one)")
    p.add_argument("--secret-file", default=None, help="the per-install secret (0600)")
    p.set_defaults(func=cmd_local_serve)
    p = local.add_parser("sign-batch", help="sign every e-prescription in a folder, one PIN")
    p.add_argument("input", metavar="IN", help="folder of unsigned XML / CSV files")
    p.add_argument("--out", required=True, help="folder for the signed files and the report")
    p.add_argument("--reader", default=None, help="PC/SC reader (default: local.reader)")
    p.add_argument("--pin-stdin", action="store_true", help="read the PIN from standard input")
    p.add_argument("--level", choices=LEVELS, default="AdES-B-B")
    p.add_argument("--lang", choices=["ja", "en"], default="ja")
    config_flags(p)
    p.set_defaults(func=cmd_local_sign_batch)
