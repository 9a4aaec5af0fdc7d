"""OCSP as long-term validation data, and the TSA's own revocation, with the sandbox's real
TEST TSA / OCSP responder process (started by the session gateway).

- A signer certificate that names the TEST OCSP responder (AIA) gets the responder's answer
  embedded at B-LT / B-LTA: XAdES OCSPValues, CMS other revocation info (RFC 5940), the PDF's
  DSS. The verifier takes it as the revocation evidence at the proven time, with no network
  and no configured CRL: days later (the answer long past its nextUpdate) an ES-A still passes.
- A TSA certificate revoked before it stamped (its CA's CRL in TimeStampValidationData / the
  CMS crls) makes the timestamp, and so the signature, fail with a reason naming the TSA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree

from gateway.errors import RevocationUnavailable
from gateway.pki.crl import CrlSource, load_crl_files
from gateway.pki.ocsp import OcspClient
from gateway.sandbox import testworld
from gateway.sign.service import SigningPolicy, sign_document
from gateway.sign.timestamp import Rfc3161Client
from gateway.sign.xades import XADES
from gateway.sign.xades_ltv import LongTermSource
from gateway.verify import TrustConfig, verify_document
from tests.support.gateway import Server
from tests.support.softkey import SoftwareKeyHandle

CSV = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,3錠,分3毎食後\r\n".encode()


@dataclass
class LtWorld:
    pki: Path
    root: x509.Certificate
    ca: testworld.CertAndKey
    tsa_ca: testworld.CertAndKey
    tsa_cert: x509.Certificate
    key: rsa.RSAPrivateKey
    leaf: x509.Certificate  # names the sandbox OCSP responder
    tsa_url: str
    ocsp_url: str

    def chain(self, leaf: x509.Certificate | None = None) -> list[x509.Certificate]:
        return [leaf or self.leaf, self.ca.cert, self.root]

    def tsa_crl(self, revoked: list[tuple[int, dt.datetime, Any]]) -> Any:
        return testworld.make_crl(
            self.tsa_ca,
            revoked=revoked,
            now=dt.datetime.now(dt.UTC),
            next_update=dt.timedelta(days=2),
        )

    def source(self, **kw: Any) -> LongTermSource:
        crls = kw.pop("crls", None)
        if crls is None:
            crls = [*load_crl_files([self.pki / "hpki-root.crl"]), self.tsa_crl([])]
        return LongTermSource(
            CrlSource(crls),
            tsa_anchors=[self.tsa_ca.cert],
            ocsp=kw.pop("ocsp", OcspClient(timeout=5)),
            **kw,
        )

    def trust(self) -> TrustConfig:
        """Anchors only: no configured CRL, no OCSP client; revocation must come from the
        document."""
        return TrustConfig(
            anchors=[self.root], intermediates=[self.ca.cert], tsa_anchors=[self.tsa_ca.cert]
        )


def _load_ck(pki: Path, name: str) -> testworld.CertAndKey:
    key = serialization.load_pem_private_key((pki / f"{name}.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return testworld.CertAndKey(
        cert=x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes()), key=key
    )


@pytest.fixture(scope="module")
def lt(sandbox: dict[str, Any], gateway: Server) -> LtWorld:
    pki = Path(sandbox["dir"]) / "pki"
    ca = _load_ck(pki, "hpki-signing-ca")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ocsp_url = sandbox["ocsp_urls"]["hpki-signing-ca"]
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    leaf = testworld.issue_hpki_signer_cert(
        ca,
        public_key_der=spki,
        name_romaji="Ocsp Jiro",
        name_kanji="Ocsp Jiro",
        role="Medical Doctor",
        organization="HPKI TEST FACILITY",
        serial_number_attr="OCSPJIRO",
        now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
        ocsp_url=ocsp_url,
    )
    return LtWorld(
        pki=pki,
        root=x509.load_pem_x509_certificate((pki / "hpki-root.pem").read_bytes()),
        ca=ca,
        tsa_ca=_load_ck(pki, "tsa-ca"),
        tsa_cert=x509.load_pem_x509_certificate((pki / "tsa.pem").read_bytes()),
        key=key,
        leaf=leaf,
        tsa_url=sandbox["tsa_url"],
        ocsp_url=ocsp_url,
    )


def _sign(
    lt: LtWorld,
    fmt: str,
    level: str,
    *,
    source: LongTermSource | None = None,
    tsa_url: str | None = None,
) -> bytes:
    document = CSV
    if fmt == "P":
        import io

        from reportlab.pdfgen import canvas

        buf = io.BytesIO()
        c = canvas.Canvas(buf)
        c.drawString(72, 760, "PRESCRIPTION (TEST) - OCSP")
        c.save()
        document = buf.getvalue()

    async def go() -> bytes:
        async with Rfc3161Client(url=tsa_url or lt.tsa_url, timeout=10) as client:
            res = await sign_document(
                key=SoftwareKeyHandle(lt.key),
                chain=lt.chain(),
                signature_format=fmt,
                conformance_level=level,
                envelope={"C": "Attached", "X": "Enveloped", "P": "Certification"}[fmt],
                document=document,
                profile="jp-eprescription" if fmt == "X" else None,
                tsa=client,
                policy=SigningPolicy(long_term=source or lt.source()),
            )
        assert res.document_with_signature is not None
        return res.document_with_signature

    return asyncio.run(go())


def test_xades_carries_the_ocsp_answer_and_it_proves_the_past(lt: LtWorld) -> None:
    signed = _sign(lt, "X", "AdES-B-LTA")
    root = etree.fromstring(signed)
    rv = root.find(f".//{{{XADES}}}UnsignedSignatureProperties/{{{XADES}}}RevocationValues")
    assert rv is not None
    assert rv.find(f"{{{XADES}}}OCSPValues/{{{XADES}}}EncapsulatedOCSPValue") is not None
    rep = asyncio.run(verify_document(signed, trust=lt.trust()))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    sig = rep.signatures[0]
    assert sig.revocation["source"] == "document"
    assert "OCSP responses in the document" in sig.revocation["reason"]
    # three days on: the answer is long past its nextUpdate, yet it was current at the
    # signature timestamp, and the ES-A proves it existed then
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    rep = asyncio.run(verify_document(signed, trust=lt.trust(), now=later))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    # without it, nothing else tells the verifier the signer was not revoked
    for el in rv.iter(f"{{{XADES}}}OCSPValues"):
        rv.remove(el)
    rep = asyncio.run(verify_document(etree.tostring(root), trust=lt.trust(), now=later))
    assert rep.indication != "TOTAL-PASSED"


@pytest.mark.parametrize(
    ("fmt", "level"), [("C", "AdES-B-LT"), ("C", "AdES-B-LTA"), ("P", "AdES-B-LT")]
)
def test_cades_and_pades_carry_the_ocsp_answer(lt: LtWorld, fmt: str, level: str) -> None:
    signed = _sign(lt, fmt, level)
    if fmt == "C":
        from asn1crypto import cms

        sd = cms.ContentInfo.load(signed)["content"]
        assert any(c.name == "other" for c in sd["crls"])  # id-ri-ocsp-response
        (lt.pki.parent / "ocsp.p7s").write_bytes(signed)
        res = subprocess.run(
            ["openssl", "cms", "-verify", "-binary", "-inform", "DER",
             "-in", str(lt.pki.parent / "ocsp.p7s"), "-CAfile", str(lt.pki / "hpki-root.pem"),
             "-certfile", str(lt.pki / "hpki-signing-ca.pem"), "-purpose", "any",
             "-out", "/dev/null"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
    rep = asyncio.run(verify_document(signed, trust=lt.trust()))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].revocation["source"] == "document"
    assert "OCSP responses in the document" in rep.signatures[0].revocation["reason"]


def test_ocsp_only_without_a_responder_refuses_before_the_key(lt: LtWorld) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/ocsp"
    spki = lt.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    leaf = testworld.issue_hpki_signer_cert(
        lt.ca, public_key_der=spki, name_romaji="Ocsp Saburo", name_kanji="Ocsp Saburo",
        role="Medical Doctor", organization="HPKI TEST FACILITY", serial_number_attr="OCSPSAB",
        now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5), ocsp_url=dead,
    )  # fmt: skip
    calls = 0

    class Counting(SoftwareKeyHandle):
        async def sign_digest(self, *a: Any, **kw: Any) -> bytes:
            nonlocal calls
            calls += 1
            return await super().sign_digest(*a, **kw)

    async def go(revocation: str) -> None:
        async with Rfc3161Client(url=lt.tsa_url, timeout=10) as client:
            await sign_document(
                key=Counting(lt.key), chain=lt.chain(leaf), signature_format="X",
                conformance_level="AdES-B-LT", envelope="Enveloped", document=CSV,
                profile="jp-eprescription", tsa=client,
                policy=SigningPolicy(long_term=lt.source(revocation=revocation)),
            )  # fmt: skip

    with pytest.raises(RevocationUnavailable, match="no OCSP answer") as e:
        asyncio.run(go("ocsp"))
    assert e.value.status == 503 and e.value.headers["Retry-After"]
    # auto: the CRL would be the fallback, and no current CRL of the CA is configured either
    with pytest.raises(RevocationUnavailable, match=r"no current CRL.*OCSP"):
        asyncio.run(go("auto"))
    assert calls == 0


def _as_cades_x_l(signed: bytes, *, keep_revocation_values: bool = True) -> bytes:
    """The same CAdES signature in the older CAdES-X-L shape other signers write: SignedData
    holds only the signer's certificate and no revocation data; the path sits in a
    certificate-values attribute, the CRLs and OCSP answers in revocation-values (unsigned:
    the signature and its timestamp stay valid)."""
    from asn1crypto import cms, core

    from gateway.verify.cms import OID_CERTIFICATE_VALUES, OID_REVOCATION_VALUES

    ci = cms.ContentInfo.load(signed)
    sd = ci["content"]
    si = sd["signer_infos"][0]
    sid = si["sid"].chosen
    certs = [c.chosen for c in sd["certificates"]]
    signer = [c for c in certs if c.serial_number == sid["serial_number"].native]
    path = [c for c in certs if c.serial_number != sid["serial_number"].native]
    crl_vals = [c.chosen for c in sd["crls"] if c.name == "crl"]
    ocsp_vals = [c.chosen["other_rev_info"]["response_bytes"]["response"].parsed
                 for c in sd["crls"] if c.name == "other"]  # fmt: skip
    assert path and crl_vals and ocsp_vals, "the B-LT signature carries path, CRLs and OCSP"

    def der_seq(items: list[Any], tag: int | None = None) -> bytes:
        """SEQUENCE OF ``items``, EXPLICIT [tag] around it when given (TS 101 733's module)."""
        body = b"".join(i.dump() for i in items)
        raw = b"\x30" + _der_len(len(body)) + body
        return raw if tag is None else bytes([0xA0 | tag]) + _der_len(len(raw)) + raw

    rv_body = der_seq(crl_vals, 0) + der_seq(ocsp_vals, 1)
    revocation_values = b"\x30" + _der_len(len(rv_body)) + rv_body
    extra = [(OID_CERTIFICATE_VALUES, der_seq(path))]
    if keep_revocation_values:
        extra.append((OID_REVOCATION_VALUES, revocation_values))
    attrs = list(si["unsigned_attrs"]) + [
        cms.CMSAttribute({"type": oid, "values": [core.Any.load(raw)]}) for oid, raw in extra
    ]
    si["unsigned_attrs"] = cms.CMSAttributes(attrs)
    sd["certificates"] = cms.CertificateSet([cms.CertificateChoices("certificate", signer[0])])
    sd["crls"] = None
    return bytes(ci.dump(force=True))


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def test_a_cades_x_l_with_certificate_and_revocation_values_attributes(lt: LtWorld) -> None:
    """Validation data in CAdES-X-L's certificate-values / revocation-values attributes (not in
    SignedData) is read: the path, the signer's OCSP answer and the TSA's CRL come from them,
    with no configured CRL and no network. Without revocation-values the same signature has
    no revocation evidence and does not pass."""
    signed = _as_cades_x_l(_sign(lt, "C", "AdES-B-LT"))
    rep = asyncio.run(verify_document(signed, trust=lt.trust()))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].revocation["source"] == "document"
    assert "OCSP responses in the document" in rep.signatures[0].revocation["reason"]
    assert rep.signatures[0].timestamp["tsa_revocation"].startswith("not revoked")

    bare = _as_cades_x_l(_sign(lt, "C", "AdES-B-LT"), keep_revocation_values=False)
    rep = asyncio.run(verify_document(bare, trust=lt.trust()))
    assert rep.indication != "TOTAL-PASSED", rep.reason


