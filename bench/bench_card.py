"""HPKI card rates through real pcscd + vpcd (run as its own process: libpcsclite reads
``PCSCLITE_CSOCK_NAME`` once, and this benchmark starts its private pcscd).

card_raw_sign_per_s   MSE + PSO round trips through pcscd to the virtual card (PIN verified)
local_batch_per_s     e-prescriptions per second through ``sign-batch`` (CSV -> signed XML)
Interleaved rounds, medians. With ``--latency S`` the virtual card sleeps S seconds per
signature, like a real card (~0.3-1 s), to show what the overlap buys.

``--compare BASE`` measures another checkout of the project (BASE: its root) against this one,
interleaved (base, ours, base, ours, ...), one process per round each, and prints both medians.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


async def _raw(store: object, key_id: str, n: int) -> float:
    from gateway.hsm.api import DigestAlgorithm
    from gateway.hsm.card import CardKeyStore

    assert isinstance(store, CardKeyStore)
    digests = [hashlib.sha256(os.urandom(8)).digest() for _ in range(n)]
    t = time.perf_counter()
    for d in digests:
        await store.sign_digests(key_id, [d], DigestAlgorithm.SHA256)
    return n / (time.perf_counter() - t)


def run(
    rounds: int = 3, raw_n: int = 100, batch_n: int = 100, latency: float = 0.0
) -> dict[str, float]:
    from gateway.config import load_settings
    from gateway.vcard.pcscd import start_pcscd
    from tests.support.local import make_card_world

    with tempfile.TemporaryDirectory(prefix="hpki-card-bench-") as tmp:
        base = Path(tmp)
        inst = start_pcscd(base / "pcscd")
        os.environ["PCSCLITE_CSOCK_NAME"] = str(inst.socket_path)
        reader = inst.reader(0)
        try:
            world = make_card_world(base / "world")
            card = world.card(pin="123456")
            card.applet.sign_delay = latency
            reader.insert(card.applet)
            settings = load_settings(world.config(reader=reader.name), environ={})
            raw_rates, batch_rates = [], []
            for r in range(rounds):
                raw_rates.append(asyncio.run(_raw_round(settings, raw_n)))
                batch_rates.append(asyncio.run(_batch_round(settings, base, r, batch_n)))
            suffix = "" if not latency else f"_latency_{int(latency * 1000)}ms"
            return {
                f"card_raw_sign{suffix}_per_s": statistics.median(raw_rates),
                f"local_batch{suffix}_per_s": statistics.median(batch_rates),
            }
        finally:
            reader.remove()
            inst.stop()


async def _raw_round(settings: object, n: int) -> float:
    from gateway.config import Settings
    from gateway.local.setup import card_store

    assert isinstance(settings, Settings)
    store = card_store(settings)
    await store.open()
    try:
        await store.unlock(bytearray(b"123456"))
        assert store.key_id is not None
        return await _raw(store, store.key_id, n)
    finally:
        await store.close()


async def _batch_round(settings: object, base: Path, r: int, n: int) -> float:
    from gateway.config import Settings
    from gateway.local.batch import sign_batch
    from gateway.local.setup import build_local_agent
    from tests.support.local import write_prescriptions

    assert isinstance(settings, Settings)
    src, out = base / f"in{r}", base / f"out{r}"
    write_prescriptions(src, n)
    agent = build_local_agent(settings)
    try:
        t = time.perf_counter()
        result = await sign_batch(agent, src, out, pin=lambda: bytearray(b"123456"))
        elapsed = time.perf_counter() - t
    finally:
        await agent.close()
    assert result.complete and result.signed == n, result
    return n / elapsed


def compare(base: Path, *, rounds: int, n: int, latency: float) -> dict[str, dict[str, float]]:
    """Both trees, interleaved, each round in a fresh process of that tree."""
    rates: dict[str, dict[str, list[float]]] = {"base": {}, "ours": {}}
    for _ in range(rounds):
        for name, tree in (("base", base), ("ours", HERE)):
            proc = subprocess.run(
                [sys.executable, "-m", "bench.bench_card", "--rounds", "1", "--n", str(n),
                 "--latency", str(latency)],
                cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True, text=True, check=True, timeout=3600,
            )  # fmt: skip
            for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                rates[name].setdefault(k, []).append(v)
    out: dict[str, dict[str, float]] = {}
    for name, by_key in rates.items():
        raw = next(v for k, v in by_key.items() if k.startswith("card_raw_sign"))
        batch = next(v for k, v in by_key.items() if k.startswith("local_batch"))
        out[name] = {k: statistics.median(v) for k, v in by_key.items()}
        out[name]["batch_to_raw"] = statistics.median(
            b / r for b, r in zip(batch, raw, strict=True)
        )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare", type=Path, default=None, metavar="BASE")
    a = p.parse_args()
    if a.compare is not None:
        result = compare(a.compare, rounds=a.rounds, n=a.n, latency=a.latency)
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(run(rounds=a.rounds, raw_n=a.n, batch_n=a.n, latency=a.latency)))
