"""FIDO2 enrolment, hash-bound authorization and signHash against the running sandbox gateway.

Real parts only: the gateway process behind real mTLS, SoftHSM keys, the sandbox's SQLite store,
python-fido2 on the server side and a software authenticator on the client side. Expiry is
tested by creating state with an injected past ``now`` through the in-process services, never
by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes as h
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from sqlalchemy import func, select, text

from gateway.auth.challenges import Approval, canonical_binding
from gateway.auth.fido2 import Caller
from gateway.errors import InvalidRequest
from gateway.hsm.api import DigestAlgorithm
from gateway.lifecycle.signers import SignerService
from gateway.store.schema import audit_event
from tests.support.gateway import Server, client_context, serving
from tests.support.signing import (
    RSA,
    SHA256,
    SHA256_RSA,
    SHA384,
    Csc,
    b64,
    random_hashes,
    replayed_authorizations,
    services,
)
from tests.support.webauthn import FLAG, SoftAuthenticator, challenge_bytes

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


def _doctor(sandbox: dict[str, Any], index: int = 0) -> dict[str, Any]:
    docs = [s for s in sandbox["signers"] if s["role"] == "Medical Doctor"]
    return docs[index]


@pytest.fixture(scope="module")
def csc(gateway: Server, hospital_ctx: ssl.SSLContext) -> Csc:
    return Csc(gateway.port, hospital_ctx)


@pytest.fixture(scope="module")
def pharmacy_csc(gateway: Server, sandbox: dict[str, Any], pharmacy: dict[str, Any]) -> Csc:
    ctx = client_context(sandbox["server_ca"], pharmacy["client_cert"], pharmacy["client_key"])
    return Csc(gateway.port, ctx)


def _certificate(csc: Csc, credential_id: str) -> x509.Certificate:
    r = csc.post("/csc/v2/credentials/info", {"credentialID": credential_id})
    assert r.status == 200, r.body
    return x509.load_der_x509_certificate(base64.b64decode(r.json()["cert"]["certificates"][0]))


def _verify(cert: x509.Certificate, digest: bytes, signature: bytes) -> None:
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(signature, digest, padding.PKCS1v15(), Prehashed(h.SHA256()))


async def _audit_count(config: str, action: str) -> int:
    async with services(config) as svc, svc.db.read() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(audit_event)
                    .where(audit_event.c.action == action)
                )
            ).scalar_one()
        )


# -- the happy path ---------------------------------------------------------------------------


def test_hash_bound_signing_end_to_end(doctor: Any, csc: Csc, sandbox: dict[str, Any]) -> None:
    doc, auth = doctor
    cred = doc["credential_id"]
    hashes = random_hashes(3)
    r = csc.begin(cred, hashes)
    assert r.status == 200, r.body
    pk = r.json()["publicKey"]
    assert pk["userVerification"] == "required"
    assert pk["rpId"] == "localhost"
    # The client can check that the challenge commits to exactly its hashes.
    challenge = challenge_bytes(pk)
    assert len(challenge) == 48
    import hashlib

    expected = hashlib.sha256(
        canonical_binding(
            credential_id=cred, hash_algorithm_oid=SHA256, hashes=hashes, num_signatures=3
        )
    ).digest()
    assert challenge[16:] == expected
    binding = json.dumps(
        {
            "credentialID": cred,
            "hashAlgorithmOID": SHA256,
            "hashes": sorted(b64(x) for x in hashes),
            "numSignatures": 3,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    assert hashlib.sha256(binding).digest() == expected

    r = csc.authorize_raw(cred, hashes, auth.get(pk))
    assert r.status == 200, r.body
    body = r.json()
    assert body["expiresIn"] == 300
    sad = body["SAD"]
    assert len(sad) >= 43

    # Signatures in request order, over the DigestInfo, verifiable with the HPKI certificate.
    order = [hashes[2], hashes[0], hashes[1]]
    r = csc.sign_hash(cred, sad, order)
    assert r.status == 200, r.body
    sigs = [base64.b64decode(s) for s in r.json()["signatures"]]
    cert = _certificate(csc, cred)
    for digest, sig in zip(order, sigs, strict=True):
        _verify(cert, digest, sig)

    # The SAD is spent; the audit log has the hashes and never the SAD.
    r = csc.sign_hash(cred, sad, [hashes[0]])
    assert r.status == 400
    assert r.json()["error_description"] == (
        "Number of signatures exceeds those authorized by the SAD"
    )

    async def audit_rows() -> list[Any]:
        async with services(sandbox["config"]) as svc, svc.db.read() as conn:
            return list((await conn.execute(select(audit_event))).all())

    rows = asyncio.run(audit_rows())
    signed = [r for r in rows if r.action == "signature.sign_hash"]
    assert any(set(json.loads(r.detail)["hashes"]) == {x.hex() for x in hashes} for r in signed)
    assert all(sad not in r.detail for r in rows)
    assert any(r.action == "sad.issue" for r in rows)


def test_v1_aliases_and_signalgo_implies_hash(doctor: Any, csc: Csc) -> None:
    """pyHanko's CSCSigner sends `hash` and `hashAlgo` with sha256WithRSAEncryption."""
    doc, auth = doctor
    hashes = random_hashes(2)
    sad = csc.authorize(doc["credential_id"], hashes, auth)
    r = csc.post(
        "/csc/v2/signatures/signHash",
        {
            "credentialID": doc["credential_id"],
            "SAD": sad,
            "hash": [b64(hashes[0])],
            "hashAlgo": SHA256,
            "signAlgo": SHA256_RSA,
        },
    )
    assert r.status == 200, r.body
    r = csc.sign_hash(doc["credential_id"], sad, [hashes[1]], alg=None, sign_algo=SHA256_RSA)
    assert r.status == 200, r.body
    _verify(
        _certificate(csc, doc["credential_id"]),
        hashes[1],
        base64.b64decode(r.json()["signatures"][0]),
    )


