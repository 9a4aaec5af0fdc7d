"""OCSP where a certificate has AIA: a real responder (the TEST OCSP app) on 127.0.0.1.

The client (gateway/pki/ocsp.py) talks HTTP to the sandbox responder (gateway/sandbox/ocsp.py)
or to small hostile variants of it; CRLs are the fallback (gateway/pki/revocation.py), and the
verification report names the source.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp

from gateway.pki.crl import CrlSource
from gateway.pki.ocsp import OcspClient, build_request, check_response, ocsp_urls
from gateway.pki.revocation import revocation_status
from gateway.sandbox import testworld
from gateway.sandbox.ocsp import OCSP_PATH, SandboxOcspResponder, create_ocsp_app
from gateway.sign.service import sign_document
from gateway.verify import TrustConfig, verify_document
from tests.support.softkey import SoftwareKeyHandle

NOW = dt.datetime.now(dt.UTC)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class OcspWorld:
    root: testworld.CertAndKey
    ca: testworld.CertAndKey
    delegate: testworld.CertAndKey
    signer_key: rsa.RSAPrivateKey
    dir: Path

    def leaf(self, ocsp_url: str | None) -> x509.Certificate:
        spki = self.signer_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return testworld.issue_hpki_signer_cert(
            self.ca,
            public_key_der=spki,
            name_romaji="Ocsp Taro",
            name_kanji="Ocsp Taro",
            role="Medical Doctor",
            organization="HPKI TEST FACILITY",
            serial_number_attr="OCSPTARO",
            now=NOW - dt.timedelta(minutes=10),
            ocsp_url=ocsp_url,
        )

    def crl(self, revoked: list[x509.Certificate]) -> x509.CertificateRevocationList:
        return testworld.make_crl(
            self.ca,
            revoked=[(c.serial_number, NOW - dt.timedelta(minutes=5), None) for c in revoked],
            now=NOW - dt.timedelta(minutes=1),
            next_update=dt.timedelta(days=1),
        )

    def crl_file(self, revoked: list[x509.Certificate], name: str) -> Path:
        p = self.dir / name
        p.write_bytes(self.crl(revoked).public_bytes(serialization.Encoding.DER))
        return p

    def responder(
        self,
        crl_files: list[Path],
        *,
        signer: testworld.CertAndKey | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> SandboxOcspResponder:
        s = signer or self.delegate
        # The responder answers at the module's NOW, the time the checks use: a suite that
        # reaches this module minutes after importing it must not see "dated in the future".
        return SandboxOcspResponder(
            ca_cert=self.ca.cert,
            signer_cert=s.cert,
            signer_key=s.key,
            crl_files=crl_files,
            clock=clock or (lambda: NOW),
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> OcspWorld:
    then = NOW - dt.timedelta(days=1)
    root = testworld.make_hpki_root(now=then)
    ca = testworld.make_hpki_signing_ca(root, now=then)
    return OcspWorld(
        root=root,
        ca=ca,
        delegate=testworld.issue_ocsp_responder_cert(ca, now=then),
        signer_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        dir=tmp_path_factory.mktemp("ocsp"),
    )


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port); yields the URL of OCSP_PATH."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}{OCSP_PATH}"
    finally:
        await runner.cleanup()


def app_with(handler: Handler) -> web.Application:
    app = web.Application()
    app.router.add_post(OCSP_PATH, handler)
    return app


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{OCSP_PATH}"


async def status(
    world: OcspWorld,
    leaf: x509.Certificate,
    *,
    crls: Sequence[x509.CertificateRevocationList] = (),
    ocsp_timeout: float = 5.0,
) -> tuple[str, str, str]:
    st = await revocation_status(
        leaf, world.ca.cert, NOW, crls=CrlSource(crls), ocsp=OcspClient(timeout=ocsp_timeout)
    )
    return st.status, st.source, st.reason


# -- the sandbox responder: good, revoked, unknown ------------------------------------------


async def test_good_from_the_test_responder(world: OcspWorld) -> None:
    empty = world.crl_file([], "empty.crl")
    async with serve(create_ocsp_app(world.responder([empty]))) as url:
        leaf = world.leaf(url)
        assert ocsp_urls(leaf) == [url]
        st, source, reason = await status(world, leaf)
    assert (st, source) == ("good", "ocsp"), reason
    assert url in reason


async def test_good_signed_by_the_ca_itself(world: OcspWorld) -> None:
    empty = world.crl_file([], "empty-ca.crl")
    async with serve(create_ocsp_app(world.responder([empty], signer=world.ca))) as url:
        st, source, reason = await status(world, world.leaf(url))
    assert (st, source) == ("good", "ocsp"), reason


async def test_revoked_from_the_responders_crl_state(world: OcspWorld) -> None:
    crl_path = world.dir / "live.crl"
    crl_path.write_bytes(world.crl([]).public_bytes(serialization.Encoding.DER))
    async with serve(create_ocsp_app(world.responder([crl_path]))) as url:
        leaf = world.leaf(url)
        assert (await status(world, leaf))[:2] == ("good", "ocsp")
        # The CA revokes: the responder reads its CRL file again on the next request.
        crl_path.write_bytes(world.crl([leaf]).public_bytes(serialization.Encoding.DER))
        st, source, reason = await status(world, leaf)
    assert (st, source) == ("revoked", "ocsp"), reason
    assert "(OCSP)" in reason


async def test_unknown_certificate_falls_back_to_the_crls(world: OcspWorld) -> None:
    leaf = world.leaf("http://127.0.0.1:1/ocsp")

    async def unknown(request: web.Request) -> web.Response:
        req = ocsp.load_der_ocsp_request(await request.read())
        der = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=leaf,
                issuer=world.ca.cert,
                algorithm=hashes.SHA1(),  # noqa: S303 - CertID
                cert_status=ocsp.OCSPCertStatus.UNKNOWN,
                this_update=NOW,
                next_update=NOW + dt.timedelta(hours=1),
                revocation_time=None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, world.ca.cert)
            .add_extension(req.extensions.get_extension_for_class(x509.OCSPNonce).value, False)
            .sign(world.ca.key, hashes.SHA256())
        )
        return web.Response(body=der.public_bytes(serialization.Encoding.DER))

    async with serve(app_with(unknown)) as url:
        leaf = world.leaf(url)
        st, source, reason = await status(world, leaf)
        assert (st, source) == ("unknown", "crl")
        assert "does not know" in reason
        st, source, reason = await status(world, leaf, crls=[world.crl([])])
    assert (st, source) == ("good", "crl"), reason


def test_the_sandbox_responder_says_unknown_for_another_issuer(world: OcspWorld) -> None:
    other_root = testworld.make_hpki_root(now=NOW - dt.timedelta(days=1))
    other_ca = testworld.make_hpki_signing_ca(other_root, now=NOW - dt.timedelta(days=1))
    spki = world.signer_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    foreign = testworld.issue_hpki_signer_cert(
        other_ca,
        public_key_der=spki,
        name_romaji="Other",
        name_kanji="Other",
        role="Medical Doctor",
        organization="HPKI TEST FACILITY",
        serial_number_attr="OTHER",
        now=NOW - dt.timedelta(hours=1),
    )
    req = build_request(foreign, other_ca.cert, b"n" * 16).public_bytes(serialization.Encoding.DER)
    resp = ocsp.load_der_ocsp_response(world.responder([]).respond(req))
    assert resp.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    assert world.responder([]).respond(b"garbage")[:1] == b"\x30"
    bad = ocsp.load_der_ocsp_response(world.responder([]).respond(b"garbage"))
    assert bad.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


# -- responses that must not count -----------------------------------------------------------


async def test_bad_responder_signature_is_not_trusted(world: OcspWorld) -> None:
    responder = world.responder([])

    async def corrupt(request: web.Request) -> web.Response:
        der = bytearray(responder.respond(await request.read()))
        resp = ocsp.load_der_ocsp_response(bytes(der))
        at = bytes(der).rindex(resp.signature) + 10
        der[at] ^= 0x01
        return web.Response(body=bytes(der))

    async with serve(app_with(corrupt)) as url:
        leaf = world.leaf(url)
        st, source, reason = await status(world, leaf)
        assert (st, source) == ("unknown", "crl")
        assert "signature is invalid" in reason
        # ... and the CRL decides instead.
        st, source, reason = await status(world, leaf, crls=[world.crl([])])
    assert (st, source) == ("good", "crl")
    assert "signature is invalid" in reason


@pytest.mark.parametrize("who", ["no-ocsp-eku", "foreign-ca"])
async def test_responder_certificates_the_issuer_did_not_delegate(
    world: OcspWorld, who: str
) -> None:
    then = NOW - dt.timedelta(days=1)
    if who == "no-ocsp-eku":
        # Issued by the right CA, but a TSA certificate: no id-kp-OCSPSigning.
        signer = testworld.issue_tsa_cert(world.ca, now=then)
    else:
        other = testworld.make_hpki_root(now=then)
        signer = testworld.issue_ocsp_responder_cert(other, now=then)
    async with serve(create_ocsp_app(world.responder([], signer=signer))) as url:
        st, source, reason = await status(world, world.leaf(url))
    assert (st, source) == ("unknown", "crl")
    assert "not trusted" in reason


async def test_stale_response_is_not_used(world: OcspWorld) -> None:
    old = world.responder([], clock=lambda: NOW - dt.timedelta(days=2))
    async with serve(create_ocsp_app(old)) as url:
        leaf = world.leaf(url)
        st, source, reason = await status(world, leaf)
        assert (st, source) == ("unknown", "crl")
        assert "stale" in reason
        st, _, _ = await status(world, leaf, crls=[world.crl([leaf])])
    assert st == "revoked"


def test_future_and_nonce_checks(world: OcspWorld) -> None:
    leaf = world.leaf("http://127.0.0.1:1/ocsp")
    req = build_request(leaf, world.ca.cert, b"a" * 16).public_bytes(serialization.Encoding.DER)
    fresh = world.responder([]).respond(req)
    assert check_response(fresh, leaf, world.ca.cert, nonce=b"a" * 16, now=NOW).status == "good"
    wrong = check_response(fresh, leaf, world.ca.cert, nonce=b"b" * 16, now=NOW)
    assert (wrong.status, "nonce" in wrong.reason) == ("unavailable", True)
    future = world.responder([], clock=lambda: NOW + dt.timedelta(hours=1)).respond(req)
    early = check_response(future, leaf, world.ca.cert, nonce=b"a" * 16, now=NOW)
    assert (early.status, "future" in early.reason) == ("unavailable", True)
    other = world.leaf(None)  # another serial: the response is not about it
    assert check_response(fresh, other, world.ca.cert, nonce=None, now=NOW).status == "unavailable"
    assert check_response(b"junk", leaf, world.ca.cert, nonce=None, now=NOW).status == (
        "unavailable"
    )


# -- the network: down, slow, redirects, size, schemes ---------------------------------------


async def test_responder_down_falls_back_to_the_crl(world: OcspWorld) -> None:
    leaf = world.leaf(closed_port_url())
    st, source, reason = await status(world, leaf, crls=[world.crl([leaf])])
    assert (st, source) == ("revoked", "crl")
    assert "unreachable" in reason
    st, source, _ = await status(world, leaf, crls=[world.crl([])])
    assert (st, source) == ("good", "crl")


async def test_slow_responder_is_bounded_by_the_timeout(world: OcspWorld) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), timeout=30)
        return web.Response(body=b"")

    async with serve(app_with(slow)) as url:
        leaf = world.leaf(url)
        st, source, reason = await status(world, leaf, crls=[world.crl([])], ocsp_timeout=0.5)
        release.set()
    assert (st, source) == ("good", "crl")
    assert "did not answer within 0.5 s" in reason


async def test_redirects_are_not_followed_and_size_is_capped(world: OcspWorld) -> None:
    responder = world.responder([])
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append("redirect")
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append("elsewhere")
        return web.Response(body=responder.respond(await request.read()))

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"\x30" * (200 * 1024))

    app = app_with(redirect)
    app.router.add_post("/elsewhere", elsewhere)
    app.router.add_post("/huge", huge)
    async with serve(app) as url:
        st, source, reason = await status(world, world.leaf(url))
        assert (st, source, hits) == ("unknown", "crl", ["redirect"])
        assert "HTTP 302" in reason
        st, _, reason = await status(world, world.leaf(url.replace(OCSP_PATH, "/huge")))
    assert st == "unknown"
    assert "exceeds" in reason


@pytest.mark.parametrize("url", ["ldap://127.0.0.1/ocsp", "file:///etc/passwd"])
async def test_only_http_urls_are_fetched(world: OcspWorld, url: str) -> None:
    st, source, reason = await status(world, world.leaf(url), crls=[world.crl([])])
    assert (st, source) == ("good", "crl")
    assert "is not http(s)" in reason


# -- policy: revoked from either wins; OCSP off by default -------------------------------------


async def test_a_local_crl_that_revokes_wins_over_ocsp_good(world: OcspWorld) -> None:
    async with serve(create_ocsp_app(world.responder([]))) as url:
        leaf = world.leaf(url)
        st, source, _ = await status(world, leaf, crls=[world.crl([leaf])])
    assert (st, source) == ("revoked", "crl")


async def test_without_an_ocsp_client_nothing_is_asked(world: OcspWorld) -> None:
    hits: list[int] = []

    async def count(request: web.Request) -> web.Response:
        hits.append(1)
        return web.Response(status=500)

    async with serve(app_with(count)) as url:
        leaf = world.leaf(url)
        st = await revocation_status(leaf, world.ca.cert, NOW, crls=CrlSource(), ocsp=None)
    assert (st.status, st.source, hits) == ("unknown", "crl", [])


def test_ocsp_is_opt_in_in_the_settings(tmp_path: Path) -> None:
    from gateway.config import Settings
    from gateway.sign.setup import trust_config

    base = {"server": {"tls_cert": "x", "tls_key": "y", "client_ca": "z"}}
    assert Settings.model_validate(base).pki.ocsp is False
    assert trust_config(Settings.model_validate(base)).ocsp is None
    on = Settings.model_validate({**base, "pki": {"ocsp": True, "ocsp_timeout": 2.5}})
    client = trust_config(on).ocsp
    assert client is not None and client.timeout == 2.5
    assert trust_config(on, ocsp=False).ocsp is None
    assert trust_config(None, ocsp=True).ocsp is not None


# -- the verification report -------------------------------------------------------------------


async def _signed_cades(world: OcspWorld, leaf: x509.Certificate) -> bytes:
    res = await sign_document(
        key=SoftwareKeyHandle(world.signer_key),
        chain=[leaf, world.ca.cert, world.root.cert],
        signature_format="C",
        conformance_level="AdES-B-B",
        envelope="Attached",
        document=b"prescription",
        tsa=None,
    )
    assert res.document_with_signature is not None
    return res.document_with_signature


async def test_verification_report_names_the_source(world: OcspWorld) -> None:
    root_crl = testworld.make_crl(
        world.root, revoked=[], now=NOW - dt.timedelta(minutes=1), next_update=dt.timedelta(days=1)
    )
    crl_path = world.dir / "report.crl"
    crl_path.write_bytes(world.crl([]).public_bytes(serialization.Encoding.DER))
    async with serve(create_ocsp_app(world.responder([crl_path]))) as url:
        leaf = world.leaf(url)
        doc = await _signed_cades(world, leaf)
        trust = TrustConfig(
            anchors=[world.root.cert],
            intermediates=[world.ca.cert],
            crls=CrlSource([root_crl]),  # the CA's own CRL: none locally, OCSP covers the leaf
            ocsp=OcspClient(timeout=5),
        )
        rep = await verify_document(doc, trust=trust)
        sig = rep.signatures[0]
        assert rep.indication == "TOTAL-PASSED", sig.reason
        assert sig.revocation["status"] == "good"
        assert sig.revocation["source"] == "ocsp"
        assert sig.revocation["reason"] == "not revoked (OCSP and CRLs checked)"

        crl_path.write_bytes(world.crl([leaf]).public_bytes(serialization.Encoding.DER))
        rep = await verify_document(doc, trust=trust)
        sig = rep.signatures[0]
        assert (rep.indication, sig.sub_indication) == ("INDETERMINATE", "REVOKED_NO_POE")
        assert sig.revocation["status"] == "revoked"
        assert sig.revocation["source"] == "ocsp"

    # Responder gone: the CRLs decide, and the report says so.
    trust.crls = CrlSource([root_crl, world.crl([])])
    rep = await verify_document(doc, trust=trust)
    sig = rep.signatures[0]
    assert rep.indication == "TOTAL-PASSED", sig.reason
    assert sig.revocation["source"] == "crl"
    assert sig.revocation["reason"] == "not revoked (CRLs checked)"
