"""Fees and monthly statements, and the reminders that point at the way out.

One facility goes through every kind of chargeable (and free) event in November 2026 (JST),
with an injected clock and the real lifecycle, store and facility CA: a new issuance after the
old certificate expired (fee + postage, at 00:30 JST on 1 November, so the month is counted in
Japan's calendar), a renewal by its own system over EST (fee), a reissue after a lost password
notice (fee + postage), a renewal in time (fee), a re-send (free) and the stop (free). The
statement is checked line by line, as CSV and as the PDF poppler reads, with every font
embedded; made twice it is the same bytes.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit import AuditLog
from gateway.errors import InvalidRequest
from gateway.lifecycle.scheduler import Scheduler
from gateway.lifecycle.statements import StatementService
from tests.support.lifecycle import FakeClock, make_settings, services

CODE = "1312345678"


def _settings(tmp: Path):  # type: ignore[no-untyped-def]
    s = make_settings(tmp)
    return s.model_copy(
        update={
            # two-month certificates, so that expiry and the renewal window fit in a test month
            "certificates": s.certificates.model_copy(update={"validity_months": 2}),
            "fees": s.fees.model_copy(update={"transfer_account": "テスト銀行 本店 普通 1234567"}),
        }
    )


def _tool(*args: str) -> str:
    """A poppler tool's output (fails if the tool is missing)."""
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


def csr_for(cert_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(cert.subject)
        .sign(key, hashes.SHA256())
    )
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


