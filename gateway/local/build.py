"""Building the batch's e-prescriptions in processes of their own, the card kept in the batch's.

One e-prescription costs ~1 ms of Python and lxml work (parse or CSV to XML, C14N, digests,
serialization) against well under a millisecond for the card's round trip through pcscd (the
virtual card) or 0.3-1 s (a real card). In one process the document building and the card
client share one GIL, so the card waits for documents. Here the documents are built in a pool
of processes, up to the bytes the card must sign: each builder runs the unchanged document code
(:func:`gateway.sign.service.sign_document`) with a :class:`DeferredKey` that returns a random
placeholder of the signature's length and keeps the SignedInfo digest it was asked to sign.
The batch process has the card sign that digest and puts the card's signature, in base64, where
the placeholder's base64 stands (the SignatureValue, which no reference covers): the result is
byte for byte the document an in-process signing would have produced.

Only AdES-B-B is built this way: from B-T on, the timestamp covers the SignatureValue, so the
document is finished after the card has signed (the batch builds those in its own process).

Builders are forked from a forkserver that imported the document code once (a new builder
starts in milliseconds), ignore SIGINT (Ctrl-C is the batch's to handle: it finishes the
documents in flight), and get the certificate path and the signing policy once.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import multiprocessing
import os
import pickle
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import forkserver
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import GatewayError
from gateway.hsm.api import DigestAlgorithm
from gateway.sign.eprescription import (
    PROFILES,
    EPrescriptionInput,
    EPrescriptionProfile,
    profile_for_document,
)
from gateway.sign.service import SigningPolicy, sign_document
from gateway.sign.xades import parse_untrusted
from gateway.sign.xades_ltv import LongTermSource

#: Builder processes: the cores left beside the batch process, at least one, at most four.
BUILDERS = max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class Built:
    """A document signed with a placeholder: ``digest`` for the card to sign, then the
    card's signature in base64 in place of ``placeholder`` (in base64, once in ``document``)."""

    document: bytes
    digest: bytes
    placeholder: bytes

    def with_signature(self, signature: bytes) -> bytes:
        return self.document.replace(self.placeholder, base64.b64encode(signature), 1)


class DeferredKey:
    """A key handle for one document: keeps the digest, answers a random placeholder."""

    key_id = "deferred"

    def __init__(self, size: int) -> None:
        self.placeholder = os.urandom(size)
        self.digests: list[bytes] = []

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        if algorithm is not DigestAlgorithm.SHA256 or self.digests:
            raise GatewayError("a deferred signature covers one SHA-256 digest")
        self.digests.append(digest)
        return self.placeholder

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        return [await self.sign_digest(d, algorithm) for d in digests]


@dataclass
class _Context:
    chain: list[x509.Certificate]
    policy: SigningPolicy
    size: int
    loop: asyncio.AbstractEventLoop


_context: _Context | None = None


def _init(chain_der: list[bytes], policy: bytes) -> None:
    """Builder process start: Ctrl-C belongs to the batch; the signer's path and policy."""
    global _context
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chain = [x509.load_der_x509_certificate(d) for d in chain_der]
    key = chain[0].public_key()
    size = (getattr(key, "key_size", 2048) + 7) // 8
    _context = _Context(chain, pickle.loads(policy), size, asyncio.new_event_loop())  # noqa: S301 - from the batch process


def profile_of(data: bytes, name: str, *, max_depth: int = 64) -> EPrescriptionProfile:
    """The input's profile: a CSV is a prescription; an XML document says what it is."""
    if name.lower().endswith(".csv"):
        return PROFILES["jp-eprescription"]
    root = parse_untrusted(data, max_depth=max_depth, what=name).getroot()
    found = profile_for_document(root)
    if found is None:
        raise GatewayError(f"{name} is neither a prescription nor a dispensing document")
    return found


def build_many(items: list[tuple[str, bytes]], level: str, now: Any) -> list[Built | str]:
    """Several files in one call: the cost of a hop between processes, paid once."""
    return [build(name, data, level, now) for name, data in items]


def build(name: str, data: bytes, level: str, now: Any) -> Built | str:
    """One input file up to the card's signature; instead of raising, what went wrong (an
    exception with keyword arguments does not always cross back between processes)."""
    assert _context is not None
    key = DeferredKey(_context.size)
    try:
        profile = profile_of(data, name, max_depth=_context.policy.max_xml_depth)
        return _context.loop.run_until_complete(
            build_with(key, data, profile.name, level, now, _context)
        )
    except GatewayError as e:
        return e.description
    except Exception as e:  # noqa: BLE001 - one unreadable file must not end the batch
        return f"{e!r}"[:500]


async def build_with(
    key: DeferredKey, data: bytes, profile: str, level: str, now: Any, ctx: _Context
) -> Built:
    # The arguments of the batch's in-process signing (batch.job_for), the key deferred.
    signed = await sign_document(
        key=key,
        chain=ctx.chain,
        signature_format="X",
        conformance_level=level,
        envelope="Enveloped",
        document=data,
        profile=profile,
        eprescription_input=EPrescriptionInput(),
        tsa=None,
        now=now,
        policy=ctx.policy,
    )
    doc = signed.document_with_signature
    placeholder = base64.b64encode(key.placeholder)
    if doc is None or len(key.digests) != 1 or doc.count(placeholder) != 1:
        raise GatewayError("the document could not be built for a deferred signature")
    return Built(document=doc, digest=key.digests[0], placeholder=placeholder)


def start_forkserver() -> None:
    """Start the forkserver that builders are forked from, the document code imported (~0.5 s:
    call it in a thread early, e.g. while the PIN is typed)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(["gateway.local.build"])
    forkserver.ensure_running()


def _ready() -> bool:
    return _context is not None


class BuilderPool:
    """The builder processes, started in the background; ``ready`` once they answer."""

    def __init__(self, chain: Sequence[x509.Certificate], policy: SigningPolicy, n: int) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        # AdES-B-B needs no validation data (which holds certificates, not picklable).
        policy = dataclasses.replace(policy, long_term=LongTermSource())
        self.n = n
        self.executor = concurrent.futures.ProcessPoolExecutor(
            n, mp_context=ctx, initializer=_init, initargs=(ders, pickle.dumps(policy))
        )
        self.ready = False

    def start(self) -> None:
        """Start the builders (one per call here, in this executor) and wait for their first
        answers (blocking: call it in a thread; the batch builds documents itself meanwhile)."""
        for f in [self.executor.submit(_ready) for _ in range(self.n)]:
            f.result()
        self.ready = True

    async def build(
        self, items: list[tuple[str, bytes]], level: str, now: Any
    ) -> list[Built | str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, build_many, items, level, now)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
