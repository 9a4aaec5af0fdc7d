"""e-prescription signDoc at ES-T: the documents of one request built one after the other
(``[signing] parallel_documents = 1``, each waiting for its TSA round trip) or together (the
default, 8 at once: the round trips overlap), rounds alternating on the same sandbox, the same
port and the same authenticator; the median of each.

  xades_eprescription_t_sequential_per_s   parallel_documents = 1   (4 clients, as
  xades_eprescription_t_parallel_per_s     parallel_documents = 8    xades_eprescription_t_per_s)
  xades_eprescription_t_1client_sequential_per_s, ..._parallel_per_s: the same, one client
  (one request at a time: only the documents inside it can overlap)

Called by bench/run.py; ``python -m bench.bench_tsa`` runs it alone on a throwaway sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.gateway import Server, free_port, run_cli  # noqa: E402
from tests.support.webauthn import SoftAuthenticator  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_LEVEL_ROUNDS", "3"))
REQUESTS = int(os.environ.get("BENCH_LEVEL_REQUESTS", "10"))  # x20 documents
NO_LIMITS = {"HPKI_GATEWAY_LIMITS__ENABLED": "false"}


def run(
    config: Path, port: int, ctx: ssl.SSLContext, cred: str, auth: SoftAuthenticator
) -> dict[str, float]:
    """The gateway is (re)started on ``port`` for each round; nothing else may serve there."""
    from bench.run import signdoc

    rates: dict[tuple[str, int], list[float]] = {(p, c): [] for c in (4, 1) for p in ("1", "8")}
    for _ in range(ROUNDS):
        for limit in ("1", "8"):
            env = {**NO_LIMITS, "HPKI_GATEWAY_SIGNING__PARALLEL_DOCUMENTS": limit}
            srv = Server(config, port, env=env)
            srv.start()
            try:
                for clients in (4, 1):
                    rate = signdoc(port, ctx, cred, auth, "xades-t", REQUESTS, clients=clients)
                    rates[(limit, clients)].append(asyncio.run(rate))
            finally:
                srv.stop()
    return {
        "xades_eprescription_t_sequential_per_s": statistics.median(rates[("1", 4)]),
        "xades_eprescription_t_parallel_per_s": statistics.median(rates[("8", 4)]),
        "xades_eprescription_t_1client_sequential_per_s": statistics.median(rates[("1", 1)]),
        "xades_eprescription_t_1client_parallel_per_s": statistics.median(rates[("8", 1)]),
    }


def main() -> int:
    from bench.run import _ctx, enrolled

    with tempfile.TemporaryDirectory(prefix="hpki-bench-tsa-") as tmp:
        d = Path(tmp) / "sandbox"
        run_cli("sandbox", "init", str(d), "--port", str(free_port()))
        manifest: dict[str, Any] = json.loads((d / "manifest.json").read_text())
        config = d / "gateway.toml"
        ctx = _ctx(manifest)
        doc = next(s for s in manifest["signers"] if s["role"] == "Medical Doctor")
        port = free_port()
        srv = Server(config, port, env=NO_LIMITS)
        srv.start()
        try:
            auth = asyncio.run(
                enrolled(port, ctx, doc["enrollment_code"], doc["enrollment_password"])
            )
        finally:
            srv.stop()
        print(json.dumps(run(config, port, ctx, doc["credential_id"], auth)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
