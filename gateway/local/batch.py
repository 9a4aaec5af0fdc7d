"""``hpki-gateway local sign-batch IN --out OUT``: every e-prescription in a folder, one PIN.

Inputs: unsigned official XML (prescription or dispensing result: the document says which) and
prescription CSV files, in name order. For each ``IN/<name>`` the signed XML is written to
``OUT/<stem>.xml`` through a temporary file and ``os.replace`` (atomic): an output exists only
complete, and an existing output means "done" — a re-run after Ctrl-C or a pulled card skips
it, so nothing is signed twice or lost. The card's certificate is checked (profile, path,
validity, the role for the first pending document's type) before the PIN is asked for.

Memory stays flat for any number of files: names are streamed from the directory listing (only
the names are sorted), at most ``PARALLEL`` documents are in flight (building the next document
overlaps the card's round trip for the previous one), and both reports are written row by row:
``OUT/report.csv`` and ``OUT/report.json`` (file, status, signer, time, error).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lxml import etree

from gateway.errors import GatewayError
from gateway.local.agent import CardSessionEnded, DocumentJob, LocalAgent, NoCard
from gateway.sign.eprescription import PROFILES, EPrescriptionInput, profile_for_document
from gateway.sign.xades import parse_untrusted

PARALLEL = 3
SUFFIXES = (".xml", ".csv")
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"


@dataclass
class BatchResult:
    signed: int = 0
    skipped: int = 0  # signed by an earlier run
    failed: int = 0
    not_done: int = 0  # left for a re-run (card pulled, interrupted)
    stopped: str | None = None  # why the batch stopped early
    files: int = 0

    @property
    def complete(self) -> bool:
        return self.failed == 0 and self.not_done == 0 and self.stopped is None


@dataclass
class _Report:
    out: Path
    _csv: IO[str] = field(init=False)
    _json: IO[str] = field(init=False)
    _writer: Any = field(init=False)
    _first: bool = True

    def __post_init__(self) -> None:
        self._csv = (self.out / f".{REPORT_CSV}.tmp").open("w", encoding="utf-8", newline="")
        self._writer = csv.writer(self._csv)
        self._writer.writerow(["file", "status", "signer", "time", "error"])
        self._json = (self.out / f".{REPORT_JSON}.tmp").open("w", encoding="utf-8")
        self._json.write('{"files": [\n')

    def row(self, file: str, status: str, signer: str, error: str = "") -> None:
        when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._writer.writerow([file, status, signer, when, error])
        entry = {"file": file, "status": status, "signer": signer, "time": when, "error": error}
        self._json.write(("" if self._first else ",\n") + json.dumps(entry, ensure_ascii=False))
        self._first = False

    def close(self, summary: dict[str, Any]) -> None:
        self._json.write('\n], "summary": ' + json.dumps(summary) + "}\n")
        for f, name in ((self._csv, REPORT_CSV), (self._json, REPORT_JSON)):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.out / f".{name}.tmp", self.out / name)


def input_names(src: Path) -> list[str]:
    """The input file names, sorted (names only: the documents are read one at a time)."""
    names = [
        e.name
        for e in os.scandir(src)
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(SUFFIXES)
    ]
    names.sort()
    return names


def output_name(name: str) -> str:
    return Path(name).stem + ".xml"


def job_for(data: bytes, name: str, *, level: str, max_depth: int = 64) -> tuple[DocumentJob, str]:
    """The signDoc job for one input and its document type (prescription / dispensing)."""
    if name.lower().endswith(".csv"):
        profile = PROFILES["jp-eprescription"]
    else:
        root = parse_untrusted(data, max_depth=max_depth, what=name).getroot()
        found = profile_for_document(root)
        if found is None:
            raise GatewayError(f"{name} is neither a prescription nor a dispensing document")
        profile = found
    job = DocumentJob(
        digest=hashlib.sha256(data).digest(),
        signature_format="X",
        conformance_level=level,
        envelope="Enveloped",
        document=data,
        profile=profile.name,
        eprescription_input=EPrescriptionInput(),
    )
    return job, profile.document_type


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def first_document_type(src: Path, names: list[str], out: Path, level: str) -> str | None:
    for name in names:
        if (out / output_name(name)).exists():
            continue
        try:
            return job_for((src / name).read_bytes(), name, level=level)[1]
        except (GatewayError, etree.LxmlError, OSError):
            continue
    return None


async def sign_batch(
    agent: LocalAgent,
    src: Path,
    out: Path,
    *,
    pin: Callable[[], bytearray],
    level: str = "AdES-B-B",
    progress: Callable[[int, int], None] | None = None,
    names: list[str] | None = None,
) -> BatchResult:
    """Sign every pending file; ``pin`` is called once, after the certificate check."""
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    names = await asyncio.to_thread(input_names, src) if names is None else names
    result = BatchResult(files=len(names))
    pending = [n for n in names if not (out / output_name(n)).exists()]
    result.skipped = len(names) - len(pending)
    report = _Report(out)
    signer = ""
    try:
        for n in names:
            if (out / output_name(n)).exists():
                report.row(n, "skipped", "", "already signed")
        if progress:
            progress(result.skipped, len(names))
        if not pending:
            return result
        credential_id = await agent.ensure_card()
        cert = await agent.store.certificate()
        signer = cert.subject.rfc4514_string()
        doc_type = first_document_type(src, pending, out, level)
        agent.check_certificate(cert, doc_type)  # before the PIN
        sad = await agent.authorize(
            credential_id=credential_id, pin=pin(), num_signatures=len(pending)
        )
        queue: Iterator[str] = iter(pending)
        stop = asyncio.Event()

        async def worker() -> None:
            for name in queue:
                if stop.is_set():
                    result.not_done += 1
                    report.row(name, "not_signed", signer, "the batch stopped before this file")
                    continue
                try:
                    data = await asyncio.to_thread((src / name).read_bytes)
                    job, _ = job_for(data, name, level=level)
                    del data
                    signed = await agent.sign_documents(
                        credential_id=credential_id, sad=sad, jobs=[job]
                    )
                    doc = signed[0].document_with_signature
                    assert doc is not None
                    await asyncio.to_thread(write_atomic, out / output_name(name), doc)
                except (NoCard, CardSessionEnded) as e:
                    stop.set()
                    result.stopped = e.description
                    result.not_done += 1
                    report.row(name, "not_signed", signer, e.description)
                    continue
                except (GatewayError, etree.LxmlError, OSError) as e:
                    result.failed += 1
                    desc = e.description if isinstance(e, GatewayError) else str(e)
                    report.row(name, "failed", signer, desc)
                    continue
                result.signed += 1
                report.row(name, "signed", signer)
                if progress:
                    progress(result.skipped + result.signed + result.failed, len(names))

        try:
            await asyncio.gather(*(worker() for _ in range(PARALLEL)))
        except asyncio.CancelledError:
            result.stopped = "interrupted"
            raise
        return result
    finally:
        done = result.skipped + result.signed + result.failed + result.not_done
        result.not_done += max(0, len(names) - done)
        with contextlib.suppress(OSError):
            report.close(
                {
                    "files": result.files,
                    "signed": result.signed,
                    "skipped": result.skipped,
                    "failed": result.failed,
                    "not_done": result.not_done,
                    "stopped": result.stopped,
                    "complete": result.complete,
                }
            )
