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

from gateway.card import cli as card_cli
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
        from gateway.certificates import ClientCertificateService
        from gateway.facilities import FacilityRegistry
        from gateway.store.db import Database

        self.settings = settings
        self.db = Database(settings.database_url())
        self.audit = make_audit(settings)
        self.facilities = FacilityRegistry(db=self.db, audit=self.audit)
        self.certificates = ClientCertificateService(
            settings=settings, db=self.db, audit=self.audit, registry=self.facilities
        )
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

    manifest = await init_sandbox(
        Path(args.dir), port=args.port, force=args.force, tsa_port=args.tsa_port
    )
    _print(
        args,
        manifest,
        f"sandbox ready in {Path(args.dir).resolve()}\n"
        f"  serve it:  hpki-gateway serve -c {Path(args.dir).resolve() / 'gateway.toml'}\n"
        f"  TEST TSA:  {manifest['tsa_url']} (served by `serve`)\n"
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
            dental_code=args.dental_code,
            contact_email=args.contact_email,
            per_terminal=args.per_terminal,
            actor=_actor(),
        )
    _print(args, f.__dict__, f"registered facility {f.institution_code} ({f.name})")
    return 0


async def cmd_facility_policy(args: argparse.Namespace) -> int:
    per_terminal = None if args.per_terminal is None else args.per_terminal == "on"
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        f = await ctx.facilities.set_policy(
            args.code, per_terminal=per_terminal, contact_email=args.contact_email, actor=_actor()
        )
    _print(
        args,
        f.__dict__,
        f"facility {f.institution_code}: per-terminal certificates "
        f"{'on' if f.per_terminal else 'off'}, contact {f.contact_email or '-'}",
    )
    return 0


