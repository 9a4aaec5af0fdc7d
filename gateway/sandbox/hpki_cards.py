"""The sandbox's virtual HPKI cards: a key and a signing certificate from the TEST HPKI
signing CA, in an :class:`gateway.vcard.hpki.HpkiApplet` (a doctor's, a pharmacist's).

``sandbox init`` writes one card per doctor and pharmacist next to the signer's My Number card
(DIR/cards/<signer>/hpki.key, hpki.pem, hpki.pin: the card's key never leaves the emulator);
``sandbox cards up`` puts it in the second reader of that signer's pcscd."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.errors import ConfigError
from gateway.files import write_private
from gateway.pki.hpki import parse_hcroles
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
    names: tuple[str, str] | None = None,
) -> x509.Certificate:
    romaji, kanji = names or ROLE_NAMES.get(role, ("Test Signer", "試験 署名者"))
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


CARD_ROLES = ("Medical Doctor", "Dentist", "Pharmacist")


def build_hpki_cards(d: Path, *, now: dt.datetime, signers: list[dict[str, Any]]) -> None:
    """One virtual HPKI card per doctor and pharmacist in DIR/cards/<signer id>."""
    ca_key = serialization.load_pem_private_key(
        (d / "pki" / "hpki-signing-ca.key").read_bytes(), None
    )
    if not isinstance(ca_key, rsa.RSAPrivateKey):
        raise ConfigError(f"{d}/pki/hpki-signing-ca.key is not an RSA key")
    ca_cert = x509.load_pem_x509_certificate((d / "pki" / "hpki-signing-ca.pem").read_bytes())
    ca = CertAndKey(cert=ca_cert, key=ca_key)
    for s in signers:
        if s["role"] not in CARD_ROLES:
            continue
        card = d / "cards" / str(s["id"])
        card.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = issue_card_cert(
            ca, key, role=str(s["role"]), now=now, names=(str(s["name"]), str(s["name_kanji"]))
        )
        write_private(
            card / "hpki.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        (card / "hpki.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(card / "hpki.pin", f"{secrets.randbelow(10**6):06d}".encode())


def has_hpki_card(card_dir: Path) -> bool:
    return (card_dir / "hpki.key").exists()


def load_hpki_card(card_dir: Path) -> HpkiApplet:
    key = serialization.load_pem_private_key((card_dir / "hpki.key").read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{card_dir}/hpki.key is not an RSA key")
    cert = x509.load_pem_x509_certificate((card_dir / "hpki.pem").read_bytes())
    return HpkiApplet(
        key=key,
        cert_der=cert.public_bytes(serialization.Encoding.DER),
        pin=(card_dir / "hpki.pin").read_text().strip(),
    )


def hpki_manifest_entry(card_dir: Path, *, reader: str, pcsc_socket: str) -> dict[str, Any]:
    cert = x509.load_pem_x509_certificate((card_dir / "hpki.pem").read_bytes())
    return {
        "signer": card_dir.name,
        "kind": "hpki",
        "reader": reader,
        "pin": (card_dir / "hpki.pin").read_text().strip(),
        "pcsc_socket": pcsc_socket,
        "role": (parse_hcroles(cert) or [""])[0],
        "certificate": str(card_dir / "hpki.pem"),
    }
