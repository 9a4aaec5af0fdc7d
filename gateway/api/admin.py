"""The admin API (``/admin/...``): the registration officer's CLI operations over mTLS.

Only administrators' client certificates get here (the identity middleware refuses every other
certificate with 403 before routing). Handlers are thin: decode → validate → act through the
same services as the CLI → respond; every change is audited by the services with the actor
``admin:<name>``. Responses never carry the PKCS#12 password or the download password: the
paper notice is fetched as a PDF (audited), the download password travels only in its mail.
Errors are RFC 9457 problem+json (docs/api.md lists each one).
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.keys import AUDIT, CERTIFICATES, DB, FACILITIES
from gateway.api.middleware import identity
from gateway.api.schema import parse
from gateway.errors import InvalidRequest, NotFound
from gateway.lifecycle.facilities import Facility, normalize_serial
from gateway.lifecycle.scheduler import Scheduler

routes = web.RouteTableDef()


class AdminRequest(BaseModel):
    """Admin bodies are strict: an unknown or misspelt field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AddFacility(AdminRequest):
    institution_code: str = Field(min_length=1, max_length=20)
    name: str = Field(min_length=1, max_length=200)
    kind: Literal["hospital", "clinic", "dental_clinic", "pharmacy"]
    provisional: bool = False
    dental_code: str | None = None
    contact_email: str | None = Field(default=None, max_length=320)
    per_terminal: bool = False


class PolicyChange(AdminRequest):
    per_terminal: bool | None = None
    contact_email: str | None = Field(default=None, max_length=320)


class DentalLink(AdminRequest):
    dental_code: str


class IssueCert(AdminRequest):
    terminal: str | None = Field(default=None, max_length=200)


class RotateCert(AdminRequest):
    serial: str | None = Field(default=None, max_length=80)
    terminal: str | None = Field(default=None, max_length=200)
    new_institution_code: str | None = None
    reason: str | None = Field(default=None, max_length=300)


class Reason(AdminRequest):
    reason: str = Field(min_length=1, max_length=300)


class Revocation(Reason):
    with_renewals: bool = False
    """Revoke too the certificates that renewed this one over EST (a stolen certificate)."""


def _actor(request: web.Request) -> str:
    return identity(request).actor


def facility_json(f: Facility) -> dict[str, Any]:
    return {
        "institution_code": f.institution_code,
        "name": f.name,
        "kind": f.kind,
        "status": f.status,
        "status_reason": f.status_reason,
        "provisional": f.provisional,
        "dental_code": f.dental_code,
        "per_terminal": f.per_terminal,
        "contact_email": f.contact_email,
    }


@routes.get("/admin/facilities")
async def list_facilities(request: web.Request) -> web.Response:
    items = await request.app[FACILITIES].list_all()
    return web.json_response({"facilities": [facility_json(f) for f in items]})


@routes.post("/admin/facilities")
async def add_facility(request: web.Request) -> web.Response:
    req = await parse(request, AddFacility)
    f = await request.app[FACILITIES].add(
        institution_code=req.institution_code,
        name=req.name,
        kind=req.kind,
        provisional=req.provisional,
        dental_code=req.dental_code,
        contact_email=req.contact_email,
        per_terminal=req.per_terminal,
        actor=_actor(request),
        now=request.app[CERTIFICATES].clock(),
    )
    return web.json_response(facility_json(f), status=201)


@routes.get("/admin/facilities/{code}")
async def facility_status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CERTIFICATES].status(request.match_info["code"]))


@routes.post("/admin/facilities/{code}/policy")
async def facility_policy(request: web.Request) -> web.Response:
    req = await parse(request, PolicyChange)
    f = await request.app[FACILITIES].set_policy(
        request.match_info["code"],
        per_terminal=req.per_terminal,
        contact_email=req.contact_email,
        actor=_actor(request),
    )
    return web.json_response(facility_json(f))


@routes.post("/admin/facilities/{code}/dental-code")
async def facility_dental(request: web.Request) -> web.Response:
    req = await parse(request, DentalLink)
    f = await request.app[FACILITIES].link_dental(
        request.match_info["code"], req.dental_code, actor=_actor(request)
    )
    return web.json_response(facility_json(f))


