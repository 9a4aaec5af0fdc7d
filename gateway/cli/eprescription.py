"""``eprescription``: build and sign the e-prescription XML (docs/signatures.md)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import Context, actor, config_flags, read_input, settings_of, write_output
from gateway.errors import GatewayError


async def cmd_eprescription_build(args: argparse.Namespace) -> int:
    from gateway.sign.eprescription_cli import build

    return await build(args, read_input, write_output)


async def cmd_eprescription_sign(args: argparse.Namespace) -> int:
    from gateway.sign.eprescription_cli import input_from_args
    from gateway.sign.service import sign_document
    from gateway.sign.setup import signing_policy, tsa_client

    settings = settings_of(args)
    data = read_input(args.csv)
    async with Context(settings, with_keystore=True) as ctx:
        assert ctx.keystore is not None
        signer = await ctx.signers.get(args.signer)
        cred = next((c for c in reversed(signer.credentials) if c.status == "active"), None)
        if cred is None or cred.certificate is None:
            raise GatewayError(f"signer {args.signer} has no active credential with a certificate")
        key = await ctx.keystore.get_key(cred.key_id)
        tsa = tsa_client(settings) if args.level != "AdES-B-B" else None
        try:
            signed = await sign_document(
                key=key,
                chain=[cred.certificate, *cred.chain],
                signature_format="X",
                conformance_level=args.level,
                envelope="Enveloped",
                document=data,
                profile=args.profile,
                csv_encoding=args.encoding,
                eprescription_input=input_from_args(args),
                tsa=tsa,
                policy=signing_policy(settings),
            )
        finally:
            if tsa is not None:
                await tsa.close()
        await ctx.audit.append_alone(
            ctx.db,
            action="signature.eprescription.cli",
            actor=actor(),
            signer_id=signer.id,
            detail={
                "credential": cred.id,
                "profile": args.profile,
                "level": args.level,
                "document_sha256": signed.document_digest.hex(),
            },
        )
    assert signed.document_with_signature is not None
    write_output(args.out, signed.document_with_signature)
    return 0


def register(sub: Any) -> None:
    ep = sub.add_parser(
        "eprescription", help="e-prescription XML (docs/signatures.md)"
    ).add_subparsers(dest="sub", required=True)
    p = ep.add_parser("build", help="build the unsigned e-prescription XML from a CSV")
    p.add_argument("csv", help="prescription CSV or unsigned XML ('-' for stdin)")
    p.add_argument("-o", "--out", default="-")
    p.add_argument(
        "--profile", choices=["jp-eprescription", "jp-dispensing"], default="jp-eprescription"
    )
    p.add_argument("--encoding", choices=["utf-8", "shift_jis"], default="utf-8")
    p.add_argument("-c", "--config", default=None, help="settings (unused; kept for scripts)")
    _ep_arguments(p)
    p.set_defaults(func=cmd_eprescription_build)
    p = ep.add_parser(
        "sign",
        help="OPERATOR TOOL for the sandbox: sign a CSV as an e-prescription with a signer's "
        "HSM key directly, without FIDO2/SAD (facility systems use signDoc)",
    )
    config_flags(p, json_flag=False)
    p.add_argument("csv", help="prescription CSV ('-' for stdin)")
    p.add_argument("--signer", required=True, help="signer id (hpki-gateway signer list)")
    p.add_argument("-o", "--out", default="-")
    p.add_argument(
        "--profile", choices=["jp-eprescription", "jp-dispensing"], default="jp-eprescription"
    )
    p.add_argument(
        "--level",
        choices=["AdES-B-B", "AdES-B-T", "AdES-B-LT", "AdES-B-LTA"],
        default="AdES-B-B",
    )
    p.add_argument("--encoding", choices=["utf-8", "shift_jis"], default="utf-8")
    _ep_arguments(p)
    p.set_defaults(func=cmd_eprescription_sign)


def _ep_arguments(p: argparse.ArgumentParser) -> None:
    from gateway.sign.eprescription_cli import add_arguments

    add_arguments(p)
