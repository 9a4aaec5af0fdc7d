"""The test world produces certificates with the real profiles, and they interoperate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from gateway.errors import PkiError
from gateway.pki.hpki import (
    HPKI_SIGNING_EE_POLICY,
    SIGNING_CA_POLICY,
    SUBJECT_DIRECTORY_ATTRIBUTES_OID,
    build_hcrole_extension_value,
    check_signing_profile,
    inspect_certificate,
    parse_hcroles,
    verify_chain,
)
from gateway.sandbox import testworld as tw


def real_hpki_dir() -> Path:
    """The shared fixtures, a sibling of the repository (../shared/fixtures/real-hpki)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real-hpki"


NOW = dt.datetime(2026, 6, 1, 9, 30, tzinfo=dt.UTC)


@dataclass
class Hpki:
    root: tw.CertAndKey
    ca: tw.CertAndKey
    doctor_key: rsa.RSAPrivateKey
    doctor: x509.Certificate


def _spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def hpki_world() -> Hpki:
    root = tw.make_hpki_root(now=NOW)
    ca = tw.make_hpki_signing_ca(root, now=NOW)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    doctor = tw.issue_hpki_signer_cert(
        ca,
        public_key_der=_spki(key),
        name_romaji="Taro Shinsatsu",
        name_kanji="診察\u3000太郎",
        role="Medical Doctor",
        organization="SANDBOX CLINIC",
        organization_kanji="サンドボックス診療所",
        serial_number_attr="TEST000001",
        now=NOW,
    )
    return Hpki(root=root, ca=ca, doctor_key=key, doctor=doctor)


@pytest.fixture(scope="module")
def client_ca() -> tw.CertAndKey:
    return tw.make_client_ca(now=NOW)


@pytest.fixture(scope="module")
def facility(client_ca: tw.CertAndKey) -> tw.CertAndKey:
    return tw.issue_client_cert(
        client_ca,
        common_name="Sandbox Clinic",
        institution_code="1310000001",
        organization="SANDBOX CLINIC",
        terminal_label="総合受付 端末01",
        now=NOW,
        validity=dt.timedelta(days=3 * 365 + 90),
    )


# ---------------------------------------------------------------------------- HPKI


def test_signer_cert_follows_the_signing_profile(hpki_world: Hpki) -> None:
    cert = hpki_world.doctor
    assert check_signing_profile(cert) == []
    assert parse_hcroles(cert) == ["Medical Doctor"]
    sda = cert.extensions.get_extension_for_oid(SUBJECT_DIRECTORY_ATTRIBUTES_OID)
    assert not sda.critical
    assert isinstance(sda.value, x509.UnrecognizedExtension)
    assert sda.value.value == build_hcrole_extension_value("Medical Doctor")
    info = inspect_certificate(cert)
    assert info.policies == [HPKI_SIGNING_EE_POLICY]
    assert info.key_usage == ["nonRepudiation"]
    assert info.crl_urls == [tw.TEST_SIGN_CRL_URL]
    assert info.subject == ("serialNumber=TEST000001,CN=Taro Shinsatsu,O=SANDBOX CLINIC,C=JP")
    assert info.subject_alt_names == [
        "DirName:serialNumber=TEST000001,CN=診察\u3000太郎,O=サンドボックス診療所,C=JP"
    ]
    assert info.not_before == NOW
    assert info.not_after == NOW + dt.timedelta(days=5 * 365)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert cert.public_key() == hpki_world.doctor_key.public_key()


def test_signer_cert_has_the_real_extension_layout(hpki_world: Hpki) -> None:
    real = x509.load_der_x509_certificate((real_hpki_dir() / "medis_test_doctor.der").read_bytes())

    def layout(cert: x509.Certificate) -> list[tuple[str, bool]]:
        return [(e.oid.dotted_string, e.critical) for e in cert.extensions]

    assert layout(hpki_world.doctor) == layout(real)
    assert [a.oid for a in hpki_world.doctor.subject] == [a.oid for a in real.subject]


def test_signing_ca_mimics_medis(hpki_world: Hpki) -> None:
    ca = hpki_world.ca.cert
    assert "TEST" in ca.subject.rfc4514_string()
    assert "TEST" in hpki_world.root.cert.subject.rfc4514_string()
    cp = ca.extensions.get_extension_for_class(x509.CertificatePolicies)
    assert cp.critical
    assert [p.policy_identifier.dotted_string for p in cp.value] == [SIGNING_CA_POLICY]
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    dp = ca.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name == [x509.UniformResourceIdentifier(tw.TEST_ROOT_ARL_URL)]


