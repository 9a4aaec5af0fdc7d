"""The facility certificate lifecycle in process: real store, real CA, an injected clock.

Time is moved by hand (FakeClock), never slept; each scheduler run builds fresh services over a
fresh engine, which is what a restart or another worker looks like to the store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import select

from gateway.auth.mtls import identify
from gateway.clock import JST, jst_date
from gateway.errors import (
    AccessDenied,
    Conflict,
    Gone,
    InvalidRequest,
    Locked,
    NotFound,
    WrongPassword,
)
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.facilities import FacilityRegistry, fingerprint
from gateway.store.schema import audit_event, client_certificate, notification
from tests.support.gateway import free_port
from tests.support.lifecycle import (
    FakeClock,
    download_password,
    download_token,
    make_settings,
    notice_text,
    p12_password_from_notice,
    read_eml,
    services,
)
from tests.support.postgres import Databases, lock_waiters

T0 = datetime(2026, 1, 31, 10, 0, tzinfo=JST)  # the 31st on purpose (see clock.add_months)


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is not installed: run `make test` (scripts/bootstrap.sh)")


async def _hospital(s, code: str = "1310000011", **kw: object) -> None:  # type: ignore[no-untyped-def]
    await s.registry.add(
        institution_code=code, name="TEST 中央病院", kind="hospital", actor="test", now=T0, **kw
    )


async def _der(s, serial: str) -> bytes:  # type: ignore[no-untyped-def]
    async with s.db.read() as conn:
        return (
            await conn.execute(
                select(client_certificate.c.certificate_der).where(
                    client_certificate.c.serial_hex == serial
                )
            )
        ).scalar_one()


async def _in_renewal_window(s, clock, hand_over: Path, code: str = "1310000011"):  # type: ignore[no-untyped-def]
    """A facility certificate issued (handed over to ``hand_over``) and the clock 30 days
    before its expiry, inside its renewal window: (the issued certificate, its DER)."""
    held = await s.certs.issue(code, actor="test", hand_over_dir=hand_over)
    der = await _der(s, held.serial)
    clock.set(datetime.fromisoformat(held.expires) - timedelta(days=30))
    return held, der


async def test_reminders_exactly_on_the_listed_days_and_once(
    tmp_path: Path, store_url: str
) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        issued = await s.certs.issue("1310000011", actor="test")
    expires = datetime.fromisoformat(issued.expires)
    # 3 years 3 months after 2026-01-31 10:00 JST is 2029-04-30 (April has no 31st).
    assert expires.astimezone(JST) == datetime(2029, 4, 30, 10, 0, tzinfo=JST)
    expiry_day = jst_date(expires)
    day = expiry_day - timedelta(days=100)
    while day <= expiry_day + timedelta(days=2):
        # A restart each day, and two "workers" running at once on the same store, three
        # times a day (the same processes run again: nothing is sent twice either way).
        clock.set(datetime(day.year, day.month, day.day, 0, 5, tzinfo=JST))
        async with services(settings, clock) as a, services(settings, clock) as b:
            for hh, mm in ((0, 5), (10, 0), (23, 55)):
                clock.set(datetime(day.year, day.month, day.day, hh, mm, tzinfo=JST))
                await asyncio.gather(a.scheduler.run_once(), b.scheduler.run_once())
        day += timedelta(days=1)
    async with services(settings, clock) as s, s.db.read() as conn:
        rows = (await conn.execute(select(notification).order_by(notification.c.id))).all()
        audits = (
            await conn.execute(
                select(audit_event).where(audit_event.c.action == "notification.expiry_reminder")
            )
        ).all()
    kinds = [r.kind for r in rows]
    expected_days = [90, 60, 30, 15, 7, 6, 5, 4, 3, 2, 1, 0]
    assert kinds == [f"expiry-{d}d" for d in expected_days] + ["expired"]
    assert len(audits) == len(kinds)
    for r, d in zip(rows, expected_days, strict=False):
        assert jst_date(r.created_at) == expiry_day - timedelta(days=d), r.kind
        assert issued.serial in r.body and "2029年4月30日" in r.body
    # The day-N reminder is created on the first run of that day, at 00:05 JST.
    assert rows[0].created_at.astimezone(JST).time().hour == 0
    # "at expiry": created on the first run after 10:00 JST on the expiry day.
    assert rows[-1].kind == "expired"
    assert rows[-1].created_at >= expires
    assert rows[-1].created_at.astimezone(JST).strftime("%H:%M") == "10:00"
    assert "有効期限が切れました" in rows[-1].subject
    assert "あと7日" in rows[4].subject and "本日が有効期限" in rows[11].subject


async def test_missed_reminders_are_not_sent_late_all_at_once(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path)
    async with services(settings, clock) as s:
        await _hospital(s)
        issued = await s.certs.issue("1310000011", actor="test")
        # The scheduler was down from day 95 to day 25: only the 30-day reminder goes out.
        clock.set(datetime.fromisoformat(issued.expires) - timedelta(days=25))
        report = await s.scheduler.run_once()
        assert [r["kind"] for r in report.reminders] == ["expiry-30d"]
        assert (await s.scheduler.run_once()).reminders == []


async def test_rotation_revokes_the_old_certificate_exactly_one_month_later(
    tmp_path: Path, store_url: str
) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s, code="1310000029", provisional=True)
        old = await s.certs.issue("1310000029", actor="test")
        old_der = await _der(s, old.serial)
        # Downloaded, so in use: the rotation keeps it valid for the overlap.
        box = Path(old.outbox)
        await s.certs.download(download_token(box), download_password(box), remote=None)
        with pytest.raises(InvalidRequest, match="provisional code"):
            await s.certs.rotate("1310000029", actor="test")
        # Provisional -> real code, on 31 March: the old one goes on 30 April (no 31st).
        clock.set(datetime(2026, 3, 31, 15, 30, tzinfo=JST))
        new = await s.certs.rotate(
            "1310000029", new_code="1310000037", reason="real code arrived", actor="officer"
        )
        new_der = await _der(s, new.serial)
    revoke_at = datetime(2026, 4, 30, 15, 30, tzinfo=JST)
    assert new.replaced[0]["serial"] == old.serial
    assert new.replaced[0]["status"] == "overlapping"
    assert datetime.fromisoformat(new.replaced[0]["revoke_at"]) == revoke_at
    async with services(settings, clock) as s:  # restart: the schedule is in the store
        status = await s.certs.status("1310000037")
        assert status["provisional"] is False
        by_serial = {c["serial"]: c for c in status["certificates"]}
        assert by_serial[old.serial]["status"] == "overlapping"
        assert by_serial[new.serial]["status"] == "active"
        with pytest.raises(NotFound):
            await s.certs.status("1310000029")
        # During the overlap both certificates work, both for the facility's new code.
        for der in (old_der, new_der):
            ident = await identify(s.db, der, now=clock())
            assert ident.institution_code == "1310000037"
        # Only the current certificate's link is ever resent.
        with pytest.raises(Conflict, match="no longer the facility's current certificate"):
            await s.certs.resend(old.serial, actor="officer")
        clock.set(revoke_at - timedelta(seconds=1))
        assert (await s.scheduler.run_once()).revoked == []
        await identify(s.db, old_der, now=clock())
        clock.set(revoke_at)
        assert (await s.scheduler.run_once()).revoked == [old.serial]
        assert (await s.scheduler.run_once()).revoked == []  # once
        with pytest.raises(AccessDenied, match="revoked on 2026-04-30T06:30:00"):
            await identify(s.db, old_der, now=clock())
        await identify(s.db, new_der, now=clock())
        async with s.db.read() as conn:
            ev = (
                await conn.execute(
                    select(audit_event).where(
                        audit_event.c.action == "client_certificate.revoke_scheduled"
                    )
                )
            ).all()
        assert len(ev) == 1 and old.serial in ev[0].detail
        status = await s.certs.status("1310000037")
        gone = next(c for c in status["certificates"] if c["serial"] == old.serial)
        assert gone["status"] == "revoked"
        assert datetime.fromisoformat(gone["revoked_at"]) == revoke_at
        assert "provisional code 1310000029 → real code 1310000037" in gone["reason"]
    crl = x509.load_der_x509_crl((tmp_path / "facility.crl").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(old.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.superseded
    )
    assert crl.get_revoked_certificate_by_serial_number(int(new.serial, 16)) is None


async def test_reissue_after_a_lost_notice_ends_the_undelivered_certificate(
    tmp_path: Path, store_url: str
) -> None:
    """The security review's sequence: a certificate with a live link (resent once), never
    downloaded, reissued because its password notice was lost. Before, the old link still
    delivered the old .p12 (200) and that certificate worked for a month; a resend of it gave
    the facility two live links. Now its file and link end and it is revoked at once."""
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s, code="1310000037")
        old = await s.certs.issue("1310000037", actor="test")
        old_der = await _der(s, old.serial)
        box = Path(old.outbox)
        clock.advance(days=1)
        await s.certs.resend(old.serial, actor="officer")
        token, pwd = download_token(box, "resend-2-"), download_password(box, "resend-2-")
        clock.advance(days=1)
        new = await s.certs.rotate(
            "1310000037", reason="password notice lost", postage="notice_lost", actor="officer"
        )
        # The old link and the old notice deliver nothing; the certificate is refused.
        with pytest.raises(Gone, match="revoked; its file is no longer available"):
            await s.certs.download(token, pwd, remote="192.0.2.7")
        with pytest.raises(AccessDenied, match="revoked on"):
            await identify(s.db, old_der, now=clock())
        with pytest.raises(Conflict, match="is revoked"):
            await s.certs.resend(old.serial, actor="officer")
        with pytest.raises(Gone, match="revoked"):
            await s.certs.export_p12(old.serial, actor="officer")
        [replaced] = new.replaced
        assert replaced["serial"] == old.serial and replaced["status"] == "revoked"
        assert datetime.fromisoformat(replaced["revoke_at"]) == clock()
        by_serial = {c["serial"]: c for c in (await s.certs.status("1310000037"))["certificates"]}
        gone = by_serial[old.serial]
        assert gone["status"] == "revoked" and gone["downloaded_at"] is None
        assert datetime.fromisoformat(gone["revoked_at"]) == clock()
        assert gone["reason"].startswith(f"replaced by {new.serial} (renewal)")
        assert by_serial[new.serial]["status"] == "active"
        async with s.db.read() as conn:
            from gateway.store.schema import certificate_delivery

            kept = (
                await conn.execute(
                    select(certificate_delivery.c.p12_wrapped)
                    .join(client_certificate)
                    .where(client_certificate.c.serial_hex == old.serial)
                )
            ).scalar_one()
            events = [
                (r.action, json.loads(r.detail))
                for r in (await conn.execute(select(audit_event).order_by(audit_event.c.seq)))
            ]
        assert kept is None
        assert (
            "client_certificate.revoke",
            {"serial": old.serial, "reason": gone["reason"]},
        ) in events
        rotate = next(d for a, d in events if a == "client_certificate.rotate")
        assert rotate["downloaded"] is False and rotate["old_serial"] == old.serial
        # The new certificate is delivered as usual: one live link for the facility.
        new_box = Path(new.outbox)
        name, _ = await s.certs.download(
            download_token(new_box), download_password(new_box), remote=None
        )
        assert name == "client.hpki-gateway.p12"
        # The scheduler has nothing left to do for the old one.
        clock.advance(days=40)
        assert (await s.scheduler.run_once()).revoked == []
    crl = x509.load_der_x509_crl((tmp_path / "facility.crl").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(old.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.superseded
    )


async def test_a_file_kept_by_an_earlier_rotation_is_not_delivered(tmp_path: Path) -> None:
    """A store written before the rule above: a replaced (overlapping) certificate whose file is
    still kept. Its link, an export and a resend are all refused."""
    clock = FakeClock(T0)
    settings = make_settings(tmp_path)
    async with services(settings, clock) as s:
        await _hospital(s)
        res = await s.certs.issue("1310000011", actor="test")
        box = Path(res.outbox)
        async with s.db.write() as conn:  # what a rotation used to leave behind
            await s.registry.schedule_revocation_in(
                conn,
                (
                    await conn.execute(
                        select(client_certificate.c.id).where(
                            client_certificate.c.serial_hex == res.serial
                        )
                    )
                ).scalar_one(),
                revoke_at=clock() + timedelta(days=30),
                reason="replaced by 1234 (renewal)",
            )
        with pytest.raises(Gone, match="replaced by a newer one"):
            await s.certs.download(download_token(box), download_password(box), remote=None)
        with pytest.raises(Gone, match="replaced by a newer one"):
            await s.certs.export_p12(res.serial, actor="officer")
        with pytest.raises(Conflict, match="no longer the facility's current certificate"):
            await s.certs.resend(res.serial, actor="officer")


async def test_renewal_and_rotation_refusals(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path)
    async with services(settings, clock) as s:
        await _hospital(s)
        first = await s.certs.issue("1310000011", actor="test")
        renewed = await s.certs.rotate("1310000011", actor="test")
        assert renewed.replaced[0]["serial"] == first.serial
        # The old one is already being replaced: a second rotation replaces the new one only.
        with pytest.raises(NotFound):
            await s.certs.rotate("1310000011", serial=first.serial, actor="test")
        # Expired certificates cannot be rotated: that is a new issuance.
        clock.set(datetime.fromisoformat(renewed.expires) + timedelta(days=1))
        with pytest.raises(Conflict, match="no current certificate"):
            await s.certs.rotate("1310000011", actor="test")
        await s.certs.issue("1310000011", actor="test")


async def test_one_certificate_per_facility_and_per_terminal_policy(
    tmp_path: Path, store_url: str
) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        first = await s.certs.issue("1310000011", actor="test")
        with pytest.raises(Conflict, match="one per facility; rotate it instead") as e:
            await s.certs.issue("1310000011", actor="test")
        assert first.serial in e.value.description
        # Nothing of the refused issuance is left in the outbox.
        assert [p.name for p in (tmp_path / "outbox" / "1310000011").iterdir()] == [first.serial]
        await s.registry.add(
            institution_code="1410000018",
            name="TEST 端末クリニック",
            kind="clinic",
            per_terminal=True,
            actor="test",
        )
        with pytest.raises(InvalidRequest, match="give a terminal label"):
            await s.certs.issue("1410000018", actor="test")
        a = await s.certs.issue("1410000018", terminal="総合受付 端末01", actor="test")
        await s.certs.issue("1410000018", terminal="総合受付 端末02", actor="test")
        with pytest.raises(Conflict, match="one per terminal"):
            await s.certs.issue("1410000018", terminal="総合受付 端末01", actor="test")
        with pytest.raises(InvalidRequest, match="name the one to rotate"):
            await s.certs.rotate("1410000018", actor="test")
        r = await s.certs.rotate("1410000018", terminal="総合受付 端末01", actor="test")
        assert r.terminal == "総合受付 端末01" and r.replaced[0]["serial"] == a.serial
        with pytest.raises(Conflict, match="revoke all but one"):
            await s.registry.set_policy("1410000018", per_terminal=False, actor="test")
        der = await _der(s, r.serial)
        ou = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
            x509.NameOID.ORGANIZATIONAL_UNIT_NAME
        )
        assert ou[0].value == "総合受付 端末01"


async def test_dental_department_is_registered_under_the_medical_code(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with services(settings, FakeClock(T0)) as s:
        await _hospital(s, dental_code="1330000015")
        with pytest.raises(Conflict, match="dental \\(歯科\\) code of facility 1310000011"):
            await s.registry.add(
                institution_code="1330000015", name="同院歯科", kind="dental_clinic", actor="t"
            )
        with pytest.raises(NotFound, match="use 1310000011"):
            await s.certs.issue("1330000015", actor="test")
        await s.registry.add(
            institution_code="1310000045", name="TEST 医院", kind="clinic", actor="t"
        )
        for dental, needle in (
            ("1330000015", "dental \\(歯科\\) code of facility 1310000011"),
            ("2730000012", "prefecture 27"),
            ("1310000052", "not a dental"),
        ):
            with pytest.raises((Conflict, InvalidRequest), match=needle):
                await s.registry.link_dental("1310000045", dental, actor="t")
        f = await s.registry.link_dental("1310000045", "1330000023", actor="t")
        assert f.dental_code == "1330000023"
        await s.registry.add(
            institution_code="1340000019", name="TEST 薬局", kind="pharmacy", actor="t"
        )
        with pytest.raises(InvalidRequest, match="medical"):
            await s.registry.link_dental("1340000019", "1330000031", actor="t")


async def test_download_window_lock_resend_and_the_p12(tmp_path: Path, store_url: str) -> None:
    _require("pdftotext")
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        res = await s.certs.issue("1310000011", actor="test")
        box = Path(res.outbox)
        token, pwd = download_token(box), download_password(box)
        assert res.download_url and res.download_url.endswith(token)
        # The two mails are separate: the link never carries the password, nor the reverse.
        link_mail = read_eml(box / "mail-1-download-link.eml").get_content()
        pwd_mail = read_eml(box / "mail-2-download-password.eml").get_content()
        assert pwd not in link_mail and token not in pwd_mail
        notice = notice_text(Path(res.password_notice))
        p12_pwd = p12_password_from_notice(Path(res.password_notice))
        assert p12_pwd not in link_mail + pwd_mail and pwd not in notice
        assert res.serial in notice and "2029年4月30日" in notice and "TEST 中央病院" in notice
        # 14 days: the last second works (but here a wrong password), the next one is gone.
        clock.set(T0 + timedelta(days=14) - timedelta(seconds=1))
        for left in (4, 3, 2, 1):
            with pytest.raises(WrongPassword, match=f"{left} attempts left"):
                await s.certs.download(token, "wrong", remote="127.0.0.1")
        with pytest.raises(Locked, match="locked after 5 wrong"):
            await s.certs.download(token, "wrong", remote="127.0.0.1")
        with pytest.raises(Locked):
            await s.certs.download(token, pwd, remote="127.0.0.1")  # even the right one
        clock.set(T0 + timedelta(days=14))
        with pytest.raises((Gone, Locked)):
            await s.certs.download(token, pwd, remote="127.0.0.1")
        # Resend: a new window, new link and password; the old link is dead.
        clock.set(T0 + timedelta(days=20))
        again = await s.certs.resend(res.serial, actor="officer")
        assert datetime.fromisoformat(again.download_expires) == clock() + timedelta(days=14)
        token2, pwd2 = download_token(box, "resend-2-"), download_password(box, "resend-2-")
        with pytest.raises(NotFound):
            await s.certs.download(token, pwd, remote=None)
        clock.set(T0 + timedelta(days=34) - timedelta(seconds=1))
        with pytest.raises(WrongPassword, match="4 attempts left"):
            await s.certs.download(token2, pwd, remote=None)
        name, p12 = await s.certs.download(token2, pwd2, remote="127.0.0.1")
        assert name == "client.hpki-gateway.p12"
        with pytest.raises(Gone, match="already downloaded"):
            await s.certs.download(token2, pwd2, remote=None)
        with pytest.raises(Conflict, match="downloaded on"):
            await s.certs.resend(res.serial, actor="officer")
        st = await s.certs.status("1310000011")
        assert datetime.fromisoformat(st["certificates"][0]["downloaded_at"]) == clock()
        # The file is no longer kept in the store.
        async with s.db.read() as conn:
            from gateway.store.schema import certificate_delivery

            assert (
                await conn.execute(select(certificate_delivery.c.p12_wrapped))
            ).scalar_one() is None
            acts = [
                r.action
                for r in (await conn.execute(select(audit_event.c.action))).all()
                if r.action.startswith("delivery.")
            ]
            details = " ".join(
                r.detail for r in (await conn.execute(select(audit_event.c.detail))).all()
            )
        assert acts.count("delivery.wrong_password") == 5 and "delivery.locked" in acts
        assert acts[-1] == "delivery.download"
        assert pwd not in details and pwd2 not in details and p12_pwd not in details
    key, cert, chain = pkcs12.load_key_and_certificates(p12, p12_pwd.encode())
    assert key is not None and cert is not None and format(cert.serial_number, "x") == res.serial
    assert len(chain) == 1
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12, pwd2.encode())


async def test_wrong_password_while_a_resend_replaces_the_link(
    tmp_path: Path, store_url: str
) -> None:
    """The review's race, made deterministic: a wrong download password is being checked when
    an officer resends. Before, counting it selected the row by the old token hash, found
    nothing (``NoResultFound``): 500, and the guess was never audited. Now it is audited
    against the certificate, not counted against the new link, and answered as the replaced
    link is (404)."""
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        from gateway.lifecycle import delivery
        from gateway.store.schema import certificate_delivery

        await _hospital(s)
        res = await s.certs.issue("1310000011", actor="test")
        box = Path(res.outbox)

        async def counters() -> tuple[int, int]:
            async with s.db.read() as conn:
                row = (
                    await conn.execute(
                        select(
                            certificate_delivery.c.failed_attempts,
                            certificate_delivery.c.checking_attempts,
                        )
                    )
                ).one()
            return int(row[0]), int(row[1])

        # The attempt counter alone, in the download's order: a check reserved on the link,
        # the resend, then the wrong password counted against the link it was reserved on.
        token = download_token(box)
        async with s.db.read() as conn:
            link_id = (await conn.execute(select(certificate_delivery.c.id))).scalar_one()
        mine = (certificate_delivery.c.id == link_id) & (
            certificate_delivery.c.token_hash == delivery.token_hash(token)
        )
        async with s.db.write() as conn:
            assert await delivery.ATTEMPTS.reserve(conn, mine, 5)
        await s.certs.resend(res.serial, actor="officer")
        async with s.db.write() as conn:
            assert (
                await delivery.ATTEMPTS.failed_check(conn, mine, mine, 5, {"locked_at": clock()})
                is None
            )
        assert await counters() == (0, 0)
        # The download's own steps, with the resend in between.
        token2 = download_token(box, "resend-2-")
        link = await s.certs._reserve_check(token2, clock())
        assert await counters() == (0, 1)
        await s.certs.resend(res.serial, actor="officer")
        with pytest.raises(NotFound, match="a resend replaces older links"):
            await s.certs._wrong_download_password(link, clock(), remote="192.0.2.7")
        assert await counters() == (0, 0)  # the new link keeps all its attempts
        async with s.db.read() as conn:
            wrong = [
                json.loads(r.detail)
                for r in (
                    await conn.execute(
                        select(audit_event.c.detail).where(
                            audit_event.c.action == "delivery.wrong_password"
                        )
                    )
                )
            ]
        assert wrong == [
            {"serial": res.serial, "failed_attempts": None, "link": "replaced meanwhile"}
        ]
        token3, pwd3 = download_token(box, "resend-3-"), download_password(box, "resend-3-")
        with pytest.raises(WrongPassword, match="4 attempts left"):
            await s.certs.download(token3, "wrong", remote=None)
        name, _ = await s.certs.download(token3, pwd3, remote=None)
        assert name == "client.hpki-gateway.p12"


async def test_revocation_is_immediate_and_publishes_the_crl(
    tmp_path: Path, store_url: str
) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        res = await s.certs.issue("1310000011", actor="test")
        der = await _der(s, res.serial)
        await s.certs.revoke(res.serial.upper(), reason="PC stolen", actor="officer")
        with pytest.raises(AccessDenied, match="PC stolen"):
            await identify(s.db, der, now=clock())
        with pytest.raises(Gone, match="revoked"):
            await s.certs.download(
                download_token(Path(res.outbox)), download_password(Path(res.outbox)), remote=None
            )
        crl = x509.load_der_x509_crl((tmp_path / "facility.crl").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(int(res.serial, 16)) is not None
        assert crl.next_update_utc == clock().replace(microsecond=0) + timedelta(days=7)
        # Refreshed before nextUpdate (2 days margin), not on every run.
        clock.advance(days=4)
        assert await s.certs.refresh_crl() is False
        clock.advance(days=1, seconds=1)
        assert await s.certs.refresh_crl() is True
        crl2 = x509.load_der_x509_crl((tmp_path / "facility.crl").read_bytes())
        assert crl2.next_update_utc > crl.next_update_utc  # type: ignore[operator]
        assert crl2.get_revoked_certificate_by_serial_number(int(res.serial, 16)) is not None
        # Stopping the service revokes everything at once.
        await s.registry.add(
            institution_code="1310000060", name="TEST 停止医院", kind="clinic", actor="t"
        )
        other = await s.certs.issue("1310000060", actor="test")
        assert await s.certs.stop_service("1310000060", reason="閉院", actor="o") == [other.serial]
        st = await s.certs.status("1310000060")
        assert st["status"] == "stopped"
        assert st["certificates"][0]["status"] == "revoked"
        assert st["certificates"][0]["reason"] == "service stopped: 閉院"
        with pytest.raises(Conflict, match="stopped"):
            await s.certs.issue("1310000060", actor="test")


class _Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: object, session: object, envelope) -> str:  # type: ignore[no-untyped-def]
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


async def test_smtp_delivery_and_reminder_mail(tmp_path: Path) -> None:
    import email
    import email.policy

    port = free_port()
    sink = _Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        clock = FakeClock(T0)
        settings = make_settings(tmp_path, smtp_port=port)
        async with services(settings, clock) as s:
            await _hospital(s, contact_email="it@hospital.test.invalid")
            res = await s.certs.issue("1310000011", actor="test")
            assert res.mailed and res.mail_error is None
            assert len(sink.messages) == 2
            mails = [
                email.message_from_bytes(m, policy=email.policy.default) for _, m in sink.messages
            ]
            assert all(rcpt == ["it@hospital.test.invalid"] for rcpt, _ in sink.messages)
            assert "ファイル受取" in mails[0]["Subject"]
            assert "/download/" in mails[0].get_content()  # type: ignore[attr-defined]
            assert "ダウンロード用パスワード:" in mails[1].get_content()  # type: ignore[attr-defined]
            assert "/download/" not in mails[1].get_content()  # type: ignore[attr-defined]
            clock.set(datetime.fromisoformat(res.expires) - timedelta(days=59, hours=1))
            report = await s.scheduler.run_once()
            assert report.mailed == 1 and report.mail_errors == 0
            assert (await s.scheduler.run_once()).mailed == 0
            reminder = email.message_from_bytes(sink.messages[-1][1], policy=email.policy.default)
            body = reminder.get_content()  # type: ignore[attr-defined]
            assert "有効期限まであと59日" in reminder["Subject"]
            assert res.serial in body and "2029年4月30日" in body and "更新" in body
            async with s.db.read() as conn:
                row = (await conn.execute(select(notification))).one()
            assert row.sent_at == clock() and row.kind == "expiry-60d"
    finally:
        controller.stop()


async def test_smtp_down_keeps_the_reminder_and_retries(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, smtp_port=free_port())  # nothing listens there
    async with services(settings, clock) as s:
        await _hospital(s, contact_email="it@hospital.test.invalid")
        res = await s.certs.issue("1310000011", actor="test")
        assert not res.mailed and "SMTP delivery" in (res.mail_error or "")
        assert (Path(res.outbox) / "mail-2-download-password.eml").exists()
        clock.set(datetime.fromisoformat(res.expires) - timedelta(days=10))
        report = await s.scheduler.run_once()
        assert report.reminders and report.mail_errors == 1
        async with s.db.read() as conn:
            row = (await conn.execute(select(notification))).one()
        assert row.sent_at is None and "SMTP delivery" in row.error


def test_expired_fingerprint_is_refused_by_identify_too(tmp_path: Path, store_url: str) -> None:
    """Belt and braces: the store check also refuses an expired certificate (TLS does first)."""

    async def go() -> None:
        clock = FakeClock(T0)
        settings = make_settings(tmp_path, store_url=store_url)
        async with services(settings, clock) as s:
            await _hospital(s)
            res = await s.certs.issue("1310000011", actor="test")
            der = await _der(s, res.serial)
            assert fingerprint(der)
            clock.set(datetime.fromisoformat(res.expires))
            with pytest.raises(AccessDenied, match="expired on"):
                await identify(s.db, der, now=clock())

    asyncio.run(go())


_ = UTC


@pytest.fixture
def pg_url(pg_databases: Databases) -> str:
    """A fresh database of the session's PostgreSQL cluster."""
    return pg_databases.fresh()


