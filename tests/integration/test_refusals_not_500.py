"""Refusals a security review found answered 500: each is now a clear 4xx, with its audit record
(and, for a presence ceremony, its challenge burnt).

Real parts only: the session's sandbox gateway behind real mTLS, a software WebAuthn
authenticator signing real assertions, card certificates issued by the sandbox's JPKI CA and
signed over real challenges, PKCS#10 requests signed with their own key. Each input is well
formed except for the one thing the review changed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtensionOID, NameOID
from sqlalchemy import select

from gateway.pki.issue import CertAndKey
from gateway.sandbox.jpki import issue_auth_cert
from gateway.store.schema import audit_event
from tests.integration.test_est_renewal import facility_expiring_in, refusals
from tests.support.gateway import Server, client_context, request, run_cli
from tests.support.signing import Csc, b64, random_hashes, services
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

SHA256 = "2.16.840.1.101.3.4.2.1"


@pytest.fixture(scope="module")
def csc(gateway: Server, hospital_ctx: ssl.SSLContext) -> Csc:
    return Csc(gateway.port, hospital_ctx)


async def _audit_details(config: str, action: str) -> list[dict[str, Any]]:
    async with services(config) as svc, svc.db.read() as conn:
        q = select(audit_event).where(audit_event.c.action == action).order_by(audit_event.c.seq)
        return [
            {**json.loads(r.detail), "_signer": r.signer_id} for r in (await conn.execute(q)).all()
        ]


def _details(sandbox: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return asyncio.run(_audit_details(sandbox["config"], action))


def _re_sign(der: bytes, tbs: bytes, new_tbs: bytes, signature: bytes, key: Any) -> bytes:
    """``der`` (a certificate or request) with its signed part replaced by ``new_tbs`` (same
    length) and signed again by ``key`` (RSA PKCS#1 v1.5, SHA-256; same signature length)."""
    assert len(new_tbs) == len(tbs) and der.count(tbs) == 1 and der.endswith(signature)
    new_sig = key.sign(new_tbs, padding.PKCS1v15(), hashes.SHA256())
    assert len(new_sig) == len(signature)
    return der.replace(tbs, new_tbs)[: -len(signature)] + new_sig


# -- 1. FIDO2: clientDataJSON "origin" of another JSON type ----------------------------------


def test_fido2_origin_not_a_string_is_400_audited_and_burns_the_challenge(
    doctor: tuple[dict[str, Any], SoftAuthenticator], csc: Csc, sandbox: dict[str, Any]
) -> None:
    doc, auth = doctor
    cred = doc["credential_id"]
    hashes = random_hashes(1)
    r = csc.begin(cred, hashes)
    assert r.status == 200, r.body
    pk = r.json()["publicKey"]
    # A real assertion, signed by the authenticator, over client data whose origin is a list.
    bad = auth.get(pk, origin=["x"])  # type: ignore[arg-type]
    r = csc.authorize_raw(cred, hashes, bad)
    assert r.status == 400, r.body
    assert r.json()["error"] == "invalid_request"
    assert "origin" in r.json()["error_description"], r.body
    refused = [d for d in _details(sandbox, "sad.refused") if d.get("hashes") == [hashes[0].hex()]]
    assert len(refused) == 1, refused
    assert "Invalid origin" in refused[0]["reason"], refused
    # The refused attempt burnt the challenge: a correct assertion for it gets no SAD.
    r = csc.authorize_raw(cred, hashes, auth.get(pk))
    assert r.status == 400, r.body
    assert "SAD" not in r.json()
    assert "already used" in r.json()["error_description"], r.body


@pytest.mark.parametrize(
    "mangle",
    [
        lambda a: {**a, "response": {**a["response"], "clientDataJSON": "!!not base64url!!"}},
        lambda a: {**a, "response": {**a["response"], "clientDataJSON": "bm90IGpzb24"}},
        lambda a: {**a, "response": "not an object"},
    ],
    ids=["client-data-not-base64", "client-data-not-json", "response-not-an-object"],
)
def test_fido2_assertion_that_does_not_parse_is_400_and_audited(
    mangle: Any, doctor: tuple[dict[str, Any], SoftAuthenticator], csc: Csc, sandbox: dict[str, Any]
) -> None:
    """An assertion that names no challenge (its client data unreadable) is still a refused
    authorization on the record: ``sad.refused`` with the reason, the hashes it was for."""
    doc, auth = doctor
    cred = doc["credential_id"]
    hashes = random_hashes(1)
    r = csc.begin(cred, hashes)
    assert r.status == 200, r.body
    r = csc.authorize_raw(cred, hashes, mangle(auth.get(r.json()["publicKey"])))
    assert r.status == 400, r.body
    assert r.json()["error_description"].startswith("Invalid parameter authData"), r.body
    refused = [d for d in _details(sandbox, "sad.refused") if d.get("hashes") == [hashes[0].hex()]]
    assert len(refused) == 1, refused
    assert refused[0]["reason"] == r.json()["error_description"], refused
    assert refused[0]["credential"] == cred


# -- 2. JPKI authData value: nesting and digits past the safe loader's bounds -----------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("[" * 50_000 + "]" * 50_000, "the jpki value is nested deeper than 32 levels"),
        (
            '{"certificate": "", "signature": "", "challenge_id": "", "n": ' + "7" * 5000 + "}",
            "the jpki value has a number with too many digits",
        ),
    ],
    ids=["deep", "digits"],
)
def test_jpki_value_past_the_json_bounds_is_400_and_audited(
    value: str, text: str, csc: Csc, sandbox: dict[str, Any], hospital: dict[str, Any]
) -> None:
    _jpki_refused(csc, sandbox, value, f"Invalid parameter authData: {text}")


