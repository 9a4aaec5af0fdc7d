"""HPKI card rates through real pcscd + vpcd (run as its own process: libpcsclite reads
``PCSCLITE_CSOCK_NAME`` once, and this benchmark starts its private pcscd).

card_raw_sign_per_s   MSE + PSO round trips through pcscd to the virtual card (PIN verified):
                      a plain loop of blocking calls on one thread of a process that does
                      nothing else, the fastest this card is driven from Python
local_batch_per_s     e-prescriptions per second through ``sign-batch`` (CSV -> signed XML),
                      start to end (card process start, card session, PIN included)
local_batch_steady_per_s  the same between the first and the last group written
local_batch_cpu_ms_per_doc        CPU of the batch process per document (all its threads)
local_batch_tree_cpu_ms_per_doc   CPU of every process per document: the batch, what it
                                  started, the card, pcscd
card_raw_sign_tree_cpu_ms         the same for one raw signature
Interleaved rounds, medians. With ``--latency S`` the virtual card sleeps S seconds per
signature, like a real card (~0.3-1 s), to show what the overlap buys.

The virtual card runs in a process of its own, as a real card is a device of its own: in the
measured process its Python code would hold the GIL the batch needs (and stall behind it),
which says nothing about a card.

``--compare BASE`` measures another checkout of the project (BASE: its root) against this one
with this harness, interleaved (base, ours, base, ours, ...), one process per round each, and
prints both medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
#: Parent of the batch folders (see ``_scratch``).
SCRATCH = HERE / "bench" / ".scratch"


def _scratch() -> Path:
    """A parent for the batch's input and output folders whose subdirectories ext4 places in
    fresh block groups (the TOPDIR attribute, ``chattr +T``; best effort, other file systems
    ignore it).

    Why: /tmp on this machine is churned by the test suite and the other benchmarks (tens of
    thousands of files created and deleted within minutes), and ext4 then spends ~0.6-0.8 ms of
    kernel CPU per new file skipping recently deleted inodes (measured: 574-772 us per file
    created in such a directory, 23-30 us in a fresh block group). A batch writes two files per
    document; a doctor's folder is not in that state, so the batch's folders are kept out of it.
    """
    SCRATCH.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):  # no chattr (e2fsprogs): the folders go as they may
        subprocess.run(["chattr", "+T", str(SCRATCH)], capture_output=True, check=False)
    return SCRATCH


def _raw(store: object, n: int) -> float:
    """Signatures per second of a blocking loop (no event loop, no thread hand-over)."""
    from gateway.hsm.api import DigestAlgorithm
    from gateway.hsm.card import CardKeyStore
    from gateway.hsm.encoding import digest_info

    assert isinstance(store, CardKeyStore)
    # --compare runs this harness on older trees too, whose store has no public blocking call.
    sign = getattr(store, "sign_infos_blocking", None) or store._sign_blocking
    infos = [
        digest_info(hashlib.sha256(os.urandom(8)).digest(), DigestAlgorithm.SHA256)
        for _ in range(n)
    ]
    t = time.perf_counter()
    for info in infos:
        sign([info])
    return n / (time.perf_counter() - t)


_TICK = os.sysconf("SC_CLK_TCK")


def _descendants(roots: set[int]) -> set[int]:
    """``roots`` and every live process below them (children listed by the kernel)."""
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return seen


def tree_cpu(roots: set[int]) -> dict[tuple[int, str, str], float]:
    """CPU seconds of each process of the trees under ``roots``, keyed by (pid, start time,
    command line): user + system of the process itself and of the children it has reaped
    (workers that ended are counted with the process that reaped them, e.g. a forkserver)."""
    out: dict[tuple[int, str, str], float] = {}
    for pid in _descendants(roots):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state is fields[0]; utime, stime, cutime, cstime are 14-17 (1-based).
        ticks = sum(int(x) for x in fields[11:15])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                what = f.read().replace(b"\0", b" ")[:60].decode(errors="replace")
        except OSError:
            what = "?"
        out[(pid, fields[19], what)] = ticks / _TICK
    return out


def _card_process(
    pcscd_pid: int, name: str, key_pem: bytes, cert_der: bytes, pin: str, latency: float, conn: Any
) -> None:
    """Serve the virtual card in vpcd slot 0 until told to stop."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.vcard.hpki import HpkiApplet
    from gateway.vcard.pcscd import VPCD_PORT, connect_in_netns
    from gateway.vcard.vpcd import VirtualReader

    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    applet = HpkiApplet(key=key, cert_der=cert_der, pin=pin, sign_delay=latency)
    reader = VirtualReader(name=name, connect=lambda: connect_in_netns(pcscd_pid, VPCD_PORT))
    reader.insert(applet)
    conn.send("inserted")
    conn.recv()
    reader.remove()


