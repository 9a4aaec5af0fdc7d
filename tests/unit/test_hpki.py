"""The HPKI profile against the real MEDIS certificate and against crafted violations."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.errors import PkiError
from gateway.pki import hpki
from gateway.pki.hpki import (
    HCROLE_ATTRIBUTE_OID,
    HCROLE_CODING_SCHEME_OID,
    HPKI_SIGNING_EE_POLICY,
    SUBJECT_DIRECTORY_ATTRIBUTES_OID,
    build_hcrole_extension_value,
    check_signing_profile,
    inspect_certificate,
    load_bundled_anchors,
    parse_hcroles,
    verify_chain,
)


def real_hpki_dir() -> Path:
    """The shared fixtures, a sibling of the repository (../shared/fixtures/real-hpki)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real-hpki"


def load_real(name: str) -> x509.Certificate:
    return x509.load_der_x509_certificate((real_hpki_dir() / name).read_bytes())


REAL_HCROLE_DER = bytes.fromhex(
    "303430320606288185420001312831263024A0223120A00C060A2A830886910F01060101"
    "A2100C0E4D65646963616C20446F63746F72"
)
MOMENT = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def doctor() -> x509.Certificate:
    return load_real("medis_test_doctor.der")


@pytest.fixture(scope="module")
def sign_ca() -> x509.Certificate:
    return load_real("medis_sign_ca.cer")


@pytest.fixture(scope="module")
def root() -> x509.Certificate:
    return load_real("mhlw_hpki_root_ca_v2.cer")


# ---------------------------------------------------------------------------- hcRole DER


def test_build_hcrole_matches_real_der_exactly() -> None:
    assert build_hcrole_extension_value("Medical Doctor") == REAL_HCROLE_DER


def test_real_der_parses_and_reencodes_identically() -> None:
    parsed = hpki.SubjectDirectoryAttributes.load(REAL_HCROLE_DER, strict=True)
    assert parsed[0]["type"].dotted == HCROLE_ATTRIBUTE_OID
    actors = hpki.HCActorData.load(parsed[0]["values"][0].dump(), strict=True)
    coded = actors[0]["coded_data"]
    assert coded["coding_scheme_reference"].dotted == HCROLE_CODING_SCHEME_OID
    assert coded["code_data_free_text"].native == "Medical Doctor"
    assert isinstance(coded["code_data_value"], core.Void)
    # and back: the text read from the real DER rebuilds the real DER byte for byte
    assert build_hcrole_extension_value(coded["code_data_free_text"].native) == REAL_HCROLE_DER


@pytest.mark.parametrize("role", ["Medical Doctor", "Pharmacist", "Director of Clinic", "医師"])
def test_hcrole_round_trip(role: str) -> None:
    assert hpki._hcroles_from_extension_value(build_hcrole_extension_value(role)) == [role]


def test_asn1crypto_re_encodes_an_hpki_certificate_byte_for_byte() -> None:
    """asn1crypto re-encodes a certificate on its own when a DER length ends in 0x80 (it
    takes it for a BER indefinite length); with the hcRole unknown to it, that raised."""
    der = (real_hpki_dir() / "medis_test_doctor.der").read_bytes()
    assert asn1_x509.Certificate.load(der).dump(force=True) == der
    values = asn1_x509.Certificate.load(der).subject_directory_attributes_value[0]["values"]
    assert values[0][0]["coded_data"]["code_data_free_text"].native == "Medical Doctor"


def test_empty_role_is_refused() -> None:
    with pytest.raises(PkiError):
        build_hcrole_extension_value("")


def _attribute(oid: str, value_der: bytes) -> hpki.Attribute:
    return hpki.Attribute({"type": oid, "values": hpki.AttributeValues([core.Any.load(value_der)])})


def _hcrole_value(role: str, scheme: str = HCROLE_CODING_SCHEME_OID) -> bytes:
    coded = hpki.CodedData(
        {
            "coding_scheme_reference": scheme,
            "code_data_free_text": asn1_x509.DirectoryString(name="utf8_string", value=role),
        }
    )
    der: bytes = hpki.HCActorData([hpki.HCActor({"coded_data": coded})]).dump()
    return der


