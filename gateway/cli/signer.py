"""``signer``: signers, their HSM keys and HPKI certificates, FIDO2 enrolment, locks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.cli import jpki
from gateway.cli.common import Context, actor, config_flags, emit, settings_of


async def cmd_signer_add(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=True) as ctx:
        s = await ctx.signers.add(
            name=args.name,
            name_kanji=args.name_kanji,
            role=args.role,
            facilities=args.facility,
            actor=actor(),
        )
    cred = s.credentials[0]
    hint = (
        "certificate issued by the TEST HPKI CA"
        if cred.status == "active"
        else f"export a CSR: hpki-gateway signer csr {s.id} -o {s.id}.csr"
    )
    emit(
        args, s.to_json_dict(), f"signer {s.id} ({s.name}, {s.role}); credential {cred.id}: {hint}"
    )
    return 0


async def cmd_signer_list(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        items = await ctx.signers.list_signers(institution_code=args.facility)
    text = "\n".join(
        f"{s.id}  {s.role:<16} {s.name:<28} {','.join(s.facilities)}  "
        + " ".join(f"{c.id}[{c.status}]" for c in s.credentials)
        for s in items
    )
    emit(args, [s.to_json_dict() for s in items], text or "no signers")
    return 0


async def cmd_signer_csr(args: argparse.Namespace) -> int:
    from gateway.pki.csr import csr_pem

    async with Context(settings_of(args), with_keystore=True) as ctx:
        der = await ctx.signers.csr(args.signer, actor=actor())
    pem = csr_pem(der)
    if args.out == "-":
        sys.stdout.write(pem)
    else:
        Path(args.out).write_text(pem)
        print(f"CSR for {args.signer} written to {args.out}", file=sys.stderr)
    return 0


async def cmd_signer_import_cert(args: argparse.Namespace) -> int:
    from gateway.pki.load import parse_pem_chain

    chain = []
    for p in args.chain or []:
        chain.extend(parse_pem_chain(Path(p).read_bytes()))
    async with Context(settings_of(args), with_keystore=True) as ctx:
        cred = await ctx.signers.import_cert(
            args.signer, Path(args.cert).read_bytes(), chain=chain, actor=actor()
        )
    emit(
        args,
        {"credential": cred.id, "status": cred.status},
        f"credential {cred.id} is {cred.status}",
    )
    return 0


async def cmd_signer_link(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        await ctx.signers.link(args.signer, args.facility, actor=actor())
    emit(args, {"signer": args.signer, "facility": args.facility}, "linked")
    return 0


async def cmd_signer_unlink(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        await ctx.signers.unlink(args.signer, args.facility, actor=actor())
    emit(args, {"signer": args.signer, "facility": args.facility}, "unlinked")
    return 0


async def cmd_signer_enroll_code(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        issued = await ctx.fido2.issue_enrollment(args.signer, actor=actor())
    data = {
        "signer": issued.signer_id,
        "enrollment_code": issued.code,
        "enrollment_password": issued.password,
        "expires_at": issued.expires_at.isoformat(),
    }
    emit(
        args,
        data,
        f"enrolment code for {issued.signer_id} (shown once; hand the code and the password "
        "over separately)\n"
        f"  code:     {issued.code}\n  password: {issued.password}\n"
        f"  valid until {issued.expires_at.isoformat(timespec='minutes')}; register at /enroll",
    )
    return 0


async def cmd_signer_authenticators(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        items = await ctx.fido2.list_authenticators(args.signer)
    text = "\n".join(
        f"{a.id}  aaguid {a.aaguid}  count {a.sign_count:<6} registered "
        f"{a.created_at.isoformat(timespec='minutes')}  last used "
        f"{a.last_used_at.isoformat(timespec='minutes') if a.last_used_at else '-'}  "
        f"{a.label or ''}"
        for a in items
    )
    emit(args, [a.to_json_dict() for a in items], text or "no authenticators")
    return 0


async def cmd_signer_remove_authenticator(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        await ctx.fido2.remove_authenticator(args.signer, args.authenticator, actor=actor())
    emit(args, {"removed": args.authenticator}, f"removed {args.authenticator}")
    return 0


async def cmd_signer_lock(args: argparse.Namespace) -> int:
    status = "locked" if args.sub == "lock" else "active"
    async with Context(settings_of(args), with_keystore=False) as ctx:
        await ctx.signers.set_status(
            args.signer, status=status, reason=getattr(args, "reason", None), actor=actor()
        )
    emit(args, {"signer": args.signer, "status": status}, f"signer {args.signer} is {status}")
    return 0


def register(sub: Any) -> None:
    sg = sub.add_parser("signer", help="signers and credentials").add_subparsers(
        dest="sub", required=True
    )
    p = sg.add_parser("add", help="create a signer with a new HSM key")
    config_flags(p)
    p.add_argument("--name", required=True, help="name in romaji, as in the certificate")
    p.add_argument("--name-kanji", default=None)
    p.add_argument("--role", required=True, help='hcRole text, e.g. "Medical Doctor"')
    p.add_argument("--facility", action="append", required=True, help="institution code (repeat)")
    p.set_defaults(func=cmd_signer_add)
    p = sg.add_parser("list", help="list signers")
    config_flags(p)
    p.add_argument("--facility", default=None)
    p.set_defaults(func=cmd_signer_list)
    p = sg.add_parser("csr", help="export a PKCS#10 request signed by the signer's HSM key")
    config_flags(p, json_flag=False)
    p.add_argument("signer")
    p.add_argument("-o", "--out", default="-")
    p.set_defaults(func=cmd_signer_csr)
    p = sg.add_parser("import-cert", help="attach the certificate the HPKI CA issued")
    config_flags(p)
    p.add_argument("signer")
    p.add_argument("cert", help="PEM or DER certificate")
    p.add_argument("--chain", action="append", help="PEM bundle of issuing CAs (repeat)")
    p.set_defaults(func=cmd_signer_import_cert)
    for name, func in (("link", cmd_signer_link), ("unlink", cmd_signer_unlink)):
        p = sg.add_parser(name, help=f"{name} a signer and a facility")
        config_flags(p)
        p.add_argument("signer")
        p.add_argument("facility")
        p.set_defaults(func=func)

    p = sg.add_parser(
        "enroll-code", help="issue a one-time FIDO2 enrolment code + password (shown once)"
    )
    config_flags(p)
    p.add_argument("signer")
    p.set_defaults(func=cmd_signer_enroll_code)
    p = sg.add_parser("authenticators", help="list a signer's FIDO2 authenticators")
    config_flags(p)
    p.add_argument("signer")
    p.set_defaults(func=cmd_signer_authenticators)
    p = sg.add_parser("remove-authenticator", help="remove a FIDO2 authenticator")
    config_flags(p)
    p.add_argument("signer")
    p.add_argument("authenticator", help="authenticator id (fido-...)")
    p.set_defaults(func=cmd_signer_remove_authenticator)
    p = sg.add_parser("lock", help="lock a signer: authorize/signHash answer access_denied")
    config_flags(p)
    p.add_argument("signer")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_signer_lock)
    p = sg.add_parser("unlock", help="make a locked signer active again")
    config_flags(p)
    p.add_argument("signer")
    p.set_defaults(func=cmd_signer_lock)
    jpki.register_signer(sg)
