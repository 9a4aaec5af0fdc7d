"""``hpki-gateway`` command line: thin; parses arguments and calls the services.

Every command that acts on a deployment takes ``-c/--config PATH`` after its subcommand
(default: env HPKI_GATEWAY_CONFIG); commands that report take ``--json``.
Exit codes: 0 ok, 1 the operation failed or found a problem, 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, GatewayError

Action = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
    else:
        print(text)


class _Ctx:
    """Services for one CLI command, built from the settings; closed when the command ends."""

    def __init__(self, settings: Settings, *, with_keystore: bool) -> None:
        from gateway.app import make_audit, make_keystore, make_signers
        from gateway.facilities import FacilityRegistry
        from gateway.store.db import Database

        self.settings = settings
        self.db = Database(settings.database_url())
        self.audit = make_audit(settings)
        self.facilities = FacilityRegistry(db=self.db, audit=self.audit)
        self.keystore = make_keystore(settings) if with_keystore else None
        self.signers = (
            make_signers(settings, db=self.db, audit=self.audit, keystore=self.keystore)
            if self.keystore is not None
            else None
        )

    async def __aenter__(self) -> _Ctx:
        await self.db.migrate()
        if self.keystore is not None:
            await self.keystore.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.keystore is not None:
            await self.keystore.close()
        await self.db.close()


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# -- serve / db ------------------------------------------------------------------------------


async def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from gateway.store.db import Database

    db = Database(_settings(args).database_url())
    try:
        await db.migrate()
        rev = await db.current_revision()
    finally:
        await db.close()
    _print(args, {"revision": rev}, f"database schema at revision {rev}")
    return 0


# -- sandbox ---------------------------------------------------------------------------------


async def cmd_sandbox_init(args: argparse.Namespace) -> int:
    from gateway.sandbox import init_sandbox

    manifest = await init_sandbox(Path(args.dir), port=args.port, force=args.force)
    _print(
        args,
        manifest,
        f"sandbox ready in {Path(args.dir).resolve()}\n"
        f"  serve it:  hpki-gateway serve -c {Path(args.dir).resolve() / 'gateway.toml'}\n"
        f"  manifest:  {Path(args.dir).resolve() / 'manifest.json'}",
    )
    return 0


# -- facilities ------------------------------------------------------------------------------


async def cmd_facility_add(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        f = await ctx.facilities.add(
            institution_code=args.code,
            name=args.name,
            kind=args.kind,
            provisional=args.provisional,
            actor=_actor(),
        )
    _print(args, f.__dict__, f"registered facility {f.institution_code} ({f.name})")
    return 0


async def cmd_facility_list(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        items = await ctx.facilities.list_all()
    data = [f.__dict__ for f in items]
    text = "\n".join(
        f"{f.institution_code}  {f.status:<9} {f.kind:<13} {f.name}"
        + ("  (provisional)" if f.provisional else "")
        for f in items
    )
    _print(args, data, text or "no facilities")
    return 0


async def cmd_facility_status(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        f = await ctx.facilities.get(args.code)
        certs = await ctx.facilities.certificates(args.code)
    data = {
        "institution_code": f.institution_code,
        "name": f.name,
        "status": f.status,
        "certificates": certs,
    }
    lines = [f"{f.institution_code} {f.name} [{f.status}]"]
    for c in certs:
        lines.append(
            f"  serial {c['serial']}  {c['status']:<8} issued {c['issued'][:10]} "
            f"expires {c['expires'][:10]}  last used {c['last_used'] or '-'}"
            + (f"  revoked {c['revoked_at'][:10]}: {c['reason']}" if c["revoked_at"] else "")
        )
    _print(args, data, "\n".join(lines))
    return 0


async def cmd_facility_suspend(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        f = await ctx.facilities.set_status(
            args.code, status="suspended", reason=args.reason, actor=_actor()
        )
    _print(args, f.__dict__, f"facility {f.institution_code} suspended")
    return 0


async def cmd_facility_resume(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        f = await ctx.facilities.set_status(args.code, status="active", reason=None, actor=_actor())
    _print(args, f.__dict__, f"facility {f.institution_code} active")
    return 0


async def cmd_facility_issue_cert(args: argparse.Namespace) -> int:
    from gateway.pki import facility_ca

    settings = _settings(args)
    async with _Ctx(settings, with_keystore=False) as ctx:
        f = await ctx.facilities.get(args.code)
        ca = facility_ca.load_ca(settings.pki.facility_ca_cert, settings.pki.facility_ca_key)
        issued = facility_ca.issue(
            ca,
            out_dir=Path(args.out),
            common_name=f.name,
            institution_code=f.institution_code,
            terminal_label=args.terminal,
            service_name=settings.service.name,
        )
        serial = await ctx.facilities.register_certificate(
            issued.cert,
            institution_code=f.institution_code,
            terminal_label=args.terminal,
            actor=_actor(),
        )
    data = {
        "serial": serial,
        "cert": str(issued.cert_path),
        "key": str(issued.key_path),
        "p12": str(issued.p12_path),
        "p12_password": issued.p12_password,
        "expires": issued.cert.not_valid_after_utc.isoformat(),
    }
    _print(
        args,
        data,
        f"issued client certificate {serial} for {f.institution_code}\n"
        f"  files in {Path(args.out).resolve()}; PKCS#12 password: {issued.p12_password}",
    )
    return 0


async def cmd_facility_revoke_cert(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        await ctx.facilities.revoke_certificate(args.serial, reason=args.reason, actor=_actor())
    _print(args, {"serial": args.serial, "status": "revoked"}, f"revoked {args.serial}")
    return 0


async def cmd_admin_issue_cert(args: argparse.Namespace) -> int:
    from gateway.pki import facility_ca

    settings = _settings(args)
    async with _Ctx(settings, with_keystore=False) as ctx:
        ca = facility_ca.load_ca(settings.pki.facility_ca_cert, settings.pki.facility_ca_key)
        issued = facility_ca.issue(
            ca,
            out_dir=Path(args.out),
            common_name=f"admin {args.name}",
            institution_code=None,
            organization="hpki-gateway administrators",
            service_name=settings.service.name,
        )
        serial = await ctx.facilities.register_certificate(
            issued.cert, admin_name=args.name, actor=_actor()
        )
    data = {"serial": serial, "cert": str(issued.cert_path), "key": str(issued.key_path)}
    _print(args, data, f"issued admin certificate {serial} for {args.name} in {args.out}")
    return 0


# -- signers ---------------------------------------------------------------------------------


async def cmd_signer_add(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=True) as ctx:
        assert ctx.signers is not None
        s = await ctx.signers.add(
            name=args.name,
            name_kanji=args.name_kanji,
            role=args.role,
            facilities=args.facility,
            actor=_actor(),
        )
    cred = s.credentials[0]
    hint = (
        "certificate issued by the TEST HPKI CA"
        if cred.status == "active"
        else f"export a CSR: hpki-gateway signer csr {s.id} -o {s.id}.csr"
    )
    _print(
        args, s.to_json_dict(), f"signer {s.id} ({s.name}, {s.role}); credential {cred.id}: {hint}"
    )
    return 0


async def cmd_signer_list(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        items = await _signer_service_readonly(ctx).list_signers(institution_code=args.facility)
    text = "\n".join(
        f"{s.id}  {s.role:<16} {s.name:<28} {','.join(s.facilities)}  "
        + " ".join(f"{c.id}[{c.status}]" for c in s.credentials)
        for s in items
    )
    _print(args, [s.to_json_dict() for s in items], text or "no signers")
    return 0


def _signer_service_readonly(ctx: _Ctx) -> Any:
    from gateway.signers import SignerService

    # Listing touches no key: a key store is not needed (and may be down).
    return SignerService(db=ctx.db, audit=ctx.audit, keystore=None)  # type: ignore[arg-type]


async def cmd_signer_csr(args: argparse.Namespace) -> int:
    from gateway.pki.csr import csr_pem

    async with _Ctx(_settings(args), with_keystore=True) as ctx:
        assert ctx.signers is not None
        der = await ctx.signers.csr(args.signer, actor=_actor())
    pem = csr_pem(der)
    if args.out == "-":
        sys.stdout.write(pem)
    else:
        Path(args.out).write_text(pem)
        print(f"CSR for {args.signer} written to {args.out}", file=sys.stderr)
    return 0


async def cmd_signer_import_cert(args: argparse.Namespace) -> int:
    from gateway.signers import load_pem_chain

    chain = []
    for p in args.chain or []:
        chain.extend(load_pem_chain(Path(p).read_bytes()))
    async with _Ctx(_settings(args), with_keystore=True) as ctx:
        assert ctx.signers is not None
        cred = await ctx.signers.import_cert(
            args.signer, Path(args.cert).read_bytes(), chain=chain, actor=_actor()
        )
    _print(
        args,
        {"credential": cred.id, "status": cred.status},
        f"credential {cred.id} is {cred.status}",
    )
    return 0


async def cmd_signer_link(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        await _signer_service_readonly(ctx).link(args.signer, args.facility, actor=_actor())
    _print(args, {"signer": args.signer, "facility": args.facility}, "linked")
    return 0


async def cmd_signer_unlink(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        await _signer_service_readonly(ctx).unlink(args.signer, args.facility, actor=_actor())
    _print(args, {"signer": args.signer, "facility": args.facility}, "unlinked")
    return 0


# -- FIDO2 enrolment, signer lock, signing sessions -----------------------------------------


def _fido2(ctx: _Ctx) -> Any:
    from gateway.app import make_fido2

    return make_fido2(ctx.settings, db=ctx.db, audit=ctx.audit)


async def cmd_signer_enroll_code(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        issued = await _fido2(ctx).issue_enrollment(args.signer, actor=_actor())
    data = {
        "signer": issued.signer_id,
        "enrollment_code": issued.code,
        "enrollment_password": issued.password,
        "expires_at": issued.expires_at.isoformat(),
    }
    _print(
        args,
        data,
        f"enrolment code for {issued.signer_id} (shown once; hand the code and the password "
        "over separately)\n"
        f"  code:     {issued.code}\n  password: {issued.password}\n"
        f"  valid until {issued.expires_at.isoformat(timespec='minutes')}; register at /enroll",
    )
    return 0


async def cmd_signer_authenticators(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        items = await _fido2(ctx).list_authenticators(args.signer)
    text = "\n".join(
        f"{a.id}  aaguid {a.aaguid}  count {a.sign_count:<6} registered "
        f"{a.created_at.isoformat(timespec='minutes')}  last used "
        f"{a.last_used_at.isoformat(timespec='minutes') if a.last_used_at else '-'}  "
        f"{a.label or ''}"
        for a in items
    )
    _print(args, [a.to_json_dict() for a in items], text or "no authenticators")
    return 0


async def cmd_signer_remove_authenticator(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        await _fido2(ctx).remove_authenticator(args.signer, args.authenticator, actor=_actor())
    _print(args, {"removed": args.authenticator}, f"removed {args.authenticator}")
    return 0


async def cmd_signer_lock(args: argparse.Namespace) -> int:
    status = "locked" if args.sub == "lock" else "active"
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        await _signer_service_readonly(ctx).set_status(
            args.signer, status=status, reason=getattr(args, "reason", None), actor=_actor()
        )
    _print(args, {"signer": args.signer, "status": status}, f"signer {args.signer} is {status}")
    return 0


async def cmd_facility_signing_session(args: argparse.Namespace) -> int:
    from gateway.app import make_activation
    from gateway.auth.activation import SigningSessionPolicy

    if args.enable == args.disable:
        raise ConfigError("give exactly one of --enable or --disable")
    policy = SigningSessionPolicy(
        enabled=bool(args.enable), max_signatures=args.max_signatures, hours=args.hours
    )
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        act = make_activation(ctx.settings, db=ctx.db, audit=ctx.audit, fido2=_fido2(ctx))
        await act.set_session_policy(args.code, policy, actor=_actor())
    text = (
        f"signing sessions for {args.code}: up to {policy.max_signatures} signatures within "
        f"{policy.hours} hours after one FIDO2 check (SCAL 1)"
        if policy.enabled
        else f"signing sessions for {args.code}: off (every SAD is bound to its hashes, SCAL 2)"
    )
    _print(args, {"institution_code": args.code, **policy.to_json_dict()}, text)
    return 0


# -- audit -----------------------------------------------------------------------------------


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx, ctx.db.read() as conn:
        report = await ctx.audit.verify(conn)
    text = (
        f"audit chain intact: {report.events} events"
        if report.ok
        else f"AUDIT CHAIN BROKEN ({report.problem}): {report.message} "
        f"({report.events} events verified before it)"
    )
    _print(args, report.to_json_dict(), text)
    return 0 if report.ok else 1


# -- certificates ----------------------------------------------------------------------------


async def cmd_cert_inspect(args: argparse.Namespace) -> int:
    from gateway.pki import hpki
    from gateway.signers import load_certificate

    cert = load_certificate(Path(args.file).read_bytes())
    info = hpki.inspect_certificate(cert)
    data = info.to_json_dict()
    lines = [
        f"subject:   {info.subject}",
        f"issuer:    {info.issuer}",
        f"serial:    {info.serial_hex}",
        f"validity:  {info.not_before.isoformat()} .. {info.not_after.isoformat()}",
        f"hcRole:    {', '.join(info.hc_roles) or '-'}",
        f"policies:  {', '.join(info.policies) or '-'}",
        f"keyUsage:  {', '.join(info.key_usage) or '-'}",
        "HPKI signing profile: "
        + ("conforms" if info.conforms_to_signing_profile else "; ".join(info.profile_problems)),
    ]
    _print(args, data, "\n".join(lines))
    return 0


# -- parser ----------------------------------------------------------------------------------


def _cfg(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help="settings file (default: env HPKI_GATEWAY_CONFIG)",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpki-gateway", description="HPKI remote signing gateway")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve the gateway (mTLS listener)")
    _cfg(p, json_flag=False)
    p.add_argument("--workers", type=int, default=None, help="worker processes (SO_REUSEPORT)")

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="sub", required=True)
    p = db.add_parser("upgrade", help="apply migrations up to the newest schema")
    _cfg(p)
    p.set_defaults(func=cmd_db_upgrade)

    sb = sub.add_parser("sandbox", help="verification environment").add_subparsers(
        dest="sub", required=True
    )
    p = sb.add_parser("init", help="build a complete test world in DIR")
    p.add_argument("dir")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR has a world")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_init)

    fac = sub.add_parser("facility", help="facility registry").add_subparsers(
        dest="sub", required=True
    )
    p = fac.add_parser("add", help="register a facility")
    _cfg(p)
    p.add_argument("code", help="10-digit institution code")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--kind", required=True, choices=["hospital", "clinic", "dental_clinic", "pharmacy"]
    )
    p.add_argument("--provisional", action="store_true", help="a provisional code (仮コード)")
    p.set_defaults(func=cmd_facility_add)
    p = fac.add_parser("list", help="list facilities")
    _cfg(p)
    p.set_defaults(func=cmd_facility_list)
    p = fac.add_parser("status", help="a facility and its client certificates")
    _cfg(p)
    p.add_argument("code")
    p.set_defaults(func=cmd_facility_status)
    p = fac.add_parser("suspend", help="suspend a facility (all its calls get 403)")
    _cfg(p)
    p.add_argument("code")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_facility_suspend)
    p = fac.add_parser("resume", help="make a suspended facility active again")
    _cfg(p)
    p.add_argument("code")
    p.set_defaults(func=cmd_facility_resume)
    p = fac.add_parser("issue-cert", help="issue a client certificate from the facility CA")
    _cfg(p)
    p.add_argument("code")
    p.add_argument("--out", required=True, help="directory for client.pem/.key/.p12")
    p.add_argument("--terminal", default=None, help="terminal label (per-terminal policy)")
    p.set_defaults(func=cmd_facility_issue_cert)
    p = fac.add_parser("revoke-cert", help="revoke a client certificate at once")
    _cfg(p)
    p.add_argument("serial", help="certificate serial (hex)")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_facility_revoke_cert)

    adm = sub.add_parser("admin", help="administrators").add_subparsers(dest="sub", required=True)
    p = adm.add_parser("issue-cert", help="issue an admin client certificate")
    _cfg(p)
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_admin_issue_cert)

    sg = sub.add_parser("signer", help="signers and credentials").add_subparsers(
        dest="sub", required=True
    )
    p = sg.add_parser("add", help="create a signer with a new HSM key")
    _cfg(p)
    p.add_argument("--name", required=True, help="name in romaji, as in the certificate")
    p.add_argument("--name-kanji", default=None)
    p.add_argument("--role", required=True, help='hcRole text, e.g. "Medical Doctor"')
    p.add_argument("--facility", action="append", required=True, help="institution code (repeat)")
    p.set_defaults(func=cmd_signer_add)
    p = sg.add_parser("list", help="list signers")
    _cfg(p)
    p.add_argument("--facility", default=None)
    p.set_defaults(func=cmd_signer_list)
    p = sg.add_parser("csr", help="export a PKCS#10 request signed by the signer's HSM key")
    _cfg(p, json_flag=False)
    p.add_argument("signer")
    p.add_argument("-o", "--out", default="-")
    p.set_defaults(func=cmd_signer_csr)
    p = sg.add_parser("import-cert", help="attach the certificate the HPKI CA issued")
    _cfg(p)
    p.add_argument("signer")
    p.add_argument("cert", help="PEM or DER certificate")
    p.add_argument("--chain", action="append", help="PEM bundle of issuing CAs (repeat)")
    p.set_defaults(func=cmd_signer_import_cert)
    for name, func in (("link", cmd_signer_link), ("unlink", cmd_signer_unlink)):
        p = sg.add_parser(name, help=f"{name} a signer and a facility")
        _cfg(p)
        p.add_argument("signer")
        p.add_argument("facility")
        p.set_defaults(func=func)

    p = sg.add_parser(
        "enroll-code", help="issue a one-time FIDO2 enrolment code + password (shown once)"
    )
    _cfg(p)
    p.add_argument("signer")
    p.set_defaults(func=cmd_signer_enroll_code)
    p = sg.add_parser("authenticators", help="list a signer's FIDO2 authenticators")
    _cfg(p)
    p.add_argument("signer")
    p.set_defaults(func=cmd_signer_authenticators)
    p = sg.add_parser("remove-authenticator", help="remove a FIDO2 authenticator")
    _cfg(p)
    p.add_argument("signer")
    p.add_argument("authenticator", help="authenticator id (fido-...)")
    p.set_defaults(func=cmd_signer_remove_authenticator)
    p = sg.add_parser("lock", help="lock a signer: authorize/signHash answer access_denied")
    _cfg(p)
    p.add_argument("signer")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_signer_lock)
    p = sg.add_parser("unlock", help="make a locked signer active again")
    _cfg(p)
    p.add_argument("signer")
    p.set_defaults(func=cmd_signer_lock)

    p = fac.add_parser(
        "signing-session",
        help="signing-session policy (SCAL 1: one FIDO2 check, N signatures in H hours)",
    )
    _cfg(p)
    p.add_argument("code")
    p.add_argument("--enable", action="store_true")
    p.add_argument("--disable", action="store_true")
    p.add_argument("--hours", type=float, default=0.0)
    p.add_argument("--max-signatures", type=int, default=0)
    p.set_defaults(func=cmd_facility_signing_session)

    au = sub.add_parser("audit", help="audit log").add_subparsers(dest="sub", required=True)
    p = au.add_parser("verify", help="verify the hash chain; exit 1 on the first problem")
    _cfg(p)
    p.set_defaults(func=cmd_audit_verify)

    ce = sub.add_parser("cert", help="certificates").add_subparsers(dest="sub", required=True)
    p = ce.add_parser("inspect", help="show a certificate and its HPKI profile")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cert_inspect)
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
