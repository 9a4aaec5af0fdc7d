"""``make bench``: raw SoftHSM signing vs the gateway's signHash, side by side in one run.

Builds a throwaway sandbox, then measures on the same SoftHSM key:
  raw_pkcs11_per_s               python-pkcs11 C_Sign loop (CKM_RSA_PKCS over a DigestInfo),
                                 one process, no gateway
  signhash_batch_per_s           signHash with 100 hashes per request, 1 worker
  signhash_single_per_s          signHash with 1 hash per request, 16 concurrent keep-alive
  signhash_single_p50_ms/_p99_ms   mTLS clients, 1 worker; latency per request
  signhash_batch_workers2_per_s  the batch rate with ``serve --workers 2``
  rss_mb_per_worker              largest VmRSS of a worker after its load
  signhash_single_pg_per_s, signhash_single_pg_2inst_per_s, ceremony_per_s,
  ceremony_workers_per_s, ceremony_serve_cpu_ms, ceremony_client_cpu_ms,
  *_busy_cores,
  ceremony_raw_pkcs11_per_s      bench_scale.py: PostgreSQL one / two instances, the SCAL 2
                                 ceremony per prescription with one worker and with
                                 os.cpu_count() workers (see its docstring)
  xades_eprescription_t_per_s    signDoc e-prescription at ES-T (AdES-B-T), and at ES-XL
  xades_eprescription_xl_per_s   (AdES-B-LT, revocation data from the cache), interleaved
  xades_eprescription_t_sequential_per_s, xades_eprescription_t_parallel_per_s
                                 bench_tsa.py: ES-T with the documents of a request built one
                                 after the other vs 8 at once (their TSA round trips overlap)
  card_raw_sign_per_s            MSE + PSO round trips through pcscd to the virtual HPKI card
                                 (a blocking loop on one thread, nothing else in the process)
  local_batch_per_s              e-prescriptions/s through local sign-batch, start to end
                                 (interleaved with the raw card rate); *_latency_300ms_*: the
                                 card sleeping 0.3 s per signature like a real one
  local_batch_steady_per_s       the same between the first and the last group written
                                 (without the card process's start, the card session, the PIN)
  local_batch_cpu_ms_per_doc     CPU of the batch process per e-prescription (the card process
                                 and the virtual card run in processes of their own)
  local_batch_tree_cpu_ms_per_doc  CPU of every process per e-prescription (the batch, the card
                                 process, pcscd); card_raw_sign_tree_cpu_ms: per raw signature
  verify_eprescription_xl_per_s  long-term verification of the real ES-XL prescription in
  signxml_verify_per_s           process, beside signxml's XAdESVerifier (signature only)
  jpki_authorize_per_s           credentials/authorize with the My Number card (OCSP answer
  fido2_authorize_per_s          cached) and with FIDO2, 16 clients each, rounds interleaved
Every signHash spends a hash-bound SCAL 2 SAD obtained beforehand through the real FIDO2
ceremony (software authenticator); authorization is not timed. Results go to
bench/results.json (flat keys, numbers). Targets (bench only, never asserted in tests): batch
>= 0.85x raw, single >= 0.5x raw, workers-2 batch > raw, RSS < 150 MB.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

REPO = Path(__file__).resolve().parents[1]

# The bench's clients run on uvloop, as the gateway's workers do: on one machine they share
# the gateway's cores, and a cheaper client leaves more of them to what is measured. Every
# bench module imports this one, so every ``asyncio.run`` of theirs gets a uvloop loop.
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
sys.path.insert(0, str(REPO))

from tests.support.gateway import Server, free_port, run_cli  # noqa: E402
from tests.support.webauthn import SoftAuthenticator  # noqa: E402

SHA256 = "2.16.840.1.101.3.4.2.1"
RSA = "1.2.840.113549.1.1.1"
BATCH = 100
RAW_SECONDS = float(os.environ.get("BENCH_RAW_SECONDS", "4"))
BATCH_REQUESTS = int(os.environ.get("BENCH_BATCH_REQUESTS", "60"))  # x100 signatures
SINGLE_CLIENTS = 16
SINGLE_PER_CLIENT = int(os.environ.get("BENCH_SINGLE_PER_CLIENT", "200"))
#: A bench is a deliberate flood from one facility and one address: no rate limits.
NO_LIMITS = {"HPKI_GATEWAY_LIMITS__ENABLED": "false"}
LEVEL_ROUNDS = int(os.environ.get("BENCH_LEVEL_ROUNDS", "3"))
LEVEL_REQUESTS = int(os.environ.get("BENCH_LEVEL_REQUESTS", "10"))  # x20 documents
JPKI_PER_CLIENT = int(os.environ.get("BENCH_JPKI_PER_CLIENT", "25"))
AUTHORIZE_ROUNDS = int(os.environ.get("BENCH_AUTHORIZE_ROUNDS", "3"))


def b64(d: bytes) -> str:
    return base64.b64encode(d).decode()


def raw_rate(settings_path: Path, key_id: str) -> float:
    """C_Sign in a tight loop on the doctor's key: the ceiling for one process.

    Measured in a fresh process: SoftHSM reads its configuration once per process, so a
    second sandbox in the same bench run would otherwise be looked up in the first one's
    token directory (same token label, another PIN).
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return float(pool.apply(_raw_rate, (settings_path, key_id)))


