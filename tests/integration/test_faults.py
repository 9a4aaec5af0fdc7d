"""Faults under signing load, with real processes: kill -9 of a worker and of the whole
server, the HSM token pulled, the database locked, the TSA down. A client-side ledger checks
that every signature received has its audit record, that no digest is signed twice, that the
audit chain verifies, and that no process is left behind.

Its own sandbox (own token, database and ports), so that pulling the token or killing the
server does not disturb the session's gateway.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.store.schema import audit_event
from tests.support.faults import Ledger, alive, descendants, wait_until
from tests.support.gateway import Server, client_context, free_port, request, run_cli
from tests.support.postgres import Databases
from tests.support.signing import Csc, b64, random_hashes, services
from tests.support.webauthn import SoftAuthenticator

pytestmark = [pytest.mark.tls, pytest.mark.hsm]


class World:
    def __init__(self, root: Path, store_url: str | None = None) -> None:
        self.port = free_port()
        extra = ["--store-url", store_url] if store_url else []
        run_cli("sandbox", "init", str(root), "--port", str(self.port), *extra)
        self.manifest: dict[str, Any] = json.loads((root / "manifest.json").read_text())
        self.root = root
        self.config = Path(self.manifest["config"])
        hospital = next(f for f in self.manifest["facilities"] if f["kind"] == "hospital")
        self.ctx = client_context(
            self.manifest["server_ca"], hospital["client_cert"], hospital["client_key"]
        )
        self.doc: dict[str, Any] = next(
            s for s in self.manifest["signers"] if s["role"] == "Medical Doctor"
        )
        self.auth = SoftAuthenticator(origin=f"https://localhost:{self.port}")
        self.auth_lock = threading.Lock()

    def server(self, **kw: Any) -> Server:
        return Server(self.config, self.port, **kw)

    def csc(self) -> Csc:
        return Csc(self.port, self.ctx)

    def authorize(self, hashes: list[bytes]) -> str:
        with self.auth_lock:  # one authenticator, one sign counter
            return self.csc().authorize(self.doc["credential_id"], hashes, self.auth)

    def audit(self) -> list[Any]:
        async def rows() -> list[Any]:
            async with services(self.config) as svc, svc.db.read() as conn:
                q = select(audit_event).order_by(audit_event.c.seq)
                return list((await conn.execute(q)).all())

        return asyncio.run(rows())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield _enrolled(World(tmp_path_factory.mktemp("faults")))


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory: pytest.TempPathFactory, pg_databases: Databases) -> World:
    """The same world on a database of the session's throwaway PostgreSQL cluster."""
    return _enrolled(World(tmp_path_factory.mktemp("faults-pg"), pg_databases.fresh()))


def _enrolled(w: World) -> World:
    srv = w.server()
    srv.start()
    try:
        r = w.csc().enroll(w.doc["enrollment_code"], w.doc["enrollment_password"], w.auth)
        assert r.status == 200, r.body
    finally:
        srv.stop()
    return w


def _load(world: World, ledger: Ledger, stop: threading.Event, batch: int = 6) -> None:
    """One client: authorize a batch of fresh digests, sign them one by one; connection
    errors and 5xx are counted and retried with the next batch."""
    cred = world.doc["credential_id"]
    while not stop.is_set():
        hashes = random_hashes(batch)
        try:
            sad = world.authorize(hashes)
        except (AssertionError, OSError, ssl.SSLError):
            ledger.errors += 1
            time.sleep(0.05)
            continue
        for h in hashes:
            if stop.is_set():
                return
            with ledger.lock:
                ledger.sent.append(h)
            try:
                r = world.csc().sign_hash(cred, sad, [h])
            except (OSError, ssl.SSLError, ConnectionError):
                ledger.errors += 1
                break
            with ledger.lock:
                ledger.statuses.append(r.status)
                ledger.samples.setdefault(r.status, r)
            if r.status == 200:
                ledger.got(h, base64.b64decode(r.json()["signatures"][0]))
            else:
                break


def _run_load(
    world: World, ledger: Ledger, clients: int = 3
) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(world, ledger, stop), daemon=True)
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    return stop, threads


