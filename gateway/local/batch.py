"""``hpki-gateway local sign-batch IN --out OUT``: every e-prescription in a folder, one PIN.

Inputs: unsigned official XML (prescription or dispensing result: the document says which) and
prescription CSV files. For each ``IN/<name>`` the signed XML is written to ``OUT/<stem>.xml``
through a temporary file, fsync'ed, and ``os.replace`` (atomic): an output exists only complete,
and an existing output means "done" — a re-run after Ctrl-C or a pulled card skips it, so
nothing is signed twice or lost. Outputs are made durable a group at a time (one directory
fsync per group, :class:`_GroupWriter`) and reported "signed" only then. The card's
certificate is checked (profile, path, validity, the role for the first pending document's
type) before the PIN is asked for.

Ctrl-C (``stop``) is graceful: no new file is started, the documents in flight are finished and
written, the report is closed. Even when the batch is cancelled outright, a document whose
signature was made is still written and reported before the report closes.

Several documents are under way at once: while the card signs one (in the card store's
thread, through pcscd), the next ones are built in the event loop, so building overlaps the
card's round trip.

Memory stays flat for any number of files: the directory is walked lazily twice (once to count
and find the first pending document, once to sign) and never held as a list; a bounded number
of documents is being built or at the card, at most ``WRITERS`` signed ones wait to be
written, and both reports are written row by row: ``OUT/report.csv`` and ``OUT/report.json``
(file, status, signer, time, error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lxml import etree

from gateway.clock import Clock
from gateway.errors import GatewayError, InvalidRequest
from gateway.local.agent import CardSessionEnded, LocalAgent, NoCard
from gateway.sign.eprescription import (
    PROFILES,
    EPrescriptionInput,
    EPrescriptionProfile,
    profile_for_document,
)
from gateway.sign.xades import parse_untrusted
from gateway.signing.core import DocumentJob

#: Documents being built or at the card at once.
PARALLEL = 4
#: At most this many documents per group (one directory fsync each), written and fsync'ed by
#: ``SYNCERS`` threads side by side.
GROUP = 64
SYNCERS = 8
#: Seconds a group waits for more documents after its first.
GATHER = 0.05
#: Signed documents handed to the writer thread and not yet on disk: the bound on signed
#: documents held in memory. The writer makes them durable a group at a time.
WRITERS = 2 * GROUP
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

    def summary(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "signed": self.signed,
            "skipped": self.skipped,
            "failed": self.failed,
            "not_done": self.not_done,
            "stopped": self.stopped,
            "complete": self.complete,
        }


@dataclass
class _Report:
    out: Path
    clock: Clock
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
        when = self.clock().isoformat(timespec="seconds")
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


def iter_inputs(src: Path) -> Iterator[str]:
    """The input file names, lazily, in the directory's own order (never a list in memory)."""
    with os.scandir(src) as entries:
        for e in entries:
            if e.name.startswith(".") or not e.name.lower().endswith(SUFFIXES):
                continue
            if e.is_file():
                yield e.name


def input_names(src: Path) -> list[str]:
    """The input file names, sorted (for callers that want a list; the batch does not)."""
    return sorted(iter_inputs(src))


def output_name(name: str) -> str:
    return Path(name).stem + ".xml"


def profile_of(data: bytes, name: str, *, max_depth: int = 64) -> EPrescriptionProfile:
    """The input's profile: a CSV is a prescription; an XML document says what it is."""
    if name.lower().endswith(".csv"):
        return PROFILES["jp-eprescription"]
    root = parse_untrusted(data, max_depth=max_depth, what=name).getroot()
    found = profile_for_document(root)
    if found is None:
        raise GatewayError(f"{name} is neither a prescription nor a dispensing document")
    return found


def job_for(data: bytes, name: str, *, level: str, max_depth: int = 64) -> tuple[DocumentJob, str]:
    """The signDoc job for one input and its document type (prescription / dispensing)."""
    profile = profile_of(data, name, max_depth=max_depth)
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


@dataclass
class Survey:
    files: int = 0
    pending: int = 0
    first_type: str | None = None  # document type of the first readable pending file


def survey(src: Path, out: Path, level: str) -> Survey:
    """Count the inputs and those still to sign; the first pending document's type."""
    s = Survey()
    for name in iter_inputs(src):
        s.files += 1
        if (out / output_name(name)).exists():
            continue
        s.pending += 1
        if s.first_type is None:
            with contextlib.suppress(GatewayError, etree.LxmlError, OSError):
                s.first_type = job_for((src / name).read_bytes(), name, level=level)[1]
    return s


