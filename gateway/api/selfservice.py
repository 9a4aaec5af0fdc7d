"""Facility self-service routes: applications (admin, facility, vendor), vendors, statements.

Who reaches which prefix is decided by the identity middleware (``/admin/`` administrators,
``/facility/`` a facility's certificate, ``/vendor/`` a vendor's); the handlers only decode,
call the services (gateway/lifecycle/applications.py, statements.py) and answer. Submissions
take an ``Idempotency-Key`` header: a replay answers 200 with the first application instead
of 201.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.keys import AUDIT, CERTIFICATES, CLOCK, DB, FACILITIES, SETTINGS
from gateway.api.middleware import identity
from gateway.api.schema import parse
from gateway.errors import AccessDenied, InvalidRequest
from gateway.lifecycle.applications import (
    Applicant,
    ApplicationService,
    Submission,
    VendorRegistry,
)
from gateway.lifecycle.statements import StatementService

IDEMPOTENCY_HEADER = "Idempotency-Key"

routes = web.RouteTableDef()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ApplicationBody(_Strict):
    kind: Literal["new", "reapply", "stop"]
    facility_name: str | None = Field(default=None, max_length=200)
    facility_kind: Literal["hospital", "clinic", "dental_clinic", "pharmacy"] | None = None
    provisional: bool = False
    new_institution_code: str | None = Field(default=None, max_length=20)
    recipient_name: str | None = Field(default=None, max_length=200)
    contact_email: str | None = Field(default=None, max_length=320)
    terminals: list[str] = Field(default_factory=list, max_length=50)
    remarks: str | None = Field(default=None, max_length=2000)
    cause: (
        Literal[
            "correction", "code_change", "provisional_to_real", "notice_lost", "expired", "other"
        ]
        | None
    ) = None


class OfficerApplicationBody(ApplicationBody):
    institution_code: str = Field(min_length=1, max_length=20)


class Decision(_Strict):
    reason: str | None = Field(default=None, max_length=500)


class VendorBody(_Strict):
    name: str = Field(min_length=1, max_length=200)
    contact_email: str | None = Field(default=None, max_length=320)


class VendorLink(_Strict):
    institution_code: str = Field(min_length=1, max_length=20)


class PaymentBody(_Strict):
    payment_method: Literal["deduction", "transfer"]


def _applications(request: web.Request) -> ApplicationService:
    """The services are stateless views over the app's store and lifecycle: built per call."""
    app = request.app
    return ApplicationService(
        db=app[DB],
        audit=app[AUDIT],
        registry=app[FACILITIES],
        certificates=app[CERTIFICATES],
        clock=app[CLOCK],
    )


def _vendors(request: web.Request) -> VendorRegistry:
    app = request.app
    return VendorRegistry(db=app[DB], audit=app[AUDIT], clock=app[CLOCK])


def _statements(request: web.Request) -> StatementService:
    app = request.app
    return StatementService(
        settings=app[SETTINGS],
        db=app[DB],
        audit=app[AUDIT],
        registry=app[FACILITIES],
        clock=app[CLOCK],
    )


def _submission(body: ApplicationBody, code: str) -> Submission:
    return Submission(
        kind=body.kind,
        institution_code=code,
        facility_name=body.facility_name,
        facility_kind=body.facility_kind,
        provisional=body.provisional,
        new_institution_code=body.new_institution_code,
        recipient_name=body.recipient_name,
        contact_email=body.contact_email,
        terminals=tuple(body.terminals),
        remarks=body.remarks,
        cause=body.cause,
    )


async def _submit(request: web.Request, sub: Submission, who: Applicant) -> web.Response:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    app, created = await _applications(request).submit(sub, who, idempotency_key=key)
    return web.json_response(app, status=201 if created else 200)


# -- officers ------------------------------------------------------------------------------


@routes.get("/admin/applications")
async def admin_pending(request: web.Request) -> web.Response:
    return web.json_response({"applications": await _applications(request).pending()})


@routes.post("/admin/applications")
async def admin_submit(request: web.Request) -> web.Response:
    body = await parse(request, OfficerApplicationBody)
    who = Applicant(actor=identity(request).actor, via="officer")
    return await _submit(request, _submission(body, body.institution_code), who)


@routes.get("/admin/applications/{request_id}")
async def admin_application(request: web.Request) -> web.Response:
    return web.json_response(await _applications(request).get(request.match_info["request_id"]))


@routes.post("/admin/applications/{request_id}/approve")
async def admin_approve(request: web.Request) -> web.Response:
    body = await parse(request, Decision)
    out = await _applications(request).approve(
        request.match_info["request_id"], actor=identity(request).actor, note=body.reason
    )
    return web.json_response(out)


