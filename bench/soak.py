"""Soak: 10 minutes of mixed load against a sandbox, RSS and open file descriptors sampled.

    .venv/bin/python bench/soak.py [--minutes 10] [--workers 1]

Mixed load from 8 clients: authorize + signHash (1 and 10 hashes), signDoc CAdES and XAdES
e-prescription, /verify of what was signed, and a share of refused requests (a random SAD, an
unreadable body). Every 10 s it samples VmRSS and the number of open file descriptors of every
process under the gateway (workers, signing processes, verification processes, TEST TSA).
Passes when the total RSS of the last minute is less than 5 % above that of the first minute
after warm-up, and file descriptors did not grow. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_signdoc import CSV_TEMPLATE  # noqa: E402
from bench.run import NO_LIMITS, Client, _ctx, b64, enrolled  # noqa: E402
from tests.support.faults import descendants  # noqa: E402
from tests.support.gateway import Server, free_port, run_cli  # noqa: E402

SAMPLE_SECONDS = 10.0
_mix = random.Random(13)  # noqa: S311 - the load mix, nothing secret


def _sample(root: int) -> tuple[float, int]:
    rss = 0.0
    fds = 0
    for pid in {root, *descendants(root)}:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return rss, fds


async def _client(port: int, ctx: object, cred: str, auth: object, stop: float) -> int:
    n = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1)) as s:
        c = Client(port, ctx, s)  # type: ignore[arg-type]
        while time.monotonic() < stop:
            kind = _mix.random()
            if kind < 0.4:
                hashes = [os.urandom(32) for _ in range(_mix.choice((1, 10)))]
                sad = await c.authorize(cred, hashes, auth)  # type: ignore[arg-type]
                await c.sign(cred, sad, hashes)
            elif kind < 0.8:
                csv = CSV_TEMPLATE.format(n=os.urandom(4).hex()).encode()
                sad = await c.authorize(cred, [hashlib.sha256(csv).digest()], auth)  # type: ignore[arg-type]
                doc = {"document": b64(csv), "signature_format": _mix.choice("CX")}
                if doc["signature_format"] == "X":
                    doc["profile"] = "jp-eprescription"
                r = await c.post(
                    "/csc/v2/signatures/signDoc",
                    {"credentialID": cred, "SAD": sad, "documents": [doc]},
                )
                if _mix.random() < 0.3:
                    # 503 when the worker's verification slots are busy: a valid answer.
                    body = {"document": r["DocumentWithSignature"][0]}
                    async with s.post(c.base + "/verify", json=body) as v:
                        assert v.status in (200, 503), await v.text()
            else:
                body = {"credentialID": cred, "SAD": "x" * 43, "hashes": [b64(os.urandom(32))]}
                async with s.post(c.base + "/csc/v2/signatures/signHash", json=body) as r:
                    await r.read()
                async with s.post(
                    c.base + "/csc/v2/info",
                    data=b"[" * 5000,
                    headers={"Content-Type": "application/json"},
                ) as r:
                    await r.read()
            n += 1
    return n


async def _load(port: int, ctx: object, cred: str, auth: object, seconds: float) -> int:
    stop = time.monotonic() + seconds
    done = await asyncio.gather(*(_client(port, ctx, cred, auth, stop) for _ in range(8)))
    return sum(done)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpki-soak-") as tmp:
        d = Path(tmp) / "sandbox"
        port = free_port()
        run_cli("sandbox", "init", str(d), "--port", str(port))
        manifest = json.loads((d / "manifest.json").read_text())
        ctx = _ctx(manifest)
        doc = next(s for s in manifest["signers"] if s["role"] == "Medical Doctor")
        srv = Server(d / "gateway.toml", port, workers=args.workers or None, env=NO_LIMITS)
        srv.start()
        samples: list[tuple[float, float, int]] = []
        try:
            auth = asyncio.run(
                enrolled(port, ctx, doc["enrollment_code"], doc["enrollment_password"])
            )
            assert srv.proc is not None
            root = srv.proc.pid
            total = args.minutes * 60
            started = time.monotonic()
            ops = 0
            while time.monotonic() - started < total:
                ops += asyncio.run(_load(port, ctx, doc["credential_id"], auth, SAMPLE_SECONDS))
                rss, fds = _sample(root)
                samples.append((time.monotonic() - started, rss, fds))
                print(f"{samples[-1][0]:7.0f} s  rss {rss:8.1f} MB  fds {fds:5d}  ops {ops}")
        finally:
            srv.stop()
    per_min = max(1, int(60 / SAMPLE_SECONDS))
    first = samples[per_min : 2 * per_min] or samples[:per_min]  # after a minute of warm-up
    last = samples[-per_min:]
    rss0 = statistics.median(s[1] for s in first)
    rss1 = statistics.median(s[1] for s in last)
    fd0, fd1 = max(s[2] for s in first), max(s[2] for s in last)
    growth = (rss1 - rss0) / rss0 * 100
    print(f"RSS {rss0:.1f} -> {rss1:.1f} MB ({growth:+.1f} %), fds {fd0} -> {fd1}")
    ok = growth < 5.0 and fd1 <= fd0 + 8
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
