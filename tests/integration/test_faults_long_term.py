"""signDoc when the TSA, the CRL server or the OCSP responder fails, over HTTP with real
processes: the gateway, and the sandbox's TEST TSA process (``hpki-gateway sandbox tsa``), which
also serves the sandbox CRLs (``/crl``) and the TEST OCSP responder (``/ocsp``).

Two TSA processes run on two ports: A, named by the certificates (CRL distribution point and,
for the OCSP signer, the AIA responder), and B, the ``[timestamp] url``. Stopping one or the
other makes the TSA, or the CRL server and the OCSP responder, go down on their own.

Each fault must answer a clear 503 with Retry-After, sign nothing, audit the refusal
(``signature.failed``, the SAD's count given back) and leave the SAD usable: the same SAD signs
once the service is back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from sqlalchemy import select

from gateway.config import load_settings
from gateway.sign.setup import trust_config
from gateway.store.schema import audit_event
from gateway.verify import verify_document
from tests.support.gateway import CLI, REPO, Server, client_context, free_port, run_cli
from tests.support.signing import Csc, b64, services
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

CSV = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,3錠,分3毎食後\r\n".encode()
XADES = "http://uri.etsi.org/01903/v1.3.2#"


class TsaProcess:
    """``hpki-gateway sandbox tsa`` on a given port (TSA, CRLs, OCSP responder)."""

    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port = config, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "HPKI_GATEWAY_TEST_TSA__PORT": str(self.port),
            "HPKI_GATEWAY_TEST_JPKI__ENABLED": "false",
        }
        self.proc = subprocess.Popen(
            [*CLI, "sandbox", "tsa", "-c", str(self.config)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"TEST TSA exited {self.proc.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"TEST TSA did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


class Hung:
    """A listener that accepts and never answers (a TSA that hangs)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)

    def close(self) -> None:
        self.sock.close()


class World:
    def __init__(self, root: Path) -> None:
        self.port, self.port_a, self.port_b = free_port(), free_port(), free_port()
        run_cli(
            "sandbox", "init", str(root), "--port", str(self.port), "--tsa-port", str(self.port_a)
        )
        self.manifest: dict[str, Any] = json.loads((root / "manifest.json").read_text())
        self.config = Path(self.manifest["config"])
        self.pki = root / "pki"
        hospital = next(f for f in self.manifest["facilities"] if f["kind"] == "hospital")
        self.hospital = hospital
        self.ctx = client_context(
            self.manifest["server_ca"], hospital["client_cert"], hospital["client_key"]
        )
        self.doc: dict[str, Any] = next(
            s for s in self.manifest["signers"] if s["role"] == "Medical Doctor"
        )
        self.auth = SoftAuthenticator(origin=f"https://localhost:{self.port}")
        self.ocsp_url = f"http://127.0.0.1:{self.port_a}/ocsp"
        self.ocsp_signer: dict[str, Any] = {}
        self.ocsp_auth = SoftAuthenticator(origin=f"https://localhost:{self.port}")

    def env(self, **extra: str) -> dict[str, str]:
        """The gateway without its own TSA child: timestamps from B, CRLs fetched from A."""
        return {
            "HPKI_GATEWAY_TEST_TSA__ENABLED": "false",
            "HPKI_GATEWAY_TIMESTAMP__URL": f'"http://127.0.0.1:{self.port_b}/tsa"',
            "HPKI_GATEWAY_TIMESTAMP__TIMEOUT": "1",
            "HPKI_GATEWAY_PKI__FETCH_CRLS": "true",
            "HPKI_GATEWAY_PKI__CRL_TIMEOUT": "1",
            "HPKI_GATEWAY_PKI__OCSP_TIMEOUT": "1",
            "HPKI_GATEWAY_PKI__CRL_FILES": json.dumps([str(self.pki / "hpki-root.crl")]),
            "HPKI_GATEWAY_SCHEDULER__ENABLED": "false",
            **extra,
        }

    def server(self, **extra: str) -> Server:
        return Server(self.config, self.port, env=self.env(**extra))

    def csc(self) -> Csc:
        return Csc(self.port, self.ctx)

    def audit(self, after: int) -> list[Any]:
        async def rows() -> list[Any]:
            async with services(self.config) as svc, svc.db.read() as conn:
                q = select(audit_event).where(audit_event.c.seq > after)
                return list((await conn.execute(q.order_by(audit_event.c.seq))).all())

        return asyncio.run(rows())

    def last_seq(self) -> int:
        rows = self.audit(0)
        return int(rows[-1].seq) if rows else 0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("faults-lt"))
    # A signer whose certificate names the TEST OCSP responder (AIA), issued by the TEST CA.
    added = run_cli(
        "signer", "add", "-c", str(w.config), "--name", "Ocsp Hanako", "--role",
        "Medical Doctor", "--facility", w.hospital["institution_code"], "--json",
        env={"HPKI_GATEWAY_PKI__TEST_OCSP_URL": f'"{w.ocsp_url}"'},
    )  # fmt: skip
    signer = json.loads(added.stdout)
    code = json.loads(
        run_cli("signer", "enroll-code", "-c", str(w.config), signer["id"], "--json").stdout
    )
    w.ocsp_signer = {"id": signer["id"], "credential_id": signer["credentials"][0]["id"]}
    srv = w.server()
    srv.start()
    try:
        r = w.csc().enroll(w.doc["enrollment_code"], w.doc["enrollment_password"], w.auth)
        assert r.status == 200, r.body
        r = w.csc().enroll(code["enrollment_code"], code["enrollment_password"], w.ocsp_auth)
        assert r.status == 200, r.body
    finally:
        srv.stop()
    yield w


