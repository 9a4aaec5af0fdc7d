"""Signer lifecycle on a real SoftHSM token: production path add -> csr -> import-cert."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.pki import hpki
from gateway.sandbox import testworld
from tests.support.gateway import run_cli

pytestmark = pytest.mark.hsm


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A sandbox turned into a production-like deployment: no TEST CA issuing directly."""
    d = tmp_path_factory.mktemp("prod")
    run_cli("sandbox", "init", str(d), "--port", "18446")
    cfg = d / "gateway.toml"
    text = cfg.read_text()
    text = text.replace('test_ca_cert = "pki/hpki-signing-ca.pem"\n', "")
    text = text.replace('test_ca_key = "pki/hpki-signing-ca.key"\n', "")
    text = text.replace("sandbox = true", "sandbox = false")
    cfg.write_text(text)
    pki = d / "pki"
    ca = testworld.CertAndKey(
        cert=x509.load_pem_x509_certificate((pki / "hpki-signing-ca.pem").read_bytes()),
        key=serialization.load_pem_private_key(  # type: ignore[arg-type]
            (pki / "hpki-signing-ca.key").read_bytes(), password=None
        ),
    )
    return {"dir": d, "cfg": str(cfg), "ca": ca}


def _add(production: dict[str, Any], role: str = "Medical Doctor") -> dict[str, Any]:
    out = run_cli(
        "signer",
        "add",
        "--name",
        "Ichiro Test",
        "--role",
        role,
        "--facility",
        "1310000011",
        "-c",
        production["cfg"],
        "--json",
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _issue_for_csr(production: dict[str, Any], csr_pem: bytes, role: str) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    cert = testworld.issue_hpki_signer_cert(
        production["ca"],
        public_key_der=csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        name_romaji="Ichiro Test",
        name_kanji="試験　一郎",
        role=role,
        organization="HPKI TEST FACILITY",
        serial_number_attr="T0001",
        now=datetime.now(UTC),
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_add_csr_import(production: dict[str, Any], tmp_path: Path) -> None:
    s = _add(production)
    assert s["credentials"][0]["status"] == "pending_certificate"
    csr_path = tmp_path / "req.csr"
    run_cli("signer", "csr", s["id"], "-o", str(csr_path), "-c", production["cfg"])
    # A verifier nobody here wrote checks the HSM's signature on the request.
    v = subprocess.run(
        ["openssl", "req", "-in", str(csr_path), "-verify", "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert v.returncode == 0, v.stderr
    assert "verify OK" in (v.stdout + v.stderr)
    cert_path = tmp_path / "cert.pem"
    cert_path.write_bytes(_issue_for_csr(production, csr_path.read_bytes(), "Medical Doctor"))
    out = run_cli(
        "signer",
        "import-cert",
        s["id"],
        str(cert_path),
        "--chain",
        str(production["dir"] / "pki" / "hpki-signing-ca.pem"),
        "-c",
        production["cfg"],
        "--json",
    )
    assert json.loads(out.stdout)["status"] == "active"
    listed = json.loads(run_cli("signer", "list", "-c", production["cfg"], "--json").stdout)
    mine = next(x for x in listed if x["id"] == s["id"])
    assert mine["credentials"][0]["status"] == "active"
    assert mine["credentials"][0]["certificate_serial"] == format(
        x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number, "x"
    )


def test_import_refuses_a_certificate_for_another_key(
    production: dict[str, Any], tmp_path: Path
) -> None:
    s = _add(production)
    other = testworld.issue_client_cert(
        production["ca"],
        common_name="x",
        institution_code=None,
        now=datetime.now(UTC),
        validity=timedelta(days=1),
    )
    csr_like = testworld.issue_hpki_signer_cert(
        production["ca"],
        public_key_der=other.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        name_romaji="Ichiro Test",
        name_kanji="試験",
        role="Medical Doctor",
        organization="O",
        serial_number_attr="T2",
        now=datetime.now(UTC),
    )
    p = tmp_path / "wrong.pem"
    p.write_bytes(csr_like.public_bytes(serialization.Encoding.PEM))
    res = run_cli("signer", "import-cert", s["id"], str(p), "-c", production["cfg"], check=False)
    assert res.returncode == 1
    assert "public key is not the key of credential" in res.stderr


def test_import_refuses_non_hpki_and_wrong_role(production: dict[str, Any], tmp_path: Path) -> None:
    s = _add(production)
    csr_path = tmp_path / "req.csr"
    run_cli("signer", "csr", s["id"], "-o", str(csr_path), "-c", production["cfg"])
    # Wrong role: a Pharmacist certificate for a Medical Doctor signer.
    p = tmp_path / "pharm.pem"
    p.write_bytes(_issue_for_csr(production, csr_path.read_bytes(), "Pharmacist"))
    res = run_cli("signer", "import-cert", s["id"], str(p), "-c", production["cfg"], check=False)
    assert res.returncode == 1 and "does not match the signer's role" in res.stderr
    # Right key, but not the HPKI signing profile (no hcRole, no policy, digitalSignature).
    ca = production["ca"]
    now = datetime.now(UTC)
    plain = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=Ichiro Test,C=JP"))
        .issuer_name(ca.cert.subject)
        .public_key(x509.load_pem_x509_csr(csr_path.read_bytes()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        .sign(ca.key, hashes.SHA256())
    )
    p = tmp_path / "plain.pem"
    p.write_bytes(plain.public_bytes(serialization.Encoding.PEM))
    res = run_cli("signer", "import-cert", s["id"], str(p), "-c", production["cfg"], check=False)
    assert res.returncode == 1
    assert "not an HPKI signing certificate" in res.stderr
    assert "hcRole" in res.stderr
    # And the real MEDIS signing CA certificate: another key altogether.
    real = Path(hpki.__file__).parent / "anchors" / "medis_sign_ca.pem"
    res = run_cli("signer", "import-cert", s["id"], str(real), "-c", production["cfg"], check=False)
    assert res.returncode == 1 and "public key" in res.stderr


def test_signer_serves_several_facilities(production: dict[str, Any]) -> None:
    s = _add(production)
    run_cli("signer", "link", s["id"], "1340000019", "-c", production["cfg"])
    listed = json.loads(
        run_cli(
            "signer", "list", "--facility", "1340000019", "-c", production["cfg"], "--json"
        ).stdout
    )
    assert s["id"] in [x["id"] for x in listed]
    dup = run_cli("signer", "link", s["id"], "1340000019", "-c", production["cfg"], check=False)
    assert dup.returncode == 1 and "already serves" in dup.stderr
    run_cli("signer", "unlink", s["id"], "1340000019", "-c", production["cfg"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--role", "doctor!"], "is not an hcRole text"),
        (["--role", "Medical Doctor", "--facility", "9999999999"], "9999999999 is not registered"),
    ],
)
def test_add_bad_input(production: dict[str, Any], args: list[str], needle: str) -> None:
    base = ["signer", "add", "--name", "X", "-c", production["cfg"]]
    if "--facility" not in args:
        args = [*args, "--facility", "1310000011"]
    res = run_cli(*base, *args, check=False)
    assert res.returncode == 1
    assert needle in res.stderr
