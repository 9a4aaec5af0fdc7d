"""PAdES B-LT and B-LTA with pyHanko (EN 319 142-1): the DSS dictionary with the signer's and
the TSA's certificates and CRLs, and for B-LTA a document timestamp over it.

pyHanko builds both (``embed_validation_info``, ``use_pades_lta``); the gateway hands it a
validation context made of the chain and the CRLs gathered beforehand
(:func:`gateway.sign.xades_ltv.signer_validation_data`: configured files or cached downloads),
with fetching off: pyHanko never goes to the network on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.sign.xades_ltv import LongTerm

__all__ = ["validation_context"]


def _a(c: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER))


def validation_context(
    chain: Sequence[x509.Certificate], long_term: LongTerm
) -> Any:  # pyhanko_certvalidator.ValidationContext
    from pyhanko_certvalidator import ValidationContext

    certs = [chain[0], *long_term.signer.certs]
    roots = [c for c in certs if c.subject == c.issuer] + [c for c in long_term.source.tsa_anchors]
    others = [c for c in certs if c.subject != c.issuer]
    crls = [*long_term.signer.crls, *long_term.source.crls.local_crls()]
    from asn1crypto import ocsp as asn1_ocsp

    return ValidationContext(
        ocsps=[asn1_ocsp.OCSPResponse.load(d) for d in long_term.signer.ocsps],
        trust_roots=[_a(c) for c in roots],
        other_certs=[_a(c) for c in others],
        crls=[
            asn1_crl.CertificateList.load(c.public_bytes(serialization.Encoding.DER)) for c in crls
        ],
        allow_fetching=False,
        # The signer's CRLs were gathered before signing (a missing one refused the request);
        # a TEST TSA without any CRL must not stop pyHanko.
        revocation_mode="soft-fail",
    )
