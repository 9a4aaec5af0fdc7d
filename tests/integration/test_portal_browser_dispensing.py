"""The portal's dispensing flow in a real browser (Debian Chromium, Playwright): the pharmacy's
client certificate, the pharmacist enrolled with a CDP virtual authenticator, the sample
dispensing result around the sandbox's signed prescription signed and verified, in English.
A world of its own: enrolling the pharmacist replaces the manifest's code that other tests use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_portal_browser import _context, _new_code
from tests.support.browser import chromium, virtual_authenticator
from tests.support.gateway import Server, own_world

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


@pytest.fixture(scope="module")
def world(tmp_path_factory: Any) -> Iterator[tuple[dict[str, Any], Server]]:
    with own_world(tmp_path_factory.mktemp("dispensing-world")) as w:
        yield w


@pytest.fixture(scope="module")
def browser(world: tuple[dict[str, Any], Server]) -> Iterator[Any]:
    with chromium(world[0]["server_ca"]) as b:
        yield b


def test_sign_a_dispensing_result_from_the_signed_prescription(
    browser: Any, world: tuple[dict[str, Any], Server], tmp_path: Path
) -> None:
    sandbox, gateway = world
    pharmacy = next(f for f in sandbox["facilities"] if f["kind"] == "pharmacy")
    origin = f"https://localhost:{gateway.port}"
    pharmacist = next(s for s in sandbox["signers"] if s["role"] == "Pharmacist")
    code, password = _new_code(sandbox, pharmacist["id"])
    context = _context(browser, gateway, pharmacy)
    try:
        page = context.new_page()
        virtual_authenticator(context, page)
        page.goto(f"{origin}/portal/enrol?lang=en")
        page.get_by_label("Enrolment code").fill(code)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Register").click()
        page.wait_for_selector("#status.ok, #status.error", timeout=20_000)
        assert page.get_attribute("#status", "class") == "ok", page.text_content("#status")

        # The sample dispensing result: the pharmacist's credential is chosen for it.
        page.goto(f"{origin}/portal/sign?sample=dispensing&level=AdES-B-T")
        assert page.input_value("select#credential") == pharmacist["credential_id"]
        page.get_by_role("button", name="Approve on the authenticator and sign").click()
        page.wait_for_selector("#sign-status[data-done]", timeout=30_000)
        assert page.get_attribute("#sign-status", "class") == "ok", page.text_content(
            "#sign-status"
        )
        with page.expect_download() as dl:
            page.click("#download-signed")
        signed = tmp_path / "dispensing.xml"
        dl.value.save_as(str(signed))
        xml = signed.read_bytes()
        assert b"DispensingDocument" in xml and b"PrescriptionDocument" in xml

        page.goto(f"{origin}/portal/verify")
        page.set_input_files("#verify-document", str(signed))
        page.get_by_role("button", name="Verify").click()
        page.wait_for_selector("#indication")
        assert page.text_content("#indication") == "TOTAL-PASSED"
        # Both signatures: the pharmacist's, and the doctor's on the prescription inside.
        signers = page.locator(".signer").all_text_contents()
        roles = page.locator(".role").all_text_contents()
        assert any("Jiro Chozai" in s for s in signers), signers
        assert any("Taro Shinsatsu" in s for s in signers), signers
        assert "Pharmacist" in " ".join(roles) and "Medical Doctor" in " ".join(roles), roles
        assert "B-T" in " ".join(page.locator(".level").all_text_contents())
    finally:
        context.close()
