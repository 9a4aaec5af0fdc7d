"""Single-hash latency while e-prescriptions are being built, and the e-prescription rate.

    .venv/bin/python bench/bench_offload.py [--rounds 3]

One sandbox, one gateway (1 worker). Each round measures, in this order:

  xades_eprescription_per_s         signDoc e-prescription XAdES-B-B, 20 documents per request,
                                    4 keep-alive clients (bench_signdoc.py, as ``make bench``)
  signhash_single_mixed_p50_ms/_p99_ms  signHash 1 hash/request from 8 clients while 2 other
                                    clients send e-prescription signDoc requests (20 documents
                                    each) without pause: what a worker's other requests wait
                                    for while it builds documents
  signhash_single_mixed_per_s       the rate of those single-hash requests

Prints the medians over the rounds as JSON. Not part of ``make bench`` (it measures one
design question: where the document building runs); docs/performance.md records its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_signdoc import CSV_TEMPLATE  # noqa: E402
from bench.run import NO_LIMITS, Client, _ctx, b64, enrolled, signdoc  # noqa: E402
from tests.support.gateway import Server, free_port, run_cli  # noqa: E402

SINGLE_CLIENTS = 8
SINGLE_PER_CLIENT = 100
DOC_CLIENTS = 2
DOCS = 20


async def mixed(port: int, ctx: Any, cred: str, auth: Any) -> tuple[float, float, float]:
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
        for _ in range(SINGLE_CLIENTS + DOC_CLIENTS)
    ]
    try:
        setup = Client(port, ctx, sessions[0])
        plans = []
        for _ in range(SINGLE_CLIENTS):
            hashes = [os.urandom(32) for _ in range(SINGLE_PER_CLIENT)]
            sad = await setup.authorize(cred, hashes, auth)
            plans.append([(sad, h) for h in hashes])
        doc_requests: list[dict[str, Any]] = []
        for r in range(40):
            csvs = [
                CSV_TEMPLATE.format(n=f"{r}-{i}-{os.urandom(4).hex()}").encode()
                for i in range(DOCS)
            ]
            sad = await setup.authorize(cred, [hashlib.sha256(c).digest() for c in csvs], auth)
            doc_requests.append(
                {"credentialID": cred, "SAD": sad,
                 "documents": [{"document": b64(c), "signature_format": "X",
                                "profile": "jp-eprescription"} for c in csvs]}
            )  # fmt: skip
        latencies: list[float] = []
        stop = asyncio.Event()

        async def single(client: Client, plan: list[tuple[str, bytes]]) -> None:
            await client.sign(cred, plan[0][0], [plan[0][1]])  # opens the connection
            for sad, h in plan[1:]:
                latencies.append(await client.sign(cred, sad, [h]))

        async def documents(client: Client) -> None:
            while not stop.is_set() and doc_requests:
                await client.post("/csc/v2/signatures/signDoc", doc_requests.pop())

        singles = [Client(port, ctx, s) for s in sessions[:SINGLE_CLIENTS]]
        docs = [Client(port, ctx, s) for s in sessions[SINGLE_CLIENTS:]]
        loaders = [asyncio.create_task(documents(c)) for c in docs]
        await asyncio.sleep(0.2)  # the document load is running
        start = time.perf_counter()
        await asyncio.gather(*(single(c, p) for c, p in zip(singles, plans, strict=True)))
        elapsed = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*loaders)
        q = statistics.quantiles(latencies, n=100)
        return len(latencies) / elapsed, q[49] * 1000, q[98] * 1000
    finally:
        for s in sessions:
            await s.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="hpki-bench-offload-") as tmp:
        d = Path(tmp) / "sandbox"
        run_cli("sandbox", "init", str(d), "--port", str(free_port()))
        manifest = json.loads((d / "manifest.json").read_text())
        ctx = _ctx(manifest)
        doc = next(s for s in manifest["signers"] if s["role"] == "Medical Doctor")
        cred = doc["credential_id"]
        srv = Server(d / "gateway.toml", free_port(), env=NO_LIMITS)
        srv.start()
        try:
            auth = asyncio.run(
                enrolled(srv.port, ctx, doc["enrollment_code"], doc["enrollment_password"])
            )
            for _ in range(args.rounds):
                rate = asyncio.run(signdoc(srv.port, ctx, cred, auth, "xades"))
                rows.setdefault("xades_eprescription_per_s", []).append(rate)
                per_s, p50, p99 = asyncio.run(mixed(srv.port, ctx, cred, auth))
                rows.setdefault("signhash_single_mixed_per_s", []).append(per_s)
                rows.setdefault("signhash_single_mixed_p50_ms", []).append(p50)
                rows.setdefault("signhash_single_mixed_p99_ms", []).append(p99)
        finally:
            srv.stop()
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
