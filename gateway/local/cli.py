"""``hpki-gateway local ...``: local signing with the HPKI card on this PC.

``serve`` runs the agent on 127.0.0.1 only; ``sign-batch`` signs a folder with one PIN entry.
The PIN is read without echo, or from standard input with ``--pin-stdin`` (never from an
argument or the environment), and is never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

    from gateway.lifetime import freeze_start_up_objects
    from gateway.local.server import LOOPBACK, create_local_app, load_or_create_secret
    from gateway.local.setup import build_local_agent

    settings = settings_of(args)
    secret_path = Path(args.secret_file or settings.local.secret_file or default_secret_file())
    secret = load_or_create_secret(secret_path)
    agent = build_local_agent(settings, args.reader, pkcs11_module=args.pkcs11_module)
    port = settings.local.port if args.port is None else args.port
    runner = web.AppRunner(create_local_app(agent, secret), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    frozen = freeze_start_up_objects()
    print(
        json.dumps(
            {
                "url": f"http://{LOOPBACK}:{bound}",
                "secret_file": str(secret_path),
                "gc_frozen_objects": frozen,
            }
        ),
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

    from gateway.errors import RoleNotPermitted
    from gateway.local.agent import NoCard, PinRejected
    from gateway.local.batch import sign_batch
    from gateway.local.credential import CardCertificateRejected
    from gateway.local.setup import build_local_agent

    settings = settings_of(args)
    src, out = Path(args.input), Path(args.out)
    if not src.is_dir():
        print(f"hpki-gateway local: {src} is not a directory", file=sys.stderr)
        return 2
    agent = build_local_agent(settings, args.reader, pkcs11_module=args.pkcs11_module)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=None,
        transient=False,
        disable=args.json,
    )
    task = progress.add_task("signing", total=None)

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    # Ctrl-C once: finish the documents in flight, write the report, exit 130. Twice: cancel
    # (documents the card has signed are still written). The handler is installed once the
    # PIN has been read, so Ctrl-C at the PIN prompt simply ends the program.
    stop = asyncio.Event()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        if stop.is_set() and main is not None:
            main.cancel()
        stop.set()

    def pin() -> bytearray:
        value = read_pin(args)
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        return value

    try:
        with progress:
            result = await sign_batch(
                agent, src, out, pin=pin, level=args.level, progress=advance, stop=stop
            )
    except CardError as e:
        print(f"hpki-gateway local: {e.message(args.lang)}", file=sys.stderr)
        return EXIT_CARD
    except (PinRejected, NoCard, CardCertificateRejected, RoleNotPermitted) as e:
        print(f"hpki-gateway local: {e.description}", file=sys.stderr)
        return EXIT_CARD  # the card cannot sign: nothing was signed, the report says so
    except asyncio.CancelledError:
        print(json.dumps({"stopped": "interrupted", "report": str(out / "report.json")}))
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        await agent.close()
    summary = {**result.summary(), "report": str(out / "report.json")}
    print(json.dumps(summary, ensure_ascii=False))
    if result.complete:
        return 0
    if result.stopped == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_CARD if result.stopped else EXIT_FAILED


def _card_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reader",
        default=None,
        help="PC/SC reader (default: local.reader); with --pkcs11-module: the token label",
    )
    p.add_argument(
        "--pkcs11-module",
        metavar="PATH",
        default=None,
        help="drive the card through its vendor's PKCS#11 module (default: local.pkcs11_module;"
        " unset: APDUs over PC/SC)",
    )


def register(sub: Any) -> None:
    """Add the ``local`` command group to the CLI parser."""
    local = sub.add_parser(
        "local", help="local signing with the HPKI card on this PC (docs/local-signing.md)"
    ).add_subparsers(dest="sub", required=True)
    p = local.add_parser("serve", help="the local agent: CSC-shaped API on 127.0.0.1")
    config_flags(p, json_flag=False)
    _card_flags(p)
    p.add_argument("--port", type=int, default=None, help="loopback port (0: any free one)")
    p.add_argument("--secret-file", default=None, help="the per-install secret (0600)")
    p.set_defaults(func=cmd_local_serve)
    p = local.add_parser("sign-batch", help="sign every e-prescription in a folder, one PIN")
    p.add_argument("input", metavar="IN", help="folder of unsigned XML / CSV files")
    p.add_argument("--out", required=True, help="folder for the signed files and the report")
    _card_flags(p)
    p.add_argument("--pin-stdin", action="store_true", help="read the PIN from standard input")
    p.add_argument("--level", choices=LEVELS, default="AdES-B-B")
    p.add_argument("--lang", choices=["ja", "en"], default="ja")
    config_flags(p)
    p.set_defaults(func=cmd_local_sign_batch)
