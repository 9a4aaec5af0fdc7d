"""``sandbox``: the verification environment (a complete TEST world), its TEST TSA and its
virtual My Number cards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import config_flags, emit, settings_of


async def cmd_sandbox_init(args: argparse.Namespace) -> int:
    from gateway.sandbox.world import init_sandbox

    manifest = await init_sandbox(
        Path(args.dir),
        port=args.port,
        force=args.force,
        tsa_port=args.tsa_port,
        store_url=args.store_url,
        ocsp_in_aia=args.ocsp_in_aia,
    )
    emit(
        args,
        manifest,
        f"sandbox ready in {Path(args.dir).resolve()}\n"
        f"  serve it:  hpki-gateway serve -c {Path(args.dir).resolve() / 'gateway.toml'}\n"
        f"  TEST TSA:  {manifest['tsa_url']} (served by `serve`)\n"
        f"  manifest:  {Path(args.dir).resolve() / 'manifest.json'}",
    )
    return 0


async def cmd_sandbox_tsa(args: argparse.Namespace) -> int:
    from gateway.logs import setup_logging
    from gateway.sandbox.tsa import run_forever

    settings = settings_of(args)
    # The TEST services log what they answer (OCSP: one line per answer) as `serve` does.
    setup_logging(settings.logging.level, settings.logging.format)
    if not args.with_parent:
        print(f"TEST TSA on {settings.timestamp.url} (Ctrl-C stops it)", file=sys.stderr)
        return await run_forever(settings)
    # Started by `serve`: end with it (kill -9 included), say "ready" on stdout once listening.
    from gateway.lifetime import die_with_parent, exit_at_eof

    if not die_with_parent(args.with_parent):
        return 0
    exit_at_eof()

    def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    return await run_forever(settings, ready=ready)


async def cmd_sandbox_cards_up(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.sandbox.jpki import cards_up

    manifest = await asyncio.to_thread(cards_up, Path(args.dir))
    text = "\n".join(
        f"{c['signer']}: {c['reader']}  PCSCLITE_CSOCK_NAME={c['pcsc_socket']}"
        for c in manifest["cards"]
    )
    emit(args, manifest["cards"], text)
    return 0


async def cmd_sandbox_cards_down(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.sandbox.jpki import cards_down

    await asyncio.to_thread(cards_down, Path(args.dir))
    emit(args, [], "virtual cards stopped")
    return 0


def register(sub: Any) -> None:
    sb = sub.add_parser("sandbox", help="verification environment").add_subparsers(
        dest="sub", required=True
    )
    p = sb.add_parser("init", help="build a complete test world in DIR")
    p.add_argument("dir")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR has a world")
    p.add_argument(
        "--tsa-port", type=int, default=None, help="port of the TEST TSA (default: a free one)"
    )
    p.add_argument(
        "--store-url",
        default=None,
        help="database URL instead of data/gateway.db (e.g. postgresql+asyncpg://...)",
    )
    p.add_argument(
        "--ocsp-in-aia",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="name the TEST OCSP responder in the signer certificates' AIA (default); "
        "--no-ocsp-in-aia builds them like real HPKI certificates, without (docs/sandbox.md)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_init)
    p = sb.add_parser("tsa", help="run only the TEST TSA of a sandbox (`serve` already runs it)")
    config_flags(p, json_flag=False)
    p.add_argument("--with-parent", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sandbox_tsa)
    cards = sb.add_parser("cards", help="virtual My Number cards").add_subparsers(
        dest="cards_sub", required=True
    )
    p = cards.add_parser("up", help="pcscd + vpcd + a virtual card per sandbox signer")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_cards_up)
    p = cards.add_parser("down", help="stop the virtual cards")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_cards_down)
