"""``application``, ``vendor``, ``statement`` (the office's side of facility self-service) and
``client renew`` (the facility's side: run daily by its own system)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import Context, actor, config_flags, emit, settings_of, write_output
from gateway.lifecycle.applications import Applicant, ApplicationService, Submission, VendorRegistry
from gateway.lifecycle.statements import StatementService


def _apps(ctx: Context) -> ApplicationService:
    return ApplicationService(
        db=ctx.db,
        audit=ctx.audit,
        registry=ctx.facilities,
        certificates=ctx.certificates,
        clock=ctx.clock,
    )


def _app_line(a: dict[str, Any]) -> str:
    return (
        f"{a['request_id']}  {a['institution_code']}  {a['kind']:<7} {a['status']:<10} "
        f"submitted {a['submitted'][:10]}  issued {(a['issued'] or '-')[:10]}  "
        f"last update {a['last_update'][:19]}  downloaded {'yes' if a['downloaded'] else 'no'}"
        + (f"  (via {a['via']} {a['vendor'] or ''})".rstrip() if a["via"] != "officer" else "")
    )


async def cmd_application_submit(args: argparse.Namespace) -> int:
    sub = Submission(
        kind=args.kind,
        institution_code=args.code,
        facility_name=args.name,
        facility_kind=args.facility_kind,
        provisional=args.provisional,
        new_institution_code=args.new_code,
        recipient_name=args.recipient,
        contact_email=args.contact_email,
        terminals=tuple(args.terminal or ()),
        remarks=args.remarks,
        cause=args.cause,
    )
    async with Context(settings_of(args), with_keystore=False) as ctx:
        app, created = await _apps(ctx).submit(
            sub, Applicant(actor=actor(), via="officer"), idempotency_key=args.idempotency_key
        )
    emit(
        args,
        app,
        ("recorded application " if created else "already recorded (same key): ") + _app_line(app),
    )
    return 0


async def cmd_application_list(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        items = await _apps(ctx).pending()
    emit(args, items, "\n".join(_app_line(a) for a in items) or "no open applications")
    return 0


async def cmd_application_show(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        app = await _apps(ctx).get(args.request_id)
    emit(args, app, json.dumps(app, ensure_ascii=False, indent=2))
    return 0


async def cmd_application_status(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        data = await _apps(ctx).status(args.code)
    lines = [f"{data['institution_code']} {data['name']}"]
    lines += ["  " + _app_line(a) for a in data["applications"]] or ["  no applications"]
    emit(args, data, "\n".join(lines))
    return 0


async def cmd_application_approve(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        out = await _apps(ctx).approve(args.request_id, actor=actor(), note=args.reason)
    text = f"approved: {_app_line(out)}"
    for c in out.get("issued_certificates", []):
        text += f"\n  issued {c['serial']}; password notice {c['password_notice']}"
    emit(args, out, text)
    return 0


async def cmd_application_reject(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        out = await _apps(ctx).reject(args.request_id, reason=args.reason, actor=actor())
    emit(args, out, f"rejected: {_app_line(out)}")
    return 0


async def cmd_vendor_add(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        v = await VendorRegistry(db=ctx.db, audit=ctx.audit, clock=ctx.clock).add(
            args.name, contact_email=args.contact_email, actor=actor()
        )
    emit(args, v, f"registered vendor {v['name']}")
    return 0


async def cmd_vendor_link(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        reg = VendorRegistry(db=ctx.db, audit=ctx.audit, clock=ctx.clock)
        if args.unlink:
            v = await reg.unlink(args.name, args.code, actor=actor())
        else:
            v = await reg.link(args.name, args.code, actor=actor())
    emit(args, v, f"vendor {v['name']} serves: {', '.join(v['facilities']) or 'no facility'}")
    return 0


async def cmd_vendor_list(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        items = await VendorRegistry(db=ctx.db, audit=ctx.audit, clock=ctx.clock).list_all()
    emit(
        args,
        items,
        "\n".join(f"{v['name']}  [{v['status']}]  {', '.join(v['facilities'])}" for v in items)
        or "no vendors",
    )
    return 0


async def cmd_vendor_issue_cert(args: argparse.Namespace) -> int:
    from gateway.pki import facility_ca

    settings = settings_of(args)
    async with Context(settings, with_keystore=False) as ctx:
        await VendorRegistry(db=ctx.db, audit=ctx.audit, clock=ctx.clock).get(args.name)
        ca = facility_ca.load_ca(settings.pki.facility_ca_cert, settings.pki.facility_ca_key)
        issued = facility_ca.issue(
            ca,
            out_dir=Path(args.out),
            common_name=args.name,
            institution_code=None,
            organization="hpki-gateway vendors",
            service_name=settings.service.name,
            now=ctx.clock(),
        )
        serial = await ctx.facilities.register_certificate(
            issued.cert, vendor_name=args.name, actor=actor(), downloaded=True
        )
    data = {"serial": serial, "cert": str(issued.cert_path), "key": str(issued.key_path)}
    emit(args, data, f"issued vendor certificate {serial} for {args.name} in {args.out}")
    return 0


async def cmd_statement_payment(args: argparse.Namespace) -> int:
    async with Context(settings_of(args), with_keystore=False) as ctx:
        f = await ctx.facilities.set_policy(args.code, payment_method=args.method, actor=actor())
    emit(
        args,
        {"institution_code": f.institution_code, "payment_method": f.payment_method},
        f"facility {f.institution_code} pays by {f.payment_method}",
    )
    return 0


async def cmd_statement_make(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    async with Context(settings, with_keystore=False) as ctx:
        svc = StatementService(
            settings=settings,
            db=ctx.db,
            audit=ctx.audit,
            registry=ctx.facilities,
            clock=ctx.clock,
        )
        st = await svc.statement(args.code, args.month, actor=actor())
        if args.format == "pdf":
            data = await svc.pdf(st)
        elif args.format == "csv":
            data = st.csv_bytes()
        else:
            data = (json.dumps(st.to_json_dict(), ensure_ascii=False, indent=2) + "\n").encode()
    write_output(args.out, data)
    return 0


async def cmd_client_renew(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.lifecycle.renewal_client import ClientFiles, renew, text_report

    if not 0 <= args.renew_within <= 365:
        print("hpki-gateway: --renew-within must be 0 to 365 days", file=sys.stderr)
        return 2
    files = ClientFiles(cert=Path(args.cert), key=Path(args.key), server_ca=Path(args.ca))
    report = await asyncio.to_thread(renew, args.url, files, renew_within=args.renew_within)
    emit(args, report.to_json_dict(), text_report(report))
    return report.exit_code


def register(sub: Any) -> None:
    ap = sub.add_parser("application", help="applications (新規/再申請/停止)").add_subparsers(
        dest="sub", required=True
    )
    p = ap.add_parser("submit", help="record an application (the web form's content)")
    config_flags(p)
    p.add_argument("code", help="10-digit institution code (a provisional code is allowed)")
    p.add_argument("--kind", required=True, choices=["new", "reapply", "stop"])
    p.add_argument("--name", default=None, help="facility name (new facilities)")
    p.add_argument(
        "--facility-kind", default=None, choices=["hospital", "clinic", "dental_clinic", "pharmacy"]
    )
    p.add_argument("--provisional", action="store_true", help="a provisional code (仮コード)")
    p.add_argument("--new-code", default=None, help="re-application: the new institution code")
    p.add_argument("--recipient", default=None, help="who receives the post (担当者 氏名)")
    p.add_argument("--contact-email", default=None)
    p.add_argument("--terminal", action="append", help="terminal label (repeat; per terminal)")
    p.add_argument("--remarks", default=None, help="備考: the reason of a re-application or stop")
    p.add_argument(
        "--cause",
        default=None,
        choices=[
            "correction",
            "code_change",
            "provisional_to_real",
            "notice_lost",
            "expired",
            "other",
        ],
    )
    p.add_argument("--idempotency-key", default=None, help="e.g. the web form's submission id")
    p.set_defaults(func=cmd_application_submit)
    p = ap.add_parser("list", help="open applications")
    config_flags(p)
    p.set_defaults(func=cmd_application_list)
    p = ap.add_parser("show", help="one application")
    config_flags(p)
    p.add_argument("request_id")
    p.set_defaults(func=cmd_application_show)
    p = ap.add_parser("status", help="status inquiry of a facility (申請状況照会)")
    config_flags(p)
    p.add_argument("code")
    p.set_defaults(func=cmd_application_status)
    p = ap.add_parser("approve", help="approve: issue, rotate or stop through the lifecycle")
    config_flags(p)
    p.add_argument("request_id")
    p.add_argument("--reason", default=None)
    p.set_defaults(func=cmd_application_approve)
    p = ap.add_parser("reject", help="reject with a reason")
    config_flags(p)
    p.add_argument("request_id")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_application_reject)

    vp = sub.add_parser("vendor", help="vendors applying for facilities (代理申請)").add_subparsers(
        dest="sub", required=True
    )
    p = vp.add_parser("add", help="register a vendor")
    config_flags(p)
    p.add_argument("name")
    p.add_argument("--contact-email", default=None)
    p.set_defaults(func=cmd_vendor_add)
    p = vp.add_parser("link", help="link a vendor to a facility it serves")
    config_flags(p)
    p.add_argument("name")
    p.add_argument("code")
    p.add_argument("--unlink", action="store_true", help="remove the link instead")
    p.set_defaults(func=cmd_vendor_link)
    p = vp.add_parser("list", help="vendors and their facilities")
    config_flags(p)
    p.set_defaults(func=cmd_vendor_list)
    p = vp.add_parser("issue-cert", help="issue a vendor's client certificate (hand-over)")
    config_flags(p)
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_vendor_issue_cert)

    st = sub.add_parser("statement", help="fees: monthly statements (請求書)").add_subparsers(
        dest="sub", required=True
    )
    p = st.add_parser("payment-method", help="how a facility pays")
    config_flags(p)
    p.add_argument("code")
    p.add_argument("method", choices=["deduction", "transfer"])
    p.set_defaults(func=cmd_statement_payment)
    p = st.add_parser("make", help="a facility's statement of a closed month")
    config_flags(p, json_flag=False)
    p.add_argument("code")
    p.add_argument("month", help="YYYY-MM (JST)")
    p.add_argument("--format", choices=["csv", "pdf", "json"], default="pdf")
    p.add_argument("--out", default="-", help="file, or - for standard output")
    p.set_defaults(func=cmd_statement_make)

    cl = sub.add_parser("client", help="the facility's side").add_subparsers(
        dest="sub", required=True
    )
    p = cl.add_parser(
        "renew",
        help="renew this system's client certificate over EST (daily from cron)",
        description="Exit 0: nothing to do; 10: renewed; 1: failed; 2: bad usage.",
    )
    p.add_argument("--url", required=True, help="the gateway, https://host:port")
    p.add_argument("--cert", required=True, help="current client certificate (PEM)")
    p.add_argument("--key", required=True, help="its private key (PEM, unencrypted)")
    p.add_argument("--ca", required=True, help="CA bundle that signs the gateway's server cert")
    p.add_argument(
        "--renew-within",
        type=int,
        default=90,
        help="renew from this many days before expiry (the gateway's renewal_window_days)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_client_renew)