def _sign_doc(world: World, cred: str, sad: str, document: bytes, **entry: Any) -> Any:
    body = {
        "credentialID": cred,
        "SAD": sad,
        "documents": [{"document": b64(document), **entry}],
    }
    return world.csc().post("/csc/v2/signatures/signDoc", body)


def _failed(world: World, seq: int) -> list[dict[str, Any]]:
    """The refusal as audited since ``seq``: the spend, then its failure with the refund."""
    rows = world.audit(seq)
    assert [r.action for r in rows] == ["signature.sign_doc", "signature.failed"], rows
    return [json.loads(r.detail) for r in rows if r.action == "signature.failed"]


async def _verify(world: World, signed: bytes) -> Any:
    settings = load_settings(world.config, environ={})
    trust = trust_config(settings)
    return await verify_document(signed, trust=trust)


@pytest.mark.parametrize("fault", ["down", "hung"])
def test_tsa_down_or_hung_then_back_with_the_same_sad(world: World, fault: str) -> None:
    """ES-T while the TSA is down (connection refused) or hangs (past ``[timestamp] timeout``):
    503 tsa_unavailable / tsa_timeout with Retry-After, nothing returned, the refusal audited
    with the SAD's count given back; once the TEST TSA process answers, the same SAD signs."""
    a = TsaProcess(world.config, world.port_a)  # CRLs: up, only the TSA (B) fails
    a.start()
    hung = Hung(world.port_b) if fault == "hung" else None
    srv = world.server()
    srv.start()
    tsa = TsaProcess(world.config, world.port_b)
    try:
        doc = f"ES-T while the TSA is {fault}".encode()
        import hashlib

        sad = world.csc().authorize(
            world.doc["credential_id"], [hashlib.sha256(doc).digest()], world.auth
        )
        seq = world.last_seq()
        entry = {"signature_format": "C", "conformance_level": "AdES-B-T"}
        r = _sign_doc(world, world.doc["credential_id"], sad, doc, **entry)
        expected = {"down": "tsa_unavailable", "hung": "tsa_timeout"}[fault]
        assert (r.status, r.json()["error"]) == (503, expected), r.body
        assert int(r.headers["retry-after"]) >= 1
        assert (
            "DocumentWithSignature" not in r.json()
            and "nothing was signed" in r.json()["error_description"]
        )
        [failed] = _failed(world, seq)
        assert failed["refunded"] is True and "timestamp authority" in failed["reason"]
        # the TSA comes back: the same SAD signs the same document at B-T
        if hung is not None:
            hung.close()
        tsa.start()
        r = _sign_doc(world, world.doc["credential_id"], sad, doc, **entry)
        assert r.status == 200, r.body
        signed = base64.b64decode(r.json()["DocumentWithSignature"][0])
        rep = asyncio.run(_verify(world, signed))
        assert rep.indication == "TOTAL-PASSED", rep.reason
        assert rep.signatures[0].level == "B-T"
    finally:
        srv.stop()
        tsa.stop()
        a.stop()
        if hung is not None:
            hung.close()
    assert "Traceback" not in srv.logs()