@routes.post("/admin/facilities/{code}/suspend")
async def facility_suspend(request: web.Request) -> web.Response:
    req = await parse(request, Reason)
    f = await request.app[FACILITIES].set_status(
        request.match_info["code"], status="suspended", reason=req.reason, actor=_actor(request)
    )
    return web.json_response(facility_json(f))


@routes.post("/admin/facilities/{code}/resume")
async def facility_resume(request: web.Request) -> web.Response:
    f = await request.app[FACILITIES].set_status(
        request.match_info["code"], status="active", reason=None, actor=_actor(request)
    )
    return web.json_response(facility_json(f))


@routes.post("/admin/facilities/{code}/stop")
async def facility_stop(request: web.Request) -> web.Response:
    req = await parse(request, Reason)
    svc = request.app[CERTIFICATES]
    revoked = await svc.stop_service(
        request.match_info["code"], reason=req.reason, actor=_actor(request)
    )
    body = await svc.status(request.match_info["code"])
    return web.json_response({**body, "revoked": revoked})


@routes.post("/admin/facilities/{code}/certificates")
async def issue_certificate(request: web.Request) -> web.Response:
    req = await parse(request, IssueCert)
    res = await request.app[CERTIFICATES].issue(
        request.match_info["code"], terminal=req.terminal, actor=_actor(request)
    )
    return web.json_response(res.to_json_dict(), status=201)


@routes.post("/admin/facilities/{code}/rotate")
async def rotate_certificate(request: web.Request) -> web.Response:
    req = await parse(request, RotateCert)
    res = await request.app[CERTIFICATES].rotate(
        request.match_info["code"],
        serial=req.serial,
        terminal=req.terminal,
        new_code=req.new_institution_code,
        reason=req.reason,
        actor=_actor(request),
    )
    return web.json_response(res.to_json_dict(), status=201)


@routes.post("/admin/certificates/{serial}/revoke")
async def revoke_certificate(request: web.Request) -> web.Response:
    req = await parse(request, Revocation)
    out = await request.app[CERTIFICATES].revoke(
        request.match_info["serial"],
        reason=req.reason,
        actor=_actor(request),
        with_renewals=req.with_renewals,
    )
    return web.json_response(out)


@routes.post("/admin/certificates/{serial}/resend")
async def resend_certificate(request: web.Request) -> web.Response:
    res = await request.app[CERTIFICATES].resend(
        request.match_info["serial"], actor=_actor(request)
    )
    return web.json_response(
        {
            "serial": res.serial,
            "download_url": res.download_url,
            "download_expires": res.download_expires,
            "round": res.round,
            "mailed": res.mailed,
            "mail_error": res.mail_error,
        }
    )


@routes.get("/admin/certificates/{serial}/password-notice")
async def password_notice(request: web.Request) -> web.Response:
    """The printable notice (it carries the p12 password): audited, never cached."""
    svc = request.app[CERTIFICATES]
    serial = normalize_serial(request.match_info["serial"])
    matches = sorted(svc.outbox.glob(f"*/{serial}/password-notice.pdf"))
    if not matches:
        raise NotFound(
            f"no password notice for certificate {serial} in the outbox (removed after printing?)"
        )
    pdf = matches[0].read_bytes()
    async with request.app[DB].write() as conn:
        await request.app[AUDIT].append(
            conn,
            action="delivery.notice_fetched",
            actor=_actor(request),
            facility_code=matches[0].parent.parent.name,
            detail={"serial": serial},
            now=svc.clock(),
        )
    return web.Response(
        body=pdf,
        content_type="application/pdf",
        headers={
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="password-notice-{serial}.pdf"',
        },
    )


@routes.get("/admin/certificates/expiring")
async def expiring(request: web.Request) -> web.Response:
    raw = request.query.get("within", "90")
    if not raw.isascii() or not raw.isdigit() or int(raw) > 3650:
        raise InvalidRequest("query parameter 'within' must be a number of days from 0 to 3650")
    within = int(raw)
    items = await request.app[CERTIFICATES].expiring(within)
    return web.json_response({"within_days": within, "certificates": items})


@routes.post("/admin/scheduler/run-once")
async def scheduler_run_once(request: web.Request) -> web.Response:
    report = await Scheduler(service=request.app[CERTIFICATES]).run_once()
    return web.json_response(report.to_json_dict())