def test_other_attributes_and_other_schemes_are_ignored() -> None:
    date_of_birth = core.GeneralizedTime(dt.datetime(1980, 1, 1, tzinfo=dt.UTC)).dump()
    sda = hpki.SubjectDirectoryAttributes(
        [
            _attribute("1.3.6.1.5.5.7.9.1", date_of_birth),  # dateOfBirth
            _attribute(HCROLE_ATTRIBUTE_OID, _hcrole_value("Arzt", scheme="1.2.276.0.76.4.1")),
            _attribute(HCROLE_ATTRIBUTE_OID, _hcrole_value("Medical Doctor")),
        ]
    ).dump()
    assert hpki._hcroles_from_extension_value(sda) == ["Medical Doctor"]


@pytest.mark.parametrize(
    "der_hex",
    [
        "3003020101",  # SEQUENCE OF INTEGER, not of Attribute
        "30",  # truncated header
        REAL_HCROLE_DER.hex()[:-2],  # truncated content
        REAL_HCROLE_DER.hex() + "00",  # trailing garbage
        "300F300D06062881854200013103020101",  # hcRole whose value is an INTEGER
    ],
)
def test_malformed_der_raises_pki_error(der_hex: str) -> None:
    with pytest.raises(PkiError, match="malformed subjectDirectoryAttributes"):
        hpki._hcroles_from_extension_value(bytes.fromhex(der_hex))


# ---------------------------------------------------------------------------- the real cert


def test_real_doctor_certificate(doctor: x509.Certificate) -> None:
    assert parse_hcroles(doctor) == ["Medical Doctor"]
    assert check_signing_profile(doctor) == []
    info = inspect_certificate(doctor)
    assert info.conforms_to_signing_profile
    assert info.hc_roles == ["Medical Doctor"]
    assert info.policies == [HPKI_SIGNING_EE_POLICY]
    assert info.key_usage == ["nonRepudiation"]
    assert info.crl_urls == ["http://cert.medis.or.jp/sign/crl-sign2.crl"]
    assert info.serial == 350
    assert info.serial_hex == "015E"
    assert info.subject == (
        "serialNumber=Test117120,CN=Sanjushi Kagurazaka,O=MEDIS UNIVERSITY HOSPITAL,C=JP"
    )
    assert info.issuer == "CN=HPKI-01-MedisSignCA2-forNonRepudiation,OU=MEDIS HPKI CA,O=MEDIS,C=JP"
    assert info.not_before == dt.datetime(2022, 2, 6, 15, 0, 0, tzinfo=dt.UTC)
    assert info.not_after == dt.datetime(2027, 2, 7, 14, 59, 59, tzinfo=dt.UTC)
    assert info.not_before.utcoffset() == dt.timedelta(0)
    assert info.subject_alt_names == [
        "DirName:serialNumber=Test117120,CN=神楽坂\u3000三十四,O=医療情報大学病院,C=JP"
    ]


def test_json_dict_is_serialisable_and_readable(doctor: x509.Certificate) -> None:
    data = inspect_certificate(doctor).to_json_dict()
    text = json.dumps(data, ensure_ascii=False)
    assert "神楽坂" in text
    assert data["serial"] == "350"
    assert data["serial_hex"] == "015E"
    assert data["not_after"] == "2027-02-07T14:59:59+00:00"
    assert data["conforms_to_signing_profile"] is True


def test_ca_certificates_do_not_conform(sign_ca: x509.Certificate, root: x509.Certificate) -> None:
    problems = check_signing_profile(sign_ca)
    assert "a CA certificate cannot be a signing certificate" in problems
    assert any("hcRole" in p for p in problems)
    assert not inspect_certificate(root).conforms_to_signing_profile


# ---------------------------------------------------------------------------- chains


def test_real_chain_validates(
    doctor: x509.Certificate, sign_ca: x509.Certificate, root: x509.Certificate
) -> None:
    chain = verify_chain(doctor, intermediates=[sign_ca], trust_anchors=[root], moment=MOMENT)
    assert chain == [doctor, sign_ca, root]