def test_signer_cert_chains_to_the_test_root(hpki_world: Hpki) -> None:
    chain = verify_chain(
        hpki_world.doctor,
        intermediates=[hpki_world.ca.cert],
        trust_anchors=[hpki_world.root.cert],
        moment=NOW + dt.timedelta(days=1),
    )
    assert chain == [hpki_world.doctor, hpki_world.ca.cert, hpki_world.root.cert]


def test_signer_cert_does_not_chain_to_the_real_root(hpki_world: Hpki) -> None:
    real_root = x509.load_der_x509_certificate(
        (real_hpki_dir() / "mhlw_hpki_root_ca_v2.cer").read_bytes()
    )
    with pytest.raises(PkiError, match="no valid path"):
        verify_chain(
            hpki_world.doctor,
            intermediates=[hpki_world.ca.cert],
            trust_anchors=[real_root],
            moment=NOW,
        )


def test_same_names_other_keys_fail_the_signature_check(hpki_world: Hpki) -> None:
    # Every test root and CA has the same name: only the signatures tell them apart.
    other_root = tw.make_hpki_root(now=NOW)
    other_ca = tw.make_hpki_signing_ca(other_root, now=NOW)
    assert other_ca.cert.subject == hpki_world.ca.cert.subject
    with pytest.raises(PkiError, match="no valid path"):
        verify_chain(
            hpki_world.doctor,
            intermediates=[other_ca.cert],
            trust_anchors=[hpki_world.root.cert],
            moment=NOW,
        )
    with pytest.raises(PkiError, match="no valid path"):
        verify_chain(
            hpki_world.doctor,
            intermediates=[hpki_world.ca.cert],
            trust_anchors=[other_root.cert],
            moment=NOW,
        )


def test_signer_cert_expires_after_five_years(hpki_world: Hpki) -> None:
    with pytest.raises(PkiError, match="expired"):
        verify_chain(
            hpki_world.doctor,
            intermediates=[hpki_world.ca.cert],
            trust_anchors=[hpki_world.root.cert],
            moment=NOW + dt.timedelta(days=5 * 365 + 1),
        )


def test_signer_cert_options(hpki_world: Hpki) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = tw.issue_hpki_signer_cert(
        hpki_world.ca,
        public_key_der=_spki(key),
        name_romaji="Hanako Chozai",
        name_kanji="調剤\u3000花子",
        role="Pharmacist",
        organization="SANDBOX PHARMACY",
        serial_number_attr="TEST000002",
        now=NOW,
        validity_days=30,
        crl_url="http://127.0.0.1:8081/sign.crl",
    )
    info = inspect_certificate(cert)
    assert info.hc_roles == ["Pharmacist"]
    assert info.crl_urls == ["http://127.0.0.1:8081/sign.crl"]
    assert info.not_after == NOW + dt.timedelta(days=30)
    assert "O=SANDBOX PHARMACY" in info.subject_alt_names[0]
    assert info.conforms_to_signing_profile


def test_signer_cert_refuses_bad_keys(hpki_world: Hpki) -> None:
    ec_spki = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def issue(spki: bytes) -> x509.Certificate:
        return tw.issue_hpki_signer_cert(
            hpki_world.ca,
            public_key_der=spki,
            name_romaji="X",
            name_kanji="X",
            role="Medical Doctor",
            organization="X",
            serial_number_attr="X",
            now=NOW,
        )

    with pytest.raises(PkiError, match="RSA"):
        issue(ec_spki)
    with pytest.raises(PkiError, match="SubjectPublicKeyInfo"):
        issue(b"\x30\x00")


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(PkiError, match="timezone-aware"):
        tw.make_hpki_root(now=dt.datetime(2026, 1, 1))


# ---------------------------------------------------------------------------- client / server


def test_client_cert(client_ca: tw.CertAndKey, facility: tw.CertAndKey) -> None:
    cert = facility.cert
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.content_commitment
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "1310000001"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "総合受付 端末01"
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Sandbox Clinic"
    assert 0 < cert.serial_number < 2**128
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=3 * 365 + 90)
    assert isinstance(facility.key, rsa.RSAPrivateKey)
    assert facility.key.key_size == 2048
    cert.verify_directly_issued_by(client_ca.cert)
    assert "TEST" in client_ca.cert.subject.rfc4514_string()


def test_client_cert_without_institution_code(client_ca: tw.CertAndKey) -> None:
    cert = tw.issue_client_cert(
        client_ca,
        common_name="provisional",
        institution_code=None,
        now=NOW,
        validity=dt.timedelta(days=1),
    ).cert
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER) == []
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []


