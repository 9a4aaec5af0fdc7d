"""``hpki-gateway local sign-batch IN --out OUT``: every e-prescription in a folder, one PIN.

Inputs: unsigned official XML (prescription or dispensing result: the document says which) and
prescription CSV files. For each ``IN/<name>`` the signed XML is written to ``OUT/<stem>.xml``
through a temporary file, made durable, and ``os.replace`` (atomic): an output exists only complete,
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
import contextlib
import csv
import ctypes
import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from lxml import etree

from gateway.clock import Clock
from gateway.errors import GatewayError, InvalidRequest
from gateway.files import fsync_dir
from gateway.local.agent import CardSessionEnded, LocalAgent, NoCard
from gateway.sign.eprescription import (
    PROFILES,
    EPrescriptionInput,
    EPrescriptionProfile,
    profile_for_document,
)
from gateway.sign.xades import parse_untrusted
from gateway.signing.core import DocumentJob

#: Documents being built or at the card at once (8 kept the card busier than 4 or 16:
#: docs/performance.md).
PARALLEL = 8
#: At most this many documents per group (one syncfs and one directory fsync each).
GROUP = 64
#: Groups this large are made durable by one syncfs of the file system; smaller ones (a real
#: card's pace: a document every 0.3-1 s) by an fsync of each file, which waits for nothing
#: else on the disk.
SYNCFS_FROM = 8
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
    return os.path.splitext(name)[0] + ".xml"


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

    The event loop gathers each group (what is signed within ``GATHER`` seconds of its first
    document, at most ``GROUP``) and hands it to the thread in one call: the thread wakes once
    per group, not once per document (a wake-up is a system call made while holding the GIL
    that the card's thread is waiting for, and it measured as costly as building the
    document's XML).

    For each group: every document to ``.<name>.tmp``; their data made durable; each renamed
    to its name; one fsync of the directory (the renames on disk); only then is the group
    handed back to the event loop (``written``, one call per group), and only then does the
    report say "signed". A crash before that leaves either no output (the file is signed
    again on the re-run) or a complete one (skipped), never a partial one.

    The data of a group of ``SYNCFS_FROM`` or more is made durable by one ``syncfs`` of the
    output's file system on Linux (:func:`_sync_files`): a file ``fsync`` each costs a system
    call, a wait and a thread hand-over per document, which took more CPU than building the
    document. Smaller groups, or where ``syncfs`` is missing: each file is fsync'ed.
    """

    def __init__(
        self,
        out: Path,
        loop: asyncio.AbstractEventLoop,
        written: Callable[[list[tuple[str, Exception | None]]], None],
    ) -> None:
        self.out = str(out)
        self._loop = loop
        self._written = written
        self._queue: queue.SimpleQueue[list[tuple[str, str, bytes]] | None] = queue.SimpleQueue()
        self._group: list[tuple[str, str, bytes]] = []
        self._flush_at: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name="batch-write", daemon=True)
        self._thread.start()
        self._closing: asyncio.Future[None] | None = None

    def submit(self, key: str, name: str, data: bytes) -> None:
        """Write ``data`` as ``name``; ``written`` is called with ``(key, error)`` later.
        Called in the event loop: the document joins the group being gathered."""
        self._group.append((key, name, data))
        if len(self._group) >= GROUP:
            self.flush()
        elif self._flush_at is None:
            self._flush_at = self._loop.call_later(GATHER, self.flush)

    def flush(self) -> None:
        """Hand the group gathered so far to the thread."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._group:
            group, self._group = self._group, []
            self._queue.put(group)

    def close(self) -> None:
        """Write what was handed over, then end the thread (every group reported before).
        Blocking: from the event loop, :meth:`aclose`."""
        self._queue.put(None)
        self._thread.join()

    async def aclose(self) -> None:
        """The gathered group handed over, then :meth:`close`, once however often called:
        when it returns, the thread has ended and every group it wrote has been reported
        (its last ``written`` call is queued to the loop before the join's answer).
        Shielded: a cancelled batch still waits for the documents the card has signed."""
        if self._closing is None:
            self.flush()
            self._closing = asyncio.ensure_future(asyncio.to_thread(self.close))
        cancelled = False
        while not self._closing.done():
            try:
                await asyncio.shield(self._closing)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _run(self) -> None:
        while (group := self._queue.get()) is not None:
            try:
                done = self._commit(group)
            except Exception as e:  # noqa: BLE001 - reported per file; the batch must not hang
                done = [(key, e) for key, _, _ in group]
            self._loop.call_soon_threadsafe(self._written, done)

    def _commit(self, group: list[tuple[str, str, bytes]]) -> list[tuple[str, Exception | None]]:
        errors: dict[str, Exception] = {}
        tmps: list[tuple[str, str, str]] = []  # (key, temporary path, final path)
        whole_fs = _syncfs is not None and len(group) >= SYNCFS_FROM
        for key, name, data in group:
            tmp = f"{self.out}/.{name}.tmp"
            try:
                _write_file(tmp, data, fsync=not whole_fs)
            except OSError as e:
                errors[key] = e
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            else:
                tmps.append((key, tmp, f"{self.out}/{name}"))
        if tmps:
            try:
                if whole_fs:
                    _sync_files(self.out)
                for key, tmp, final in tmps:
                    try:
                        os.replace(tmp, final)
                    except OSError as e:
                        errors[key] = e
                fsync_dir(self.out)
            except OSError as e:
                for key, _, _ in tmps:
                    errors.setdefault(key, e)
        return [(key, errors.get(key)) for key, _, _ in group]


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs`` (Linux; Python's ``os`` has no binding: ctypes, not hand-written I/O)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


_syncfs = _load_syncfs()


def _write_file(path: str, data: bytes, *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _sync_files(directory: str) -> None:
    """Every file written so far under ``directory``'s file system on disk (``syncfs``)."""
    assert _syncfs is not None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
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
    # The card process starts while the folder is surveyed (it is needed only when a file is
    # pending; if it cannot start, opening the card below says why).
    starting = asyncio.ensure_future(agent.store.start())
    try:
        found = await asyncio.to_thread(survey, src, out, level)
    finally:
        with contextlib.suppress(Exception):
            await starting
    result = BatchResult(files=found.files)
    stop = stop or asyncio.Event()
    report = _Report(out, agent.clock)
    signer = ""
    # Signed documents handed to the writer and not yet reported, bounded by WRITERS.
    slots = asyncio.Semaphore(WRITERS)

    def written(group: list[tuple[str, Exception | None]]) -> None:
        for name, error in group:
            if error is not None:
                result.failed += 1
                report.row(name, "failed", signer, f"cannot write the output: {error}")
            else:
                result.signed += 1
                report.row(name, "signed", signer)
            slots.release()
        advance()

    writer = _GroupWriter(out, asyncio.get_running_loop(), written)

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

        src_dir, out_dir = str(src), str(out)

        def take() -> tuple[str, bytes] | None:
            """The next pending file, read; skipped ones reported."""
            for name in names:
                if os.path.exists(f"{out_dir}/{output_name(name)}"):
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
                    with open(f"{src_dir}/{name}", "rb", buffering=0) as f:
                        return name, f.readall()
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
                # Written by the writer thread, not awaited here (the worker goes on to the
                # next document); once the card has signed, the output and its report row
                # are written before the report closes, even when the batch is cancelled.
                await slots.acquire()
                writer.submit(name, output_name(name), doc)

        await asyncio.gather(*(worker() for _ in range(PARALLEL)))
        await writer.aclose()
        if result.not_done and result.stopped is None:
            result.stopped = "interrupted"  # stop was set from outside (Ctrl-C)
        return result
    except asyncio.CancelledError:
        result.stopped = result.stopped or "interrupted"
        raise
    finally:
        # Documents already signed by the card: on disk and reported before the report closes
        # (the writer hands each group to the loop before its thread ends).
        await writer.aclose()
        done = result.skipped + result.signed + result.failed + result.not_done
        result.not_done += max(0, result.files - done)
        with contextlib.suppress(OSError):
            report.close(result.summary())
