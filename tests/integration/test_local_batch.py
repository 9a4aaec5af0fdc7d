"""``hpki-gateway local sign-batch`` as a real subprocess over real pcscd + vpcd: Ctrl-C in the
middle of a batch and the re-run that completes it, and memory that does not grow with the
number of files."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import load_settings
from gateway.local.batch import sign_batch
from gateway.local.credential import CardCertificateExpired
from gateway.local.setup import build_local_agent
from gateway.vcard.hpki import HPKI_PIN_TRIES
from gateway.verify import verify_document
from tests.support.gateway import CLI, REPO
from tests.support.local import CardWorld, last_json, sign_batch_cli
from tests.support.local import write_prescriptions as write_inputs
from tests.support.pcsc import PcscWorld

PIN = "271828"


def _start(pcsc: PcscWorld, cfg: Path, src: Path, out: Path) -> subprocess.Popen[str]:
    """The batch as a running subprocess, the PIN on its standard input (a file)."""
    pin_file = src.parent / f".pin-{src.name}"
    pin_file.write_text(PIN + "\n")
    with pin_file.open("rb") as stdin:
        return subprocess.Popen(
            [*CLI, "local", "sign-batch", str(src), "--out", str(out), "--pin-stdin", "--json",
             "-c", str(cfg)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=pcsc.env(), cwd=REPO, text=True,
        )  # fmt: skip


def _report(out: Path) -> tuple[dict[str, set[str]], dict[str, Any]]:
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    by_status: dict[str, set[str]] = {}
    for f in report["files"]:
        by_status.setdefault(f["status"], set()).add(f["file"])
    return by_status, report["summary"]


def test_ctrl_c_mid_batch_then_the_rerun_completes_it(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    card = card_world.card(pin=PIN)
    card.applet.sign_delay = 0.02  # a card slow enough that Ctrl-C lands mid-batch
    hpki_slot.insert(card.applet)
    src, out = tmp_path / "in", tmp_path / "out"
    names = write_inputs(src, 200)
    cfg = card_world.config(reader=hpki_slot.name)
    proc = _start(pcsc, cfg, src, out)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.xml"))) < 10:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the batch never started signing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and PIN not in stdout + stderr
    summary = last_json(stdout)
    assert summary["stopped"] == "interrupted" and summary["complete"] is False

    # The report is written and tells exactly what happened: every file once, signed or not.
    status, report_summary = _report(out)
    signed_first = status.pop("signed")
    left = status.pop("not_signed")
    assert status == {} and signed_first.isdisjoint(left) and signed_first | left == set(names)
    assert report_summary["stopped"] == "interrupted"
    assert 10 <= len(signed_first) < len(names)
    # Atomic outputs: one complete, valid document per signed file, no temporary left, and
    # every signature the card made is in an output (the documents in flight were finished).
    outputs = {p.name for p in out.glob("*.xml")}
    assert outputs == {n.replace(".csv", ".xml") for n in signed_first}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert card.applet.signatures == len(signed_first)
    first = {name: (out / name).read_bytes() for name in outputs}
    trust = card_world.trust()
    for name, data in first.items():
        rep = asyncio.run(verify_document(data, trust=trust))
        assert rep.indication == "TOTAL-PASSED", (name, rep.reason)
    res = card_world.xmlsec(out / sorted(outputs)[-1])
    assert res.returncode == 0, res.stderr

    # The same command again: what was signed is skipped, the rest signed, nothing twice.
    card.applet.sign_delay = 0.0
    res2 = sign_batch_cli(pcsc.env(), cfg, src, out, PIN)
    assert res2.returncode == 0, res2.stderr
    status, report_summary = _report(out)
    assert status.pop("skipped") == signed_first
    assert status.pop("signed") == set(names) - signed_first
    assert status == {} and report_summary["complete"] is True
    assert card.applet.signatures == len(names)  # one signature per file, over both runs
    assert sorted(p.name for p in out.glob("*.xml")) == [n.replace(".csv", ".xml") for n in names]
    for name, data in first.items():  # earlier outputs untouched
        assert (out / name).read_bytes() == data
    for name in sorted(set(names) - signed_first)[:20]:
        data = (out / name.replace(".csv", ".xml")).read_bytes()
        rep = asyncio.run(verify_document(data, trust=trust))
        assert rep.indication == "TOTAL-PASSED", (name, rep.reason)


def _run_measured(
    pcsc: PcscWorld, cfg: Path, src: Path, out: Path, *, count: bool = True
) -> tuple[subprocess.CompletedProcess[str], int, list[tuple[int, int]]]:
    """Run the batch; its peak RSS (VmHWM, kB) and, with ``count``, (outputs written, VmRSS
    kB) samples."""
    proc = _start(pcsc, cfg, src, out)
    status = Path(f"/proc/{proc.pid}/status")
    peak, samples = 0, []
    while proc.poll() is None:
        try:
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
            )
        except (OSError, ValueError):  # the process ended between poll() and the read
            break
        if "VmHWM" in fields:
            peak = max(peak, int(fields["VmHWM"].split()[0]))
            if count:
                done = sum(1 for _ in out.glob("*.xml")) if out.is_dir() else 0
                samples.append((done, int(fields["VmRSS"].split()[0])))
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), peak, samples


def test_memory_does_not_grow_with_the_number_of_files(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    """What this proves, exactly (the suite cannot afford 10,000 card signatures):

    1. Files: peak RSS of a batch over 10,000 files (9,000 signed by an earlier run, 1,000 to
       sign) stays within 4 MB of the peak over 1,000 files (all to sign). Listing, skipping
       and reporting keep nothing per file: keeping even ~450 bytes per file (a report row as a
       dict, the documents' names with their outputs) would exceed it.
    2. Signatures: within the 1,000-file run, RSS after 900+ documents is within 4 MB of RSS
       after ~300: nothing of a signed document is retained (a leak of ~6 kB per document, a
       fraction of one signed e-prescription, would exceed it).
    """
    card = card_world.card(pin=PIN)
    hpki_slot.insert(card.applet)
    cfg = card_world.config(reader=hpki_slot.name)

    small_in, small_out = tmp_path / "in-1000", tmp_path / "out-1000"
    write_inputs(small_in, 1000)
    res, peak_small, samples = _run_measured(pcsc, cfg, small_in, small_out)
    assert res.returncode == 0, res.stderr
    assert last_json(res.stdout)["signed"] == 1000

    big_in, big_out = tmp_path / "in-10000", tmp_path / "out-10000"
    names = write_inputs(big_in, 10_000)
    big_out.mkdir()
    for name in names[:9000]:  # done by an earlier run: only their existence matters
        (big_out / name.replace(".csv", ".xml")).write_bytes(b"<signed/>")
    signed_before = card.applet.signatures
    res, peak_big, _ = _run_measured(pcsc, cfg, big_in, big_out, count=False)
    assert res.returncode == 0, res.stderr
    summary = last_json(res.stdout)
    assert (summary["files"], summary["skipped"], summary["signed"]) == (10_000, 9000, 1000)
    assert card.applet.signatures - signed_before == 1000
    rows = (big_out / "report.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 10_001  # every file reported

    shutil.rmtree(big_in)  # 19,000 small files: not kept in pytest's temporary directories
    shutil.rmtree(big_out)
    assert peak_big - peak_small < 4096, (peak_small, peak_big)
    early = [rss for done, rss in samples if 250 <= done <= 400]
    late = [rss for done, rss in samples if done >= 900]
    assert early and late, samples  # sampled in both windows
    assert max(late) - max(early) < 4096, (max(early), max(late))


def test_the_batch_takes_its_time_from_the_injected_clock(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    card = card_world.card(pin=PIN)
    hpki_slot.insert(card.applet)
    src, out = tmp_path / "in", tmp_path / "out"
    write_inputs(src, 3)
    settings = load_settings(card_world.config(reader=hpki_slot.name), environ={})
    moment = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).replace(microsecond=0)

    async def run() -> Any:
        agent = build_local_agent(settings, clock=lambda: moment)
        try:
            return await sign_batch(agent, src, out, pin=lambda: bytearray(PIN.encode()))
        finally:
            await agent.close()

    assert asyncio.run(run()).complete
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert {f["time"] for f in report["files"]} == {moment.isoformat()}
    for path in out.glob("*.xml"):  # the signing time is the clock's too
        root = etree.fromstring(path.read_bytes())
        (when,) = root.iter("{http://uri.etsi.org/01903/v1.3.2#}SigningTime")
        assert dt.datetime.fromisoformat(when.text or "") == moment
    # A clock past the card's validity: refused before the PIN, nothing signed.
    late = card_world.card(pin=PIN, validity_days=30)
    hpki_slot.insert(late.applet)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=45)

    async def run_late() -> Any:
        agent = build_local_agent(settings, clock=lambda: later)
        try:
            return await sign_batch(agent, src, tmp_path / "late", pin=lambda: bytearray(b"0000"))
        finally:
            await agent.close()

    with pytest.raises(CardCertificateExpired):
        asyncio.run(run_late())
    assert late.applet.tries_left == HPKI_PIN_TRIES and late.applet.signatures == 0