def run(
    rounds: int = 3, raw_n: int = 1000, batch_n: int = 1000, latency: float = 0.0
) -> dict[str, float]:
    from cryptography.hazmat.primitives import serialization

    from gateway.config import load_settings
    from gateway.vcard.pcscd import start_pcscd
    from tests.support.local import make_card_world

    with (
        tempfile.TemporaryDirectory(prefix="hpki-card-bench-") as tmp,
        tempfile.TemporaryDirectory(prefix="batch-", dir=_scratch()) as folders,
    ):
        base = Path(tmp)
        inst = start_pcscd(base / "pcscd")
        os.environ["PCSCLITE_CSOCK_NAME"] = str(inst.socket_path)
        name = inst.reader_names[0]
        world = make_card_world(base / "world")
        card = world.card(pin="123456")
        key_pem = card.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_der = card.cert.public_bytes(serialization.Encoding.DER)
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=_card_process,
            args=(inst.pid, name, key_pem, cert_der, "123456", latency, theirs),
            daemon=True,
        )
        proc.start()
        try:
            assert ours.recv() == "inserted"
            settings = load_settings(world.config(reader=name), environ={})
            raw_rates, batch_rates, batch_cpu, tree, raw_tree, steady = [], [], [], [], [], []
            roots = {os.getpid(), inst.pid}
            for r in range(rounds):
                raw_rate, raw_spent = asyncio.run(_raw_round(settings, raw_n, roots))
                raw_rates.append(raw_rate)
                raw_tree.append(raw_spent)
                rate, cpu, spent, flow = asyncio.run(
                    _batch_round(settings, Path(folders), r, batch_n, roots)
                )
                batch_rates.append(rate)
                steady.append(flow)
                batch_cpu.append(cpu)
                tree.append(spent)
            suffix = "" if not latency else f"_latency_{int(latency * 1000)}ms"
            return {
                f"card_raw_sign{suffix}_per_s": statistics.median(raw_rates),
                f"card_raw_sign{suffix}_tree_cpu_ms": statistics.median(raw_tree),
                f"local_batch{suffix}_per_s": statistics.median(batch_rates),
                f"local_batch{suffix}_steady_per_s": statistics.median(steady),
                f"local_batch{suffix}_cpu_ms_per_doc": statistics.median(batch_cpu),
                f"local_batch{suffix}_tree_cpu_ms_per_doc": statistics.median(tree),
            }
        finally:
            ours.send("stop")
            proc.join(30)
            inst.stop()


async def _raw_round(settings: object, n: int, roots: set[int]) -> tuple[float, float]:
    from gateway.config import Settings
    from gateway.local.setup import card_store

    assert isinstance(settings, Settings)
    try:
        store = card_store(settings, process=False)  # the bare card: no process in between
    except TypeError:  # an older tree (--compare): its only card store is in-process
        store = card_store(settings)
    await store.open()
    try:
        await store.unlock(bytearray(b"123456"))
        assert store.key_id is not None
        before = tree_cpu(roots)
        rate = _raw(store, n)
        after = tree_cpu(roots)
        return rate, sum(v - before.get(k, 0.0) for k, v in after.items()) * 1000 / n
    finally:
        await store.close()