@routes.post("/admin/applications/{request_id}/reject")
async def admin_reject(request: web.Request) -> web.Response:
    body = await parse(request, Decision)
    out = await _applications(request).reject(
        request.match_info["request_id"], reason=body.reason or "", actor=identity(request).actor
    )
    return web.json_response(out)


@routes.get("/admin/facilities/{code}/applications")
async def admin_facility_applications(request: web.Request) -> web.Response:
    return web.json_response(await _applications(request).status(request.match_info["code"]))


@routes.post("/admin/facilities/{code}/payment-method")
async def admin_payment_method(request: web.Request) -> web.Response:
    body = await parse(request, PaymentBody)
    f = await request.app[FACILITIES].set_policy(
        request.match_info["code"],
        payment_method=body.payment_method,
        actor=identity(request).actor,
    )
    return web.json_response(
        {"institution_code": f.institution_code, "payment_method": f.payment_method}
    )


@routes.get("/admin/facilities/{code}/statements/{month}")
async def admin_statement(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv", "pdf"):
        raise InvalidRequest("query parameter 'format' must be json, csv or pdf")
    svc = _statements(request)
    st = await svc.statement(
        request.match_info["code"], request.match_info["month"], actor=identity(request).actor
    )
    name = f"statement-{st.institution_code}-{st.month}"
    if fmt == "csv":
        return web.Response(
            body=st.csv_bytes(),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    if fmt == "pdf":
        pdf = await svc.pdf(st)
        return web.Response(
            body=pdf,
            content_type="application/pdf",
            headers={"Content-Disposition": f'attachment; filename="{name}.pdf"'},
        )
    return web.json_response(st.to_json_dict())


@routes.get("/admin/vendors")
async def admin_vendors(request: web.Request) -> web.Response:
    return web.json_response({"vendors": await _vendors(request).list_all()})


@routes.post("/admin/vendors")
async def admin_add_vendor(request: web.Request) -> web.Response:
    body = await parse(request, VendorBody)
    v = await _vendors(request).add(
        body.name, contact_email=body.contact_email, actor=identity(request).actor
    )
    return web.json_response(v, status=201)


@routes.post("/admin/vendors/{name}/facilities")
async def admin_link_vendor(request: web.Request) -> web.Response:
    body = await parse(request, VendorLink)
    v = await _vendors(request).link(
        request.match_info["name"], body.institution_code, actor=identity(request).actor
    )
    return web.json_response(v)


@routes.post("/admin/vendors/{name}/facilities/{code}/unlink")
async def admin_unlink_vendor(request: web.Request) -> web.Response:
    v = await _vendors(request).unlink(
        request.match_info["name"], request.match_info["code"], actor=identity(request).actor
    )
    return web.json_response(v)


# -- the facility itself -------------------------------------------------------------------


def _facility_code(request: web.Request) -> str:
    ident = identity(request)
    if ident.kind != "facility" or ident.institution_code is None:
        raise AccessDenied("a facility's client certificate is needed")
    return ident.institution_code


@routes.get("/facility/applications")
async def facility_status(request: web.Request) -> web.Response:
    return web.json_response(await _applications(request).status(_facility_code(request)))


@routes.post("/facility/applications")
async def facility_submit(request: web.Request) -> web.Response:
    code = _facility_code(request)
    body = await parse(request, ApplicationBody)
    who = Applicant(actor=identity(request).actor, via="facility", facility_code=code)
    return await _submit(request, _submission(body, code), who)


# -- vendors -------------------------------------------------------------------------------


def _vendor(request: web.Request) -> Applicant:
    ident = identity(request)
    if ident.kind != "vendor" or ident.vendor_id is None:
        raise AccessDenied("a vendor's client certificate is needed")
    return Applicant(
        actor=ident.actor, via="vendor", vendor_id=ident.vendor_id, vendor_name=ident.vendor_name
    )


@routes.get("/vendor/facilities")
async def vendor_facilities(request: web.Request) -> web.Response:
    who = _vendor(request)
    assert who.vendor_name is not None
    v = await _vendors(request).get(who.vendor_name)
    return web.json_response({"vendor": v["name"], "facilities": v["facilities"]})


async def _vendor_serves(request: web.Request, who: Applicant, code: str) -> None:
    assert who.vendor_name is not None
    v = await _vendors(request).get(who.vendor_name)
    if code not in v["facilities"]:
        raise AccessDenied(f"vendor {who.vendor_name!r} is not linked to facility {code}")


@routes.get("/vendor/facilities/{code}/applications")
async def vendor_status(request: web.Request) -> web.Response:
    who = _vendor(request)
    code = request.match_info["code"]
    await _vendor_serves(request, who, code)
    return web.json_response(await _applications(request).status(code))


@routes.post("/vendor/facilities/{code}/applications")
async def vendor_submit(request: web.Request) -> web.Response:
    who = _vendor(request)
    body = await parse(request, ApplicationBody)
    return await _submit(request, _submission(body, request.match_info["code"]), who)