class _GroupWriter:
    """Writes signed documents durably, a group at a time, in a thread of its own.

    For each group (what has arrived, at most ``GROUP``): every document to ``.<name>.tmp``,
    each fsync'ed (its data on disk), each renamed to its name, then one fsync of the
    directory (the renames on disk); only then is each document's future resolved, and only
    then does the report say "signed". A crash before that leaves either no output (the file
    is signed again on the re-run) or a complete one (skipped), never a partial one. One
    directory fsync per group instead of one per file: the journal commit is the costly part.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._queue: queue.SimpleQueue[tuple[str, bytes, concurrent.futures.Future[None]] | None]
        self._queue = queue.SimpleQueue()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            SYNCERS, thread_name_prefix="batch-fsync"
        )
        self._thread = threading.Thread(target=self._run, name="batch-write", daemon=True)
        self._thread.start()

    def submit(self, name: str, data: bytes) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((name, data, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._pool.shutdown()

    def _run(self) -> None:
        ending = False
        while not ending:
            first = self._queue.get()
            if first is None:
                return
            # Gather a group: what arrives within GATHER seconds of its first document. A
            # group of one costs a directory fsync for one file; the documents of a fast card
            # come every millisecond or so, and the report may wait for them.
            group = [first]
            until = time.monotonic() + GATHER
            while len(group) < GROUP:
                left = until - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    ending = True
                    break
                group.append(item)
            self._commit(group)

    def _commit(self, group: list[tuple[str, bytes, concurrent.futures.Future[None]]]) -> None:
        # The files' fsyncs run side by side: the file system joins them in fewer journal
        # commits (one after the other, each waits for a commit of its own: ~2 ms apiece).
        results = list(self._pool.map(self._write_one, group))
        written = [(name, done) for (name, _, done), ok in zip(group, results, strict=True) if ok]
        if not written:
            return
        try:
            fsync_dir(self.out)
        except OSError as e:
            for _, done in written:
                done.set_exception(e)
        else:
            for _, done in written:
                done.set_result(None)

    def _write_one(self, item: tuple[str, bytes, concurrent.futures.Future[None]]) -> bool:
        name, data, done = item
        tmp = self.out / f".{name}.tmp"
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out / name)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            done.set_exception(e)
            return False
        return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def sign_batch(
    agent: LocalAgent,
    src: Path,
    out: Path,
    *,
    pin: Callable[[], bytearray],
    level: str = "AdES-B-B",
    progress: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> BatchResult:
    """Sign every pending file; ``pin`` is called once, after the certificate check. Setting
    ``stop`` ends the batch after the documents in flight (Ctrl-C)."""
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    if await asyncio.to_thread(os.path.samefile, src, out):
        raise InvalidRequest("the output folder must not be the input folder")
    found = await asyncio.to_thread(survey, src, out, level)
    result = BatchResult(files=found.files)
    stop = stop or asyncio.Event()
    report = _Report(out, agent.clock)
    writes: set[asyncio.Task[None]] = set()
    writer = _GroupWriter(out)
    signer = ""

    def advance() -> None:
        if progress:
            progress(result.skipped + result.signed + result.failed, result.files)

    try:
        if progress:
            progress(0, result.files)
        sad = credential_id = ""
        if found.pending:
            credential_id = await agent.ensure_card()
            cert = await agent.store.certificate()
            signer = cert.subject.rfc4514_string()
            agent.check_certificate(cert, found.first_type)  # before the PIN
            sad = await agent.authorize(
                credential_id=credential_id,
                pin=pin(),
                num_signatures=found.pending,
                max_signatures=found.pending,
                lifetime=math.inf,  # a card at ~1 s a signature takes hours for 10,000 files
            )
        names = iter_inputs(src)
        slots = asyncio.Semaphore(WRITERS)

        async def finish(name: str, doc: bytes) -> None:
            try:
                await asyncio.wrap_future(writer.submit(output_name(name), doc))
            except OSError as e:
                result.failed += 1
                report.row(name, "failed", signer, f"cannot write the output: {e}")
            else:
                result.signed += 1
                report.row(name, "signed", signer)
            finally:
                slots.release()
            advance()

        async def sign_one(name: str, data: bytes) -> bytes | str:
            """The document signed by the card, or why the file failed; card errors raise."""
            try:
                job, _ = job_for(data, name, level=level)
            except GatewayError as e:
                return e.description
            signed = await agent.sign_documents(
                credential_id=credential_id, sad=sad, jobs=[job], probe=False
            )
            doc = signed[0].document_with_signature
            assert doc is not None
            return doc

        def take() -> tuple[str, bytes] | None:
            """The next pending file, read; skipped ones reported."""
            for name in names:
                if (out / output_name(name)).exists():
                    result.skipped += 1
                    report.row(name, "skipped", "", "already signed")
                    advance()
                    continue
                if stop.is_set():
                    result.not_done += 1
                    why = result.stopped or "interrupted"
                    report.row(name, "not_signed", signer, why)
                    continue
                try:
                    return name, (src / name).read_bytes()
                except OSError as e:
                    result.failed += 1
                    report.row(name, "failed", signer, f"{e!r}"[:500])
                    advance()
            return None

        async def worker() -> None:
            while (picked := take()) is not None:
                name, data = picked
                try:
                    doc = await sign_one(name, data)
                except (NoCard, CardSessionEnded) as e:
                    result.stopped = result.stopped or e.description
                    stop.set()
                    result.not_done += 1
                    report.row(name, "not_signed", signer, e.description)
                    continue
                except Exception as e:  # noqa: BLE001 - one bad file must not end the batch
                    doc = e.description if isinstance(e, GatewayError) else f"{e!r}"[:500]
                if isinstance(doc, str):
                    result.failed += 1
                    report.row(name, "failed", signer, doc)
                    advance()
                    continue
                # Written by a task of its own, not awaited here (the worker goes on to the
                # next document) and not cancelled with the batch: once the card has signed,
                # the output and its report row are written before the report closes.
                await slots.acquire()
                task = asyncio.ensure_future(finish(name, doc))
                writes.add(task)
                task.add_done_callback(writes.discard)

        await asyncio.gather(*(worker() for _ in range(PARALLEL)))
        while writes:
            await asyncio.gather(*writes)
        if result.not_done and result.stopped is None:
            result.stopped = "interrupted"  # stop was set from outside (Ctrl-C)
        return result
    except asyncio.CancelledError:
        result.stopped = result.stopped or "interrupted"
        raise
    finally:
        while writes:  # documents already signed by the card: on disk before the report closes
            await asyncio.gather(*writes, return_exceptions=True)
        await asyncio.to_thread(writer.close)
        done = result.skipped + result.signed + result.failed + result.not_done
        result.not_done += max(0, result.files - done)
        with contextlib.suppress(OSError):
            report.close(result.summary())
