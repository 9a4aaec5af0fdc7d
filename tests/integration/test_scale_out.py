"""Two gateway instances (separate processes, own signing processes, as on two hosts) on one
PostgreSQL cluster: a SAD authorized at one is spent at the other, concurrent spends across
instances never exceed the count, the scheduler runs on one instance at a time, and the audit
log stays one verifiable chain. Signing over HTTP on PostgreSQL: signDoc (the e-prescription,
built off the event loop), a refund after the spend, SAD refusals."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.store.db import Database
from gateway.store.schema import audit_event
from tests.support.gateway import Server, client_context, free_port, run_cli
from tests.support.postgres import Databases, stopped
from tests.support.signing import Csc, b64, random_hashes, replayed_authorizations
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


class Cluster:
    def __init__(self, root: Path, url: str) -> None:
        self.url = url
        self.port_a = free_port()
        run_cli("sandbox", "init", str(root), "--port", str(self.port_a), "--store-url", url)
        self.manifest: dict[str, Any] = json.loads((root / "manifest.json").read_text())
        self.config = Path(self.manifest["config"])
        hospital = next(f for f in self.manifest["facilities"] if f["kind"] == "hospital")
        self.ctx = client_context(
            self.manifest["server_ca"], hospital["client_cert"], hospital["client_key"]
        )
        self.doc: dict[str, Any] = next(
            s for s in self.manifest["signers"] if s["role"] == "Medical Doctor"
        )
        self.auth = SoftAuthenticator(origin=f"https://localhost:{self.port_a}")
        self.a = Server(self.config, self.port_a)
        # The second instance: its own port, no second TEST TSA (the first one serves both).
        self.b = Server(self.config, free_port(), env={"HPKI_GATEWAY_TEST_TSA__ENABLED": "false"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pg_databases: Databases) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("pg-world"), pg_databases.fresh())
    c.a.start()
    c.b.start()
    try:
        r = Csc(c.port_a, c.ctx).enroll(
            c.doc["enrollment_code"], c.doc["enrollment_password"], c.auth
        )
        assert r.status == 200, r.body
        yield c
    finally:
        c.b.stop()
        c.a.stop()


def test_a_sad_authorized_at_one_instance_is_spent_at_the_other(cluster: Cluster) -> None:
    a, b = Csc(cluster.a.port, cluster.ctx), Csc(cluster.b.port, cluster.ctx)
    cred = cluster.doc["credential_id"]
    h = random_hashes(1)
    sad = a.authorize(cred, h, cluster.auth)
    r = b.sign_hash(cred, sad, h)
    assert r.status == 200, r.body
    again = a.sign_hash(cred, sad, h)
    assert again.status == 400
    assert again.json()["error_description"] == (
        "Number of signatures exceeds those authorized by the SAD"
    )


def test_concurrent_spends_across_instances_never_exceed_the_count(cluster: Cluster) -> None:
    cred = cluster.doc["credential_id"]
    hashes = random_hashes(5)
    sad = Csc(cluster.a.port, cluster.ctx).authorize(cred, hashes, cluster.auth)
    ports = [cluster.a.port, cluster.b.port]
    start = threading.Barrier(20)

    def spend(i: int) -> tuple[bytes, int]:
        csc = Csc(ports[i % 2], cluster.ctx)
        h = hashes[i % 5]
        start.wait()
        return h, csc.sign_hash(cred, sad, [h]).status

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(spend, range(20)))
    ok = [h for h, status in results if status == 200]
    assert sorted(ok) == sorted(hashes), results  # each approved hash exactly once
    assert {status for _, status in results} <= {200, 400}
    verify = run_cli("audit", "verify", "-c", str(cluster.config), "--json", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_scheduler_lock_has_one_holder_across_instances(cluster: Cluster) -> None:
    async def race() -> tuple[bool, bool, bool]:
        one, two = Database(cluster.url), Database(cluster.url)
        try:
            async with (
                one.exclusive("hpki-gateway.scheduler") as first,
                two.exclusive("hpki-gateway.scheduler") as second,
            ):
                pass
            async with two.exclusive("hpki-gateway.scheduler") as after:
                pass
            return first, second, after
        finally:
            await one.close()
            await two.close()

    # The instances' own schedulers may hold it for a moment, so that this process gets it
    # first, second or after not at all: such a round says nothing and is run again. Both
    # holding it at once says mutual exclusion is broken, whatever a later round gives.
    for _ in range(50):
        got = asyncio.run(race())
        first, second, _after = got
        assert not (first and second), f"both held the scheduler lock at once: {got}"
        if got == (True, False, True):
            break
    assert got == (True, False, True)


CSV = (
    "1,医療機関コード,1310000011\n2,患者氏名,試験　花子\n3,処方,ロキソプロフェン錠60mg 3錠 分3\n"
).encode()


def _sign_doc(csc: Csc, cred: str, sad: str, document: dict[str, Any]) -> Any:
    return csc.post(
        "/csc/v2/signatures/signDoc", {"credentialID": cred, "SAD": sad, "documents": [document]}
    )


def test_eprescription_sign_doc_and_a_refund_across_instances(cluster: Cluster) -> None:
    """A SAD for one prescription, authorized at A: the pharmacist's profile is refused at B
    after the spend (403, refunded on PostgreSQL), then the prescription is signed at A with
    the count given back, and the SAD is spent."""
    a, b = Csc(cluster.a.port, cluster.ctx), Csc(cluster.b.port, cluster.ctx)
    cred = cluster.doc["credential_id"]
    sad = a.authorize(cred, [hashlib.sha256(CSV).digest()], cluster.auth)
    doc = {"document": b64(CSV), "signature_format": "X"}
    refused = _sign_doc(b, cred, sad, {**doc, "profile": "jp-dispensing"})
    assert refused.status == 403, refused.body
    assert refused.json()["error"] == "role_not_permitted"
    r = _sign_doc(a, cred, sad, {**doc, "profile": "jp-eprescription"})
    assert r.status == 200, r.body
    xml = base64.b64decode(r.json()["DocumentWithSignature"][0])
    assert base64.b64encode(CSV) in xml
    report = a.post("/verify", {"document": b64(xml)})
    assert report.status == 200, report.body
    assert report.json()["indication"] == "TOTAL-PASSED", report.body
    spent = _sign_doc(b, cred, sad, {**doc, "profile": "jp-eprescription"})
    assert spent.status == 400, spent.body
    assert spent.json()["error_description"] == (
        "Number of signatures exceeds those authorized by the SAD"
    )

    async def audit() -> list[tuple[str, dict[str, Any]]]:
        db = Database(cluster.url)
        try:
            async with db.read() as conn:
                rows = (await conn.execute(select(audit_event).order_by(audit_event.c.seq))).all()
        finally:
            await db.close()
        return [(row.action, json.loads(row.detail)) for row in rows]

    digest = hashlib.sha256(CSV).hexdigest()
    ours = [
        action
        for action, detail in asyncio.run(audit())
        if (action.startswith("signature.") and digest in json.dumps(detail))
        or (action == "signature.failed" and detail.get("refunded"))
    ]
    assert ours[-3:] == ["signature.sign_doc", "signature.failed", "signature.sign_doc"], ours
    verify = run_cli("audit", "verify", "-c", str(cluster.config), "--json", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sad_refusals_on_postgresql(cluster: Cluster) -> None:
    a, b = Csc(cluster.a.port, cluster.ctx), Csc(cluster.b.port, cluster.ctx)
    cred = cluster.doc["credential_id"]
    h = random_hashes(2)
    sad = a.authorize(cred, h, cluster.auth)
    wrong = b.sign_hash(cred, sad, random_hashes(1))
    assert wrong.status == 400
    assert wrong.json()["error_description"] == "Hash is not authorized by the SAD"
    unknown = b.sign_hash(cred, "x" * 43, h[:1])
    assert unknown.status == 400
    assert unknown.json()["error_description"] == "Invalid parameter SAD"
    both = b.sign_hash(cred, sad, h)
    assert both.status == 200, both.body
    assert len(both.json()["signatures"]) == 2


def test_one_assertion_replayed_at_both_instances_authorizes_once(cluster: Cluster) -> None:
    """The same assertion sent at once to both instances (grouped authorize transactions in
    each, on one PostgreSQL): exactly one SAD; every other copy refused and audited; the audit
    log is still one chain."""
    a, b = Csc(cluster.a.port, cluster.ctx), Csc(cluster.b.port, cluster.ctx)
    before = asyncio.run(_actions(cluster.url))
    responses = replayed_authorizations(
        [a, b], cluster.doc["credential_id"], random_hashes(1), cluster.auth, 10
    )
    assert [r.status for r in responses].count(200) == 1, [r.body for r in responses]
    assert {r.status for r in responses} == {200, 400}
    after = asyncio.run(_actions(cluster.url))
    assert after.get("sad.issue", 0) - before.get("sad.issue", 0) == 1
    assert after.get("sad.refused", 0) - before.get("sad.refused", 0) == 9
    r = run_cli("audit", "verify", "-c", str(cluster.config))
    assert "audit chain intact" in r.stdout, r.stdout


async def _actions(url: str) -> dict[str, int]:
    db = Database(url)
    try:
        async with db.read() as conn:
            rows = await conn.execute(
                select(audit_event.c.action, func.count()).group_by(audit_event.c.action)
            )
            return {str(k): int(n) for k, n in rows.all()}
    finally:
        await db.close()


def test_postgresql_down_is_503_at_both_instances_and_the_sad_survives(cluster: Cluster) -> None:
    """The database server stops under two instances: signHash is 503 ``database unavailable``
    with Retry-After 2 at both (not a 500, nothing spent); started again, the same SAD signs at
    either instance at once, and the audit chain is intact."""
    a, b = Csc(cluster.a.port, cluster.ctx), Csc(cluster.b.port, cluster.ctx)
    cred = cluster.doc["credential_id"]
    h = random_hashes(2)
    sad = a.authorize(cred, h, cluster.auth)
    with stopped(cluster.url):
        for c in (a, b, a, b):
            r = c.sign_hash(cred, sad, h[:1])
            assert r.status == 503, r.body
            assert r.headers.get("retry-after") == "2"
            assert r.json()["error_description"] == "database unavailable"
    for c, one in ((b, h[:1]), (a, h[1:])):
        r = c.sign_hash(cred, sad, one)
        assert r.status == 200, r.body
    spent = a.sign_hash(cred, sad, h[:1])
    assert spent.status == 400, spent.body
    verify = run_cli("audit", "verify", "-c", str(cluster.config), "--json", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