def _raw_rate(settings_path: Path, key_id: str) -> float:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    from gateway.config import load_settings

    s = load_settings(settings_path, environ={})
    if s.hsm.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = str(s.hsm.softhsm_conf)
    lib = pkcs11.lib(str(s.hsm.module))
    token = lib.get_token(token_label=s.hsm.token_label)
    with token.open(user_pin=s.hsm_pin()) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(key_id))
        prefix = bytes.fromhex("3031300d060960864801650304020105000420")
        data = [prefix + os.urandom(32) for _ in range(256)]
        for d in data[:50]:  # warm-up
            key.sign(d, mechanism=Mechanism.RSA_PKCS)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < RAW_SECONDS:
            for d in data:
                key.sign(d, mechanism=Mechanism.RSA_PKCS)
            n += len(data)
        return n / (time.perf_counter() - start)


class Client:
    def __init__(self, port: int, ctx: ssl.SSLContext, session: aiohttp.ClientSession) -> None:
        self.base = f"https://localhost:{port}"
        self.session = session

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        async with self.session.post(self.base + path, json=body) as r:
            data = await r.json()
            if r.status != 200:
                raise RuntimeError(f"{path}: {r.status} {data}")
            return data

    async def enroll(self, code: str, password: str, auth: SoftAuthenticator) -> None:
        begin = await self.post(
            "/auth/fido2/register/begin", {"enrollment_code": code, "password": password}
        )
        await self.post(
            "/auth/fido2/register/complete",
            {"enrollment_code": code, "credential": auth.create(begin["publicKey"])},
        )

    async def authorize(self, cred: str, hashes: list[bytes], auth: SoftAuthenticator) -> str:
        hs = [b64(h) for h in hashes]
        begin = await self.post(
            "/auth/fido2/authenticate/begin",
            {"credentialID": cred, "hashes": hs, "hashAlgorithmOID": SHA256,
             "numSignatures": len(hs)},
        )  # fmt: skip
        assertion = auth.get(begin["publicKey"])
        r = await self.post(
            "/csc/v2/credentials/authorize",
            {"credentialID": cred, "numSignatures": len(hs), "hashes": hs,
             "hashAlgorithmOID": SHA256,
             "authData": [{"id": "webauthn", "value": json.dumps(assertion)}]},
        )  # fmt: skip
        return str(r["SAD"])

    async def sign(self, cred: str, sad: str, hashes: list[bytes]) -> float:
        body = {"credentialID": cred, "SAD": sad, "hashes": [b64(h) for h in hashes],
                "hashAlgorithmOID": SHA256, "signAlgo": RSA}  # fmt: skip
        t = time.perf_counter()
        r = await self.post("/csc/v2/signatures/signHash", body)
        assert len(r["signatures"]) == len(hashes)
        return time.perf_counter() - t


def _ctx(manifest: dict[str, Any]) -> ssl.SSLContext:
    fac = next(f for f in manifest["facilities"] if f["kind"] == "hospital")
    ctx = ssl.create_default_context(cafile=manifest["server_ca"])
    ctx.load_cert_chain(fac["client_cert"], fac["client_key"])
    return ctx