async def _batch_round(
    settings: object, base: Path, r: int, n: int, roots: set[int]
) -> tuple[float, float, float, float]:
    """Documents per second; the batch process's CPU milliseconds per document (all its
    threads; the card process, the card and pcscd are other processes); the CPU milliseconds
    per document of every process under ``roots``; documents per second between the first
    and the last group written (the steady state: without the start — card process, card
    session, PIN — and the end — the last group's sync, the reports). The CPU figures hold up
    under load far better than the rates do."""
    from gateway.config import Settings
    from gateway.local.batch import sign_batch
    from gateway.local.setup import build_local_agent
    from tests.support.local import write_prescriptions

    assert isinstance(settings, Settings)
    src, out = base / f"in{r}", base / f"out{r}"
    write_prescriptions(src, n)
    agent = build_local_agent(settings)
    marks: list[tuple[float, int]] = []

    def progress(done: int, total: int) -> None:
        if done:
            marks.append((time.perf_counter(), done))

    try:
        before = tree_cpu(roots)
        t, cpu = time.perf_counter(), time.process_time()
        result = await sign_batch(
            agent, src, out, pin=lambda: bytearray(b"123456"), progress=progress
        )
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
        after = tree_cpu(roots)
    finally:
        await agent.close()
    assert result.complete and result.signed == n, result
    spent = 0.0
    for k, v in sorted(after.items()):
        if v - before.get(k, 0.0) > 0:
            spent += v - before.get(k, 0.0)
            ms = (v - before.get(k, 0.0)) * 1000 / n
            print(f"  {k[0]:>7} {ms:6.3f} ms/doc  {k[2]}", file=sys.stderr)
    (t1, d1), (t2, d2) = marks[0], marks[-1]
    return n / elapsed, cpu * 1000 / n, spent * 1000 / n, (d2 - d1) / (t2 - t1)


def compare(
    base: Path, *, rounds: int, n: int, latency: float, per_process: int = 1
) -> dict[str, Any]:
    """Both trees, interleaved, each round in a fresh process of that tree (which measures
    ``per_process`` rounds and reports their medians: 1 is a cold start every time)."""
    rates: dict[str, dict[str, list[float]]] = {"base": {}, "ours": {}}
    for _ in range(rounds):
        for name, tree in (("base", base), ("ours", HERE)):
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--rounds", str(per_process),
                 "--n", str(n), "--latency", str(latency)],
                cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True, text=True, check=True, timeout=3600,
            )  # fmt: skip
            for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                rates[name].setdefault(k, []).append(v)
    out: dict[str, Any] = {"rounds": rates}
    for name, by_key in rates.items():
        raw = next(v for k, v in by_key.items() if k.startswith("card_raw_sign"))
        batch = next(v for k, v in by_key.items() if k.endswith("_per_s") and "batch" in k)
        out[name] = {k: statistics.median(v) for k, v in by_key.items()}
        out[name]["batch_to_raw"] = statistics.median(
            b / r for b, r in zip(batch, raw, strict=True)
        )
    return out


if __name__ == "__main__":
    sys.path.append(str(HERE))  # run as a file: this tree, after any PYTHONPATH (--compare)
    p = argparse.ArgumentParser()
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare", type=Path, default=None, metavar="BASE")
    p.add_argument("--per-process", type=int, default=1, help="rounds per process (--compare)")
    a = p.parse_args()
    if a.compare is not None:
        result = compare(
            a.compare, rounds=a.rounds, n=a.n, latency=a.latency, per_process=a.per_process
        )
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(run(rounds=a.rounds, raw_n=a.n, batch_n=a.n, latency=a.latency)))