async def cmd_facility_link_dental(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        f = await ctx.facilities.link_dental(args.code, args.dental_code, actor=_actor())
    _print(
        args,
        f.__dict__,
        f"dental code {f.dental_code} linked to facility {f.institution_code} "
        "(co-located dental department)",
    )
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
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        data = await ctx.certificates.status(args.code)
    lines = [
        f"{data['institution_code']} {data['name']} [{data['status']}]"
        + ("  (provisional code 仮コード)" if data["provisional"] else "")
    ]
    lines += [_cert_line(c) for c in data["certificates"]] or ["  no certificates"]
    _print(args, data, "\n".join(lines))
    return 0


async def cmd_facility_expiring(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        items = await ctx.certificates.expiring(args.within)
    text = "\n".join(
        f"{c['institution_code']}  {c['serial']}  {c['terminal'] or '-'}  expires "
        f"{c['expiry_date']} ({c['days_left']} days)  {c['status']}  {c['name']}"
        for c in items
    )
    _print(args, items, text or f"no certificate expires within {args.within} days")
    return 0


async def cmd_facility_stop(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        revoked = await ctx.certificates.stop_service(args.code, reason=args.reason, actor=_actor())
    _print(
        args,
        {"institution_code": args.code, "status": "stopped", "revoked": revoked},
        f"facility {args.code} stopped the service; revoked at once: "
        + (", ".join(revoked) or "no certificates"),
    )
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


def _issue_text(res: Any, verb: str) -> str:
    lines = [
        f"{verb} client certificate {res.serial} for {res.institution_code}"
        + (f" (terminal {res.terminal})" if res.terminal else "")
        + f", expires {res.expires[:10]}"
    ]
    for r in res.replaced:
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
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        res = await ctx.certificates.issue(
            args.code,
            terminal=args.terminal,
            actor=_actor(),
            hand_over_dir=Path(args.out) if args.out else None,
        )
    data = res.to_json_dict(include_secrets=True)
    if res.hand_over:  # the keys the older command printed
        data.update(res.hand_over)
    _print(args, data, _issue_text(res, "issued"))
    return 0


async def cmd_facility_rotate_cert(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        res = await ctx.certificates.rotate(
            args.code,
            serial=args.serial,
            terminal=args.terminal,
            new_code=args.new_code,
            reason=args.reason,
            actor=_actor(),
            hand_over_dir=Path(args.out) if args.out else None,
        )
    data = res.to_json_dict(include_secrets=True)
    if res.hand_over:
        data.update(res.hand_over)
    _print(args, data, _issue_text(res, "rotated: issued"))
    return 0


async def cmd_facility_revoke_cert(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        out = await ctx.certificates.revoke(args.serial, reason=args.reason, actor=_actor())
    _print(args, out, f"revoked {out['serial']}")
    return 0


async def cmd_facility_resend(args: argparse.Namespace) -> int:
    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        res = await ctx.certificates.resend(args.serial, actor=_actor())
    _print(
        args,
        res.__dict__,
        f"new download window for {res.serial} until {res.download_expires} "
        f"(round {res.round}): {res.download_url}\n  mails in {res.outbox}"
        + ("; sent by SMTP" if res.mailed else ""),
    )
    return 0


async def cmd_facility_export_p12(args: argparse.Namespace) -> int:
    from gateway.mailer import write_private

    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        name, p12 = await ctx.certificates.export_p12(args.serial, actor=_actor())
        out = Path(args.out)
        if out.is_dir():
            out = out / name
        write_private(out, p12)
    _print(args, {"serial": args.serial, "file": str(out)}, f"wrote {out} (recorded as downloaded)")
    return 0


async def cmd_scheduler_run_once(args: argparse.Namespace) -> int:
    from gateway.scheduler import Scheduler

    async with _Ctx(_settings(args), with_keystore=False) as ctx:
        report = await Scheduler(service=ctx.certificates).run_once()
    _print(
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
    chain = await _chain_status(args, cert)
    data["chain"] = chain
    lines = [
        f"subject:   {info.subject}",
        f"issuer:    {info.issuer}",
        f"serial:    {info.serial_hex}",
        f"validity:  {info.not_before.isoformat()} .. {info.not_after.isoformat()}",
        f"hcRole:    {', '.join(info.hc_roles) or '-'}",
        f"policies:  {', '.join(info.policies) or '-'}",
        f"keyUsage:  {', '.join(info.key_usage) or '-'}",
        f"CRL DP:    {', '.join(info.crl_urls) or '-'}",
        "HPKI signing profile: "
        + ("conforms" if info.conforms_to_signing_profile else "; ".join(info.profile_problems)),
        f"chain:     {chain['status']}"
        + (f" ({chain['reason']})" if chain.get("reason") else "")
        + (f" via {' <- '.join(chain['path'][1:])}" if chain.get("path") else ""),
        f"revocation: {chain['revocation']['status']}"
        + (f" ({chain['revocation']['reason']})" if chain["revocation"].get("reason") else ""),
        "may sign:  "
        + (", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in chain["may_sign"].items())),
    ]
    _print(args, data, "\n".join(lines))
    return 0


def _verify_trust(args: argparse.Namespace) -> Any:
    """Trust for verify / cert inspect: settings (-c) and/or --trust/--intermediate/--crl; with
    neither, the bundled public HPKI anchors (MHLW root, MEDIS CAs)."""
    from gateway.pki import hpki
    from gateway.sign.setup import load_pems, trust_config

    settings = load_settings(args.config) if args.config else None
    anchors = load_pems([Path(p) for p in args.trust or []])
    intermediates = load_pems([Path(p) for p in args.intermediate or []])
    if settings is None and not anchors:
        bundled = hpki.load_bundled_anchors()
        anchors = [c for c in bundled.values() if c.subject == c.issuer]
        intermediates += [c for c in bundled.values() if c.subject != c.issuer]
    return trust_config(
        settings,
        extra_anchors=anchors,
        extra_intermediates=intermediates,
        extra_crls=[Path(p) for p in args.crl or []],
        check_revocation=not args.no_revocation,
        fetch_crls=True if args.fetch_crls else None,
        ocsp=True if args.ocsp else None,
    )


async def _chain_status(args: argparse.Namespace, cert: Any) -> dict[str, Any]:
    import itertools
    from datetime import UTC, datetime

    from gateway.errors import PkiError
    from gateway.pki import hpki
    from gateway.pki.revocation import revocation_status

    trust = _verify_trust(args)
    now = datetime.now(UTC)
    roles = hpki.parse_hcroles(cert) if not hpki.check_signing_profile(cert) else []
    out: dict[str, Any] = {
        "may_sign": {t: trust.roles.permits(roles, t) for t in trust.roles.allowed},
        "revocation": {"status": "not checked"},
    }
    try:
        path = hpki.verify_chain(
            cert, intermediates=trust.intermediates, trust_anchors=trust.anchors, moment=now
        )
    except PkiError as e:
        out.update(status="invalid", reason=e.description)
        return out
    out.update(status="valid", path=[c.subject.rfc4514_string() for c in path])
    if trust.check_revocation:
        statuses = [
            await revocation_status(c, i, now, crls=trust.crls, ocsp=trust.ocsp)
            for c, i in itertools.pairwise(path)
        ]
        bad = [s for s in statuses if s.status != "good"]
        worst = next((s for s in bad if s.status == "revoked"), bad[0] if bad else None)
        out["revocation"] = (
            {"status": worst.status, "reason": worst.reason, "source": worst.source}
            if worst
            else {
                "status": "good",
                "reason": "not on the issuers' current CRLs"
                if all(s.source == "crl" for s in statuses)
                else "; ".join(s.reason for s in statuses),
                "source": statuses[0].source if statuses else None,
            }
        )
    else:
        out["revocation"] = {"status": "not checked", "reason": "--no-revocation"}
    return out


# -- signatures (issue 4) --------------------------------------------------------------------


async def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.sign.verify import verify_document

    data = Path(args.file).read_bytes()
    content = Path(args.content).read_bytes() if args.content else None
    report = await verify_document(data, trust=_verify_trust(args), content=content)
    lines = [
        f"{report.indication}"
        + (f" / {report.sub_indication}" if report.sub_indication else "")
        + f": {report.reason}"
    ]
    for i, sig in enumerate(report.signatures, 1):
        lines.append(
            f"  signature {i}: {sig.format} {sig.level or ''} {sig.indication}"
            + (f" / {sig.sub_indication}" if sig.sub_indication else "")
        )
        if sig.signer:
            lines.append(f"    signer:     {sig.signer['subject']}")
            lines.append(f"    hcRole:     {', '.join(sig.signer['hc_roles']) or '-'}")
        if sig.document_type:
            lines.append(
                f"    document:   {sig.document_type} (role may sign: {sig.role_permitted})"
            )
        if sig.signing_time:
            lines.append(f"    signed at:  {sig.signing_time}")
        if sig.timestamp:
            lines.append(f"    timestamp:  {sig.timestamp['time']} ({sig.timestamp['status']})")
        lines.append(f"    chain:      {sig.chain.get('status')}")
        lines.append(
            f"    revocation: {sig.revocation.get('status')}"
            + (f" ({sig.revocation['reason']})" if sig.revocation.get("reason") else "")
        )
    _print(args, report.to_json_dict(), "\n".join(lines))
    return 0 if report.passed else 1


def _read_input(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _write_output(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(path).write_bytes(data)
        print(f"written to {path}", file=sys.stderr)


async def cmd_eprescription_build(args: argparse.Namespace) -> int:
    from lxml import etree

    from gateway.sign import eprescription

    data = _read_input(args.csv)
    eprescription.decode_csv(data, args.encoding)
    profile = eprescription.PROFILES[args.profile]
    if args.config:
        from gateway.sign.setup import signing_policy

        profile = signing_policy(_settings(args)).profiles[args.profile]
    tree = eprescription.build_document(data, profile)
    _write_output(args.out, etree.tostring(tree, xml_declaration=True, encoding="UTF-8"))
    return 0


async def cmd_eprescription_sign(args: argparse.Namespace) -> int:
    from gateway.sign.service import sign_document
    from gateway.sign.setup import signing_policy, tsa_client

    settings = _settings(args)
    data = _read_input(args.csv)
    async with _Ctx(settings, with_keystore=True) as ctx:
        assert ctx.signers is not None and ctx.keystore is not None
        signer = await ctx.signers.get(args.signer)
        cred = next((c for c in reversed(signer.credentials) if c.status == "active"), None)
        if cred is None or cred.certificate is None:
            raise GatewayError(f"signer {args.signer} has no active credential with a certificate")
        key = await ctx.keystore.get_key(cred.key_id)
        tsa = tsa_client(settings) if args.level == "AdES-B-T" else None
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
                tsa=tsa,
                policy=signing_policy(settings),
            )
        finally:
            if tsa is not None:
                await tsa.close()
        async with ctx.db.write() as conn:
            await ctx.audit.append(
                conn,
                action="signature.eprescription.cli",
                actor=_actor(),
                signer_id=signer.id,
                detail={
                    "credential": cred.id,
                    "profile": args.profile,
                    "level": args.level,
                    "document_sha256": signed.document_digest.hex(),
                },
            )
    assert signed.document_with_signature is not None
    _write_output(args.out, signed.document_with_signature)
    return 0


async def cmd_sandbox_tsa(args: argparse.Namespace) -> int:
    from gateway.api.test_tsa import run_forever

    settings = _settings(args)
    print(f"TEST TSA on {settings.timestamp.url} (Ctrl-C stops it)", file=sys.stderr)
    await run_forever(settings)
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
    p.add_argument(
        "--tsa-port", type=int, default=None, help="port of the TEST TSA (default: a free one)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_init)
    p = sb.add_parser("tsa", help="run only the TEST TSA of a sandbox (`serve` already runs it)")
    _cfg(p, json_flag=False)
    p.set_defaults(func=cmd_sandbox_tsa)

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
    p.add_argument("--dental-code", default=None, help="co-located dental department's code")
    p.add_argument("--contact-email", default=None, help="where reminders and delivery mail go")
    p.add_argument("--per-terminal", action="store_true", help="one certificate per terminal label")
    p.set_defaults(func=cmd_facility_add)
    p = fac.add_parser("policy", help="per-terminal policy and contact address")
    _cfg(p)
    p.add_argument("code")
    p.add_argument("--per-terminal", choices=["on", "off"], default=None)
    p.add_argument("--contact-email", default=None)
    p.set_defaults(func=cmd_facility_policy)
    p = fac.add_parser("link-dental", help="link a co-located dental department's code")
    _cfg(p)
    p.add_argument("code", help="the facility's medical (医科) code")
    p.add_argument("dental_code", help="the dental (歯科) code")
    p.set_defaults(func=cmd_facility_link_dental)
    p = fac.add_parser("expiring", help="certificates expiring within DAYS")
    _cfg(p)
    p.add_argument("--within", type=int, required=True, metavar="DAYS")
    p.set_defaults(func=cmd_facility_expiring)
    p = fac.add_parser("stop", help="the facility stops the service: revoke everything now")
    _cfg(p)
    p.add_argument("code")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_facility_stop)
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
    _cfg(p)
    p.add_argument("code")
    p.add_argument("--serial", default=None, help="the certificate to replace")
    p.add_argument("--terminal", default=None, help="the terminal whose certificate to replace")
    p.add_argument("--new-code", default=None, help="the new (or real) institution code")
    p.add_argument("--reason", default=None)
    p.add_argument("--out", default=None, help="hand over in person (see issue-cert)")
    p.set_defaults(func=cmd_facility_rotate_cert)
    p = fac.add_parser("resend", help="new 14-day download window (new link and password)")
    _cfg(p)
    p.add_argument("serial")
    p.set_defaults(func=cmd_facility_resend)
    p = fac.add_parser("export-p12", help="take the stored file out (counts as the download)")
    _cfg(p)
    p.add_argument("serial")
    p.add_argument("--out", required=True, help="file or directory")
    p.set_defaults(func=cmd_facility_export_p12)
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

    sc = sub.add_parser("scheduler", help="reminders, scheduled revocations, CRL").add_subparsers(
        dest="sub", required=True
    )
    p = sc.add_parser("run-once", help="one scheduler run (for cron); safe next to serve")
    _cfg(p)
    p.set_defaults(func=cmd_scheduler_run_once)

    au = sub.add_parser("audit", help="audit log").add_subparsers(dest="sub", required=True)
    p = au.add_parser("verify", help="verify the hash chain; exit 1 on the first problem")
    _cfg(p)
    p.set_defaults(func=cmd_audit_verify)

    ce = sub.add_parser("cert", help="certificates").add_subparsers(dest="sub", required=True)
    p = ce.add_parser("inspect", help="show a certificate, its HPKI profile and chain status")
    p.add_argument("file")
    _trust_flags(p)
    p.set_defaults(func=cmd_cert_inspect)

    p = sub.add_parser(
        "verify",
        help="verify a signed document (CAdES, XAdES / e-prescription, PAdES); "
        "exit 0 only for TOTAL-PASSED",
    )
    p.add_argument("file", help="signed PDF, XML, or CMS (DER/PEM)")
    p.add_argument("--content", default=None, help="the signed content of a detached signature")
    _trust_flags(p)
    p.set_defaults(func=cmd_verify)

    ep = sub.add_parser("eprescription", help="e-prescription XML (HPKI.md §3)").add_subparsers(
        dest="sub", required=True
    )
    p = ep.add_parser("build", help="build the unsigned e-prescription XML from a CSV")
    p.add_argument("csv", help="prescription CSV ('-' for stdin)")
    p.add_argument("-o", "--out", default="-")
    p.add_argument(
        "--profile", choices=["jp-eprescription", "jp-dispensing"], default="jp-eprescription"
    )
    p.add_argument("--encoding", choices=["utf-8", "shift_jis"], default="utf-8")
    p.add_argument("-c", "--config", default=None, help="settings (dispensing element names)")
    p.set_defaults(func=cmd_eprescription_build)
    p = ep.add_parser(
        "sign",
        help="OPERATOR TOOL for the sandbox: sign a CSV as an e-prescription with a signer's "
        "HSM key directly, without FIDO2/SAD (facility systems use signDoc)",
    )
    _cfg(p, json_flag=False)
    p.add_argument("csv", help="prescription CSV ('-' for stdin)")
    p.add_argument("--signer", required=True, help="signer id (hpki-gateway signer list)")
    p.add_argument("-o", "--out", default="-")
    p.add_argument(
        "--profile", choices=["jp-eprescription", "jp-dispensing"], default="jp-eprescription"
    )
    p.add_argument("--level", choices=["AdES-B-B", "AdES-B-T"], default="AdES-B-B")
    p.add_argument("--encoding", choices=["utf-8", "shift_jis"], default="utf-8")
    p.set_defaults(func=cmd_eprescription_sign)
    card_cli.register(sub, signer=sg, sandbox=sb)
    return parser


def _trust_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help="settings: HPKI anchors, intermediates, CRLs, TSA roots, role mapping",
    )
    p.add_argument("--trust", action="append", help="PEM trust anchor(s) (repeat)")
    p.add_argument("--intermediate", action="append", help="PEM intermediate CA(s) (repeat)")
    p.add_argument("--crl", action="append", help="CRL file, DER or PEM (repeat)")
    p.add_argument("--no-revocation", action="store_true", help="skip the CRL check")
    p.add_argument(
        "--fetch-crls",
        action="store_true",
        help="download CRLs from the certificates' distribution points",
    )
    p.add_argument(
        "--ocsp",
        action="store_true",
        help="ask the OCSP responder of a certificate's AIA first (CRLs as fallback)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


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