def test_multiset_of_hashes(doctor: Any, csc: Csc) -> None:
    """The same hash approved twice may be signed twice, not three times."""
    doc, auth = doctor
    x, y = random_hashes(2)
    sad = csc.authorize(doc["credential_id"], [x, x, y], auth)
    assert csc.sign_hash(doc["credential_id"], sad, [x, x]).status == 200
    r = csc.sign_hash(doc["credential_id"], sad, [x])
    assert r.status == 400
    assert r.json()["error_description"] == "Hash is not authorized by the SAD"
    assert csc.sign_hash(doc["credential_id"], sad, [y]).status == 200


def test_info_advertises_methods(csc: Csc) -> None:
    methods = csc.post("/csc/v2/info", {}).json()["methods"]
    assert {"credentials/authorize", "signatures/signHash"} <= set(methods)


# -- bad assertions: each refused, audited, nothing issued ------------------------------------


@dataclass(frozen=True)
class Refusal:
    """One bad assertion: how it is made, and the text it is refused with."""

    expected: str
    assertion: Mapping[str, Any] = field(default_factory=dict)  # SoftAuthenticator.get kwargs
    send: str = "approved"  # hashes sent to authorize: approved | other | first_only
    by_pharmacy: bool = False  # relayed by another facility
    challenge_age: int = 0  # seconds before now that begin happened
    replay: bool = False  # the assertion is used once (accepted), then again
    stale_counter: bool = False  # the server saw a newer sign count first
    tamper: bool = False  # one bit of the signature flipped


