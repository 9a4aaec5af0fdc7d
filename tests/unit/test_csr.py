"""CSRs signed through the KeyHandle protocol, checked by cryptography and by openssl."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

from gateway.errors import PkiError
from gateway.hsm.api import DigestAlgorithm, KeyHandle
from gateway.pki.csr import build_csr, csr_pem, public_key_matches
from gateway.pki.hpki import check_signing_profile
from gateway.sandbox import testworld as tw

_HASHES: dict[DigestAlgorithm, hashes.HashAlgorithm] = {
    DigestAlgorithm.SHA256: hashes.SHA256(),
    DigestAlgorithm.SHA384: hashes.SHA384(),
    DigestAlgorithm.SHA512: hashes.SHA512(),
}


class SoftKeyHandle:
    """A KeyHandle over a software key: PKCS#1 v1.5 over DigestInfo of a precomputed digest."""

    def __init__(self, key: rsa.RSAPrivateKey, key_id: str = "01ab") -> None:
        self._key = key
        self._key_id = key_id
        self.calls: list[tuple[bytes, DigestAlgorithm]] = []

    @property
    def key_id(self) -> str:
        return self._key_id

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        self.calls.append((digest, algorithm))
        hash_algorithm = _HASHES[algorithm]
        return self._key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hash_algorithm))

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        return [await self.sign_digest(d, algorithm) for d in digests]


def _spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SANDBOX CLINIC"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Taro Shinsatsu"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "TEST000001"),
    ]
)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_soft_handle_satisfies_the_protocol(rsa_key: rsa.RSAPrivateKey) -> None:
    assert isinstance(SoftKeyHandle(rsa_key), KeyHandle)


@pytest.mark.parametrize(
    ("digest", "hash_name"),
    [
        (DigestAlgorithm.SHA256, "sha256"),
        (DigestAlgorithm.SHA384, "sha384"),
        (DigestAlgorithm.SHA512, "sha512"),
    ],
)
async def test_csr_is_valid(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path, digest: DigestAlgorithm, hash_name: str
) -> None:
    handle = SoftKeyHandle(rsa_key)
    der = await build_csr(public_key_der=_spki(rsa_key), subject=SUBJECT, key=handle, digest=digest)
    assert len(handle.calls) == 1 and handle.calls[0][1] is digest

    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid
    assert csr.subject == SUBJECT
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == hash_name
    assert _spki_of(csr.public_key()) == _spki(rsa_key)
    assert len(csr.attributes) == 0

    path = tmp_path / "req.der"
    path.write_bytes(der)
    proc = await asyncio.create_subprocess_exec(
        *["openssl", "req", "-verify", "-inform", "DER", "-in", str(path), "-noout"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, output
    assert b"verify OK" in output


def _spki_of(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_csr_pem_round_trip(rsa_key: rsa.RSAPrivateKey) -> None:
    der = await build_csr(
        public_key_der=_spki(rsa_key), subject=SUBJECT, key=SoftKeyHandle(rsa_key)
    )
    text = csr_pem(der)
    assert text.startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    assert text.rstrip().endswith("-----END CERTIFICATE REQUEST-----")
    csr = x509.load_pem_x509_csr(text.encode())
    assert csr.public_bytes(serialization.Encoding.DER) == der


async def test_kanji_subject_survives(rsa_key: rsa.RSAPrivateKey) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "診察\u3000太郎")])
    der = await build_csr(
        public_key_der=_spki(rsa_key), subject=subject, key=SoftKeyHandle(rsa_key)
    )
    assert x509.load_der_x509_csr(der).subject == subject


async def test_mismatched_key_handle_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(PkiError, match="not a pair"):
        await build_csr(public_key_der=_spki(rsa_key), subject=SUBJECT, key=SoftKeyHandle(other))


async def test_non_rsa_and_garbage_keys_are_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    handle = SoftKeyHandle(rsa_key)
    ec_spki = _spki(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(PkiError, match="only RSA"):
        await build_csr(public_key_der=ec_spki, subject=SUBJECT, key=handle)
    with pytest.raises(PkiError, match="SubjectPublicKeyInfo"):
        await build_csr(public_key_der=b"not der", subject=SUBJECT, key=handle)
    assert handle.calls == []  # nothing was signed


async def test_csr_to_signer_certificate(rsa_key: rsa.RSAPrivateKey) -> None:
    """The enrolment path: CSR from the key store, certificate from the (test) CA, match."""
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    root = tw.make_hpki_root(now=now)
    ca = tw.make_hpki_signing_ca(root, now=now)
    csr = x509.load_der_x509_csr(
        await build_csr(public_key_der=_spki(rsa_key), subject=SUBJECT, key=SoftKeyHandle(rsa_key))
    )
    cert = tw.issue_hpki_signer_cert(
        ca,
        public_key_der=_spki_of(csr.public_key()),
        name_romaji="Taro Shinsatsu",
        name_kanji="診察\u3000太郎",
        role="Medical Doctor",
        organization="SANDBOX CLINIC",
        serial_number_attr="TEST000001",
        now=now,
    )
    assert check_signing_profile(cert) == []
    assert public_key_matches(cert, _spki(rsa_key))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert not public_key_matches(cert, _spki(other))
    assert not public_key_matches(cert, _spki(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(PkiError):
        public_key_matches(cert, b"\x30\x00")
