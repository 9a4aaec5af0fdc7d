"""The printable password notice (パスワード通知書): a one-page Japanese PDF.

The source documents deliver a client certificate in two halves that never travel together:
the file (behind a download link with its own download password, by mail) and the PKCS#12
password (on paper, by post, to the facility's own address). This module makes the paper half.
Fonts: a subset of each TrueType font is embedded (IPAex Mincho and Gothic for the Japanese, a
monospaced bold with a slashed zero for the password so that look-alike characters stay apart),
so the notice prints the same on any PC whatever fonts it has; reportlab's built-in CID fonts
are not embedded and would leave the glyphs to the reader's machine. The paths are settings
(``certificates.notice_font_*``); a missing file stops the rendering with a :class:`ConfigError`
naming the setting, before anything is written.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.clock import jst_date
from gateway.errors import ConfigError

# reportlab is imported when a notice is rendered, not when the gateway starts: it costs ~0.1 s
# of start-up per worker, and most workers never render a notice.


@dataclass(frozen=True, kw_only=True)
class NoticeFonts:
    """The TrueType files the notice embeds (subsets), named like their settings."""

    mincho: Path
    gothic: Path
    mono: Path

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first font file that is not there."""
        for role, path in (("mincho", self.mincho), ("gothic", self.gothic), ("mono", self.mono)):
            if not path.is_file():
                raise ConfigError(
                    f"certificates.notice_font_{role}: font file {path} not found (the password "
                    "notice embeds it; on Debian install fonts-ipaexfont and fonts-dejavu-core, "
                    "or point the setting at another TrueType font)"
                )


# reportlab registers fonts process-wide by name; the name carries the path so that two
# settings with different files never share a registration.
# Notices are rendered in worker threads, hence the lock.
_registered: dict[Path, str] = {}
_lock = threading.Lock()


def _font(path: Path) -> str:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    with _lock:
        name = _registered.get(path)
        if name is None:
            name = f"notice-{len(_registered)}-{path.stem}"
            # subfontIndex 0: .ttc collections work too; TTFont embeds only the glyphs used.
            pdfmetrics.registerFont(TTFont(name, str(path), subfontIndex=0))
            _registered[path] = name
        return name


def jp_date(when: datetime) -> str:
    d = jst_date(when)
    return f"{d.year}年{d.month}月{d.day}日"


@dataclass(frozen=True, kw_only=True)
class PasswordNotice:
    service_name: str
    facility_name: str
    institution_code: str
    provisional: bool
    terminal_label: str | None
    serial_hex: str
    issued: datetime
    expires: datetime
    file_name: str
    download_expires: datetime | None
    p12_password: str
    recipient_name: str | None = None


def render_password_notice(n: PasswordNotice, fonts: NoticeFonts) -> bytes:
    """The notice as PDF bytes (A4, one page), every font embedded as a subset."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.pdfgen import canvas

    fonts.check()
    mincho, gothic, mono = _font(fonts.mincho), _font(fonts.gothic), _font(fonts.mono)
    buf = io.BytesIO()
    # The initial font too: reportlab's default (Helvetica) would be a non-embedded reference.
    c = canvas.Canvas(buf, pagesize=A4, initialFontName=mincho)
    c.setTitle(f"クライアント証明書パスワード通知書 {n.serial_hex}")
    c.setAuthor(n.service_name)
    width, height = A4
    left = 25 * mm
    y = height - 30 * mm

    c.setFont(mincho, 10)
    c.drawString(
        left,
        y,
        f"{n.facility_name} {n.recipient_name} 様"
        if n.recipient_name
        else f"{n.facility_name} 御中",
    )
    c.drawRightString(width - left, y, f"発行日 {jp_date(n.issued)}")
    y -= 16 * mm
    c.setFont(gothic, 18)
    c.drawCentredString(width / 2, y, "クライアント証明書パスワード通知書")
    y -= 8 * mm
    c.setFont(mincho, 10)
    c.drawCentredString(width / 2, y, f"{n.service_name} への接続のためのクライアント証明書")
    y -= 14 * mm

    code = n.institution_code + ("（仮コード）" if n.provisional else "")
    rows = [
        ("医療機関・薬局名称", n.facility_name),
        ("医療機関等コード", code),
        ("端末名称", n.terminal_label or "－（施設で1枚）"),
        ("証明書シリアル番号", n.serial_hex),
        ("証明書有効期間", f"{jp_date(n.issued)} ～ {jp_date(n.expires)}"),
        ("証明書ファイル名", n.file_name),
    ]
    if n.download_expires is not None:
        rows.append(("ダウンロード有効期限", jp_date(n.download_expires)))
    c.setLineWidth(0.5)
    row_h = 9 * mm
    col = left + 48 * mm
    for label, value in rows:
        c.rect(left, y - row_h + 3 * mm, width - 2 * left, row_h)
        c.setFont(gothic, 10)
        c.drawString(left + 3 * mm, y - 3 * mm, label)
        c.setFont(mincho, 10)
        c.drawString(col, y - 3 * mm, value)
        y -= row_h
    y -= 10 * mm
    c.setFont(gothic, 12)
    c.drawString(left, y, "クライアント証明書パスワード")
    y -= 12 * mm
    c.setLineWidth(1.2)
    c.rect(left, y - 4 * mm, width - 2 * left, 14 * mm)
    c.setFont(mono, 20)
    c.drawCentredString(width / 2, y, n.p12_password)
    y -= 16 * mm

    notes = [
        "・このパスワードは、証明書ファイル（.p12）を端末やシステムに設定するときに使います。",
        "・ダウンロード用のパスワードではありません。ダウンロード用パスワードは別のメールでお知らせします。",
        "・証明書ファイルと本通知書が揃いましたら、システムベンダー様へお渡しください。",
        "・本通知書を紛失した場合は、証明書の再発行（再申請）が必要です。大切に保管してください。",
        "・証明書ファイルはUSBメモリ等にバックアップしてください（有効期限内のものだけが使えます）。",
        "・有効期限の90・60・30・15日前、7日前からは毎日、期限切れ時にお知らせします。期限内に更新してください。",
        "・ダウンロード期限が切れた場合は再送をご依頼ください（新たに14日間有効になります）。",
    ]
    c.setFont(mincho, 9)
    for line in notes:
        c.drawString(left, y, line)
        y -= 6 * mm
    y -= 4 * mm
    c.setFont(gothic, 7)
    c.drawString(
        left,
        y,
        f"Client certificate password notice - serial {n.serial_hex} - keep it apart from the "
        "certificate file.",
    )
    c.showPage()
    c.save()
    return buf.getvalue()