AUTHORIZE_REFUSALS = {
    "replayed_assertion": Refusal("challenge was already used", replay=True),
    "assertion_for_other_hashes": Refusal(
        "the assertion does not approve this request", send="other"
    ),
    "other_num_signatures": Refusal(
        "the assertion does not approve this request", send="first_only"
    ),
    "wrong_origin": Refusal("Invalid origin", {"origin": "https://evil.example"}),
    "wrong_rp_id": Refusal("Wrong RP ID hash", {"rp_id": "evil.example"}),
    "uv_flag_missing": Refusal("User verification required", {"flags": FLAG.UP}),
    "up_flag_missing": Refusal("User Present flag not set", {"flags": FLAG.UV}),
    "sign_count_regression": Refusal("sign count", stale_counter=True),
    "expired_challenge": Refusal("challenge expired", challenge_age=121),
    "unknown_challenge": Refusal(
        "unknown challenge",
        {"challenge": base64.urlsafe_b64encode(bytes(48)).decode().rstrip("=")},
    ),
    "tampered_signature": Refusal("Invalid signature", tamper=True),
    "other_facility": Refusal("the challenge was issued to another facility", by_pharmacy=True),
}


@pytest.mark.parametrize("case", list(AUTHORIZE_REFUSALS.values()), ids=list(AUTHORIZE_REFUSALS))
def test_authorize_refuses(
    case: Refusal,
    doctor: Any,
    csc: Csc,
    pharmacy_csc: Csc,
    sandbox: dict[str, Any],
    hospital: dict[str, Any],
) -> None:
    doc, auth = doctor
    cred = doc["credential_id"]
    hashes = random_hashes(2)
    before = asyncio.run(_audit_count(sandbox["config"], "sad.refused"))
    if case.challenge_age:

        async def old_options() -> dict[str, Any]:
            async with services(sandbox["config"]) as svc:
                fid = await _facility_id(svc, hospital["institution_code"])
                options = await svc.fido2.authenticate_begin(
                    caller=Caller(
                        actor="test", facility_id=fid, institution_code=hospital["institution_code"]
                    ),
                    approval=Approval(
                        credential_id=cred,
                        hashes=hashes,
                        hash_algorithm_oid=SHA256,
                        num_signatures=2,
                    ),
                    now=datetime.now(UTC) - timedelta(seconds=case.challenge_age),
                )
                return options["publicKey"]  # type: ignore[no-any-return]

        pk = asyncio.run(old_options())
    else:
        r = csc.begin(cred, hashes)
        assert r.status == 200, r.body
        pk = r.json()["publicKey"]
    kw = dict(case.assertion)
    if case.stale_counter:
        csc.authorize(cred, random_hashes(1), auth)  # the server now stores auth.sign_count
        kw["counter"] = auth.sign_count  # not greater than the stored counter
    assertion = auth.get(pk, **kw)
    if case.replay:
        assert csc.authorize_raw(cred, hashes, assertion).status == 200
    if case.tamper:
        sig = bytearray(base64.urlsafe_b64decode(assertion["response"]["signature"] + "=="))
        sig[-1] ^= 1
        assertion["response"]["signature"] = base64.urlsafe_b64encode(bytes(sig)).decode()
    send = {"approved": hashes, "other": random_hashes(2), "first_only": [hashes[0]]}[case.send]
    caller = pharmacy_csc if case.by_pharmacy else csc
    r = caller.authorize_raw(cred, send, assertion)
    assert r.status == 400, r.body
    body = r.json()
    assert body["error"] == "invalid_request"
    assert case.expected in body["error_description"], body
    assert "SAD" not in body
    after = asyncio.run(_audit_count(sandbox["config"], "sad.refused"))
    assert after == before + 1


async def _facility_id(svc: Any, code: str) -> int:
    async with svc.db.read() as conn:
        return int(
            (
                await conn.execute(
                    text("SELECT id FROM facility WHERE institution_code = :c"), {"c": code}
                )
            ).scalar_one()
        )


def test_refused_challenge_cannot_be_retried(doctor: Any, csc: Csc) -> None:
    """A failed attempt burns the challenge: no second guess with the same options."""
    doc, auth = doctor
    hashes = random_hashes(1)
    pk = csc.begin(doc["credential_id"], hashes).json()["publicKey"]
    bad = auth.get(pk, origin="https://evil.example")
    assert csc.authorize_raw(doc["credential_id"], hashes, bad).status == 400
    r = csc.authorize_raw(doc["credential_id"], hashes, auth.get(pk))
    assert r.status == 400
    assert r.json()["error_description"] == "challenge was already used"


