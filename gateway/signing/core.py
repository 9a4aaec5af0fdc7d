"""The signing service: spend a SAD, sign with the credential's key, refund, audit.

The one place where a key is used for a signer (cf. step-ca ``authority/tls.go``
``SignWithContext``, which enforces what the provisioner's sign options returned). Every
signing endpoint calls it after decoding and validating its input:

1. ``SadLedger.consume_and_audit`` spends the SAD on exactly the digests of the request and
   commits the audit event (grouped with concurrent requests into one transaction) before the
   key is touched; a refusal comes back already audited.
2. The key is reached through ``hsm.api.KeyStore`` only, wrapped in a ``GrantedKey`` that signs
   nothing outside what was spent: for signHash exactly the spent multiset of digests, for
   signDoc at most one signature per spent document digest (the format code signs digests it
   derives from the document, e.g. CAdES signed attributes).
3. If no signature could be produced (HSM down, TSA down, role not permitted, malformed
   document) the spent count is refunded, the failure audited, and the error raised; nothing
   is returned. So is a request cancelled while its spend waited in the group queue, once
   the group has committed the spend (``_refund_abandoned``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from lxml import etree

from gateway.audit import AuditLog
from gateway.clock import Clock
from gateway.errors import AccessDenied, GatewayError, InvalidRequest, PkiError
from gateway.hsm.api import DigestAlgorithm, KeyHandle, KeyStore, StoreKeyHandle
from gateway.sign import service
from gateway.sign.eprescription import EPrescriptionInput
from gateway.sign.timestamp import Rfc3161Client
from gateway.signing.grant import Caller, SignatureGrant
from gateway.signing.ledger import SadLedger, SignRequest
from gateway.signing.offload import build_off_loop
from gateway.signing.rules import certificate
from gateway.store.db import Database

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.signing")

#: What the format libraries raise on a client's document they cannot process: pyHanko's
#: lookup and recursion errors on a malformed PDF; libxml2's canonicalisation failing on XML
#: within the parse limits (e.g. namespace declarations nested level after level).
#: What the format libraries (pyHanko, lxml) raise on a malformed client document: the input's
#: fault, answered 400 once the count is back (here and in the local agent).
MALFORMED = (KeyError, IndexError, RecursionError, etree.C14NError)
#: XAdES levels built off the event loop: those whose only outside calls are the key and the
#: TSA (both bridged back to the loop by ``offload.build_off_loop``).
_OFF_LOOP_LEVELS = frozenset({"AdES-B-B", "AdES-B-T"})


class OutsideGrant(GatewayError):
    """A digest the grant does not cover reached the key: a bug, never the client's doing."""

    status = 500


class GrantedKey:
    """The credential's key, limited to what one request spent of its grant."""

    __slots__ = ("_digests", "_key", "_left")

    def __init__(
        self, key: KeyHandle, *, budget: int, digests: Sequence[bytes] | None = None
    ) -> None:
        self._key = key
        self._left = budget
        self._digests = Counter(digests) if digests is not None else None

    @property
    def key_id(self) -> str:
        return self._key.key_id

    def _take(self, digests: Sequence[bytes]) -> None:
        if len(digests) > self._left:
            raise OutsideGrant("more signatures than the SAD granted")
        if self._digests is not None:
            wanted = Counter(digests)
            if any(self._digests[d] < k for d, k in wanted.items()):
                raise OutsideGrant("a digest outside the SAD's hashes")
            self._digests.subtract(wanted)
        self._left -= len(digests)

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        self._take([digest])
        return await self._key.sign_digest(digest, algorithm)

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        self._take(digests)
        return await self._key.sign_digests(digests, algorithm)


@dataclass(frozen=True, kw_only=True)
class DocumentJob:
    """One signature to build (sign/service.py ``sign_document``); ``digest`` is what the SAD
    authorizes for it: SHA-256 of ``document`` as sent, or ``document_digest``."""

    digest: bytes
    signature_format: str
    conformance_level: str
    envelope: str | None
    document: bytes | None
    document_digest: bytes | None = None
    profile: str | None = None
    csv_encoding: str = "utf-8"
    #: e-prescription inputs beside the document (ids, additional lines, embedded prescription).
    eprescription_input: EPrescriptionInput | None = None


