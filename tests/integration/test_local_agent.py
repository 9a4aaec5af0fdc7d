"""The local agent (``hpki-gateway local serve``) and ``local sign-batch`` over real pcscd +
vpcd with a virtual HPKI card; signatures checked by xmlsec1 and our verifier."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.config import load_settings
from gateway.local.batch import sign_batch
from gateway.local.setup import build_local_agent
from gateway.pki.crl import CrlSource, load_crl_files
from gateway.pki.load import load_certificate_files
from gateway.vcard.hpki import HPKI_PIN_TRIES
from gateway.verify import TrustConfig, verify_document
from tests.support.facility_system import sign_prescriptions
from tests.support.local import (
    Agent,
    CardWorld,
    LocalEndpoint,
    check_signed,
    run_agent,
    sign_batch_cli,
    write_prescriptions,
)
from tests.support.pcsc import PcscWorld
from tests.support.signing import Csc
from tests.support.webauthn import SoftAuthenticator

PIN = "314159"
SHA256 = "2.16.840.1.101.3.4.2.1"
RSA = "1.2.840.113549.1.1.1"


@pytest.fixture
def agent(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> Iterator[Agent]:
    cfg = card_world.config(reader=hpki_slot.name, secret_file=tmp_path / "secret")
    with run_agent(cfg, pcsc.env(), secrets_never_logged=(PIN,)) as a:
        yield a


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def test_agent_speaks_csc_with_the_card_in_the_reader(
    agent: Agent, card_world: CardWorld, hpki_slot: Any
) -> None:
    card = card_world.card(pin=PIN)
    hpki_slot.insert(card.applet)
    # No secret, or a wrong one: another local process cannot drive the card.
    status, body = agent.post("/csc/v2/credentials/list", {}, secret=b"x" * 43)
    assert status == 401 and body["error"] == "unauthorized"
    req = urllib.request.Request(agent.url + "/csc/v2/info", data=b"{}", method="POST")  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310 - loopback
    assert info.value.code == 401
    status, body = agent.post("/csc/v2/info", {})
    assert status == 200 and "signatures/signDoc" in body["methods"]
    status, body = agent.post("/csc/v2/credentials/list", {})
    assert status == 200 and len(body["credentialIDs"]) == 1
    cid = body["credentialIDs"][0]
    status, body = agent.post(
        "/csc/v2/credentials/info", {"credentialID": cid, "certificates": "chain"}
    )
    assert status == 200 and body["cert"]["status"] == "valid"
    assert (
        body["pin_tries_left"] == HPKI_PIN_TRIES and len(body["cert"]["certificates"]) == 3
    )  # leaf, CA, root
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(3)]

    def authorize(pin: str, hashes: list[bytes] = digests) -> tuple[int, Any]:
        return agent.post(
            "/csc/v2/credentials/authorize",
            {"credentialID": cid, "numSignatures": len(hashes),
             "hashes": [_b64(h) for h in hashes], "hashAlgorithmOID": SHA256,
             "authData": [{"id": "pin", "value": pin}]},
        )  # fmt: skip

    status, body = authorize("000000")
    assert status == 403 and body == {
        "error": "invalid_pin",
        "error_description": "wrong PIN: 14 tries left before the card locks",
        "tries_left": 14,
    }
    status, body = authorize(PIN)
    assert status == 200, body
    sad = body["SAD"]

    def sign(sad: str, hashes: list[bytes]) -> tuple[int, Any]:
        return agent.post(
            "/csc/v2/signatures/signHash",
            {"credentialID": cid, "SAD": sad, "hashes": [_b64(h) for h in hashes],
             "hashAlgorithmOID": SHA256, "signAlgo": RSA},
        )  # fmt: skip

    status, body = sign(sad, [hashlib.sha256(b"not authorized").digest()])
    assert status == 400  # the SAD names exactly these hashes
    status, body = sign(sad, digests)
    assert status == 200, body
    pub = card.key.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    for d, s in zip(digests, body["signatures"], strict=True):
        pub.verify(base64.b64decode(s), d, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    assert sign(sad, digests)[0] == 400  # spent
    signed = card.applet.signatures
    # A card pulled and put back ends every SAD issued before.
    status, body = authorize(PIN)
    assert status == 200
    sad = body["SAD"]
    hpki_slot.remove()
    hpki_slot.insert(card.applet)
    status, body = sign(sad, digests)
    assert status in (400, 503) and card.applet.signatures == signed
    # signDoc: an e-prescription from a CSV, through the card.
    csv = "1,医療機関コード,1310000011\r\n2,処方,ロキソニン錠60mg,3錠,分3毎食後\r\n".encode()
    status, body = authorize(PIN, [hashlib.sha256(csv).digest()])
    assert status == 200, body
    status, body = agent.post(
        "/csc/v2/signatures/signDoc",
        {"credentialID": cid, "SAD": body["SAD"],
         "documents": [{"document": _b64(csv), "signature_format": "X",
                        "conformance_level": "AdES-B-B", "signAlgo": "1.2.840.113549.1.1.11",
                        "signed_envelope_property": "Enveloped",
                        "profile": "jp-eprescription"}]},
    )  # fmt: skip
    assert status == 200, body
    xml = base64.b64decode(body["DocumentWithSignature"][0])
    path = card_world.dir / "agent-signdoc.xml"
    path.write_bytes(xml)
    res = card_world.xmlsec(path)
    assert res.returncode == 0, res.stderr
    report = asyncio.run(verify_document(xml, trust=card_world.trust()))
    assert report.indication == "TOTAL-PASSED", report.reason


def _card_processes(parent: int) -> list[int]:
    """The HPKI card processes among ``parent``'s children."""
    found = []
    for task in os.listdir(f"/proc/{parent}/task"):
        with open(f"/proc/{parent}/task/{task}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        if b"gateway.hsm.card_child" in c.read():
                            found.append(int(pid))
                except FileNotFoundError:
                    continue
    return found


def test_the_agent_starts_its_card_process_with_it_and_takes_it_along(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    """The card process is up once the agent says where it listens (not at the first
    request), and it ends with the agent."""
    cfg = card_world.config(reader=hpki_slot.name, secret_file=tmp_path / "secret")
    with run_agent(cfg, pcsc.env()) as a:
        children = _card_processes(a.proc.pid)
        assert len(children) == 1, children
        # Once listening, it froze what start-up built (lifetime.freeze_start_up_objects):
        # full collections no longer walk the modules and the app (docs/performance.md).
        assert a.info["gc_frozen_objects"] > 50_000, a.info
    deadline = time.monotonic() + 10
    while _running(children[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(children[0])


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_agent_refuses_a_wrong_role_and_an_expired_card_before_the_pin(
    agent: Agent, card_world: CardWorld, hpki_slot: Any
) -> None:
    pharmacist = card_world.card(pin=PIN, role="Pharmacist")
    hpki_slot.insert(pharmacist.applet)
    cid = agent.post("/csc/v2/credentials/list", {})[1]["credentialIDs"][0]
    body = {"credentialID": cid, "numSignatures": 1, "documentType": "prescription",
            "authData": [{"id": "pin", "value": "000000"}]}  # fmt: skip
    status, answer = agent.post("/csc/v2/credentials/authorize", body)
    assert status == 403 and answer["error"] == "role_not_permitted"
    assert pharmacist.applet.tries_left == HPKI_PIN_TRIES  # the PIN never reached the card
    expired = card_world.card(
        pin=PIN, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=40), validity_days=30
    )
    hpki_slot.insert(expired.applet)
    cid = agent.post("/csc/v2/credentials/list", {})[1]["credentialIDs"][0]
    status, answer = agent.post("/csc/v2/credentials/authorize", {**body, "credentialID": cid})
    assert status == 403 and answer["error"] == "certificate_expired"
    assert expired.applet.tries_left == HPKI_PIN_TRIES


def test_agent_shows_the_lock_after_15_wrong_pins(
    agent: Agent, card_world: CardWorld, hpki_slot: Any
) -> None:
    card = card_world.card(pin=PIN)
    hpki_slot.insert(card.applet)
    cid = agent.post("/csc/v2/credentials/list", {})[1]["credentialIDs"][0]
    body = {"credentialID": cid, "numSignatures": 1, "authData": [{"id": "pin", "value": "9999"}]}
    for left in range(HPKI_PIN_TRIES - 1, 0, -1):
        status, answer = agent.post("/csc/v2/credentials/authorize", body)
        assert (status, answer["tries_left"]) == (403, left)
    status, answer = agent.post("/csc/v2/credentials/authorize", body)
    assert status == 403 and answer["tries_left"] == 0 and "blocked" in answer["error_description"]
    right = {**body, "authData": [{"id": "pin", "value": PIN}]}
    status, answer = agent.post("/csc/v2/credentials/authorize", right)
    assert status == 403 and answer["tries_left"] == 0
    assert card.applet.blocked


def _batch(
    pcsc: PcscWorld, cfg: Path, src: Path, out: Path, pin: str
) -> subprocess.CompletedProcess[str]:
    return sign_batch_cli(pcsc.env(), cfg, src, out, pin)


def test_sign_batch_of_50_prescriptions(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    card = card_world.card(pin=PIN)
    hpki_slot.insert(card.applet)
    src, out = tmp_path / "in", tmp_path / "out"
    names = write_prescriptions(src, 50)
    res = _batch(pcsc, card_world.config(reader=hpki_slot.name), src, out, PIN)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["signed"], summary["failed"], summary["not_done"]) == (50, 0, 0)
    assert card.applet.signatures == 50
    report = json.loads((out / "report.json").read_text())
    assert sorted(f["file"] for f in report["files"]) == names  # in order of completion
    assert {f["status"] for f in report["files"]} == {"signed"}
    assert all("Yamada Taro" in f["signer"] for f in report["files"])
    rows = (out / "report.csv").read_text().splitlines()
    assert rows[0] == "file,status,signer,time,error" and len(rows) == 51
    for name in names:
        check_signed(card_world, out / name.replace(".csv", ".xml"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    # A second run signs nothing again.
    res = _batch(pcsc, card_world.config(reader=hpki_slot.name), src, out, PIN)
    assert res.returncode == 0 and card.applet.signatures == 50
    assert json.loads(res.stdout.strip().splitlines()[-1])["skipped"] == 50


def test_sign_batch_refuses_wrong_role_and_expired_before_the_pin(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    write_prescriptions(src, 3)
    cfg = card_world.config(reader=hpki_slot.name)
    for card in (
        card_world.card(pin=PIN, role="Pharmacist"),
        card_world.card(
            pin=PIN, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=40), validity_days=30
        ),
    ):
        hpki_slot.insert(card.applet)
        res = _batch(pcsc, cfg, src, tmp_path / "out", "000000")
        assert res.returncode not in (0, None), res.stdout
        assert card.applet.tries_left == HPKI_PIN_TRIES and card.applet.signatures == 0
        assert not list((tmp_path / "out").glob("*.xml"))


def test_sign_batch_card_pulled_then_resumed(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    card = card_world.card(pin=PIN)
    card.applet.sign_delay = 0.02  # slow enough that the card is pulled mid-batch
    hpki_slot.insert(card.applet)
    src, out = tmp_path / "in", tmp_path / "out"
    names = write_prescriptions(src, 20)
    settings = load_settings(card_world.config(reader=hpki_slot.name), environ={})

    def pull_after_six() -> None:  # the card leaves the reader once it has made 6 signatures
        deadline = time.monotonic() + 300
        while card.applet.signatures < 6 and time.monotonic() < deadline:
            time.sleep(0.001)
        hpki_slot.remove()

    async def run() -> Any:
        agent = build_local_agent(settings)
        try:
            return await sign_batch(agent, src, out, pin=lambda: bytearray(PIN.encode()))
        finally:
            await agent.close()

    puller = threading.Thread(target=pull_after_six)
    puller.start()
    first = asyncio.run(run())
    puller.join()
    card.applet.sign_delay = 0.0
    assert first.stopped and not first.complete and first.not_done > 0
    done_first = {p.name: p.read_bytes() for p in out.glob("*.xml")}
    assert 6 <= len(done_first) < 20
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["complete"] is False
    hpki_slot.insert(card.applet)
    second = asyncio.run(run())
    assert second.complete and second.skipped == len(done_first)
    assert second.signed == 20 - len(done_first)
    outputs = sorted(p.name for p in out.glob("*.xml"))
    assert outputs == [n.replace(".csv", ".xml") for n in names]
    for name, data in done_first.items():  # nothing signed twice: earlier outputs untouched
        assert (out / name).read_bytes() == data
    trust = card_world.trust()
    for name in outputs:
        rep = asyncio.run(verify_document((out / name).read_bytes(), trust=trust))
        assert rep.indication == "TOTAL-PASSED", (name, rep.reason)
    assert os.path.exists(out / "report.csv")


class RemoteEndpoint:
    """The remote gateway as the facility system sees it: mTLS, FIDO2 presence."""

    def __init__(self, csc: Csc, auth: SoftAuthenticator) -> None:
        self.csc, self.auth = csc, auth

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        r = self.csc.post(path, body)
        return r.status, r.json()

    def authorize(self, credential_id: str, hashes: list[bytes]) -> str:
        return self.csc.authorize(credential_id, hashes, self.auth)


def test_facility_system_code_on_the_remote_gateway(
    sandbox: dict[str, Any], gateway: Any, hospital_ctx: Any, doctor: Any
) -> None:
    doc, auth = doctor
    trust = TrustConfig(
        anchors=load_certificate_files([Path(p) for p in sandbox["hpki_trust_anchors"]]),
        intermediates=load_certificate_files([Path(p) for p in sandbox["hpki_intermediates"]]),
        crls=CrlSource(load_crl_files([Path(p) for p in sandbox["crls"].values()])),
    )
    ep = RemoteEndpoint(Csc(gateway.port, hospital_ctx), auth)
    signed = sign_prescriptions(ep, trust=trust, credential_id=doc["credential_id"])
    assert len(signed) == 1


def test_facility_system_code_on_the_local_agent(
    agent: Agent, card_world: CardWorld, hpki_slot: Any
) -> None:
    card = card_world.card(pin=PIN)
    hpki_slot.insert(card.applet)
    signed = sign_prescriptions(LocalEndpoint(agent, PIN), trust=card_world.trust())
    assert len(signed) == 1 and card.applet.signatures == 4  # 3 hashes + 1 document
    path = card_world.dir / "facility-local.xml"
    path.write_bytes(signed[0])
    res = card_world.xmlsec(path)
    assert res.returncode == 0, res.stderr
