"""A software KeyHandle for unit tests that need no HSM (the integration tests use SoftHSM)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.hsm.api import DigestAlgorithm
from gateway.sandbox import testworld
from gateway.verify import TrustConfig

_HASHES = {
    DigestAlgorithm.SHA256: hashes.SHA256(),
    DigestAlgorithm.SHA384: hashes.SHA384(),
    DigestAlgorithm.SHA512: hashes.SHA512(),
}


class SoftwareKeyHandle:
    """KeyHandle over a cryptography RSA key: same contract as the key stores' handles."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key

    @property
    def key_id(self) -> str:
        return "software"

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        return self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(_HASHES[algorithm]))

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        return [await self.sign_digest(d, algorithm) for d in digests]


@dataclass
class World:
    root: testworld.CertAndKey
    ca: testworld.CertAndKey
    signer_key: rsa.RSAPrivateKey
    signer_cert: x509.Certificate
    tsa_ca: testworld.CertAndKey
    tsa: testworld.CertAndKey

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.ca.cert, self.root.cert]

    def handle(self) -> SoftwareKeyHandle:
        return SoftwareKeyHandle(self.signer_key)

    def trust(self, **kw: Any) -> TrustConfig:
        """A verifier trusting this world's root through its CA, revocation not checked unless
        ``kw`` says otherwise (``kw`` adds or overrides TrustConfig's fields)."""
        fields: dict[str, Any] = {
            "anchors": [self.root.cert],
            "intermediates": [self.ca.cert],
            "check_revocation": False,
        }
        return TrustConfig(**{**fields, **kw})


def make_world(role: str = "Medical Doctor", *, now: dt.datetime | None = None) -> World:
    now = now or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    root = testworld.make_hpki_root(now=now)
    ca = testworld.make_hpki_signing_ca(root, now=now)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert = testworld.issue_hpki_signer_cert(
        ca,
        public_key_der=spki,
        name_romaji="Taro Test",
        name_kanji="試験　太郎",
        role=role,
        organization="HPKI TEST FACILITY",
        serial_number_attr="TEST0001",
        now=now,
    )
    tsa_ca = testworld.make_tsa_ca(now=now)
    tsa = testworld.issue_tsa_cert(tsa_ca, now=now)
    return World(root=root, ca=ca, signer_key=key, signer_cert=cert, tsa_ca=tsa_ca, tsa=tsa)
