"""My Number card presence end to end over real pcscd: a sandbox doctor links a virtual card,
approves an e-prescription with it (begin -> card -> authorize -> signDoc), and every attack is
refused with a clear error and an audit record."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select

from gateway.card.client import GatewayCallError, GatewayClient, authorize
from gateway.card.errors import CardError, CardErrorCode
from gateway.card.jpki import JpkiCard, open_jpki_card
from gateway.pki.issue import CertAndKey
from gateway.sandbox.jpki import issue_auth_cert, load_card, make_test_jpki_ca, write_crl
from gateway.store.schema import audit_event
from gateway.vcard.jpki import JpkiApplet
from tests.support.gateway import CLI, REPO, Server, run_cli
from tests.support.jpki_checks import certificate_checker
from tests.support.pcsc import PcscWorld
from tests.support.signing import Csc, b64, services

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

SHA256 = "2.16.840.1.101.3.4.2.1"
CSV = (
    "1,医療機関コード,1310000011\n2,患者氏名,試験　花子\n3,処方,アムロジピン錠5mg 1錠 分1\n"
).encode()


@dataclass
class Doctor:
    manifest: dict[str, Any]
    pin: str
    applet: JpkiApplet
    gw: GatewayClient


def _sandbox_ca(sandbox: dict[str, Any]) -> CertAndKey:
    jpki = Path(sandbox["dir"]) / "jpki"
    key = serialization.load_pem_private_key((jpki / "test-jpki-ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate((jpki / "test-jpki-ca.pem").read_bytes())
    return CertAndKey(cert=cert, key=key)


def _applet(ca: CertAndKey, *, pin: str = "4321", **kw: Any) -> JpkiApplet:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_auth_cert(ca, key.public_key(), now=dt.datetime.now(dt.UTC), **kw)
    return JpkiApplet(
        auth_key=key,
        auth_cert_der=cert.public_bytes(serialization.Encoding.DER),
        auth_ca_der=ca.cert.public_bytes(serialization.Encoding.DER),
        pin=pin,
    )


async def _audit_count(config: str, action: str) -> int:
    async with services(config) as svc, svc.db.read() as conn:
        q = select(func.count()).select_from(audit_event).where(audit_event.c.action == action)
        return int((await conn.execute(q)).scalar_one())


async def _audit_rows(config: str, action: str) -> list[Any]:
    async with services(config) as svc, svc.db.read() as conn:
        q = select(audit_event).where(audit_event.c.action == action).order_by(audit_event.c.seq)
        return list((await conn.execute(q)).all())


@pytest.fixture(scope="module")
def gw(sandbox: dict[str, Any], gateway: Server, hospital: dict[str, Any]) -> GatewayClient:
    return GatewayClient(
        url=f"https://localhost:{gateway.port}",
        client_cert=hospital["client_cert"],
        client_key=hospital["client_key"],
        server_ca=sandbox["server_ca"],
    )


@pytest.fixture(scope="module")
def jpki_doctor(
    sandbox: dict[str, Any], gateway: Server, hospital: dict[str, Any], pcsc: PcscWorld,
    gw: GatewayClient,
) -> Iterator[Doctor]:  # fmt: skip
    """The sandbox's second doctor, whose card is enrolled by `card enroll` (code+password)."""
    doc = [s for s in sandbox["signers"] if s["role"] == "Medical Doctor"][1]
    card_dir = Path(sandbox["dir"]) / "cards" / doc["id"]
    applet = load_card(card_dir, Path(sandbox["jpki"]["trust_anchor"]))
    pin = (card_dir / "pin").read_text().strip()
    reader = pcsc.readers[0]
    reader.insert(applet)
    # A fresh code: other tests may have replaced the manifest's.
    issued = json.loads(
        run_cli("signer", "enroll-code", doc["id"], "-c", sandbox["config"], "--json").stdout
    )
    res = subprocess.run(
        [*CLI, "card", "enroll", "--url", gw.url, "--client-cert", hospital["client_cert"],
         "--client-key", hospital["client_key"], "--ca", sandbox["server_ca"],
         "--code", issued["enrollment_code"], "--password", issued["enrollment_password"],
         "--pin-stdin", "--json", "--lang", "en", "--label", "test card"],
        input=pin + "\n", capture_output=True, text=True, env=pcsc.env(), cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["status"] == "linked" and out["link"]["signer_id"] == doc["id"]
    assert pin not in res.stdout + res.stderr
    try:
        yield Doctor(manifest=doc, pin=pin, applet=applet, gw=gw)
    finally:
        reader.remove()


def test_enrolment_linked_and_audited(jpki_doctor: Doctor, sandbox: dict[str, Any]) -> None:
    rows = asyncio.run(_audit_rows(sandbox["config"], "jpki.link"))
    mine = [r for r in rows if r.signer_id == jpki_doctor.manifest["id"]]
    assert mine and json.loads(mine[-1].detail)["how"] == "enrollment"
    listed = run_cli("signer", "jpki-links", jpki_doctor.manifest["id"], "-c", sandbox["config"],
                     "--json")  # fmt: skip
    links = json.loads(listed.stdout)
    assert len(links) == 1 and links[0]["label"] == "test card"


def test_card_cli_authorize_then_sign_doc_eprescription(
    jpki_doctor: Doctor, sandbox: dict[str, Any], hospital: dict[str, Any], pcsc: PcscWorld,
    gateway: Server, hospital_ctx: Any,
) -> None:  # fmt: skip
    doc = jpki_doctor.manifest
    digest = hashlib.sha256(CSV).digest()
    res = subprocess.run(
        [*CLI, "card", "authorize", "--url", jpki_doctor.gw.url,
         "--client-cert", hospital["client_cert"], "--client-key", hospital["client_key"],
         "--ca", sandbox["server_ca"], "--credential", doc["credential_id"],
         "--hash", b64(digest), "--pin-stdin", "--json", "--lang", "en"],
        input=jpki_doctor.pin + "\n", capture_output=True, text=True, env=pcsc.env(), cwd=REPO,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    sad = json.loads(res.stdout)["SAD"]
    csc = Csc(gateway.port, hospital_ctx)
    r = csc.post(
        "/csc/v2/signatures/signDoc",
        {
            "credentialID": doc["credential_id"],
            "SAD": sad,
            "documents": [
                {"document": b64(CSV), "signature_format": "X", "profile": "jp-eprescription"}
            ],
        },
    )
    assert r.status == 200, r.body
    xml = base64.b64decode(r.json()["DocumentWithSignature"][0])
    report = csc.post("/verify", {"document": b64(xml)})
    assert report.status == 200, report.body
    assert report.json()["indication"] == "TOTAL-PASSED", report.json()
    issued = asyncio.run(_audit_rows(sandbox["config"], "sad.issue"))
    detail = json.loads(issued[-1].detail)
    assert detail["presence"] == "jpki" and detail["hashes"] == [digest.hex()]
    # No PIN anywhere: CLI output, gateway log, pcscd log.
    for text in (res.stdout, res.stderr, gateway.logs(), pcsc.pcscd.dir.joinpath("pcscd.log")
                 .read_text(errors="replace")):  # fmt: skip
        # A 4-digit PIN also occurs inside ids, digests and numbers of a long log: look for it
        # as a value of its own, not as part of a longer token.
        assert not re.search(rf"(?<![0-9A-Za-z]){jpki_doctor.pin}(?![0-9A-Za-z])", text)


def test_status_shows_card_and_tries(jpki_doctor: Doctor, pcsc: PcscWorld) -> None:
    res = subprocess.run([*CLI, "card", "status", "--json"], capture_output=True, text=True,
                         env=pcsc.env(), cwd=REPO, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    items = json.loads(res.stdout)
    assert items[0] == {
        "reader": pcsc.readers[0].name,
        "kind": "jpki",
        "token": "JPKIAPICCTOKEN2",
        "pin_tries_left": 3,
    }
    assert items[1]["kind"] == "none"


# -- attacks: each refused, with a reason, audited ---------------------------------------------


def _begin(gw: GatewayClient, cred: str, hashes: list[bytes]) -> dict[str, Any]:
    return gw.post(
        "/auth/jpki/authenticate/begin",
        {"credentialID": cred, "hashes": [b64(h) for h in hashes], "hashAlgorithmOID": SHA256,
         "numSignatures": len(hashes)},
    )  # fmt: skip


def _authorize_raw(
    gw: GatewayClient, cred: str, hashes: list[bytes], cert: bytes, sig: bytes, cid: str
) -> dict[str, Any]:
    value = json.dumps({"certificate": b64(cert), "signature": b64(sig), "challenge_id": cid})
    return gw.post(
        "/csc/v2/credentials/authorize",
        {"credentialID": cred, "hashes": [b64(h) for h in hashes], "hashAlgorithmOID": SHA256,
         "numSignatures": len(hashes), "authData": [{"id": "jpki", "value": value}]},
    )  # fmt: skip


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _card_sign(
    applet: JpkiApplet, pin: str, challenge: bytes, pcsc: PcscWorld
) -> tuple[bytes, bytes]:
    """Certificate and the card's signature over ``challenge``, through pcscd. The enrolled
    card stays in reader 0 (one card is never in two readers); others go into reader 1."""
    if pcsc.readers[0].applet is applet:
        with open_jpki_card(pcsc.readers[0].name) as card:
            cert = card.read_auth_certificate()
            card.verify_auth_pin(pin)
            return cert, card.sign(challenge)
    reader = pcsc.readers[1]
    reader.insert(applet)
    try:
        with open_jpki_card(reader.name) as card:
            cert = card.read_auth_certificate()
            card.verify_auth_pin(pin)
            return cert, card.sign(challenge)
    finally:
        reader.remove()


ATTACKS = {
    "signature_over_another_challenge": "does not verify over this challenge",
    "replayed_authorization": "challenge was already used",
    "other_hashes_than_begin": "does not approve this request",
    "unlinked_card": "not linked to the signer",
    "rogue_ca_with_jpki_dn": "not issued by a configured JPKI authentication trust anchor",
    "revoked_ocsp": "revoked",
    "expired_certificate": "expired",
    "revocation_unreachable": "cannot be checked now",
}


@pytest.mark.parametrize("case", list(ATTACKS))
def test_attack_refused(
    case: str, jpki_doctor: Doctor, sandbox: dict[str, Any], pcsc: PcscWorld
) -> None:
    gw, doc = jpki_doctor.gw, jpki_doctor.manifest
    cred = doc["credential_id"]
    hashes = [hashlib.sha256(case.encode()).digest()]
    before = asyncio.run(_audit_count(sandbox["config"], "sad.refused"))
    ca = _sandbox_ca(sandbox)
    applet, pin = jpki_doctor.applet, jpki_doctor.pin
    begun = _begin(gw, cred, hashes)
    challenge, cid = _decode(begun["challenge"]), begun["challenge_id"]
    send = hashes
    if case == "signature_over_another_challenge":
        other = _begin(gw, cred, hashes)
        cert, sig = _card_sign(applet, pin, _decode(other["challenge"]), pcsc)
    elif case == "replayed_authorization":
        cert, sig = _card_sign(applet, pin, challenge, pcsc)
        assert "SAD" in _authorize_raw(gw, cred, hashes, cert, sig, cid)
    elif case == "other_hashes_than_begin":
        cert, sig = _card_sign(applet, pin, challenge, pcsc)
        send = [hashlib.sha256(b"another prescription").digest()]
    elif case == "unlinked_card":
        fresh = _applet(ca, ocsp_url=sandbox["jpki"]["ocsp_url"])
        cert, sig = _card_sign(fresh, "4321", challenge, pcsc)
    elif case == "rogue_ca_with_jpki_dn":
        rogue = make_test_jpki_ca(now=dt.datetime.now(dt.UTC))
        assert rogue.cert.subject == ca.cert.subject  # same DN, other key
        cert, sig = _card_sign(_applet(rogue), "4321", challenge, pcsc)
    elif case == "revoked_ocsp":
        revoked = _applet(ca, ocsp_url=sandbox["jpki"]["ocsp_url"])
        cert_obj = x509.load_der_x509_certificate(revoked.auth_cert_der)
        write_crl(Path(sandbox["dir"]), [cert_obj.serial_number])
        try:
            cert, sig = _card_sign(revoked, "4321", challenge, pcsc)
            with pytest.raises(GatewayCallError) as err:
                _authorize_raw(gw, cred, send, cert, sig, cid)
        finally:
            write_crl(Path(sandbox["dir"]), [])
        assert err.value.status in (401, 403) and "revoked" in err.value.description
        after = asyncio.run(_audit_count(sandbox["config"], "sad.refused"))
        assert after == before + 1
        return
    elif case == "expired_certificate":
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
        cert, sig = _card_sign(
            _applet(ca, not_before=old, validity=dt.timedelta(days=30)), "4321", challenge, pcsc
        )
    elif case == "revocation_unreachable":
        cert, sig = _card_sign(
            _applet(ca, ocsp_url="http://127.0.0.1:9/ocsp"), "4321", challenge, pcsc
        )
    with pytest.raises(GatewayCallError) as err:
        _authorize_raw(gw, cred, send, cert, sig, cid)
    assert 400 <= err.value.status < 500
    assert ATTACKS[case] in err.value.description, err.value.description
    after = asyncio.run(_audit_count(sandbox["config"], "sad.refused"))
    assert after >= before + 1
    rows = asyncio.run(_audit_rows(sandbox["config"], "sad.refused"))
    assert ATTACKS[case] in json.loads(rows[-1].detail)["reason"]


def test_another_facility_cannot_burn_this_facilitys_challenge(
    jpki_doctor: Doctor, sandbox: dict[str, Any], pcsc: PcscWorld, pharmacy: dict[str, Any]
) -> None:
    """A facility that sends another facility's challenge_id (and even the card's answer to it)
    is refused and audited, but the challenge stays the other facility's: its refusal used to
    burn it, so the doctor's own authorize then failed with 'challenge was already used'."""
    gw, doc = jpki_doctor.gw, jpki_doctor.manifest
    cred = doc["credential_id"]
    hashes = [hashlib.sha256(b"cross-facility burn").digest()]
    begun = _begin(gw, cred, hashes)
    cert, sig = _card_sign(jpki_doctor.applet, jpki_doctor.pin, _decode(begun["challenge"]), pcsc)
    other = GatewayClient(
        url=gw.url,
        client_cert=pharmacy["client_cert"],
        client_key=pharmacy["client_key"],
        server_ca=sandbox["server_ca"],
    )
    before = asyncio.run(_audit_rows(sandbox["config"], "sad.refused"))
    with pytest.raises(GatewayCallError) as err:
        _authorize_raw(other, cred, hashes, cert, sig, begun["challenge_id"])
    assert err.value.status == 400
    assert "the challenge was issued to another facility" in err.value.description
    rows = asyncio.run(_audit_rows(sandbox["config"], "sad.refused"))
    assert len(rows) == len(before) + 1
    assert rows[-1].facility_code == pharmacy["institution_code"]
    assert "issued to another facility" in json.loads(rows[-1].detail)["reason"]
    # The doctor's facility still gets its SAD with its own challenge.
    assert _authorize_raw(gw, cred, hashes, cert, sig, begun["challenge_id"])["SAD"]


def test_pin_blocked_mid_flow_is_refused_and_audited(
    jpki_doctor: Doctor, sandbox: dict[str, Any], pcsc: PcscWorld, hospital: dict[str, Any]
) -> None:
    ca = _sandbox_ca(sandbox)
    applet = _applet(ca, pin="1357")
    reader = pcsc.readers[1]
    reader.insert(applet)
    try:
        with open_jpki_card(reader.name) as card:
            for left in (2, 1):
                with pytest.raises(CardError) as e:
                    card.verify_auth_pin("0000")
                assert e.value.code is CardErrorCode.WRONG_PIN and e.value.tries_left == left
                assert f"{left}" in e.value.message("ja") and "Wrong PIN" in e.value.message("en")
        # One try left: the doctor starts the flow and types the wrong PIN: blocked mid-flow.
        before = asyncio.run(_audit_count(sandbox["config"], "jpki.card_refused"))
        res = subprocess.run(
            [*CLI, "card", "authorize", "--url", jpki_doctor.gw.url, "--reader", reader.name,
             "--client-cert", hospital["client_cert"], "--client-key", hospital["client_key"],
             "--ca", sandbox["server_ca"], "--credential", jpki_doctor.manifest["credential_id"],
             "--hash", b64(hashlib.sha256(b"x").digest()), "--pin-stdin", "--lang", "ja"],
            input="0000\n", capture_output=True, text=True, env=pcsc.env(), cwd=REPO, timeout=60,
        )  # fmt: skip
        assert res.returncode == 3, res.stderr
        assert "ロック" in res.stderr and "市区町村" in res.stderr
        assert "0000" not in res.stdout + res.stderr and "1357" not in res.stdout + res.stderr
        assert applet.blocked
        rows = asyncio.run(_audit_rows(sandbox["config"], "jpki.card_refused"))
        assert len(rows) == before + 1
        assert json.loads(rows[-1].detail)["reason"] == "card: pin_blocked"
        # Blocked before the flow: the card client stops before asking the gateway.
        res = subprocess.run(
            [*CLI, "card", "authorize", "--url", jpki_doctor.gw.url, "--reader", reader.name,
             "--client-cert", hospital["client_cert"], "--client-key", hospital["client_key"],
             "--ca", sandbox["server_ca"], "--credential", jpki_doctor.manifest["credential_id"],
             "--hash", b64(hashlib.sha256(b"y").digest()), "--pin-stdin", "--lang", "en"],
            input="1357\n", capture_output=True, text=True, env=pcsc.env(), cwd=REPO, timeout=60,
        )  # fmt: skip
        assert res.returncode == 3 and "blocked" in res.stderr
    finally:
        reader.remove()


class _PulledBeforeSigning(JpkiCard):
    """The doctor pulls the card after VERIFY succeeded, just before the signature."""

    def __init__(self, card: JpkiCard, reader: Any) -> None:
        super().__init__(card.transport)
        self.reader = reader

    def sign(self, data: bytes) -> bytes:
        self.reader.remove()
        return super().sign(data)


def test_card_pulled_between_verify_and_sign(
    jpki_doctor: Doctor, sandbox: dict[str, Any], pcsc: PcscWorld
) -> None:
    reader = pcsc.readers[1]
    applet = _applet(_sandbox_ca(sandbox), pin="2468", ocsp_url=sandbox["jpki"]["ocsp_url"])
    asyncio.run(_link(sandbox, jpki_doctor.manifest["id"], applet.auth_cert_der))
    reader.insert(applet)
    before = asyncio.run(_audit_count(sandbox["config"], "jpki.card_refused"))
    try:
        with open_jpki_card(reader.name) as card, pytest.raises(CardError) as e:
            authorize(
                _PulledBeforeSigning(card, reader),
                jpki_doctor.gw,
                credential_id=jpki_doctor.manifest["credential_id"],
                hashes=[hashlib.sha256(b"pulled").digest()],
                pin="2468",
            )
    finally:
        reader.remove()
    assert e.value.code is CardErrorCode.CARD_REMOVED
    assert "外され" in e.value.message("ja") and "removed" in e.value.message("en")
    rows = asyncio.run(_audit_rows(sandbox["config"], "jpki.card_refused"))
    assert len(rows) == before + 1
    assert json.loads(rows[-1].detail)["reason"] == "card: card_removed"


def test_python_api_authorize(jpki_doctor: Doctor, pcsc: PcscWorld) -> None:
    """The importable flow a facility system uses, on the enrolled card in reader 0."""
    with open_jpki_card(pcsc.readers[0].name) as card:
        assert isinstance(card, JpkiCard)
        out = authorize(
            card,
            jpki_doctor.gw,
            credential_id=jpki_doctor.manifest["credential_id"],
            hashes=[hashlib.sha256(b"api").digest()],
            pin=jpki_doctor.pin,
        )
    assert out["SAD"] and out["expiresIn"] > 0


def test_info_and_credential_info_name_presence_methods(
    jpki_doctor: Doctor, gateway: Server, hospital_ctx: Any, sandbox: dict[str, Any]
) -> None:
    csc = Csc(gateway.port, hospital_ctx)
    info = csc.post("/csc/v2/info", {})
    assert info.status == 200 and info.json()["presenceMethods"] == ["webauthn", "jpki"]
    r = csc.post(
        "/csc/v2/credentials/info", {"credentialID": jpki_doctor.manifest["credential_id"]}
    )
    assert r.status == 200, r.body
    fido = json.loads(
        run_cli("signer", "authenticators", jpki_doctor.manifest["id"], "-c", sandbox["config"],
                "--json").stdout
    )  # fmt: skip
    assert r.json()["presenceMethods"] == (["webauthn"] if fido else []) + ["jpki"]
    # A signer with no card linked: no "jpki".
    pharmacist = next(s for s in sandbox["signers"] if s["role"] == "Pharmacist")
    from tests.support.gateway import client_context

    pctx = client_context(
        sandbox["server_ca"],
        *next((f["client_cert"], f["client_key"]) for f in sandbox["facilities"]
              if f["kind"] == "pharmacy"),
    )  # fmt: skip
    links = json.loads(run_cli("signer", "jpki-links", pharmacist["id"], "-c", sandbox["config"],
                               "--json").stdout)  # fmt: skip
    r = Csc(gateway.port, pctx).post(
        "/csc/v2/credentials/info", {"credentialID": pharmacist["credential_id"]}
    )
    assert r.status == 200, r.body
    assert ("jpki" in r.json()["presenceMethods"]) == bool(links)


def _admin_ctx(sandbox: dict[str, Any]) -> Any:
    from tests.support.gateway import client_context

    adm = sandbox["admin"]
    return client_context(sandbox["server_ca"], adm["client_cert"], adm["client_key"])


def test_officer_links_by_cli_and_admin_api_by_key_not_name(
    jpki_doctor: Doctor, sandbox: dict[str, Any], gateway: Server, tmp_path: Path
) -> None:
    from tests.support.gateway import request

    pharmacist = next(s for s in sandbox["signers"] if s["role"] == "Pharmacist")
    ca = _sandbox_ca(sandbox)
    ocsp = sandbox["jpki"]["ocsp_url"]
    # CLI, PEM file
    card = _applet(ca, ocsp_url=ocsp)
    pem = tmp_path / "card.pem"
    pem.write_bytes(
        x509.load_der_x509_certificate(card.auth_cert_der).public_bytes(serialization.Encoding.PEM)
    )
    out = run_cli("signer", "link-jpki", pharmacist["id"], "--cert", str(pem), "-c",
                  sandbox["config"], "--json")  # fmt: skip
    link_id = json.loads(out.stdout)["id"]
    # The same card again: refused (one card, one signer).
    again = run_cli("signer", "link-jpki", pharmacist["id"], "--cert", str(pem), "-c",
                    sandbox["config"], check=False)  # fmt: skip
    assert again.returncode == 1 and "already linked" in again.stderr
    # Admin API, base64 DER; a rogue CA with the JPKI DN is refused and audited.
    ctx = _admin_ctx(sandbox)
    rogue = _applet(make_test_jpki_ca(now=dt.datetime.now(dt.UTC)), ocsp_url=ocsp)
    before = asyncio.run(_audit_count(sandbox["config"], "jpki.link.refused"))
    r = request(gateway.port, "POST", f"/admin/signers/{pharmacist['id']}/jpki", ctx=ctx,
                json_body={"certificate": b64(rogue.auth_cert_der)})  # fmt: skip
    assert r.status == 403, r.body
    assert "checked by key" in r.json()["detail"]
    assert asyncio.run(_audit_count(sandbox["config"], "jpki.link.refused")) == before + 1
    good = _applet(ca, ocsp_url=ocsp)
    r = request(gateway.port, "POST", f"/admin/signers/{pharmacist['id']}/jpki", ctx=ctx,
                json_body={"certificate": b64(good.auth_cert_der), "label": "spare"})  # fmt: skip
    assert r.status == 201, r.body
    r = request(gateway.port, "GET", f"/admin/signers/{pharmacist['id']}/jpki", ctx=ctx)
    assert {k["id"] for k in r.json()["links"]} >= {link_id}
    assert len(r.json()["links"]) == 2
    r = request(gateway.port, "DELETE", f"/admin/signers/{pharmacist['id']}/jpki/{link_id}",
                ctx=ctx)  # fmt: skip
    assert r.status == 200, r.body
    assert asyncio.run(_audit_count(sandbox["config"], "jpki.unlink")) >= 1
    out = run_cli("signer", "unlink-jpki", pharmacist["id"], link_id, "-c", sandbox["config"],
                  check=False)  # fmt: skip
    assert out.returncode == 1 and "has no My Number card link" in out.stderr


def test_unlink_ends_live_sads(jpki_doctor: Doctor, sandbox: dict[str, Any], pcsc: PcscWorld,
                               gateway: Server, hospital_ctx: Any) -> None:  # fmt: skip
    """A second card of the doctor approves; unlinking it ends its SAD before use."""
    ca = _sandbox_ca(sandbox)
    spare = _applet(ca, ocsp_url=sandbox["jpki"]["ocsp_url"], pin="9753")
    doc = jpki_doctor.manifest
    made = asyncio.run(_link(sandbox, doc["id"], spare.auth_cert_der))
    digest = hashlib.sha256(b"spare card").digest()
    begun = _begin(jpki_doctor.gw, doc["credential_id"], [digest])
    cert, sig = _card_sign(spare, "9753", _decode(begun["challenge"]), pcsc)
    sad = _authorize_raw(jpki_doctor.gw, doc["credential_id"], [digest], cert, sig,
                         begun["challenge_id"])["SAD"]  # fmt: skip
    run_cli("signer", "unlink-jpki", doc["id"], made, "-c", sandbox["config"])
    csc = Csc(gateway.port, hospital_ctx)
    r = csc.post("/csc/v2/signatures/signHash", {"credentialID": doc["credential_id"], "SAD": sad,
                 "hashes": [b64(digest)], "hashAlgorithmOID": SHA256,
                 "signAlgo": "1.2.840.113549.1.1.11"})  # fmt: skip
    assert r.status == 400 and "SAD expired" in r.body.decode()


async def _link(sandbox: dict[str, Any], signer_id: str, der: bytes) -> str:
    from gateway.auth.jpki_setup import make_jpki
    from gateway.config import load_settings

    settings = load_settings(sandbox["config"], environ={})
    async with services(sandbox["config"]) as svc:
        jpki = make_jpki(
            settings,
            db=svc.db,
            audit=svc.activation.audit,
            fido2=svc.fido2,
            ledger=svc.activation.ledger,
        )
        link = await jpki.link(signer_id, der, actor="test")
    return link.id


def test_revoked_by_crl_source(sandbox: dict[str, Any]) -> None:
    """The CRL source (file): a listed serial is refused, another is good; a CRL signed by a
    rogue CA with the same DN does not count."""
    from gateway.auth.jpki_revocation import CrlRevocation
    from gateway.errors import AccessDenied

    ca = _sandbox_ca(sandbox)
    card = x509.load_der_x509_certificate(_applet(ca).auth_cert_der)
    other = x509.load_der_x509_certificate(_applet(ca).auth_cert_der)
    crl_dir = Path(sandbox["dir"]) / "crl-test"
    crl_dir.mkdir(exist_ok=True)
    from gateway.pki import issue as testworld

    now = dt.datetime.now(dt.UTC)
    crl = testworld.make_crl(ca, revoked=[(card.serial_number, now, None)], now=now,
                             next_update=dt.timedelta(days=1))  # fmt: skip
    (crl_dir / "jpki.crl").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    rogue = make_test_jpki_ca(now=now)
    rogue_crl = testworld.make_crl(rogue, revoked=[(other.serial_number, now, None)], now=now,
                                   next_update=dt.timedelta(days=1))  # fmt: skip
    (crl_dir / "rogue.crl").write_bytes(rogue_crl.public_bytes(serialization.Encoding.DER))

    async def check(cert: x509.Certificate, accept: bool = False) -> str:
        auth = certificate_checker(
            [ca.cert],
            CrlRevocation(files=[crl_dir / "jpki.crl", crl_dir / "rogue.crl"]),
            accept_unavailable=accept,
        )
        try:
            return (await auth.check_certificate(cert, now)).revocation
        except AccessDenied as e:
            return e.description

    assert "revoked" in asyncio.run(check(card))
    assert asyncio.run(check(other)) == "good"
    # No CRL of the issuer at all: unavailable -> refused, or accepted when configured so.
    stranger_ca = make_test_jpki_ca(now=now)
    stranger = x509.load_der_x509_certificate(_applet(stranger_ca).auth_cert_der)

    async def check_stranger(accept: bool) -> str:
        auth = certificate_checker(
            [stranger_ca.cert],
            CrlRevocation(files=[crl_dir / "jpki.crl"]),
            accept_unavailable=accept,
        )
        try:
            return (await auth.check_certificate(stranger, now)).revocation
        except AccessDenied as e:
            return e.description

    assert "cannot be checked now" in asyncio.run(check_stranger(False))
    assert asyncio.run(check_stranger(True)) == "unavailable-accepted"


@pytest.mark.parametrize("case", ["expired", "revoked"])
def test_cli_says_expired_or_revoked_in_the_doctors_words(
    case: str, jpki_doctor: Doctor, sandbox: dict[str, Any], pcsc: PcscWorld,
    hospital: dict[str, Any],
) -> None:  # fmt: skip
    ca = _sandbox_ca(sandbox)
    ocsp = sandbox["jpki"]["ocsp_url"]
    if case == "expired":
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
        card = _applet(ca, pin="8642", ocsp_url=ocsp, not_before=old,
                       validity=dt.timedelta(days=30))  # fmt: skip
    else:
        card = _applet(ca, pin="8642", ocsp_url=ocsp)
        asyncio.run(_link(sandbox, jpki_doctor.manifest["id"], card.auth_cert_der))
        serial = x509.load_der_x509_certificate(card.auth_cert_der).serial_number
        write_crl(Path(sandbox["dir"]), [serial])
    reader = pcsc.readers[1]
    reader.insert(card)
    try:
        res = subprocess.run(
            [*CLI, "card", "authorize", "--url", jpki_doctor.gw.url, "--reader", reader.name,
             "--client-cert", hospital["client_cert"], "--client-key", hospital["client_key"],
             "--ca", sandbox["server_ca"], "--credential", jpki_doctor.manifest["credential_id"],
             "--hash", b64(hashlib.sha256(case.encode()).digest()), "--pin-stdin", "--lang", "ja",
             "--json"],
            input="8642\n", capture_output=True, text=True, env=pcsc.env(), cwd=REPO, timeout=60,
        )  # fmt: skip
    finally:
        reader.remove()
        write_crl(Path(sandbox["dir"]), [])
    assert res.returncode == 3, res.stderr
    out = json.loads(res.stdout)
    want = "certificate_expired" if case == "expired" else "certificate_revoked"
    assert out["error"] == want
    assert ("有効期限" if case == "expired" else "失効") in res.stderr
    assert "8642" not in res.stdout + res.stderr