def test_client_serials_are_random(client_ca: tw.CertAndKey) -> None:
    serials = {tw.random_serial() for _ in range(64)}
    assert len(serials) == 64
    assert all(0 < s < 2**128 for s in serials)


def test_server_cert_verifies_for_its_names() -> None:
    ca = tw.make_server_ca(now=NOW)
    server = tw.issue_server_cert(
        ca,
        hostnames=["localhost", "gateway.test"],
        ips=["127.0.0.1", "::1"],
        now=NOW,
        validity=dt.timedelta(days=90),
    )
    san = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gateway.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = PolicyBuilder().store(Store([ca.cert])).time(NOW + dt.timedelta(hours=1))
    names: list[x509.DNSName | x509.IPAddress] = [
        x509.DNSName("gateway.test"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for name in names:
        chain = builder.build_server_verifier(name).verify(server.cert, [])
        assert chain[-1] == ca.cert
    with pytest.raises(PkiError):
        tw.issue_server_cert(ca, hostnames=[], ips=[], now=NOW, validity=dt.timedelta(days=1))


# ---------------------------------------------------------------------------- files


def test_write_creates_a_private_key_file(tmp_path: Path, facility: tw.CertAndKey) -> None:
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    facility.write(cert_path, key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == facility.cert
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.private_numbers() == facility.key.private_numbers()
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


# ---------------------------------------------------------------------------- CRL


def test_crl_lists_the_revoked_serial(hpki_world: Hpki) -> None:
    revoked_at = NOW - dt.timedelta(hours=2)
    crl = tw.make_crl(
        hpki_world.ca,
        revoked=[
            (hpki_world.doctor.serial_number, revoked_at, x509.ReasonFlags.key_compromise),
            (12345, revoked_at, None),
        ],
        now=NOW,
        next_update=dt.timedelta(days=1),
    )
    assert crl.issuer == hpki_world.ca.cert.subject
    assert crl.is_signature_valid(hpki_world.ca.key.public_key())
    assert not crl.is_signature_valid(hpki_world.root.key.public_key())
    entry = crl.get_revoked_certificate_by_serial_number(hpki_world.doctor.serial_number)
    assert entry is not None
    assert entry.revocation_date_utc == revoked_at
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    plain = crl.get_revoked_certificate_by_serial_number(12345)
    assert plain is not None and len(plain.extensions) == 0
    assert crl.get_revoked_certificate_by_serial_number(99) is None
    assert crl.last_update_utc == NOW
    assert crl.next_update_utc == NOW + dt.timedelta(days=1)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value
    later = tw.make_crl(
        hpki_world.ca, revoked=[], now=NOW + dt.timedelta(minutes=1), next_update=dt.timedelta(1)
    )
    assert later.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > (
        number.crl_number
    )


# ---------------------------------------------------------------------------- PKCS#12


def test_pkcs12_opens_with_cryptography_and_openssl(
    tmp_path: Path, client_ca: tw.CertAndKey, facility: tw.CertAndKey
) -> None:
    password = b"Sandbox-Passw0rd"
    data = tw.pkcs12_bytes(
        facility, chain=[client_ca.cert], password=password, friendly_name=b"client.sandbox"
    )
    loaded = pkcs12.load_pkcs12(data, password)
    assert loaded.cert is not None and loaded.cert.certificate == facility.cert
    assert loaded.cert.friendly_name == b"client.sandbox"
    assert isinstance(loaded.key, rsa.RSAPrivateKey)
    assert loaded.key.private_numbers() == facility.key.private_numbers()
    assert [c.certificate for c in loaded.additional_certs] == [client_ca.cert]
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(data, b"wrong")

    p12 = tmp_path / "client.sandbox.p12"
    p12.write_bytes(data)
    out = subprocess.run(
        ["openssl", "pkcs12", "-in", str(p12), "-passin", "pass:Sandbox-Passw0rd", "-nokeys"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("-----BEGIN CERTIFICATE-----") == 2
    info = subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-in",
            str(p12),
            "-passin",
            "pass:Sandbox-Passw0rd",
            "-info",
            "-noout",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert "AES-256-CBC" in info.stderr + info.stdout
    assert "sha256" in (info.stderr + info.stdout).lower()


def test_pkcs12_needs_a_password(facility: tw.CertAndKey) -> None:
    with pytest.raises(PkiError):
        tw.pkcs12_bytes(facility, chain=[], password=b"", friendly_name=b"x")
