"""My Number card revocation from a CRL that does not cover the card: never "good".

A CRL whose IssuingDistributionPoint limits it (an ARL of CA certificates only, some reasons
only, an indirect CRL, a partition for another distribution point) or a delta CRL lists only
part of what the CA revoked: not being on it says nothing about a card. Read as the issuer's
complete CRL, a card the CA revoked passed as "good" (``jpki.revocation = "crl"`` with such a
file or URL, e.g. J-LIS's ARL next to its CRL). Real certificates and CRLs of a TEST JPKI CA
(the real root's DN), checked by the authenticator's own certificate checks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.auth.jpki_revocation import CrlRevocation
from gateway.errors import AccessDenied
from gateway.pki.issue import CertAndKey
from gateway.sandbox.jpki import issue_auth_cert, make_test_jpki_ca
from tests.support.jpki_checks import certificate_checker

NOW = dt.datetime.now(dt.UTC)
DP = "http://jpki.test/crl/auth-1.crl"


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return make_test_jpki_ca(now=NOW - dt.timedelta(days=1))


@pytest.fixture(scope="module")
def card(ca: CertAndKey) -> x509.Certificate:
    """A card certificate the CA has revoked (it is on the CA's complete CRL)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return issue_auth_cert(ca, key.public_key(), now=NOW, crl_url=DP)


def _crl(
    ca: CertAndKey,
    revoked: list[int],
    *extensions: tuple[x509.ExtensionType, bool],
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW - dt.timedelta(minutes=1))
        .next_update(NOW + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - dt.timedelta(hours=1))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def _idp(
    *,
    full_name: list[str] | None = None,
    ca_only: bool = False,
    reasons: frozenset[x509.ReasonFlags] | None = None,
    indirect: bool = False,
) -> tuple[x509.ExtensionType, bool]:
    names = [x509.UniformResourceIdentifier(u) for u in full_name] if full_name else None
    return (
        x509.IssuingDistributionPoint(
            full_name=names,
            relative_name=None,
            only_contains_user_certs=False,
            only_contains_ca_certs=ca_only,
            only_some_reasons=reasons,
            indirect_crl=indirect,
            only_contains_attribute_certs=False,
        ),
        True,
    )


def _check(ca: CertAndKey, card: x509.Certificate, crl: x509.CertificateRevocationList,
           tmp: Path) -> str:  # fmt: skip
    path = tmp / "jpki.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    auth = certificate_checker([ca.cert], CrlRevocation(files=[path]))
    try:
        return asyncio.run(auth.check_certificate(card, NOW)).revocation
    except AccessDenied as e:
        return e.description


PARTIAL = {
    "arl_of_ca_certificates": lambda: [_idp(ca_only=True)],
    "some_reasons_only": lambda: [_idp(reasons=frozenset({x509.ReasonFlags.ca_compromise}))],
    "indirect_crl": lambda: [_idp(indirect=True)],
    "partition_of_another_point": lambda: [_idp(full_name=["http://jpki.test/crl/auth-2.crl"])],
    "delta_crl": lambda: [(x509.DeltaCRLIndicator(1), True)],
    "unknown_critical_extension": lambda: [
        (
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"),
            True,
        )
    ],
}


@pytest.mark.parametrize("case", list(PARTIAL))
def test_a_crl_that_does_not_cover_the_card_is_no_answer(
    case: str, ca: CertAndKey, card: x509.Certificate, tmp_path: Path
) -> None:
    # The CA revoked the card, but this CRL is not where that would show: nothing on it.
    got = _check(ca, card, _crl(ca, [], *PARTIAL[case]()), tmp_path)
    assert got != "good"
    assert got.startswith("the revocation status of the JPKI certificate cannot be checked now")


def test_complete_crls_still_decide(ca: CertAndKey, card: x509.Certificate, tmp_path: Path) -> None:
    # The CA's complete CRL, and its partition for the card's own distribution point.
    assert "is revoked" in _check(ca, card, _crl(ca, [card.serial_number]), tmp_path)
    assert _check(ca, card, _crl(ca, []), tmp_path) == "good"
    mine = _idp(full_name=[DP])
    assert "is revoked" in _check(ca, card, _crl(ca, [card.serial_number], mine), tmp_path)
    assert _check(ca, card, _crl(ca, [], mine), tmp_path) == "good"
    users = (
        x509.IssuingDistributionPoint(
            full_name=None, relative_name=None, only_contains_user_certs=True,
            only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
            only_contains_attribute_certs=False,
        ),
        True,
    )  # fmt: skip
    assert _check(ca, card, _crl(ca, [], users), tmp_path) == "good"


def test_an_unreadable_crl_file_is_no_answer_not_an_internal_error(
    ca: CertAndKey, card: x509.Certificate, tmp_path: Path
) -> None:
    """A CRL file caught half-written by the job that mirrors it (or otherwise not a CRL):
    the card's revocation cannot be checked now, a 403 with its reason like any other source
    that cannot answer. It raised ConfigError, which the authorize path turned into a 500
    (and the officer's link into a 500 with no jpki.link.refused record); once the file is
    whole again, it decides."""
    path = tmp_path / "jpki.crl"
    whole = _crl(ca, [card.serial_number]).public_bytes(serialization.Encoding.DER)
    path.write_bytes(whole[: len(whole) // 2])
    auth = certificate_checker([ca.cert], CrlRevocation(files=[path]))
    with pytest.raises(AccessDenied) as e:
        asyncio.run(auth.check_certificate(card, NOW))
    assert e.value.description.startswith(
        "the revocation status of the JPKI certificate cannot be checked now"
    )
    assert "cannot load CRL" in e.value.description
    path.write_bytes(whole)
    with pytest.raises(AccessDenied) as e:
        asyncio.run(auth.check_certificate(card, NOW))
    assert "is revoked" in e.value.description