def _crl_evidence(world: World, signed: bytes, rep: Any) -> None:
    assert etree.fromstring(signed).find(f".//{{{XADES}}}EncapsulatedCRLValue") is not None
    assert rep.signatures[0].xades_level == "ES-XL"


def _ocsp_evidence(world: World, signed: bytes, rep: Any) -> None:
    assert etree.fromstring(signed).find(f".//{{{XADES}}}EncapsulatedOCSPValue") is not None
    assert rep.signatures[0].revocation["source"] == "document"
    assert "OCSP" in rep.signatures[0].revocation["reason"]


@pytest.mark.parametrize(
    ("source", "env", "refusal", "evidence"),
    [
        # ES-XL needs a current CRL of the signer's CA, fetched from its distribution point (A).
        ("crl", {}, "no current CRL", _crl_evidence),
        # A certificate naming an OCSP responder (A), ``long_term_revocation = "ocsp"``: the
        # document carries the responder's answer (OCSPValues), taken as the evidence.
        (
            "ocsp",
            {"HPKI_GATEWAY_SIGNING__LONG_TERM_REVOCATION": '"ocsp"'},
            "no OCSP answer",
            _ocsp_evidence,
        ),
    ],
    ids=["crl-server", "ocsp-responder"],
)
def test_revocation_source_down_at_es_xl_then_back(
    world: World,
    source: str,
    env: dict[str, str],
    refusal: str,
    evidence: Callable[[World, bytes, Any], None],
) -> None:
    """With the revocation source (A) down, 503 with Retry-After before the key is used,
    audited, SAD kept; with A back, the same SAD signs and the document carries the evidence."""
    import hashlib

    signer, auth = (
        (world.doc, world.auth) if source == "crl" else (world.ocsp_signer, world.ocsp_auth)
    )
    b = TsaProcess(world.config, world.port_b)  # the TSA: up
    b.start()
    srv = world.server(**env)
    srv.start()
    a = TsaProcess(world.config, world.port_a)
    try:
        cred = signer["credential_id"]
        sad = world.csc().authorize(cred, [hashlib.sha256(CSV).digest()], auth)
        seq = world.last_seq()
        entry = {
            "signature_format": "X",
            "profile": "jp-eprescription",
            "conformance_level": "AdES-B-LT",
        }
        r = _sign_doc(world, cred, sad, CSV, **entry)
        assert (r.status, r.json()["error"]) == (503, "temporarily_unavailable"), r.body
        assert int(r.headers["retry-after"]) >= 1
        assert (
            refusal in r.json()["error_description"]
            and "nothing was signed" in r.json()["error_description"]
        )
        [failed] = _failed(world, seq)
        assert failed["refunded"] is True and source.upper() in failed["reason"]
        a.start()
        r = _sign_doc(world, cred, sad, CSV, **entry)
        assert r.status == 200, r.body
        signed = base64.b64decode(r.json()["DocumentWithSignature"][0])
        rep = asyncio.run(_verify(world, signed))
        assert rep.indication == "TOTAL-PASSED", rep.reason
        evidence(world, signed, rep)
    finally:
        srv.stop()
        a.stop()
        b.stop()
    assert "Traceback" not in srv.logs()
