"""``audit verify``, ``cert inspect``, ``verify``: checks that change nothing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.cli.common import Context, actor, config_flags, emit, settings_of
from gateway.config import load_settings


def _since(path: str | None) -> tuple[int, str] | None:
    """``(events, head_hash)`` of an earlier ``audit verify --json`` report (``--since``)."""
    if path is None:
        return None
    try:
        earlier = json.loads(Path(path).read_text())
        events, head = earlier["events"], earlier["head_hash"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--since {path}: not an 'audit verify --json' report ({e})") from e
    if (
        earlier.get("ok") is not True
        or not isinstance(events, int)
        or events < 0
        or not isinstance(head, str)
    ):
        raise SystemExit(f"--since {path}: not the report of an intact chain")
    return events, head


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    since = _since(args.since)
    async with Context(settings_of(args), with_keystore=False) as ctx, ctx.db.read() as conn:
        report = await ctx.audit.verify(conn, since=since)
    text = (
        f"audit chain intact: {report.events} events, head {report.head_hash}"
        if report.ok
        else f"AUDIT CHAIN BROKEN ({report.problem}): {report.message} "
        f"({report.events} events verified before it)"
    )
    emit(args, report.to_json_dict(), text)
    return 0 if report.ok else 1


async def cmd_cert_inspect(args: argparse.Namespace) -> int:
    from gateway.pki import hpki
    from gateway.pki.load import parse_certificate

    cert = parse_certificate(Path(args.file).read_bytes())
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
    emit(args, data, "\n".join(lines))
    return 0


def _verify_trust(args: argparse.Namespace) -> Any:
    """Trust for verify / cert inspect: settings (-c) and/or --trust/--intermediate/--crl; with
    neither, the bundled public HPKI anchors (MHLW root, MEDIS CAs)."""
    from gateway.pki import hpki
    from gateway.pki.load import load_certificate_files
    from gateway.sign.setup import trust_config

    settings = load_settings(args.config) if args.config else None
    anchors = load_certificate_files([Path(p) for p in args.trust or []])
    intermediates = load_certificate_files([Path(p) for p in args.intermediate or []])
    if settings is None and not anchors:
        anchors, bundled_intermediates = hpki.default_trust("verify")
        intermediates += bundled_intermediates
    return trust_config(
        settings,
        extra_anchors=anchors,
        extra_intermediates=intermediates,
        extra_crls=[Path(p) for p in args.crl or []],
        extra_tsa_anchors=load_certificate_files(
            [Path(p) for p in getattr(args, "tsa_trust", None) or []]
        ),
        check_revocation=not args.no_revocation,
        fetch_crls=True if args.fetch_crls else None,
        ocsp=True if args.ocsp else None,
    )


async def _chain_status(args: argparse.Namespace, cert: Any) -> dict[str, Any]:
    import itertools

    from gateway.clock import system_clock
    from gateway.errors import PkiError
    from gateway.pki import hpki
    from gateway.pki.revocation import revocation_status

    trust = _verify_trust(args)
    now = system_clock()
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


async def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.verify.cli import run

    report, text = await run(args, _verify_trust(args))
    emit(args, report.to_json_dict(), text)
    return 0 if report.passed else 1


async def cmd_extend(args: argparse.Namespace) -> int:
    import sys

    from gateway.sign.extend_cli import run

    settings = settings_of(args)
    async with Context(settings, with_keystore=False) as ctx:
        code, lines = await run(args, settings, ctx.db, ctx.audit, actor())
    for line in lines:
        document = line.pop("document", None)
        if document is not None:
            sys.stdout.buffer.write(document)
        else:
            print(f"{line['file']}: {line['result']}", file=sys.stderr)
    return code


def trust_flags(p: argparse.ArgumentParser) -> None:
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


def register(sub: Any) -> None:
    au = sub.add_parser("audit", help="audit log").add_subparsers(dest="sub", required=True)
    p = au.add_parser("verify", help="verify the hash chain; exit 1 on the first problem")
    config_flags(p)
    p.add_argument(
        "--since",
        metavar="REPORT",
        default=None,
        help="an earlier 'audit verify --json' report kept off the database host: its newest "
        "event must still be in the chain with the same hash (finds a tail deleted together "
        "with the head set back, or an older restore)",
    )
    p.set_defaults(func=cmd_audit_verify)

    ce = sub.add_parser("cert", help="certificates").add_subparsers(dest="sub", required=True)
    p = ce.add_parser("inspect", help="show a certificate, its HPKI profile and chain status")
    p.add_argument("file")
    trust_flags(p)
    p.set_defaults(func=cmd_cert_inspect)

    p = sub.add_parser(
        "verify",
        help="verify a signed document (CAdES, XAdES / e-prescription, PAdES); "
        "exit 0 only for TOTAL-PASSED",
    )
    p.add_argument("file", help="signed PDF, XML, or CMS (DER/PEM)")
    p.add_argument("--content", default=None, help="the signed content of a detached signature")
    trust_flags(p)
    from gateway.verify.cli import add_arguments as verify_arguments

    verify_arguments(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "extend",
        help="raise signed XML to ES-T / ES-XL / ES-A, or renew ES-A archive timestamps",
    )
    config_flags(p, json_flag=False)
    from gateway.sign.extend_cli import add_arguments as extend_arguments

    extend_arguments(p)
    p.set_defaults(func=cmd_extend)