BEGIN_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown_credential", {"credentialID": "cred-0000"}, "Invalid parameter credentialID"),
    ("unknown_algorithm", {"hashAlgorithmOID": "1.2.3.4"}, "unsupported hash algorithm OID"),
    ("wrong_length", {"hashes": [b64(bytes(20))]}, "item 0 is 20 bytes"),
    ("non_base64", {"hashes": ["!!notbase64!!"]}, "item 0 is not base64"),
    ("too_many", {"hashes": [b64(bytes(32))] * 101, "numSignatures": 101}, "at most 100"),
    ("count_mismatch", {"numSignatures": 2}, "must equal the number of hashes"),
    ("no_hashes_no_session", {"hashes": [], "numSignatures": 1}, "signing-session"),
]


@pytest.mark.parametrize(
    ("case", "patch", "expected"), BEGIN_CASES, ids=[c[0] for c in BEGIN_CASES]
)
def test_authenticate_begin_refuses(
    case: str, patch: dict[str, Any], expected: str, doctor: Any, csc: Csc
) -> None:
    doc = doctor[0]
    body = {
        "credentialID": doc["credential_id"],
        "hashes": [b64(random_hashes(1)[0])],
        "hashAlgorithmOID": SHA256,
        "numSignatures": 1,
        **patch,
    }
    r = csc.post("/auth/fido2/authenticate/begin", body)
    # Sessions are off by default: a begin without hashes is refused before the signer's
    # gesture (authorize refuses it too: test_fido2_enrollment.py).
    assert r.status == 400, r.body
    assert r.headers["content-type"].startswith("application/problem+json")
    assert expected in r.json()["detail"], r.json()


# -- signHash refusals ------------------------------------------------------------------------


SIGN_CASES = [
    "sad_other_facility",
    "hash_not_authorized",
    "count_exhausted",
    "wrong_hash_length",
    "unknown_hash_algorithm",
    "algorithm_not_bound",
    "non_base64",
    "huge_array",
    "unknown_credential",
    "invalid_sad",
    "unsupported_sign_algo",
    "sign_algo_contradicts_hash",
    "locked_signer",
]


