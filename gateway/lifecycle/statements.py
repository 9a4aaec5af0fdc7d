"""Monthly statements (請求書) per facility: CSV and a Japanese PDF with embedded fonts.

A statement covers one closed calendar month in Japan (JST) and lists the fee ledger's entries
of that month (gateway/lifecycle/fees.py). Everything on it comes from the store and the month:
its number, its issue date (the first day of the next month) and its lines; so producing it
again gives the same CSV and the same PDF bytes (reportlab's invariant mode fixes the PDF's
creation date and id). The PDF embeds subsets of the password notice's IPAex fonts
(``certificates.notice_font_*``), so it prints the same on any PC.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any

from gateway.audit import AuditLog
from gateway.clock import JST, Clock, jst_date, system_clock
from gateway.config import Settings
from gateway.errors import InvalidRequest
from gateway.lifecycle import fees
from gateway.lifecycle.facilities import PAYMENT_METHODS, FacilityRegistry
from gateway.lifecycle.notice import NoticeFonts, _font
from gateway.store.db import Database

_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
KIND_TEXT = {"issuance": "発行・更新料", "postage": "郵送手数料"}
CSV_HEADER = [
    "請求書番号",
    "医療機関等コード",
    "対象月",
    "日付",
    "区分",
    "内容",
    "証明書シリアル番号",
    "金額（円）",
]


@dataclass(frozen=True, kw_only=True)
class StatementLine:
    date: str  # JST calendar date, ISO
    kind: str
    description: str
    serial: str
    amount_yen: int


@dataclass(frozen=True, kw_only=True)
class Statement:
    number: str
    institution_code: str
    facility_name: str
    recipient_name: str | None
    month: str
    issued: str
    payment_method: str
    payment_text: str
    issuer: str
    transfer_account: str | None
    lines: list[StatementLine]

    @property
    def total_yen(self) -> int:
        return sum(line.amount_yen for line in self.lines)

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_yen": self.total_yen}

    def csv_bytes(self) -> bytes:
        """UTF-8 with a byte order mark, so that spreadsheet software in Japan reads it."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(CSV_HEADER)
        for line in self.lines:
            w.writerow(
                [
                    self.number,
                    self.institution_code,
                    self.month,
                    line.date,
                    KIND_TEXT[line.kind],
                    line.description,
                    line.serial,
                    line.amount_yen,
                ]
            )
        w.writerow(
            [self.number, self.institution_code, self.month, "", "合計", "", "", self.total_yen]
        )
        return buf.getvalue().encode("utf-8-sig")


def month_bounds(month: str) -> tuple[datetime, datetime]:
    m = _MONTH.fullmatch(month or "")
    # Years end at 9998: the end of 9999-12 (10000-01-01) is past what datetime can hold.
    if m is None or not 1 <= int(m.group(2)) <= 12 or not 2000 <= int(m.group(1)) <= 9998:
        raise InvalidRequest(f"month {month!r} is not YYYY-MM (2000-01 to 9998-12)")
    y, mo = int(m.group(1)), int(m.group(2))
    start = datetime(y, mo, 1, tzinfo=JST)
    end = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=JST)
    return start, end


class StatementService:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        audit: AuditLog,
        registry: FacilityRegistry,
        clock: Clock = system_clock,
    ) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit
        self.registry = registry
        self.clock = clock

    async def statement(self, institution_code: str, month: str, *, actor: str) -> Statement:
        """The statement of a closed month (audited); an open month is refused, since its
        lines could still change."""
        start, end = month_bounds(month)
        now = self.clock()
        if end > now:
            raise InvalidRequest(
                f"month {month} is not over yet (until {jst_date(end - timedelta(seconds=1))}): "
                "statements are made for closed months"
            )
        async with self.db.write() as conn:
            fac = await self.registry.get_in(conn, institution_code)
            rows = await fees.entries_in(conn, fac.id, start, end)
            await self.audit.append(
                conn,
                action="statement.produce",
                actor=actor,
                facility_code=fac.institution_code,
                detail={"month": month, "entries": len(rows)},
                now=now,
            )
        method = fac.payment_method or "transfer"
        issued: date = end.date()
        return Statement(
            number=f"{fac.institution_code}-{month.replace('-', '')}",
            institution_code=fac.institution_code,
            facility_name=fac.name,
            recipient_name=fac.recipient_name,
            month=month,
            issued=issued.isoformat(),
            payment_method=method,
            payment_text=PAYMENT_METHODS[method],
            issuer=self.settings.fees.issuer_name or self.settings.service.name,
            transfer_account=self.settings.fees.transfer_account if method == "transfer" else None,
            lines=[
                StatementLine(
                    date=jst_date(r.occurred_at).isoformat(),
                    kind=r.kind,
                    description=r.description,
                    serial=r.certificate_serial,
                    amount_yen=r.amount_yen,
                )
                for r in rows
            ],
        )

    def fonts(self) -> NoticeFonts:
        c = self.settings.certificates
        return NoticeFonts(
            mincho=c.notice_font_mincho, gothic=c.notice_font_gothic, mono=c.notice_font_mono
        )

    async def pdf(self, st: Statement) -> bytes:
        return await asyncio.to_thread(render_statement, st, self.fonts())


