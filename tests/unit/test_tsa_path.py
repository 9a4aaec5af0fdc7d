"""The TSA certificate path search (``sign/timestamp.simple_path_problem``): found when there
is one, refused when not, and bounded whatever certificates a token carries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.sign import timestamp
from gateway.sign.timestamp import MAX_PATH_POOL, simple_path_problem

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
    *, ca: bool, serial: int | None = None,
) -> x509.Certificate:  # fmt: skip
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return b.sign(signer, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_a_path_through_an_intermediate_is_found_and_a_foreign_one_is_not() -> None:
    kr, kx, kt = _key(), _key(), _key()
    root = _cert("TSA Root", "TSA Root", kr, kr, ca=True)
    inter = _cert("TSA CA", "TSA Root", kx, kr, ca=True)
    tsa = _cert("TSA", "TSA CA", kt, kx, ca=False)
    assert simple_path_problem(tsa, [inter], [root], NOW) is None
    other = _cert("Other Root", "Other Root", _key(), _key(), ca=True)
    assert simple_path_problem(tsa, [inter], [other], NOW) == (
        "no path from CN=TSA to a TSA trust anchor"
    )
    assert "is not valid at" in (simple_path_problem(tsa, [inter], [root], NOW.replace(2030)) or "")


def test_many_certificates_of_one_name_cost_a_bounded_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token carrying N certificates with the same subject and issuer name, all signed by one
    key (each an issuer of every other), and no way to an anchor: each is taken into the search
    once, so the checks grow as N², not N^depth. Before, 12 of them took 7 s and 30 would have
    taken minutes; here the count of issuer checks is asserted, not the time."""
    kx, kt = _key(), _key()
    n = 8
    pool = [_cert("X", "X", kx, kx, ca=True, serial=i + 1) for i in range(n)]
    tsa = _cert("TSA", "X", kt, kx, ca=False)
    anchor = _cert("Root", "Root", _key(), _key(), ca=True)
    calls = 0
    real: Callable[[Any], bool] = timestamp._can_issue

    def counting(cert: x509.Certificate) -> bool:
        nonlocal calls
        calls += 1
        return real(cert)

    monkeypatch.setattr(timestamp, "_can_issue", counting)
    assert simple_path_problem(tsa, pool, [anchor], NOW) == (
        "no path from CN=TSA to a TSA trust anchor"
    )
    assert calls <= (n + 1) * n, calls


def test_a_pool_past_the_cap_is_refused_unsearched() -> None:
    kx, kt = _key(), _key()
    pool = [_cert("X", "X", kx, kx, ca=True, serial=i + 1) for i in range(MAX_PATH_POOL + 1)]
    tsa = _cert("TSA", "X", kt, kx, ca=False)
    assert simple_path_problem(tsa, pool, [], NOW) == (
        f"more than {MAX_PATH_POOL} certificates to search for a TSA path"
    )