def _jpki_refused(csc: Csc, sandbox: dict[str, Any], value: Any, text: str) -> None:
    """credentials/authorize with this jpki authData value: 400 with ``text``, and one
    ``sad.refused`` record giving it as the reason."""
    before = len(_details(sandbox, "sad.refused"))
    r = csc.post(
        "/csc/v2/credentials/authorize",
        {
            "credentialID": "any",
            "numSignatures": 1,
            "hashes": [b64(random_hashes(1)[0])],
            "hashAlgorithmOID": SHA256,
            "authData": [{"id": "jpki", "value": value}],
        },
    )
    assert r.status == 400, r.body
    assert r.json()["error_description"] == text
    rows = _details(sandbox, "sad.refused")
    assert len(rows) == before + 1 and rows[-1]["reason"] == text


def test_jpki_challenge_id_not_ascii_is_400_and_audited(csc: Csc, sandbox: dict[str, Any]) -> None:
    """A JSON "\\udcff" challenge_id (a lone surrogate once parsed) could not be looked up or
    burnt in the store: UnicodeEncodeError, a 500 with no record."""
    anchor = x509.load_pem_x509_certificate(Path(sandbox["jpki"]["trust_anchor"]).read_bytes())
    value = {
        "certificate": b64(anchor.public_bytes(serialization.Encoding.DER)),
        "signature": b64(bytes(256)),
        "challenge_id": "\udcff",  # json.dumps sends the escape \udcff
    }
    text = "Invalid parameter authData: the jpki challenge_id is not printable ASCII"
    _jpki_refused(csc, sandbox, value, text)


# -- 3. JPKI card registration: a key algorithm the gateway cannot load ----------------------


RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d010101")  # 1.2.840.113549.1.1.1
UNKNOWN_KEY_ALG = bytes.fromhex("06092a864886f70d010163")  # 1.2.840.113549.1.1.99


