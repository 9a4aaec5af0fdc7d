"""The portal's My Number card enrolment page over real mTLS: how a card is linked with the
local card client (and that a browser cannot do it), in Japanese and English, and the cards
each signer of the facility has linked."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.pki.issue import CertAndKey
from gateway.sandbox.jpki import issue_auth_cert
from tests.support.gateway import Server, client_context, request, run_cli

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

PAGE = "/portal/enrol/mynumber"


def _get(gateway: Server, ctx: Any, lang: str | None = None) -> str:
    r = request(gateway.port, "GET", PAGE + (f"?lang={lang}" if lang else ""), ctx=ctx)
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("text/html")
    return r.body.decode()


@pytest.mark.parametrize(
    ("lang", "heading", "cannot"),
    [
        ("ja", "マイナンバーカードの登録", "ブラウザは IC カードリーダーにアクセスできない"),
        ("en", "Enrol a My Number card", "A browser cannot reach a card reader"),
    ],
)
def test_the_page_in_both_languages(
    gateway: Server, hospital_ctx: Any, hospital: dict[str, Any], lang: str, heading: str,
    cannot: str,
) -> None:  # fmt: skip
    html = _get(gateway, hospital_ctx, lang)
    assert f'<html lang="{lang}">' in html
    assert re.findall(r"<h1>(.*?)</h1>", html) == [heading]
    assert cannot in html
    # The commands, with this gateway's address and the facility's own client certificate.
    assert f"--url https://localhost:{gateway.port}" in html
    assert f"--client-cert {hospital['client_cert']}" in html
    for command in ("card enroll", "card authorize", "signer link-jpki", "card read-cert",
                    "sandbox cards up"):  # fmt: skip
        assert f"hpki-gateway {command}" in html, command
    assert "POST /admin/signers/{signer}/jpki" in html


def test_the_fido2_page_leads_to_it(gateway: Server, hospital_ctx: Any) -> None:
    r = request(gateway.port, "GET", "/portal/enrol?lang=en", ctx=hospital_ctx)
    assert r.status == 200
    assert f'href="{PAGE}"' in r.body.decode()


def _card_cert(sandbox: dict[str, Any]) -> x509.Certificate:
    jpki = Path(sandbox["dir"]) / "jpki"
    key = serialization.load_pem_private_key((jpki / "test-jpki-ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    ca = CertAndKey(
        cert=x509.load_pem_x509_certificate((jpki / "test-jpki-ca.pem").read_bytes()), key=key
    )
    card_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return issue_auth_cert(
        ca, card_key.public_key(), now=dt.datetime.now(dt.UTC),
        ocsp_url=sandbox["jpki"]["ocsp_url"],
    )  # fmt: skip


def _row(html: str, signer_id: str) -> str:
    m = re.search(rf'<tr data-signer="{re.escape(signer_id)}">(.*?)</tr>', html, re.S)
    assert m, f"no row for {signer_id}"
    return m.group(1)


def test_link_status_per_signer(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: Any, tmp_path: Path
) -> None:
    doctors = [s for s in sandbox["signers"] if s["role"] == "Medical Doctor"]
    target = doctors[0]
    before = json.loads(
        run_cli("signer", "jpki-links", target["id"], "-c", sandbox["config"], "--json").stdout
    )
    cert = _card_cert(sandbox)
    pem = tmp_path / "card.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    run_cli("signer", "link-jpki", target["id"], "--cert", str(pem), "--label", "portal card",
            "-c", sandbox["config"])  # fmt: skip
    html = _get(gateway, hospital_ctx, "ja")
    row = _row(html, target["id"])
    assert "登録済み: portal card" in row
    assert f"<code>{cert.serial_number:x}</code>" in row
    assert "マイナンバーカード" in row  # the presence methods name the card
    assert row.count("<li>") == len(before) + 1
    # The other doctor of the facility is listed too, with what they have (or "none linked").
    other = _row(_get(gateway, hospital_ctx, "en"), doctors[1]["id"])
    links = json.loads(
        run_cli("signer", "jpki-links", doctors[1]["id"], "-c", sandbox["config"], "--json").stdout
    )
    assert ("none linked" in other) == (not links)
    # A facility sees its own signers only: the pharmacist is the pharmacy's.
    pharmacist = next(s for s in sandbox["signers"] if s["role"] == "Pharmacist")
    assert f'data-signer="{pharmacist["id"]}"' not in html
    # No PIN on the page, even in the sandbox (the manifest is where a tester finds them).
    assert "cards[].pin" in html


def test_the_status_page_names_the_card_as_a_presence_method(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: Any, tmp_path: Path
) -> None:
    def links(signer_id: str) -> list[dict[str, Any]]:
        out = run_cli("signer", "jpki-links", signer_id, "-c", sandbox["config"], "--json")
        return list(json.loads(out.stdout))

    def rows(signer_id: str) -> list[str]:
        html = request(gateway.port, "GET", "/portal/status?lang=en", ctx=hospital_ctx).body
        found = re.findall(
            rf'<tr data-signer="{re.escape(signer_id)}">(.*?)</tr>', html.decode(), re.S
        )
        assert found, f"no row for {signer_id}"
        return found

    # Other tests link cards to the sandbox's doctors: take one without a card where there is
    # one, so that both answers are seen; the row is the doctor's own (another's card may be
    # named on the same page).
    doctors = [s["id"] for s in sandbox["signers"] if s["role"] == "Medical Doctor"]
    doctor = next((d for d in doctors if not links(d)), doctors[0])
    before = links(doctor)
    assert all(("My Number card" in row) == bool(before) for row in rows(doctor))
    pem = tmp_path / "card.pem"
    pem.write_bytes(_card_cert(sandbox).public_bytes(serialization.Encoding.PEM))
    linked = json.loads(
        run_cli("signer", "link-jpki", doctor, "--cert", str(pem), "-c", sandbox["config"],
                "--json").stdout
    )  # fmt: skip
    assert all("My Number card" in row for row in rows(doctor))
    run_cli("signer", "unlink-jpki", doctor, linked["id"], "-c", sandbox["config"])
    assert links(doctor) == before
    assert all(("My Number card" in row) == bool(before) for row in rows(doctor))


def test_the_page_needs_a_client_certificate(gateway: Server, sandbox: dict[str, Any]) -> None:
    import ssl

    ctx = client_context(sandbox["server_ca"])
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        request(gateway.port, "GET", PAGE, ctx=ctx)