@pytest.mark.parametrize("case", SIGN_CASES)
def test_sign_hash_refuses(
    case: str,
    doctor: Any,
    csc: Csc,
    pharmacy_csc: Csc,
    sandbox: dict[str, Any],
    hospital: dict[str, Any],
) -> None:
    doc, auth = doctor
    cred = doc["credential_id"]
    good = random_hashes(1)
    sad = csc.authorize(cred, good, auth)
    before = asyncio.run(_audit_count(sandbox["config"], "signature.refused"))
    status, code, expected = 400, "invalid_request", ""
    caller, send, alg, sign_algo, send_cred = csc, good, SHA256, RSA, cred
    raw_hashes: list[str] | None = None
    if case == "sad_other_facility":
        caller, expected = pharmacy_csc, "SAD was not issued to this facility"
    elif case == "hash_not_authorized":
        send, expected = random_hashes(1), "Hash is not authorized by the SAD"
    elif case == "count_exhausted":
        assert csc.sign_hash(cred, sad, good).status == 200
        expected = "Number of signatures exceeds those authorized by the SAD"
    elif case == "wrong_hash_length":
        send, expected = [good[0][:20]], "item 0 is 20 bytes"
    elif case == "unknown_hash_algorithm":
        alg, expected = "1.2.3.4", "unsupported hash algorithm OID"
    elif case == "algorithm_not_bound":
        send, alg, expected = [bytes(48)], SHA384, "Hash algorithm does not match the SAD"
    elif case == "non_base64":
        raw_hashes, expected = ["%%%"], "item 0 is not base64"
    elif case == "huge_array":
        raw_hashes, expected = [b64(good[0])] * 101, "at most 100 hashes"
    elif case == "unknown_credential":
        send_cred, expected = "cred-0000000000000000", "SAD is not valid for this credential"
    elif case == "invalid_sad":
        sad, expected = "bm90IGEgU0FE", "Invalid parameter SAD"
    elif case == "unsupported_sign_algo":
        sign_algo, expected = "1.2.840.10045.4.3.2", "Invalid parameter signAlgo"
    elif case == "sign_algo_contradicts_hash":
        sign_algo, expected = "1.2.840.113549.1.1.12", "does not match signAlgo"
    elif case == "locked_signer":
        status, code, expected = 403, "access_denied", f"signer {doc['id']} is locked"
        asyncio.run(_set_status(sandbox, doc["id"], "locked"))
    try:
        if raw_hashes is not None:
            r = caller.post(
                "/csc/v2/signatures/signHash",
                {
                    "credentialID": send_cred,
                    "SAD": sad,
                    "hashes": raw_hashes,
                    "signAlgo": RSA,
                    "hashAlgorithmOID": alg,
                },
            )
        else:
            r = caller.sign_hash(send_cred, sad, send, alg=alg, sign_algo=sign_algo)
    finally:
        if case == "locked_signer":
            asyncio.run(_set_status(sandbox, doc["id"], "active"))
    assert r.status == status, r.body
    assert r.json()["error"] == code
    assert expected in r.json()["error_description"], r.json()
    assert "signatures" not in r.json()
    after = asyncio.run(_audit_count(sandbox["config"], "signature.refused"))
    assert after == before + 1
    if case not in ("count_exhausted", "invalid_sad"):
        # Nothing was consumed by the refused request: the approved hash still signs once.
        r = csc.sign_hash(cred, sad, good)
        assert r.status == 200, r.body


def test_sad_expires(
    doctor: Any, csc: Csc, sandbox: dict[str, Any], hospital: dict[str, Any]
) -> None:
    """consume() with an injected clock: refused 300 s after issue, nothing spent."""
    doc, auth = doctor
    cred = doc["credential_id"]
    good = random_hashes(1)
    sad = csc.authorize(cred, good, auth)

    async def consume_at(offset: int) -> str:
        async with services(sandbox["config"]) as svc:
            fid = await _facility_id(svc, hospital["institution_code"])
            try:
                async with svc.db.write() as conn:
                    await svc.activation.ledger.consume(
                        conn,
                        sad=sad,
                        facility_id=fid,
                        credential_id=cred,
                        hashes=good,
                        algorithm=DigestAlgorithm.SHA256,
                        now=datetime.now(UTC) + timedelta(seconds=offset),
                    )
                    raise _Rollback
            except InvalidRequest as e:
                return e.description
            except _Rollback:
                return "ok"

    assert asyncio.run(consume_at(301)) == "SAD expired"
    assert asyncio.run(consume_at(290)) == "ok"  # rolled back: nothing spent
    r = csc.sign_hash(cred, sad, good)
    assert r.status == 200, r.body


class _Rollback(Exception):
    """Leave a write transaction without committing."""


def _signer_of(sandbox: dict[str, Any], cred: str) -> str:
    return str(next(s["id"] for s in sandbox["signers"] if s["credential_id"] == cred))


async def _set_status(sandbox: dict[str, Any], signer_id: str, status: str) -> None:
    async with services(sandbox["config"]) as svc:
        signers = SignerService(db=svc.db, audit=_audit(sandbox), keystore=None)  # type: ignore[arg-type]
        await signers.set_status(signer_id, status=status, reason="test", actor="test")


def _audit(sandbox: dict[str, Any]) -> Any:
    from gateway.app import make_audit
    from gateway.config import load_settings

    return make_audit(load_settings(sandbox["config"], environ={}))


# -- concurrency: never more signatures than authorized ---------------------------------------