def _check_ledger(world: World, ledger: Ledger) -> None:
    rows = world.audit()
    signed: Counter[str] = Counter()
    for r in rows:
        if r.action == "signature.sign_hash":
            signed.update(json.loads(r.detail)["hashes"])
    missing = [h.hex() for h in ledger.received if h.hex() not in signed]
    assert missing == [], "signatures received without their audit record"
    assert [h for h, n in signed.items() if n > 1] == [], "a digest signed twice"
    verify = run_cli("audit", "verify", "-c", str(world.config), "--json", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _verify_something(world: World) -> None:
    doc = b"verified before a kill -9"
    sad = world.authorize([hashlib.sha256(doc).digest()])
    r = world.csc().post(
        "/csc/v2/signatures/signDoc",
        {
            "credentialID": world.doc["credential_id"],
            "SAD": sad,
            "documents": [{"document": b64(doc), "signature_format": "C"}],
        },
    )
    assert r.status == 200, r.body
    signed = r.json()["DocumentWithSignature"][0]
    v = world.csc().post("/verify", {"document": signed})
    assert v.status == 200, v.body


def _signs_again(world: World) -> None:
    h = random_hashes(1)
    r = world.csc().sign_hash(world.doc["credential_id"], world.authorize(h), h)
    assert r.status == 200, r.body


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_of_the_whole_server_under_load(world: World, workers: int) -> None:
    _kill_whole_server(world, workers)


def test_kill_9_of_the_whole_server_under_load_on_postgresql(pg_world: World) -> None:
    _kill_whole_server(pg_world, 2)


def _workers_answering(world: World, n: int) -> set[int]:
    """Wait (at most 60 s) until ``n`` distinct workers have answered /health. Server.start
    returns once the port accepts, i.e. once the first worker listens; the kernel spreads new
    connections over the workers listening, so all of them answer once all are up (each with
    its signing process, started before it listens)."""
    pids: set[int] = set()

    def all_seen() -> bool:
        r = request(world.port, "GET", "/health", ctx=world.ctx)
        if r.status == 200:
            pids.add(r.json()["worker"])
        return len(pids) >= n

    assert wait_until(all_seen, 60, step=0.05), pids
    return pids


def _kill_whole_server(world: World, workers: int) -> None:
    srv = world.server(workers=workers if workers > 1 else None)
    srv.start()
    _workers_answering(world, workers)
    ledger = Ledger()
    stop, threads = _run_load(world, ledger)
    try:
        assert wait_until(lambda: len(ledger.received) >= 12, 60), srv.logs()
        # A verification, so that the verification pool and multiprocessing's resource
        # tracker run too.
        _verify_something(world)
        assert srv.proc is not None
        tree = descendants(srv.proc.pid)
        # The signing process(es), the TEST TSA, the verification process and the resource
        # tracker, and with --workers the workers themselves.
        assert len(tree) >= (4 if workers == 1 else 7), tree
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        assert wait_until(lambda: not [p for p in tree if alive(p)], 15), [
            p for p in tree if alive(p)
        ]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        srv.stop()
    _check_ledger(world, ledger)
    # A restart needs nothing from the dead one: same ports (gateway, TSA), and B-T works.
    again = world.server()
    again.start()
    try:
        _signs_again(world)
        doc = b"signed after a kill -9"
        sad = world.authorize([hashlib.sha256(doc).digest()])
        r = world.csc().post(
            "/csc/v2/signatures/signDoc",
            {
                "credentialID": world.doc["credential_id"],
                "SAD": sad,
                "documents": [
                    {"document": b64(doc), "signature_format": "C", "conformance_level": "AdES-B-T"}
                ],
            },
        )
        assert r.status == 200, r.body
    finally:
        again.stop()
    assert "Traceback" not in again.logs()


def test_kill_9_of_a_worker_under_load(world: World) -> None:
    srv = world.server(workers=2)
    srv.start()
    ledger = Ledger()
    stop, threads = _run_load(world, ledger)
    try:
        assert wait_until(lambda: len(ledger.received) >= 8, 60), srv.logs()
        victim = request(world.port, "GET", "/health", ctx=world.ctx).json()["worker"]
        os.kill(victim, signal.SIGKILL)
        before = len(ledger.received)
        assert wait_until(lambda: len(ledger.received) >= before + 8, 60), srv.logs()
        assert wait_until(lambda: "restarted worker" in srv.logs(), 30)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        assert srv.proc is not None
        root = srv.proc.pid
        srv.stop()
    assert wait_until(lambda: not descendants(root), 15)
    _check_ledger(world, ledger)


def test_hsm_token_pulled_under_load(world: World) -> None:
    token_dir = next((world.root / "softhsm" / "tokens").iterdir())
    away = world.root / "token.away"  # outside the token directory: not adopted as a token
    srv = world.server()
    srv.start()
    ledger = Ledger()
    stop, threads = _run_load(world, ledger)
    seq = world.audit()[-1].seq
    try:
        assert wait_until(lambda: len(ledger.received) >= 6, 60), srv.logs()
        token_dir.rename(away)
        try:
            assert wait_until(lambda: 503 in ledger.statuses, 30), ledger.statuses
        finally:
            away.rename(token_dir)
        before = len(ledger.received)
        assert wait_until(lambda: len(ledger.received) >= before + 6, 60), srv.logs()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        srv.stop()
    r503 = ledger.samples[503]
    assert r503.json()["error"] == "temporarily_unavailable"
    assert int(r503.headers["retry-after"]) >= 1
    failed = [r for r in world.audit() if r.seq > seq and r.action == "signature.failed"]
    assert failed and all(json.loads(r.detail)["refunded"] is True for r in failed)
    _check_ledger(world, ledger)
    assert "Traceback" not in srv.logs()


def test_database_locked_past_the_busy_timeout(world: World) -> None:
    env = {"HPKI_GATEWAY_STORE__BUSY_TIMEOUT_MS": "300", "HPKI_GATEWAY_TEST_TSA__ENABLED": "false"}
    srv = world.server(env=env)
    srv.start()
    db_file = world.config.parent / "data" / "gateway.db"
    try:
        h = random_hashes(1)
        sad = world.authorize(h)
        holder = sqlite3.connect(db_file, isolation_level=None, timeout=5)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            r = world.csc().sign_hash(world.doc["credential_id"], sad, h)
            assert r.status == 503, r.body
            assert r.json()["error"] == "temporarily_unavailable"
            assert int(r.headers["retry-after"]) >= 1
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # The lock is gone: the same SAD, not spent by the refused attempt, signs.
        r = world.csc().sign_hash(world.doc["credential_id"], sad, h)
        assert r.status == 200, r.body
    finally:
        srv.stop()
    assert "Traceback" not in srv.logs()


class _Silent:
    """A TCP listener that accepts and never answers (a hung TSA)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("fault", ["down", "hung"])
def test_tsa_down_or_hung_spends_nothing(world: World, fault: str) -> None:
    silent = _Silent()
    port = silent.port if fault == "hung" else free_port()
    if fault == "down":
        silent.close()
    env = {
        "HPKI_GATEWAY_TEST_TSA__ENABLED": "false",
        "HPKI_GATEWAY_TIMESTAMP__URL": f"http://127.0.0.1:{port}/tsa",
        "HPKI_GATEWAY_TIMESTAMP__TIMEOUT": "1",
    }
    srv = world.server(env=env)
    srv.start()
    try:
        doc = f"TSA {fault}".encode()
        sad = world.authorize([hashlib.sha256(doc).digest()])
        body = {
            "credentialID": world.doc["credential_id"],
            "SAD": sad,
            "documents": [{"document": b64(doc), "signature_format": "C"}],
        }
        bt = {**body, "documents": [{**body["documents"][0], "conformance_level": "AdES-B-T"}]}
        r = world.csc().post("/csc/v2/signatures/signDoc", bt)
        expected = {"down": (503, "tsa_unavailable"), "hung": (503, "tsa_timeout")}[fault]
        assert (r.status, r.json()["error"]) == expected, r.body
        assert int(r.headers["retry-after"]) >= 1
        # Nothing was spent: the same SAD signs the same document at B-B.
        r = world.csc().post("/csc/v2/signatures/signDoc", body)
        assert r.status == 200, r.body
    finally:
        srv.stop()
        silent.close()
    assert "Traceback" not in srv.logs()


def test_disk_full_for_the_database_refuses_to_sign(world: World) -> None:
    """The server may not grow any file (RLIMIT_FSIZE, the kernel's EFBIG as on a full disk):
    the spend cannot be written, so nothing is signed; once writes work again, the same SAD
    signs."""
    import resource

    env = {"HPKI_GATEWAY_TEST_TSA__ENABLED": "false", "HPKI_GATEWAY_SCHEDULER__ENABLED": "false"}
    srv = world.server(env=env)
    srv.start()
    assert srv.proc is not None
    try:
        h = random_hashes(1)
        sad = world.authorize(h)
        seq = world.audit()[-1].seq
        soft, hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (1, hard))
        try:
            r = world.csc().sign_hash(world.doc["credential_id"], sad, h)
            assert r.status == 503, r.body
            assert r.json()["error"] == "temporarily_unavailable"
        finally:
            resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        assert [r.action for r in world.audit() if r.seq > seq] == []
        r = world.csc().sign_hash(world.doc["credential_id"], sad, h)
        assert r.status == 200, r.body
    finally:
        srv.stop()
