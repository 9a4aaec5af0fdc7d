"""Signatures built off the event loop (gateway/signing/offload.py): the e-prescription is
parsed, built and canonicalised on the builder thread, the key signs on the request's loop,
and a build whose request was cancelled can no longer reach the key."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import threading
from collections.abc import Sequence

import pytest
from cryptography import x509

from gateway.hsm.api import DigestAlgorithm, KeyHandle
from gateway.sign import service
from gateway.sign.eprescription import AdditionalLine, EPrescriptionInput, RolePolicy
from gateway.signing.core import INLINE_BUILD_BYTES, DocumentJob, SigningService
from gateway.signing.offload import BuildCancelled, build_off_loop
from tests.support.softkey import SoftwareKeyHandle, make_world

CSV = "1,医療機関コード,1310000011\n2,患者氏名,試験　花子\n".encode()


class _RecordingKey(SoftwareKeyHandle):
    """A software key that notes the thread each signature is made on."""

    def __init__(self, key: object) -> None:
        super().__init__(key)  # type: ignore[arg-type]
        self.threads: list[str] = []

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        self.threads.append(threading.current_thread().name)
        return await super().sign_digest(digest, algorithm)

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        return [await self.sign_digest(d, algorithm) for d in digests]


@dataclasses.dataclass(frozen=True)
class _RecordingRoles(RolePolicy):
    """The role rule, noting the thread the e-prescription code runs on (its first step)."""

    threads: list[str] = dataclasses.field(default_factory=list)

    def check(self, cert: x509.Certificate, document_type: str) -> str:
        self.threads.append(threading.current_thread().name)
        return super().check(cert, document_type)


def test_the_eprescription_is_built_off_the_loop_and_signed_on_it() -> None:
    world = make_world()
    key = _RecordingKey(world.signer_key)
    roles = _RecordingRoles({"prescription": ["Medical Doctor"]})

    def build(k: KeyHandle, tsa: object) -> object:
        assert tsa is None
        return service.sign_document(
            key=k,
            chain=[world.signer_cert, *world.chain],
            signature_format="X",
            conformance_level="AdES-B-B",
            envelope="Enveloped",
            document=CSV,
            profile="jp-eprescription",
            tsa=None,
            now=dt.datetime.now(dt.UTC),
            policy=service.SigningPolicy(roles=roles),
        )

    async def go() -> tuple[service.SignedDocument, str]:
        signed = await build_off_loop(build, key=key, tsa=None)  # type: ignore[arg-type]
        return signed, threading.current_thread().name

    signed, loop_thread = asyncio.run(go())
    assert signed.document_with_signature is not None
    assert base64.b64encode(CSV) in signed.document_with_signature
    assert roles.threads == ["signature-builder"]
    assert key.threads == [loop_thread] and loop_thread != "signature-builder"


def test_a_cancelled_build_cannot_reach_the_key() -> None:
    world = make_world()
    key = _RecordingKey(world.signer_key)
    started, finished = threading.Event(), threading.Event()
    outcome: list[str] = []

    async def build(k: KeyHandle, tsa: object) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # until the request is cancelled
        except asyncio.CancelledError:
            try:
                await k.sign_digest(b"\0" * 32, DigestAlgorithm.SHA256)
                outcome.append("signed")
            except BuildCancelled:
                outcome.append("refused")
            finally:
                finished.set()
            raise

    async def go() -> None:
        task = asyncio.create_task(build_off_loop(build, key=key, tsa=None))
        assert await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The build's attempt to sign goes through this loop: keep it running meanwhile.
        assert await asyncio.to_thread(finished.wait, 30)

    asyncio.run(go())
    assert outcome == ["refused"]
    assert key.threads == []


def test_errors_of_the_build_come_back_as_raised() -> None:
    world = make_world()

    async def build(k: KeyHandle, tsa: object) -> None:
        raise KeyError("a library's lookup error")

    async def go() -> None:
        await build_off_loop(build, key=SoftwareKeyHandle(world.signer_key), tsa=None)

    with pytest.raises(KeyError, match="lookup"):
        asyncio.run(go())


def _service(roles: RolePolicy) -> SigningService:
    """A signing service with only what ``_build`` uses (its policy; no TSA at B-B)."""
    return SigningService(
        db=None,  # type: ignore[arg-type]
        audit=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        keystore=None,  # type: ignore[arg-type]
        clock=lambda: dt.datetime.now(dt.UTC),
        policy=service.SigningPolicy(roles=roles),
        tsa=None,
    )


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_small_xades_is_built_on_the_loop_and_a_large_one_on_the_builder_thread(
    size: str,
) -> None:
    """Up to INLINE_BUILD_BYTES of input the hops to the builder thread cost more than the
    build: it runs on the loop. Above, on the builder thread with its time limit. The
    e-prescription's additional code lines count towards the size, as the document does."""
    world = make_world()
    key = _RecordingKey(world.signer_key)
    roles = _RecordingRoles({"prescription": ["Medical Doctor"]})
    extra = EPrescriptionInput()
    if size == "large":
        lines = INLINE_BUILD_BYTES // 100 + 1
        extra = EPrescriptionInput(
            additional=[AdditionalLine(re_code="1," + "6" * 100) for _ in range(lines)]
        )
        assert len(CSV) < INLINE_BUILD_BYTES  # the document alone would be built on the loop
    job = DocumentJob(
        digest=hashlib.sha256(CSV).digest(),
        signature_format="X",
        conformance_level="AdES-B-B",
        envelope="Enveloped",
        document=CSV,
        profile="jp-eprescription",
        eprescription_input=extra,
    )

    async def go() -> tuple[service.SignedDocument, str]:
        signed = await _service(roles)._build(
            job,
            key=key,
            chain=[world.signer_cert, *world.chain],
            now=dt.datetime.now(dt.UTC),
        )
        return signed, threading.current_thread().name

    signed, loop_thread = asyncio.run(go())
    assert roles.threads == (["signature-builder"] if size == "large" else [loop_thread])
    assert signed.document_with_signature is not None
    assert key.threads == [loop_thread]  # the key signs on the loop either way