async def test_an_officer_revoking_a_certificate_being_rotated_queues_not_deadlocks(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL: every lifecycle transaction takes its locks in one order (the facility's row,
    the certificate's delivery, the certificate, the audit head), so an officer's revocation
    and a rotation of the same certificate queue behind each other. Before, the revocation
    held the certificate and waited for the delivery while the rotation held the delivery and
    waited for the certificate: PostgreSQL broke the deadlock and one of them got 503.

    A third session holds the audit head until both wait, so that they overlap every run."""
    from sqlalchemy import text

    from gateway.store.db import Database

    url = pg_url
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=url)
    async with services(settings, clock) as s:
        await _hospital(s)
        first = await s.certs.issue("1310000011", actor="test")
        holder = Database(url)
        try:
            async with holder.write() as conn:
                await conn.execute(text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE"))
                revoke = asyncio.ensure_future(
                    s.certs.revoke(first.serial, reason="PC stolen", actor="officer")
                )
                await lock_waiters(url, 1)
                rotate = asyncio.ensure_future(s.certs.rotate("1310000011", actor="officer"))
                await lock_waiters(url, 2)
            revoked, rotated = await asyncio.gather(revoke, rotate, return_exceptions=True)
        finally:
            await holder.close()
        assert isinstance(revoked, dict) and revoked["status"] == "revoked", revoked
        # The rotation came second and found the certificate revoked: a clear 409.
        assert isinstance(rotated, Conflict), rotated
        assert "was revoked meanwhile" in rotated.description
        st = await s.certs.status("1310000011")
        assert [c["status"] for c in st["certificates"]] == ["revoked"]
        async with s.db.read() as conn:
            from gateway.audit import AuditLog

            assert (await AuditLog().verify(conn)).message == "chain intact"


async def test_a_suspension_racing_the_end_of_service_does_not_overwrite_stopped(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL: a suspension reads the facility under its row lock. Before, it read the row
    unlocked ("active"), its UPDATE waited for the end of the service to commit, and then wrote
    "suspended" over "stopped": a facility that had left the service could be resumed."""
    from sqlalchemy import text

    from gateway.store.db import Database

    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=pg_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        holder = Database(pg_url)
        try:
            async with holder.write() as conn:  # the end of the service, not yet committed
                await conn.execute(
                    text(
                        "UPDATE facility SET status = 'stopped', status_reason = 'closed' "
                        "WHERE institution_code = '1310000011'"
                    )
                )
                suspend = asyncio.ensure_future(
                    s.registry.set_status(
                        "1310000011", status="suspended", reason="audit", actor="officer"
                    )
                )
                await lock_waiters(pg_url, 1)
            outcome = await asyncio.gather(suspend, return_exceptions=True)
        finally:
            await holder.close()
        assert isinstance(outcome[0], Conflict), outcome
        assert "stopped the service" in outcome[0].description
        assert (await s.registry.get("1310000011")).status == "stopped"


async def test_the_end_of_service_takes_the_audit_head_last(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL: ending a facility's service revokes each of its certificates and appends
    the audit records together at the end. Before, each revocation appended its own, so from
    the second certificate on the audit head (which every signature needs) stayed locked
    while the transaction waited for other rows, here a certificate row another session holds
    (as an identity's ``last_used_at`` write does for a moment)."""
    from sqlalchemy import text

    from gateway.store.db import Database

    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=pg_url)
    async with services(settings, clock) as s:
        await s.registry.add(
            institution_code="1410000018", name="TEST 端末クリニック", kind="clinic",
            per_terminal=True, actor="test",
        )  # fmt: skip
        one = await s.certs.issue("1410000018", terminal="端末01", actor="test")
        two = await s.certs.issue("1410000018", terminal="端末02", actor="test")
        holder, probe = Database(pg_url), Database(pg_url)
        try:
            async with holder.write() as conn:  # holds the second certificate's row
                await conn.execute(
                    text(
                        "UPDATE client_certificate SET last_used_at = now() WHERE serial_hex = :s"
                    ),
                    {"s": two.serial},
                )
                stop = asyncio.ensure_future(
                    s.certs.stop_service("1410000018", reason="閉院", actor="officer")
                )
                await lock_waiters(pg_url, 1)
                try:
                    async with probe.write() as p:
                        await p.execute(
                            text("SELECT 1 FROM audit_head WHERE id = 1 FOR UPDATE NOWAIT")
                        )
                    head = "free"
                except Exception as e:  # noqa: BLE001 - the lock error, whatever its wrapping
                    head = f"locked ({type(e).__name__})"
            stopped = await stop
        finally:
            await holder.close()
            await probe.close()
        assert head == "free", head
        assert sorted(stopped) == sorted([one.serial, two.serial])
        async with s.db.read() as conn:
            from gateway.audit import AuditLog

            assert (await AuditLog().verify(conn)).message == "chain intact"


class _HeldCrlRead(FacilityRegistry):
    """Another worker's registry: its first CRL read returns only when the test lets it, so
    the two workers' publications interleave the same way on every run."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def revoked_unexpired(self, now: datetime) -> list[Any]:
        rows = await super().revoked_unexpired(now)
        if not self.read.is_set():
            self.read.set()
            await self.release.wait()
        return rows


def _crl_serials(path: Path) -> set[int]:
    return {r.serial_number for r in x509.load_der_x509_crl(path.read_bytes())}


async def test_two_workers_revoking_at_once_both_reach_the_crl(
    tmp_path: Path, store_url: str
) -> None:
    """Two workers revoke at the same moment: worker 2 read the store for its CRL before
    worker 1's revocation committed, and renamed its file over worker 1's. Before, the CRL
    then lacked worker 1's revocation until the scheduler's refresh near nextUpdate (5 days
    later); now a publisher re-reads the store after writing and writes again when it missed
    a revocation."""
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        await s.registry.add(
            institution_code="1310000060", name="TEST 別医院", kind="clinic", actor="t"
        )
        one = await s.certs.issue("1310000011", actor="test")
        two = await s.certs.issue("1310000060", actor="test")
        held = _HeldCrlRead(db=s.db, audit=s.certs.audit)
        worker2 = ClientCertificateService(
            settings=settings, db=s.db, audit=s.certs.audit, registry=held, clock=clock
        )
        late = asyncio.ensure_future(worker2.revoke(two.serial, reason="PC stolen", actor="o"))
        await held.read.wait()  # worker 2 committed and read {two}; its file is not written
        await s.certs.revoke(one.serial, reason="key lost", actor="o")
        held.release.set()
        await late
        crl = tmp_path / "facility.crl"
        assert _crl_serials(crl) == {int(one.serial, 16), int(two.serial, 16)}


async def test_the_scheduler_rewrites_a_crl_that_misses_a_revocation(
    tmp_path: Path, store_url: str
) -> None:
    """A revocation committed in the store but missing from the published CRL (its
    publication failed or was overwritten) is put there by the next scheduler run. Before,
    the scheduler rewrote the CRL only when its nextUpdate came near (2 of 7 days left)."""
    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        res = await s.certs.issue("1310000011", actor="test")
        crl = tmp_path / "facility.crl"
        await s.certs.publish_crl()
        before = crl.read_bytes()
        await s.certs.revoke(res.serial, reason="PC stolen", actor="officer")
        crl.write_bytes(before)  # the revocation's publication lost
        clock.advance(minutes=5)
        report = await s.scheduler.run_once()
        assert report.crl_published
        assert _crl_serials(crl) == {int(res.serial, 16)}
        # A CRL that lists everything is left alone until nextUpdate nears.
        clock.advance(minutes=5)
        assert await s.certs.refresh_crl() is False


async def _renewed_over_est(
    s, code: str, clock: FakeClock, tmp: Path
) -> tuple[str, x509.Certificate]:  # type: ignore[no-untyped-def]
    """A facility certificate (handed over) renewed over EST 30 days before its expiry with a
    key of the caller's own: (the renewed serial, the renewal)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    clock.set(T0)
    held, der = await _in_renewal_window(s, clock, tmp / code, code)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.load_der_x509_certificate(der).subject
    )
    body = csr.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )
    renewed, _ = await s.certs.renew_from_request(
        held.serial, body, actor=f"facility:{code}", facility_code=code
    )
    return held.serial, renewed


async def test_revoking_a_stolen_certificate_reaches_its_renewal_over_est(
    tmp_path: Path, store_url: str
) -> None:
    """Whoever holds a facility's certificate in its renewal window can renew it over EST with
    a key of their own. Before, revoking the stolen certificate said nothing of that renewal
    and left it valid for its 39 months (and once the stolen one's overlap had ended, the
    revocation was a bare 409 'already revoked'); now the revocation names the renewals still
    valid (``renewals``) and ``with_renewals`` revokes them too."""
    from cryptography.hazmat.primitives import serialization

    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        # The stolen certificate still overlaps: the officer sees the renewal in the answer.
        await _hospital(s)
        stolen, renewed = await _renewed_over_est(s, "1310000011", clock, tmp_path)
        renewed_serial = format(renewed.serial_number, "x")
        out = await s.certs.revoke(stolen, reason="PC stolen", actor="officer")
        assert out["renewals"] == [{"serial": renewed_serial, "status": "active"}]
        await identify(s.db, renewed.public_bytes(serialization.Encoding.DER), now=clock())

        # The other way: with_renewals ends the renewal with it.
        await s.registry.add(
            institution_code="1310000060", name="TEST 別医院", kind="clinic", actor="t", now=T0
        )
        stolen, renewed = await _renewed_over_est(s, "1310000060", clock, tmp_path)
        renewed_serial = format(renewed.serial_number, "x")
        # The overlap ended: the stolen certificate's scheduled revocation was carried out.
        clock.advance(days=40)
        assert await s.certs.revoke_due() == [stolen]
        with pytest.raises(Conflict, match=f"renewed over EST into {renewed_serial}"):
            await s.certs.revoke(stolen, reason="PC stolen", actor="officer")
        out = await s.certs.revoke(stolen, reason="PC stolen", actor="officer", with_renewals=True)
        assert out["renewals"] == [{"serial": renewed_serial, "status": "revoked"}]
        with pytest.raises(AccessDenied, match=f"renewed over EST from revoked {stolen}"):
            await identify(s.db, renewed.public_bytes(serialization.Encoding.DER), now=clock())
        assert renewed.serial_number in _crl_serials(tmp_path / "facility.crl")
        with pytest.raises(Conflict, match=r"already revoked$"):
            await s.certs.revoke(stolen, reason="x", actor="officer", with_renewals=True)
        async with s.db.read() as conn:
            from gateway.audit import AuditLog

            assert (await AuditLog().verify(conn)).message == "chain intact"
            details = (
                await conn.execute(
                    select(audit_event.c.detail).where(
                        audit_event.c.action == "client_certificate.revoke",
                        audit_event.c.facility_code == "1310000060",
                    )
                )
            ).scalars()
            assert [json.loads(d)["serial"] for d in details] == [renewed_serial]


def _renewal_request(der: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.load_der_x509_certificate(der).subject
    )
    return csr.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )


