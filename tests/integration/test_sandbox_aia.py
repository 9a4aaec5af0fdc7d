"""The sandbox's signer certificates name their issuer's certificate in the AIA and, unless the
world was built with ``sandbox init --no-ocsp-in-aia``, the TEST OCSP responder; ``serve``
answers at both URLs: verifiers nobody here wrote check revocation against the sandbox alone.
``openssl ocsp``, ``hpki-gateway verify --ocsp`` and ``pdfsig`` (poppler, NSS, run with
``NSS_ENABLE_PKIX_VERIFY=1`` as docs/sandbox.md says) follow the AIA of a certificate the
gateway uses and meet the OCSP scenarios; without libpkix, NSS 3.87 asks the responder but
cannot use its answer."""

from __future__ import annotations

import base64
import hashlib
import os
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


def _served_world(tmp_path_factory: Any, name: str, *flags: str) -> tuple[dict[str, Any], Server]:
    import json

    d = tmp_path_factory.mktemp(name)
    run_cli("sandbox", "init", str(d), "--port", str(free_port()), *flags)
    manifest: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    manifest["dir"] = str(d)
    srv = Server(Path(manifest["config"]), free_port())
    srv.start()
    return manifest, srv


def _sign_pdf(
    world: tuple[dict[str, Any], Server], out: Path
) -> tuple[Path, x509.Certificate, str]:
    """A PAdES-B-B the gateway of ``world`` signed with its first doctor's key (FIDO2 enrolled
    with the manifest's code), that doctor's certificate and credential id."""
    from reportlab.pdfgen import canvas

    manifest, gateway = world
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
    out.write_bytes(base64.b64decode(r.json()["DocumentWithSignature"][0]))
    info = csc.post("/csc/v2/credentials/info", {"credentialID": doc["credential_id"]})
    cert = x509.load_der_x509_certificate(base64.b64decode(info.json()["cert"]["certificates"][0]))
    return out, cert, str(doc["credential_id"])


@pytest.fixture(scope="module")
def aia_world(tmp_path_factory: Any) -> Iterator[tuple[dict[str, Any], Server]]:
    """A sandbox built as `sandbox init` builds it by default (OCSP URL in the AIA), served."""
    world = _served_world(tmp_path_factory, "aia-world")
    try:
        yield world
    finally:
        world[1].stop()


@pytest.fixture(scope="module")
def signed_pdf(
    aia_world: tuple[dict[str, Any], Server], tmp_path_factory: Any
) -> tuple[Path, x509.Certificate, str]:
    return _sign_pdf(aia_world, tmp_path_factory.mktemp("aia") / "signed.pdf")


@pytest.fixture(scope="module")
def real_shape_world(tmp_path_factory: Any) -> Iterator[tuple[dict[str, Any], Server]]:
    """A sandbox built with ``--no-ocsp-in-aia`` (no responder named, as in real HPKI
    certificates), served."""
    world = _served_world(tmp_path_factory, "no-aia-world", "--no-ocsp-in-aia")
    try:
        yield world
    finally:
        world[1].stop()


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


def test_a_no_ocsp_in_aia_world_names_the_issuer_but_no_responder(
    real_shape_world: tuple[dict[str, Any], Server], tmp_path_factory: Any
) -> None:
    sandbox, _ = real_shape_world
    assert sandbox["ocsp_in_aia"] is False
    pdf, cert, _ = _sign_pdf(real_shape_world, tmp_path_factory.mktemp("no-aia") / "s.pdf")
    aia = _aia(cert)
    assert aia == {"ocsp": [], "ca_issuers": [sandbox["ca_issuers_urls"]["hpki-signing-ca"]]}
    served = x509.load_der_x509_certificate(_get(aia["ca_issuers"][0]))
    assert served == _pem(sandbox["hpki_intermediates"][0])
    # pdfsig trusts it without asking anyone, with or without libpkix.
    db = _nssdb(sandbox, tmp_path_factory.mktemp("nss-no-aia"))
    for libpkix in (True, False):
        out = _pdfsig(pdf, db, libpkix=libpkix)
        assert "Signature Validation: Signature is Valid." in out, out
        assert "Certificate Validation: Certificate is Trusted." in out, out


def test_the_certificates_name_the_served_ocsp_and_issuer_urls(
    aia_world: tuple[dict[str, Any], Server], signed_pdf: tuple[Path, x509.Certificate, str]
) -> None:
    sandbox, _ = aia_world
    _, signer, _ = signed_pdf
    assert sandbox["ocsp_in_aia"] is True
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


