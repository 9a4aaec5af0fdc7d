"""Revocation with several CRLs of one issuer: the order they are listed in must not matter."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.pki.crl import CrlSource
from gateway.sandbox import testworld

NOW = dt.datetime.now(dt.UTC)
World = tuple[testworld.CertAndKey, testworld.CertAndKey, x509.Certificate]


@pytest.fixture(scope="module")
def world() -> World:
    root = testworld.make_hpki_root(now=NOW - dt.timedelta(days=1))
    ca = testworld.make_hpki_signing_ca(root, now=NOW - dt.timedelta(days=1))
    spki = (
        testworld.new_key(2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    leaf = testworld.issue_hpki_signer_cert(
        ca,
        public_key_der=spki,
        name_romaji="Taro Test",
        name_kanji="Taro Test",
        role="Medical Doctor",
        organization="HPKI TEST FACILITY",
        serial_number_attr="TAROTEST",
        now=NOW - dt.timedelta(hours=1),
    )
    return root, ca, leaf


def _status(
    crls: list[x509.CertificateRevocationList], leaf: x509.Certificate, ca: testworld.CertAndKey
) -> str:
    return asyncio.run(CrlSource(crls).status(leaf, ca.cert, NOW)).status


@pytest.mark.parametrize("order", ["old_first", "new_first"])
def test_a_newer_crl_that_revokes_wins_over_an_older_empty_one(world: World, order: str) -> None:
    _, ca, leaf = world
    old = testworld.make_crl(
        ca, revoked=[], now=NOW - dt.timedelta(days=2), next_update=dt.timedelta(days=7)
    )
    new = testworld.make_crl(
        ca,
        revoked=[(leaf.serial_number, NOW - dt.timedelta(hours=1), None)],
        now=NOW - dt.timedelta(minutes=30),
        next_update=dt.timedelta(days=7),
    )
    crls = [old, new] if order == "old_first" else [new, old]
    assert _status(crls, leaf, ca) == "revoked"


@pytest.mark.parametrize("order", ["old_first", "new_first"])
def test_without_any_listing_the_newest_decides_good(world: World, order: str) -> None:
    _, ca, leaf = world
    old = testworld.make_crl(
        ca, revoked=[], now=NOW - dt.timedelta(days=2), next_update=dt.timedelta(days=7)
    )
    new = testworld.make_crl(
        ca, revoked=[], now=NOW - dt.timedelta(minutes=30), next_update=dt.timedelta(days=7)
    )
    crls = [old, new] if order == "old_first" else [new, old]
    st = asyncio.run(CrlSource(crls).status(leaf, ca.cert, NOW))
    assert st.status == "good"
    assert new.last_update_utc.isoformat() in st.reason


def test_a_crl_dated_in_the_future_is_refused(world: World) -> None:
    _, ca, leaf = world
    future = testworld.make_crl(
        ca, revoked=[], now=NOW + dt.timedelta(days=1), next_update=dt.timedelta(days=7)
    )
    st = asyncio.run(CrlSource([future]).status(leaf, ca.cert, NOW))
    assert st.status == "unknown"
    assert "dated in the future" in st.reason