@pytest.mark.parametrize("fmt", ["X", "C"])
def test_a_tsa_revoked_before_it_stamped_is_refused(lt: LtWorld, fmt: str) -> None:
    """The TSA CA's CRL (carried as the timestamp's validation data) lists the TSA certificate
    as revoked an hour before: the timestamp proves nothing, and the reason names the TSA."""
    revoked = lt.tsa_crl(
        [(lt.tsa_cert.serial_number, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), None)]
    )
    crls = [*load_crl_files([lt.pki / "hpki-root.crl"]), revoked]
    signed = _sign(lt, fmt, "AdES-B-LT", source=lt.source(crls=crls))
    rep = asyncio.run(verify_document(signed, trust=lt.trust()))
    assert rep.indication != "TOTAL-PASSED"
    assert rep.sub_indication == "REVOKED_NO_POE", rep.reason
    assert "TSA certificate" in rep.reason and "TEST TSA" in rep.reason, rep.reason
    # the same TSA, not revoked: passes, and the report says its revocation was checked
    signed = _sign(lt, fmt, "AdES-B-LT")
    rep = asyncio.run(verify_document(signed, trust=lt.trust()))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    assert rep.signatures[0].timestamp["tsa_revocation"].startswith("not revoked")


@pytest.mark.parametrize("fmt", ["X", "C"])
def test_a_tsa_certificate_is_judged_by_its_own_ocsp_answer(
    lt: LtWorld, fmt: str, tmp_path: Path
) -> None:
    """A TSA whose certificate names an OCSP responder (its CA's, answering from that CA's
    CRL): the answer is asked for at B-LT, carried as the timestamp's validation data, and
    decides at verification with no network and no configured CRL. "good": the signature
    passes and the report says the TSA was checked; "revoked" an hour before it stamped: the
    timestamp proves nothing (REVOKED_NO_POE naming the TSA)."""
    import socket

    from aiohttp import web

    from gateway.sandbox.ocsp import OCSP_PATH, SandboxOcspResponder, add_ocsp_route
    from gateway.sandbox.tsa import TSA_PATH, add_stamp_route, make_stamper

    now = dt.datetime.now(dt.UTC)
    crl_path = tmp_path / "tsa-ca.crl"
    asked: list[int] = []

    def ask(serial: int) -> None:
        asked.append(serial)  # the CRL decides; this only records that OCSP was asked

    def sign_with_tsa(revoked: bool) -> bytes:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        tsa = testworld.issue_tsa_cert(
            lt.tsa_ca, now=now - dt.timedelta(hours=2), ocsp_url=base + OCSP_PATH
        )
        listed = [(tsa.cert.serial_number, now - dt.timedelta(hours=1), None)] if revoked else []
        crl_path.write_bytes(lt.tsa_crl(listed).public_bytes(serialization.Encoding.DER))
        app = web.Application()
        add_stamp_route(app, make_stamper(tsa.cert, tsa.key, [lt.tsa_ca.cert]))
        add_ocsp_route(
            app,
            SandboxOcspResponder(
                ca_cert=lt.tsa_ca.cert, signer_cert=lt.tsa_ca.cert, signer_key=lt.tsa_ca.key,
                crl_files=[crl_path], override=ask,
            ),
        )  # fmt: skip

        async def serve() -> web.AppRunner:
            runner = web.AppRunner(app)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            return runner

        loop = asyncio.new_event_loop()
        runner = loop.run_until_complete(serve())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            signed = _sign(lt, fmt, "AdES-B-LT", tsa_url=base + TSA_PATH)
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
        assert tsa.cert.serial_number in asked, "the TSA's responder was not asked"
        return signed

    rep = asyncio.run(verify_document(sign_with_tsa(revoked=False), trust=lt.trust()))
    assert rep.indication == "TOTAL-PASSED", rep.reason
    checked = rep.signatures[0].timestamp["tsa_revocation"]
    assert checked.startswith("not revoked") and "TEST TSA" in checked, checked

    asked.clear()
    rep = asyncio.run(verify_document(sign_with_tsa(revoked=True), trust=lt.trust()))
    assert rep.indication != "TOTAL-PASSED"
    assert rep.sub_indication == "REVOKED_NO_POE", rep.reason
    assert "TSA certificate" in rep.reason and "TEST TSA" in rep.reason, rep.reason


