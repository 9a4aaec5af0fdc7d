"""``hpki-gateway local sign-batch`` as a real subprocess over real pcscd + vpcd: Ctrl-C in the
middle of a batch and the re-run that completes it, and 10,000 files signed in the memory of
1,000."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import load_settings
from gateway.local.batch import sign_batch
from gateway.local.credential import CardCertificateExpired
from gateway.local.setup import build_local_agent
from gateway.sign.eprescription import build_dispensing, build_prescription
from gateway.vcard.hpki import HPKI_PIN_TRIES
from gateway.verify import verify_document
from tests.support.gateway import CLI, REPO
from tests.support.local import PRESCRIPTION_CSV, CardWorld, last_json, sign_batch_cli
from tests.support.local import write_prescriptions as write_inputs
from tests.support.pcsc import PcscWorld

PIN = "271828"
DISPENSING_CSV = "1,薬局コード,1310000022\r\n2,調剤,ロキソニン錠60mg,3錠\r\n".encode()


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


def _doctor_with_inputs(
    card_world: CardWorld, hpki_slot: Any, base: Path, n: int
) -> tuple[Any, Path, Path, Path]:
    """A doctor's card in the reader, its config, and ``n`` CSV prescriptions in
    ``<base>-in`` for ``<base>-out``."""
    doctor = card_world.card(pin=PIN)
    hpki_slot.insert(doctor.applet)
    src, out = base.with_name(base.name + "-in"), base.with_name(base.name + "-out")
    write_inputs(src, n)
    return doctor, card_world.config(reader=hpki_slot.name), src, out


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


def _status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS (kB) of one process; empty once it has ended."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmHWM" not in fields:  # a zombie
        return {}
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}


@dataclass
class Measured:
    res: subprocess.CompletedProcess[str]
    peak: int  # the batch process's peak RSS (VmHWM, kB)
    samples: list[tuple[int, int]]  # (outputs written, the batch process's VmRSS kB)


def _run_measured(pcsc: PcscWorld, cfg: Path, src: Path, out: Path) -> Measured:
    """Run the batch, sampling the memory of its processes every 50 ms."""
    proc = _start(pcsc, cfg, src, out)
    peak = 0
    samples: list[tuple[int, int]] = []
    tick = 0
    while proc.poll() is None:
        main = _status(proc.pid)
        if main:
            peak = max(peak, main["VmHWM"])
        if main and tick % 10 == 0:  # listing 10,000 outputs is not free: every 0.5 s
            done = sum(1 for _ in os.scandir(out)) if out.is_dir() else 0
            samples.append((done, main["VmRSS"]))
        tick += 1
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return Measured(res, peak, samples)


def test_ten_thousand_files_signed_in_constant_memory(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    """10,000 prescriptions signed by the card through ``sign-batch``, in the memory of 1,000.

    1. Files and signatures: the batch process's peak RSS over 10,000 files stays within 4 MB
       of its peak over 1,000 (the batch is one process). Keeping ~450 bytes per file (a
       report row as a dict, a name with its output) would exceed it.
    2. Within the 10,000-file run, RSS after 9,000+ outputs is within 4 MB of RSS after
       ~1,000-2,500: nothing of a signed document is kept (a leak of ~600 bytes per document
       would exceed it).
    """
    card = card_world.card(pin=PIN)
    hpki_slot.insert(card.applet)
    cfg = card_world.config(reader=hpki_slot.name)

    small_in, small_out = tmp_path / "in-1000", tmp_path / "out-1000"
    write_inputs(small_in, 1000)
    small = _run_measured(pcsc, cfg, small_in, small_out)
    assert small.res.returncode == 0, small.res.stderr
    assert last_json(small.res.stdout)["signed"] == 1000
    shutil.rmtree(small_in)
    shutil.rmtree(small_out)

    big_in, big_out = tmp_path / "in-10000", tmp_path / "out-10000"
    names = write_inputs(big_in, 10_000)
    signed_before = card.applet.signatures
    big = _run_measured(pcsc, cfg, big_in, big_out)
    assert big.res.returncode == 0, big.res.stderr
    assert "Traceback" not in big.res.stderr and PIN not in big.res.stdout + big.res.stderr
    summary = last_json(big.res.stdout)
    assert (summary["files"], summary["signed"], summary["complete"]) == (10_000, 10_000, True)
    assert card.applet.signatures - signed_before == 10_000  # one signature per file
    outputs = sorted(p.name for p in big_out.glob("*.xml"))
    assert outputs == [n.replace(".csv", ".xml") for n in names]
    assert not [p.name for p in big_out.iterdir() if p.name.startswith(".")]
    status, report_summary = _report(big_out)
    assert status == {"signed": set(names)} and report_summary["complete"] is True
    rows = list(csv.DictReader((big_out / "report.csv").open(encoding="utf-8")))
    assert len(rows) == 10_000 and {r["status"] for r in rows} == {"signed"}
    assert {r["file"] for r in rows} == set(names)

    # A sample across the run, by our verifier and by xmlsec1.
    trust = card_world.trust()
    for name in outputs[::500]:
        data = (big_out / name).read_bytes()
        rep = asyncio.run(verify_document(data, trust=trust))
        assert rep.indication == "TOTAL-PASSED", (name, rep.reason)
    for name in (outputs[0], outputs[4999], outputs[-1]):
        res = card_world.xmlsec(big_out / name)
        assert res.returncode == 0, (name, res.stderr)

    shutil.rmtree(big_in)  # 20,000 small files: not kept in pytest's temporary directories
    shutil.rmtree(big_out)
    print(f"peak kB: batch {small.peak} -> {big.peak}")
    assert big.peak - small.peak < 4096, (small.peak, big.peak)
    early = [rss for done, rss in big.samples if 1000 <= done <= 2500]
    late = [rss for done, rss in big.samples if done >= 9000]
    assert early and late, big.samples  # sampled in both windows
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


def test_official_xml_and_dispensing_results_in_one_folder_each(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    """Unsigned official XML beside CSV (the doctor's card), an unreadable file reported as
    failed (exit 1, the others signed); then dispensing results around those signed
    prescriptions (the pharmacist's card)."""
    doctor, cfg, src, out = _doctor_with_inputs(card_world, hpki_slot, tmp_path / "rx", 2)
    unsigned = build_prescription(PRESCRIPTION_CSV.format(n=7).encode())
    (src / "official.xml").write_bytes(
        etree.tostring(unsigned, xml_declaration=True, encoding="UTF-8")
    )
    (src / "broken.xml").write_bytes(b"<Document><Other/></Document>")
    res = sign_batch_cli(pcsc.env(), cfg, src, out, PIN)
    assert res.returncode == 1, res.stderr  # a file failed
    status, summary = _report(out)
    assert status == {"signed": {"rx-00000.csv", "rx-00001.csv", "official.xml"},
                      "failed": {"broken.xml"}}  # fmt: skip
    assert (summary["signed"], summary["failed"], summary["complete"]) == (3, 1, False)
    assert doctor.applet.signatures == 3 and not (out / "broken.xml").exists()
    trust = card_world.trust()
    for name in ("official.xml", "rx-00000.xml"):
        res_x = card_world.xmlsec(out / name)
        assert res_x.returncode == 0, (name, res_x.stderr)
        rep = asyncio.run(verify_document((out / name).read_bytes(), trust=trust))
        assert rep.indication == "TOTAL-PASSED", (name, rep.reason)

    pharmacist = card_world.card(pin=PIN, role="Pharmacist")
    hpki_slot.insert(pharmacist.applet)
    d_src, d_out = tmp_path / "disp-in", tmp_path / "disp-out"
    d_src.mkdir()
    for name in ("official.xml", "rx-00001.xml"):
        prescription = etree.parse(str(out / name))
        dispensing = build_dispensing(DISPENSING_CSV, prescription=prescription)
        (d_src / f"disp-{name}").write_bytes(
            etree.tostring(dispensing, xml_declaration=True, encoding="UTF-8")
        )
    res = sign_batch_cli(pcsc.env(), cfg, d_src, d_out, PIN)
    assert res.returncode == 0, res.stderr
    status, summary = _report(d_out)
    assert status == {"signed": {"disp-official.xml", "disp-rx-00001.xml"}} and summary["complete"]
    assert pharmacist.applet.signatures == 2
    for name in ("disp-official.xml", "disp-rx-00001.xml"):
        res_x = card_world.xmlsec(d_out / name, "DispensingSign")
        assert res_x.returncode == 0, (name, res_x.stderr)
        rep = asyncio.run(verify_document((d_out / name).read_bytes(), trust=trust))
        assert rep.indication == "TOTAL-PASSED", (name, rep.reason)
        assert {s.document_type for s in rep.signatures} == {"prescription", "dispensing"}


def test_an_output_that_cannot_be_written_fails_alone_and_a_rerun_signs_it(
    pcsc: PcscWorld, card_world: CardWorld, hpki_slot: Any, tmp_path: Path
) -> None:
    """A file system that refuses one output (here: a file-size limit the large one passes,
    EFBIG, as a full disk refuses): that file is reported failed with the reason, no partial
    output or temporary file is left, the others are signed and durable, exit 1; the re-run
    without the limit signs that one file only."""
    doctor, cfg, src, out = _doctor_with_inputs(card_world, hpki_slot, tmp_path / "rx", 3)
    big = build_prescription(PRESCRIPTION_CSV.format(n=9).encode())
    big.getroot().append(etree.Comment(" padding " * 5_000))  # ~45 kB, kept in the signed output
    (src / "big.xml").write_bytes(etree.tostring(big, xml_declaration=True, encoding="UTF-8"))
    res = sign_batch_cli(pcsc.env(), cfg, src, out, PIN, max_file_size=30_000)
    assert res.returncode == 1, res.stderr
    status, summary = _report(out)
    assert status == {"signed": {"rx-00000.csv", "rx-00001.csv", "rx-00002.csv"},
                      "failed": {"big.xml"}}  # fmt: skip
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    (failed,) = [f for f in report["files"] if f["status"] == "failed"]
    assert failed["error"].startswith("cannot write the output:"), failed
    assert (summary["signed"], summary["failed"], summary["complete"]) == (3, 1, False)
    assert sorted(p.name for p in out.iterdir()) == [
        "report.csv", "report.json", "rx-00000.xml", "rx-00001.xml", "rx-00002.xml",
    ]  # fmt: skip
    assert doctor.applet.signatures == 4  # the card signed it; the disk refused it

    res = sign_batch_cli(pcsc.env(), cfg, src, out, PIN)
    assert res.returncode == 0, res.stderr
    status, summary = _report(out)
    assert status == {"signed": {"big.xml"},
                      "skipped": {"rx-00000.csv", "rx-00001.csv", "rx-00002.csv"}}  # fmt: skip
    assert doctor.applet.signatures == 5
    res_x = card_world.xmlsec(out / "big.xml")
    assert res_x.returncode == 0, res_x.stderr
