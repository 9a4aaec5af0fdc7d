"""The sandbox's virtual HPKI cards: a key and a signing certificate from the TEST HPKI
signing CA, in an :class:`gateway.vcard.hpki.HpkiApplet` (a doctor's, a pharmacist's)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.pki.issue import CertAndKey
from gateway.sandbox import testworld
from gateway.vcard.hpki import PROFILE_PKCS15, CardLayout, HpkiApplet

ROLE_NAMES = {
    "Medical Doctor": ("Yamada Taro", "山田 太郎"),
    "Pharmacist": ("Sato Hanako", "佐藤 花子"),
}


@dataclass
class HpkiTestCard:
    applet: HpkiApplet
    key: rsa.RSAPrivateKey
    cert: x509.Certificate


def issue_card_cert(
    ca: CertAndKey,
    key: rsa.RSAPrivateKey,
    *,
    role: str,
    now: dt.datetime,
    validity_days: int = 5 * 365,
    crl_url: str | None = None,
) -> x509.Certificate:
    romaji, kanji = ROLE_NAMES.get(role, ("Test Signer", "試験 署名者"))
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return testworld.issue_hpki_signer_cert(
        ca,
        crl_url=crl_url,
        public_key_der=spki,
        name_romaji=romaji,
        name_kanji=kanji,
        role=role,
        organization="HPKI TEST card holder",
        serial_number_attr=f"CARD{key.public_key().public_numbers().n % 10**8:08d}",
        now=now,
        validity_days=validity_days,
    )


def make_hpki_card(
    ca: CertAndKey,
    *,
    role: str = "Medical Doctor",
    pin: str = "123456",
    now: dt.datetime | None = None,
    validity_days: int = 5 * 365,
    layout: CardLayout = PROFILE_PKCS15,
    extended_length: bool = True,
    crl_url: str | None = None,
    key: rsa.RSAPrivateKey | None = None,
) -> HpkiTestCard:
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_card_cert(
        ca,
        key,
        role=role,
        now=now or dt.datetime.now(dt.UTC),
        validity_days=validity_days,
        crl_url=crl_url,
    )
    applet = HpkiApplet(
        key=key,
        cert_der=cert.public_bytes(serialization.Encoding.DER),
        pin=pin,
        layout=layout,
        extended_length=extended_length,
    )
    return HpkiTestCard(applet=applet, key=key, cert=cert)
