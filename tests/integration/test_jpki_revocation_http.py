"""My Number card revocation by CRL at the HTTP level, over real pcscd.

A second gateway on the sandbox takes JPKI revocation from CRLs (``jpki.revocation = "crl"``):
the TEST JPKI CA's CRL, fetched over HTTP from the URL ``serve`` publishes it at. With that CRL
listing one linked card, the full flow (begin -> the card signs through pcscd -> authorize) is
refused for that card with a clear error and an audit record, while another card of the same
signer, not listed, gets its SAD from the same gateway. (Revocation by OCSP at the HTTP level:
``test_jpki_presence.py``, attack ``revoked_ocsp``.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from gateway.card.client import GatewayCallError, GatewayClient, authorize
from gateway.card.jpki import open_jpki_card
from gateway.pki.issue import CertAndKey
from gateway.sandbox.jpki import issue_auth_cert, write_crl
from gateway.store.schema import audit_event
from gateway.vcard.jpki import JpkiApplet
from tests.support.gateway import Server, run_cli, serving
from tests.support.pcsc import PcscWorld
from tests.support.signing import services

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

PIN = "2468"


def _sandbox_ca(sandbox: dict[str, Any]) -> CertAndKey:
    jpki = Path(sandbox["dir"]) / "jpki"
    key = serialization.load_pem_private_key((jpki / "test-jpki-ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate((jpki / "test-jpki-ca.pem").read_bytes())
    return CertAndKey(cert=cert, key=key)


def _card(sandbox: dict[str, Any], ca: CertAndKey) -> tuple[JpkiApplet, x509.Certificate]:
    """A My Number card of the sandbox's TEST JPKI CA naming its CRL and no OCSP responder, so
    that only the CRL can say it is revoked."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_auth_cert(
        ca,
        key.public_key(),
        now=dt.datetime.now(dt.UTC),
        crl_url=sandbox["jpki"]["crl_url"],
    )
    applet = JpkiApplet(
        auth_key=key,
        auth_cert_der=cert.public_bytes(serialization.Encoding.DER),
        auth_ca_der=ca.cert.public_bytes(serialization.Encoding.DER),
        pin=PIN,
    )
    return applet, cert


async def _refusals(config: str, credential_id: str) -> list[dict[str, Any]]:
    """The ``sad.refused`` audit records of ``credential_id`` (the certificate checks run
    before the card is matched to a signer: the record names the credential)."""
    async with services(config) as svc, svc.db.read() as conn:
        q = (
            select(audit_event)
            .where(audit_event.c.action == "sad.refused")
            .order_by(audit_event.c.seq)
        )
        rows = [json.loads(r.detail) for r in (await conn.execute(q)).all()]
    return [d for d in rows if d.get("credential") == credential_id]


@pytest.fixture
def revoked_world(sandbox: dict[str, Any]) -> Iterator[None]:
    yield
    write_crl(Path(sandbox["dir"]), [])  # the sandbox's CRL back to empty for the other tests


def test_a_card_on_the_jpki_crl_is_refused_through_the_whole_flow(
    sandbox: dict[str, Any], gateway: Server, pcsc: PcscWorld, revoked_world: None,
    tmp_path: Path,
) -> None:  # fmt: skip
    # `gateway` (the main sandbox gateway) serves the TEST JPKI CA's CRL at jpki.crl_url.
    pharmacist = next(s for s in sandbox["signers"] if s["role"] == "Pharmacist")
    pharmacy = next(f for f in sandbox["facilities"] if f["kind"] == "pharmacy")
    ca = _sandbox_ca(sandbox)
    good, good_cert = _card(sandbox, ca)
    revoked, revoked_cert = _card(sandbox, ca)
    crl_source = {
        "HPKI_GATEWAY_JPKI__REVOCATION": "crl",
        "HPKI_GATEWAY_JPKI__CRL_URLS": json.dumps([sandbox["jpki"]["crl_url"]]),
    }
    # The officer links both cards (several cards per signer) while neither is revoked; the
    # link checks revocation too, from the same CRL.
    for name, cert in (("good", good_cert), ("revoked", revoked_cert)):
        pem = tmp_path / f"{name}.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        run_cli("signer", "link-jpki", pharmacist["id"], "--cert", str(pem),
                "-c", sandbox["config"], env=crl_source)  # fmt: skip
    # Then the CA revokes one: the CRL `serve` publishes lists it.
    write_crl(Path(sandbox["dir"]), [revoked_cert.serial_number])
    # The main gateway keeps running the TEST services (TSA, CRLs, OCSP); this one only signs.
    env = {"HPKI_GATEWAY_TEST_TSA__ENABLED": "false", **crl_source}
    refused_before = len(asyncio.run(_refusals(sandbox["config"], pharmacist["credential_id"])))
    with serving(Path(sandbox["config"]), env=env) as crl_gw:
        client = GatewayClient(
            url=f"https://localhost:{crl_gw.port}",
            client_cert=pharmacy["client_cert"],
            client_key=pharmacy["client_key"],
            server_ca=sandbox["server_ca"],
        )
        reader = pcsc.readers[1]

        def approve(applet: JpkiApplet, what: bytes) -> dict[str, Any]:
            reader.insert(applet)
            try:
                with open_jpki_card(reader.name) as card:
                    return authorize(
                        card,
                        client,
                        credential_id=pharmacist["credential_id"],
                        hashes=[hashlib.sha256(what).digest()],
                        pin=PIN,
                    )
            finally:
                reader.remove()

        # The card the CRL does not list: the same gateway, the same CRL, a SAD.
        assert approve(good, b"dispensing result 1")["SAD"]
        with pytest.raises(GatewayCallError) as err:
            approve(revoked, b"dispensing result 2")
    assert err.value.status == 403, err.value.body
    assert "the JPKI certificate is revoked" in err.value.description, err.value.body
    refusals = asyncio.run(_refusals(sandbox["config"], pharmacist["credential_id"]))
    assert len(refusals) == refused_before + 1
    assert "the JPKI certificate is revoked" in refusals[-1]["reason"], refusals[-1]
    assert f"{revoked_cert.serial_number:X} is revoked by" in refusals[-1]["reason"]
    assert refusals[-1]["presence"] == "jpki"