async def batch_rate(
    port: int, ctx: ssl.SSLContext, cred: str, auth: SoftAuthenticator, clients: int
) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=64)) as s:
        c = Client(port, ctx, s)
        work = []
        for _ in range(BATCH_REQUESTS):
            hashes = [os.urandom(32) for _ in range(BATCH)]
            work.append((await c.authorize(cred, hashes, auth), hashes))
        await c.sign(cred, *work.pop())  # warm-up (key handle cache, connections)
        queue = list(work)

        async def worker() -> None:
            while queue:
                sad, hashes = queue.pop()
                await c.sign(cred, sad, hashes)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        return (len(work) * BATCH) / elapsed


async def single_rate(
    port: int, ctx: ssl.SSLContext, cred: str, auth: SoftAuthenticator
) -> tuple[float, float, float]:
    # One keep-alive connection per client: 16 sessions with one connection each.
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
        for _ in range(SINGLE_CLIENTS)
    ]
    try:
        plans: list[list[tuple[str, bytes]]] = []
        setup = Client(port, ctx, sessions[0])
        for _ in range(SINGLE_CLIENTS):
            plan: list[tuple[str, bytes]] = []
            while len(plan) < SINGLE_PER_CLIENT:
                hashes = [os.urandom(32) for _ in range(BATCH)]
                sad = await setup.authorize(cred, hashes, auth)
                plan += [(sad, h) for h in hashes]
            plans.append(plan[:SINGLE_PER_CLIENT])
        latencies: list[float] = []

        async def run(client: Client, plan: list[tuple[str, bytes]]) -> None:
            await client.sign(cred, *plan[0][:1], [plan[0][1]])  # opens the connection
            for sad, h in plan[1:]:
                latencies.append(await client.sign(cred, sad, [h]))

        clients = [Client(port, ctx, s) for s in sessions]
        start = time.perf_counter()
        await asyncio.gather(*(run(c, p) for c, p in zip(clients, plans, strict=True)))
        elapsed = time.perf_counter() - start
        total = SINGLE_CLIENTS * SINGLE_PER_CLIENT
        q = statistics.quantiles(latencies, n=100)
        return total / elapsed, q[49] * 1000, q[98] * 1000
    finally:
        for s in sessions:
            await s.close()


async def jpki_authorize_rate(
    port: int, ctx: ssl.SSLContext, cred: str, card: Any, pin: str
) -> float:
    """credentials/authorize with the My Number card (begin -> card signs -> authorize), 16
    concurrent clients; the card is the in-process virtual applet (the gateway's work is what
    is measured) and its OCSP answer is cached after the first call."""
    from gateway.card.jpki import JpkiCard

    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
        for _ in range(SINGLE_CLIENTS)
    ]
    try:
        cert = JpkiCard(card).read_auth_certificate()

        async def one(client: Client) -> None:
            h = [b64(os.urandom(32))]
            body = {"credentialID": cred, "hashes": h, "hashAlgorithmOID": SHA256,
                    "numSignatures": 1}  # fmt: skip
            begin = await client.post("/auth/jpki/authenticate/begin", body)
            challenge = base64.urlsafe_b64decode(begin["challenge"] + "==")
            jc = JpkiCard(card)
            jc.verify_auth_pin(pin)
            sig = jc.sign(challenge)
            value = json.dumps({"certificate": b64(cert), "signature": b64(sig),
                                "challenge_id": begin["challenge_id"]})  # fmt: skip
            r = await client.post(
                "/csc/v2/credentials/authorize",
                {**body, "authData": [{"id": "jpki", "value": value}]},
            )
            assert r["SAD"]

        clients = [Client(port, ctx, s) for s in sessions]
        await one(clients[0])  # warm: connection, OCSP answer cached
        per_client = JPKI_PER_CLIENT

        async def run(client: Client) -> None:
            for _ in range(per_client):
                await one(client)

        start = time.perf_counter()
        await asyncio.gather(*(run(c) for c in clients))
        return SINGLE_CLIENTS * per_client / (time.perf_counter() - start)
    finally:
        for s in sessions:
            await s.close()


