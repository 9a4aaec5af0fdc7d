"""Real pcscd with vpcd virtual readers for the tests (see gateway.vcard.pcscd).

One private pcscd per test session: libpcsclite reads ``PCSCLITE_CSOCK_NAME`` once per process,
so every in-process PC/SC client (pyscard, the card client) talks to this instance. Missing
pcscd/vpcd/namespaces make the fixture FAIL with what to install; it never skips.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.pki.issue import CertAndKey
from gateway.sandbox.jpki import issue_auth_cert, make_test_jpki_ca
from gateway.vcard.jpki import JpkiApplet
from gateway.vcard.pcscd import Pcscd, start_pcscd
from gateway.vcard.vpcd import VirtualReader
from tests.support.local import CardWorld, make_card_world


@dataclass
class PcscWorld:
    pcscd: Pcscd
    readers: list[VirtualReader]

    @property
    def socket(self) -> str:
        return str(self.pcscd.socket_path)

    def env(self) -> dict[str, str]:
        """Environment for a PC/SC client subprocess (pcsc_scan, opensc-tool, the CLI)."""
        return {**os.environ, "PCSCLITE_CSOCK_NAME": self.socket}


@pytest.fixture(scope="session")
def pcsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscWorld]:
    base = tmp_path_factory.mktemp("pcscd")
    inst = start_pcscd(base)  # raises PcscdUnavailable (a failure) when parts are missing
    os.environ["PCSCLITE_CSOCK_NAME"] = str(inst.socket_path)
    readers = [inst.reader(0), inst.reader(1)]
    try:
        yield PcscWorld(pcscd=inst, readers=readers)
    finally:
        for r in readers:
            r.remove()
        inst.stop()


@pytest.fixture
def hpki_slot(pcsc: PcscWorld) -> Iterator[VirtualReader]:
    """The first virtual reader, emptied after the test (the local signing tests' slot)."""
    reader = pcsc.readers[0]
    yield reader
    reader.remove()


@pytest.fixture(scope="session")
def card_world(tmp_path_factory: pytest.TempPathFactory) -> CardWorld:
    """TEST HPKI CAs (with CRLs) issuing the virtual HPKI cards of the local signing tests."""
    return make_card_world(tmp_path_factory.mktemp("cardworld"))


@dataclass
class TestCard:
    applet: JpkiApplet
    key: rsa.RSAPrivateKey
    cert_der: bytes
    ca: CertAndKey


_JPKI_CA: list[CertAndKey] = []


def shared_jpki_ca() -> CertAndKey:
    if not _JPKI_CA:
        _JPKI_CA.append(make_test_jpki_ca(now=dt.datetime.now(dt.UTC)))
    return _JPKI_CA[0]


def make_card(
    *,
    pin: str = "1234",
    ca: CertAndKey | None = None,
    token: str = "JPKIAPICCTOKEN2",  # noqa: S107
    **kw: object,
) -> TestCard:
    ca = ca or shared_jpki_ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_auth_cert(ca, key.public_key(), now=dt.datetime.now(dt.UTC), **kw)  # type: ignore[arg-type]
    der = cert.public_bytes(serialization.Encoding.DER)
    applet = JpkiApplet(
        auth_key=key,
        auth_cert_der=der,
        auth_ca_der=ca.cert.public_bytes(serialization.Encoding.DER),
        pin=pin,
        token=token,
    )
    return TestCard(applet=applet, key=key, cert_der=der, ca=ca)


def card_pem(path: Path, der: bytes) -> Path:
    from cryptography import x509

    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    return path
