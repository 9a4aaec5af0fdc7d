"""The portal's downloads are complete: every CA certificate and every CRL the sandbox holds (found
on disk, not from a list kept beside the code), every client PKCS#12, the sample CSVs and every
signed sample, each byte for byte, and nothing a facility must not have (keys, settings)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support.gateway import Server, request

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
    for holder in [*sandbox["facilities"], {"institution_code": "admin", **sandbox["admin"]}]:
        name = f"client-{holder['institution_code']}.p12"
        assert fetch(name) == Path(holder["client_p12"]).read_bytes(), name
    for kind, levels in sandbox["samples"].items():
        assert fetch(f"{kind}.csv")
        for level, path in levels.items():
            assert fetch(Path(path).name) == Path(path).read_bytes(), (kind, level)
        assert fetch(f"{kind}-AdES-B-B-broken.xml") != Path(levels["AdES-B-B"]).read_bytes()
    # Nothing secret is offered.
    assert not [n for n in listed if n.endswith((".key", ".toml", ".pin", ".db"))], listed