async def test_a_month_with_every_kind_of_event_line_by_line(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    clock = FakeClock(datetime(2026, 8, 1, 1, 0, tzinfo=UTC))
    async with services(settings, clock) as s:
        await s.registry.add(
            institution_code=CODE,
            name="TEST 南薬局",
            kind="clinic",
            contact_email="office@south.test.invalid",
            recipient_name="薬剤 次郎",
            actor="t",
        )
        await s.registry.set_policy(CODE, payment_method="deduction", actor="t")
        await s.certs.issue(CODE, actor="t", hand_over_dir=tmp_path / "aug")  # August
        clock.set(datetime(2026, 10, 31, 15, 30, tzinfo=UTC))  # 2026-11-01 00:30 JST
        first = await s.certs.issue(CODE, actor="t", hand_over_dir=tmp_path / "nov")
        clock.set(datetime(2026, 11, 10, 3, 0, tzinfo=UTC))
        new, _ = await s.certs.renew_from_request(
            first.serial,
            csr_for((tmp_path / "nov" / "client.pem").read_bytes()),
            actor=f"facility:{CODE}",
            facility_code=CODE,
        )
        clock.set(datetime(2026, 11, 12, 3, 0, tzinfo=UTC))
        lost = await s.certs.rotate(
            CODE, actor="t", reason="パスワード通知書紛失", postage="notice_lost"
        )
        clock.set(datetime(2026, 11, 14, 3, 0, tzinfo=UTC))
        in_time = await s.certs.rotate(CODE, serial=lost.serial, actor="t")
        clock.set(datetime(2026, 11, 16, 3, 0, tzinfo=UTC))
        await s.certs.resend(in_time.serial, actor="t")
        clock.set(datetime(2026, 11, 20, 3, 0, tzinfo=UTC))
        await s.certs.stop_service(CODE, reason="閉局", actor="t")
        clock.set(datetime(2026, 11, 30, 14, 59, tzinfo=UTC))  # 23:59 JST, the month still open

        audit = AuditLog()
        stm = StatementService(
            settings=settings, db=s.db, audit=audit, registry=s.registry, clock=clock
        )
        with pytest.raises(InvalidRequest, match="not over yet"):
            await stm.statement(CODE, "2026-11", actor="t")
        clock.set(datetime(2026, 12, 2, tzinfo=UTC))
        st = await stm.statement(CODE, "2026-11", actor="t")
        est_serial = format(new.serial_number, "x")
        assert [
            (ln.date, ln.kind, ln.description, ln.serial, ln.amount_yen) for ln in st.lines
        ] == [
            ("2026-11-01", "issuance", "クライアント証明書発行", first.serial, 1500),
            ("2026-11-01", "postage", "郵送手数料（有効期限切れ後の新規発行）", first.serial, 753),
            ("2026-11-10", "issuance", "クライアント証明書更新（自動更新）", est_serial, 1500),
            ("2026-11-12", "issuance", "クライアント証明書再発行", lost.serial, 1500),
            (
                "2026-11-12",
                "postage",
                "郵送手数料（パスワード通知書紛失による再発行）",
                lost.serial,
                753,
            ),
            ("2026-11-14", "issuance", "クライアント証明書更新", in_time.serial, 1500),
        ]
        assert st.total_yen == 4 * 1500 + 2 * 753 == 7506
        assert st.number == f"{CODE}-202611" and st.issued == "2026-12-01"
        assert st.payment_method == "deduction"

        rows = list(csv.reader(io.StringIO(st.csv_bytes().decode("utf-8-sig"))))
        assert rows[0][:4] == ["請求書番号", "医療機関等コード", "対象月", "日付"]
        assert rows[1] == [
            f"{CODE}-202611",
            CODE,
            "2026-11",
            "2026-11-01",
            "発行・更新料",
            "クライアント証明書発行",
            first.serial,
            "1500",
        ]
        assert [r[-1] for r in rows[1:]] == ["1500", "753", "1500", "1500", "753", "1500", "7506"]
        assert rows[-1][4] == "合計"

        pdf = await stm.pdf(st)
        (tmp_path / "st.pdf").write_bytes(pdf)
        text = await asyncio.to_thread(_tool, "pdftotext", "-layout", str(tmp_path / "st.pdf"), "-")
        assert "請求書" in text and "TEST 南薬局 御中" in text and "薬剤 次郎 様" in text
        assert "2026年11月分" in text and "7,506 円" in text
        assert "支払基金からの支払額との相殺" in text
        assert "振込先" not in text  # deduction: no transfer account
        for ln in st.lines:
            assert ln.serial[:24] in text
        # The amounts, counted apart from the certificate serials (hex: one may contain "753").
        amounts = re.sub(r"[0-9a-f]{16,}", " ", text)
        assert len(re.findall(r"(?<![\d,])1,500(?![\d,])", amounts)) == 4
        assert len(re.findall(r"(?<![\d,])753(?![\d,])", amounts)) == 2
        fonts = (await asyncio.to_thread(_tool, "pdffonts", str(tmp_path / "st.pdf"))).splitlines()[
            2:
        ]
        assert fonts and all(line.split()[-5] == "yes" for line in fonts), fonts

        # The same statement again, from fresh services: the same bytes, and events of a
        # later month (December) do not touch it.
        stm2 = StatementService(
            settings=settings, db=s.db, audit=audit, registry=s.registry, clock=clock
        )
        again = await stm2.statement(CODE, "2026-11", actor="t")
        assert again.csv_bytes() == st.csv_bytes()
        assert await stm2.pdf(again) == pdf
        august = await stm2.statement(CODE, "2026-08", actor="t")
        assert [(ln.kind, ln.amount_yen) for ln in august.lines] == [("issuance", 1500)]
        october = await stm2.statement(CODE, "2026-10", actor="t")
        assert october.lines == [] and october.total_yen == 0
        await s.registry.set_policy(CODE, payment_method="transfer", actor="t")
        tr = await stm2.statement(CODE, "2026-10", actor="t")
        (tmp_path / "tr.pdf").write_bytes(await stm2.pdf(tr))
        text = await asyncio.to_thread(_tool, "pdftotext", "-layout", str(tmp_path / "tr.pdf"), "-")
        assert "銀行振込" in text and "テスト銀行 本店 普通 1234567" in text
        assert "当月のご請求はありません" in text


async def test_reminders_say_renewal_is_automatic_or_how_to_apply(tmp_path: Path) -> None:
    s0 = make_settings(tmp_path)
    settings = s0.model_copy(
        update={"certificates": s0.certificates.model_copy(update={"renewal_window_days": 30})}
    )
    clock = FakeClock(datetime(2026, 1, 5, 1, 0, tzinfo=UTC))
    async with services(settings, clock) as s:
        for code, auto in (("1312000001", True), ("1312000002", False)):
            await s.registry.add(
                institution_code=code,
                name=f"TEST {code}",
                kind="clinic",
                contact_email=f"o{code}@test.invalid",
                actor="t",
            )
            if auto:
                await s.registry.set_policy(code, auto_renewal=True, actor="t")
            await s.certs.issue(code, actor="t", hand_over_dir=tmp_path / code)
        # Expiry 2029-04-05 (39 months): 5 January is 90 days before, the first reminder.
        clock.set(datetime(2029, 1, 5, 1, 0, tzinfo=UTC))
        report = await Scheduler(service=s.certs).run_once()
        assert {r["institution_code"] for r in report.reminders} == {"1312000001", "1312000002"}
        from sqlalchemy import select

        from gateway.store.schema import notification

        async with s.db.read() as conn:
            rows = {r.recipient: r for r in (await conn.execute(select(notification))).all()}
    auto = rows["o1312000001@test.invalid"].body
    manual = rows["o1312000002@test.invalid"].body
    assert "自動で更新します" in auto and "お申し込みは不要" in auto
    assert "2029年3月6日（有効期限の30日前）以降の最初の実行" in auto
    assert "再申請" not in auto
    assert "再申請" in manual and "備考" in manual and "hpki-gateway client renew" in manual
    assert "自動で更新します" not in manual
