"""The test world serves itself: `serve` publishes every CRL at the distribution point its
certificates name (so `hpki-gateway verify --fetch-crls`, or any outside verifier, checks
revocation against the sandbox alone) and runs the TEST OCSP responder the manifest lists."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.gateway import Server, run_cli

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _signer_cert(sandbox: dict[str, Any]) -> x509.Certificate:
    from lxml import etree

    xml = etree.fromstring(Path(sandbox["samples"]["prescription"]["AdES-B-B"]).read_bytes())
    ns = {"ds": "http://www.w3.org/2000/09/xmldsig#"}
    b64 = xml.xpath("//ds:X509Certificate/text()", namespaces=ns)[0]
    import base64

    return x509.load_der_x509_certificate(base64.b64decode(b64))


def test_every_crl_of_the_manifest_is_served(gateway: Server, sandbox: dict[str, Any]) -> None:
    assert set(sandbox["crl_urls"]) == set(sandbox["crls"])
    for name, url in sandbox["crl_urls"].items():
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback test URL
            assert r.read() == Path(sandbox["crls"][name]).read_bytes(), name


def test_the_certificates_name_the_served_urls(sandbox: dict[str, Any]) -> None:
    cert = _signer_cert(sandbox)
    dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for dp in dps for n in dp.full_name or []] == [
        sandbox["crl_urls"]["hpki-signing-ca"]
    ]
    ca = x509.load_pem_x509_certificate(Path(sandbox["hpki_intermediates"][0]).read_bytes())
    dps = ca.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for dp in dps for n in dp.full_name or []] == [sandbox["crl_urls"]["hpki-root"]]


@pytest.mark.parametrize("flags", [["--fetch-crls"]])
def test_verify_fetches_revocation_from_the_sandbox(
    gateway: Server, sandbox: dict[str, Any], flags: list[str], tmp_path: Path
) -> None:
    sample = sandbox["samples"]["prescription"]["AdES-B-B"]
    res = run_cli(
        "verify", sample, "--trust", sandbox["hpki_trust_anchors"][0],
        "--intermediate", sandbox["hpki_intermediates"][0], *flags, "--json",
    )  # fmt: skip
    report = json.loads(res.stdout)
    assert report["indication"] == "TOTAL-PASSED", report
    revocation = report["signatures"][0]["revocation"]
    assert revocation["status"] == "good", revocation
    assert revocation["source"] == "crl", revocation


def ocsp_status(sandbox: dict[str, Any]) -> str:
    """What the served TEST OCSP responder answers for the sample signer's certificate."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.x509 import ocsp

    cert = _signer_cert(sandbox)
    ca = x509.load_pem_x509_certificate(Path(sandbox["hpki_intermediates"][0]).read_bytes())
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA256()).build()
    http = urllib.request.Request(  # noqa: S310 - the loopback URL of the manifest
        sandbox["ocsp_urls"]["hpki-signing-ca"],
        data=req.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
    )
    with urllib.request.urlopen(http, timeout=10) as r:  # noqa: S310 - loopback test URL
        resp = ocsp.load_der_ocsp_response(r.read())
    ca.public_key().verify(  # type: ignore[call-arg]
        resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), resp.signature_hash_algorithm
    )  # signed by the TEST signing CA itself
    return resp.certificate_status.name.lower()


def test_the_ocsp_responder_answers_for_the_sandbox_certificates(
    gateway: Server, sandbox: dict[str, Any]
) -> None:
    assert ocsp_status(sandbox) == "good"
