"""Each failure scenario that is not the real failure itself answers a vendor's system exactly as
the real failure does: the same status, headers, JSON body (error code and description, with
only the serial, the code and the date differing), the same audit record and the same access
log entry. The real state is made here on throwaway facilities and signers of a world of this
module: a facility certificate really revoked, one really expired (on a connection opened before
its end, and on a new connection), a facility really suspended through the admin API, an
enrolment code really locked by five wrong passwords, a pharmacist really signing a
prescription."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import http.client
import json
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.auth.fido2 import LOCKED_TEXT
from gateway.sign.samples import PRESCRIPTION_CSV
from tests.support.gateway import (
    Response,
    Server,
    client_context,
    free_port,
    own_world,
    request,
    run_cli,
)
from tests.support.signing import Csc
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]

#: Headers that differ per request whatever the state.
PER_REQUEST = {"date", "x-request-id", "content-length"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: Any) -> Iterator[tuple[dict[str, Any], Server]]:
    with own_world(tmp_path_factory.mktemp("scenario-real")) as w:
        yield w


def _ctx(m: dict[str, Any], who: dict[str, Any]) -> ssl.SSLContext:
    return client_context(m["server_ca"], who["client_cert"], who["client_key"])


@pytest.fixture(scope="module")
def admin(world: tuple[dict[str, Any], Server]) -> Any:
    m, srv = world
    ctx = _ctx(m, m["admin"])

    def post(path: str, body: dict[str, Any]) -> Any:
        r = request(srv.port, "POST", path, ctx=ctx, json_body=body)
        assert r.status == 200, r.body
        return r.json()

    return post


@pytest.fixture
def switch(admin: Any) -> Iterator[Any]:
    yield lambda scenario, **target: admin("/admin/scenarios", {"scenario": scenario, **target})
    assert admin("/admin/scenarios/reset", {})["active"] == {}


def _facility(m: dict[str, Any], kind: str) -> dict[str, Any]:
    fac: dict[str, Any] = next(f for f in m["facilities"] if f["kind"] == kind)
    return fac


def _throwaway(m: dict[str, Any], code: str, out: Path) -> dict[str, str]:
    cfg = m["config"]
    run_cli("facility", "add", code, "--name", f"TEST clinic {code}", "--kind", "clinic", "-c", cfg)
    run_cli("facility", "issue-cert", code, "--out", str(out), "-c", cfg)
    return {"client_cert": str(out / "client.pem"), "client_key": str(out / "client.key")}


def _serial(pem: str) -> str:
    return format(x509.load_pem_x509_certificate(Path(pem).read_bytes()).serial_number, "x")


async def _audit_rows(config: str) -> list[Any]:
    from sqlalchemy import select

    from gateway.store.schema import audit_event
    from tests.support.signing import services

    async with services(config) as svc, svc.db.read() as conn:
        q = select(audit_event).order_by(audit_event.c.seq)
        return list((await conn.execute(q)).all())


def _audited(config: str, call: Any, *args: Any) -> tuple[Response, list[dict[str, Any]]]:
    """``call(*args)``'s response and the audit events it appended (action, actor, facility,
    signer, detail)."""
    before = len(asyncio.run(_audit_rows(config)))
    r = call(*args)
    rows = asyncio.run(_audit_rows(config))[before:]
    return r, [
        {"action": e.action, "actor": e.actor, "facility": e.facility_code,
         "signer": e.signer_id, "detail": json.loads(e.detail)}
        for e in rows
    ]  # fmt: skip


def _access_log(srv: Server, request_id: str) -> dict[str, Any]:
    """The request's access line. The worker writes its access lines when the loop's turn
    that answered ends (after the answer left): wait for it a little."""
    deadline = time.monotonic() + 5
    while True:
        for line in srv.logs().splitlines():
            if request_id in line and '"gateway.access"' in line:
                entry: dict[str, Any] = json.loads(line)
                return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line for {request_id}")
        time.sleep(0.02)


def _shape(srv: Server, r: Response, *, mask: dict[str, str]) -> dict[str, Any]:
    """What a vendor's system receives, with the per-request values and ``mask``'s per-state
    values (serial, institution code, date) replaced by their names."""
    body = dict(r.json())
    rid = body.pop("request_id", None)
    assert rid == r.headers["x-request-id"]

    def masked(text: str) -> str:
        for name, value in mask.items():
            text = text.replace(value, f"<{name}>")
        return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", "<date>", text)

    log = _access_log(srv, rid)
    return {
        "status": r.status,
        "headers": {k: v for k, v in r.headers.items() if k not in PER_REQUEST},
        "body": {k: masked(v) if isinstance(v, str) else v for k, v in body.items()},
        "log": {
            k: masked(v) if isinstance(v, str) else v
            for k, v in ((k, log.get(k)) for k in ("level", "msg", "status", "client"))
        },
    }


def _same(srv: Server, real: Response, scenario: Response, real_mask: dict[str, str],
          scenario_mask: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    a = _shape(srv, real, mask=real_mask)
    b = _shape(srv, scenario, mask=scenario_mask)
    assert a == b
    return a


# -- the facility certificate and the facility: answered where the identity check answers ------


CALLS = [("POST", "/csc/v2/info", {}), ("POST", "/csc/v2/credentials/list", {}),
         ("GET", "/facility/certificates", None)]  # fmt: skip


def _call(srv: Server, ctx: ssl.SSLContext, method: str, path: str, body: Any) -> Response:
    return request(srv.port, method, path, ctx=ctx, json_body=body)


def test_revoked_certificate_scenario_answers_as_a_real_revocation(
    world: tuple[dict[str, Any], Server], switch: Any, tmp_path: Path
) -> None:
    m, srv = world
    cfg = m["config"]
    gone = _throwaway(m, "0110000018", tmp_path)
    gone_ctx = _ctx(m, gone)
    serial = _serial(gone["client_cert"])
    run_cli("facility", "revoke-cert", serial, "--reason",
            "sandbox scenario facility_certificate_revoked", "-c", cfg)  # fmt: skip
    hospital = _facility(m, "hospital")
    switch("facility_certificate_revoked", facility=hospital["institution_code"])
    for method, path, body in CALLS:
        real, real_audit = _audited(cfg, _call, srv, gone_ctx, method, path, body)
        scen, scen_audit = _audited(cfg, _call, srv, _ctx(m, hospital), method, path, body)
        shape = _same(srv, real, scen, {"serial": serial},
                      {"serial": _serial(hospital["client_cert"])})  # fmt: skip
        assert shape["status"] == 403 and shape["log"]["client"] is None, shape
        assert shape["body"]["error_description" if "error" in shape["body"] else "detail"] == (
            "client certificate <serial> was revoked on <date>: sandbox scenario "
            "facility_certificate_revoked"
        ), shape
        assert real_audit == scen_audit == []


def test_suspended_facility_scenario_answers_as_a_real_suspension(
    world: tuple[dict[str, Any], Server], admin: Any, switch: Any, tmp_path: Path
) -> None:
    m, srv = world
    cfg = m["config"]
    code = "0110000026"
    paused = _throwaway(m, code, tmp_path)
    admin(f"/admin/facilities/{code}/suspend", {"reason": "sandbox scenario facility_suspended"})
    hospital = _facility(m, "hospital")
    switch("facility_suspended", facility=hospital["institution_code"])
    try:
        for method, path, body in CALLS:
            real, real_audit = _audited(cfg, _call, srv, _ctx(m, paused), method, path, body)
            scen, scen_audit = _audited(cfg, _call, srv, _ctx(m, hospital), method, path, body)
            shape = _same(srv, real, scen, {"code": code},
                          {"code": hospital["institution_code"]})  # fmt: skip
            assert shape["status"] == 403 and "<code> is suspended since <date>" in str(shape)
            assert real_audit == scen_audit == []
    finally:
        admin(f"/admin/facilities/{code}/resume", {})
    # The throwaway facility is back, the hospital after the reset (the switch fixture).
    assert _call(srv, _ctx(m, paused), "POST", "/csc/v2/info", {}).status == 200


def _issue(m: dict[str, Any], facility_pem: str, *, not_after: dt.datetime) -> tuple[bytes, Any]:
    """A certificate for the same subject and key as ``facility_pem`` from the facility client
    CA, valid until ``not_after`` (DER, and the cryptography certificate)."""
    pki = Path(m["dir"]) / "pki"
    ca = x509.load_pem_x509_certificate((pki / "facility-client-ca.pem").read_bytes())
    ca_key: Any = serialization.load_pem_private_key(
        (pki / "facility-client-ca.key").read_bytes(), None
    )
    old = x509.load_pem_x509_certificate(Path(facility_pem).read_bytes())
    b = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=30))
        .not_valid_after(not_after)
    )
    for ext in old.extensions:
        b = b.add_extension(ext.value, ext.critical)
    cert = b.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER), cert


async def _register_like(config: str, model_serial: str, der: bytes, cert: Any) -> None:
    """Record ``cert`` for the facility of the certificate ``model_serial`` (the registry row
    the gateway itself writes at issuance, with this certificate's serial, fingerprint and
    validity)."""
    from sqlalchemy import insert, select

    from gateway.lifecycle.facilities import fingerprint
    from gateway.store.schema import client_certificate as cc
    from tests.support.signing import services

    async with services(config) as svc:
        async with svc.db.read() as conn:
            row = (await conn.execute(select(cc).where(cc.c.serial_hex == model_serial))).one()
        values = dict(row._mapping)
        values.pop("id")
        values.update(
            serial_hex=format(cert.serial_number, "x"),
            fingerprint_sha256=fingerprint(der),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            certificate_der=der,
            last_used_at=None,
        )
        async with svc.db.write() as conn:
            await conn.execute(insert(cc).values(**values))


def _https(port: int, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)


def _on(conn: http.client.HTTPSConnection, path: str) -> Response:
    conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())


#: What a client meets when the server closes the connection instead of answering.
NO_ANSWER = (http.client.RemoteDisconnected, ConnectionResetError, ssl.SSLError)


def _no_answer(srv: Server, conn: http.client.HTTPSConnection) -> str:
    """The request on ``conn`` gets no HTTP answer at all; returns the client's error."""
    with pytest.raises(NO_ANSWER) as e:
        _on(conn, "/csc/v2/info")
    return type(e.value).__name__


