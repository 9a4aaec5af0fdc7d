"""The sandbox's signer certificates name their issuer's certificate in the AIA (always) and the
TEST OCSP responder (``sandbox init --ocsp-in-aia``), and ``serve`` answers at both URLs:
verifiers nobody here wrote check revocation against the sandbox alone. ``openssl ocsp`` and
``hpki-gateway verify --ocsp`` follow the AIA of a certificate the gateway uses and meet the OCSP
scenarios; ``pdfsig`` (poppler, NSS) asks the responder for a PAdES the gateway signed but cannot
use its answer (docs/sandbox.md). The default world, without the OCSP URL, keeps pdfsig's
"Certificate is Trusted." (test_pyhanko_csc.py, test_signatures_interop.py)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID

from tests.support.gateway import Server, client_context, free_port, request, run_cli
from tests.support.signing import Csc, b64
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run `make test` (scripts/bootstrap.sh)")


def _aia(cert: x509.Certificate) -> dict[str, list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    out: dict[str, list[str]] = {"ocsp": [], "ca_issuers": []}
    for d in ext:
        key = "ocsp" if d.access_method == AuthorityInformationAccessOID.OCSP else "ca_issuers"
        out[key].append(str(d.access_location.value))
    return out


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback test URL
        assert r.headers["Content-Type"] == "application/pkix-cert"
        body: bytes = r.read()
        return body


def _pem(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


@pytest.fixture(scope="module")
def aia_world(tmp_path_factory: Any) -> Iterator[tuple[dict[str, Any], Server]]:
    """A sandbox built with ``--ocsp-in-aia``, served."""
    d = tmp_path_factory.mktemp("aia-world")
    run_cli("sandbox", "init", str(d), "--port", str(free_port()), "--ocsp-in-aia")
    import json

    manifest: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    manifest["dir"] = str(d)
    srv = Server(Path(manifest["config"]), free_port())
    srv.start()
    try:
        yield manifest, srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def signed_pdf(
    aia_world: tuple[dict[str, Any], Server], tmp_path_factory: Any
) -> tuple[Path, x509.Certificate, str]:
    """A PAdES-B-B the gateway of that world signed with its first doctor's key (FIDO2
    enrolled with the manifest's code), that doctor's certificate and credential id."""
    from reportlab.pdfgen import canvas

    manifest, gateway = aia_world
    hospital = next(f for f in manifest["facilities"] if f["kind"] == "hospital")
    ctx = client_context(manifest["server_ca"], hospital["client_cert"], hospital["client_key"])
    doc = next(s for s in manifest["signers"] if s["role"] == "Medical Doctor")
    auth = SoftAuthenticator(origin=f"https://localhost:{gateway.port}")
    csc = Csc(gateway.port, ctx)
    r = csc.enroll(doc["enrollment_code"], doc["enrollment_password"], auth)
    assert r.status == 200, r.body
    buf = BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(100, 750, "TEST prescription PDF (AIA)")
    c.save()
    pdf = buf.getvalue()
    sad = csc.authorize(doc["credential_id"], [hashlib.sha256(pdf).digest()], auth)
    r = csc.post(
        "/csc/v2/signatures/signDoc",
        {
            "credentialID": doc["credential_id"],
            "SAD": sad,
            "documents": [
                {"document": b64(pdf), "signature_format": "P", "conformance_level": "AdES-B-B"}
            ],
        },
    )
    assert r.status == 200, r.body
    out = tmp_path_factory.mktemp("aia") / "signed.pdf"
    out.write_bytes(base64.b64decode(r.json()["DocumentWithSignature"][0]))
    info = csc.post("/csc/v2/credentials/info", {"credentialID": doc["credential_id"]})
    cert = x509.load_der_x509_certificate(base64.b64decode(info.json()["cert"]["certificates"][0]))
    return out, cert, str(doc["credential_id"])


@pytest.fixture
def switch(aia_world: tuple[dict[str, Any], Server]) -> Iterator[Any]:
    manifest, gateway = aia_world
    a = manifest["admin"]
    ctx = client_context(manifest["server_ca"], a["client_cert"], a["client_key"])

    def post(path: str, body: dict[str, Any]) -> None:
        r = request(gateway.port, "POST", path, ctx=ctx, json_body=body)
        assert r.status == 200, r.body

    yield lambda scenario, credential: post(
        "/admin/scenarios", {"scenario": scenario, "credential": credential}
    )
    post("/admin/scenarios/reset", {})


def test_the_default_world_names_the_issuer_but_no_responder(
    gateway: Server, sandbox: dict[str, Any], hospital_ctx: Any
) -> None:
    cred = next(s for s in sandbox["signers"] if s["role"] == "Medical Doctor")["credential_id"]
    info = request(gateway.port, "POST", "/csc/v2/credentials/info", ctx=hospital_ctx,
                   json_body={"credentialID": cred})  # fmt: skip
    der = base64.b64decode(info.json()["cert"]["certificates"][0])
    aia = _aia(x509.load_der_x509_certificate(der))
    assert aia == {"ocsp": [], "ca_issuers": [sandbox["ca_issuers_urls"]["hpki-signing-ca"]]}
    served = x509.load_der_x509_certificate(_get(aia["ca_issuers"][0]))
    assert served == _pem(sandbox["hpki_intermediates"][0])


def test_the_certificates_name_the_served_ocsp_and_issuer_urls(
    aia_world: tuple[dict[str, Any], Server], signed_pdf: tuple[Path, x509.Certificate, str]
) -> None:
    sandbox, _ = aia_world
    _, signer, _ = signed_pdf
    aia = _aia(signer)
    assert aia["ocsp"] == [sandbox["ocsp_urls"]["hpki-signing-ca"]]
    assert aia["ca_issuers"] == [sandbox["ca_issuers_urls"]["hpki-signing-ca"]]
    ca = _pem(sandbox["hpki_intermediates"][0])
    root = _pem(sandbox["hpki_trust_anchors"][0])
    # The URL gives the issuer's certificate in DER, and that one names the root's.
    served_ca = x509.load_der_x509_certificate(_get(aia["ca_issuers"][0]))
    assert served_ca == ca
    signer.verify_directly_issued_by(served_ca)
    assert _aia(ca)["ca_issuers"] == [sandbox["ca_issuers_urls"]["hpki-root"]]
    assert x509.load_der_x509_certificate(_get(sandbox["ca_issuers_urls"]["hpki-root"])) == root
    # Every CA of the world is published, and only CAs.
    assert {"hpki-root", "hpki-signing-ca", "tsa-ca", "facility-client-ca", "server-ca"} == set(
        sandbox["ca_issuers_urls"]
    )
    for url in sandbox["ca_issuers_urls"].values():
        cert = x509.load_der_x509_certificate(_get(url))
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _openssl_ocsp(sandbox: dict[str, Any], cert: x509.Certificate, tmp: Path) -> str:
    _require("openssl")
    signer_pem = tmp / "signer.pem"
    signer_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    res = subprocess.run(
        ["openssl", "ocsp", "-issuer", sandbox["hpki_intermediates"][0],
         "-cert", str(signer_pem), "-url", _aia(cert)["ocsp"][0],
         "-CAfile", sandbox["hpki_trust_anchors"][0], "-timeout", "10"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Response verify OK" in res.stderr, res.stderr  # signature, nonce, signer chain
    return res.stdout


def test_openssl_ocsp_asks_the_aia_url(
    aia_world: tuple[dict[str, Any], Server], signed_pdf: tuple[Path, x509.Certificate, str],
    switch: Any, tmp_path: Path,
) -> None:  # fmt: skip
    sandbox, _ = aia_world
    _, cert, cred = signed_pdf
    assert f"{tmp_path / 'signer.pem'}: good" in _openssl_ocsp(sandbox, cert, tmp_path)
    switch("ocsp_revoked", cred)
    out = _openssl_ocsp(sandbox, cert, tmp_path)
    assert f"{tmp_path / 'signer.pem'}: revoked" in out and "keyCompromise" in out, out


@pytest.fixture(scope="module")
def nssdb(aia_world: tuple[dict[str, Any], Server], tmp_path_factory: Any) -> str:
    """An NSS database trusting the sandbox's TEST HPKI root, nothing else of the sandbox."""
    sandbox, _ = aia_world
    _require("certutil", "pdfsig")
    d = tmp_path_factory.mktemp("nss")
    subprocess.run(["certutil", "-N", "-d", f"sql:{d}", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-A", "-d", f"sql:{d}", "-n", "hpki-test-root", "-t", "CT,C,C",
         "-i", sandbox["hpki_trust_anchors"][0]],
        check=True,
    )  # fmt: skip
    return f"sql:{d}"


