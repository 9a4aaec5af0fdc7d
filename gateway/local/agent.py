"""The local agent's use case: the card in the reader as one CSC credential.

``authorize`` checks the card's certificate (profile, path, validity, and the hcRole when the
document type is given) BEFORE the PIN goes to the card, then VERIFYs the PIN and wipes it:
the PIN is never kept; the card's own verified state (in the agent's exclusive PC/SC
connection) carries the authorization. The SAD names the hashes (or a count) it covers, lives
``grant_seconds``, and is bound to the card session: a card pulled or replaced ends the session
(``CardStore.generation``), and with it every SAD. When the last SAD is spent or expired the
card is reset, so its verified state ends as well.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from gateway.card.errors import CardError, CardErrorCode
from gateway.clock import Clock, system_clock
from gateway.errors import (
    AccessDenied,
    GatewayError,
    HsmUnavailable,
    InvalidRequest,
)
from gateway.hsm.api import DigestAlgorithm, KeyHandle
from gateway.hsm.card import CardStore
from gateway.local.credential import check_card_certificate
from gateway.sign.service import SignedDocument, SigningPolicy, sign_document
from gateway.sign.timestamp import TimestampClient
from gateway.signing.core import MALFORMED, DocumentJob


class PinRejected(GatewayError):
    """A wrong PIN (``tries_left`` says how many remain) or a blocked card."""

    status = 403
    code = "invalid_pin"

    def __init__(self, description: str, *, tries_left: int | None) -> None:
        super().__init__(description)
        self.tries_left = tries_left


class NoCard(GatewayError):
    status = 503
    code = "no_card"


class InvalidSad(GatewayError):
    """Unknown, spent, expired SAD, or one whose card session has ended."""

    status = 400
    code = "invalid_request"


class CardSessionEnded(InvalidSad):
    """The card was pulled or replaced after the SAD was issued."""


@dataclass
class LocalGrant:
    sad_hash: bytes
    credential_id: str
    generation: int
    expires: float  # monotonic
    remaining: int
    hashes: Counter[bytes] | None  # None: a count, not a list of hashes
    document_type: str | None
    inflight: int = 0  # signatures spent and not yet made (the card must stay unlocked)


@dataclass
class Trust:
    anchors: Sequence[x509.Certificate]
    intermediates: Sequence[x509.Certificate]


@dataclass
class LocalAgent:
    store: CardStore
    trust: Trust
    policy: SigningPolicy = field(default_factory=SigningPolicy)
    tsa: TimestampClient | None = None
    grant_seconds: int = 300
    max_signatures: int = 10_000
    clock: Clock = system_clock
    _grants: dict[bytes, LocalGrant] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: (card session, certificate, validated path, the path's validity window) of the last
    #: path check.
    _path: tuple[int, x509.Certificate, list[x509.Certificate], dt.datetime, dt.datetime] | None = (
        None
    )

    # -- the card -------------------------------------------------------------------------

    async def ensure_card(self) -> str:
        """The credential id of the card in the reader (opening a session when needed)."""
        if self.store.connected:
            await self._probe()  # pulled: the session ended, open a new one below
        if not self.store.connected:
            try:
                await self.store.open()
            except HsmUnavailable as e:
                raise NoCard("no HPKI card in the reader") from e
            except CardError as e:
                raise NoCard(e.message("en")) from e
        assert self.store.key_id is not None
        return self.store.key_id

    async def credential_ids(self) -> list[str]:
        try:
            return [await self.ensure_card()]
        except NoCard:
            return []

    async def certificate(self, credential_id: str) -> x509.Certificate:
        if credential_id not in await self.credential_ids():
            raise InvalidRequest("Invalid parameter credentialID")
        return await self.store.certificate()

    def check_certificate(
        self, cert: x509.Certificate, document_type: str | None
    ) -> list[x509.Certificate]:
        return check_card_certificate(
            cert,
            trust_anchors=self.trust.anchors,
            intermediates=self.trust.intermediates,
            roles=self.policy.roles,
            document_type=document_type,
            now=self.clock(),
        )

    async def tries_left(self) -> int | None:
        """PIN tries left before the card locks (none spent); None when the card won't say."""
        await self.ensure_card()
        return await self.store.pin_tries_left()

    # -- authorize ------------------------------------------------------------------------

    async def authorize(
        self,
        *,
        credential_id: str,
        pin: bytearray,
        num_signatures: int,
        hashes: Sequence[bytes] | None = None,
        algorithm: DigestAlgorithm = DigestAlgorithm.SHA256,
        document_type: str | None = None,
        max_signatures: int | None = None,
        lifetime: float | None = None,
    ) -> str:
        """Check the certificate, VERIFY the PIN (wiped whatever happens); a new SAD.

        ``max_signatures`` and ``lifetime`` (seconds; ``math.inf``: until spent or the card
        session ends) replace the agent's limit and ``grant_seconds`` for callers in this
        process: the batch signs a folder of any size, for hours with a real card, after one
        PIN. The HTTP API keeps both limits."""
        try:
            limit = self.max_signatures if max_signatures is None else max_signatures
            if not 1 <= num_signatures <= limit:
                raise InvalidRequest(f"Invalid parameter numSignatures: 1..{limit}")
            if hashes is not None:
                if len(hashes) != num_signatures:
                    raise InvalidRequest("numSignatures must equal the number of hashes")
                for h in hashes:
                    if len(h) != algorithm.digest_size:
                        raise InvalidRequest(f"a hash is not {algorithm.name}")
            cert = await self.certificate(credential_id)
            self.check_certificate(cert, document_type)  # before the PIN reaches the card
            async with self._lock:
                generation = self.store.generation
                try:
                    await self.store.unlock(pin)
                except CardError as e:
                    raise _pin_error(e) from e
                sad = secrets.token_urlsafe(32)
                sad_hash = _h(sad)
                self._grants[sad_hash] = LocalGrant(
                    sad_hash=sad_hash,
                    credential_id=credential_id,
                    generation=generation,
                    expires=time.monotonic() + (lifetime or self.grant_seconds),
                    remaining=num_signatures,
                    hashes=Counter(hashes) if hashes is not None else None,
                    document_type=document_type,
                )
                return sad
        finally:
            pin[:] = b"\x00" * len(pin)

    async def _spend(self, sad: str, credential_id: str, digests: Sequence[bytes]) -> LocalGrant:
        """Take ``digests`` from the grant (all or nothing); the grant after the spend."""
        grant = self._grants.get(_h(sad))
        if grant is None or grant.credential_id != credential_id:
            raise InvalidSad("Invalid parameter SAD")
        if time.monotonic() >= grant.expires:
            await self._end(grant)
            raise InvalidSad("the SAD has expired")
        if grant.generation != self.store.generation:
            await self._end(grant)
            raise CardSessionEnded("the card was removed or replaced: authorize again")
        if len(digests) > grant.remaining:
            raise InvalidSad("the SAD does not cover this many signatures")
        if grant.hashes is not None:
            need = Counter(digests)
            if any(grant.hashes[d] < n for d, n in need.items()):
                raise InvalidSad("the SAD does not cover these hashes")
            grant.hashes -= need
        grant.remaining -= len(digests)
        return grant

    async def _end(self, grant: LocalGrant) -> None:
        self._grants.pop(grant.sad_hash, None)
        now = time.monotonic()
        live = [
            g
            for g in self._grants.values()
            if (g.expires > now or g.inflight) and g.generation == self.store.generation
        ]
        self._grants = {g.sad_hash: g for g in live}
        if not live and self.store.connected:
            await self.store.relock()  # the card forgets the PIN

    async def _after(self, grant: LocalGrant) -> None:
        if grant.remaining <= 0 and grant.inflight <= 0:
            await self._end(grant)

    async def _probe(self) -> None:
        """Find out whether the card is still the one of this session."""
        with contextlib.suppress(HsmUnavailable):
            await self.store.check()

    # -- signing --------------------------------------------------------------------------

    async def sign_hash(
        self, *, credential_id: str, sad: str, hashes: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        for h in hashes:
            if len(h) != algorithm.digest_size:
                raise InvalidRequest(f"a hash is not {algorithm.name}")
        async with self._lock:
            await self._probe()
            grant = await self._spend(sad, credential_id, hashes)
            try:
                signatures = await self.store.sign_digests(credential_id, hashes, algorithm)
            except (CardError, HsmUnavailable) as e:
                await self._end(grant)
                raise NoCard("the card failed or was removed while signing") from e
            await self._after(grant)
            return signatures

    async def signing_chain(self) -> list[x509.Certificate]:
        """The card certificate's validated path (leaf first, without the anchor when there
        are issuers), built once per card session; later calls re-check only that now lies
        within every certificate's validity (the path's window, kept with it)."""
        cert = await self.store.certificate()
        cached = self._path
        now = self.clock()
        if (
            cached is None
            or cached[0] != self.store.generation
            or cached[1] is not cert
            or not cached[3] <= now < cached[4]
        ):
            path = self.check_certificate(cert, None)
            start = max(c.not_valid_before_utc for c in path)
            end = min(c.not_valid_after_utc for c in path)
            cached = self._path = (self.store.generation, cert, path, start, end)
        path = cached[2]
        return path[:-1] if len(path) > 1 else path

    async def sign_documents(
        self,
        *,
        credential_id: str,
        sad: str,
        jobs: Sequence[DocumentJob],
        probe: bool = True,
    ) -> list[SignedDocument]:
        """Spend under the lock, build and sign outside it: several callers overlap document
        building with the card's round trips (the card store serializes the card itself).

        ``probe=False`` skips asking the card whether it is still there before the spend (one
        round trip): a batch signing many documents learns of a pulled card from the
        signature itself, which fails on the ended PC/SC connection.
        """
        async with self._lock:
            if probe:
                await self._probe()
            digests = [j.digest for j in jobs]
            grant = await self._spend(sad, credential_id, digests)
            grant.inflight += 1
        async with self._in_flight(grant, digests):
            chain = await self.signing_chain()
            handle = await self.store.get_key(credential_id)
            return [await self._sign_job(handle, chain, j) for j in jobs]

    @contextlib.asynccontextmanager
    async def _in_flight(self, grant: LocalGrant, digests: Sequence[bytes]) -> AsyncIterator[None]:
        """A spent grant while its signatures are made (outside the lock): a card that fails
        or is pulled ends the grant (and with it every SAD of the card: NoCard); any other
        failure gives ``digests`` back to the grant, as the remote gateway gives the count
        back (nothing was returned; a document the format libraries cannot read is 400);
        otherwise the grant is settled once the signatures are made."""
        try:
            yield
        except (CardError, HsmUnavailable) as e:
            async with self._lock:
                grant.inflight -= 1
                await self._end(grant)
            raise NoCard("the card failed or was removed while signing") from e
        except BaseException as e:
            grant.inflight -= 1
            grant.remaining += len(digests)
            if grant.hashes is not None:
                grant.hashes.update(digests)
            if isinstance(e, MALFORMED):
                raise InvalidRequest(
                    f"document could not be read ({type(e).__name__}); nothing was signed"
                ) from e
            raise
        async with self._lock:
            grant.inflight -= 1
            await self._after(grant)

    async def _sign_job(
        self, key: KeyHandle, chain: list[x509.Certificate], job: DocumentJob
    ) -> SignedDocument:
        args = {name: getattr(job, name) for name in _JOB_ARGS}
        return await sign_document(
            key=key, chain=chain, tsa=self.tsa, now=self.clock(), policy=self.policy, **args
        )

    async def close(self) -> None:
        self._grants.clear()
        await self.store.close()


#: A job's fields other than its digest are sign_document's arguments, by name.
_JOB_ARGS = tuple(f.name for f in dataclasses.fields(DocumentJob) if f.name != "digest")


def _h(sad: str) -> bytes:
    return hashlib.sha256(sad.encode()).digest()


def _pin_error(e: CardError) -> GatewayError:
    if e.code is CardErrorCode.WRONG_PIN:
        left = e.tries_left
        if left is None:  # a PKCS#11 module does not tell the count
            return PinRejected("wrong PIN", tries_left=None)
        return PinRejected(f"wrong PIN: {left} tries left before the card locks", tries_left=left)
    if e.code is CardErrorCode.PIN_BLOCKED:
        return PinRejected("the card's PIN is blocked (the card must be reissued)", tries_left=0)
    if e.code is CardErrorCode.PIN_FORMAT:
        return InvalidRequest("the PIN has 4 to 16 characters")
    if e.code in (CardErrorCode.CARD_REMOVED, CardErrorCode.NO_CARD):
        return NoCard("the card was removed")
    return AccessDenied(e.message("en"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
