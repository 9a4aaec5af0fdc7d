"""The printable password notice embeds its fonts, so it prints the same on any PC.

pdffonts (poppler) lists every font of the PDF with an ``emb`` column; pdftotext must read the
Japanese back from the embedded subsets alone.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.config import CertificateSettings
from gateway.errors import ConfigError
from gateway.lifecycle.certificates import ClientCertificateService
from gateway.lifecycle.notice import NoticeFonts, PasswordNotice, render_password_notice
from gateway.store.db import Database
from tests.support.lifecycle import make_settings

_NOTICE = PasswordNotice(
    service_name="hpki-gateway",
    facility_name="TEST 中央病院",
    institution_code="1310000011",
    provisional=True,
    terminal_label="受付端末1",
    serial_hex="0A1B2C3D",
    issued=datetime(2026, 1, 31, 3, 0, tzinfo=UTC),
    expires=datetime(2029, 4, 30, 14, 59, tzinfo=UTC),
    file_name="client.hpki-gateway.p12",
    download_expires=datetime(2026, 2, 14, 3, 0, tzinfo=UTC),
    p12_password="O0Il1-Zx9Q",
)


def _default_fonts() -> NoticeFonts:
    c = CertificateSettings()
    return NoticeFonts(
        mincho=c.notice_font_mincho, gothic=c.notice_font_gothic, mono=c.notice_font_mono
    )


def _run(tool: str, *args: str) -> str:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is not installed: run `make test` (scripts/bootstrap.sh)")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def test_every_font_of_the_notice_is_embedded(tmp_path: Path) -> None:
    pdf = tmp_path / "notice.pdf"
    pdf.write_bytes(render_password_notice(_NOTICE, _default_fonts()))
    lines = _run("pdffonts", str(pdf)).splitlines()
    header = lines[0].split()
    assert header[:1] == ["name"] and "emb" in header and lines[1].startswith("---")
    fonts = lines[2:]
    # Mincho, Gothic and the monospaced password font: three subsets, nothing left to the reader.
    assert len(fonts) == 3, lines
    for row in fonts:
        # Columns after the name: type (1-2 words), encoding, emb, sub, uni, object, ID.
        emb, sub, _uni = row.split()[-5:-2]
        assert (emb, sub) == ("yes", "yes"), row
    names = " ".join(row.split()[0] for row in fonts)
    assert "IPAexMincho" in names and "IPAexGothic" in names and "DejaVuSansMono-Bold" in names


def test_the_japanese_reads_back_from_the_embedded_subsets(tmp_path: Path) -> None:
    pdf = tmp_path / "notice.pdf"
    pdf.write_bytes(render_password_notice(_NOTICE, _default_fonts()))
    text = _run("pdftotext", "-layout", str(pdf), "-")
    for expected in (
        "クライアント証明書パスワード通知書",
        "TEST 中央病院 御中",
        "1310000011（仮コード）",
        "受付端末1",
        "2029年4月30日",
        "2026年2月14日",
        "O0Il1-Zx9Q",
    ):
        assert expected in text, expected


@pytest.mark.parametrize("role", ["mincho", "gothic", "mono"])
def test_a_missing_font_file_is_a_clear_configuration_error(tmp_path: Path, role: str) -> None:
    missing = tmp_path / f"no-{role}.ttf"
    fonts = replace(_default_fonts(), **{role: missing})
    with pytest.raises(ConfigError, match=rf"certificates\.notice_font_{role}: .*{missing}"):
        render_password_notice(_NOTICE, fonts)


async def test_a_gateway_that_issues_refuses_to_start_without_its_fonts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    missing = tmp_path / "gone.ttf"
    fonts = settings.certificates.model_copy(update={"notice_font_mono": missing})
    broken = settings.model_copy(update={"certificates": fonts})
    db = Database(broken.database_url())
    try:
        with pytest.raises(
            ConfigError, match=rf"certificates\.notice_font_mono: font file {missing}"
        ):
            ClientCertificateService(settings=broken, db=db, audit=AuditLog())
        # The same settings with the fonts in place build the service.
        service = ClientCertificateService(settings=settings, db=db, audit=AuditLog())
        assert service.notice_fonts().mono == settings.certificates.notice_font_mono
    finally:
        await db.close()
