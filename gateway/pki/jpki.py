"""JPKI (My Number card) user-authentication certificates: the real roots and their names.

The real roots of every generation share one subject name (HPKI.md §4), so nothing here or
in :mod:`gateway.auth.jpki` ever picks an issuer by name alone. The sandbox's TEST JPKI CA
(:mod:`gateway.sandbox.jpki`) carries that same name on purpose.
"""

from __future__ import annotations

from importlib import resources

from cryptography import x509
from cryptography.x509.oid import NameOID

JPKI_AUTH_ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "JPKI"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "JPKI for user authentication"),
        x509.NameAttribute(
            NameOID.ORGANIZATIONAL_UNIT_NAME,
            "Japan Agency for Local Authority Information Systems",
        ),
    ]
)
#: Certificate policy of JPKI user-authentication certificates (利用者証明用電子証明書).
JPKI_AUTH_POLICY = x509.ObjectIdentifier("1.2.392.200149.8.5.1.3.30")


def load_auth_roots() -> list[x509.Certificate]:
    """The real JPKI user-authentication roots bundled in ``anchors/jpki_auth`` (public data)."""
    directory = resources.files("gateway.pki").joinpath("anchors/jpki_auth")
    return [
        x509.load_pem_x509_certificate(e.read_bytes())
        for e in sorted(directory.iterdir(), key=lambda e: e.name)
        if e.name.endswith(".pem")
    ]
