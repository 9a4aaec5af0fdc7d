"""The verification report as a PDF (reportlab), in the portal's language.

The Japanese font is the one the password notice embeds (``certificates.notice_font_gothic``,
IPAex Gothic on Debian); a subset is embedded so the PDF reads the same on any PC.
"""

from __future__ import annotations

import io
from typing import Any

from gateway.config import Settings
from gateway.errors import ConfigError

__all__ = ["render"]


def _font(settings: Settings) -> str:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    path = settings.certificates.notice_font_gothic
    if not path.is_file():
        raise ConfigError(f"certificates.notice_font_gothic: font file {path} not found")
    name = f"PortalGothic-{abs(hash(str(path)))}"
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(name, str(path), subfontIndex=0))
    return name


def _lines(report: dict[str, Any], t: dict[str, str]) -> list[tuple[int, str]]:
    """(indent, text) lines of the report."""
    out: list[tuple[int, str]] = [
        (0, f"{t['indication']}: {report['indication']} {report.get('sub_indication') or ''}"),
        (1, report["indication_text"]),
    ]
    if report.get("sub_indication_text"):
        out.append((1, report["sub_indication_text"]))
    out += [(0, f"{t['reason']}: {report.get('reason') or ''}")]
    out += [(0, f"{t['format']}: {report.get('format')}")]
    if report.get("validation_time"):
        out.append((0, f"{t['validation_time']}: {report['validation_time']}"))
    for i, s in enumerate(report.get("signatures", []), 1):
        out.append((0, ""))
        out.append(
            (0, f"{t['signature_n']} {i}: {s['indication']} {s.get('sub_indication') or ''}")
        )
        out.append((1, s["indication_text"]))
        if s.get("sub_indication_text"):
            out.append((1, s["sub_indication_text"]))
        signer = s.get("signer") or {}
        rows = [
            ("reason", s.get("reason")),
            ("signer_subject", signer.get("subject")),
            ("signer_role", ", ".join(signer.get("hc_roles") or [])),
            ("signer_issuer", signer.get("issuer")),
            ("level_reached", s.get("level")),
            ("signing_time", s.get("signing_time")),
            ("best_signature_time", s.get("best_signature_time")),
            ("proven_by", s.get("proven_by")),
            ("chain", (s.get("chain") or {}).get("status")),
            ("revocation", (s.get("revocation") or {}).get("status")),
            ("location", s.get("location")),
        ]
        out += [(1, f"{t[k]}: {v}") for k, v in rows if v]
        for ref in s.get("signed_elements", []):
            out.append((1, f"{t['references']}: {ref}"))
        for note in s.get("notes", []):
            out.append((1, f"{t['notes']}: {note}"))
    return out


def _wrap(text: str, width: int) -> list[str]:
    # Japanese has no spaces to break at: cut by characters (a full-width one counts two).
    lines, line, used = [], "", 0
    for ch in text:
        w = 2 if ord(ch) > 0x2E7F else 1
        if used + w > width:
            lines.append(line)
            line, used = "", 0
        line += ch
        used += w
    lines.append(line)
    return lines


def render(report: dict[str, Any], t: dict[str, str], settings: Settings) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    font = _font(settings)
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4, invariant=True)
    c.setTitle(t["report_heading"])
    height = A4[1]
    y = height - 60
    c.setFont(font, 16)
    c.drawString(50, y, f"{t['title']}: {t['report_heading']}")
    y -= 30
    c.setFont(font, 9)
    for indent, text in _lines(report, t):
        for piece in _wrap(text, 100 - 4 * indent):
            if y < 50:
                c.showPage()
                c.setFont(font, 9)
                y = height - 50
            c.drawString(50 + 16 * indent, y, piece)
            y -= 13
    c.save()
    return buf.getvalue()