def _nssdb(sandbox: dict[str, Any], d: Path) -> str:
    """An NSS database trusting the sandbox's TEST HPKI root, nothing else of the sandbox."""
    _require("certutil", "pdfsig")
    subprocess.run(["certutil", "-N", "-d", f"sql:{d}", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-A", "-d", f"sql:{d}", "-n", "hpki-test-root", "-t", "CT,C,C",
         "-i", sandbox["hpki_trust_anchors"][0]],
        check=True,
    )  # fmt: skip
    return f"sql:{d}"


@pytest.fixture(scope="module")
def nssdb(aia_world: tuple[dict[str, Any], Server], tmp_path_factory: Any) -> str:
    return _nssdb(aia_world[0], tmp_path_factory.mktemp("nss"))


def _pdfsig(pdf: Path, nssdb: str, *, libpkix: bool = True) -> str:
    """pdfsig as docs/sandbox.md tells a tester to run it: with ``NSS_ENABLE_PKIX_VERIFY=1``
    (NSS checks the OCSP responder's path with libpkix, which knows certificatePolicies);
    ``libpkix=False``: NSS's default before 3.102, the legacy path check."""
    env = {k: v for k, v in os.environ.items() if k != "NSS_ENABLE_PKIX_VERIFY"}
    if libpkix:
        env["NSS_ENABLE_PKIX_VERIFY"] = "1"
    res = subprocess.run(
        ["pdfsig", "-nssdir", nssdb, str(pdf)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    return res.stdout + res.stderr


def _ocsp_answers(gateway: Server, serial: int, status: str = "") -> int:
    """How many answers the served TEST OCSP responder gave for ``serial`` (its log lines)."""
    return gateway.logs().count(f"TEST OCSP: serial {serial:X} answered {status}")


TRUSTED = "Certificate Validation: Certificate is Trusted."
REVOKED = "Certificate Validation: Certificate has been Revoked."
UNKNOWN_ISSUE = "Certificate Validation: Unknown issue with Certificate or corrupted data."


def test_pdfsig_uses_the_sandbox_responder_named_in_the_aia(
    aia_world: tuple[dict[str, Any], Server],
    signed_pdf: tuple[Path, x509.Certificate, str],
    nssdb: str,
    switch: Any,
) -> None:
    _, gateway = aia_world
    pdf, cert, cred = signed_pdf
    serial = cert.serial_number
    before = _ocsp_answers(gateway, serial, "good")
    out = _pdfsig(pdf, nssdb)
    assert "Signature Validation: Signature is Valid." in out, out
    assert TRUSTED in out, out
    # NSS found the responder in the AIA and asked it.
    assert _ocsp_answers(gateway, serial, "good") > before, out
    # The answer decides: the responder says revoked, and so does pdfsig.
    switch("ocsp_revoked", cred)
    before = _ocsp_answers(gateway, serial, "revoked")
    out = _pdfsig(pdf, nssdb)
    assert _ocsp_answers(gateway, serial, "revoked") > before, out
    assert "Signature Validation: Signature is Valid." in out, out
    assert REVOKED in out, out


def test_pdfsig_without_libpkix_asks_but_cannot_use_the_answer(
    aia_world: tuple[dict[str, Any], Server],
    signed_pdf: tuple[Path, x509.Certificate, str],
    nssdb: str,
    switch: Any,
) -> None:
    """NSS 3.87's default (legacy) path check refuses the responder's path, whose signing CA
    has a critical certificatePolicies (SEC_ERROR_UNKNOWN_CRITICAL_EXTENSION, then
    SEC_ERROR_OCSP_INVALID_SIGNING_CERT), soft-fails, and poppler 22.12 reports the error code
    left behind: the same line whatever the responder says (docs/sandbox.md). This changes when
    NSS (3.102 verifies with libpkix by default) or poppler do."""
    _, gateway = aia_world
    pdf, cert, cred = signed_pdf
    before = _ocsp_answers(gateway, cert.serial_number)
    out = _pdfsig(pdf, nssdb, libpkix=False)
    assert "Signature Validation: Signature is Valid." in out, out
    assert _ocsp_answers(gateway, cert.serial_number) > before, out
    assert UNKNOWN_ISSUE in out, out
    switch("ocsp_revoked", cred)
    out = _pdfsig(pdf, nssdb, libpkix=False)
    assert UNKNOWN_ISSUE in out and REVOKED not in out, out


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
