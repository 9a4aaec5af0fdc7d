"""The portal's downloads are complete: every CA certificate and every CRL the sandbox holds (found
on disk, not from a list kept beside the code), every client PKCS#12, the sample CSVs and every
signed sample, each byte for byte, and nothing a facility must not have (keys, settings, another
holder's PKCS#12 or password: those only to the administrator)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support.gateway import Server, client_context, request

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _world_files(sandbox: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Every CA certificate (PEM, basicConstraints cA) and every CRL the world was built with
    (its PKI directories; other tests leave files of their own elsewhere in it)."""
    cas: dict[str, Path] = {}
    crls: dict[str, Path] = {}
    world = Path(sandbox["dir"])
    for p in sorted([*(world / "pki").iterdir(), *(world / "jpki").iterdir(),
                     *(world / "cards").rglob("*")]):  # fmt: skip
        if p.suffix == ".crl":
            crls[p.name] = p
        elif p.suffix == ".pem" and b"BEGIN CERTIFICATE" in p.read_bytes():
            cert = x509.load_pem_x509_certificate(p.read_bytes())
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                continue
            if bc.ca:
                cas[p.name] = p
    return cas, crls


def test_every_ca_certificate_crl_p12_and_sample_is_downloadable(
    gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any]
) -> None:
    html = request(gateway.port, "GET", "/portal/downloads", ctx=hospital_ctx).body.decode()
    listed = set(re.findall(r'href="/portal/downloads/([^"]+)"', html))

    def fetch(name: str) -> bytes:
        assert name in listed, (name, sorted(listed))
        r = request(gateway.port, "GET", f"/portal/downloads/{name}", ctx=hospital_ctx)
        assert r.status == 200, (name, r.body[:200])
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        return r.body

    cas, crls = _world_files(sandbox)
    # The world's CAs: TEST HPKI root and signing CA, facility client CA, TLS server CA, TSA
    # root, TEST JPKI CA.
    assert {"hpki-root.pem", "hpki-signing-ca.pem", "facility-client-ca.pem", "server-ca.pem",
            "tsa-ca.pem", "test-jpki-ca.pem"} <= set(cas)  # fmt: skip
    assert len(crls) >= 5, crls
    for name, path in {**cas, **crls}.items():
        assert fetch(name) == path.read_bytes(), name
    hospital = next(f for f in sandbox["facilities"] if f["kind"] == "hospital")
    name = f"client-{hospital['institution_code']}.p12"  # the caller's own; the others: below
    assert fetch(name) == Path(hospital["client_p12"]).read_bytes(), name
    for kind, levels in sandbox["samples"].items():
        assert fetch(f"{kind}.csv")
        for level, path in levels.items():
            assert fetch(Path(path).name) == Path(path).read_bytes(), (kind, level)
        assert fetch(f"{kind}-AdES-B-B-broken.xml") != Path(levels["AdES-B-B"]).read_bytes()
    # Nothing secret is offered.
    assert not [n for n in listed if n.endswith((".key", ".toml", ".pin", ".db"))], listed


def test_a_facility_gets_its_own_client_credentials_only_the_administrator_every_one(
    gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any]
) -> None:
    """Security review: with the pharmacy's certificate, client-admin.p12 downloaded (200) and
    the downloads page showed the officer's p12 password: any facility became an administrator
    of a shared sandbox (and any other facility)."""
    hospital = next(f for f in sandbox["facilities"] if f["kind"] == "hospital")
    others = [f for f in sandbox["facilities"] if f is not hospital]
    admin = {"institution_code": "admin", **sandbox["admin"]}
    admin_ctx = client_context(sandbox["server_ca"], admin["client_cert"], admin["client_key"])

    html = request(gateway.port, "GET", "/portal/downloads", ctx=hospital_ctx).body.decode()
    assert hospital["p12_password"] in html
    for holder in [*others, admin]:
        name = f"client-{holder['institution_code']}.p12"
        assert name not in html and holder["p12_password"] not in html, name
        r = request(gateway.port, "GET", f"/portal/downloads/{name}", ctx=hospital_ctx)
        assert r.status == 404, name
    # Nor through the manifest the page offers: the others' keys, PKCS#12 and passwords, the
    # enrolment codes of other facilities' signers and the PINs of their cards are left out.
    r = request(gateway.port, "GET", "/portal/downloads/manifest.json", ctx=hospital_ctx)
    served = r.json()
    text = r.body.decode()
    assert served["url"] == sandbox["url"] and served["server_ca"] == sandbox["server_ca"]
    for holder in [*others, admin]:
        assert holder["p12_password"] not in text and holder["client_key"] not in text
    assert served["admin"] == {"name": admin["name"], "client_cert": admin["client_cert"]}
    code = hospital["institution_code"]
    [own] = [f for f in served["facilities"] if f["institution_code"] == code]
    assert own == hospital
    for signer in sandbox["signers"]:
        secret = signer["enrollment_password"]
        assert (secret in text) == (code in signer["facilities"]), signer["id"]
    disk = json.loads((Path(sandbox["dir"]) / "manifest.json").read_text())
    assert served.keys() == disk.keys()  # still the manifest: only those secrets left out

    # The administrator still gets every holder's file and password.
    html = request(gateway.port, "GET", "/portal/downloads", ctx=admin_ctx).body.decode()
    for holder in [hospital, *others, admin]:
        name = f"client-{holder['institution_code']}.p12"
        assert holder["p12_password"] in html, name
        r = request(gateway.port, "GET", f"/portal/downloads/{name}", ctx=admin_ctx)
        assert r.status == 200 and r.body == Path(holder["client_p12"]).read_bytes(), name
    r = request(gateway.port, "GET", "/portal/downloads/manifest.json", ctx=admin_ctx)
    assert r.json() == disk
