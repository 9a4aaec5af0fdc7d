"""The local path through a card vendor's PKCS#11 module (``--pkcs11-module PATH``), with
SoftHSM standing in for the vendor module: a token holding the doctor's key (generated on it)
and the certificate the TEST HPKI CA issued for it, next to the CA's certificate. The batch and
the agent run as real subprocesses; signatures are checked by xmlsec1 and our verifier."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from tests.support.facility_system import sign_prescriptions
from tests.support.local import (
    CardWorld,
    LocalEndpoint,
    VendorToken,
    check_signed,
    last_json,
    make_vendor_token,
    run_agent,
    sign_batch_cli,
    write_prescriptions,
)


@pytest.fixture(scope="module")
def token(card_world: CardWorld, tmp_path_factory: pytest.TempPathFactory) -> VendorToken:
    return make_vendor_token(tmp_path_factory.mktemp("vendor-module"), card_world)


def test_sign_batch_through_the_vendor_module(
    card_world: CardWorld, token: VendorToken, tmp_path: Path
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    names = write_prescriptions(src, 12)
    cfg = card_world.config(reader=token.label)
    flags = ("--pkcs11-module", token.module)

    # A wrong PIN: nothing signed, the PIN nowhere in the output.
    res = sign_batch_cli(token.env(), cfg, src, out, "00000000", *flags)
    assert res.returncode == 3, (res.stdout, res.stderr)
    assert "00000000" not in res.stdout + res.stderr
    assert not list(out.glob("*.xml"))

    res = sign_batch_cli(token.env(), cfg, src, out, token.pin, *flags)
    assert res.returncode == 0, res.stderr
    assert token.pin not in res.stdout + res.stderr
    summary = last_json(res.stdout)
    assert (summary["signed"], summary["failed"], summary["not_done"]) == (12, 0, 0)
    for name in names:
        rep = check_signed(card_world, out / name.replace(".csv", ".xml"))
        signer = rep.signatures[0].signer
        assert signer is not None and "Yamada Taro" in signer["subject"]


def test_agent_through_the_vendor_module(
    card_world: CardWorld, token: VendorToken, tmp_path: Path
) -> None:
    cfg = card_world.config(reader=token.label, secret_file=tmp_path / "secret")
    with run_agent(
        cfg, token.env(), "--pkcs11-module", token.module, secrets_never_logged=(token.pin,)
    ) as agent:
        # The facility system's code, unchanged: list, info, authorize with the PIN, signHash
        # (checked with the certificate's key), signDoc (verified).
        signed = sign_prescriptions(LocalEndpoint(agent, token.pin), trust=card_world.trust())
        assert len(signed) == 1
        path = tmp_path / "facility-p11.xml"
        path.write_bytes(signed[0])
        check_signed(card_world, path)

        # The credential is the card's own certificate, not the CA's beside it on the token.
        cid = agent.post("/csc/v2/credentials/list", {})[1]["credentialIDs"][0]
        status, body = agent.post("/csc/v2/credentials/info", {"credentialID": cid})
        assert status == 200, body
        leaf = base64.b64decode(body["cert"]["certificates"][0])
        assert leaf == token.cert.public_bytes(serialization.Encoding.DER)
        assert body["pin_tries_left"] is None  # SoftHSM, like most modules, does not tell

        # A wrong PIN: refused, the count unknown; the right one works after it.
        digest = hashlib.sha256(b"one hash").digest()
        auth: dict[str, Any] = {
            "credentialID": cid,
            "numSignatures": 1,
            "hashes": [base64.b64encode(digest).decode()],
            "hashAlgorithmOID": "2.16.840.1.101.3.4.2.1",
        }
        status, body = agent.post(
            "/csc/v2/credentials/authorize", {**auth, "authData": [{"id": "pin", "value": "1111"}]}
        )
        assert (status, body["error"], body["tries_left"]) == (403, "invalid_pin", None), body
        status, body = agent.post(
            "/csc/v2/credentials/authorize",
            {**auth, "authData": [{"id": "pin", "value": token.pin}]},
        )
        assert status == 200, body
        status, body = agent.post(
            "/csc/v2/signatures/signHash",
            {"credentialID": cid, "SAD": body["SAD"], "hashes": auth["hashes"],
             "hashAlgorithmOID": auth["hashAlgorithmOID"], "signAlgo": "1.2.840.113549.1.1.1"},
        )  # fmt: skip
        assert status == 200, body
        pub = token.cert.public_key()
        assert isinstance(pub, rsa.RSAPublicKey)
        signature = base64.b64decode(body["signatures"][0])
        pub.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