async def fido2_authorize_rate(
    port: int, ctx: ssl.SSLContext, cred: str, auth: SoftAuthenticator
) -> float:
    """credentials/authorize with the FIDO2 authenticator measured as ``jpki_authorize_rate``
    measures the card: 16 concurrent clients (one keep-alive connection each), each doing
    begin -> the software authenticator signs -> authorize, JPKI_PER_CLIENT times."""
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
        for _ in range(SINGLE_CLIENTS)
    ]
    try:
        clients = [Client(port, ctx, s) for s in sessions]

        async def one(client: Client) -> None:
            assert await client.authorize(cred, [os.urandom(32)], auth)

        await one(clients[0])  # warm: connection

        async def run(client: Client) -> None:
            for _ in range(JPKI_PER_CLIENT):
                await one(client)

        start = time.perf_counter()
        await asyncio.gather(*(run(c) for c in clients))
        return SINGLE_CLIENTS * JPKI_PER_CLIENT / (time.perf_counter() - start)
    finally:
        for s in sessions:
            await s.close()


def authorize_interleaved(
    port: int, ctx: ssl.SSLContext, cred: str, auth: SoftAuthenticator, card: Any, pin: str
) -> dict[str, float]:
    """My Number card and FIDO2 authorizations, rounds alternating (JPKI, FIDO2, ...) so that
    load on the machine hits both alike; the median of each."""
    jpki_rates, fido2_rates = [], []
    for _ in range(AUTHORIZE_ROUNDS):
        jpki_rates.append(asyncio.run(jpki_authorize_rate(port, ctx, cred, card, pin)))
        fido2_rates.append(asyncio.run(fido2_authorize_rate(port, ctx, cred, auth)))
    return {
        "jpki_authorize_per_s": statistics.median(jpki_rates),
        "fido2_authorize_per_s": statistics.median(fido2_rates),
    }


class _DirectCard:
    """The virtual My Number card as an in-process transport (no pcscd in the benchmark)."""

    def __init__(self, applet: Any) -> None:
        self.applet = applet

    def transmit(self, command: Any) -> Any:
        return self.applet.process(command)


def _vmrss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    # Per thread: a child started from another thread is listed under that thread only.
    return [
        int(p)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for p in (task / "children").read_text().split()
    ]


def _is_signing_process(pid: int) -> bool:
    return b"gateway.hsm.signer_process" in Path(f"/proc/{pid}/cmdline").read_bytes()


def rss_mb(pids: list[int]) -> float:
    """The largest VmRSS of a worker plus its signing process (``hsm.signing_process``)."""
    out = 0.0
    for pid in pids:
        signers = [c for c in _children(pid) if _is_signing_process(c)]
        out = max(out, _vmrss_mb(pid) + sum(_vmrss_mb(c) for c in signers))
    return out


def worker_pids(srv: Server) -> list[int]:
    assert srv.proc is not None
    workers = [c for c in _children(srv.proc.pid) if not _is_signing_process(c)]
    return workers or [srv.proc.pid]


async def enrolled(
    port: int, ctx: ssl.SSLContext, code: str, pw: str, *, counter: bool = False
) -> SoftAuthenticator:
    """An authenticator enrolled with the code. Without a counter by default: the benches
    share one authenticator among concurrent clients, whose assertions reach the gateway in
    any order (a counter would make the later-numbered one refuse the earlier as a clone).
    ``counter=True``: one doctor's key used one ceremony after the other."""
    auth = SoftAuthenticator(origin=f"https://localhost:{port}", counter_less=not counter)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        await Client(port, ctx, s).enroll(code, pw, auth)
    return auth


def in_process_baselines(config: Path) -> dict[str, float]:
    """bench_sign.py on the sandbox token: pyHanko's generic CMS and signxml's XAdESSigner on a
    SoftHSM key in this process (the baselines), and our builders in-process for reference."""
    from bench.bench_sign import run as bench_sign
    from gateway.config import load_settings

    s = load_settings(config, environ={})
    measured = bench_sign(
        {
            "softhsm_conf": s.hsm.softhsm_conf,
            "token_label": s.hsm.token_label,
            "pin": s.hsm_pin(),
            "module": str(s.hsm.module),
        }
    )
    return {
        "pyhanko_cms_per_s": measured["pyhanko_cms_per_s"],
        "signxml_xades_per_s": measured["signxml_xades_per_s"],
        "cades_builder_in_process_per_s": measured["cades_signdoc_per_s"],
        "xades_builder_in_process_per_s": measured["xades_eprescription_per_s"],
    }


