"""The portal in a real browser: Debian Chromium driven by Playwright, the facility client
certificate presented by the browser, a CDP virtual authenticator for WebAuthn.

Every page in Japanese and English (``lang``, one ``h1``, every field labelled), the whole
enrol → sign → verify flow in Japanese, and no page without a client certificate. Screenshots
go to ``$HPKI_PORTAL_SCREENSHOTS`` when set (docs/images/ is made that way: docs/sandbox.md).
Chromium missing = failure, not skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import chromium, facility_context, virtual_authenticator
from tests.support.gateway import Server
from tests.support.signing import services

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

PAGES = ["status", "enrol", "enrol/mynumber", "sign", "verify", "downloads", "scenarios", "api"]
UNLABELLED = """() => [...document.querySelectorAll(
    'input:not([type=hidden]), select, textarea')]
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
  .map((el) => el.id || el.name)"""


def _shots(tmp: Path, name: str) -> Path:
    return tmp / f"portal-{name}.png"


def _publish(shot: Path) -> None:
    target = os.environ.get("HPKI_PORTAL_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


@pytest.fixture(scope="module")
def browser(sandbox: dict[str, Any]) -> Iterator[Any]:
    with chromium(sandbox["server_ca"]) as b:
        yield b


def _context(browser: Any, gateway: Server, holder: dict[str, Any] | None) -> Any:
    return facility_context(browser, gateway.port, holder)


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_every_page_in_both_languages(
    browser: Any, gateway: Server, hospital: dict[str, Any], lang: str, tmp_path: Path
) -> None:
    origin = f"https://localhost:{gateway.port}"
    context = _context(browser, gateway, hospital)
    try:
        page = context.new_page()
        page.goto(f"{origin}/portal/status?lang={lang}")
        for name in PAGES:
            # The first visit set the cookie: the language stays without ?lang.
            page.goto(f"{origin}/portal/{name}")
            if name == "api":
                page.wait_for_selector("#swagger-ui .opblock", timeout=20_000)
            assert page.get_attribute("html", "lang") == lang, name
            assert page.locator("h1").count() == 1, name
            assert (page.text_content("h1") or "").strip(), name
            assert page.locator("nav[aria-label]").count() == 1
            assert page.evaluate(UNLABELLED) == [], name
            shot = _shots(tmp_path, f"{name.replace('/', '-')}-{lang}")
            page.screenshot(path=str(shot), full_page=True)
            _publish(shot)
        heading = page.text_content("h1")
        assert heading == ("API 仕様 (OpenAPI 3.1)" if lang == "ja" else "API (OpenAPI 3.1)")
    finally:
        context.close()


def _new_code(sandbox: dict[str, Any], signer_id: str) -> tuple[str, str]:
    async def issue() -> tuple[str, str]:
        async with services(sandbox["config"]) as svc:
            issued = await svc.fido2.issue_enrollment(signer_id, actor="test")
            return issued.code, issued.password

    # Playwright's sync API runs its own loop in this thread: issue from another one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, issue()).result()


def test_enrol_sign_and_verify_in_japanese(
    browser: Any,
    gateway: Server,
    sandbox: dict[str, Any],
    hospital: dict[str, Any],
    tmp_path: Path,
) -> None:
    origin = f"https://localhost:{gateway.port}"
    signer = [s for s in sandbox["signers"] if s["role"] == "Medical Doctor"][1]
    code, password = _new_code(sandbox, signer["id"])
    context = _context(browser, gateway, hospital)
    try:
        page = context.new_page()
        virtual_authenticator(context, page)
        # Enrol.
        page.goto(f"{origin}/portal/enrol?lang=ja")
        page.get_by_label("登録コード").fill(code)
        page.get_by_label("パスワード").fill(password)
        page.get_by_label("この認証器の名前（任意）").fill("ポータルの仮想認証器")
        page.get_by_role("button", name="登録する").click()
        page.wait_for_selector("#status.ok, #status.error", timeout=20_000)
        assert (page.text_content("#status") or "").startswith("登録しました: ")

        # Sign the sample prescription at B-T.
        page.goto(
            f"{origin}/portal/sign?sample=prescription&credential={signer['credential_id']}"
            "&level=AdES-B-T"
        )
        assert "試験　花子" in (page.text_content("#preview") or "")
        page.get_by_role("button", name="認証器で承認して署名する").click()
        page.wait_for_selector("#sign-status[data-done]", timeout=30_000)
        assert page.get_attribute("#sign-status", "class") == "ok", page.text_content(
            "#sign-status"
        )
        shot = _shots(tmp_path, "sign-done-ja")
        page.screenshot(path=str(shot), full_page=True)
        _publish(shot)
        with page.expect_download() as dl:
            page.click("#download-signed")
        signed = tmp_path / "signed.xml"
        dl.value.save_as(str(signed))
        assert b"PrescriptionDocument" in signed.read_bytes()

        # Verify what was just signed: a readable report, then its PDF.
        page.goto(f"{origin}/portal/verify")
        page.set_input_files("#verify-document", str(signed))
        page.get_by_role("button", name="検証する").click()
        page.wait_for_selector("#indication")
        assert page.text_content("#indication") == "TOTAL-PASSED"
        assert page.text_content("#indication-text") == "署名は有効です。"
        assert "B-T" in (page.text_content(".level") or "")
        assert "Hanako Geka" in (page.text_content(".signer") or "")
        shot = _shots(tmp_path, "verify-report-ja")
        page.screenshot(path=str(shot), full_page=True)
        _publish(shot)
        with page.expect_download() as dl:
            page.click("#download-pdf")
        pdf = tmp_path / "report.pdf"
        dl.value.save_as(str(pdf))
        assert pdf.read_bytes().startswith(b"%PDF")

        # A deliberately broken sample: its sub-indication, in words.
        with page.expect_download() as dl:
            page.goto(f"{origin}/portal/downloads")
            page.click('a[href="/portal/downloads/prescription-AdES-B-B-broken.xml"]')
        broken = tmp_path / "broken.xml"
        dl.value.save_as(str(broken))
        page.goto(f"{origin}/portal/verify")
        page.set_input_files("#verify-document", str(broken))
        page.get_by_role("button", name="検証する").click()
        page.wait_for_selector("#sub-indication")
        assert page.text_content("#sub-indication") == "HASH_FAILURE"
        assert (
            page.text_content("#sub-indication-text")
            == "署名対象の内容が署名後に変更されています。"
        )

        # A scenario switched on in the portal: the TSA is down, signing at B-T answers the
        # documented error; the reset brings the TSA back.
        page.goto(f"{origin}/portal/scenarios")
        page.click("#on-tsa_down")
        assert "有効" in (page.text_content("#scenario-tsa_down .state") or "")
        shot = _shots(tmp_path, "scenarios-on-ja")
        page.screenshot(path=str(shot), full_page=True)
        _publish(shot)
        try:
            page.goto(
                f"{origin}/portal/sign?sample=prescription&credential={signer['credential_id']}"
                "&level=AdES-B-T"
            )
            page.get_by_role("button", name="認証器で承認して署名する").click()
            page.wait_for_selector("#sign-status[data-done]", timeout=30_000)
            status = page.text_content("#sign-status") or ""
            assert page.get_attribute("#sign-status", "class") == "error", status
            assert "tsa_unavailable" in status and "nothing was signed" in status
        finally:
            page.goto(f"{origin}/portal/scenarios")
            page.click("#reset")
        assert "有効" not in (page.text_content("#scenario-tsa_down .state") or "")
    finally:
        context.close()


def test_no_page_without_a_client_certificate(
    browser: Any, gateway: Server, hospital: dict[str, Any]
) -> None:
    """Without a client certificate the gateway serves no page: the TLS handshake is refused.

    The browser here takes any server certificate (``ignore_https_errors``), so the only thing
    that can stop it is the missing client certificate. A browser that does not trust the
    sandbox's server CA would fail with ERR_CERT_AUTHORITY_INVALID before the gateway had any
    say, and the test would pass whatever the gateway did. The control: the same pages with
    the hospital's certificate load."""
    from playwright.sync_api import Error

    origin = f"https://localhost:{gateway.port}"
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        for name in PAGES:
            with pytest.raises(Error) as refused:
                page.goto(f"{origin}/portal/{name}")
            text = str(refused.value)
            assert "net::ERR_" in text and "ERR_CERT_" not in text, text
    finally:
        context.close()
    control = _context(browser, gateway, hospital)
    try:
        page = control.new_page()
        for name in PAGES:
            response = page.goto(f"{origin}/portal/{name}")
            assert response is not None and response.status == 200, name
    finally:
        control.close()