def _pdfsig(pdf: Path, nssdb: str) -> str:
    res = subprocess.run(
        ["pdfsig", "-nssdir", nssdb, str(pdf)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return res.stdout + res.stderr


def _ocsp_answers(gateway: Server, serial: int) -> int:
    """How many answers the served TEST OCSP responder gave for ``serial`` (its log lines)."""
    return gateway.logs().count(f"TEST OCSP: serial {serial:X} answered")


def test_pdfsig_follows_the_aia_to_the_sandbox_responder(
    aia_world: tuple[dict[str, Any], Server],
    signed_pdf: tuple[Path, x509.Certificate, str],
    nssdb: str,
) -> None:
    _, gateway = aia_world
    pdf, cert, _ = signed_pdf
    before = _ocsp_answers(gateway, cert.serial_number)
    out = _pdfsig(pdf, nssdb)
    assert "Signature Validation: Signature is Valid." in out, out
    # NSS found the responder in the AIA and asked it (GET, then POST).
    assert _ocsp_answers(gateway, cert.serial_number) > before, out
    # ... but NSS 3.87 cannot verify an OCSP answer whose signer's path holds a critical
    # certificatePolicies extension, as the TEST signing CA's does (like MEDIS's): it soft-
    # fails, and poppler 22.12 reports the error code NSS left behind. docs/sandbox.md has the
    # details; this line changes when NSS or poppler do.
    assert "Certificate Validation: Unknown issue with Certificate or corrupted data." in out, out


def _verify_ocsp(sandbox: dict[str, Any], pdf: Path) -> dict[str, Any]:
    import json

    res = run_cli(
        "verify", str(pdf), "--trust", sandbox["hpki_trust_anchors"][0],
        "--intermediate", sandbox["hpki_intermediates"][0], "--fetch-crls", "--ocsp", "--json",
        check=False,
    )  # fmt: skip
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def test_verify_ocsp_follows_the_aia_and_the_scenarios(
    aia_world: tuple[dict[str, Any], Server], signed_pdf: tuple[Path, x509.Certificate, str],
    switch: Any,
) -> None:  # fmt: skip
    sandbox, _ = aia_world
    pdf, _, cred = signed_pdf
    report = _verify_ocsp(sandbox, pdf)
    assert report["indication"] == "TOTAL-PASSED", report
    assert report["signatures"][0]["revocation"]["source"] == "ocsp", report
    assert report["signatures"][0]["revocation"]["status"] == "good", report
    switch("ocsp_revoked", cred)
    report = _verify_ocsp(sandbox, pdf)
    sig = report["signatures"][0]
    assert sig["revocation"]["status"] == "revoked" and sig["revocation"]["source"] == "ocsp", sig
    assert (report["indication"], report["sub_indication"]) in (
        ("INDETERMINATE", "REVOKED_NO_POE"),
        ("TOTAL-FAILED", "REVOKED"),
    ), report
