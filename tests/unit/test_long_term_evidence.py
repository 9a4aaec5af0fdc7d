"""Carried OCSP responses as revocation evidence at a past time, and signDoc's all-or-none
building of several documents.

The OCSP responses come from the sandbox's TEST responder code (``SandboxOcspResponder``), fed
with a real CRL of a TEST CA; the verifier's checks are the same as for a document's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.pki.ocsp import build_request, check_embedded
from gateway.sandbox import testworld
from gateway.sandbox.ocsp import SandboxOcspResponder
from gateway.sign.service import all_or_none
from gateway.verify.revocation import carried_status_at, ocsp_status_at

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _world(tmp_path: Path) -> tuple[testworld.CertAndKey, x509.Certificate, x509.Certificate]:
    then = NOW - dt.timedelta(days=1)
    root = testworld.make_hpki_root(now=then)
    ca = testworld.make_hpki_signing_ca(root, now=then)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def leaf(name: str) -> x509.Certificate:
        return testworld.issue_hpki_signer_cert(
            ca, public_key_der=spki, name_romaji=name, name_kanji=name, role="Medical Doctor",
            organization="HPKI TEST FACILITY", serial_number_attr=name.upper()[:8], now=then,
        )  # fmt: skip

    return ca, leaf("Kept Taro"), leaf("Revoked Jiro")


def _responses(
    tmp_path: Path, ca: testworld.CertAndKey, revoked: x509.Certificate, revoked_at: dt.datetime
) -> SandboxOcspResponder:
    crl = testworld.make_crl(
        ca, revoked=[(revoked.serial_number, revoked_at, None)], now=NOW,
        next_update=dt.timedelta(days=1),
    )  # fmt: skip
    path = tmp_path / "ca.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    return SandboxOcspResponder(
        ca_cert=ca.cert, signer_cert=ca.cert, signer_key=ca.key, crl_files=[path],
        clock=lambda: NOW,
    )  # fmt: skip


def _ask(
    responder: SandboxOcspResponder, cert: x509.Certificate, issuer: x509.Certificate
) -> bytes:
    req = build_request(cert, issuer, b"n" * 16).public_bytes(serialization.Encoding.DER)
    return responder.respond(req)


def test_a_carried_ocsp_response_speaks_for_a_past_time(tmp_path: Path) -> None:
    ca, kept, revoked = _world(tmp_path)
    revoked_at = NOW - dt.timedelta(hours=2)
    responder = _responses(tmp_path, ca, revoked, revoked_at)
    good = _ask(responder, kept, ca.cert)
    bad = _ask(responder, revoked, ca.cert)
    assert check_embedded(good, kept, ca.cert).status == "good"
    # current at T (within thisUpdate .. nextUpdate), or produced after T: good
    e = ocsp_status_at(kept, ca.cert, NOW - dt.timedelta(hours=3), [good], now=NOW)
    assert (e.status, e.kind) == ("good", "ocsp"), e.reason
    e = ocsp_status_at(kept, ca.cert, NOW + dt.timedelta(minutes=30), [good], now=NOW)
    assert e.status == "good", e.reason
    # past its nextUpdate and issued before T: it says nothing about T
    e = ocsp_status_at(kept, ca.cert, NOW + dt.timedelta(days=3), [good], now=NOW)
    assert e.status == "unknown" and "expired before" in e.reason
    # revoked at 2 h ago: good for a signature proven 3 h ago, revoked for one proven 1 h ago
    e = ocsp_status_at(revoked, ca.cert, NOW - dt.timedelta(hours=3), [bad], now=NOW)
    assert e.status == "good" and "revoked later" in e.reason, e.reason
    e = ocsp_status_at(revoked, ca.cert, NOW - dt.timedelta(hours=1), [bad], now=NOW)
    assert e.status == "revoked" and "OCSP" in e.reason, e.reason
    # a response about another certificate is no evidence; a response dated after the
    # validation time is refused
    assert ocsp_status_at(kept, ca.cert, NOW, [bad], now=NOW).status == "unknown"
    e = ocsp_status_at(kept, ca.cert, NOW, [good], now=NOW - dt.timedelta(hours=1))
    assert e.status == "unknown" and "future" in e.reason


def test_a_forged_response_is_no_evidence(tmp_path: Path) -> None:
    ca, kept, _ = _world(tmp_path)
    other = testworld.make_hpki_signing_ca(
        testworld.make_hpki_root(now=NOW - dt.timedelta(days=1)), now=NOW - dt.timedelta(days=1)
    )
    # signed by a CA that did not issue the certificate (and did not delegate to it)
    forged = SandboxOcspResponder(
        ca_cert=ca.cert, signer_cert=other.cert, signer_key=other.key, crl_files=[],
        clock=lambda: NOW,
    )  # fmt: skip
    der = _ask(forged, kept, ca.cert)
    e = ocsp_status_at(kept, ca.cert, NOW, [der], now=NOW)
    assert e.status == "unknown" and "not trusted" in e.reason, e.reason


def test_revoked_from_either_source_wins(tmp_path: Path) -> None:
    ca, _, revoked = _world(tmp_path)
    responder = _responses(tmp_path, ca, revoked, NOW - dt.timedelta(hours=2))
    bad = _ask(responder, revoked, ca.cert)
    empty_crl = testworld.make_crl(
        ca, revoked=[], now=NOW - dt.timedelta(hours=1), next_update=dt.timedelta(days=1)
    )
    e = carried_status_at(revoked, ca.cert, NOW, [empty_crl], [bad], now=NOW)
    assert e is not None and e.status == "revoked", e
    assert carried_status_at(revoked, ca.cert, NOW, [], [], now=NOW) is None


def test_all_or_none_runs_together_and_stops_at_the_first_failure() -> None:
    started: list[int] = []
    finished: list[int] = []
    gates: list[asyncio.Event] = []

    def job(i: int, fail: bool = False) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            started.append(i)
            if len(started) == 5:
                gates[-1].set()
            if fail:
                await asyncio.sleep(0)
                raise ValueError(f"job {i} failed")
            await gates[-1].wait()  # only released if all of them run at once
            finished.append(i)
            return i

        return run

    async def together() -> list[int]:
        gates.append(asyncio.Event())
        return await all_or_none([job(i) for i in range(5)], limit=8)

    assert asyncio.run(together()) == [0, 1, 2, 3, 4]
    started.clear()
    finished.clear()

    async def failing() -> None:
        gates.append(asyncio.Event())
        await all_or_none([job(0), job(1, fail=True), job(2)], limit=8)

    with pytest.raises(ValueError, match="job 1 failed"):
        asyncio.run(failing())
    assert finished == []  # the others were cancelled, nothing returned
    # limit 1: one after the other, in order
    order: list[int] = []

    def step(i: int) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            order.append(i)
            await asyncio.sleep(0)
            order.append(-i)
            return i

        return run

    got = asyncio.run(all_or_none([step(1), step(2)], limit=1))
    assert got == [1, 2] and order == [1, -1, 2, -2]
