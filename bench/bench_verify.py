"""Long-term verification of the real e-prescription in process, beside signxml's verifier.

  verify_eprescription_xl_per_s  gateway.verify on Prescription-004_01.xml (ES-XL): structure,
                                 every reference, the signature value, the XAdES schema, the
                                 signature timestamp and its TSA chain, the signer's path and
                                 revocation from the CRLs it carries, profile and role
  signxml_verify_per_s           signxml's XAdESVerifier on the same file (the signature only)

Rounds alternate between the two (base, ours, base, ours, ...) so that machine load hits both
alike; each result is the median of its rounds.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "fixtures" / "e-prescription" / "Prescription-004_01.xml"
MHLW_ROOT = REPO.parent / "shared" / "fixtures" / "real-hpki" / "mhlw_hpki_root_ca_v2.cer"
XADES = "{http://uri.etsi.org/01903/v1.3.2#}"
DS = "{http://www.w3.org/2000/09/xmldsig#}"
ROUNDS = 5
SECONDS = 1.0


def _rate(fn: Callable[[], None]) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def run() -> dict[str, float]:
    from signxml import SignatureConfiguration
    from signxml.xades import XAdESVerifier

    from gateway.verify import TrustConfig, verify_document

    data = SAMPLE.read_bytes()
    tree = etree.fromstring(data)
    tsa_root = None
    for el in tree.iter(XADES + "EncapsulatedX509Certificate"):
        c = x509.load_der_x509_certificate(base64.b64decode(el.text or ""))
        if c.subject == c.issuer and "TimeStampServer" in c.subject.rfc4514_string():
            tsa_root = c
    ki = tree.find(f".//{DS}KeyInfo/{DS}X509Data/{DS}X509Certificate")
    assert ki is not None and tsa_root is not None
    signer = x509.load_der_x509_certificate(base64.b64decode(ki.text or ""))
    trust = TrustConfig(
        anchors=[x509.load_der_x509_certificate(MHLW_ROOT.read_bytes())], tsa_anchors=[tsa_root]
    )
    loop = asyncio.new_event_loop()

    def ours() -> None:
        rep = loop.run_until_complete(verify_document(data, trust=trust))
        assert rep.indication == "TOTAL-PASSED", rep.reason

    config = SignatureConfiguration(expect_references=3)
    pem = signer.public_bytes(serialization.Encoding.PEM)

    def base() -> None:
        XAdESVerifier().verify(data, x509_cert=pem.decode(), expect_config=config)

    base()
    ours()
    theirs_rates, our_rates = [], []
    for _ in range(ROUNDS):
        theirs_rates.append(_rate(base))
        our_rates.append(_rate(ours))
    loop.close()
    return {
        "verify_eprescription_xl_per_s": statistics.median(our_rates),
        "signxml_verify_per_s": statistics.median(theirs_rates),
    }


if __name__ == "__main__":
    print(run())
