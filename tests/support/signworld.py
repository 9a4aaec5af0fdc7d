"""A signing world on a real SoftHSM key: TEST HPKI CAs, a signer certificate for an HSM key.

The key lives on a token of the process-wide SoftHSM conf (``process_token``); the CA keys are
software keys of the test world, as in the sandbox. Used by the interop tests and the bench.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import HsmUnavailable
from gateway.hsm.api import StoreKeyHandle
from gateway.hsm.pkcs11 import Pkcs11KeyStore
from gateway.sandbox import testworld


@dataclass
class SignWorld:
    store: Pkcs11KeyStore
    key: StoreKeyHandle
    root: testworld.CertAndKey
    ca: testworld.CertAndKey
    cert: x509.Certificate
    other_cert: x509.Certificate  # same CA, another key: for "swapped certificate" cases
    pharmacist_cert: x509.Certificate  # the SAME HSM key with a Pharmacist hcRole
    dir: Path

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.cert, self.ca.cert, self.root.cert]

    def write(self, name: str, data: bytes) -> Path:
        p = self.dir / name
        p.write_bytes(data)
        return p


def _issue(ca: testworld.CertAndKey, spki: bytes, role: str, name: str) -> x509.Certificate:
    return testworld.issue_hpki_signer_cert(
        ca,
        public_key_der=spki,
        name_romaji=name,
        name_kanji=name,
        role=role,
        organization="HPKI TEST FACILITY",
        serial_number_attr=name.upper().replace(" ", ""),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
    )


def make_sign_world(
    *, module_path: str, token_label: str, pin: str, conf: Path, directory: Path
) -> SignWorld:
    async def setup() -> tuple[Pkcs11KeyStore, StoreKeyHandle, bytes]:
        store = Pkcs11KeyStore(
            module_path=module_path, token_label=token_label, pin=pin, softhsm_conf=conf
        )
        try:
            await store.open()
        except HsmUnavailable:
            # SoftHSM lists tokens as of C_Initialize: a token made after another test module
            # initialised the library is found only after the re-initialisation that the
            # store's second attempt does.
            await store.open()
        gen = await store.generate_rsa_key(label="issue4-signer")
        key = await store.get_key(gen.key_id)
        assert isinstance(key, StoreKeyHandle)
        return store, key, gen.public_key_der

    store, key, spki = asyncio.run(setup())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    root = testworld.make_hpki_root(now=now)
    ca = testworld.make_hpki_signing_ca(root, now=now)
    other = (
        testworld.new_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root.pem").write_bytes(root.cert_pem())
    (directory / "ca.pem").write_bytes(ca.cert_pem())
    (directory / "chain.pem").write_bytes(ca.cert_pem() + root.cert_pem())
    crls = [
        testworld.make_crl(c, revoked=[], now=now, next_update=dt.timedelta(days=2))
        for c in (root, ca)
    ]
    for name, crl in zip(("root.crl", "ca.crl"), crls, strict=True):
        (directory / name).write_bytes(crl.public_bytes(serialization.Encoding.DER))
    return SignWorld(
        store=store,
        key=key,
        root=root,
        ca=ca,
        cert=_issue(ca, spki, "Medical Doctor", "Taro Shinsatsu"),
        other_cert=_issue(ca, other, "Medical Doctor", "Hanako Geka"),
        pharmacist_cert=_issue(ca, spki, "Pharmacist", "Jiro Chozai"),
        dir=directory,
    )