def test_a_signer_the_responder_says_is_revoked_is_refused_before_the_key(
    lt: LtWorld, tmp_path: Path
) -> None:
    """The TEST responder code (in this process, with a CRL that lists the certificate) says
    "revoked": 403 access_denied naming the certificate, and the key is never used."""
    from aiohttp import web

    from gateway.errors import AccessDenied
    from gateway.sandbox.ocsp import OCSP_PATH, SandboxOcspResponder, create_ocsp_app

    crl = testworld.make_crl(
        lt.ca, revoked=[], now=dt.datetime.now(dt.UTC),
        next_update=dt.timedelta(days=1),
    )  # fmt: skip
    calls = 0

    class Counting(SoftwareKeyHandle):
        async def sign_digest(self, *a: Any, **kw: Any) -> bytes:
            nonlocal calls
            calls += 1
            return await super().sign_digest(*a, **kw)

    async def go() -> None:
        runner = web.AppRunner(
            create_ocsp_app(
                SandboxOcspResponder(
                    ca_cert=lt.ca.cert, signer_cert=lt.ca.cert, signer_key=lt.ca.key,
                    crl_files=[crl_path],
                )
            )
        )  # fmt: skip
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}{OCSP_PATH}"
        spki = lt.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        leaf = testworld.issue_hpki_signer_cert(
            lt.ca, public_key_der=spki, name_romaji="Revoked Shiro", name_kanji="Revoked Shiro",
            role="Medical Doctor", organization="HPKI TEST FACILITY", serial_number_attr="REVSHIRO",
            now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5), ocsp_url=url,
        )  # fmt: skip
        revoked = testworld.make_crl(
            lt.ca, revoked=[(leaf.serial_number, dt.datetime.now(dt.UTC), None)],
            now=dt.datetime.now(dt.UTC), next_update=dt.timedelta(days=1),
        )  # fmt: skip
        crl_path.write_bytes(revoked.public_bytes(serialization.Encoding.DER))
        try:
            async with Rfc3161Client(url=lt.tsa_url, timeout=10) as client:
                await sign_document(
                    key=Counting(lt.key), chain=lt.chain(leaf), signature_format="C",
                    conformance_level="AdES-B-LT", envelope="Attached", document=CSV, tsa=client,
                    policy=SigningPolicy(long_term=lt.source()),
                )  # fmt: skip
        finally:
            await runner.cleanup()

    crl_path = tmp_path / "ca.crl"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    with pytest.raises(AccessDenied, match=r"Revoked Shiro.*is revoked") as e:
        asyncio.run(go())
    assert e.value.status == 403 and "nothing was signed" in e.value.description
    assert calls == 0