async def _race(
    port: int, ctx: ssl.SSLContext, bodies: list[dict[str, Any]], *, new_conn: bool
) -> list[int]:
    connector = aiohttp.TCPConnector(ssl=ctx, limit=64, force_close=new_conn)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: dict[str, Any]) -> int:
            async with session.post(
                f"https://localhost:{port}/csc/v2/signatures/signHash", json=body
            ) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def _bodies(cred: str, sad: str, hashes: list[bytes], copies: int) -> list[dict[str, Any]]:
    return [
        {
            "credentialID": cred,
            "SAD": sad,
            "hashes": [b64(x)],
            "hashAlgorithmOID": SHA256,
            "signAlgo": RSA,
        }
        for x in hashes
        for _ in range(copies)
    ]


def test_concurrent_double_spend_one_process(
    doctor: Any, csc: Csc, hospital_ctx: ssl.SSLContext
) -> None:
    doc, auth = doctor
    hashes = random_hashes(5)
    sad = csc.authorize(doc["credential_id"], hashes, auth)
    statuses = asyncio.run(
        _race(csc.port, hospital_ctx, _bodies(doc["credential_id"], sad, hashes, 8), new_conn=False)
    )
    assert statuses.count(200) == 5, statuses
    assert statuses.count(400) == 35, statuses


def test_concurrent_double_spend_two_workers(
    sandbox: dict[str, Any], doctor: Any, hospital_ctx: ssl.SSLContext
) -> None:
    doc, _ = doctor
    with serving(Path(sandbox["config"]), workers=2, tsa=False) as srv:
        csc2 = Csc(srv.port, hospital_ctx)
        auth = SoftAuthenticator(origin=f"https://localhost:{srv.port}")
        code = asyncio.run(_new_code(sandbox, doc["id"]))
        assert csc2.enroll(code[0], code[1], auth).status == 200
        for hashes, copies in ((random_hashes(4), 10), (random_hashes(1) * 3, 6)):
            sad = csc2.authorize(doc["credential_id"], hashes, auth)
            statuses = asyncio.run(
                _race(
                    srv.port,
                    hospital_ctx,
                    _bodies(doc["credential_id"], sad, sorted(set(hashes)), copies),
                    new_conn=True,
                )
            )
            assert statuses.count(200) == len(hashes), statuses
            assert set(statuses) == {200, 400}, statuses


def test_concurrent_authorizations_of_one_challenge_one_wins(
    doctor: Any, csc: Csc, sandbox: dict[str, Any]
) -> None:
    """The same assertion, 12 times at once: they meet in the grouped write transactions of
    authorize, and exactly one takes the challenge; every other is refused and audited."""
    doc, auth = doctor
    issued = asyncio.run(_audit_count(sandbox["config"], "sad.issue"))
    refused = asyncio.run(_audit_count(sandbox["config"], "sad.refused"))
    hashes = random_hashes(1)
    responses = replayed_authorizations([csc], doc["credential_id"], hashes, auth, 12)
    ok = [r for r in responses if r.status == 200]
    assert len(ok) == 1, [r.status for r in responses]
    assert {r.status for r in responses} == {200, 400}
    texts = {r.json()["error_description"] for r in responses if r.status == 400}
    # The losers find the challenge used, or lose the sign count race to the winner.
    assert texts <= {
        "challenge was already used",
        "WebAuthn assertion refused: sign count changed concurrently",
    }, texts
    assert asyncio.run(_audit_count(sandbox["config"], "sad.issue")) == issued + 1
    assert asyncio.run(_audit_count(sandbox["config"], "sad.refused")) == refused + 11
    assert csc.sign_hash(doc["credential_id"], ok[0].json()["SAD"], hashes).status == 200


async def _new_code(sandbox: dict[str, Any], signer_id: str) -> tuple[str, str]:
    async with services(sandbox["config"]) as svc:
        issued = await svc.fido2.issue_enrollment(signer_id, actor="test")
        return issued.code, issued.password
