"""``hpki-gateway`` command line: thin; parses arguments and calls the services.

Every command that acts on a deployment takes ``-c/--config PATH`` after its subcommand
(default: env HPKI_GATEWAY_CONFIG); commands that report take ``--json``.
Exit codes: 0 ok, 1 the operation failed or found a problem, 2 bad usage or settings.

One module per command group; each adds its parsers with ``register``. The services come from
:func:`gateway.app.build_services`, the factory the server uses too (:class:`common.Context`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from gateway.card import cli as card_cli
from gateway.cli import db, eprescription, facility, sandbox, selfservice, signer, verify
from gateway.cli.common import Action, config_flags
from gateway.errors import ConfigError, GatewayError
from gateway.local import cli as local_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpki-gateway", description="HPKI remote signing gateway")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve the gateway (mTLS listener)")
    config_flags(p, json_flag=False)
    p.add_argument("--workers", type=int, default=None, help="worker processes (SO_REUSEPORT)")

    # The order here is the order of `hpki-gateway --help`.
    db.register(sub)
    sandbox.register(sub)
    facility.register_facility(sub)
    facility.register_admin(sub)
    signer.register(sub)
    facility.register_scheduler(sub)
    selfservice.register(sub)
    verify.register(sub)
    eprescription.register(sub)
    card_cli.register(sub)
    local_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from gateway.server import serve

            return serve(args.config, workers=args.workers)
        func: Action = args.func
        return asyncio.run(func(args))
    except ConfigError as e:
        print(f"hpki-gateway: configuration error: {e}", file=sys.stderr)
        return 2
    except GatewayError as e:
        print(f"hpki-gateway: {e.description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