async def signdoc(
    port: int,
    ctx: ssl.SSLContext,
    cred: str,
    auth: SoftAuthenticator,
    kind: str,
    requests: int | None = None,
    clients: int | None = None,
) -> float:
    from bench.bench_signdoc import signdoc_rate

    async def authorize(session: aiohttp.ClientSession, digests: list[bytes]) -> str:
        return await Client(port, ctx, session).authorize(cred, digests, auth)

    extra = {} if requests is None else {"requests": requests}
    if clients is not None:
        extra["clients"] = clients
    return await signdoc_rate(
        port=port, ssl_ctx=ctx, credential_id=cred, authorize=authorize, kind=kind, **extra
    )


def levels_interleaved(
    port: int, ctx: ssl.SSLContext, cred: str, auth: SoftAuthenticator
) -> dict[str, float]:
    """e-prescription signDoc at ES-T and ES-XL, rounds alternating (T, XL, T, XL, ...) so that
    load on the machine hits both alike; the median of each."""
    t_rates, xl_rates = [], []
    for _ in range(LEVEL_ROUNDS):
        t_rates.append(asyncio.run(signdoc(port, ctx, cred, auth, "xades-t", LEVEL_REQUESTS)))
        xl_rates.append(asyncio.run(signdoc(port, ctx, cred, auth, "xades-xl", LEVEL_REQUESTS)))
    return {
        "xades_eprescription_t_per_s": statistics.median(t_rates),
        "xades_eprescription_xl_per_s": statistics.median(xl_rates),
    }