@pytest.mark.parametrize("rival", ["renewal", "revocation", "suspension"])
async def test_an_est_renewal_racing_another_change_of_the_certificate(
    tmp_path: Path, pg_url: str, rival: str
) -> None:
    """PostgreSQL: an EST renewal and a second renewal with the same certificate, an officer's
    revocation of it, or the facility's suspension overlap (a third session holds the audit
    head until both wait). The renewal holds the facility's row first; the rival, queued
    behind it, finds the certificate being replaced (409) or acts on the committed renewal
    (revoked with it named; suspended: every certificate refused). Never two current
    certificates, never a 500 or a deadlock."""
    from sqlalchemy import text

    from gateway.store.db import Database

    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=pg_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        held, der = await _in_renewal_window(s, clock, tmp_path / "h")
        me = {"actor": "facility:1310000011", "facility_code": "1310000011"}
        holder = Database(pg_url)
        try:
            async with holder.write() as conn:
                await conn.execute(text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE"))
                first = asyncio.ensure_future(
                    s.certs.renew_from_request(held.serial, _renewal_request(der), **me)
                )
                await lock_waiters(pg_url, 1)
                if rival == "renewal":
                    other = s.certs.renew_from_request(held.serial, _renewal_request(der), **me)
                elif rival == "revocation":
                    other = s.certs.revoke(held.serial, reason="PC stolen", actor="officer")
                else:
                    other = s.registry.set_status(
                        "1310000011", status="suspended", reason="audit", actor="officer"
                    )
                second = asyncio.ensure_future(other)
                await lock_waiters(pg_url, 2)
            renewed, outcome = await asyncio.gather(first, second, return_exceptions=True)
        finally:
            await holder.close()
        assert isinstance(renewed, tuple), renewed
        new_serial = format(renewed[0].serial_number, "x")
        st = await s.certs.status("1310000011")
        by = {c["serial"]: c["status"] for c in st["certificates"]}
        if rival == "renewal":
            assert isinstance(outcome, Conflict), outcome
            assert "already replaced" in outcome.description or "being replaced" in (
                outcome.description
            )
            assert by == {held.serial: "overlapping", new_serial: "active"}
        elif rival == "revocation":
            assert isinstance(outcome, dict), outcome
            assert outcome["renewals"] == [{"serial": new_serial, "status": "active"}]
            assert by == {held.serial: "revoked", new_serial: "active"}
        else:
            assert not isinstance(outcome, BaseException), outcome
            from cryptography.hazmat.primitives.serialization import Encoding

            new_der = renewed[0].public_bytes(Encoding.DER)
            with pytest.raises(AccessDenied, match="suspended"):
                await identify(s.db, new_der, now=clock())
        async with s.db.read() as conn:
            from gateway.audit import AuditLog

            assert (await AuditLog().verify(conn)).message == "chain intact"


async def test_a_renewal_whose_answer_was_lost_is_answered_again(
    tmp_path: Path, store_url: str
) -> None:
    """The gateway committed an EST renewal but its answer never reached the facility (the
    connection dropped). Before, the same request again was 409 'already replaced' for good:
    the facility's system held a key nobody certified for it and an old certificate revoked a
    month later, and had to apply anew. Now a request for the very key of the certificate
    that replaced this one (its proof of possession checked) gets that certificate again,
    audited; nothing new is issued. Another key is still 409."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    clock = FakeClock(T0)
    settings = make_settings(tmp_path, store_url=store_url)
    async with services(settings, clock) as s:
        await _hospital(s)
        held, der = await _in_renewal_window(s, clock, tmp_path / "h")
        subject = x509.load_der_x509_certificate(der).subject
        key = ec.generate_private_key(ec.SECP256R1())

        def request(k: ec.EllipticCurvePrivateKey) -> bytes:
            csr = x509.CertificateSigningRequestBuilder().subject_name(subject)
            return csr.sign(k, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

        me = {"actor": "facility:1310000011", "facility_code": "1310000011"}
        first, _ = await s.certs.renew_from_request(held.serial, request(key), **me)
        clock.advance(hours=1)
        again, info = await s.certs.renew_from_request(held.serial, request(key), **me)
        assert again == first and info == {"replaced": held.serial, "repeated": True}
        st = await s.certs.status("1310000011")
        assert len(st["certificates"]) == 2  # nothing new issued
        with pytest.raises(Conflict, match="already replaced"):
            await s.certs.renew_from_request(
                held.serial, request(ec.generate_private_key(ec.SECP256R1())), **me
            )
        # The new certificate revoked: its key is answered no more.
        await s.certs.revoke(format(first.serial_number, "x"), reason="lost", actor="o")
        with pytest.raises(Conflict, match="already replaced"):
            await s.certs.renew_from_request(held.serial, request(key), **me)
        async with s.db.read() as conn:
            actions = (
                await conn.execute(
                    select(audit_event.c.action).where(
                        audit_event.c.action.like("client_certificate.renewal%")
                    )
                )
            ).scalars()
            assert list(actions) == [
                "client_certificate.renewal_repeated",
                "client_certificate.renewal_refused",
                "client_certificate.renewal_refused",
            ]
