"""``hpki-gateway card ...``: the My Number card client on the facility PC.

Card messages are in Japanese and English (``--lang``, default from HPKI_GATEWAY_LANG/LANG);
the PIN is read without echo (or from stdin with ``--pin-stdin``) and never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from gateway.card.errors import CardError, CardErrorCode, default_language

EXIT_CARD = 3  # a card problem (message on stderr); 1 = the gateway refused; 2 = config


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
    else:
        print(text)


def _card_failed(args: argparse.Namespace, e: CardError) -> int:
    if getattr(args, "json", False):
        print(json.dumps(e.to_json_dict(), ensure_ascii=False, indent=2))
    print(f"hpki-gateway card: {e.message(args.lang)}", file=sys.stderr)
    return EXIT_CARD


def _pin(args: argparse.Namespace) -> str:
    if args.pin_stdin:
        pin = sys.stdin.readline().strip()
    else:
        prompt = "利用者証明用暗証番号（数字4桁）: " if args.lang == "ja" else "PIN (4 digits): "
        pin = getpass.getpass(prompt)
    if not (len(pin) == 4 and pin.isascii() and pin.isdigit()):
        raise CardError(CardErrorCode.PIN_FORMAT)
    return pin


def _gateway(args: argparse.Namespace) -> Any:
    from gateway.card.client import GatewayClient

    return GatewayClient(
        url=args.url, client_cert=args.client_cert, client_key=args.client_key, server_ca=args.ca
    )


def _status_text(items: list[Any], lang: str) -> str:
    if not items:
        return CardError(CardErrorCode.NO_READER).message(lang)
    lines = []
    for s in items:
        if s.kind == "jpki":
            tries = (
                f"PIN tries left {s.pin_tries_left}"
                if lang == "en"
                else f"暗証番号の残り回数 {s.pin_tries_left}"
            )
            what = "My Number card" if lang == "en" else "マイナンバーカード"
            lines.append(f"{s.reader}: {what} ({s.token}), {tries}")
        elif s.kind == "none":
            lines.append(f"{s.reader}: " + ("no card" if lang == "en" else "カードなし"))
        else:
            lines.append(f"{s.reader}: " + ("other card" if lang == "en" else "その他のカード"))
    return "\n".join(lines)


async def cmd_card_status(args: argparse.Namespace) -> int:
    from gateway.card.jpki import card_status

    try:
        items = await asyncio.to_thread(card_status)
    except CardError as e:
        return _card_failed(args, e)
    _out(args, [s.to_json_dict() for s in items], _status_text(items, args.lang))
    return 0


async def cmd_card_read_cert(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from gateway.card.jpki import open_jpki_card

    def read() -> bytes:
        with open_jpki_card(args.reader) as card:
            return card.read_auth_certificate()

    try:
        der = await asyncio.to_thread(read)
    except CardError as e:
        return _card_failed(args, e)
    cert = x509.load_der_x509_certificate(der)
    data = der if args.der else cert.public_bytes(serialization.Encoding.PEM)
    if args.out and args.out != "-":
        Path(args.out).write_bytes(data)
    elif args.der:
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data.decode())
    return 0


def _card_flow(args: argparse.Namespace, flow: Any) -> int:
    """Run ``flow(card, pin)`` with the card held; map errors to messages and exit codes."""
    from gateway.card.client import GatewayCallError, explain
    from gateway.card.jpki import open_jpki_card

    try:
        with open_jpki_card(args.reader) as card:
            tries = card.auth_pin_tries()
            if tries == 0:
                raise CardError(CardErrorCode.PIN_BLOCKED)
            result = flow(card, _pin(args))
    except CardError as e:
        return _card_failed(args, e)
    except GatewayCallError as e:
        card_err = explain(e)
        if card_err is not None:
            return _card_failed(args, card_err)
        if args.json:
            print(json.dumps({"error": "gateway", "status": e.status, "body": e.body}))
        print(f"hpki-gateway card: the gateway refused: {e.description}", file=sys.stderr)
        return 1
    _out(args, result, result.get("SAD") or json.dumps(result, ensure_ascii=False))
    return 0


async def cmd_card_enroll(args: argparse.Namespace) -> int:
    from gateway.card.client import enroll

    gw = _gateway(args)

    def flow(card: Any, pin: str) -> dict[str, Any]:
        return enroll(card, gw, code=args.code, password=args.password, pin=pin, label=args.label)

    return await asyncio.to_thread(_card_flow, args, flow)


async def cmd_card_authorize(args: argparse.Namespace) -> int:
    from gateway.card.client import authorize

    try:
        hashes = [base64.b64decode(h, validate=True) for h in args.hash]
    except (binascii.Error, ValueError):
        print("hpki-gateway card: --hash takes standard base64", file=sys.stderr)
        return 2
    gw = _gateway(args)

    def flow(card: Any, pin: str) -> dict[str, Any]:
        return authorize(
            card,
            gw,
            credential_id=args.credential,
            hashes=hashes,
            pin=pin,
            hash_algorithm_oid=args.hash_algorithm,
        )

    return await asyncio.to_thread(_card_flow, args, flow)


def _card_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reader", default=None, help="PC/SC reader (default: the first with a card)")
    p.add_argument("--lang", choices=["ja", "en"], default=default_language())
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _gateway_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the gateway, https://host:port")
    p.add_argument("--client-cert", required=True, help="facility client certificate (PEM)")
    p.add_argument("--client-key", required=True, help="its key (PEM)")
    p.add_argument("--ca", default=None, help="CA to trust for the gateway's certificate")
    p.add_argument("--pin-stdin", action="store_true", help="read the PIN from stdin")


def register(sub: Any) -> None:
    """Add the ``card`` command group to the CLI parser."""
    card = sub.add_parser("card", help="My Number card on this PC (PC/SC)").add_subparsers(
        dest="sub", required=True
    )
    p = card.add_parser("status", help="readers, card kind, PIN tries left (none spent)")
    _card_common(p)
    p.set_defaults(func=cmd_card_status)
    p = card.add_parser("read-cert", help="the card's user-authentication certificate")
    _card_common(p)
    p.add_argument("-o", "--out", default="-")
    p.add_argument("--der", action="store_true", help="DER instead of PEM")
    p.set_defaults(func=cmd_card_read_cert)
    p = card.add_parser("enroll", help="link this card with an enrolment code + password")
    _card_common(p)
    _gateway_flags(p)
    p.add_argument("--code", required=True, help="enrolment code")
    p.add_argument("--password", required=True, help="enrolment password")
    p.add_argument("--label", default=None)
    p.set_defaults(func=cmd_card_enroll)
    p = card.add_parser("authorize", help="approve hashes with the card; prints the SAD")
    _card_common(p)
    _gateway_flags(p)
    p.add_argument("--credential", required=True, help="CSC credential id")
    p.add_argument("--hash", action="append", required=True, help="base64 digest (repeat)")
    p.add_argument("--hash-algorithm", default="2.16.840.1.101.3.4.2.1", help="digest OID")
    p.set_defaults(func=cmd_card_authorize)
