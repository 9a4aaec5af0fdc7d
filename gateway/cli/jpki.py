"""``signer link-jpki|jpki-links|unlink-jpki``: the registration officer links My Number cards."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.cli.common import Context, actor, config_flags, emit, settings_of


def _jpki(ctx: Context) -> Any:
    from gateway.auth.jpki_setup import make_jpki

    return make_jpki(
        ctx.settings,
        db=ctx.db,
        audit=ctx.audit,
        fido2=ctx.fido2,
        ledger=ctx.activation.ledger,
        clock=ctx.clock,
    )


async def cmd_signer_link_jpki(args: argparse.Namespace) -> int:
    data = Path(args.cert).read_bytes()
    async with Context(settings_of(args), with_keystore=False) as ctx:
        link = await _jpki(ctx).link(args.signer, data, actor=actor(), label=args.label)
    emit(args, link.to_json_dict(), f"linked {link.id} (serial {link.serial}) to {args.signer}")
    return 0


async def cmd_signer_jpki_links(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        links = await _jpki(ctx).list_links(args.signer)
    text = "\n".join(
        f"{k.id}  serial {k.serial}  until {k.not_after.date()}  {k.label or ''}" for k in links
    )
    emit(args, [k.to_json_dict() for k in links], text or "no My Number card linked")
    return 0


async def cmd_signer_unlink_jpki(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        await _jpki(ctx).unlink(args.signer, args.link, actor=actor())
    emit(args, {"status": "unlinked", "link": args.link}, f"unlinked {args.link}")
    return 0


def register_signer(sg: Any) -> None:
    """Add the My Number card link commands to the ``signer`` group."""
    p = sg.add_parser("link-jpki", help="link a My Number card certificate (DER or PEM)")
    p.add_argument("signer")
    p.add_argument("--cert", required=True, help="the card's authentication certificate")
    p.add_argument("--label", default=None)
    config_flags(p)
    p.set_defaults(func=cmd_signer_link_jpki)
    p = sg.add_parser("jpki-links", help="list a signer's linked My Number cards")
    p.add_argument("signer")
    config_flags(p)
    p.set_defaults(func=cmd_signer_jpki_links)
    p = sg.add_parser("unlink-jpki", help="unlink a My Number card (ends its SADs)")
    p.add_argument("signer")
    p.add_argument("link")
    config_flags(p)
    p.set_defaults(func=cmd_signer_unlink_jpki)
