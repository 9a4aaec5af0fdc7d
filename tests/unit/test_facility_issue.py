"""Facility client certificates never outlive the facility CA that issues them: a leaf is
only valid while its CA is (RFC 5280 §6.1.3), so one past the CA's expiry would promise a
facility a validity it does not have, and its renewal reminders would come too late."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.pki.facility_ca import certify_key, issue_material
from gateway.pki.issue import self_signed_ca

NOW = dt.datetime(2026, 11, 28, 3, 0, tzinfo=dt.UTC)


def _ca(days: int):  # type: ignore[no-untyped-def]
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "TEST facility CA")])
    return self_signed_ca(name, now=NOW - dt.timedelta(days=1), validity=dt.timedelta(days=days))


def test_a_certificate_issued_near_the_cas_end_stops_with_it() -> None:
    ca = _ca(400)  # expires in 399 days, before the 39 months a certificate runs
    end = ca.cert.not_valid_after_utc
    issued = issue_material(ca, common_name="TEST Clinic", institution_code="1310000011", now=NOW)
    assert issued.cert.not_valid_after_utc == end
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    renewed = certify_key(
        ca, key.public_key(), common_name="TEST Clinic", institution_code="1310000011",
        terminal_label=None, now=NOW,
    )  # fmt: skip
    assert renewed.not_valid_after_utc == end


def test_far_from_the_cas_end_the_full_validity() -> None:
    ca = _ca(20 * 366)
    issued = issue_material(ca, common_name="TEST Clinic", institution_code="1310000011", now=NOW)
    assert issued.cert.not_valid_after_utc == dt.datetime(2030, 2, 28, 3, 0, tzinfo=dt.UTC)