def _sandbox_jpki_ca(sandbox: dict[str, Any]) -> CertAndKey:
    d = Path(sandbox["dir"]) / "jpki"
    key = serialization.load_pem_private_key((d / "test-jpki-ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return CertAndKey(
        cert=x509.load_pem_x509_certificate((d / "test-jpki-ca.pem").read_bytes()), key=key
    )


def test_jpki_register_with_unknown_key_algorithm_is_400_and_audited(
    doctor: tuple[dict[str, Any], SoftAuthenticator],
    csc: Csc,
    sandbox: dict[str, Any],
) -> None:
    doc, _ = doctor  # enrolled first: a new code revokes the manifest's unused one
    issued = json.loads(
        run_cli("signer", "enroll-code", doc["id"], "-c", sandbox["config"], "--json").stdout
    )
    r = csc.post(
        "/auth/jpki/register/begin",
        {"enrollment_code": issued["enrollment_code"], "password": issued["enrollment_password"]},
    )
    assert r.status == 200, r.body
    cid = r.json()["challenge_id"]
    challenge = base64.urlsafe_b64decode(r.json()["challenge"] + "==")
    # A card certificate issued by the sandbox's JPKI CA, its SubjectPublicKeyInfo algorithm
    # changed to 1.2.840.113549.1.1.99 and signed again by the CA (a valid issuer signature).
    ca = _sandbox_jpki_ca(sandbox)
    card_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_auth_cert(
        ca, card_key.public_key(), now=dt.datetime.now(dt.UTC), ocsp_url=sandbox["jpki"]["ocsp_url"]
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(RSA_ENCRYPTION) == 1
    der = _re_sign(der, tbs, tbs.replace(RSA_ENCRYPTION, UNKNOWN_KEY_ALG), cert.signature, ca.key)
    sig = card_key.sign(challenge, padding.PKCS1v15(), hashes.SHA256())
    before = len(_details(sandbox, "jpki.link.refused"))
    r = csc.post(
        "/auth/jpki/register/complete",
        {
            "enrollment_code": issued["enrollment_code"],
            "certificate": b64(der),
            "signature": b64(sig),
            "challenge_id": cid,
        },
    )
    assert r.status == 400, r.body
    assert "1.2.840.113549.1.1.99" in r.json()["detail"], r.body
    rows = _details(sandbox, "jpki.link.refused")
    assert len(rows) == before + 1
    assert rows[-1]["_signer"] == doc["id"] and "1.2.840.113549.1.1.99" in rows[-1]["reason"]
    # The officer's link of the same certificate: issuer signature valid, OCSP "good", then
    # its key was read for the link's SPKI hash (UnsupportedAlgorithm, 500). Refused first now.
    a = sandbox["admin"]
    r = request(
        csc.port,
        "POST",
        f"/admin/signers/{doc['id']}/jpki",
        ctx=client_context(sandbox["server_ca"], a["client_cert"], a["client_key"]),
        json_body={"certificate": b64(der)},
    )
    assert r.status == 400, r.body
    assert "1.2.840.113549.1.1.99" in r.json()["detail"], r.body
    rows = _details(sandbox, "jpki.link.refused")
    assert len(rows) == before + 2 and "1.2.840.113549.1.1.99" in rows[-1]["reason"]


# -- 4. EST renewal: a signed request whose extensions cryptography cannot read --------------


PLACEHOLDER_OID = x509.ObjectIdentifier("2.5.29.99")  # encoded as long as 2.5.29.15 (keyUsage)


def _csr_with_two_key_usages(code: str) -> bytes:
    """A request signed by its own key, carrying keyUsage twice (built with a placeholder OID
    of the same encoded length, then renamed and signed again)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"TEST clinic {code}"),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, code),
                ]
            )
        )
        .add_extension(usage, critical=True)
        .add_extension(
            x509.UnrecognizedExtension(PLACEHOLDER_OID, usage.public_bytes()), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    placeholder = bytes.fromhex("0603551d63")
    tbs = csr.tbs_certrequest_bytes
    assert tbs.count(placeholder) == 1
    renamed = tbs.replace(placeholder, bytes.fromhex("0603551d0f"))
    der = csr.public_bytes(serialization.Encoding.DER)
    out = _re_sign(der, tbs, renamed, csr.signature, key)
    check = x509.load_der_x509_csr(out)
    assert check.is_signature_valid
    return out


def test_est_request_with_duplicate_extension_is_400_and_audited(
    gateway: Server, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    # Expires in 30 days: inside the 90-day renewal window.
    code, d = facility_expiring_in(sandbox, 30, tmp_path / "cur")
    ctx = client_context(sandbox["server_ca"], str(d / "client.pem"), str(d / "client.key"))
    r = request(
        gateway.port,
        "POST",
        "/.well-known/est/simplereenroll",
        ctx=ctx,
        body=base64.encodebytes(_csr_with_two_key_usages(code)),
        headers={"Content-Type": "application/pkcs10"},
    )
    assert r.status == 400, r.body
    assert "extensions cannot be read" in r.json()["detail"], r.body
    assert ExtensionOID.KEY_USAGE.dotted_string in r.json()["detail"], r.body
    rows = refusals(sandbox, code)
    assert len(rows) == 1 and "extensions cannot be read" in rows[0]["reason"], rows


# -- 5. Idempotency-Key: a byte that is not UTF-8 ---------------------------------------------


def test_idempotency_key_not_ascii_is_400_and_audited(
    gateway: Server, sandbox: dict[str, Any], hospital: dict[str, Any]
) -> None:
    ctx = client_context(sandbox["server_ca"], hospital["client_cert"], hospital["client_key"])
    before = len(_details(sandbox, "application.refused"))
    r = request(
        gateway.port,
        "POST",
        "/facility/applications",
        ctx=ctx,
        json_body={"kind": "reapply", "remarks": "端末名称の変更"},
        headers={"Idempotency-Key": "k\xff"},  # http.client sends it as the byte 0xff
    )
    assert r.status == 400, r.body
    assert r.json()["detail"] == "an idempotency key is 1-100 printable ASCII characters"
    rows = _details(sandbox, "application.refused")
    assert len(rows) == before + 1
    assert rows[-1]["reason"] == "an idempotency key is 1-100 printable ASCII characters"
    # Recorded, escaped: the audit chain's canonical JSON stays encodable.
    assert rows[-1]["idempotency_key"] == "k\\udcff"


# -- 6. An error whose text quotes such a header ----------------------------------------------


def test_content_type_not_utf8_is_415_not_500(
    gateway: Server, hospital_ctx: ssl.SSLContext
) -> None:
    """The 415 quotes the Content-Type; with a byte that is not UTF-8 in it, rendering the
    error itself raised UnicodeEncodeError (aiohttp's bare 500)."""
    r = request(
        gateway.port,
        "POST",
        "/facility/applications",
        ctx=hospital_ctx,
        body=b"{}",
        headers={"Content-Type": "text/\xff"},
    )
    assert r.status == 415, r.body
    assert r.headers["content-type"] == "application/problem+json; charset=utf-8"
    # Quoted with its escape (api/middleware.py:browser_guard), never the raw character.
    assert r.json()["detail"] == (
        "request bodies must be JSON sent as Content-Type: application/json (got 'text/\\udcff')"
    )