def card_rates(*args: str) -> dict[str, float]:
    """bench/bench_card.py in its own process (it starts a private pcscd)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_card", *args],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    rates: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return rates


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpki-bench-") as tmp:
        d = Path(tmp) / "sandbox"
        run_cli("sandbox", "init", str(d), "--port", str(free_port()))
        manifest = json.loads((d / "manifest.json").read_text())
        config = d / "gateway.toml"
        ctx = _ctx(manifest)
        doc = next(s for s in manifest["signers"] if s["role"] == "Medical Doctor")
        cred = doc["credential_id"]
        # The key id is not in the manifest or the listing: read it from the store.
        with sqlite3.connect(d / "data" / "gateway.db") as db:
            key_hex = str(
                db.execute("SELECT key_id FROM credential WHERE id = ?", (cred,)).fetchone()[0]
            )

        print("raw python-pkcs11 ...", flush=True)
        raw = raw_rate(config, key_hex)

        results: dict[str, float] = {"raw_pkcs11_per_s": raw}
        print("in-process baselines: pyHanko generic CMS, signxml XAdESSigner ...", flush=True)
        results.update(in_process_baselines(config))
        print("long-term verification of the real prescription vs signxml, interleaved ...")
        from bench.bench_verify import run as bench_verify

        results.update(bench_verify())
        print("HPKI card through pcscd + vpcd: raw PSO vs sign-batch, interleaved ...", flush=True)
        results.update(card_rates())
        print("... and with a simulated real-card latency of 0.3 s per signature", flush=True)
        results.update(card_rates("--latency", "0.3", "--n", "10", "--rounds", "1"))
        srv = Server(config, free_port(), env=NO_LIMITS)
        srv.start()
        try:
            auth = asyncio.run(
                enrolled(srv.port, ctx, doc["enrollment_code"], doc["enrollment_password"])
            )
            print("signHash 100 hashes/request, 1 worker ...", flush=True)
            results["signhash_batch_per_s"] = asyncio.run(
                batch_rate(srv.port, ctx, cred, auth, clients=2)
            )
            print("signHash 1 hash/request, 16 clients, 1 worker ...", flush=True)
            rate, p50, p99 = asyncio.run(single_rate(srv.port, ctx, cred, auth))
            results.update(
                signhash_single_per_s=rate, signhash_single_p50_ms=p50, signhash_single_p99_ms=p99
            )
            for kind, key in (
                ("cades", "cades_signdoc_per_s"),
                ("xades", "xades_eprescription_per_s"),
            ):
                print(f"signDoc {kind} through the HTTP API, 1 worker ...", flush=True)
                results[key] = asyncio.run(signdoc(srv.port, ctx, cred, auth, kind))
            print("signDoc e-prescription ES-T / ES-XL, interleaved ...", flush=True)
            results.update(levels_interleaved(srv.port, ctx, cred, auth))
            print("credentials/authorize, My Number card vs FIDO2, 16 clients, interleaved ...",
                  flush=True)  # fmt: skip
            from gateway.sandbox.jpki import load_card

            card_dir = d / "cards" / doc["id"]
            run_cli("signer", "link-jpki", doc["id"], "--cert", str(card_dir / "auth.pem"),
                    "-c", str(config))  # fmt: skip
            applet = load_card(card_dir, d / "jpki" / "test-jpki-ca.pem")
            results.update(
                authorize_interleaved(
                    srv.port, ctx, cred, auth, _DirectCard(applet), (card_dir / "pin").read_text()
                )
            )
            rss1 = rss_mb(worker_pids(srv))
        finally:
            srv.stop()
        print("signDoc ES-T, documents one after the other vs together, interleaved ...")
        from bench.bench_tsa import run as bench_tsa

        results.update(bench_tsa(config, srv.port, ctx, cred, auth))

        srv = Server(config, free_port(), workers=2, env=NO_LIMITS)
        srv.start()
        try:
            time.sleep(1.0)  # both workers listening
            issued = json.loads(
                run_cli("signer", "enroll-code", doc["id"], "-c", str(config), "--json").stdout
            )
            auth2 = asyncio.run(
                enrolled(srv.port, ctx, issued["enrollment_code"], issued["enrollment_password"])
            )
            print("signHash 100 hashes/request, 2 workers ...", flush=True)
            results["signhash_batch_workers2_per_s"] = asyncio.run(
                batch_rate(srv.port, ctx, cred, auth2, clients=8)
            )
            rss2 = rss_mb(worker_pids(srv))
        finally:
            srv.stop()
        results["rss_mb_per_worker"] = max(rss1, rss2)
        print("PostgreSQL one / two instances, SCAL 2 ceremony (bench_scale.py) ...", flush=True)
        from bench.bench_scale import run as bench_scale

        results.update(bench_scale())

    results = {k: round(v, 1) for k, v in results.items()}
    out = REPO / "bench" / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    raw = results["raw_pkcs11_per_s"]
    print(f"\n{'measure':<32}{'value':>10}  ratio to raw")
    for k, v in results.items():
        ratio = f"{v / raw:.2f}x" if k.endswith("_per_s") else ""
        print(f"{k:<32}{v:>10}  {ratio}")
    print(
        "\nissue targets: signHash batch >= 0.85x raw, single >= 0.5x raw, workers-2 batch > raw;"
        " signDoc CAdES >= 10x pyHanko CMS and >= 0.4x raw; e-prescription XAdES via HTTP"
        " >= 1.0x signxml in-process"
    )
    cades, xades = results["cades_signdoc_per_s"], results["xades_eprescription_per_s"]
    print(
        f"cades_signdoc / pyhanko_cms = {cades / results['pyhanko_cms_per_s']:.1f}x, "
        f"cades_signdoc / raw = {cades / raw:.2f}x, "
        f"xades_eprescription / signxml = {xades / results['signxml_xades_per_s']:.2f}x"
    )
    print(
        "xades_eprescription_xl / t = "
        f"{results['xades_eprescription_xl_per_s'] / results['xades_eprescription_t_per_s']:.2f}x"
        " (target >= 0.8x), verify_eprescription_xl / signxml_verify = "
        f"{results['verify_eprescription_xl_per_s'] / results['signxml_verify_per_s']:.2f}x"
        " (target >= 0.5x)"
    )
    print(f"\nwritten to {out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