class SigningService:
    """Spends SADs and signs (see the module docstring)."""

    def __init__(
        self,
        *,
        db: Database,
        audit: AuditLog,
        ledger: SadLedger,
        keystore: KeyStore,
        clock: Clock,
        policy: service.SigningPolicy,
        tsa: Rfc3161Client | None,
    ) -> None:
        self.db = db
        self.audit = audit
        self.ledger = ledger
        self.keystore = keystore
        self.clock = clock
        self.policy = policy
        self.tsa = tsa
        #: Set by the app (gateway/metrics.py): SADs consumed / refused / refunded, signatures.
        self.metrics: Metrics | None = None
        #: Refunds of requests cancelled while their spend was queued (``_spend``).
        self._abandoned: set[asyncio.Task[None]] = set()

    async def refused(
        self, caller: Caller, *, action: str, reason: str, detail: Mapping[str, Any]
    ) -> None:
        """Audit a request refused before it reached the ledger (bad input)."""
        await self.audit.append_alone(
            self.db,
            action=action,
            actor=caller.actor,
            facility_code=caller.institution_code,
            detail={"reason": reason, **detail},
            now=self.clock(),
        )

    # -- signHash ---------------------------------------------------------------------------

    async def sign_hashes(
        self,
        caller: Caller,
        *,
        sad: str,
        credential_id: str,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm,
        refused_detail: Mapping[str, Any],
    ) -> list[bytes]:
        """Spend ``sad`` on ``hashes`` and return their signatures, in order."""
        spent = await self._spend(
            caller,
            sad=sad,
            credential_id=credential_id,
            hashes=hashes,
            algorithm=algorithm,
            action="signature.sign_hash",
            detail=_hash_detail,
            refused_detail=refused_detail,
            failed_detail=_hash_detail,
            now=self.clock(),
        )
        key = GrantedKey(
            StoreKeyHandle(self.keystore, spent.key_id),
            budget=len(spent.hashes),
            digests=spent.hashes,
        )
        try:
            signatures = await key.sign_digests(spent.hashes, spent.algorithm)
        except BaseException as e:
            await self._refund(caller, sad=sad, spent=spent, error=e, detail=_hash_detail(spent))
            raise
        if self.metrics is not None:
            self.metrics.signatures.labels(spent.presence, "hash", "raw").inc(len(signatures))
        return signatures

    # -- signDoc ----------------------------------------------------------------------------

    async def sign_documents(
        self,
        caller: Caller,
        *,
        sad: str,
        credential_id: str,
        jobs: Sequence[DocumentJob],
        refused_detail: Mapping[str, Any],
    ) -> list[service.SignedDocument]:
        """Spend ``sad`` on the jobs' digests, then build every signature (all or none)."""
        try:
            await _inspect(jobs, self.policy)
        except GatewayError as e:
            await self.refused(
                caller,
                action="signature.refused",
                reason=e.description,
                detail={**refused_detail, "method": "signDoc"},
            )
            raise
        now = self.clock()
        spent = await self._spend(
            caller,
            sad=sad,
            credential_id=credential_id,
            hashes=[j.digest for j in jobs],
            algorithm=DigestAlgorithm.SHA256,
            action="signature.sign_doc",
            detail=functools.partial(_document_detail, jobs=jobs),
            refused_detail=refused_detail,
            failed_detail=_doc_failed_detail,
            now=now,
        )
        try:
            # No lookup of its own first: the store looks the key up with each signature
            # (``sign_digests``: KeyNotFound for a missing key, as ``get_key`` says it), and
            # a separate lookup was a second round trip to the signing process per request.
            key = GrantedKey(StoreKeyHandle(self.keystore, spent.key_id), budget=len(jobs))
            chain = _chain(spent)
            results = await service.all_or_none(
                [functools.partial(self._build, j, key=key, chain=chain, now=now) for j in jobs],
                limit=self.policy.parallel_documents,
            )
        except BaseException as e:
            await self._refund(
                caller, sad=sad, spent=spent, error=e, detail=_doc_failed_detail(spent)
            )
            if isinstance(e, MALFORMED):
                # The format libraries (pyHanko, lxml) parse the client's document and fail on
                # a malformed one with lookup or recursion errors of their own: the input's
                # fault, answered as such once the count is back.
                raise InvalidRequest(
                    f"document could not be read ({type(e).__name__}); nothing was signed"
                ) from e
            raise
        if self.metrics is not None:
            for j in jobs:
                self.metrics.signatures.labels(
                    spent.presence, j.signature_format, j.conformance_level
                ).inc()
        return results

    async def _build(
        self, job: DocumentJob, *, key: KeyHandle, chain: list[x509.Certificate], now: datetime
    ) -> service.SignedDocument:
        """One signature. XAdES (the e-prescription and the generic envelopes) of more than
        ``INLINE_BUILD_BYTES`` of input is built on the builder thread (``offload.py``):
        parsing, building and canonicalising a large document is CPU work that must not stop
        the event loop; a small one costs less than the hops there and back. CAdES (a few
        ASN.1 structures over a digest) stays here, as do PAdES and the long-term levels,
        whose format code reaches loop-bound clients (pyHanko's TSA client, CRL downloads)
        directly."""

        def build(k: KeyHandle, tsa: Any) -> Any:
            return service.sign_document(
                key=k,
                chain=chain,
                signature_format=job.signature_format,
                conformance_level=job.conformance_level,
                envelope=job.envelope,
                document=job.document,
                document_digest=job.document_digest,
                profile=job.profile,
                csv_encoding=job.csv_encoding,
                eprescription_input=job.eprescription_input,
                tsa=tsa,
                now=now,
                policy=self.policy,
            )

        if (
            job.signature_format == "X"
            and job.conformance_level in _OFF_LOOP_LEVELS
            and _input_bytes(job) > INLINE_BUILD_BYTES
        ):
            limit = BUILD_SECONDS
            if job.conformance_level != "AdES-B-B" and self.tsa is not None:
                limit += self.tsa.timeout
            try:
                signed: service.SignedDocument = await asyncio.wait_for(
                    build_off_loop(build, key=key, tsa=self.tsa), limit
                )
            except TimeoutError as e:
                # The build is cancelled at its next await and can no longer reach the key.
                raise InvalidRequest(
                    f"document could not be signed within {limit:g} s; nothing was signed"
                ) from e
            return signed
        on_loop: service.SignedDocument = await build(key, self.tsa)
        return on_loop

    # -- shared -----------------------------------------------------------------------------

    async def _spend(
        self,
        caller: Caller,
        *,
        sad: str,
        credential_id: str,
        hashes: Sequence[bytes],
        algorithm: DigestAlgorithm,
        action: str,
        detail: Any,
        refused_detail: Mapping[str, Any],
        failed_detail: Callable[[SignatureGrant], Mapping[str, Any]],
        now: datetime,
    ) -> SignatureGrant:
        if caller.facility_id is None:  # pragma: no cover - the handlers refuse it first
            raise InvalidRequest("CSC methods are for facility client certificates")
        request = SignRequest(
            sad=sad,
            facility_id=caller.facility_id,
            credential_id=credential_id,
            hashes=hashes,
            algorithm=algorithm,
            now=now,
            actor=caller.actor,
            facility_code=caller.institution_code,
            action=action,
            detail=detail,
            refused_detail=refused_detail,
        )
        outcome = self.ledger.submit(request)
        try:
            # Shielded: once queued, the spend commits with its group whether or not this
            # request is still waiting for it.
            spent = await asyncio.shield(outcome)
        except asyncio.CancelledError:
            # The request went away (client gone at shutdown, a cancelled task) with its spend
            # queued or in the database: refund it once committed, so that no count is lost
            # and no signature event stands without the failure that followed it.
            outcome.add_done_callback(
                functools.partial(
                    self._refund_abandoned, caller=caller, sad=sad, detail=failed_detail
                )
            )
            raise
        except (InvalidRequest, AccessDenied):
            if self.metrics is not None:
                self.metrics.sad.labels("refused").inc()
            raise
        if self.metrics is not None:
            self.metrics.sad.labels("consumed").inc(len(spent.hashes))
        return spent

    def _refund_abandoned(
        self,
        outcome: asyncio.Future[SignatureGrant],
        *,
        caller: Caller,
        sad: str,
        detail: Callable[[SignatureGrant], Mapping[str, Any]],
    ) -> None:
        """The spend of a request that went away has its outcome: refund it if it was spent."""
        if outcome.cancelled() or outcome.exception() is not None:
            return  # nothing spent (refused: audited by the group; failed: rolled back)
        spent = outcome.result()
        task = asyncio.get_running_loop().create_task(
            self._write_refund(
                caller, sad=sad, spent=spent, reason="request cancelled", detail=detail(spent)
            )
        )
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned_done)

    def _abandoned_done(self, task: asyncio.Task[None]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("refund of a cancelled request failed: %s", type(task.exception()).__name__)

    async def _refund(
        self,
        caller: Caller,
        *,
        sad: str,
        spent: SignatureGrant,
        error: BaseException,
        detail: Mapping[str, Any],
    ) -> None:
        """Nothing was returned to the client: give the count back to the SAD, record why.

        Runs for any exception after the spend, whatever its type (a library's KeyError or
        RecursionError on a malformed document, a cancelled request): the audit must never
        hold a signature that nobody received without the failure that followed it. The
        write is shielded from cancellation so that a client hanging up cannot stop it.
        """
        if isinstance(error, GatewayError):
            reason = error.description
        elif isinstance(error, asyncio.CancelledError):
            reason = "request cancelled"
        elif type(error) is ValueError:
            reason = str(error)
        else:
            # A library's message may quote the document; its type is enough to find the fault.
            reason = f"internal error ({type(error).__name__})"
        await asyncio.shield(
            self._write_refund(caller, sad=sad, spent=spent, reason=reason, detail=detail)
        )

    async def _write_refund(
        self,
        caller: Caller,
        *,
        sad: str,
        spent: SignatureGrant,
        reason: str,
        detail: Mapping[str, Any],
    ) -> None:
        async with self.db.write() as conn:
            await self.ledger.refund(conn, sad=sad, grant=spent)
            await self.audit.append(
                conn,
                action="signature.failed",
                actor=caller.actor,
                facility_code=caller.institution_code,
                signer_id=spent.signer_id,
                detail={**detail, "reason": reason[:200], "refunded": True},
                now=self.clock(),
            )
        if self.metrics is not None:
            self.metrics.sad.labels("refunded").inc(len(spent.hashes))


def _chain(spent: SignatureGrant) -> list[x509.Certificate]:
    """The credential's certificate, then its issuers, as the spending transaction read them."""
    if spent.certificate_der is None:  # pragma: no cover - the spend requires a certificate
        raise InvalidRequest("Invalid parameter credentialID")
    return list(_parsed_chain(spent.certificate_der, spent.chain_pem))


@functools.lru_cache(maxsize=256)
def _parsed_chain(certificate_der: bytes, chain_pem: str | None) -> tuple[x509.Certificate, ...]:
    """Parsed once per process for the same bytes (keyed by content: a renewed certificate or
    another chain is other bytes, so nothing needs invalidating)."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode()) if chain_pem else []
    except ValueError as e:
        raise PkiError(f"not a PEM certificate bundle: {e}") from e
    return (certificate(certificate_der), *chain)


#: Wall-clock limit for reading a client's documents before the spend (off the event loop).
INSPECT_SECONDS = 10.0
#: Wall-clock limit for building one XAdES signature on the builder thread; at B-T the TSA's
#: own time-out (``timestamp.timeout``) is added, so a slow TSA still answers 503 as before.
BUILD_SECONDS = 60.0

#: XAdES of at most this much input (the document, and beside an e-prescription's CSV the
#: signed prescription and additional code lines) is built on the event loop: a prescription's
#: CSV is ~1-3 KB and takes ~0.3 ms to build, less than the hops to the builder thread and back
#: cost the worker (measured: their thread switches were a third of the builder thread's CPU
#: in a ceremony). Within the untrusted-XML limits (``sign/xades.py``) 8 KiB bounds a build:
#: the worst measured (2,000 empty elements, elements of 250 attributes, namespace declarations
#: nested level after level; each envelope) took under 4 ms, against up to ~30 ms at 16 KiB.
#: Larger input goes to the builder thread with its time limit (``offload.py``).
INLINE_BUILD_BYTES = 8 * 1024


def _input_bytes(job: DocumentJob) -> int:
    """The size of what building ``job`` reads: the document and the e-prescription inputs."""
    n = len(job.document or b"")
    extra = job.eprescription_input
    if extra is not None:
        n += len(extra.prescription or b"")
        n += sum(
            len(line.re_code or "")
            + len(line.yj_code or "")
            + len(line.csv_line_no or "")
            + len(line.dispensing_document_code or "")
            for line in extra.additional
        )
        n += sum(len(k) + len(v) for k, v in extra.extra.items())
        n += len(extra.document_id or "")
    return n


async def _inspect(jobs: Sequence[DocumentJob], policy: service.SigningPolicy) -> None:
    """Read what the format code will read of each document, before any SAD is spent, in a
    thread (parsing a 5 MB document must not stop the event loop) with a time limit: PDFs
    through pyHanko (``pades.inspect_pdf``), generic XML through the untrusted-XML parser and
    its limits. A refusal here spends nothing."""
    for j in jobs:
        doc = j.document
        if doc is None or len(doc) > policy.max_document_bytes:
            continue  # no document, or refused by the size check of the format code
        if j.signature_format == "P":
            from gateway.sign import pades

            check: Any = functools.partial(pades.inspect_pdf, doc)
        elif j.signature_format == "X" and j.profile is None and _xml_input(j):
            from gateway.sign.xades import parse_untrusted

            check = functools.partial(parse_untrusted, doc, max_depth=policy.max_xml_depth)
        else:
            continue
        try:
            await asyncio.wait_for(asyncio.to_thread(check), INSPECT_SECONDS)
        except TimeoutError as e:
            raise InvalidRequest(
                f"document could not be read within {INSPECT_SECONDS:g} s; nothing was signed"
            ) from e


def _xml_input(job: DocumentJob) -> bool:
    """Whether the generic XAdES builder parses this document as XML (xades.py ``sign``)."""
    assert job.document is not None
    env = service.check_request(
        job.signature_format, job.conformance_level, job.envelope, job.profile
    )
    return env == "Enveloped" or (env == "Enveloping" and job.document.lstrip().startswith(b"<"))


def _doc_failed_detail(spent: SignatureGrant) -> dict[str, Any]:
    """A signDoc's refund: the SAD and the digests given back (``audit verify`` replays it)."""
    return {
        "credential": spent.credential_id,
        "method": "signDoc",
        "sad": spent.sad,
        "hashes": [h.hex() for h in spent.hashes],
    }


def _hash_detail(spent: SignatureGrant) -> dict[str, Any]:
    return {
        "sad": spent.sad,
        "credential": spent.credential_id,
        "key_id": spent.key_id,
        "scal": spent.scal,
        "hash_algorithm": spent.algorithm.value,
        "hashes": [h.hex() for h in spent.hashes],
    }


def _document_detail(spent: SignatureGrant, *, jobs: Sequence[DocumentJob]) -> dict[str, Any]:
    documents = []
    for d, j in zip(spent.hashes, jobs, strict=True):
        entry: dict[str, Any] = {
            "digest": d.hex(),
            "format": j.signature_format,
            "level": j.conformance_level,
            "envelope": j.envelope,
            "profile": j.profile,
        }
        if j.eprescription_input is not None:
            entry.update(_extension_detail(j.eprescription_input))
        documents.append(entry)
    return {
        "sad": spent.sad,
        "credential": spent.credential_id,
        "key_id": spent.key_id,
        "scal": spent.scal,
        "documents": documents,
    }


def _extension_detail(extra: EPrescriptionInput) -> dict[str, Any]:
    """What an e-prescription request from a CSV adds beside the approved digest (SHA-256 of
    the CSV): the document id as given, SHA-256 of the additional information (canonical JSON)
    and of the embedded prescription. The signature does not cover the id and the additional
    information either (as in real documents: its data reference is the document element
    only), so the record is where an auditor finds what the facility system put there."""
    out: dict[str, Any] = {}
    if extra.document_id is not None:
        out["document_id"] = extra.document_id
    if extra.additional:
        lines = [asdict(a) for a in extra.additional]
        canonical = json.dumps(lines, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        out["additional_information_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    if extra.prescription is not None:
        out["prescription_sha256"] = hashlib.sha256(extra.prescription).hexdigest()
    return out
