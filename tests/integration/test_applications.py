"""Applications, re-applications, stops and vendors, through the real lifecycle and store.

The in-process world of tests/support/lifecycle.py (real SQLite, real facility CA, injected
clock); the approval issues through the same service the gateway runs, and the password
notice and the mails are read back with poppler and the e-mail parser.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.audit import AuditLog
from gateway.errors import AccessDenied, Conflict, InvalidRequest, NotFound
from gateway.lifecycle.applications import (
    Applicant,
    ApplicationService,
    Submission,
    VendorRegistry,
)
from gateway.store.schema import audit_event, fee_entry
from tests.support.lifecycle import FakeClock, make_settings, notice_text, read_eml, services

T0 = datetime(2026, 4, 1, 1, 0, tzinfo=UTC)
OFFICER = Applicant(actor="admin:officer", via="officer")
CODE = "1314567890"


@dataclass
class World:
    svc: ApplicationService
    vendors: VendorRegistry
    s: object
    clock: FakeClock


@asynccontextmanager
async def world(tmp: Path) -> AsyncIterator[World]:
    settings = make_settings(tmp)
    clock = FakeClock(T0)
    async with services(settings, clock) as s:
        audit = AuditLog()
        apps = ApplicationService(
            db=s.db, audit=audit, registry=s.registry, certificates=s.certs, clock=clock
        )
        yield World(apps, VendorRegistry(db=s.db, audit=audit, clock=clock), s, clock)


def new_app(code: str = CODE, **kw: object) -> Submission:
    base: dict[str, object] = {
        "kind": "new",
        "institution_code": code,
        "facility_name": "TEST 中央クリニック",
        "facility_kind": "clinic",
        "recipient_name": "資格 太郎",
        "contact_email": "office@clinic.test.invalid",
    }
    base.update(kw)
    return Submission(**base)  # type: ignore[arg-type]


async def actions(w: World) -> list[tuple[str, str, dict[str, object]]]:
    async with w.svc.db.read() as conn:
        rows = (await conn.execute(select(audit_event).order_by(audit_event.c.seq))).all()
    return [(r.action, r.actor, json.loads(r.detail)) for r in rows]


async def test_new_application_approved_issues_and_shows_in_the_status(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        app, created = await w.svc.submit(new_app(), OFFICER)
        assert created and app["status"] == "submitted" and len(app["request_id"]) == 15
        assert app["issued"] is None and app["downloaded"] is False
        w.clock.advance(days=2)
        out = await w.svc.approve(app["request_id"], actor="admin:officer", note="書類確認済")
        assert out["status"] == "issued" and out["decision_reason"] == "書類確認済"
        [issued] = out["issued_certificates"]
        assert out["certificates"] == [issued["serial"]]
        assert issued["fees"] == [
            {
                "kind": "issuance",
                "amount_yen": 1500,
                "description": "クライアント証明書発行",
                "serial": issued["serial"],
            }
        ]
        # The notice is addressed to the registered recipient at the facility.
        text = notice_text(Path(issued["password_notice"]))
        assert "TEST 中央クリニック 資格 太郎 様" in text
        mail = read_eml(Path(issued["outbox"]) / "mail-1-download-link.eml")
        assert mail["To"] == "office@clinic.test.invalid"
        status = await w.svc.status(CODE)
        [row] = status["applications"]
        assert {k: row[k] for k in ("request_id", "status", "downloaded")} == {
            "request_id": app["request_id"],
            "status": "issued",
            "downloaded": False,
        }
        assert row["issued"] == w.clock.now.isoformat()
        assert row["last_update"] == w.clock.now.isoformat()
        # a second approval of the same application is refused
        with pytest.raises(Conflict, match="only an open"):
            await w.svc.approve(app["request_id"], actor="admin:officer")
        acts = [a for a, _, _ in await actions(w)]
        assert "application.submit" in acts and "application.approve" in acts
        assert "fee.charge" in acts


async def test_reapplication_needs_a_reason_and_closes_the_earlier_one(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        first, _ = await w.svc.submit(new_app(), OFFICER)
        with pytest.raises(InvalidRequest, match="備考"):
            await w.svc.submit(
                Submission(kind="reapply", institution_code=CODE, remarks="  "), OFFICER
            )
        refused = [d for a, _, d in await actions(w) if a == "application.refused"]
        assert refused and refused[-1]["code"] == "invalid_request"
        # a second new application while the first is open is a duplicate
        with pytest.raises(Conflict, match="still open"):
            await w.svc.submit(new_app(), OFFICER)
        w.clock.advance(hours=1)
        second, _ = await w.svc.submit(
            new_app(kind="reapply", remarks="担当者名の誤記を修正", recipient_name="資格 花子"),
            OFFICER,
        )
        assert second["supersedes"] == first["request_id"]
        earlier = await w.svc.get(first["request_id"])
        assert earlier["status"] == "superseded"
        assert earlier["superseded_by"] == second["request_id"]
        # the earlier one is closed, never edited: its content is what was submitted
        assert earlier["remarks"] is None and earlier["submitted"] == T0.isoformat()
        with pytest.raises(Conflict):
            await w.svc.approve(first["request_id"], actor="admin:officer")
        out = await w.svc.approve(second["request_id"], actor="admin:officer")
        assert out["status"] == "issued"
        fac = await w.s.registry.get(CODE)  # type: ignore[attr-defined]
        assert fac.recipient_name == "資格 花子"


async def test_reject_needs_a_reason(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        app, _ = await w.svc.submit(new_app(), OFFICER)
        with pytest.raises(InvalidRequest, match="reason"):
            await w.svc.reject(app["request_id"], reason=" ", actor="admin:officer")
        out = await w.svc.reject(
            app["request_id"], reason="施設情報が確認できない", actor="admin:o"
        )
        assert out["status"] == "rejected" and out["decision_reason"] == "施設情報が確認できない"


async def test_idempotency_key(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        a, created = await w.svc.submit(new_app(), OFFICER, idempotency_key="form-0001")
        b, again = await w.svc.submit(new_app(), OFFICER, idempotency_key="form-0001")
        assert created and not again and a["request_id"] == b["request_id"]
        with pytest.raises(Conflict, match="other content"):
            await w.svc.submit(
                new_app(facility_name="別の名前"), OFFICER, idempotency_key="form-0001"
            )
        acts = [a for a, _, _ in await actions(w)]
        assert acts.count("application.submit") == 1 and "application.replayed" in acts


async def test_vendor_applies_only_for_linked_facilities_and_never_redirects_delivery(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        app, _ = await w.svc.submit(new_app(), OFFICER)
        await w.svc.approve(app["request_id"], actor="admin:officer")
        await w.vendors.add(
            "TEST ベンダー株式会社", contact_email="v@vendor.test.invalid", actor="a"
        )
        vid = await _vendor_id(w, "TEST ベンダー株式会社")
        who = Applicant(
            actor="vendor:TEST ベンダー株式会社",
            via="vendor",
            vendor_id=vid,
            vendor_name="TEST ベンダー株式会社",
        )
        lost = Submission(
            kind="reapply",
            institution_code=CODE,
            remarks="パスワード通知書紛失",
            cause="notice_lost",
        )
        with pytest.raises(AccessDenied, match="not linked"):
            await w.svc.submit(lost, who)
        await w.vendors.link("TEST ベンダー株式会社", CODE, actor="admin:officer")
        with pytest.raises(InvalidRequest, match="registered address"):
            await w.svc.submit(
                Submission(
                    kind="reapply",
                    institution_code=CODE,
                    remarks="通知書紛失",
                    cause="notice_lost",
                    contact_email="v@vendor.test.invalid",
                ),
                who,
            )
        via_vendor, _ = await w.svc.submit(lost, who)
        assert via_vendor["via"] == "vendor" and via_vendor["vendor"] == "TEST ベンダー株式会社"
        w.clock.advance(days=1)
        out = await w.svc.approve(via_vendor["request_id"], actor="admin:officer")
        [issued] = out["issued_certificates"]
        assert [f["kind"] for f in issued["fees"]] == ["issuance", "postage"]
        assert issued["fees"][1]["amount_yen"] == 753
        assert [r["status"] for r in issued["replaced"]] == ["revoked"]  # never downloaded
        mail = read_eml(Path(issued["outbox"]) / "mail-2-download-password.eml")
        assert mail["To"] == "office@clinic.test.invalid"
        assert "TEST 中央クリニック 資格 太郎 様" in notice_text(Path(issued["password_notice"]))


async def test_an_unlinked_vendor_can_neither_replay_nor_have_its_open_application_approved(
    tmp_path: Path,
) -> None:
    """A replay answers with the application as it is now (status, decision, serials): only to a
    submitter still entitled to it. An open application of a vendor no longer linked is not
    approved (409) until an officer links the vendor again; it can be rejected."""
    async with world(tmp_path) as w:
        app, _ = await w.svc.submit(new_app(), OFFICER)
        await w.svc.approve(app["request_id"], actor="admin:officer")
        name = "TEST 解約ベンダー株式会社"
        await w.vendors.add(name, contact_email=None, actor="admin:officer")
        who = Applicant(
            actor=f"vendor:{name}", via="vendor", vendor_id=await _vendor_id(w, name),
            vendor_name=name,
        )  # fmt: skip
        await w.vendors.link(name, CODE, actor="admin:officer")
        lost = Submission(
            kind="reapply", institution_code=CODE, remarks="通知書紛失", cause="notice_lost"
        )
        first, created = await w.svc.submit(lost, who, idempotency_key="k1")
        assert created
        await w.vendors.unlink(name, CODE, actor="admin:officer")
        with pytest.raises(AccessDenied, match="not linked"):
            await w.svc.submit(lost, who, idempotency_key="k1")
        # other content under the key: still 403, not the 409 that names the application
        with pytest.raises(AccessDenied, match="not linked"):
            await w.svc.submit(
                Submission(kind="reapply", institution_code=CODE, remarks="別"),
                who,
                idempotency_key="k1",
            )
        with pytest.raises(Conflict, match="no longer linked"):
            await w.svc.approve(first["request_id"], actor="admin:officer")
        assert (await w.svc.get(first["request_id"]))["status"] == "submitted"
        acts = await actions(w)
        # The officer's refused approval is on record too.
        [approve_refused] = [d for a, _, d in acts if a == "application.approve_refused"]
        assert approve_refused["request_id"] == first["request_id"]
        assert approve_refused["code"] == "conflict"
        assert "no longer linked" in approve_refused["reason"]
        refused = [d for a, _, d in acts if a == "application.refused"]
        assert [d["code"] for d in refused[-2:]] == ["access_denied", "access_denied"]
        assert "application.replayed" not in [a for a, _, _ in acts]
        [unlink] = [d for a, _, d in acts if a == "vendor.unlink"]
        assert unlink["open_applications"] == [first["request_id"]]
        # Linked again: the replay answers and the approval goes through.
        await w.vendors.link(name, CODE, actor="admin:officer")
        again, created = await w.svc.submit(lost, who, idempotency_key="k1")
        assert not created and again["request_id"] == first["request_id"]
        out = await w.svc.approve(first["request_id"], actor="admin:officer")
        assert out["status"] == "issued"


async def _vendor_id(w: World, name: str) -> int:
    from gateway.store.schema import vendor

    async with w.svc.db.read() as conn:
        return int(
            (await conn.execute(select(vendor.c.id).where(vendor.c.name == name))).scalar_one()
        )


async def test_facility_applies_for_itself_and_stops(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        app, _ = await w.svc.submit(new_app(), OFFICER)
        await w.svc.approve(app["request_id"], actor="admin:officer")
        me = Applicant(actor=f"facility:{CODE}", via="facility", facility_code=CODE)
        other = Applicant(actor="facility:1311111111", via="facility", facility_code="1311111111")
        stop = Submission(kind="stop", institution_code=CODE, remarks="閉院のため")
        with pytest.raises(AccessDenied):
            await w.svc.submit(stop, other)
        with pytest.raises(InvalidRequest, match="reason"):
            await w.svc.submit(Submission(kind="stop", institution_code=CODE), me)
        s, _ = await w.svc.submit(stop, me)
        out = await w.svc.approve(s["request_id"], actor="admin:officer")
        assert out["status"] == "stopped"
        assert (await w.s.registry.get(CODE)).status == "stopped"  # type: ignore[attr-defined]
        # nothing to charge for a stop
        async with w.svc.db.read() as conn:
            n = len((await conn.execute(select(fee_entry))).all())
        assert n == 1


async def test_reapplication_for_an_unknown_facility_is_refused(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        with pytest.raises(NotFound):
            await w.svc.submit(
                Submission(kind="reapply", institution_code=CODE, remarks="x"), OFFICER
            )


async def test_expired_certificate_costs_postage_on_the_new_issuance(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        app, _ = await w.svc.submit(new_app(), OFFICER)
        await w.svc.approve(app["request_id"], actor="admin:officer")
        w.clock.set(datetime(2029, 8, 1, tzinfo=UTC))  # 3 years 3 months + a bit later
        again, _ = await w.svc.submit(
            new_app(kind="reapply", remarks="有効期限切れ", cause="expired"), OFFICER
        )
        out = await w.svc.approve(again["request_id"], actor="admin:officer")
        [issued] = out["issued_certificates"]
        assert [(f["kind"], f["amount_yen"]) for f in issued["fees"]] == [
            ("issuance", 1500),
            ("postage", 753),
        ]
        assert "有効期限切れ" in issued["fees"][1]["description"]


async def test_per_terminal_application_issues_one_certificate_per_terminal(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        app, _ = await w.svc.submit(
            new_app(terminals=("総合受付 端末01", "総合受付 端末02")), OFFICER
        )
        out = await w.svc.approve(app["request_id"], actor="admin:officer")
        assert [c["terminal"] for c in out["issued_certificates"]] == [
            "総合受付 端末01",
            "総合受付 端末02",
        ]
        assert (await w.s.registry.get(CODE)).per_terminal  # type: ignore[attr-defined]
        assert [f["amount_yen"] for c in out["issued_certificates"] for f in c["fees"]] == [
            1500,
            1500,
        ]
        with pytest.raises(InvalidRequest, match="listed twice"):
            await w.svc.submit(
                Submission(
                    kind="reapply",
                    institution_code=CODE,
                    remarks="x",
                    terminals=("総合受付 端末01", "総合受付 端末01"),
                ),
                OFFICER,
            )
