"""My Number card revocation from the network: what OCSP answers and fetched CRLs mean.

A real responder (the TEST OCSP app, RFC 6960 over HTTP on 127.0.0.1) and a CRL URL on
127.0.0.1, for a TEST JPKI CA with the real root's DN; the card certificates are checked by the
authenticator's own certificate checks (``JpkiAuthenticator.check_certificate``) through
``OcspRevocation`` and ``CrlRevocation``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID

from gateway.auth.jpki import JpkiAuthenticator
from gateway.auth.jpki_revocation import CrlRevocation, OcspRevocation
from gateway.errors import AccessDenied
from gateway.pki.issue import CertAndKey, make_crl
from gateway.sandbox.jpki import issue_auth_cert, make_test_jpki_ca
from gateway.sandbox.ocsp import SandboxOcspResponder, create_ocsp_app
from gateway.sandbox.testworld import issue_ocsp_responder_cert
from tests.integration.test_ocsp import closed_port_url, serve
from tests.support.jpki_checks import certificate_checker

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> CertAndKey:
    return make_test_jpki_ca(now=NOW - dt.timedelta(days=1))


def _card(ca: CertAndKey) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return issue_auth_cert(ca, key.public_key(), now=dt.datetime.now(dt.UTC))


def _auth(ca: CertAndKey, source: OcspRevocation, *, accept: bool) -> JpkiAuthenticator:
    return certificate_checker([ca.cert], source, accept_unavailable=accept)


async def _check(auth: JpkiAuthenticator, card: x509.Certificate) -> str:
    try:
        return (await auth.check_certificate(card, dt.datetime.now(dt.UTC))).revocation
    except AccessDenied as e:
        return e.description


def _responder(
    ca: CertAndKey, tmp: Path, *, unknown: frozenset[int] = frozenset(),
    validity: dt.timedelta = dt.timedelta(hours=1),
) -> SandboxOcspResponder:  # fmt: skip
    delegate = issue_ocsp_responder_cert(ca, now=NOW - dt.timedelta(days=1))
    crl = tmp / "jpki.crl"
    if not crl.exists():
        _write_crl(ca, crl, [])
    return SandboxOcspResponder(
        ca_cert=ca.cert,
        signer_cert=delegate.cert,
        signer_key=delegate.key,
        crl_files=[crl],
        validity=validity,
        override=lambda serial: "unknown" if serial in unknown else None,
    )


def _write_crl(ca: CertAndKey, path: Path, revoked: list[int]) -> None:
    now = dt.datetime.now(dt.UTC)
    crl = make_crl(
        ca, revoked=[(s, now, None) for s in revoked], now=now, next_update=dt.timedelta(days=1)
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))


def test_a_card_the_responder_does_not_know_is_refused_even_when_unavailable_is_accepted(
    ca: CertAndKey, tmp_path: Path
) -> None:
    """``jpki.on_revocation_unavailable = "accept"`` is for a source that cannot answer. A
    responder that answers "unknown" for a card that chains to the anchor has answered: it
    has no record of that certificate (not issued by the CA it serves, or the responder of
    another CA generation). That answer was taken as "unavailable" and the card accepted
    (``unavailable-accepted``); it is refused now, whatever the fallback says."""
    card, other = _card(ca), _card(ca)
    responder = _responder(ca, tmp_path, unknown={card.serial_number})

    async def run() -> tuple[str, str, str, str]:
        async with serve(create_ocsp_app(responder)) as url:
            source = OcspRevocation(url=url)
            return (
                await _check(_auth(ca, source, accept=True), card),
                await _check(_auth(ca, source, accept=False), card),
                await _check(_auth(ca, source, accept=True), other),
                await _check(_auth(ca, OcspRevocation(url=closed_port_url()), accept=True), card),
            )

    unknown_accept, unknown_refuse, known, down_accept = asyncio.run(run())
    assert unknown_accept.startswith("the JPKI certificate is not known to the revocation source")
    assert "does not know the certificate" in unknown_accept
    assert unknown_refuse == unknown_accept
    assert known == "good"
    # A responder that cannot be reached is what the fallback is for: unchanged.
    assert down_accept == "unavailable-accepted"


def test_a_good_answer_is_not_reused_past_its_own_next_update(
    ca: CertAndKey, tmp_path: Path
) -> None:
    """Good answers are cached ``jpki.ocsp_cache_seconds`` (here 300 s), but never past the
    answer's nextUpdate: after that the responder is asked again, and a card revoked in the
    meantime is refused. Before, the cached "good" was reused for the whole 300 s."""
    card = _card(ca)
    responder = _responder(ca, tmp_path, validity=dt.timedelta(seconds=2))

    async def run() -> tuple[str, str]:
        async with serve(create_ocsp_app(responder)) as url:
            auth = _auth(ca, OcspRevocation(url=url, cache_seconds=300), accept=False)
            first = await _check(auth, card)
            _write_crl(ca, tmp_path / "jpki.crl", [card.serial_number])  # the CA revokes it
            await asyncio.sleep(3.2)  # past the answer's nextUpdate, well within 300 s
            return first, await _check(auth, card)

    t0 = time.monotonic()
    first, later = asyncio.run(run())
    assert time.monotonic() - t0 < 60
    assert first == "good"
    assert later.startswith("the JPKI certificate is revoked"), later


def test_a_crl_url_answer_that_does_not_verify_is_not_kept(ca: CertAndKey) -> None:
    """``jpki.crl_urls`` are fetched and kept until nextUpdate. A body that is not a CRL of
    the card's issuer (here one signed by a CA with the same DN, dated to stay current for
    years: what anyone between the gateway and a plain-HTTP CRL URL can send once) was kept
    too, so every card stayed refused ("cannot be checked now") until that far nextUpdate or
    a restart, although the URL served the CA's real CRL again. Such a body is now used for
    that one check only; the next check fetches again."""
    card = _card(ca)
    rogue = make_test_jpki_ca(now=NOW - dt.timedelta(days=1))
    now = dt.datetime.now(dt.UTC)
    forged = make_crl(rogue, revoked=[], now=now, next_update=dt.timedelta(days=3650))
    real = make_crl(ca, revoked=[], now=now, next_update=dt.timedelta(days=1))
    served = [forged]

    async def crl(_: web.Request) -> web.Response:
        return web.Response(body=served[0].public_bytes(serialization.Encoding.DER))

    async def run() -> tuple[str, str]:
        app = web.Application()
        app.router.add_get("/crl", crl)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/crl"
        try:
            auth = _auth(ca, CrlRevocation(urls=[url]), accept=False)
            first = await _check(auth, card)
            served[0] = real  # the URL serves the CA's own CRL again
            return first, await _check(auth, card)
        finally:
            await runner.cleanup()

    first, later = asyncio.run(run())
    assert first.startswith("the revocation status of the JPKI certificate cannot be checked")
    assert "invalid signature" in first
    assert later == "good"


def _card_with_serial(ca: CertAndKey, serial: int, ocsp_url: str) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"TEST{serial:X}")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
                    )
                ]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def test_a_cached_good_answer_is_for_one_issuer_key_not_one_issuer_name(
    ca: CertAndKey, tmp_path: Path
) -> None:
    """All JPKI roots share one DN. A good answer was cached under (issuer DN, serial), so a
    card of another root generation with the same serial, revoked by its own CA, read
    "good (cached)" for ``ocsp_cache_seconds``. The cache is per issuer key now."""
    other_ca = make_test_jpki_ca(now=NOW - dt.timedelta(days=1))
    assert other_ca.cert.subject == ca.cert.subject
    serial = 0x4A504B49
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    _write_crl(other_ca, b_dir / "jpki.crl", [serial])  # the other generation revoked its card

    async def run() -> tuple[str, str]:
        async with (
            serve(create_ocsp_app(_responder(ca, a_dir))) as url_a,
            serve(create_ocsp_app(_responder(other_ca, b_dir))) as url_b,
        ):
            source = OcspRevocation(cache_seconds=300)  # each card's AIA names its responder
            auth = certificate_checker([ca.cert, other_ca.cert], source)
            first = await _check(auth, _card_with_serial(ca, serial, url_a))
            return first, await _check(auth, _card_with_serial(other_ca, serial, url_b))

    first, other = asyncio.run(run())
    assert first == "good"
    assert other.startswith("the JPKI certificate is revoked"), other