#: curl's exit codes for a connection the server closed instead of answering (TLS 1.3: the
#: handshake completes on the client's side first, so curl meets the close as an empty reply
#: (52) or as a reset (56), whichever the server's close races into).
CURL_NO_ANSWER = {52: "Empty reply from server", 56: "Recv failure: Connection reset by peer"}


def _curl(m: dict[str, Any], srv: Server, cert: str, key: str) -> tuple[int, str]:
    """curl's exit code and last line, as a vendor's shell script sees them."""
    import subprocess

    res = subprocess.run(
        ["curl", "-sS", "--cacert", m["server_ca"], "--cert", cert, "--key", key,
         "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}",
         f"https://localhost:{srv.port}/csc/v2/info"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return res.returncode, res.stderr.strip()


#: Seconds from issuance to the end of the certificate that expires on an open connection: the
#: first for a quick test; the next ones only when the set-up (issue, register, handshake, first
#: request) did not beat the previous one, the last one so long that it cannot be missed.
ENDS_AFTER = (3, 30)


def _kept_until_its_end(
    m: dict[str, Any], srv: Server, base: dict[str, str], model: str, tmp_path: Path
) -> tuple[http.client.HTTPSConnection, dt.datetime, Any]:
    """A connection opened and answered (200) with a certificate of ``base``'s facility that
    ends, with its registry row, at a whole second ``end`` still to come; the connection, ``end``
    and the certificate. A certificate whose end came before its first request was answered
    says nothing, and the next of ENDS_AFTER is tried; any other answer fails."""
    answer: Any = None
    for seconds in ENDS_AFTER:
        end = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).replace(microsecond=0)
        der, cert = _issue(m, base["client_cert"], not_after=end)
        asyncio.run(_register_like(m["config"], model, der, cert))
        pem = tmp_path / f"expiring-{seconds}.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kept = _https(srv.port, client_context(m["server_ca"], str(pem), base["client_key"]))
        try:
            first: Response | None = _on(kept, "/csc/v2/info")
        except NO_ANSWER:  # refused in the handshake: already expired there
            first = None
        if first is not None and first.status == 200:
            return kept, end, cert
        kept.close()
        answer = None if first is None else (first.status, first.body)
        assert dt.datetime.now(dt.UTC) >= end, f"refused before the certificate's end: {answer}"
        assert first is None or (first.status == 403 and b"expired on" in first.body), answer
    raise AssertionError(f"the set-up took longer than {ENDS_AFTER[-1]} s: {answer}")


def test_expired_certificate_scenario_answers_as_a_real_expiry(
    world: tuple[dict[str, Any], Server], switch: Any, tmp_path: Path
) -> None:
    m, srv = world
    cfg = m["config"]
    base = _throwaway(m, "0110000034", tmp_path)
    model = _serial(base["client_cert"])
    key = base["client_key"]
    hospital = _facility(m, "hospital")

    # A certificate that is already expired: refused in the TLS handshake, the connection
    # closed without an HTTP answer.
    der, cert = _issue(m, base["client_cert"], not_after=dt.datetime.now(dt.UTC) - dt.timedelta(
        days=1))  # fmt: skip
    asyncio.run(_register_like(cfg, model, der, cert))
    expired = tmp_path / "expired.pem"
    expired.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    code, said = _curl(m, srv, str(expired), key)
    assert code in CURL_NO_ANSWER and said == f"curl: ({code}) {CURL_NO_ANSWER[code]}", said
    _no_answer(srv, _https(srv.port, client_context(m["server_ca"], str(expired), key)))

    # One that expires while its connection is open: the next request on that connection
    # meets the identity check, which answers 403.
    kept, end, cert = _kept_until_its_end(m, srv, base, model, tmp_path)
    # The hospital's system, too, has a connection open before its certificate "expires".
    hospital_kept = _https(srv.port, _ctx(m, hospital))
    assert _on(hospital_kept, "/csc/v2/info").status == 200
    while dt.datetime.now(dt.UTC) <= end + dt.timedelta(seconds=1):
        time.sleep(0.2)  # waits for the certificate's end; nothing is timed
    real, real_audit = _audited(cfg, _on, kept, "/csc/v2/info")
    kept.close()

    switch("facility_certificate_expired", facility=hospital["institution_code"])
    scen, scen_audit = _audited(cfg, _on, hospital_kept, "/csc/v2/info")
    hospital_kept.close()
    shape = _same(srv, real, scen, {"serial": format(cert.serial_number, "x")},
                  {"serial": _serial(hospital["client_cert"])})  # fmt: skip
    assert shape["status"] == 403, shape
    assert shape["body"]["error_description"] == "client certificate <serial> expired on <date>"
    assert real_audit == scen_audit == []
    # The date the real answer names is the certificate's end.
    assert end.isoformat() in real.json()["error_description"]

    # New connections after the "expiry": no answer, as for the really expired certificate.
    code, said = _curl(m, srv, hospital["client_cert"], hospital["client_key"])
    assert code in CURL_NO_ANSWER and said == f"curl: ({code}) {CURL_NO_ANSWER[code]}", said
    _no_answer(srv, _https(srv.port, _ctx(m, hospital)))
    # The portal stays reachable (to reset).
    assert request(srv.port, "GET", "/portal/scenarios", ctx=_ctx(m, hospital)).status == 200


# -- the enrolment code: really locked, and put back by the reset -----------------------------


async def _enrolments(config: str, signer_id: str) -> list[tuple[Any, ...]]:
    from sqlalchemy import select

    from gateway.store.schema import enrollment as e
    from tests.support.signing import services

    async with services(config) as svc, svc.db.read() as conn:
        q = select(e.c.id, e.c.status, e.c.failed_tries, e.c.checking_tries).where(
            e.c.signer_id == signer_id
        )
        return [tuple(r) for r in (await conn.execute(q.order_by(e.c.id))).all()]


def test_enrolment_locked_is_the_real_lock_and_the_reset_puts_it_back(
    world: tuple[dict[str, Any], Server], admin: Any, switch: Any
) -> None:
    m, srv = world
    cfg = m["config"]
    hospital = _facility(m, "hospital")
    ctx = _ctx(m, hospital)
    doctors = [s for s in m["signers"] if s["role"] == "Medical Doctor"]
    real_doc, scen_doc = doctors[1], doctors[0]

    def begin(doc: dict[str, Any], password: str) -> Response:
        return request(srv.port, "POST", "/auth/fido2/register/begin", ctx=ctx,
                       json_body={"enrollment_code": doc["enrollment_code"],
                                  "password": password})  # fmt: skip

    # Really locked: five wrong passwords (the fifth locks), then the right one.
    wrong = [begin(real_doc, "wrong-password").status for _ in range(5)]
    assert wrong == [403] * 5
    real, real_audit = _audited(cfg, begin, real_doc, real_doc["enrollment_password"])

    # One wrong password before the scenario: the reset must put that count back too.
    assert begin(scen_doc, "wrong-password").status == 403
    before = asyncio.run(_enrolments(cfg, scen_doc["id"]))
    assert [(s, f) for _, s, f, _ in before] == [("active", 1)]
    switch("enrolment_locked", facility=hospital["institution_code"])
    assert [s for _, s, _, _ in asyncio.run(_enrolments(cfg, scen_doc["id"]))] == ["locked"]
    scen, scen_audit = _audited(cfg, begin, scen_doc, scen_doc["enrollment_password"])
    shape = _same(srv, real, scen, {}, {})
    assert shape["status"] == 403 and shape["body"]["detail"] == LOCKED_TEXT, shape
    assert real_audit == scen_audit == []

    admin("/admin/scenarios/reset", {"facility": hospital["institution_code"]})
    assert asyncio.run(_enrolments(cfg, scen_doc["id"])) == before
    # The real lock is not the scenario's: it stays.
    assert begin(real_doc, real_doc["enrollment_password"]).status == 403
    r = begin(scen_doc, scen_doc["enrollment_password"])
    assert r.status == 200 and "publicKey" in r.json(), r.body


# -- the signer without the role: the real role check, reading a pharmacist's hcRole ---------


def _prescription(credential: str, sad: str) -> dict[str, Any]:
    return {
        "credentialID": credential,
        "SAD": sad,
        "documents": [
            {"document": base64.b64encode(PRESCRIPTION_CSV).decode(), "signature_format": "X",
             "profile": "jp-eprescription", "conformance_level": "AdES-B-B"}
        ],
    }  # fmt: skip


def test_signer_without_role_answers_as_a_real_pharmacist(
    world: tuple[dict[str, Any], Server], switch: Any
) -> None:
    m, srv = world
    cfg = m["config"]
    digest = hashlib.sha256(PRESCRIPTION_CSV).digest()

    def enrolled(kind: str, role: str) -> tuple[Csc, dict[str, Any], SoftAuthenticator]:
        csc = Csc(srv.port, _ctx(m, _facility(m, kind)))
        signer = next(s for s in m["signers"] if s["role"] == role)
        auth = SoftAuthenticator(origin=f"https://localhost:{srv.port}")
        # The scenario's doctor may have been enrolled by another test of this module.
        r = csc.post("/auth/fido2/register/begin",
                     {"enrollment_code": signer["enrollment_code"],
                      "password": signer["enrollment_password"]})  # fmt: skip
        if r.status == 200:
            done = csc.post("/auth/fido2/register/complete",
                            {"enrollment_code": signer["enrollment_code"],
                             "credential": auth.create(r.json()["publicKey"])})  # fmt: skip
            assert done.status == 200, done.body
        else:
            out = run_cli("signer", "enroll-code", signer["id"], "--json", "-c", cfg)
            fresh = json.loads(out.stdout)
            assert csc.enroll(fresh["code"], fresh["password"], auth).status == 200
        return csc, signer, auth

    pharmacy, pharmacist, p_auth = enrolled("pharmacy", "Pharmacist")
    hospital, doctor, d_auth = enrolled("hospital", "Medical Doctor")

    p_sad = pharmacy.authorize(pharmacist["credential_id"], [digest], p_auth)
    sign = "/csc/v2/signatures/signDoc"
    real, real_audit = _audited(
        cfg, pharmacy.post, sign, _prescription(pharmacist["credential_id"], p_sad)
    )
    d_sad = hospital.authorize(doctor["credential_id"], [digest], d_auth)
    switch("signer_without_role", credential=doctor["credential_id"])
    scen, scen_audit = _audited(
        cfg, hospital.post, sign, _prescription(doctor["credential_id"], d_sad)
    )

    shape = _same(srv, real, scen, {"code": _facility(m, "pharmacy")["institution_code"]},
                  {"code": _facility(m, "hospital")["institution_code"]})  # fmt: skip
    assert shape["status"] == 403 and shape["body"] == {
        "error": "role_not_permitted",
        "error_description": "hcRole Pharmacist may not sign a prescription document "
        "(allowed: Medical Doctor, Dentist)",
    }, shape

    # The same audit record: the refusal, the SAD given back; only who and which differ.
    def masked(events: list[dict[str, Any]], who: dict[str, Any], fac: str) -> Any:
        text = json.dumps(events, sort_keys=True)
        for value, name in ((who["credential_id"], "<credential>"), (who["id"], "<signer>"),
                            (fac, "<facility>")):  # fmt: skip
            text = text.replace(value, name)
        return json.loads(text)

    a = masked(real_audit, pharmacist, _facility(m, "pharmacy")["institution_code"])
    b = masked(scen_audit, doctor, _facility(m, "hospital")["institution_code"])
    assert [e["action"] for e in a] == [e["action"] for e in b]
    assert any(e["action"] == "signature.failed" and e["detail"].get("refunded") for e in a), a
    per_credential = ("key_id", "sad", "hashes")  # which key, which SAD: differ by nature
    for x, y in zip(a, b, strict=True):
        assert set(x["detail"]) == set(y["detail"])
        assert {k: v for k, v in x.items() if k != "detail"} == {
            k: v for k, v in y.items() if k != "detail"
        }
        assert {k: v for k, v in x["detail"].items() if k not in per_credential} == {
            k: v for k, v in y["detail"].items() if k not in per_credential
        }

    # A made-up SAD meets the SAD check first, as for the real pharmacist.
    r = hospital.post("/csc/v2/signatures/signDoc", _prescription(doctor["credential_id"], "x"))
    p = pharmacy.post("/csc/v2/signatures/signDoc", _prescription(pharmacist["credential_id"], "x"))
    assert (r.status, r.json()["error"]) == (p.status, p.json()["error"]) == (
        400, "invalid_request")  # fmt: skip
    # Off again, the SAD that was given back signs.
    switch_off = Csc(srv.port, _ctx(m, m["admin"]))
    assert switch_off.post("/admin/scenarios/reset", {}).status == 200
    r = hospital.post("/csc/v2/signatures/signDoc", _prescription(doctor["credential_id"], d_sad))
    assert r.status == 200, r.body


# -- production settings: no scenario answers, none can be switched ----------------------------


def test_production_settings_ignore_and_refuse_the_scenarios(
    world: tuple[dict[str, Any], Server], switch: Any
) -> None:
    """The same world served with ``service.sandbox = false``: a scenario switched on in the
    sandbox's file changes nothing, and the admin API refuses to list or switch any."""
    m, _ = world
    hospital = _facility(m, "hospital")
    switch("facility_certificate_revoked", facility=hospital["institution_code"])
    # The world's settings without what only a sandbox may have (the TEST CA, TSA and JPKI
    # services), beside them so that the relative paths hold.
    lines = Path(m["config"]).read_text().splitlines()
    kept = [ln for ln in lines if not ln.startswith(("test_ca_", "test_crl_url", "test_ocsp_url"))]
    toml = "\n".join(kept).replace("sandbox = true", "sandbox = false")
    for section in ("[test_tsa]", "[test_jpki]"):
        head, _, tail = toml.partition(f"{section}\nenabled = true")
        assert tail, section
        toml = f"{head}{section}\nenabled = false{tail}"
    config = Path(m["config"]).with_name("production.toml")
    config.write_text(toml)
    prod = Server(config, free_port())
    prod.start()
    try:
        r = request(prod.port, "POST", "/csc/v2/info", ctx=_ctx(m, hospital), json_body={})
        assert r.status == 200, r.body
        admin_ctx = _ctx(m, m["admin"])
        for method, path, body in (
            ("GET", "/admin/scenarios", None),
            ("POST", "/admin/scenarios", {"scenario": "tsa_down", "facility": "1310000011"}),
            ("POST", "/admin/scenarios/reset", {}),
        ):
            r = request(prod.port, method, path, ctx=admin_ctx, json_body=body)
            assert r.status == 403, (path, r.body)
            assert r.json()["detail"] == (
                "failure scenarios exist only in a sandbox (service.sandbox = true)"
            ), r.body
    finally:
        prod.stop()