def test_real_chain_with_all_bundled_certs(doctor: x509.Certificate) -> None:
    bundled = load_bundled_anchors()
    roots = [bundled[n] for n in ("mhlw_hpki_root_ca_v2", "jpki_sign_ca02", "jpki_sign_ca03")]
    intermediates = [bundled["medis_auth_ca"], bundled["medis_sign_ca"]]
    chain = verify_chain(doctor, intermediates=intermediates, trust_anchors=roots, moment=MOMENT)
    assert chain[-1] == bundled["mhlw_hpki_root_ca_v2"]


def test_wrong_anchor_fails(doctor: x509.Certificate, sign_ca: x509.Certificate) -> None:
    with pytest.raises(PkiError, match="no valid path"):
        verify_chain(
            doctor,
            intermediates=[sign_ca],
            trust_anchors=[load_real("jpki_sign_ca03.cer")],
            moment=MOMENT,
        )


def test_expired_fails(
    doctor: x509.Certificate, sign_ca: x509.Certificate, root: x509.Certificate
) -> None:
    with pytest.raises(PkiError, match="expired at 2027-02-07"):
        verify_chain(
            doctor,
            intermediates=[sign_ca],
            trust_anchors=[root],
            moment=dt.datetime(2028, 1, 1, tzinfo=dt.UTC),
        )


def test_not_yet_valid_fails(
    doctor: x509.Certificate, sign_ca: x509.Certificate, root: x509.Certificate
) -> None:
    with pytest.raises(PkiError, match="not valid before"):
        verify_chain(
            doctor,
            intermediates=[sign_ca],
            trust_anchors=[root],
            moment=dt.datetime(2021, 1, 1, tzinfo=dt.UTC),
        )


@pytest.mark.parametrize("intermediates", [[], ["medis_auth_ca.cer"]])
def test_missing_or_wrong_intermediate_fails(
    doctor: x509.Certificate, root: x509.Certificate, intermediates: list[str]
) -> None:
    with pytest.raises(PkiError, match="no valid path"):
        verify_chain(
            doctor,
            intermediates=[load_real(n) for n in intermediates],
            trust_anchors=[root],
            moment=MOMENT,
        )


def test_bad_arguments(
    doctor: x509.Certificate, sign_ca: x509.Certificate, root: x509.Certificate
) -> None:
    with pytest.raises(PkiError, match="timezone-aware"):
        verify_chain(
            doctor, intermediates=[sign_ca], trust_anchors=[root], moment=dt.datetime(2026, 6, 1)
        )
    with pytest.raises(PkiError, match="no trust anchors"):
        verify_chain(doctor, intermediates=[sign_ca], trust_anchors=[], moment=MOMENT)


def test_bundled_anchors_are_the_fixture_certificates() -> None:
    bundled = load_bundled_anchors()
    assert set(bundled) == {
        "mhlw_hpki_root_ca_v2",
        "medis_sign_ca",
        "medis_auth_ca",
        "jpki_sign_ca01",
        "jpki_sign_ca02",
        "jpki_sign_ca03",
    }
    for name, cert in bundled.items():
        fixture = (real_hpki_dir() / f"{name}.cer").read_bytes()
        assert cert.public_bytes(serialization.Encoding.DER) == fixture


# ---------------------------------------------------------------------------- violations

_ISSUER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_SUBJECT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ku(**bits: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{n: bits.get(n, False) for n in names})


_NON_REPUDIATION = _ku(content_commitment=True)
_SIGNING_POLICIES = x509.CertificatePolicies(
    [x509.PolicyInformation(x509.ObjectIdentifier(HPKI_SIGNING_EE_POLICY), None)]
)


def _sda(der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(SUBJECT_DIRECTORY_ATTRIBUTES_OID, der)


Ext = tuple[x509.ExtensionType, bool]


def _good_extensions() -> dict[str, Ext]:
    return {
        "sda": (_sda(REAL_HCROLE_DER), False),
        "cp": (_SIGNING_POLICIES, True),
        "ku": (_NON_REPUDIATION, True),
    }


def _make_cert(
    extensions: dict[str, Ext],
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = _SUBJECT_KEY,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "profile test")])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    for ext, critical in extensions.values():
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(_ISSUER_KEY, hashes.SHA256())


