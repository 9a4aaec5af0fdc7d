"""``facility``, ``admin``, ``scheduler``: the facility lifecycle (registry, client
certificates, delivery, reminders, revocation) and administrators' certificates."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.cli.common import Context, actor, config_flags, emit, settings_of
from gateway.errors import ConfigError


async def cmd_facility_add(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        f = await ctx.facilities.add(
            institution_code=args.code,
            name=args.name,
            kind=args.kind,
            provisional=args.provisional,
            dental_code=args.dental_code,
            contact_email=args.contact_email,
            per_terminal=args.per_terminal,
            actor=actor(),
        )
    emit(args, f.__dict__, f"registered facility {f.institution_code} ({f.name})")
    return 0


async def cmd_facility_policy(args: argparse.Namespace) -> int:
    per_terminal = None if args.per_terminal is None else args.per_terminal == "on"
    async with Context(settings_of(args), with_keystore=False) as ctx:
        f = await ctx.facilities.set_policy(
            args.code, per_terminal=per_terminal, contact_email=args.contact_email, actor=actor()
        )
    emit(
        args,
        f.__dict__,
        f"facility {f.institution_code}: per-terminal certificates "
        f"{'on' if f.per_terminal else 'off'}, contact {f.contact_email or '-'}",
    )
    return 0


async def cmd_facility_link_dental(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        f = await ctx.facilities.link_dental(args.code, args.dental_code, actor=actor())
    emit(
        args,
        f.__dict__,
        f"dental code {f.dental_code} linked to facility {f.institution_code} "
        "(co-located dental department)",
    )
    return 0


async def cmd_facility_list(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        items = await ctx.facilities.list_all()
    data = [f.__dict__ for f in items]
    text = "\n".join(
        f"{f.institution_code}  {f.status:<9} {f.kind:<13} {f.name}"
        + ("  (provisional)" if f.provisional else "")
        for f in items
    )
    emit(args, data, text or "no facilities")
    return 0


def _cert_line(c: dict[str, Any]) -> str:
    status = c["status"]
    if status == "overlapping":
        status = f"overlapping until {c['revoke_at'][:10]}"
    elif status == "revoked":
        status = f"revoked {c['revoked_at'][:10]}: {c['reason']}"
    return (
        f"  serial {c['serial']}  {c['terminal'] or '-'}  issued {c['issued'][:10]} "
        f"expires {c['expires'][:10]}  downloaded {(c['downloaded_at'] or '-')[:19]}  "
        f"last used {(c['last_used'] or '-')[:19]}  [{status}]"
    )


async def cmd_facility_status(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        data = await ctx.certificates.status(args.code)
    lines = [
        f"{data['institution_code']} {data['name']} [{data['status']}]"
        + ("  (provisional code 仮コード)" if data["provisional"] else "")
    ]
    lines += [_cert_line(c) for c in data["certificates"]] or ["  no certificates"]
    emit(args, data, "\n".join(lines))
    return 0


async def cmd_facility_expiring(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        items = await ctx.certificates.expiring(args.within)
    text = "\n".join(
        f"{c['institution_code']}  {c['serial']}  {c['terminal'] or '-'}  expires "
        f"{c['expiry_date']} ({c['days_left']} days)  {c['status']}  {c['name']}"
        for c in items
    )
    emit(args, items, text or f"no certificate expires within {args.within} days")
    return 0


async def cmd_facility_stop(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        revoked = await ctx.certificates.stop_service(args.code, reason=args.reason, actor=actor())
    emit(
        args,
        {"institution_code": args.code, "status": "stopped", "revoked": revoked},
        f"facility {args.code} stopped the service; revoked at once: "
        + (", ".join(revoked) or "no certificates"),
    )
    return 0


async def cmd_facility_suspend(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        f = await ctx.facilities.set_status(
            args.code, status="suspended", reason=args.reason, actor=actor()
        )
    emit(args, f.__dict__, f"facility {f.institution_code} suspended")
    return 0


async def cmd_facility_resume(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        f = await ctx.facilities.set_status(args.code, status="active", reason=None, actor=actor())
    emit(args, f.__dict__, f"facility {f.institution_code} active")
    return 0


def _issue_text(res: Any, verb: str) -> str:
    lines = [
        f"{verb} client certificate {res.serial} for {res.institution_code}"
        + (f" (terminal {res.terminal})" if res.terminal else "")
        + f", expires {res.expires[:10]}"
    ]
    for r in res.replaced:
        if r["status"] == "revoked":
            lines.append(f"  replaces {r['serial']}: revoked at once")
        else:
            lines.append(f"  replaces {r['serial']}: revoked automatically at {r['revoke_at']}")
    if res.hand_over:
        lines.append(
            f"  files in {Path(res.hand_over['p12']).parent}; "
            f"PKCS#12 password: {res.hand_over['p12_password']}"
        )
        lines.append("  (handed over in person: the status records it as downloaded)")
    else:
        lines.append(f"  password notice (print, post to the facility): {res.password_notice}")
        lines.append(f"  download link valid until {res.download_expires}: {res.download_url}")
        lines.append(
            f"  the two mails (link, then download password) are in {res.outbox}"
            + ("; sent by SMTP" if res.mailed else "")
            + (f"; SMTP failed: {res.mail_error}" if res.mail_error else "")
        )
    return "\n".join(lines)


async def cmd_facility_issue_cert(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        res = await ctx.certificates.issue(
            args.code,
            terminal=args.terminal,
            actor=actor(),
            hand_over_dir=Path(args.out) if args.out else None,
        )
    data = res.to_json_dict(include_secrets=True)
    # A hand-over in person: the file paths and the PKCS#12 password, in the keys scripts read.
    if res.hand_over:
        data.update(res.hand_over)
    emit(args, data, _issue_text(res, "issued"))
    return 0


async def cmd_facility_rotate_cert(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        res = await ctx.certificates.rotate(
            args.code,
            serial=args.serial,
            terminal=args.terminal,
            new_code=args.new_code,
            reason=args.reason,
            actor=actor(),
            hand_over_dir=Path(args.out) if args.out else None,
        )
    data = res.to_json_dict(include_secrets=True)
    if res.hand_over:
        data.update(res.hand_over)
    emit(args, data, _issue_text(res, "rotated: issued"))
    return 0


async def cmd_facility_revoke_cert(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        out = await ctx.certificates.revoke(
            args.serial, reason=args.reason, actor=actor(), with_renewals=args.with_renewals
        )
    lines = [f"revoked {out['serial']}"]
    for r in out["renewals"]:
        lines.append(
            f"  renewed over EST into {r['serial']}: revoked too"
            if r["status"] == "revoked"
            else f"  renewed over EST into {r['serial']}: still valid "
            f"(if the key was stolen, revoke it too: revoke-cert {r['serial']})"
        )
    emit(args, out, "\n".join(lines))
    return 0


async def cmd_facility_resend(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        res = await ctx.certificates.resend(args.serial, actor=actor())
    emit(
        args,
        res.__dict__,
        f"new download window for {res.serial} until {res.download_expires} "
        f"(round {res.round}): {res.download_url}\n  mails in {res.outbox}"
        + ("; sent by SMTP" if res.mailed else ""),
    )
    return 0


async def cmd_facility_export_p12(args: argparse.Namespace) -> int:
    from gateway.files import write_private

    async with Context(settings_of(args), with_keystore=False) as ctx:
        name, p12 = await ctx.certificates.export_p12(args.serial, actor=actor())
        out = Path(args.out)
        if out.is_dir():
            out = out / name
        write_private(out, p12)
    emit(args, {"serial": args.serial, "file": str(out)}, f"wrote {out} (recorded as downloaded)")
    return 0


async def cmd_facility_signing_session(args: argparse.Namespace) -> int:
    from gateway.app import make_activation
    from gateway.auth.activation import SigningSessionPolicy

    if args.enable == args.disable:
        raise ConfigError("give exactly one of --enable or --disable")
    policy = SigningSessionPolicy(
        enabled=bool(args.enable), max_signatures=args.max_signatures, hours=args.hours
    )
    async with Context(settings_of(args), with_keystore=False) as ctx:
        act = make_activation(ctx.settings, db=ctx.db, audit=ctx.audit, fido2=ctx.fido2)
        await act.set_session_policy(args.code, policy, actor=actor())
    text = (
        f"signing sessions for {args.code}: up to {policy.max_signatures} signatures within "
        f"{policy.hours} hours after one FIDO2 check (SCAL 1)"
        if policy.enabled
        else f"signing sessions for {args.code}: off (every SAD is bound to its hashes, SCAL 2)"
    )
    emit(args, {"institution_code": args.code, **policy.to_json_dict()}, text)
    return 0


async def cmd_scheduler_run_once(args: argparse.Namespace) -> int:
    from gateway.lifecycle.scheduler import Scheduler

    async with Context(settings_of(args), with_keystore=False) as ctx:
        report = await Scheduler(service=ctx.certificates).run_once()
    emit(
        args,
        report.to_json_dict(),
        f"scheduler: {len(report.revoked)} revoked, {len(report.reminders)} reminders, "
        f"{report.mailed} mailed ({report.mail_errors} failed), "
        f"CRL {'published' if report.crl_published else 'current'}, "
        f"purged {report.purged['sads']} SADs and {report.purged['challenges']} challenges",
    )
    return 0


async def cmd_admin_issue_cert(args: argparse.Namespace) -> int:
    from gateway.pki import facility_ca

    settings = settings_of(args)
    async with Context(settings, with_keystore=False) as ctx:
        ca = facility_ca.load_ca(settings.pki.facility_ca_cert, settings.pki.facility_ca_key)
        issued = facility_ca.issue(
            ca,
            out_dir=Path(args.out),
            common_name=f"admin {args.name}",
            institution_code=None,
            organization="hpki-gateway administrators",
            service_name=settings.service.name,
            now=ctx.clock(),
        )
        serial = await ctx.facilities.register_certificate(
            issued.cert, admin_name=args.name, actor=actor()
        )
    data = {"serial": serial, "cert": str(issued.cert_path), "key": str(issued.key_path)}
    emit(args, data, f"issued admin certificate {serial} for {args.name} in {args.out}")
    return 0


def register_facility(sub: Any) -> None:
    fac = sub.add_parser("facility", help="facility registry").add_subparsers(
        dest="sub", required=True
    )
    p = fac.add_parser("add", help="register a facility")
    config_flags(p)
    p.add_argument("code", help="10-digit institution code")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--kind", required=True, choices=["hospital", "clinic", "dental_clinic", "pharmacy"]
    )
    p.add_argument("--provisional", action="store_true", help="a provisional code (仮コード)")
    p.add_argument("--dental-code", default=None, help="co-located dental department's code")
    p.add_argument("--contact-email", default=None, help="where reminders and delivery mail go")
    p.add_argument("--per-terminal", action="store_true", help="one certificate per terminal label")
    p.set_defaults(func=cmd_facility_add)
    p = fac.add_parser("policy", help="per-terminal policy and contact address")
    config_flags(p)
    p.add_argument("code")
    p.add_argument("--per-terminal", choices=["on", "off"], default=None)
    p.add_argument("--contact-email", default=None)
    p.set_defaults(func=cmd_facility_policy)
    p = fac.add_parser("link-dental", help="link a co-located dental department's code")
    config_flags(p)
    p.add_argument("code", help="the facility's medical (医科) code")
    p.add_argument("dental_code", help="the dental (歯科) code")
    p.set_defaults(func=cmd_facility_link_dental)
    p = fac.add_parser("expiring", help="certificates expiring within DAYS")
    config_flags(p)
    p.add_argument("--within", type=int, required=True, metavar="DAYS")
    p.set_defaults(func=cmd_facility_expiring)
    p = fac.add_parser("stop", help="the facility stops the service: revoke everything now")
    config_flags(p)
    p.add_argument("code")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_facility_stop)
    p = fac.add_parser("list", help="list facilities")
    config_flags(p)
    p.set_defaults(func=cmd_facility_list)
    p = fac.add_parser("status", help="a facility and its client certificates")
    config_flags(p)
    p.add_argument("code")
    p.set_defaults(func=cmd_facility_status)
    p = fac.add_parser("suspend", help="suspend a facility (all its calls get 403)")
    config_flags(p)
    p.add_argument("code")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_facility_suspend)
    p = fac.add_parser("resume", help="make a suspended facility active again")
    config_flags(p)
    p.add_argument("code")
    p.set_defaults(func=cmd_facility_resume)
    p = fac.add_parser("issue-cert", help="issue a client certificate from the facility CA")
    config_flags(p)
    p.add_argument("code")
    p.add_argument(
        "--out",
        default=None,
        help="hand over in person: write client.pem/.key/.p12 here instead of a download link",
    )
    p.add_argument("--terminal", default=None, help="terminal label (per-terminal policy)")
    p.set_defaults(func=cmd_facility_issue_cert)
    p = fac.add_parser(
        "rotate-cert", help="reissue (renewal, code change, provisional → real code)"
    )
    config_flags(p)
    p.add_argument("code")
    p.add_argument("--serial", default=None, help="the certificate to replace")
    p.add_argument("--terminal", default=None, help="the terminal whose certificate to replace")
    p.add_argument("--new-code", default=None, help="the new (or real) institution code")
    p.add_argument("--reason", default=None)
    p.add_argument("--out", default=None, help="hand over in person (see issue-cert)")
    p.set_defaults(func=cmd_facility_rotate_cert)
    p = fac.add_parser("resend", help="new 14-day download window (new link and password)")
    config_flags(p)
    p.add_argument("serial")
    p.set_defaults(func=cmd_facility_resend)
    p = fac.add_parser("export-p12", help="take the stored file out (counts as the download)")
    config_flags(p)
    p.add_argument("serial")
    p.add_argument("--out", required=True, help="file or directory")
    p.set_defaults(func=cmd_facility_export_p12)
    p = fac.add_parser("revoke-cert", help="revoke a client certificate at once")
    config_flags(p)
    p.add_argument("serial", help="certificate serial (hex)")
    p.add_argument("--reason", required=True)
    p.add_argument(
        "--with-renewals",
        action="store_true",
        help="revoke too the certificates that renewed this one over EST (a stolen certificate)",
    )
    p.set_defaults(func=cmd_facility_revoke_cert)

    p = fac.add_parser(
        "signing-session",
        help="signing-session policy (SCAL 1: one FIDO2 check, N signatures in H hours)",
    )
    config_flags(p)
    p.add_argument("code")
    p.add_argument("--enable", action="store_true")
    p.add_argument("--disable", action="store_true")
    p.add_argument("--hours", type=float, default=0.0)
    p.add_argument("--max-signatures", type=int, default=0)
    p.set_defaults(func=cmd_facility_signing_session)


def register_admin(sub: Any) -> None:
    adm = sub.add_parser("admin", help="administrators").add_subparsers(dest="sub", required=True)
    p = adm.add_parser("issue-cert", help="issue an admin client certificate")
    config_flags(p)
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_admin_issue_cert)


def register_scheduler(sub: Any) -> None:
    sc = sub.add_parser("scheduler", help="reminders, scheduled revocations, CRL").add_subparsers(
        dest="sub", required=True
    )
    p = sc.add_parser("run-once", help="one scheduler run (for cron); safe next to serve")
    config_flags(p)
    p.set_defaults(func=cmd_scheduler_run_once)
