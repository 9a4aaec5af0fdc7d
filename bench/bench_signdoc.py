"""signDoc through the gateway's HTTP API: CAdES-B-B and e-prescription XAdES-B-B per second.

Called by bench/run.py against a running sandbox gateway (one worker). Each request carries
DOCS_PER_REQUEST documents approved by one hash-bound SAD (the FIDO2 ceremony is done
beforehand and not timed), CLIENTS keep-alive mTLS clients send them concurrently. The result
counts signatures (documents signed) per second, end to end: JSON + base64 in, SAD consumption
and audit commit, signature building, the HSM, base64 + JSON out.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

DOCS_PER_REQUEST = int(os.environ.get("BENCH_SIGNDOC_DOCS", "20"))
REQUESTS = int(os.environ.get("BENCH_SIGNDOC_REQUESTS", "40"))
CLIENTS = 4

CSV_TEMPLATE = (
    "1,1310000011,TEST 中央病院\n2,患者,試験 太郎 {n}\n"
    "3,RP1,ロキソプロフェンナトリウム錠60mg,3錠,分3 毎食後,7日分\n"
)


def _b64(d: bytes) -> str:
    return base64.b64encode(d).decode()


def _documents(kind: str, n: int, salt: int) -> list[dict[str, Any]]:
    docs = []
    for i in range(n):
        csv = CSV_TEMPLATE.format(n=f"{salt}-{i}-{os.urandom(4).hex()}").encode()
        if kind == "cades":
            docs.append({"document": _b64(csv), "signature_format": "C",
                         "signed_envelope_property": "Attached"})  # fmt: skip
        else:
            docs.append({"document": _b64(csv), "signature_format": "X",
                         "profile": "jp-eprescription",
                         "conformance_level": LEVELS.get(kind, "AdES-B-B")})  # fmt: skip
    return docs


#: e-prescription kinds at a level: xades-t (ES-T), xades-xl (ES-XL, CRLs from the cache).
LEVELS = {"xades-t": "AdES-B-T", "xades-xl": "AdES-B-LT"}


async def signdoc_rate(
    *,
    port: int,
    ssl_ctx: Any,
    credential_id: str,
    authorize: Callable[[aiohttp.ClientSession, list[bytes]], Awaitable[str]],
    kind: str,
    requests: int = REQUESTS,
    clients: int = CLIENTS,
) -> float:
    """Documents signed per second through POST /csc/v2/signatures/signDoc."""
    base = f"https://localhost:{port}"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=clients + 2)
    ) as session:
        work: list[dict[str, Any]] = []
        for r in range(requests + 1):
            docs = _documents(kind, DOCS_PER_REQUEST, r)
            digests = [hashlib.sha256(base64.b64decode(d["document"])).digest() for d in docs]
            sad = await authorize(session, digests)
            work.append({"credentialID": credential_id, "SAD": sad, "documents": docs})

        async def send(body: dict[str, Any]) -> None:
            async with session.post(base + "/csc/v2/signatures/signDoc", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"signDoc: {resp.status} {data}")
                assert len(data["DocumentWithSignature"]) == len(body["documents"])

        await send(work.pop())  # warm-up: connection, key handle, certificate templates
        queue = list(work)

        async def client() -> None:
            while queue:
                await send(queue.pop())

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return requests * DOCS_PER_REQUEST / elapsed