def _with(**changes: Ext | None) -> Callable[[], dict[str, Ext]]:
    def build() -> dict[str, Ext]:
        exts = _good_extensions()
        for k, v in changes.items():
            if v is None:
                exts.pop(k, None)
            else:
                exts[k] = v
        return exts

    return build


def _two_roles() -> bytes:
    sda = hpki.SubjectDirectoryAttributes.load(build_hcrole_extension_value("Medical Doctor"))
    der: bytes = hpki.SubjectDirectoryAttributes(
        [sda[0], hpki.SubjectDirectoryAttributes.load(build_hcrole_extension_value("Dentist"))[0]]
    ).dump()
    return der


_AUTH_POLICIES = x509.CertificatePolicies(
    [x509.PolicyInformation(x509.ObjectIdentifier("1.2.392.100495.1.5.1.2.0.1"), None)]
)


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        (_with(sda=None), "no hcRole"),
        (_with(sda=(_sda(_two_roles()), False)), "exactly one hcRole expected, found 2"),
        (_with(sda=(_sda(b"\x30\x03\x02\x01\x01"), False)), "malformed subjectDirectoryAttributes"),
        (_with(cp=None), "certificatePolicies missing"),
        (_with(cp=(_SIGNING_POLICIES, False)), "certificatePolicies must be critical"),
        (_with(cp=(_AUTH_POLICIES, True)), "no policy under the HPKI signing CP"),
        (_with(ku=None), "keyUsage missing"),
        (_with(ku=(_NON_REPUDIATION, False)), "keyUsage must be critical"),
        (_with(ku=(_ku(digital_signature=True), True)), "nonRepudiation only"),
        (
            _with(ku=(_ku(digital_signature=True, content_commitment=True), True)),
            "nonRepudiation only",
        ),
        (
            _with(bc=(x509.BasicConstraints(ca=True, path_length=None), True)),
            "a CA certificate cannot be a signing certificate",
        ),
    ],
    ids=[
        "no-hcrole",
        "two-hcroles",
        "malformed-hcrole",
        "no-policies",
        "noncritical-policies",
        "auth-policy-only",
        "no-keyusage",
        "noncritical-keyusage",
        "digitalsignature-only",
        "digitalsignature-too",
        "ca-cert",
    ],
)
def test_profile_violations(extensions: Callable[[], dict[str, Ext]], expected: str) -> None:
    cert = _make_cert(extensions())
    problems = check_signing_profile(cert)
    assert len(problems) == 1, problems
    assert expected in problems[0]
    info = inspect_certificate(cert)  # never raises, even for malformed DER
    assert not info.conforms_to_signing_profile
    assert info.profile_problems == problems


def test_well_formed_crafted_cert_conforms() -> None:
    assert check_signing_profile(_make_cert(_good_extensions())) == []


def test_small_and_non_rsa_keys_are_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    assert check_signing_profile(_make_cert(_good_extensions(), key=small)) == [
        "RSA key of 1024 bits, at least 2048 required"
    ]
    ec_key = ec.generate_private_key(ec.SECP256R1())
    [problem] = check_signing_profile(_make_cert(_good_extensions(), key=ec_key))
    assert "RSA" in problem


def test_the_default_trust_is_the_bundled_roots_over_the_bundled_issuing_cas() -> None:
    bundled = load_bundled_anchors()
    anchors, intermediates = hpki.default_trust("verify")
    assert bundled["mhlw_hpki_root_ca_v2"] in anchors and bundled["jpki_sign_ca01"] in anchors
    assert bundled["medis_sign_ca"] in intermediates and bundled["medis_auth_ca"] in intermediates
    assert all(c.subject == c.issuer for c in anchors)
    assert all(c.subject != c.issuer for c in intermediates)
    assert len(anchors) + len(intermediates) == len(bundled)
    # A signer's certificate may chain only to the HPKI root through the MEDIS signing CA.
    assert hpki.default_trust("signer") == (
        [bundled["mhlw_hpki_root_ca_v2"]],
        [bundled["medis_sign_ca"]],
    )
