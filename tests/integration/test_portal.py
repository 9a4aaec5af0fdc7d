"""The portal over real mTLS: pages in both languages, verification reports (HTML, JSON, PDF),
the downloads, and the form guard. The browser flows are in test_portal_browser.py."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Response, Server, client_context, request

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

PAGES = ["/portal/status", "/portal/enrol", "/portal/sign", "/portal/verify", "/portal/downloads"]
HEADINGS = {
    "ja": ["<h1>接続状態</h1>", "<h1>認証器の登録 (FIDO2)</h1>", "<h1>署名</h1>",
           "<h1>署名の検証</h1>", "<h1>ダウンロード</h1>"],
    "en": ["<h1>Status</h1>", "<h1>Enrol an authenticator (FIDO2)</h1>", "<h1>Sign</h1>",
           "<h1>Verify a signature</h1>", "<h1>Downloads</h1>"],
}  # fmt: skip


def multipart(fields: dict[str, str | tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "----portal" + secrets.token_hex(8)
    out = b""
    for name, value in fields.items():
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data = value
            out += (
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode() + data
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def post_form(
    gateway: Server, ctx: Any, path: str, fields: dict[str, Any], origin: str | None = "own"
) -> Response:
    body, ctype = multipart(fields)
    headers = {"Content-Type": ctype}
    if origin == "own":
        headers["Origin"] = f"https://localhost:{gateway.port}"
    elif origin is not None:
        headers["Origin"] = origin
    return request(gateway.port, "POST", path, ctx=ctx, body=body, headers=headers)


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_every_page_in_both_languages(gateway: Server, hospital_ctx: Any, lang: str) -> None:
    for page, heading in zip(PAGES, HEADINGS[lang], strict=True):
        r = request(gateway.port, "GET", f"{page}?lang={lang}", ctx=hospital_ctx)
        html = r.body.decode()
        assert r.status == 200, (page, html[:300])
        assert f'<html lang="{lang}">' in html
        assert heading in html, page
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert f"portal_lang={lang}" in r.headers["set-cookie"]


def test_the_language_is_remembered_in_a_cookie(gateway: Server, hospital_ctx: Any) -> None:
    r = request(
        gateway.port,
        "GET",
        "/portal/status",
        ctx=hospital_ctx,
        headers={"Cookie": "portal_lang=en"},
    )
    assert '<html lang="en">' in r.body.decode()
    r = request(gateway.port, "GET", "/portal/status", ctx=hospital_ctx)
    assert '<html lang="ja">' in r.body.decode()  # Japanese first


def test_status_names_the_facility_its_signers_and_the_tsa(
    gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any], hospital: dict[str, Any]
) -> None:
    html = request(gateway.port, "GET", "/portal/status", ctx=hospital_ctx).body.decode()
    assert hospital["institution_code"] in html
    doctor = next(s for s in sandbox["signers"] if s["role"] == "Medical Doctor")
    assert doctor["credential_id"] in html
    assert sandbox["tsa_url"] in html
    assert 'id="hsm-state" class="ok"' in html


def test_a_sample_shows_its_hash_and_the_binding_the_authenticator_approves(
    gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any]
) -> None:
    import hashlib

    from gateway.sign.samples import PRESCRIPTION_CSV

    doctor = next(s for s in sandbox["signers"] if s["role"] == "Medical Doctor")
    r = request(
        gateway.port,
        "GET",
        f"/portal/sign?sample=prescription&credential={doctor['credential_id']}",
        ctx=hospital_ctx,
    )
    html = r.body.decode()
    digest = hashlib.sha256(PRESCRIPTION_CSV).digest()
    assert digest.hex() in html
    canonical = json.dumps(
        {
            "credentialID": doctor["credential_id"],
            "hashAlgorithmOID": "2.16.840.1.101.3.4.2.1",
            "hashes": [base64.b64encode(digest).decode()],
            "numSignatures": 1,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    expected = base64.b64encode(hashlib.sha256(canonical.encode()).digest()).decode()
    assert f'<code id="binding">{expected}</code>' in html
    assert "試験　花子" in html  # the CSV is shown as text


def test_verify_a_sample_as_html_json_and_pdf(
    gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    doc = Path(sandbox["samples"]["prescription"]["AdES-B-T"]).read_bytes()
    r = post_form(gateway, hospital_ctx, "/portal/verify?lang=ja", {"document": ("rx.xml", doc)})
    html = r.body.decode()
    assert r.status == 200, html[:400]
    assert 'id="indication" class="ind-TOTAL-PASSED">TOTAL-PASSED' in html
    assert "署名は有効です。" in html
    assert 'class="role">Medical Doctor' in html
    assert "B-T (ES-T)" in html
    assert "/Document/Prescription/PrescriptionDocument" in html

    fields = {"document_b64": base64.b64encode(doc).decode(), "output": "json"}
    r = post_form(gateway, hospital_ctx, "/portal/verify", fields)
    assert r.status == 200
    assert "attachment" in r.headers["content-disposition"]
    assert r.json()["indication"] == "TOTAL-PASSED"

    fields["output"] = "pdf"
    r = post_form(gateway, hospital_ctx, "/portal/verify?lang=ja", fields)
    assert r.status == 200 and r.body.startswith(b"%PDF")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(r.body)
    text = subprocess.run(
        ["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "TOTAL-PASSED" in text and "署名は有効です。" in text and "到達レベル: B-T" in text


def test_verify_a_detached_cms_with_its_content(
    gateway: Server, hospital_ctx: Any, doctor: Any
) -> None:
    """A detached CAdES from signDoc, uploaded with its content: passes; with other content:
    HASH_FAILURE; without content: SIGNED_DATA_NOT_FOUND, each in words on the page."""
    import hashlib

    from tests.support.signing import Csc, b64

    csc = Csc(gateway.port, hospital_ctx)
    content = "調剤録メモ (TEST)\n".encode() * 40
    sad = csc.authorize(doctor[0]["credential_id"], [hashlib.sha256(content).digest()], doctor[1])
    r = csc.post(
        "/csc/v2/signatures/signDoc",
        {
            "credentialID": doctor[0]["credential_id"],
            "SAD": sad,
            "documents": [
                {"document": b64(content), "signature_format": "C",
                 "signed_envelope_property": "Detached"}
            ],
        },
    )  # fmt: skip
    assert r.status == 200, r.body
    p7s = base64.b64decode(r.json()["SignatureObject"][0])

    fields: dict[str, Any] = {"document": ("memo.p7s", p7s), "content": ("memo.txt", content)}
    html = post_form(gateway, hospital_ctx, "/portal/verify?lang=ja", fields).body.decode()
    assert 'id="indication" class="ind-TOTAL-PASSED">TOTAL-PASSED' in html, html[:600]

    fields["content"] = ("memo.txt", content + b"changed")
    html = post_form(gateway, hospital_ctx, "/portal/verify?lang=en", fields).body.decode()
    assert 'class="ind-TOTAL-FAILED">TOTAL-FAILED' in html and "HASH_FAILURE" in html

    fields = {"document_b64": base64.b64encode(p7s).decode(), "output": "json"}
    report = post_form(gateway, hospital_ctx, "/portal/verify", fields).json()
    assert report["sub_indication"] == "SIGNED_DATA_NOT_FOUND", report
    fields["content_b64"] = base64.b64encode(content).decode()
    report = post_form(gateway, hospital_ctx, "/portal/verify", fields).json()
    assert report["indication"] == "TOTAL-PASSED", report


def test_downloads_list_the_sandbox_and_a_broken_sample_fails(
    gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any]
) -> None:
    html = request(gateway.port, "GET", "/portal/downloads", ctx=hospital_ctx).body.decode()
    for name in (
        "manifest.json",
        "hpki-root.pem",
        "hpki-signing-ca.crl",
        "client-1310000011.p12",
        "prescription.csv",
        "prescription-AdES-B-LTA.xml",
        "dispensing-AdES-B-B-broken.xml",
    ):
        assert f'href="/portal/downloads/{name}"' in html, name
    r = request(gateway.port, "GET", "/portal/downloads/manifest.json", ctx=hospital_ctx)
    assert r.json()["url"] == sandbox["url"]
    # The administrator's p12 and password are not a facility's (security review: any facility
    # downloaded them, and so became an administrator of a shared sandbox).
    assert "client-admin.p12" not in html and sandbox["admin"]["p12_password"] not in html
    p12 = request(gateway.port, "GET", "/portal/downloads/client-admin.p12", ctx=hospital_ctx)
    assert p12.status == 404
    r = request(gateway.port, "GET", "/portal/downloads/..%2Fgateway.toml", ctx=hospital_ctx)
    assert r.status == 404

    for kind in ("prescription", "dispensing"):
        bad = request(
            gateway.port, "GET", f"/portal/downloads/{kind}-AdES-B-B-broken.xml", ctx=hospital_ctx
        ).body
        fields = {"document": ("bad.xml", bad), "output": "json"}
        report = post_form(gateway, hospital_ctx, "/portal/verify", fields).json()
        assert (report["indication"], report["sub_indication"]) == (
            "TOTAL-FAILED",
            "HASH_FAILURE",
        ), report


def test_portal_forms_need_this_listener_as_origin(
    gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any]
) -> None:
    doc = Path(sandbox["samples"]["prescription"]["AdES-B-B"]).read_bytes()
    fields = {"document": ("rx.xml", doc)}
    evil = post_form(gateway, hospital_ctx, "/portal/verify", fields, origin="https://evil.test")
    assert evil.status == 403
    none = post_form(gateway, hospital_ctx, "/portal/verify", fields, origin=None)
    assert none.status == 415
    # Outside /portal/ a form body is still refused.
    body, ctype = multipart(fields)
    r = request(
        gateway.port,
        "POST",
        "/verify",
        ctx=hospital_ctx,
        body=body,
        headers={"Content-Type": ctype, "Origin": f"https://localhost:{gateway.port}"},
    )
    assert r.status == 415


def test_no_form_puts_a_password_in_the_url(gateway: Server, hospital_ctx: Any) -> None:
    """A form without ``method`` is a GET: without JavaScript (or before its script loads) the
    enrolment form sent the code and password as ``/portal/enrol?code=…&password=…`` (browser
    history, proxy logs). Every form with a password field posts."""
    from html.parser import HTMLParser

    class Forms(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.forms: list[dict[str, Any]] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "form":
                self.forms.append({"id": a.get("id"), "method": a.get("method"), "pw": False})
            elif tag == "input" and a.get("type") == "password" and self.forms:
                self.forms[-1]["pw"] = True

    checked = 0
    for page in [*PAGES, "/portal/enrol/mynumber", "/portal/scenarios", "/enroll", "/approve"]:
        r = request(gateway.port, "GET", page, ctx=hospital_ctx)
        assert r.status == 200, page
        parser = Forms()
        parser.feed(r.body.decode())
        for form in parser.forms:
            if form["pw"]:
                checked += 1
                assert (form["method"] or "get").lower() == "post", (page, form["id"])
    assert checked >= 2  # /portal/enrol and /enroll


def test_a_cross_site_page_cannot_probe_the_portal(
    gateway: Server, hospital_ctx: Any, hospital: dict[str, Any], sandbox: dict[str, Any]
) -> None:
    """A cross-site <script>/<img>/<link> (Sec-Fetch-Mode no-cors) learned the status of a
    portal download: 200 for the client-<code>.p12 the browser's certificate may fetch, 404
    for the others, so any page could tell which facility (or an administrator) the visitor
    is. Such requests are 403 for every name; a link from another site (navigate) still
    opens the portal."""
    own = f"/portal/downloads/client-{hospital['institution_code']}.p12"
    other = next(
        f"/portal/downloads/client-{f['institution_code']}.p12"
        for f in sandbox["facilities"]
        if f["institution_code"] != hospital["institution_code"]
    )
    sub = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}
    for path in (own, other, "/portal/status", "/portal/downloads/manifest.json"):
        r = request(gateway.port, "GET", path, ctx=hospital_ctx, headers=sub)
        assert r.status == 403, (path, r.status)
    link = {
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Dest": "document",
    }
    assert (
        request(gateway.port, "GET", "/portal/status", ctx=hospital_ctx, headers=link).status == 200
    )
    same = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "no-cors"}
    assert request(gateway.port, "GET", own, ctx=hospital_ctx, headers=same).status == 200


def test_no_portal_page_without_a_client_certificate(
    gateway: Server, sandbox: dict[str, Any]
) -> None:
    import ssl

    bare = client_context(sandbox["server_ca"])
    for page in [*PAGES, "/portal/api", "/portal/downloads/manifest.json"]:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            request(gateway.port, "GET", page, ctx=bare)


def test_the_verify_page_says_what_changed_after_a_pdf_signature(
    gateway: Server, hospital_ctx: Any
) -> None:
    """A PDF whose page was swapped after signing: the page names the change in the reader's
    language (the report's ``modification_level``), not only the failure code."""
    from tests.support import pdf_forge
    from tests.support.softkey import make_world

    world = make_world()
    signed = pdf_forge.sign(world, pdf_forge.one_page_pdf("Take 1 tablet"))
    changed = pdf_forge.replace_page_text(signed, "Take 50 tablets")
    for lang, text in (
        ("ja", "内容の変更（署名された内容ではありません）"),
        ("en", "the content changed"),
    ):
        r = post_form(
            gateway, hospital_ctx, f"/portal/verify?lang={lang}", {"document": ("rx.pdf", changed)}
        )
        html = r.body.decode()
        assert r.status == 200, html[:400]
        assert 'class="modification" data-level="OTHER"' in html, html[-3000:]
        assert text in html