def _jp(d: str) -> str:
    y, m, dd = (int(x) for x in d.split("-"))
    return f"{y}年{m}月{dd}日"


def render_statement(st: Statement, fonts: NoticeFonts) -> bytes:
    """A4 請求書, fonts embedded as subsets; identical bytes for identical statements."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.pdfgen import canvas

    fonts.check()
    mincho, gothic = _font(fonts.mincho), _font(fonts.gothic)
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4, initialFontName=mincho, invariant=1)
    c.setTitle(f"請求書 {st.number}")
    c.setAuthor(st.issuer)
    width, height = A4
    left = 20 * mm
    y = height - 25 * mm
    c.setFont(gothic, 20)
    c.drawCentredString(width / 2, y, "請求書")
    y -= 14 * mm
    c.setFont(mincho, 11)
    addressee = f"{st.facility_name} 御中"
    c.drawString(left, y, addressee)
    c.setFont(mincho, 9)
    c.drawRightString(width - left, y, f"請求書番号 {st.number}")
    y -= 6 * mm
    if st.recipient_name:
        c.drawString(left, y, f"ご担当 {st.recipient_name} 様")
    c.drawRightString(width - left, y, f"発行日 {_jp(st.issued)}")
    y -= 6 * mm
    c.drawString(left, y, f"医療機関等コード {st.institution_code}")
    c.drawRightString(width - left, y, st.issuer)
    y -= 12 * mm
    y_, m_ = st.month.split("-")
    c.setFont(mincho, 10)
    c.drawString(
        left,
        y,
        f"{int(y_)}年{int(m_)}月分のクライアント証明書に係る費用を下記のとおりご請求します。",
    )
    y -= 12 * mm
    c.setFont(gothic, 14)
    c.drawString(left, y, f"ご請求金額　{st.total_yen:,} 円（税込）")
    y -= 12 * mm
    cols = [left, left + 28 * mm, left + 60 * mm, left + 130 * mm]
    c.setFont(gothic, 9)
    for x, head in zip(cols, ["日付", "区分", "内容", "証明書シリアル番号"], strict=True):
        c.drawString(x, y, head)
    c.drawRightString(width - left, y, "金額（円）")
    y -= 2 * mm
    c.line(left, y, width - left, y)
    y -= 6 * mm
    c.setFont(mincho, 8.5)
    for line in st.lines:
        if y < 50 * mm:
            c.showPage()
            c.setFont(mincho, 8.5)
            y = height - 25 * mm
        c.drawString(cols[0], y, _jp(line.date))
        c.drawString(cols[1], y, KIND_TEXT[line.kind])
        c.drawString(cols[2], y, line.description)
        c.drawString(cols[3], y, line.serial[:24])
        c.drawRightString(width - left, y, f"{line.amount_yen:,}")
        y -= 6 * mm
    if not st.lines:
        c.drawString(cols[0], y, "当月のご請求はありません。")
        y -= 6 * mm
    c.line(left, y + 3 * mm, width - left, y + 3 * mm)
    c.setFont(gothic, 10)
    c.drawString(cols[2], y - 2 * mm, "合計")
    c.drawRightString(width - left, y - 2 * mm, f"{st.total_yen:,}")
    y -= 16 * mm
    c.setFont(gothic, 10)
    c.drawString(left, y, f"お支払方法：{st.payment_text}")
    y -= 6 * mm
    c.setFont(mincho, 9)
    if st.payment_method == "deduction":
        c.drawString(
            left, y, "ご請求金額は、支払基金からのお支払額と相殺いたします（お振込は不要です）。"
        )
    else:
        c.drawString(left, y, "下記口座へお振込みください（振込手数料はご負担ください）。")
        if st.transfer_account:
            y -= 6 * mm
            c.drawString(left, y, f"振込先：{st.transfer_account}")
    y -= 10 * mm
    c.setFont(mincho, 8)
    c.drawString(
        left,
        y,
        "発行・更新料は証明書1枚ごと。期限切れ後の新規発行・パスワード通知書紛失時は郵送手数料がかかります。",
    )
    c.showPage()
    c.save()
    return buf.getvalue()
